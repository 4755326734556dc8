"""Tests of the Pallas grouped matmul (`qwen2_jax.kernels.gmm`).

Numerics run the TPU kernels in the Pallas interpreter on the CPU (small shapes) and compare them
with the pure-jnp references: gmm forward, d lhs and d rhs (through the `custom_vjp`), tgmm, with
random group sizes that include zeros and are not tile multiples. jax's own megablox `gmm` is an
extra oracle. Compilation for TPU runs libtpu ahead of time in a subprocess (this file's
`__main__`), so its environment stays out of pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.kernels import gmm as G

TILES_128 = G.Tiling(128, 128, 128)


def _random_sizes(rng, g, total, zeros=2):
  """g group sizes summing to `total`, at least `zeros` of them 0, none a multiple of 128."""
  cuts = np.sort(rng.integers(0, total + 1, g - 1 - zeros))
  sizes = np.diff(np.concatenate([[0], cuts, [total]]))
  sizes = np.concatenate([sizes, np.zeros(zeros, np.int64)])
  return jnp.asarray(rng.permutation(sizes).astype(np.int32))


def _operands(seed, m, k, n, g, dtype=jnp.float32, transpose_rhs=False):
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
  rhs = jax.random.normal(ks[1], (g, n, k) if transpose_rhs else (g, k, n), jnp.float32)
  dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
  return lhs, rhs.astype(dtype), dout


def _rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _value_and_vjp(fn, lhs, rhs, dout):
  def run(lhs, rhs, dout):
    out, vjp = jax.vjp(fn, lhs, rhs)
    return out, vjp(dout)
  return jax.jit(run)(lhs, rhs, dout)


# (m, k, n, g, rows used, transpose_rhs, tiling); several row tiles, k / n tiles and groups that
# straddle tiles; rows past the used ones must come out 0.
CASES = {
    "3_row_tiles_5_groups_tail": (300, 256, 384, 5, 260, False, TILES_128),
    "all_rows_8_groups": (384, 128, 256, 8, 384, False, TILES_128),
    "transposed_rhs_odd_dims": (200, 200, 72, 4, 190, True, TILES_128),
    "one_tile_default_tiling": (96, 64, 48, 6, 96, False, G.Tiling()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gmm_forward_and_grads_match_reference(case):
  """Kernel out, d lhs and d rhs equal the reference; zero groups; tail rows are exactly 0."""
  m, k, n, g, used, transpose_rhs, tiling = CASES[case]
  rng = np.random.default_rng(len(case))
  sizes = _random_sizes(rng, g, used)
  lhs, rhs, dout = _operands(len(case), m, k, n, g, transpose_rhs=transpose_rhs)
  kernel = lambda a, b: G.gmm(a, b, sizes, transpose_rhs=transpose_rhs, tiling=tiling,
                              interpret=True)
  reference = lambda a, b: G.gmm_reference(a, b, sizes, transpose_rhs=transpose_rhs)
  out, (dl, dr) = _value_and_vjp(kernel, lhs, rhs, dout)
  out_r, (dl_r, dr_r) = _value_and_vjp(reference, lhs, rhs, dout)
  assert out.shape == (m, n) and _rel_err(out, out_r) < 1e-5
  assert np.all(np.asarray(out[used:]) == 0) and np.all(np.asarray(dl[used:]) == 0)
  assert _rel_err(dl, dl_r) < 1e-5 and _rel_err(dr, dr_r) < 1e-5
  empty = np.flatnonzero(np.asarray(sizes) == 0)
  assert np.all(np.asarray(dr)[empty] == 0)  # no rows: zero weight gradient


def test_tgmm_matches_reference_with_empty_groups():
  """tgmm == reference; empty groups (first, middle, last) get exactly-zero blocks."""
  lhs, _, dout = _operands(3, 333, 136, 200, 1)
  sizes = jnp.asarray([0, 120, 0, 0, 150, 33, 0], jnp.int32)
  out = G.tgmm(lhs, dout, sizes, tiling=TILES_128, interpret=True)
  ref = G.tgmm_reference(lhs, dout, sizes)
  assert out.shape == (7, 136, 200) and _rel_err(out, ref) < 1e-5
  assert np.all(np.asarray(out)[[0, 2, 3, 6]] == 0)


def test_bf16_inputs_accumulate_in_f32():
  """bf16 operands match the f32 reference to bf16 precision (f32 accumulation)."""
  sizes = jnp.asarray([100, 0, 156], jnp.int32)
  lhs, rhs, _ = _operands(5, 256, 512, 128, 3, jnp.bfloat16)
  out = G.gmm(lhs, rhs, sizes, tiling=TILES_128, interpret=True)
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out, G.gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                                       sizes)) < 1e-2


def test_matches_megablox_gmm():
  """jax's own megablox gmm (an independent kernel) agrees on the forward, with empty groups."""
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
  sizes = jnp.asarray([37, 0, 128, 91, 0], jnp.int32)  # sums to m: megablox leaves no tail
  lhs, rhs, _ = _operands(7, 256, 128, 256, 5)
  theirs = megablox_gmm(lhs, rhs, sizes, tiling=(128, 128, 128), interpret=True)
  ours = G.gmm(lhs, rhs, sizes, tiling=TILES_128, interpret=True)
  assert _rel_err(ours, theirs) < 1e-5


def test_visit_tables_cover_every_block_once_in_order():
  """Visits: row tiles never decrease, every tile / group appears, flags mark run ends."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    g, tm, tiles = int(rng.integers(1, 9)), 16, int(rng.integers(1, 7))
    sizes = _random_sizes(rng, g, int(rng.integers(0, tm * tiles + 1)), zeros=min(g - 1, 1))
    for by_group in (False, True):
      v = jax.tree.map(np.asarray, G._visits(sizes, tm * tiles, tm, by_group=by_group))
      n = int(v.count)
      assert 1 <= n <= tiles + g
      tile, group = v.tile[:n], v.group[:n]
      assert np.all(np.diff(tile) >= 0) and np.all(np.diff(group) >= 0)
      assert set(tile) == set(range(tiles)) and set(group) == set(range(g))
      key = group if by_group else tile
      starts = np.r_[True, key[1:] != key[:-1]]
      ends = np.r_[key[1:] != key[:-1], True]
      np.testing.assert_array_equal((v.flags[:n] & G._FIRST) != 0, starts)
      np.testing.assert_array_equal((v.flags[:n] & G._LAST) != 0, ends)
      rows = np.zeros(tm * tiles, int)  # each used row is covered by exactly one visit
      for t, lo, hi in zip(tile, v.lo[:n], v.hi[:n]):
        r = np.arange(t * tm, (t + 1) * tm)
        rows[r[(r >= lo) & (r < hi)]] += 1
      np.testing.assert_array_equal(rows, np.arange(tm * tiles) < int(np.sum(sizes)))


# ------------------------------------------------------------ ahead-of-time TPU compilation

# name -> (topology, TPU_ACCELERATOR_TYPE)
TOPOLOGIES = {"v5p": ("v5p:2x2x1", "v5p-8"), "v5e": ("v5e:2x2", "v5litepod-4"),
              "v6e": ("v6e:2x2", "v6e-4")}


def _run_aot(chip, timeout=600):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": TOPOLOGIES[chip][1],
         "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  proc = subprocess.run([sys.executable, __file__, chip], env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for r in results:
    print(chip, r)
  return results


def test_compiles_for_tpu_v5p():
  """bf16 gmm forward and jit(grad) (gmm + tgmm) compile for v5p through libtpu (Mosaic)."""
  results = _run_aot("v5p")
  assert results and all(r["ok"] for r in results), results


@pytest.mark.slow
@pytest.mark.parametrize("chip", ["v5e", "v6e"])
def test_compiles_for_tpu_other_chips(chip):
  """The same kernels compile for v5e and v6e."""
  results = _run_aot(chip)
  assert results and all(r["ok"] for r in results), results


# ----------------------------------------------------- subprocess side (libtpu environment)

# Per-device shapes of Qwen2-57B-A14B under expert=8: rows = 4096 tokens * 8 choices, 8 local
# experts, H 3584, F 2560; the odd case has nothing a multiple of a tile.
AOT_SHAPES = {"moe_57b_gate_up": (32768, 3584, 2560, 8), "moe_57b_down": (32768, 2560, 3584, 8),
              "odd": (1000, 200, 300, 3)}


def _aot_main(chip):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topology = TOPOLOGIES[chip][0]
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  one = jax.sharding.SingleDeviceSharding(desc.devices[0])
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=one)
  for name, (m, k, n, g) in AOT_SHAPES.items():
    args = (spec((m, k)), spec((g, k, n)), spec((g,), jnp.int32))
    impls = {"kernel": lambda a, b, s: G.gmm(a, b, s),
             "ragged_dot": lambda a, b, s: jax.lax.ragged_dot(a, b, s)}
    for impl, fn in impls.items():
      if impl == "ragged_dot" and name == "odd":
        continue
      loss = lambda a, b, s, fn=fn: jnp.sum(fn(a, b, s).astype(jnp.float32) ** 2)
      for mode, f in (("fwd", fn), ("fwd+bwd", jax.grad(loss, argnums=(0, 1)))):
        t0 = time.time()
        try:
          compiled = jax.jit(f).lower(*args).compile()
        except Exception as e:  # pylint: disable=broad-except
          print(json.dumps({"name": f"{name}_{impl}_{mode}", "ok": False, "error": str(e)[:400]}))
          continue
        cost = compiled.cost_analysis() or {}
        print(json.dumps({"name": f"{name}_{impl}_{mode}", "ok": True, "impl": impl,
                          "mode": mode, "shape": [m, k, n, g],
                          "seconds": round(time.time() - t0, 2), "flops": cost.get("flops"),
                          "bytes": cost.get("bytes accessed"),
                          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}),
              flush=True)


if __name__ == "__main__":
  _aot_main(sys.argv[1])
