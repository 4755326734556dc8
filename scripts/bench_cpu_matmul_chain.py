"""The decode matmuls of one engine step, alone: Qwen2-0.5B's 24 layers (fused q/k/v 896 x 1152,
o 896 x 896, gate/up 896 x 9728, down 4864 x 896) and the head (896 x 151936), 1.98 GB of fp32
weights, multiplied by `cpu_matmul.packed_matmul` in one jitted program, fp32 panels against
bf16x3 tiles, at several row counts. Prints the median of 10 calls per configuration.

  python scripts/bench_cpu_matmul_chain.py [--rows 16 32 48 64 128 512] [--packings fp32 bf16x3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.kernels import cpu_matmul

L, H, I, V = 24, 896, 4864, 151936
SHAPES = [(H, 1152), (H, H), (H, 2 * I), (I, H)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 48, 64, 128, 512])
  parser.add_argument("--packings", nargs="+", default=["fp32", "bf16x3"],
                      choices=["fp32", "bf16x3"])
  parser.add_argument("--calls", type=int, default=10)
  args = parser.parse_args()
  if not cpu_matmul.available():
    raise SystemExit("the qwen2_jax._cpu_kernels extension is not built")
  print(f"panel width {cpu_matmul.panel_width()}, AMX {cpu_matmul.amx()}, "
        f"{jax.device_count()} device(s), backend {jax.default_backend()}")
  rng = np.random.default_rng(0)
  for packing in args.packings:
    pack = (lambda w: cpu_matmul.pack(w, cpu_matmul.panel_width() or 16)) \
        if packing == "fp32" else cpu_matmul.pack_bf16x3
    layers = [[jnp.asarray(pack(rng.standard_normal(s, np.float32) * 0.02)) for s in SHAPES]
              for _ in range(L)]
    head = jnp.asarray(pack(rng.standard_normal((H, V), np.float32) * 0.02))

    def chain(x, layers, head):
      for qkv, o, gu, d in layers:
        a = cpu_matmul.packed_matmul(x, qkv, 1152)[:, :H]
        x = x + cpu_matmul.packed_matmul(a, o, H)
        g = cpu_matmul.packed_matmul(x, gu, 2 * I)
        x = x + cpu_matmul.packed_matmul(jax.nn.silu(g[:, :I]) * g[:, I:], d, H)
      return cpu_matmul.packed_matmul(x, head, V)

    for m in args.rows:
      x = jnp.asarray(rng.standard_normal((m, H), np.float32))
      compiled = jax.jit(chain).lower(x, layers, head).compile()
      compiled(x, layers, head).block_until_ready()
      times = []
      for _ in range(args.calls):
        t0 = time.perf_counter()
        compiled(x, layers, head).block_until_ready()
        times.append(time.perf_counter() - t0)
      t = statistics.median(times)
      flops = 2 * m * (L * sum(k * n for k, n in SHAPES) + H * V)
      print(f"{packing:7s} rows {m:4d}: {t * 1e3:7.1f} ms  {flops / t / 1e9:5.0f} GFLOP/s")
    del layers, head


if __name__ == "__main__":
  main()
