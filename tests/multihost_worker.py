"""One process of the multi-host test (tests/test_multihost.py), launched as a subprocess.

Joins a `--num-processes` job on localhost (CPU devices, gloo collectives) through
`qwen2_jax.distributed`, then on a data=2 x fsdp=2 mesh over all devices: loads the HF checkpoint
at `--hf` straight into its shardings and checks it against the sharded random init, runs one
sharded train step on a fixed global batch (each process feeds only its own rows), saves the
new params as a sharded Orbax checkpoint under `--out` and restores them. With `--compare` it
also restores another run's checkpoint and reports the largest difference to its own params.
Writes `result_<process>.json` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import optax  # noqa: E402  pylint: disable=wrong-import-position
from jax.experimental import multihost_utils  # noqa: E402  pylint: disable=wrong-import-position

from qwen2_jax import distributed, presets, sharding  # noqa: E402  pylint: disable=wrong-import-position
from qwen2_jax.checkpoint import hf, orbax_io  # noqa: E402  pylint: disable=wrong-import-position
from qwen2_jax.train import step as train_lib  # noqa: E402  pylint: disable=wrong-import-position

GLOBAL_BATCH, SEQ = 8, 16


def global_batch(config) -> dict[str, np.ndarray]:
  """The same [8, 16] batch in every process (each one then keeps only its rows)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, config.vocab_size, (GLOBAL_BATCH, SEQ)).astype(np.int32)
  return {"input_ids": ids, "targets": np.roll(ids, -1, 1),
          "loss_mask": (rng.random((GLOBAL_BATCH, SEQ)) > 0.2).astype(np.float32),
          "positions": np.arange(SEQ, dtype=np.int32)[None].repeat(GLOBAL_BATCH, 0),
          "segment_ids": np.ones((GLOBAL_BATCH, SEQ), np.int32)}


def max_abs_diff(a, b) -> float:
  """Largest |a - b| over two sharded trees, as a host float (works across processes)."""
  diff = jax.jit(lambda x, y: jnp.max(jnp.stack([jnp.max(jnp.abs(p - q)) for p, q in
                                                 zip(jax.tree.leaves(x), jax.tree.leaves(y))])))
  return float(np.asarray(diff(a, b).addressable_data(0)))


def job_parser() -> argparse.ArgumentParser:
  """The flags every multi-process test worker takes: where it stands in the job, its CPU
  devices and its output directory."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--devices-per-process", type=int, required=True)
  parser.add_argument("--out", required=True)
  return parser


def main() -> None:
  parser = job_parser()
  parser.add_argument("--hf", required=True)
  parser.add_argument("--compare", default=None)
  args = parser.parse_args()
  if args.num_processes > 1:
    info = distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                  num_cpu_devices=args.devices_per_process)
  else:
    info = distributed.initialize(num_cpu_devices=args.devices_per_process)

  config = presets.get_preset("qwen2-tiny")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1))
  rules = sharding.get_rules("fsdp")
  optimizer = optax.adamw(1e-3, eps=1e-6)
  state = train_lib.init_train_state_sharded(config, optimizer, jax.random.key(0), mesh, rules)
  _, loaded = hf.load_hf_checkpoint(args.hf, mesh=mesh, rules=rules, show_progress=False)
  hf_diff = max_abs_diff(loaded, state.params)

  batch = global_batch(config)
  rows = GLOBAL_BATCH // info.num_processes
  mine = {k: v[info.process_id * rows:(info.process_id + 1) * rows] for k, v in batch.items()}
  step = train_lib.make_train_step(config, optimizer, mesh, rules)
  state, metrics = step(state, sharding.host_local_batch(mine, mesh, rules))
  metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in metrics.items()}

  ckpt = os.path.join(args.out, "ckpt")
  orbax_io.save_orbax(ckpt, config, state.params)
  _, restored = orbax_io.restore_orbax(ckpt, mesh=mesh, rules=rules)
  result = {"process_id": info.process_id, "num_processes": info.num_processes,
            "global_devices": info.global_devices, "local_devices": info.local_devices,
            **metrics, "hf_max_diff": hf_diff,
            "orbax_max_diff": max_abs_diff(restored, state.params),
            "restored_sharding_ok": all(
                r.sharding.is_equivalent_to(p.sharding, p.ndim) for r, p in
                zip(jax.tree.leaves(restored), jax.tree.leaves(state.params)))}
  if args.compare:
    _, other = orbax_io.restore_orbax(args.compare, mesh=mesh, rules=rules)
    result["compare_max_diff"] = max_abs_diff(other, state.params)
  with open(os.path.join(args.out, f"result_{info.process_id}.json"), "w") as f:
    json.dump(result, f)
  if info.num_processes > 1:
    # Reach the shutdown barrier together: a process that is still busy when its peer enters
    # the barrier makes the coordination service abort the job after its timeout.
    multihost_utils.sync_global_devices("multihost_worker:done")
  distributed.shutdown()


if __name__ == "__main__":
  main()
