"""One process of the multi-process engine test (tests/test_multihost.py), launched as a
subprocess.

Joins a `--num-processes` job on localhost (CPU devices, gloo collectives) and builds the
continuous-batching `Engine` on a data=2 x tensor=2 mesh over all devices: with two processes of
two devices each, every process runs one replica of the engine (its own devices) and
`generate` returns every request's result in every process. Runs a batch of greedy and seeded
sampled requests three times: with the weights as host arrays, after one replica's `check`
raises (process 1's only: both processes must raise, neither may hang), and after
`update_params` with weights sharded over the whole mesh. Writes `engine_<process>.json` into
`--out`.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from jax.experimental import multihost_utils  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402  pylint: disable=wrong-import-position

from qwen2_jax import api, distributed, presets, sharding  # noqa: E402  pylint: disable=wrong-import-position
from qwen2_jax.infer import Engine, SamplingParams  # noqa: E402  pylint: disable=wrong-import-position
from qwen2_jax.infer.engine import ReplicaProcessError  # noqa: E402  pylint: disable=wrong-import-position

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


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--devices-per-process", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  info = distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                num_cpu_devices=args.devices_per_process)
  config = presets.get_preset("qwen2-tiny", initializer_range=0.2)
  params = jax.jit(lambda k: api.init_params(config, k))(jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("data=2,tensor=2"))
  engine = Engine(config, params, mesh=mesh, rules="fsdp_tp", **ENGINE_KW)
  prompts, sps = requests(config.vocab_size)
  first = engine.generate(prompts, sps)

  def check():
    if info.process_id == 1:
      raise ValueError("stop here")
  error = None
  try:
    engine.run_batch(engine.validate(prompts, sps), check=check, check_interval=1)
  except (ValueError, ReplicaProcessError) as e:
    error = f"{type(e).__name__}: {e}"
  # Weights sharded over the whole mesh (every process holds only its devices' copies).
  replicated = NamedSharding(mesh, PartitionSpec())
  engine.update_params(jax.tree.map(lambda a: jax.device_put(a, replicated), params))
  again = engine.generate(prompts, sps)
  result = {"process_id": info.process_id, "num_processes": info.num_processes,
            "local_devices": info.local_devices, "num_replicas": engine.num_replicas,
            "local_replicas": len(engine._replicas),  # pylint: disable=protected-access
            "steps": engine.stats["steps"], "error": error,
            "first": [[r.output_ids, r.logprobs, r.finish_reason] for r in first],
            "again": [[r.output_ids, r.logprobs, r.finish_reason] for r in again]}
  with open(os.path.join(args.out, f"engine_{info.process_id}.json"), "w") as f:
    json.dump(result, f)
  multihost_utils.sync_global_devices("multihost_engine_worker:done")
  distributed.shutdown()


if __name__ == "__main__":
  main()
