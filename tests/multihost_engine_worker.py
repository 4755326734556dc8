"""One process of the multi-process engine test (tests/test_multihost.py), launched as a
subprocess.

Joins a `--num-processes` job on localhost (CPU devices, gloo collectives) and builds the
continuous-batching `Engine` on a data=2 x tensor=2 mesh over all devices: with two processes of
two devices each, every process runs one replica of the engine (its own devices) and
`generate` returns every request's result in every process. Runs a batch of greedy and seeded
sampled requests: with the weights as host arrays; with a `check` that raises in process 1 only,
before the first step and then between steps (both processes must raise, neither may hang);
with different requests in the two processes (both refuse); and after `update_params` to new
weights split across the processes. Then one engine program over both processes' devices
(fsdp=2 x tensor=2, no data axis), and process 0 alone an engine on its own two devices, which
must not wait for process 1. Writes `engine_<process>.json` into
`--out`.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from qwen2_jax import api, distributed, presets, sharding  # noqa: E402
from qwen2_jax.infer import Engine, ReplicaProcessError, SamplingParams  # noqa: E402
from multihost_worker import job_parser  # noqa: E402  (this directory is on sys.path)
# pylint: enable=wrong-import-position

ENGINE_KW = dict(eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8, page_size=4,
                 num_pages=64)


def requests(vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
  """Seven requests of mixed prompt and output lengths, one prompt repeated; every third one
  sampled (temperature 0.9, its own seed)."""
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, vocab_size, int(n)).tolist() for n in (3, 9, 5, 12, 2, 7)]
  prompts.append(list(prompts[1]))
  news = (5, 3, 8, 2, 6, 4, 7)
  sps = [SamplingParams(max_new_tokens=n, temperature=0.9 if i % 3 == 0 else 0.0, seed=10 + i)
         for i, n in enumerate(news)]
  return prompts, sps


def new_params(config):
  """The weights `update_params` switches to (another seed), as host arrays."""
  return jax.tree.map(np.asarray, jax.jit(lambda k: api.init_params(config, k))(
      jax.random.key(1)))


def main() -> None:
  args = job_parser().parse_args()
  info = distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                num_cpu_devices=args.devices_per_process)
  config = presets.get_preset("qwen2-tiny", initializer_range=0.2)
  params = jax.jit(lambda k: api.init_params(config, k))(jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("data=2,tensor=2"))
  engine = Engine(config, params, mesh=mesh, rules="fsdp_tp", **ENGINE_KW)
  prompts, sps = requests(config.vocab_size)
  first = engine.generate(prompts, sps)

  def failing(at: int):
    """A check that raises at its `at`-th call in process 1 only (the 1st call comes before any
    step, later ones between steps, in the replica's thread)."""
    calls = [0]

    def check():
      calls[0] += 1
      if info.process_id == 1 and calls[0] == at:
        raise ValueError(f"stop at call {at}")
    return check

  errors = []
  for at in (1, 3):
    try:
      engine.run_batch(engine.validate(prompts, sps), check=failing(at), check_interval=1)
      errors.append(None)
    except (ValueError, ReplicaProcessError) as e:
      errors.append(f"{type(e).__name__}: {e}")
  # Different requests in the two processes: both refuse before any step.
  try:
    engine.generate(prompts[:len(prompts) - info.process_id], sps[:len(prompts) - info.process_id])
    errors.append(None)
  except ReplicaProcessError as e:
    errors.append(f"{type(e).__name__}: {e}")
  # New weights, split across the processes (leading axis over "data" where it divides).
  def split(a):
    spec = PartitionSpec("data") if a.ndim and a.shape[0] % 2 == 0 else PartitionSpec()
    return jax.device_put(a, NamedSharding(mesh, spec))
  spread = jax.tree.map(split, new_params(config))
  assert any(not a.is_fully_addressable for a in jax.tree.leaves(spread))
  engine.update_params(spread)
  again = engine.generate(prompts, sps)
  # One program over both processes (no data axis; fsdp spans the processes).
  whole = sharding.make_mesh(sharding.MeshConfig.from_string("fsdp=2,tensor=2"))
  one = Engine(config, params, mesh=whole, rules="fsdp_tp", **ENGINE_KW)
  assert one.num_replicas == 1
  together = [[r.output_ids, r.logprobs, r.finish_reason] for r in one.generate(prompts, sps)]
  # An engine on this process's own devices only (process 0): no exchange with process 1.
  alone = None
  if info.process_id == 0:
    own = sharding.make_mesh(sharding.MeshConfig.from_string("data=2"), jax.local_devices())
    local = Engine(config, params, mesh=own, rules="fsdp_tp", **ENGINE_KW)
    alone = [[r.output_ids, r.logprobs, r.finish_reason] for r in local.generate(prompts, sps)]
  result = {"process_id": info.process_id, "num_processes": info.num_processes,
            "local_devices": info.local_devices, "num_replicas": engine.num_replicas,
            "local_replicas": len(engine._replicas),  # pylint: disable=protected-access
            "steps": engine.stats["steps"], "errors": errors,
            "first": [[r.output_ids, r.logprobs, r.finish_reason] for r in first],
            "again": [[r.output_ids, r.logprobs, r.finish_reason] for r in again],
            "alone": alone, "together": together}
  with open(os.path.join(args.out, f"engine_{info.process_id}.json"), "w") as f:
    json.dump(result, f)
  multihost_utils.sync_global_devices("multihost_engine_worker:done")
  distributed.shutdown()


if __name__ == "__main__":
  main()
