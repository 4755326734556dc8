"""Two processes on localhost (jax.distributed, gloo CPU collectives) vs one process.

Each run is `tests/multihost_worker.py` in its own subprocess with 4 devices in all: two
processes of 2 CPU devices, or one process of 4, on the same data=2 x fsdp=2 mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qwen2_jax import api, distributed, presets
from qwen2_jax.checkpoint import hf

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(worker: str, num_processes: int, out, extra=(), port=0) -> None:
  """Runs `worker` as `num_processes` processes of one job (4 CPU devices in all) and waits;
  fails the test with a worker's log when it times out or exits non-zero."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  procs, logs = [], []
  for pid in range(num_processes):
    cmd = [sys.executable, worker, "--process-id", str(pid), "--num-processes",
           str(num_processes), "--port", str(port), "--devices-per-process",
           str(4 // num_processes), "--out", str(out), *extra]
    # Output goes to files, not pipes: an undrained pipe of one worker would block it while
    # the test waits on the other, and the pair would deadlock in a collective.
    log = open(out / f"worker_{pid}.log", "w")  # pylint: disable=consider-using-with
    logs.append(log)
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    for pid, p in enumerate(procs):
      try:
        p.wait(timeout=600)  # ~100 s idle; generous for a loaded CI machine
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        pytest.fail(f"multi-host worker {pid} timed out:\n"
                    f"{(out / f'worker_{pid}.log').read_text()[-4000:]}")
  finally:
    for log in logs:
      log.close()
  for pid, p in enumerate(procs):
    text = (out / f"worker_{pid}.log").read_text()
    assert p.returncode == 0, f"worker {pid} exited with {p.returncode}:\n{text[-4000:]}"


def _launch(num_processes: int, hf_dir, out, compare=None, port=0):
  extra = ["--hf", str(hf_dir)] + (["--compare", str(compare)] if compare else [])
  _run_workers(WORKER, num_processes, out, extra, port)
  return [json.loads((out / f"result_{i}.json").read_text()) for i in range(num_processes)]


@pytest.mark.slow
def test_two_processes_match_one_process_and_share_a_checkpoint(tmp_path):
  """2 processes x 2 devices compute the 1-process loss and grad norm, load an HF checkpoint
  into their shards, and save + restore a sharded Orbax checkpoint that the 1-process run
  restores to its own updated params."""
  config = presets.get_preset("qwen2-tiny")
  params = jax.jit(lambda k: api.init_params(config, k))(jax.random.key(0))
  hf.save_hf_checkpoint(tmp_path / "hf", config, params, show_progress=False)
  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  two = _launch(2, tmp_path / "hf", tmp_path / "two", port=_free_port())
  (one,) = _launch(1, tmp_path / "hf", tmp_path / "one", compare=tmp_path / "two" / "ckpt")

  assert [r["num_processes"] for r in two] == [2, 2] and one["num_processes"] == 1
  assert all(r["global_devices"] == 4 and r["local_devices"] == 2 for r in two)
  for r in two:
    assert r["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert r["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert r["tokens"] == one["tokens"]
    assert r["hf_max_diff"] == 0.0 and r["orbax_max_diff"] == 0.0 and r["restored_sharding_ok"]
  assert one["hf_max_diff"] == 0.0 and one["orbax_max_diff"] == 0.0
  assert one["compare_max_diff"] < 1e-6  # the 2-process params, restored by 1 process


def test_initialize_without_a_job_is_single_process(monkeypatch):
  """With no flags, no job environment and no TPU pod, initialize() leaves one process."""
  for name in ("QWEN2_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  info = distributed.initialize()
  assert (info.process_id, info.num_processes) == (0, 1)
  assert info.global_devices == info.local_devices == jax.device_count()


def test_initialize_rejects_a_partial_job_description(monkeypatch):
  """Some but not all of coordinator / process count / process id is an error naming them."""
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  monkeypatch.delenv("QWEN2_JAX_PROCESS_ID", raising=False)
  monkeypatch.setenv("QWEN2_JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize(coordinator_address="127.0.0.1:1234")


ENGINE_WORKER = os.path.join(os.path.dirname(__file__), "multihost_engine_worker.py")


@pytest.mark.slow
def test_engine_replicas_in_two_processes_match_one_engine(tmp_path):
  """2 processes x 2 CPU devices on a data=2 x tensor=2 mesh: each process runs one replica of
  the Engine (its own devices), and `generate` gives every process every request's tokens
  (greedy and seeded samples) and finish reasons, as one unsharded engine computes them. A
  `check` that raises in process 1 only, before the first step or between steps, makes both
  processes raise (process 0 names process 1's error) instead of waiting for each other;
  different requests in the two processes are refused in both; the engine then runs again with
  new weights split across the processes; one engine program over both processes' devices (no
  data axis) gives the same results; an engine on one process's own devices runs without the
  other process."""
  import multihost_engine_worker as worker  # pylint: disable=import-outside-toplevel
  from qwen2_jax.infer import Engine  # pylint: disable=import-outside-toplevel
  _run_workers(ENGINE_WORKER, 2, tmp_path, port=_free_port())
  results = [json.loads((tmp_path / f"engine_{i}.json").read_text()) for i in range(2)]

  config = presets.get_preset("qwen2-tiny", initializer_range=0.2)
  params = jax.jit(lambda k: api.init_params(config, k))(jax.random.key(0))
  prompts, sps = worker.requests(config.vocab_size)
  want = {"first": Engine(config, params, **worker.ENGINE_KW).generate(prompts, sps),
          "again": Engine(config, worker.new_params(config),
                          **worker.ENGINE_KW).generate(prompts, sps)}
  want["alone"] = want["together"] = want["first"]
  assert [w.output_ids for w in want["again"]] != [w.output_ids for w in want["first"]]
  for r in results:
    assert (r["num_processes"], r["local_devices"]) == (2, 2)
    assert (r["num_replicas"], r["local_replicas"]) == (2, 1)
    assert r["steps"] > 0  # each process ran a share
    for run in ("first", "again", "together", "alone"):
      if r[run] is None:  # "alone": process 0 only
        assert run == "alone" and r["process_id"] == 1
        continue
      assert [o[0] for o in r[run]] == [w.output_ids for w in want[run]]
      assert [o[2] for o in r[run]] == [w.finish_reason for w in want[run]]
      for o, w in zip(r[run], want[run]):
        np.testing.assert_allclose(o[1], w.logprobs, atol=1e-4)
  for at, k in ((1, 0), (3, 1)):
    assert results[1]["errors"][k] == f"ValueError: stop at call {at}"
    assert results[0]["errors"][k] == ("ReplicaProcessError: run_batch: process 1's replicas "
                                       f"failed: ValueError: stop at call {at}")
  for r in results:
    assert r["errors"][2].startswith("ReplicaProcessError: run_batch: the processes did not "
                                     "pass the same requests")
