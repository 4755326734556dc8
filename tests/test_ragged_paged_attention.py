"""Tests of ragged paged attention (`qwen2_jax.kernels.ragged_paged_attention`).

The jnp reference is checked against a float64 numpy attention over each sequence's unpaged K/V
(and against jax's own reference of the same op); the Pallas kernel runs in the interpreter on
the CPU and is compared with the reference over random ragged batches: decodes, prefill chunks
starting mid-sequence, empty slots, page sizes that do not divide lengths, shuffled page tables,
GQA 1 and > 1, sliding windows; once more in the TPU simulator (race detection, NaN-filled
uninitialised memory). Pool pages no live sequence owns (and the unused tail of each
last page) hold NaN, so any read of them into a result shows. Tolerances: f32 1e-5 absolute;
bf16 2e-2 of the largest reference entry (inputs rounded once, p rounded to bf16 for P @ V).
Compilation for real TPUs (v5e, v5p, v6e) at Qwen2-7B shapes runs libtpu ahead of time in one
subprocess per chip (this file's `__main__`).
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
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2_jax import sharding
from qwen2_jax.kernels import ragged_paged_attention as rpa


def _batch(seed, seqs, *, slots, heads, kv_heads, d, page_size, pages_per_seq, t,
           dtype=jnp.float32):
  """A random step: `seqs` is [(q_len, kv_len)] for the live slots; `slots` >= len(seqs).

  Returns (args for the kernel as a tuple, dense per-seq (k, v) float64 lists). Pages are
  shuffled over a pool with spare pages; table entries past a sequence's pages point at random
  pages; every pool slot no sequence owns holds NaN."""
  rng = np.random.default_rng(seed)
  n_pages = slots * pages_per_seq + 3
  k_pool = np.full((n_pages, page_size, kv_heads, d), np.nan, np.float32)
  v_pool = np.full_like(k_pool, np.nan)
  order = rng.permutation(n_pages)
  table = rng.integers(0, n_pages, (slots, pages_per_seq)).astype(np.int32)
  dense, next_page = [], 0
  for i, (_, kv_len) in enumerate(seqs):
    k = rng.standard_normal((kv_len, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((kv_len, kv_heads, d)).astype(np.float32)
    k = np.asarray(jnp.asarray(k, dtype).astype(jnp.float32))  # what the pool holds
    v = np.asarray(jnp.asarray(v, dtype).astype(jnp.float32))
    for j in range(-(-kv_len // page_size)):
      page = order[next_page]
      next_page += 1
      table[i, j] = page
      chunk = slice(j * page_size, min((j + 1) * page_size, kv_len))
      k_pool[page, :chunk.stop - chunk.start] = k[chunk]
      v_pool[page, :chunk.stop - chunk.start] = v[chunk]
    dense.append((k.astype(np.float64), v.astype(np.float64)))
  q_lens = [ql for ql, _ in seqs] + [0] * (slots - len(seqs))
  kv_lens = [kl for _, kl in seqs] + list(rng.integers(0, 50, slots - len(seqs)))
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = rng.standard_normal((t, heads, d)).astype(np.float32)
  q[cu[len(seqs)]:] = np.nan  # padding tokens
  q = jnp.asarray(q, dtype)
  # Pools are [P, K, ps, D]: filled token-major above, then each page's kv heads made major.
  k_pool, v_pool = (x.transpose(0, 2, 1, 3) for x in (k_pool, v_pool))
  args = (q, jnp.asarray(k_pool, dtype), jnp.asarray(v_pool, dtype),
          jnp.asarray(kv_lens, jnp.int32), jnp.asarray(table), jnp.asarray(cu),
          jnp.asarray([len(seqs)], jnp.int32))
  return args, dense


def _dense_attention(q, dense, seqs, *, scale, window=None):
  """float64 numpy attention, one sequence at a time over its unpaged K/V; padding rows 0."""
  q = np.asarray(jnp.asarray(q).astype(jnp.float32), np.float64)
  t, h, _ = q.shape
  out = np.zeros_like(q)
  start = 0
  for (q_len, kv_len), (k, v) in zip(seqs, dense):
    g = h // k.shape[1]
    for i in range(q_len):
      pos = kv_len - q_len + i
      keys = np.arange(kv_len)
      vis = (keys <= pos) & ((pos - keys < window) if window else True)
      for n in range(h):
        s = k[vis, n // g] @ q[start + i, n] * scale
        p = np.exp(s - s.max())
        out[start + i, n] = (p / p.sum()) @ v[vis, n // g]
    start += q_len
  assert start <= t
  return out


def _err(a, b):
  a, b = np.asarray(jnp.asarray(a).astype(jnp.float32)), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


# (q_len, kv_len) of the live slots: decodes, a first prefill chunk, prefill chunks starting
# mid-sequence, an empty slot among live ones (q_len 0).
MIXED = [(1, 37), (5, 5), (9, 30), (0, 12), (1, 1), (3, 64), (1, 20)]


def test_reference_matches_dense_attention():
  """Reference == float64 attention over unpaged K/V (GQA 2, page 8 not dividing lengths)."""
  args, dense = _batch(0, MIXED, slots=9, heads=4, kv_heads=2, d=16, page_size=8,
                       pages_per_seq=9, t=24)
  out = jax.jit(lambda *a: rpa.ragged_paged_attention_reference(*a, scale=0.25))(*args)
  want = _dense_attention(args[0], dense, MIXED, scale=0.25)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
  assert not np.isnan(np.asarray(out)).any()


def test_reference_sliding_window_and_scalar_num_seqs():
  """Sliding window 7 (as `attention_mask`: pos - key < window), as an int and as a traced
  scalar; num_seqs as a scalar."""
  args, dense = _batch(1, MIXED, slots=7, heads=2, kv_heads=1, d=8, page_size=5,
                       pages_per_seq=13, t=21)
  args = args[:6] + (jnp.int32(len(MIXED)),)
  out = rpa.ragged_paged_attention_reference(*args, scale=0.3, sliding_window=7)
  want = _dense_attention(args[0], dense, MIXED, scale=0.3, window=7)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
  traced = jax.jit(lambda w, *a: rpa.ragged_paged_attention_reference(*a, scale=0.3,
                                                                      sliding_window=w))
  np.testing.assert_allclose(np.asarray(traced(jnp.int32(7), *args)), want, atol=1e-5, rtol=0)


def test_reference_agrees_with_jax_reference():
  """Our reference == jax's `ref_ragged_paged_attention` (K and V interleaved in one pool)."""
  seqs = [(1, 37), (5, 5), (9, 30), (1, 20)]
  args, _ = _batch(2, seqs, slots=4, heads=4, kv_heads=2, d=16, page_size=8, pages_per_seq=5,
                   t=16)
  q, kp, vp = args[:3]
  kp, vp = (jnp.nan_to_num(x) for x in (kp, vp))  # jax's reference reads whole pages
  token_major = lambda x: x.transpose(0, 2, 1, 3)  # [P, ps, K, D], as jax's pools are
  kv = jnp.stack([token_major(kp), token_major(vp)], axis=3)
  kv = kv.reshape(kv.shape[0], kv.shape[1], -1, kv.shape[-1])  # [P, ps, 2K, D]
  got = rpa.ragged_paged_attention_reference(q, kp, vp, *args[3:], scale=0.25)
  want = jax_rpa.ref_ragged_paged_attention(q, kv, *args[3:], sm_scale=0.25)
  n = int(args[5][len(seqs)])
  np.testing.assert_allclose(np.asarray(got[:n]), np.asarray(want), atol=1e-5, rtol=0)


def test_reference_chunks_tokens(monkeypatch):
  """With a gather budget of 3 tokens' K per chunk (8 tokens: 3 chunks, the last padded) the
  reference still equals float64 attention."""
  seqs = [(1, 70), (4, 30), (1, 2), (2, 9)]
  kw = dict(slots=4, heads=4, kv_heads=2, d=8, page_size=16, pages_per_seq=5, t=8)
  monkeypatch.setattr(rpa, "_REF_CHUNK_ELEMENTS", 3 * 5 * 16 * 2 * 8)
  args, dense = _batch(3, seqs, **kw)
  out = rpa.ragged_paged_attention_reference(*args, scale=0.35)
  np.testing.assert_allclose(np.asarray(out), _dense_attention(args[0], dense, seqs, scale=0.35),
                             atol=1e-5, rtol=0)


# ------------------------------------------------------------------ blocked path (the CPU path)

BLOCKED_CASES = [
    # (name, seqs, heads, kv_heads, page_size, pages_per_seq, t, block_q, window)
    ("gqa2_mixed_bq4", MIXED, 4, 2, 8, 9, 24, 4, None),
    ("gqa2_mixed_default", MIXED, 4, 2, 8, 9, 24, None, None),
    ("mha_page5_window12", [(1, 11), (6, 6), (0, 3), (2, 23)], 2, 2, 5, 5, 12, 3, 12),
    ("gqa4_window_bq1", MIXED, 8, 2, 4, 17, 24, 1, 6),
    ("decode", [(1, 9), (1, 33), (1, 2), (1, 17)], 6, 2, 16, 3, 4, None, None),
    ("decode_window", [(1, 9), (1, 33), (1, 2), (1, 17)], 4, 2, 4, 9, 4, None, 5),
    ("short_step_chunk_bq2", [(3, 10), (1, 5)], 4, 2, 4, 5, 4, 2, None),
]


def _new_kv_from_pools(args, seqs):
  """(pools with NaN at each live sequence's new positions, k_new, v_new [T, K, D]): the step's
  keys / values moved out of the pools (padding tokens' rows NaN)."""
  q, kp, vp, kv_lens, table, cu, _ = args
  kp, vp, table = np.array(kp), np.array(vp), np.asarray(table)
  t, kh, ps, d = q.shape[0], kp.shape[1], kp.shape[2], kp.shape[3]
  k_new = np.full((t, kh, d), np.nan, kp.dtype)
  v_new = np.full_like(k_new, np.nan)
  for i, (q_len, kv_len) in enumerate(seqs):
    for j in range(q_len):
      p = kv_len - q_len + j
      page, off = table[i, p // ps], p % ps
      k_new[cu[i] + j], v_new[cu[i] + j] = kp[page, :, off], vp[page, :, off]
      kp[page, :, off] = vp[page, :, off] = np.nan
  return (q, jnp.asarray(kp), jnp.asarray(vp)) + tuple(args[3:]), k_new, v_new


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=[c[0] for c in BLOCKED_CASES])
def test_blocked_matches_reference(case):
  """Blocked path == reference and float64 attention (f32, 1e-5): several items per sequence,
  empty slots, windows, NaN in unowned page slots, padding rows 0; with the step's keys /
  values passed as k_new / v_new (and NaN in their pool slots) the result is the same, also
  with blocks of 2 pages (online softmax over several blocks of an item) and, in steps of more
  than S tokens (the pair loop), with 1 or 3 (item, block) pairs per loop iteration (an item's
  blocks split across iterations, padding pairs in the last one). Steps of at most S tokens
  take the block-major loop, also with a prompt chunk and block_q 2."""
  _, seqs, h, kh, ps, pps, t, bq, window = case
  args, dense = _batch(8, seqs, slots=len(seqs) + 2, heads=h, kv_heads=kh, d=16, page_size=ps,
                       pages_per_seq=pps, t=t)
  run = jax.jit(lambda w, *a, **kw: rpa.ragged_paged_attention_blocked(
      *a, scale=0.25, sliding_window=w, block_q=bq, **kw))
  w = None if window is None else jnp.int32(window)
  out = np.asarray(run(w, *args))
  ref = np.asarray(rpa.ragged_paged_attention_reference(*args, scale=0.25,
                                                        sliding_window=window))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, _dense_attention(args[0], dense, seqs, scale=0.25,
                                                   window=window), atol=1e-5, rtol=0)
  n = int(args[5][len(seqs)])
  assert not np.isnan(out).any() and np.all(out[n:] == 0)
  moved, k_new, v_new = _new_kv_from_pools(args, seqs)
  out_new = np.asarray(run(w, *moved, k_new=k_new, v_new=v_new))
  np.testing.assert_allclose(out_new, ref, atol=1e-5, rtol=0)
  assert np.all(out_new[n:] == 0)
  # Blocks of 2 pages: several loop iterations, a padded last block, an early stop.
  run2 = jax.jit(lambda w, *a, **kw: rpa.ragged_paged_attention_blocked(
      *a, scale=0.25, sliding_window=w, block_q=bq, pages_per_block=2, **kw))
  out2 = np.asarray(run2(w, *moved, k_new=k_new, v_new=v_new))
  np.testing.assert_allclose(out2, ref, atol=1e-5, rtol=0)
  assert np.all(out2[n:] == 0)
  for c in (1, 3) if args[0].shape[0] > len(seqs) + 2 else ():  # T > S: the pair loop
    out3 = np.asarray(jax.jit(lambda w, *a, c=c, **kw: rpa.ragged_paged_attention_blocked(
        *a, scale=0.25, sliding_window=w, block_q=bq, pages_per_block=2, pairs_per_iter=c,
        **kw))(w, *moved, k_new=k_new, v_new=v_new))
    np.testing.assert_allclose(out3, ref, atol=1e-5, rtol=0)
    assert np.all(out3[n:] == 0)


def test_blocked_bf16_and_no_live_sequences():
  """bf16 pools: blocked == reference within 2e-2 of the largest entry (dtype bf16);
  num_seqs = 0 gives zeros."""
  args, _ = _batch(9, MIXED, slots=8, heads=4, kv_heads=2, d=32, page_size=8,
                   pages_per_seq=9, t=24, dtype=jnp.bfloat16)
  out = rpa.ragged_paged_attention_blocked(*args, scale=32 ** -0.5)
  ref = rpa.ragged_paged_attention_reference(*args, scale=32 ** -0.5)
  assert out.dtype == jnp.bfloat16
  assert _err(out, ref.astype(jnp.float32)) < 2e-2
  args = args[:6] + (jnp.zeros((1,), jnp.int32),)
  np.testing.assert_array_equal(np.asarray(rpa.ragged_paged_attention_blocked(*args, scale=1.0)),
                                0.0)


# ---------------------------------------------------------------- C++ kernel (the CPU path)

needs_cpu_kernels = pytest.mark.skipif(
    not rpa.cpu_extension.available(),
    reason="qwen2_jax._cpu_kernels is not built here (test_cpu_matmul checks it is on x86-64)")

CPU_CASES = [c[:7] + c[8:] for c in BLOCKED_CASES] + [
    # (name, seqs, heads, kv_heads, page_size, pages_per_seq, t, window) with d below:
    # Qwen2-0.5B's heads (14 / 2, D 64): long decodes, a 40-token chunk (3 items, the last
    # partial), a first chunk, an empty slot; windows cutting inside tiles and items.
    ("qwen05b", [(1, 300), (40, 90), (17, 17), (0, 5), (1, 64)], 14, 2, 16, 24, 64, None),
    ("qwen05b_window37", [(1, 300), (40, 90), (17, 17), (1, 64)], 14, 2, 16, 24, 64, 37),
    ("page7_window1", [(1, 30), (9, 20), (2, 2)], 4, 1, 7, 5, 16, 1),
]
CPU_HEAD_SIZES = {"qwen05b": 64, "qwen05b_window37": 128, "page7_window1": 24}


@needs_cpu_kernels
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_cpu_kernel_matches_reference(case):
  """C++ kernel == reference and float64 attention (f32, 1e-5 of max(1, max|ref|)): the blocked
  path's cases plus Qwen2-0.5B head shapes (D 64 and 128: the 16-lane transposes and 64-wide V
  slices), D 24 (their scalar tails), chunks longer than an item (16 queries), key tiles
  cut by a page size of 7 and by windows of 1 and 37. Unowned pool slots hold NaN, so a read of
  one shows; padding rows are exactly 0. With the step's keys / values moved to k_new / v_new
  (NaN in their pool slots) the result is the same."""
  name, seqs, h, kh, ps, pps, t, window = case
  d = CPU_HEAD_SIZES.get(name, 16)
  args, dense = _batch(11, seqs, slots=len(seqs) + 2, heads=h, kv_heads=kh, d=d, page_size=ps,
                       pages_per_seq=pps, t=t)
  scale = d ** -0.5
  run = jax.jit(lambda w, *a, **kw: rpa.ragged_paged_attention_cpu(
      *a, scale=scale, sliding_window=w, **kw))
  w = None if window is None else jnp.int32(window)
  ref = np.asarray(rpa.ragged_paged_attention_reference(*args, scale=scale,
                                                        sliding_window=window))
  want = _dense_attention(args[0], dense, seqs, scale=scale, window=window)
  n = int(args[5][len(seqs)])
  out = np.asarray(run(w, *args))
  assert _err(out, ref) < 1e-5 and _err(out, want) < 1e-5
  assert not np.isnan(out).any() and np.all(out[n:] == 0)
  moved, k_new, v_new = _new_kv_from_pools(args, seqs)
  out_new = np.asarray(run(w, *moved, k_new=k_new, v_new=v_new))
  assert _err(out_new, ref) < 1e-5
  assert not np.isnan(out_new).any() and np.all(out_new[n:] == 0)


@needs_cpu_kernels
def test_cpu_kernel_window_edge_values():
  """A traced window of 0 or less sees no key (rows 0, as the reference), a window as large as
  int32 allows equals no window."""
  args, _ = _batch(13, MIXED, slots=len(MIXED) + 1, heads=4, kv_heads=2, d=16, page_size=8,
                   pages_per_seq=9, t=24)
  run = jax.jit(lambda w, *a: rpa.ragged_paged_attention_cpu(*a, scale=0.25, sliding_window=w))
  for w in (0, -3):
    ref = rpa.ragged_paged_attention_reference(*args, scale=0.25, sliding_window=jnp.int32(w))
    np.testing.assert_array_equal(np.asarray(run(jnp.int32(w), *args)), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(ref), 0.0)
  full = np.asarray(run(jnp.int32(np.iinfo(np.int32).max), *args))
  np.testing.assert_array_equal(full, np.asarray(run(None, *args)))


@needs_cpu_kernels
def test_cpu_kernel_refuses_bad_inputs():
  """bf16 is a TypeError; shapes are checked as for the other paths; metadata that would read
  outside the buffers (more queries than cached tokens, a page table too narrow for kv_lens,
  cu_q_lens past T) is a runtime error naming it, never a read out of bounds; no live sequence
  gives zeros."""
  args, _ = _batch(12, [(2, 9), (1, 4)], slots=3, heads=4, kv_heads=2, d=16, page_size=4,
                   pages_per_seq=3, t=4)
  q, kp, vp, kv_lens, table, cu, ns = args
  with pytest.raises(TypeError, match="float32"):
    rpa.ragged_paged_attention_cpu(q.astype(jnp.bfloat16), *args[1:], scale=1.0)
  with pytest.raises(rpa.RaggedPagedAttentionError, match="cu_q_lens"):
    rpa.ragged_paged_attention_cpu(*args[:5], cu[:-1], ns, scale=1.0)
  run = jax.jit(lambda *a: rpa.ragged_paged_attention_cpu(*a, scale=1.0))
  bad = [(kv_lens.at[0].set(1), table, cu, "kv_lens do not fit"),       # 2 queries, 1 token
         (kv_lens.at[1].set(13), table, cu, "kv_lens do not fit"),      # 4 pages, table of 3
         (kv_lens, table, cu.at[2].set(9), "cu_q_lens out of order")]  # past T = 4
  for kl, tb, c, match in bad:
    with pytest.raises(Exception, match=match):
      np.asarray(run(q, kp, vp, kl, tb, c, ns))
  out = run(q, kp, vp, kv_lens, table, cu, jnp.zeros((1,), jnp.int32))
  np.testing.assert_array_equal(np.asarray(out), 0.0)


# ----------------------------------------------------------------------- kernel (interpret)

KERNEL_CASES = [
    # (name, seqs, heads, kv_heads, page_size, pages_per_seq, t, block_q, pages_per_block, window)
    ("gqa2_mixed", MIXED, 4, 2, 8, 9, 24, 4, 2, None),
    ("mha_page5_window12", [(1, 11), (6, 6), (0, 3), (2, 23)], 2, 2, 5, 5, 12, 3, 2, 12),
    ("gqa4_window", MIXED, 8, 2, 4, 17, 24, 4, 3, 6),
    ("defaults_decode", [(1, 9), (1, 33), (1, 2), (1, 17)], 6, 2, 16, 3, 8, None, None, None),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_kernel_matches_reference_f32(case):
  """Interpreted kernel == reference (f32, 1e-5): several items per sequence and kv blocks per
  item, empty slots, NaN in every unowned page slot, padding rows 0."""
  _, seqs, h, kh, ps, pps, t, bq, ppb, window = case
  args, _ = _batch(4, seqs, slots=len(seqs) + 2, heads=h, kv_heads=kh, d=16, page_size=ps,
                   pages_per_seq=pps, t=t)
  # The kernel gets the window as a traced scalar (as under a layer scan), the reference an int.
  run = jax.jit(lambda w, *a: rpa.ragged_paged_attention(
      *a, scale=0.25, sliding_window=w, interpret=True, block_q=bq, pages_per_block=ppb))
  out = np.asarray(run(None if window is None else jnp.int32(window), *args))
  ref = np.asarray(rpa.ragged_paged_attention_reference(*args, scale=0.25,
                                                        sliding_window=window))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  n = int(args[5][len(seqs)])
  assert not np.isnan(out).any() and np.all(out[n:] == 0)


@pytest.mark.slow
def test_kernel_in_tpu_simulator():
  """The TPU interpreter (DMA and semaphore simulation, race detection raising, NaN-filled
  uninitialised memory, out-of-bounds reads raising) gives the reference's result (1e-5)."""
  _, seqs, h, kh, ps, pps, t, bq, ppb, window = KERNEL_CASES[0]
  args, _ = _batch(4, seqs, slots=len(seqs) + 2, heads=h, kv_heads=kh, d=16, page_size=ps,
                   pages_per_seq=pps, t=t)
  sim = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan",
                              out_of_bounds_reads="raise")
  out = rpa.ragged_paged_attention(*args, scale=0.25, sliding_window=window, interpret=sim,
                                   block_q=bq, pages_per_block=ppb)
  ref = rpa.ragged_paged_attention_reference(*args, scale=0.25, sliding_window=window)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_kernel_bf16():
  """bf16 inputs: kernel == reference within 2e-2 of the largest entry; output dtype bf16."""
  args, dense = _batch(5, MIXED, slots=8, heads=4, kv_heads=2, d=32, page_size=8,
                       pages_per_seq=9, t=24, dtype=jnp.bfloat16)
  out = jax.jit(lambda *a: rpa.ragged_paged_attention(*a, scale=32 ** -0.5, interpret=True,
                                                      block_q=4, pages_per_block=2))(*args)
  ref = rpa.ragged_paged_attention_reference(*args, scale=32 ** -0.5)
  assert out.dtype == jnp.bfloat16
  assert _err(out, ref.astype(jnp.float32)) < 2e-2
  assert _err(out, _dense_attention(args[0], dense, MIXED, scale=32 ** -0.5)) < 2e-2


def test_kernel_no_live_sequences_gives_zeros():
  """num_seqs = 0: every row is padding and comes back 0."""
  args, _ = _batch(6, [(2, 5)], slots=3, heads=2, kv_heads=1, d=8, page_size=4,
                   pages_per_seq=2, t=4)
  args = args[:6] + (jnp.zeros((1,), jnp.int32),)
  out = rpa.ragged_paged_attention(*args, scale=1.0, interpret=True)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_item_tables_cover_every_query_once():
  """The item table lists each live sequence's queries in block_q pieces, in order."""
  # pylint: disable=protected-access
  cu = jnp.asarray([0, 1, 6, 6, 15, 15], jnp.int32)
  kv = jnp.asarray([10, 5, 3, 40, 7], jnp.int32)
  table, n_live, starts = rpa._item_tables(
      cu, kv, jnp.asarray([4]), n_items=5 + 4, block_q=4, block_kv=8, sliding_window=None)
  table = np.asarray(table).reshape(rpa._FIELDS, -1)
  assert int(n_live[0]) == 1 + 2 + 0 + 3
  np.testing.assert_array_equal(np.asarray(starts)[:4], [0, 1, 3, 3])
  np.testing.assert_array_equal(table[rpa._SEQ, :6], [0, 1, 1, 3, 3, 3])
  # Sequence 3: 9 queries ending at position 39 -> items start at positions 31, 35, 39.
  np.testing.assert_array_equal(table[rpa._BASE, 3:6], [31, 35, 39])
  np.testing.assert_array_equal(table[rpa._NB, 3:6], [5, 5, 5])
  assert np.all(table[rpa._NB, 6:] == 0)


def test_bad_shapes_name_the_parameter():
  """Inconsistent inputs raise a one-line UserError naming what is wrong."""
  args, _ = _batch(7, [(1, 3)], slots=2, heads=3, kv_heads=1, d=8, page_size=4,
                   pages_per_seq=2, t=4)
  with pytest.raises(rpa.RaggedPagedAttentionError, match="k_pages"):
    rpa.ragged_paged_attention(args[0], args[1][..., :4], *args[2:], scale=1.0)
  with pytest.raises(rpa.RaggedPagedAttentionError, match="cu_q_lens"):
    rpa.ragged_paged_attention(*args[:5], args[5][:-1], args[6], scale=1.0)
  with pytest.raises(rpa.RaggedPagedAttentionError, match="sliding_window"):
    rpa.ragged_paged_attention(*args, scale=1.0, sliding_window=0)


# --------------------------------------------------------------------------------- shard_map

@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sharded_wrapper_matches_unsharded(kv_heads):
  """Heads split over tensor=4 of an 8-device CPU mesh (fsdp 2): == reference. With 2 kv heads
  the tensor axis does not divide them and the heads stay whole (same result)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4), jax.devices()[:8])
  assert rpa.head_axes(mesh, "fsdp_tp", kv_heads) == (("tensor",) if kv_heads == 4 else ())
  seqs = [(1, 13), (4, 9), (0, 2), (3, 21)]
  args, _ = _batch(8, seqs, slots=5, heads=8, kv_heads=kv_heads, d=16, page_size=4,
                   pages_per_seq=6, t=12)
  run = jax.jit(lambda *a: rpa.sharded_ragged_paged_attention(
      *a, mesh=mesh, rules="fsdp_tp", scale=0.25, interpret=True, block_q=2, pages_per_block=2))
  out = run(*args)
  ref = rpa.ragged_paged_attention_reference(*args, scale=0.25)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
  if kv_heads == 4:
    assert out.sharding.spec[1] == "tensor"


# ------------------------------------------------------------ ahead-of-time TPU compilation

# name -> (topology, TPU_ACCELERATOR_TYPE)
TOPOLOGIES = {"v5e": ("v5e:2x2", "v5litepod-4"), "v5p": ("v5p:2x2x1", "v5p-8"),
              "v6e": ("v6e:2x2", "v6e-4")}
# Qwen2-7B attention (28 query / 4 kv heads, D 128) in bf16: a 512-token budget over 64 slots,
# 4096-token contexts, a pool of half the slots' worst case. (page_size, sliding_window) per chip
# (the kernel body depends on the page size only through the block shape); each chip also
# compiles the tensor=4 shard_map (1 kv head per chip).
AOT_CASES = {"v5e": [(16, None), (64, 1024)], "v5p": [(32, None)], "v6e": [(16, 1024)]}


@pytest.mark.slow
@pytest.mark.parametrize("chip", list(TOPOLOGIES))
def test_compiles_for_tpu(chip):
  """bf16 Qwen2-7B shapes compile through libtpu (Mosaic), single chip and shard_map tensor=4."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": TOPOLOGIES[chip][1],
         "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  proc = subprocess.run([sys.executable, __file__, chip], env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for r in results:
    print(chip, r)
  assert len(results) == len(AOT_CASES[chip]) + 1 and all(r["ok"] for r in results), results


def _aot_main(chip):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name=TOPOLOGIES[chip][0], chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  t, h, kh, d, s, context = 512, 28, 4, 128, 64, 4096

  def shapes(page_size, sharding_of):
    pps = context // page_size
    pool = s * pps // 2
    return (jax.ShapeDtypeStruct((t, h, d), jnp.bfloat16, sharding=sharding_of("q")),
            *[jax.ShapeDtypeStruct((pool, kh, page_size, d), jnp.bfloat16,
                                   sharding=sharding_of("kv"))] * 2,
            *[jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_of(None))
              for shape in ((s,), (s, pps), (s + 1,), (1,))])

  def compile_one(label, fn, args):
    t0 = time.time()
    try:
      jax.jit(fn).lower(*args).compile()
      r = {"name": label, "ok": True}
    except Exception as e:  # pylint: disable=broad-except
      r = {"name": label, "ok": False, "error": str(e)[:1000]}
    print(json.dumps({**r, "seconds": round(time.time() - t0, 1)}), flush=True)

  one = jax.sharding.SingleDeviceSharding(devices[0])
  for page_size, window in AOT_CASES[chip]:
    fn = lambda *a, w=window: rpa.ragged_paged_attention(*a, scale=d ** -0.5, sliding_window=w)
    compile_one(f"page{page_size}_window{window}", fn, shapes(page_size, lambda _: one))
  mesh = Mesh(np.array(devices).reshape(1, 4), ("fsdp", "tensor"))
  specs = {"q": P(None, "tensor"), "kv": P(None, "tensor"), None: P()}
  fn = lambda *a: rpa.sharded_ragged_paged_attention(*a, mesh=mesh, rules="fsdp_tp",
                                                     scale=d ** -0.5)
  compile_one("shard_map_tensor4_page32", fn,
              shapes(32, lambda kind: NamedSharding(mesh, specs[kind])))


if __name__ == "__main__":
  _aot_main(sys.argv[1])
