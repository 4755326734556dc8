"""Multi-host start-up: `jax.distributed` from explicit flags, the environment, or a TPU pod.

Call `initialize()` once per process, before anything touches a JAX device. Sources, first
match wins:

  1. explicit arguments (`coordinator_address`, `num_processes`, `process_id`), e.g. from the
     `--coordinator-address/--num-processes/--process-id` flags of `add_arguments`;
  2. environment variables QWEN2_JAX_COORDINATOR_ADDRESS, QWEN2_JAX_NUM_PROCESSES,
     QWEN2_JAX_PROCESS_ID (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID also
     accepted);
  3. a multi-host Cloud TPU VM slice or multi-slice job (TPU_WORKER_HOSTNAMES lists more than
     one host, or MEGASCALE_COORDINATOR_ADDRESS is set): `jax.distributed.initialize()` with no
     arguments, which reads the TPU metadata;
  4. otherwise a single process: nothing to do.

On the CPU backend the cross-process collectives use gloo, so N local processes form one job
(how multi-host code is tested on one machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

# jax is imported inside the functions that use it: the CLI registers `add_arguments` while
# building its parser, and `qwen2-jax --help` must not wait for jax to import.

log = logging.getLogger(__name__)

_ENV_PREFIXES = ("QWEN2_JAX_", "JAX_")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  process_id: int
  num_processes: int
  local_devices: int
  global_devices: int


def _env(name: str) -> str | None:
  for prefix in _ENV_PREFIXES:
    value = os.environ.get(prefix + name)
    if value:
      return value
  return None


def _on_tpu_pod() -> bool:
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: list[int] | None = None,
               num_cpu_devices: int | None = None,
               initialization_timeout: int = 300) -> ProcessInfo:
  """Joins (or declines to join) a multi-process JAX job; returns where this process stands.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: processes in the job.
    process_id: this process's index in [0, num_processes).
    local_device_ids: restrict this process to these local devices (e.g. one GPU each).
    num_cpu_devices: CPU devices per process (CPU backend only; testing).
    initialization_timeout: seconds to wait for every process to connect.

  Raises:
    ValueError: only some of the three job arguments are given.
  """
  import jax  # pylint: disable=import-outside-toplevel
  coordinator_address = coordinator_address or _env("COORDINATOR_ADDRESS")
  if num_processes is None and _env("NUM_PROCESSES"):
    num_processes = int(_env("NUM_PROCESSES"))
  if process_id is None and _env("PROCESS_ID"):
    process_id = int(_env("PROCESS_ID"))
  if num_cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", num_cpu_devices)
  if jax.distributed.is_initialized():
    return process_info()
  given = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(given) and not all(given):
    raise ValueError("multi-process start-up needs all of coordinator_address, num_processes and "
                     f"process_id (got {coordinator_address!r}, {num_processes!r}, "
                     f"{process_id!r})")
  if all(given):
    if num_processes > 1:
      _use_gloo_on_cpu()
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id,
                                 local_device_ids=local_device_ids,
                                 initialization_timeout=initialization_timeout)
  elif _on_tpu_pod():
    jax.distributed.initialize(local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
  info = process_info()
  if info.num_processes > 1:
    log.info("process %d of %d: %d local / %d global devices", info.process_id,
             info.num_processes, info.local_devices, info.global_devices)
  return info


def _use_gloo_on_cpu() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms.split(",")[0] in ("cpu", ""):
    # Harmless on TPU/GPU (the option only affects the CPU client), required on CPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def process_info() -> ProcessInfo:
  import jax  # pylint: disable=import-outside-toplevel
  return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def shutdown() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --coordinator-address, --num-processes, --process-id to a command's parser."""
  group = parser.add_argument_group("multi-host (default: from the environment / TPU pod)")
  group.add_argument("--coordinator-address", default=None,
                     help="host:port of process 0's coordinator")
  group.add_argument("--num-processes", type=int, default=None, help="processes in the job")
  group.add_argument("--process-id", type=int, default=None, help="this process's index")


def initialize_from_args(args: argparse.Namespace) -> ProcessInfo:
  return initialize(args.coordinator_address, args.num_processes, args.process_id)
