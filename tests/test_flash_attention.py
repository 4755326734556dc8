"""Tests of the Pallas flash attention kernel (`qwen2_jax.kernels.flash_attention`).

Numerics run the TPU kernels in the Pallas interpreter on the CPU (small shapes: it is slow) and
compare them with the pure-jnp reference: forward, logsumexp and dq/dk/dv. Tolerances: f32
5e-5 (out, lse) and 1e-4 (grads, relative to the largest entry); bf16 2e-2 of the largest entry.
Compilation for real TPUs (v5e, v5p, v6e) runs the libtpu compiler ahead of time, with no TPU, in
one subprocess per topology (this file's `__main__`), so its environment stays out of pytest.
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
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2_jax import attention as attn_lib
from qwen2_jax.kernels import flash_attention as fa


def _qkv(seed, b, t, s, n, k, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, d), jnp.float32).astype(dtype),
          jax.random.normal(kk, (b, s, k, d), jnp.float32).astype(dtype),
          jax.random.normal(kv, (b, s, k, d), jnp.float32).astype(dtype))


def _ragged_segments(seed, b, length):
  """[B, L] int32: each row holds 2-5 documents of random lengths (ids 1..), then padding (0)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(b):
    pad = int(rng.integers(0, length // 6))
    cuts = np.sort(rng.choice(np.arange(1, length - pad), int(rng.integers(1, 5)), replace=False))
    row = np.zeros(length, np.int32)
    for doc, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length - pad])):
      row[lo:hi] = doc + 1
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def _max_err(a, b):
  """Largest absolute difference relative to the largest reference entry."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _value_and_vjp(fn, q, k, v, cts):
  """(out, lse) and the VJP of `cts` = (d_out, d_lse), in one jit (one compile per case)."""
  def run(q, k, v, cts):
    outs, vjp = jax.vjp(fn, q, k, v)
    return outs, vjp(cts)
  return jax.jit(run)(q, k, v, cts)


def _assert_matches_reference(q, k, v, *, out_tol, grad_tol, interpret=True, **kw):
  """Kernel (interpreted) == reference: out, lse, and the VJP of a random cotangent on both.

  Returns the kernel's (out, lse).
  """
  kernel = lambda q, k, v: fa.flash_attention(q, k, v, return_lse=True, interpret=interpret,
                                              **kw)
  ref_kw = {key: val for key, val in kw.items() if key != "block_sizes"}
  reference = lambda q, k, v: fa.flash_attention_reference(q, k, v, return_lse=True, **ref_kw)
  c1, c2 = jax.random.split(jax.random.key(99))
  cts = (jax.random.normal(c1, q.shape, jnp.float32).astype(q.dtype),
         jax.random.normal(c2, q.shape[:3], jnp.float32))
  (out, lse), grads = _value_and_vjp(kernel, q, k, v, cts)
  (out_r, lse_r), grads_r = _value_and_vjp(reference, q, k, v, cts)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  assert _max_err(out, out_r) < out_tol
  np.testing.assert_allclose(lse, lse_r, rtol=out_tol, atol=out_tol)
  for name, g, g_r in zip("qkv", grads, grads_r):
    assert g.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"d{name} not finite"
    assert _max_err(g, g_r) < grad_tol, f"d{name}: {_max_err(g, g_r)}"
  return out, lse


F32 = dict(out_tol=5e-5, grad_tol=1e-4)
BF16 = dict(out_tol=2e-2, grad_tol=2e-2)
BLOCKS_128 = fa.BlockSizes(128, 128)  # several blocks per sequence at test sizes

# (causal, N, K, D, T, segments, block sizes); T = 165 = 128 + 37 is not a multiple of a block.
CASES = {
    "causal_mha_d128_padded": (True, 2, 2, 128, 165, False, BLOCKS_128),
    "causal_gqa2_d64_segments": (True, 4, 2, 64, 256, True, BLOCKS_128),
    "noncausal_gqa2_d64_segments_padded": (False, 4, 2, 64, 165, True, BLOCKS_128),
    "causal_gqa7_d64_segments_padded": (True, 7, 1, 64, 165, True, BLOCKS_128),
    "causal_gqa8_d128_segments": (True, 8, 1, 128, 256, True, BLOCKS_128),
    "noncausal_gqa8_d128_default_blocks": (False, 8, 1, 128, 165, False, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_f32(case):
  """f32 kernel out, lse and dq/dk/dv equal the reference (GQA 1/2/7/8, D 64/128, ragged docs)."""
  causal, n, k, d, t, segmented, blocks = CASES[case]
  q, kk, v = _qkv(len(case), 2, t, t, n, k, d)
  seg = _ragged_segments(t, 2, t) if segmented else None
  _assert_matches_reference(q, kk, v, segment_ids=seg, causal=causal, block_sizes=blocks, **F32)


def test_kernel_matches_reference_bf16():
  """bf16 inputs (f32 accumulation) match the f32 reference to 2e-2, with packed documents."""
  q, k, v = _qkv(1, 2, 256, 256, 4, 2, 128, jnp.bfloat16)
  _assert_matches_reference(q, k, v, segment_ids=_ragged_segments(3, 2, 256), causal=True,
                            block_sizes=BLOCKS_128, **BF16)


@pytest.mark.parametrize("causal", [True, False])
def test_queries_shorter_than_keys(causal):
  """T != S (queries = last T keys) matches, in the strict TPU simulator (no OOB/NaN/races)."""
  # The simulator raises on out-of-bounds reads, fills uninitialised memory with NaN, and
  # detects races, on top of interpret mode.
  q, k, v = _qkv(2, 1, 165, 293, 4, 2, 64)
  kv_seg = _ragged_segments(5, 1, 293)
  strict = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan",
                                 detect_races=True)
  _assert_matches_reference(q, k, v, segment_ids=(kv_seg[:, -165:], kv_seg), causal=causal,
                            block_sizes=BLOCKS_128, interpret=strict, **F32)


def test_explicit_q_offset_with_unseen_blocks():
  """An explicit q_offset where early queries see no key: out 0, lse MASK_LSE, finite grads."""
  q, k, v = _qkv(4, 1, 256, 256, 2, 1, 64)
  out, lse = _assert_matches_reference(q, k, v, causal=True, q_offset=-200,
                                       block_sizes=BLOCKS_128, **F32)
  assert np.all(np.asarray(out[:, :200]) == 0) and np.all(np.asarray(lse[:, :200]) == fa.MASK_LSE)


def test_fully_masked_queries_give_zero_and_mask_lse():
  """A query whose segment has no key gets out 0 and lse MASK_LSE; gradients stay finite."""
  q, k, v = _qkv(6, 1, 128, 256, 2, 2, 64)
  q_seg = jnp.asarray(np.r_[np.ones(64), np.full(64, 7)][None].astype(np.int32))  # 7: no keys
  kv_seg = jnp.ones((1, 256), jnp.int32)
  out, lse = _assert_matches_reference(q, k, v, segment_ids=(q_seg, kv_seg), causal=False,
                                       **F32)
  assert np.all(np.asarray(out[:, 64:]) == 0) and np.all(np.asarray(lse[:, 64:]) == fa.MASK_LSE)


def test_kernel_matches_model_xla_attention():
  """The kernel equals the model's existing path, `attention.xla_attention`, out and lse."""
  b, t, n, k, d = 2, 256, 4, 2, 128
  q, kk, v = _qkv(7, b, t, t, n, k, d)
  seg = _ragged_segments(8, b, t)
  index = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attn_lib.attention_mask(index, index, seg, seg, causal=True)
  out_x, lse_x = attn_lib.xla_attention(q, kk, v, mask, scale=d ** -0.5, return_lse=True)
  out, lse = fa.flash_attention(q, kk, v, segment_ids=seg, return_lse=True, interpret=True,
                                block_sizes=BLOCKS_128)
  np.testing.assert_allclose(out, out_x, atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(lse, lse_x, atol=5e-5, rtol=5e-5)


def test_block_choice_pads_little_and_rejects_bad_blocks():
  """Blocks are 128-multiples clipped to the padded length, with padding under one block."""
  assert fa._fit_block(165, 512) == (256, 256)
  assert fa._fit_block(4096, 512) == (512, 4096)
  assert fa._fit_block(600, 512) == (384, 768)
  assert fa._fit_block(32768, 512) == (512, 32768)
  with pytest.raises(ValueError, match="multiples of 128"):
    fa._fit_block(256, 96)
  with pytest.raises(ValueError, match="T == S"):
    fa.flash_attention(*_qkv(0, 1, 8, 16, 2, 2, 64), segment_ids=jnp.zeros((1, 8), jnp.int32))


def test_step_tables_skip_blocks_above_the_diagonal():
  """Causal tables hold only blocks on or below the diagonal; the iota mask only where needed."""
  c = fa._Static(causal=True, scale=1.0, q_offset=0, t=1000, s=1000, t_pad=1024, s_pad=1024,
                 bq=256, bk=256, groups=1, segmented=False, interpret=False)
  qb, kb, flags = fa._tables(c, kv_outer=False)
  assert len(qb) == 4 * 5 // 2 and np.all(kb <= qb)
  iota = (flags & fa._IOTA) != 0
  np.testing.assert_array_equal(iota, (kb == qb) | (kb == 3))  # diagonal, padded last kv block
  kb2, qb2, _ = fa._tables(c, kv_outer=True)
  assert sorted(zip(qb2, kb2)) == sorted(zip(qb, kb))  # dk/dv visit the same pairs
  nc = fa._Static(**{**c.__dict__, "causal": False})
  assert len(fa._tables(nc, kv_outer=False)[0]) == 16


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_num_cpu_devices", 4)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from qwen2_jax.kernels import flash_attention as fa
mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
for n, k in ((4, 2), (4, 1)):  # kv heads sharded; kv heads replicated (K=1 < tensor=2)
  ks = jax.random.split(jax.random.key(n + k), 3)
  q = jax.random.normal(ks[0], (2, 165, n, 64))
  kk, v = (jax.random.normal(x, (2, 165, k, 64)) for x in ks[1:])
  seg = jnp.asarray(np.repeat(np.arange(3), 55)[None].repeat(2, 0).astype(np.int32))
  loss = lambda f: lambda q, kk, v: jnp.sum(jnp.sin(f(q, kk, v)))
  shard = lambda q, kk, v: fa.sharded_flash_attention(q, kk, v, seg, mesh=mesh, interpret=True,
                                                      block_sizes=(128, 128))
  ref = lambda q, kk, v: fa.flash_attention_reference(q, kk, v, segment_ids=seg)
  # As the model calls it: the mesh comes from the context, axes as PartitionSpec entries.
  in_context = lambda q, kk, v: fa.sharded_flash_attention(
      q, kk, v, seg, batch_axes=("data", "fsdp"), head_axes="tensor", interpret=True,
      block_sizes=(128, 128))
  def context_grad(q, kk, v):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return jax.value_and_grad(loss(in_context), argnums=(0, 1, 2))(q, kk, v)
  g_r = jax.value_and_grad(loss(ref), argnums=(0, 1, 2))(q, kk, v)
  replicated = NamedSharding(mesh, P())  # as the model's jit: shardings on the mesh
  for fn in (jax.value_and_grad(loss(shard), argnums=(0, 1, 2)), context_grad):
    g = jax.jit(fn, in_shardings=replicated)(q, kk, v)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
print("OK")
"""


def test_sharded_wrapper_matches_reference_on_cpu_mesh():
  """shard_map wrapper (batch over fsdp, heads over tensor, 4 CPU devices) == reference + grads."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------ ahead-of-time TPU compilation

# name -> (topology, chips_per_host_bounds, TPU_ACCELERATOR_TYPE)
TOPOLOGIES = {"v5e": ("v5e:2x2", (2, 2, 1), "v5litepod-4"),
              "v5p": ("v5p:2x2x1", (2, 2, 1), "v5p-8"),
              "v6e": ("v6e:2x2", (2, 2, 1), "v6e-4")}
# (T, N, K, segments): Qwen2-7B (28/4, GQA 7) and Qwen2-72B (64/8, GQA 8) heads, head_dim 128.
# The full grid on v5e; on v5p / v6e two shapes still cover both lengths and both ratios (the
# kernel bodies do not depend on T: only the grid and step tables grow), to save test time.
AOT_SHAPES = {"v5e": [(4096, 28, 4, True), (4096, 64, 8, False), (32768, 28, 4, False),
                      (32768, 64, 8, True)],
              "v5p": [(4096, 28, 4, True), (32768, 64, 8, True)],
              "v6e": [(4096, 64, 8, False), (32768, 28, 4, True)]}


def _run_aot(args, timeout=600):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler")
  name = args[1] if args[0] == "compile" else "v5p"
  topology, _, accelerator = TOPOLOGIES[name]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": accelerator,
         "TPU_WORKER_HOSTNAMES": "localhost",
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # other processes may hold libtpu's lock file
  proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f"{topology}: {proc.stderr[-4000:]}"
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for r in results:
    print(topology, r)
  return results


@pytest.mark.slow
@pytest.mark.parametrize("chip", list(TOPOLOGIES))
def test_compiles_for_tpu(chip):
  """bf16 jit(value_and_grad) compiles via libtpu at T 4096/32768, GQA 7/8, and under shard_map."""
  # D 128; shard_map on a 4-chip mesh (fsdp 2, tensor 2); shapes per chip in AOT_SHAPES.
  results = _run_aot(["compile", chip])
  assert len(results) == len(AOT_SHAPES[chip]) + (2 if chip == "v5e" else 1), results
  assert all(r["ok"] for r in results), results


@pytest.mark.slow
def test_cost_analysis_kernel_vs_xla_at_32k():
  """At T=32768 XLA's cost analysis gives the kernel fewer FLOPs and bytes than XLA attention."""
  # v5p, 28/4 heads split 4 ways so that the XLA version fits in HBM; figures are per chip.
  results = {r["impl"]: r for r in _run_aot(["cost"])}
  for key in ("flops", "bytes"):
    assert results["kernel"][key] < results["xla"][key], results


# ----------------------------------------------------- subprocess side (libtpu environment)

def _aot_devices(chip):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  topology, bounds, _ = TOPOLOGIES[chip]
  return topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default", chips_per_host_bounds=bounds,
                                      num_slices=1).devices


def _compile(label, fn, *args):
  t0 = time.time()
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    return {"name": label, "ok": False, "error": str(e)[:300], "seconds": time.time() - t0}
  cost = compiled.cost_analysis() or {}
  return {"name": label, "ok": True, "seconds": round(time.time() - t0, 2),
          "flops": cost.get("flops"), "bytes": cost.get("bytes accessed"),
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def _grad_of(attend):
  loss = lambda q, k, v, seg: jnp.sum(attend(q, k, v, seg).astype(jnp.float32) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _aot_compile_main(chip):
  devices = _aot_devices(chip)
  one = jax.sharding.SingleDeviceSharding(devices[0])
  spec = lambda shape, dtype, sh=one: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  bf16 = jnp.bfloat16
  single = _grad_of(lambda q, k, v, seg: fa.flash_attention(q, k, v, segment_ids=seg))
  for t, n, k, segmented in AOT_SHAPES[chip]:
    args = (spec((1, t, n, 128), bf16), spec((1, t, k, 128), bf16), spec((1, t, k, 128), bf16),
            spec((1, t), jnp.int32) if segmented else None)
    print(json.dumps(_compile(f"T{t}_N{n}_K{k}_seg{int(segmented)}", single, *args)), flush=True)
  mesh = Mesh(np.array(devices).reshape(2, 2), ("fsdp", "tensor"))
  sharded = _grad_of(lambda q, k, v, seg: fa.sharded_flash_attention(
      q, k, v, seg, mesh=mesh, batch_axes=("fsdp",), head_axes=("tensor",)))
  act, batch = NamedSharding(mesh, P("fsdp", None, "tensor")), NamedSharding(mesh, P("fsdp"))
  # K=1 < tensor=2 (kv heads replicated, each shard slices its one) compiled on v5e only.
  for t, n, k in ((32768, 28, 4), *([(4096, 16, 1)] if chip == "v5e" else [])):
    args = (spec((2, t, n, 128), bf16, act), spec((2, t, k, 128), bf16, act if k > 1 else batch),
            spec((2, t, k, 128), bf16, act if k > 1 else batch), spec((2, t), jnp.int32, batch))
    print(json.dumps(_compile(f"shard_map_fsdp2_tp2_T{t}_N{n}_K{k}", sharded, *args)), flush=True)


def _aot_cost_main():
  devices = _aot_devices("v5p")
  mesh = Mesh(np.array(devices), ("tensor",))
  t, n, k, d = 32768, 28, 4, 128
  act = NamedSharding(mesh, P(None, None, "tensor"))
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=act)
          for shape in ((1, t, n, d), (1, t, k, d), (1, t, k, d))]

  def xla(q, k, v, seg):
    del seg
    index = jnp.arange(t)[None]
    mask = attn_lib.attention_mask(index, index, None, None, causal=True)
    return attn_lib.xla_attention(q, k, v, mask, scale=d ** -0.5)

  kernel = lambda q, k, v, seg: fa.sharded_flash_attention(q, k, v, seg, mesh=mesh,
                                                           head_axes=("tensor",))
  for impl, attend in (("kernel", kernel), ("xla", xla)):
    for mode, fn in (("fwd", lambda q, k, v, a=attend: a(q, k, v, None)),
                     ("fwd+bwd", lambda q, k, v, a=attend: _grad_of(a)(q, k, v, None))):
      r = _compile(f"{impl}_{mode}_T{t}_N{n}_K{k}_per_chip_of_4", fn, *args)
      print(json.dumps({"impl": impl if mode == "fwd+bwd" else f"{impl}_fwd", **r}), flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "compile":
    _aot_compile_main(sys.argv[2])
  else:
    _aot_cost_main()
