"""Flash attention for TPU in Pallas: blockwise online softmax, forward and backward.

API layout is the model's: q [B, T, N, D], k / v [B, S, K, D], GQA with N % K == 0 (query head n
uses kv head n // G, G = N // K). Inside, heads come first ([B, N, T, D], [B, K, S, D]) so each
block is a (length, head_dim) tile.

Masking rule (the one in `qwen2_jax.attention`), with token indices, not RoPE positions:
  causal:   key j is visible to query i iff j <= q_offset + i. q_offset defaults to S - T (the
            queries are the last T of the S keys; 0 when T == S).
  segments: q_segment[i] == kv_segment[j] (packed documents never see each other).
A query that sees no key gets out = 0 and lse = MASK_LSE (finite, hugely negative), so
`attention.merge_attention` gives that part weight 0 and nothing turns NaN.

Three kernels, each on a grid (B, K, steps) where one step is one (q block, kv block) pair and
handles all G query heads of one kv head together (K/V tiles are fetched once per group and never
repeated in HBM; a block mask is built once per step and shared by the G heads):
  forward  q block outer, kv blocks inner; running max / sum / accumulator in f32 VMEM scratch.
  dq       same order; recomputes p = exp(s - lse) from the saved logsumexp.
  dk, dv   kv block outer, q blocks inner; computed transposed (keys on sublanes, queries on
           lanes) so lse and di = rowsum(dO * O) broadcast as lane-dense rows.
The steps are enumerated ahead of time (scalar-prefetched tables): only pairs holding a visible
key exist, so nothing is fetched or computed above the causal diagonal, and the iota mask
(causal, padded keys) is applied only on blocks that straddle the diagonal or hold padding.
Lengths are padded to the block size inside the wrapper; padded keys are masked, padded queries
are sliced off.

(Past 600 lines on purpose: the three kernels share the step tables, masks and block specs, and
the reference and shard_map wrapper are short; split the wrapper out if it grows.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from qwen2_jax.kernels import on_platform

Array = jax.Array

MASK_LSE = -0.7 * float(np.finfo(np.float32).max)  # lse of a query that sees no key
_NO_GRAD_LSE = 0.7 * float(np.finfo(np.float32).max)  # backward lse of padded rows: p = 0
LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_FIRST, _LAST, _IOTA = 1, 2, 4  # step flags: first / last step of its accumulator, iota mask
_HEAD_UNROLL = 2  # heads per G-loop iteration: 2 lets two heads overlap; all G triples compiling


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile lengths along queries and keys, multiples of 128 (both are lane dims somewhere).

  512 x 512 by default, clipped to the padded sequence: a step then does 4 * 512 * 512 * D
  flops per query head (with G heads per step), enough to hide the ~0.35 us fixed cost of a grid
  step, while one [512, 512] f32 score tile (1 MiB) per head stays well inside VMEM.
  """
  block_q: int = 512
  block_k: int = 512


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable: it is a `custom_vjp` nondiff argument)."""
  causal: bool
  scale: float
  q_offset: int
  t: int       # real query length
  s: int       # real key length
  t_pad: int
  s_pad: int
  bq: int
  bk: int
  groups: int  # G = N // K
  segmented: bool
  interpret: Any


# ------------------------------------------------------------------------------ step tables

def _visible(c: _Static, i: int, j: int) -> bool:
  """Whether kv block j holds a key some real query of q block i sees (causal only prunes)."""
  return not c.causal or j * c.bk <= c.q_offset + min((i + 1) * c.bq, c.t) - 1


def _needs_iota(c: _Static, i: int, j: int) -> bool:
  straddles = c.causal and (j + 1) * c.bk - 1 > c.q_offset + i * c.bq
  return straddles or (c.s_pad != c.s and j == c.s_pad // c.bk - 1)


def _tables(c: _Static, kv_outer: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(outer block, inner block, flags) per grid step, int32.

  q-outer (forward, dq) or kv-outer (dk, dv). An outer block with no visible partner still gets
  one fully masked step so its outputs are written (zeros).
  """
  nq, nk = c.t_pad // c.bq, c.s_pad // c.bk
  outer_n, inner_n = (nk, nq) if kv_outer else (nq, nk)
  rows = []
  for o in range(outer_n):
    pair = (lambda x, o=o: (x, o)) if kv_outer else (lambda x, o=o: (o, x))
    inner = [x for x in range(inner_n) if _visible(c, *pair(x))]
    forced = not inner
    inner = inner or [inner_n - 1 if kv_outer else 0]
    for n, x in enumerate(inner):
      flags = ((_FIRST if n == 0 else 0) | (_LAST if n == len(inner) - 1 else 0)
               | (_IOTA if forced or _needs_iota(c, *pair(x)) else 0))
      rows.append((o, x, flags))
  return tuple(np.asarray(col, np.int32) for col in zip(*rows))


def _modes(flags: np.ndarray) -> tuple[bool, ...]:
  """Which kernel variants occur: (True,) iota-masked, (False,) plain, or both."""
  iota = (flags & _IOTA) != 0
  return tuple(m for m, present in ((True, iota.any()), (False, (~iota).any())) if present)


# ------------------------------------------------------------------------------ kernel pieces

def _col_to_row(x: Array) -> Array:
  """[L, 1] -> [1, L] (via a lane-broadcast transpose, which Mosaic supports)."""
  return jnp.broadcast_to(x, (x.shape[0], LANES)).T[:1, :]


def _row_to_col(x: Array) -> Array:
  """[1, L] -> [L, 1]."""
  return jnp.broadcast_to(x, (LANES, x.shape[1])).T[:, :1]


def _block_mask(c: _Static, qi, kj, iota: bool, qseg_ref, kvseg_ref, transposed: bool):
  """Visible pairs of one block: bool [bq, bk] ([bk, bq] if transposed), or None for all."""
  mask = None
  if c.segmented:  # q ids come lane-replicated [bq, 128] (kv: [bk, 128] when transposed)
    if transposed:
      mask = kvseg_ref[:, :1] == qseg_ref[...]  # [bk, 1] == [1, bq]
    else:
      mask = qseg_ref[:, :1] == kvseg_ref[...]  # [bq, 1] == [1, bk]
  if iota:
    shape, q_axis = ((c.bk, c.bq), 1) if transposed else ((c.bq, c.bk), 0)
    k_pos = kj * c.bk + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    parts = []
    if c.causal:
      parts.append(k_pos <= qi * c.bq + c.q_offset + lax.broadcasted_iota(jnp.int32, shape, q_axis))
    if c.s_pad != c.s:
      parts.append(k_pos < c.s)
    parts += [] if mask is None else [mask]
    mask = functools.reduce(jnp.logical_and, parts) if parts else None
  return mask


def _run_step(flags, modes: Sequence[bool], update) -> None:
  """Calls update(iota) under the branch this step's flags select."""
  if len(modes) == 1:
    update(modes[0])
    return
  iota = (flags & _IOTA) != 0
  pl.when(iota)(lambda: update(True))
  pl.when(jnp.logical_not(iota))(lambda: update(False))


def _for_heads(c: _Static, body) -> None:
  lax.fori_loop(0, c.groups, lambda g, carry: (body(g), carry)[1], 0, unroll=_HEAD_UNROLL)


def _split_refs(c: _Static, refs):
  if c.segmented:
    return refs[0], refs[1], refs[2:]
  return None, None, refs


# ------------------------------------------------------------------------------------ kernels

def _fwd_kernel(qblk_ref, kblk_ref, flag_ref, q_ref, k_ref, v_ref, *refs, c: _Static, modes):
  qseg_ref, kvseg_ref, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_refs(c, refs)
  t = pl.program_id(2)
  flags = flag_ref[t]

  @pl.when((flags & _FIRST) != 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_LSE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def update(iota):
    mask = _block_mask(c, qblk_ref[t], kblk_ref[t], iota, qseg_ref, kvseg_ref, transposed=False)
    k, v = k_ref[...], v_ref[...]  # [bk, D]

    def head(g):
      s = lax.dot_general(q_ref[g], k, _NT, preferred_element_type=jnp.float32) * c.scale
      if mask is not None:  # -inf: masked keys add exactly 0 (the running max starts finite)
        s = jnp.where(mask, s, -jnp.inf)  # [bq, bk]
      m_prev = m_scr[g]  # [bq, 1]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      alpha = jnp.exp(m_prev - m_next)
      p = jnp.exp(s - m_next)
      l_scr[g] = alpha * l_scr[g] + jnp.sum(p, axis=1, keepdims=True)
      m_scr[g] = m_next
      acc_scr[g] = alpha * acc_scr[g] + jnp.dot(p.astype(v.dtype), v,
                                                preferred_element_type=jnp.float32)

    _for_heads(c, head)

  _run_step(flags, modes, update)

  @pl.when((flags & _LAST) != 0)
  def _finish():
    def head(g):
      l = l_scr[g]
      empty = l == 0.0
      l_safe = jnp.where(empty, 1.0, l)
      o_ref[g] = (acc_scr[g] * jnp.where(empty, 0.0, 1.0 / l_safe)).astype(o_ref.dtype)
      lse_ref[g] = _col_to_row(jnp.where(empty, MASK_LSE, m_scr[g] + jnp.log(l_safe)))

    _for_heads(c, head)


def _dq_kernel(qblk_ref, kblk_ref, flag_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs,
               c: _Static, modes):
  qseg_ref, kvseg_ref, (dq_ref, acc_scr, lse_scr, di_scr) = _split_refs(c, refs)
  t = pl.program_id(2)
  flags = flag_ref[t]

  @pl.when((flags & _FIRST) != 0)
  def _init():
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def head(g):  # rows -> columns once per q block
      lse_scr[g] = _row_to_col(lse_ref[g])
      di_scr[g] = _row_to_col(di_ref[g])

    _for_heads(c, head)

  def update(iota):
    mask = _block_mask(c, qblk_ref[t], kblk_ref[t], iota, qseg_ref, kvseg_ref, transposed=False)
    k, v = k_ref[...], v_ref[...]  # [bk, D]

    def head(g):
      s = lax.dot_general(q_ref[g], k, _NT, preferred_element_type=jnp.float32) * c.scale
      if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
      p = jnp.exp(s - lse_scr[g])  # [bq, bk]
      dp = lax.dot_general(do_ref[g], v, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - di_scr[g])
      acc_scr[g] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _for_heads(c, head)

  _run_step(flags, modes, update)

  @pl.when((flags & _LAST) != 0)
  def _finish():
    def head(g):
      dq_ref[g] = (acc_scr[g] * c.scale).astype(dq_ref.dtype)

    _for_heads(c, head)


def _dkv_kernel(kblk_ref, qblk_ref, flag_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs,
                c: _Static, modes):
  qseg_ref, kvseg_ref, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_refs(c, refs)
  t = pl.program_id(2)
  flags = flag_ref[t]

  @pl.when((flags & _FIRST) != 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(iota):
    mask = _block_mask(c, qblk_ref[t], kblk_ref[t], iota, qseg_ref, kvseg_ref, transposed=True)
    k, v = k_ref[...], v_ref[...]  # [bk, D]

    def head(g):
      q, do = q_ref[g], do_ref[g]  # [bq, D]
      st = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * c.scale  # [bk, bq]
      if mask is not None:
        st = jnp.where(mask, st, -jnp.inf)
      pt = jnp.exp(st - lse_ref[g])  # lse row [1, bq]
      dv_scr[...] += jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)  # [bk, bq]
      dst = pt * (dpt - di_ref[g])
      dk_scr[...] += jnp.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _for_heads(c, head)

  _run_step(flags, modes, update)

  @pl.when((flags & _LAST) != 0)
  def _finish():
    dk_ref[...] = (dk_scr[...] * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas_calls

def _vmem_limit(c: _Static, d: int, itemsize: int) -> int:
  """Scoped VMEM for the largest of the three kernels, with headroom (default limits are 16-32
  MiB depending on the chip; every supported chip has at least 64 MiB)."""
  g, bq, bk = c.groups, c.bq, c.bk
  tiles = 2 * (3 * g * bq * d * itemsize + 4 * bk * d * itemsize + 2 * g * 8 * bq * 4
               + bq * LANES * 4 + bk * LANES * 4)  # double-buffered blocks
  scratch = 4 * g * bq * LANES * 4 + g * bq * d * 4 + 2 * bk * d * 4
  temps = 6 * bq * bk * 4
  return int(min(max(1.5 * (tiles + scratch + temps), 32 << 20), 60 << 20))


def _params(c: _Static, d: int, itemsize: int):
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                              vmem_limit_bytes=_vmem_limit(c, d, itemsize))


def _cost(c, b, k, steps, d, itemsize, matmuls, extra_bytes):
  work = b * k * steps * c.groups * c.bq * c.bk
  return pl.CostEstimate(flops=2 * matmuls * work * d, transcendentals=work,
                         bytes_accessed=int(extra_bytes))


def _segment_specs(c: _Static, q_seg, kv_seg, q_block, k_block, transposed: bool):
  """Segment-id inputs: the side that stays put per accumulator is lane-replicated [B, L, 128]
  (read once per outer block), the side that changes every step is a row [B, 1, L]."""
  if not c.segmented:
    return [], []
  col = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))  # [B, L, 128]
  row = lambda x: x[:, None, :]  # [B, 1, L]
  col_spec = lambda blk, idx: pl.BlockSpec((None, blk, LANES),
                                           lambda b, h, t, *r: (b, idx(t, *r), 0))
  row_spec = lambda blk, idx: pl.BlockSpec((None, 1, blk), lambda b, h, t, *r: (b, 0, idx(t, *r)))
  if transposed:
    return [row_spec(c.bq, q_block), col_spec(c.bk, k_block)], [row(q_seg), col(kv_seg)]
  return [col_spec(c.bq, q_block), row_spec(c.bk, k_block)], [col(q_seg), row(kv_seg)]


def _q_outer_specs(c: _Static, d: int):
  """BlockSpecs of q-shaped, kv-shaped and row ([B, N, 1, T]) arrays for q-outer tables."""
  q = pl.BlockSpec((None, c.groups, c.bq, d), lambda b, h, t, qb, kb, fl: (b, h, qb[t], 0))
  kv = pl.BlockSpec((None, None, c.bk, d), lambda b, h, t, qb, kb, fl: (b, h, kb[t], 0))
  row = pl.BlockSpec((None, c.groups, 1, c.bq), lambda b, h, t, qb, kb, fl: (b, h, 0, qb[t]))
  return q, kv, row


def _fwd_call(c: _Static, q, k, v, q_seg, kv_seg):
  """q [B, N, Tp, D], k / v [B, K, Sp, D] -> o [B, N, Tp, D], lse [B, N, 1, Tp] (f32)."""
  b, n, _, d = q.shape
  kh = k.shape[1]
  qb, kb, fl = _tables(c, kv_outer=False)
  q_spec, kv_spec, row_spec = _q_outer_specs(c, d)
  seg_specs, seg_args = _segment_specs(c, q_seg, kv_seg, lambda t, qb, kb, fl: qb[t],
                                       lambda t, qb, kb, fl: kb[t], transposed=False)
  isz = q.dtype.itemsize
  bytes_ = 2 * q.size * isz + b * n * c.t_pad * 4 + b * kh * len(qb) * 2 * c.bk * d * isz
  return pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, modes=_modes(fl)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, kh, len(qb)),
          in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
          out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((c.groups, c.bq, 1), jnp.float32),
                          pltpu.VMEM((c.groups, c.bq, 1), jnp.float32),
                          pltpu.VMEM((c.groups, c.bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, 1, c.t_pad), jnp.float32)],
      compiler_params=_params(c, d, isz), interpret=c.interpret, name="flash_attention_fwd",
      cost_estimate=_cost(c, b, kh, len(qb), d, isz, 2, bytes_),
  )(qb, kb, fl, q, k, v, *seg_args)


def _dq_call(c: _Static, q, k, v, do, lse, di, q_seg, kv_seg):
  b, n, _, d = q.shape
  kh = k.shape[1]
  qb, kb, fl = _tables(c, kv_outer=False)
  q_spec, kv_spec, row_spec = _q_outer_specs(c, d)
  seg_specs, seg_args = _segment_specs(c, q_seg, kv_seg, lambda t, qb, kb, fl: qb[t],
                                       lambda t, qb, kb, fl: kb[t], transposed=False)
  isz = q.dtype.itemsize
  bytes_ = 3 * q.size * isz + 2 * b * n * c.t_pad * 4 + b * kh * len(qb) * 2 * c.bk * d * isz
  return pl.pallas_call(
      functools.partial(_dq_kernel, c=c, modes=_modes(fl)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, kh, len(qb)),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((c.groups, c.bq, d), jnp.float32),
                          pltpu.VMEM((c.groups, c.bq, 1), jnp.float32),
                          pltpu.VMEM((c.groups, c.bq, 1), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(c, d, isz), interpret=c.interpret, name="flash_attention_dq",
      cost_estimate=_cost(c, b, kh, len(qb), d, isz, 3, bytes_),
  )(qb, kb, fl, q, k, v, do, lse, di, *seg_args)


def _dkv_call(c: _Static, q, k, v, do, lse, di, q_seg, kv_seg):
  b, _, _, d = q.shape
  kh = k.shape[1]
  kb, qb, fl = _tables(c, kv_outer=True)
  q_spec = pl.BlockSpec((None, c.groups, c.bq, d), lambda b, h, t, kb, qb, fl: (b, h, qb[t], 0))
  kv_spec = pl.BlockSpec((None, None, c.bk, d), lambda b, h, t, kb, qb, fl: (b, h, kb[t], 0))
  row_spec = pl.BlockSpec((None, c.groups, 1, c.bq), lambda b, h, t, kb, qb, fl: (b, h, 0, qb[t]))
  seg_specs, seg_args = _segment_specs(c, q_seg, kv_seg, lambda t, kb, qb, fl: qb[t],
                                       lambda t, kb, qb, fl: kb[t], transposed=True)
  isz = q.dtype.itemsize
  bytes_ = 4 * k.size * isz + b * kh * len(qb) * c.groups * c.bq * (2 * d * isz + 8)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, c=c, modes=_modes(fl)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, kh, len(qb)),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((c.bk, d), jnp.float32),
                          pltpu.VMEM((c.bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(c, d, isz), interpret=c.interpret, name="flash_attention_dkv",
      cost_estimate=_cost(c, b, kh, len(qb), d, isz, 4, bytes_),
  )(kb, qb, fl, q, k, v, do, lse, di, *seg_args)


# --------------------------------------------------------------------------------- custom_vjp

def _heads_first(x: Array, length: int) -> Array:
  """[B, L, H, D] -> [B, H, length, D], zero-padded along L."""
  x = x.transpose(0, 2, 1, 3)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _tokens_first(x: Array, length: int) -> Array:
  """[B, H, Lp, D] -> [B, length, H, D] (drops padding)."""
  return x[:, :, :length].transpose(0, 2, 1, 3)


def _pad_segments(c: _Static, q_seg, kv_seg):
  if not c.segmented:
    return None, None
  return (jnp.pad(q_seg, ((0, 0), (0, c.t_pad - c.t))),  # [B, Tp]
          jnp.pad(kv_seg, ((0, 0), (0, c.s_pad - c.s))))  # [B, Sp] (padded keys: iota-masked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, c: _Static):
  """q [B, T, N, D], k / v [B, S, K, D] -> (out [B, T, N, D], lse [B, N, 1, Tp] f32)."""
  return _flash_fwd(q, k, v, q_seg, kv_seg, c)[0]


def _call(kernel_call, c: _Static, *args):
  """`kernel_call(c, *args)`, with `c.interpret` None chosen when lowering (`on_platform`)."""
  def call(*a, interpret):
    return kernel_call(dataclasses.replace(c, interpret=interpret), *a)
  return on_platform(call, *args, interpret=c.interpret)


def _flash_fwd(q, k, v, q_seg, kv_seg, c):
  o, lse = _call(_fwd_call, c, _heads_first(q, c.t_pad), _heads_first(k, c.s_pad),
                 _heads_first(v, c.s_pad), *_pad_segments(c, q_seg, kv_seg))
  out = _tokens_first(o, c.t)
  # Residuals are the caller's own q, k, v, out (kept by autodiff around us anyway) + lse.
  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(c, res, cts):
  q, k, v, q_seg, kv_seg, out, lse = res
  dout, dlse = cts
  # d lse_i / d s_ij = p_ij, so an lse cotangent folds into di: ds = p * (dp - (di - dlse)).
  di = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
  di = jnp.pad(di.transpose(0, 2, 1), ((0, 0), (0, 0), (0, c.t_pad - c.t)))[:, :, None] - dlse
  lse = jnp.where(jnp.arange(c.t_pad) < c.t, lse, _NO_GRAD_LSE)  # padded rows: p = 0
  args = (_heads_first(q, c.t_pad), _heads_first(k, c.s_pad), _heads_first(v, c.s_pad),
          _heads_first(dout, c.t_pad), lse, di, *_pad_segments(c, q_seg, kv_seg))
  dq = _call(_dq_call, c, *args)
  dk, dv = _call(_dkv_call, c, *args)
  return _tokens_first(dq, c.t), _tokens_first(dk, c.s), _tokens_first(dv, c.s), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------ the API

def _fit_block(length: int, block: int) -> tuple[int, int]:
  """(block, padded length): block clipped to the 128-rounded length, padding kept small."""
  if block % LANES or block <= 0:
    raise ValueError(f"block sizes must be positive multiples of {LANES}, got {block}")
  cdiv = lambda a, b: -(-a // b)
  full = cdiv(length, LANES) * LANES
  if block >= full:
    return full, full
  n = cdiv(length, block)
  block = cdiv(cdiv(length, n), LANES) * LANES  # e.g. 600 -> 2 x 384, not 2 x 512
  return block, n * block


def _split_segment_ids(segment_ids, b: int, t: int, s: int):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      raise ValueError(f"a single segment_ids array needs T == S, got T={t}, S={s}; pass "
                       "(q_segment_ids [B, T], kv_segment_ids [B, S])")
    q_seg = kv_seg = segment_ids
  if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
    raise ValueError(f"segment ids must be [B, T]={b, t} and [B, S]={b, s}, got "
                     f"{q_seg.shape} and {kv_seg.shape}")
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def flash_attention(q: Array, k: Array, v: Array, *, segment_ids=None, causal: bool = True,
                    scale: float | None = None, return_lse: bool = False,
                    q_offset: int | None = None, block_sizes: BlockSizes | None = None,
                    interpret: Any = False):
  """Flash attention (Pallas TPU kernel), differentiable, GQA without repeating K/V.

  Args:
    q: [B, T, N, D] queries (rotated); bf16 (f32 accumulation) or f32.
    k, v: [B, S, K, D] keys / values, same dtype; N % K == 0.
    segment_ids: None, (q_segment_ids [B, T], kv_segment_ids [B, S]), or one [B, T] array when
      T == S. Integer ids; queries see only keys of the same id.
    causal: key j is visible to query i only if j <= q_offset + i.
    scale: logit multiplier; default D ** -0.5.
    return_lse: also return the logsumexp of the scaled, masked logits, [B, T, N] f32
      (MASK_LSE for a query that sees no key). Differentiable.
    q_offset: token index of query 0 (static int); default S - T (queries are the last T keys).
    block_sizes: `BlockSizes` (or (block_q, block_k)); default 512 x 512, clipped.
    interpret: False: the Mosaic TPU kernels; True (or `pltpu.InterpretParams`): the Pallas
      interpreter, on any backend; None: chosen when lowering (Mosaic for TPU, else interpreter).

  Returns:
    out [B, T, N, D] in q's dtype (and lse [B, T, N] f32 when return_lse).
  """
  b, t, n, d = q.shape
  _, s, kh, _ = k.shape
  if k.shape != (b, s, kh, d) or v.shape != k.shape or n % kh:
    raise ValueError(f"need q [B, T, N, D], k = v [B, S, K, D] with N % K == 0; got q {q.shape},"
                     f" k {k.shape}, v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
  q_seg, kv_seg = _split_segment_ids(segment_ids, b, t, s)
  if isinstance(block_sizes, (tuple, list)):
    block_sizes = BlockSizes(*block_sizes)
  block_sizes = block_sizes or BlockSizes()
  bq, t_pad = _fit_block(t, block_sizes.block_q)
  bk, s_pad = _fit_block(s, block_sizes.block_k)
  c = _Static(causal=bool(causal), scale=float(d ** -0.5 if scale is None else scale),
              q_offset=int((s - t if causal else 0) if q_offset is None else q_offset),
              t=t, s=s, t_pad=t_pad, s_pad=s_pad, bq=bq, bk=bk, groups=n // kh,
              segmented=q_seg is not None, interpret=interpret)
  out, lse = _flash(q, k, v, q_seg, kv_seg, c)
  if return_lse:
    return out, lse[:, :, 0, :t].transpose(0, 2, 1)  # [B, T, N]
  return out


def flash_attention_reference(q: Array, k: Array, v: Array, *, segment_ids=None,
                              causal: bool = True, scale: float | None = None,
                              return_lse: bool = False, q_offset: int | None = None):
  """Plain-jnp attention with `flash_attention`'s semantics, all in f32 (the test oracle)."""
  b, t, n, d = q.shape
  _, s, kh, _ = k.shape
  g = n // kh
  q_seg, kv_seg = _split_segment_ids(segment_ids, b, t, s)
  scale = d ** -0.5 if scale is None else scale
  q_offset = (s - t if causal else 0) if q_offset is None else q_offset
  mask = jnp.ones((b, t, s), bool)
  if causal:
    mask &= jnp.arange(s)[None, None, :] <= q_offset + jnp.arange(t)[None, :, None]
  if q_seg is not None:
    mask &= q_seg[:, :, None] == kv_seg[:, None, :]
  hi = lax.Precision.HIGHEST
  qg = q.astype(jnp.float32).reshape(b, t, kh, g, d)  # [B, T, K, G, D]
  logits = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k.astype(jnp.float32), precision=hi) * scale
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)  # [B, K, G, T, S]
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", p / l_safe, v.astype(jnp.float32), precision=hi)
  out = out.reshape(b, t, n, d).astype(q.dtype)  # [B, T, N, D]
  if not return_lse:
    return out
  lse = jnp.where(l > 0, m + jnp.log(l_safe), MASK_LSE)[..., 0]  # [B, K, G, T]
  return out, lse.reshape(b, n, t).transpose(0, 2, 1)  # [B, T, N]


# ------------------------------------------------------------------------------- shard_map

def _axes_size(mesh, axes: tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _as_axes(axes, mesh) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a name, or names) -> the names present in the mesh."""
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.shape)


def sharded_flash_attention(q: Array, k: Array, v: Array, segment_ids=None, *, mesh=None,
                            batch_axes: str | Sequence[str] | None = ("data", "fsdp", "expert"),
                            head_axes: str | Sequence[str] | None = ("tensor",), **kwargs):
  """`flash_attention` under `jax.shard_map` (Mosaic kernels cannot be auto-partitioned).

  Batch is split over `batch_axes`, query heads over `head_axes`; kv heads too when they divide,
  otherwise (fewer kv heads than head shards, e.g. K=4 under tensor=8) K/V stay replicated and
  each shard slices the one kv head its query heads use. Axes missing from the mesh are ignored;
  with no mesh at all this is plain `flash_attention`. The sequence is never split (a mesh axis
  sharding it is gathered at the boundary: no context parallelism inside the kernel).

  Args:
    q, k, v, segment_ids: as `flash_attention` (segment ids: None, a pair, or one [B, T] array).
    mesh: a `Mesh` or `AbstractMesh`; default: the current one (`jax.set_mesh` /
      `jax.sharding.use_abstract_mesh`, as `qwen2_jax.sharding.activation_rules` sets).
    batch_axes, head_axes: mesh axes of the batch and head dimensions (PartitionSpec entries).
    **kwargs: `flash_attention` keywords (causal, scale, return_lse, q_offset, block_sizes,
      interpret).
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if not mesh.shape:
    return flash_attention(q, k, v, segment_ids=segment_ids, **kwargs)
  batch_axes, head_axes = _as_axes(batch_axes, mesh), _as_axes(head_axes, mesh)
  b, _, n, _ = q.shape
  kh = k.shape[2]
  groups = n // kh
  bsz, hsz = _axes_size(mesh, batch_axes), _axes_size(mesh, head_axes)
  if b % bsz or n % hsz:
    raise ValueError(f"batch {b} / heads {n} do not split over {batch_axes}={bsz} / "
                     f"{head_axes}={hsz}")
  n_local = n // hsz
  shard_kv = kh % hsz == 0
  if not shard_kv and groups % n_local:
    raise ValueError(f"{n} query heads over {hsz} shards do not map onto whole kv heads "
                     f"(K={kh})")
  bspec = batch_axes or None
  hspec = head_axes or None
  act = P(bspec, None, hspec, None)
  kv_spec = act if shard_kv else P(bspec, None, None, None)
  seg_spec = P(bspec, None)
  if isinstance(segment_ids, (tuple, list)):
    seg_in = (seg_spec, seg_spec)
  else:
    seg_in = None if segment_ids is None else seg_spec
  out_spec = (act, P(bspec, None, hspec)) if kwargs.get("return_lse") else act

  def body(q, k, v, seg):
    if not shard_kv:  # this shard's query heads all use kv head (first local head) // G
      first = lax.axis_index(head_axes) * n_local
      k = lax.dynamic_slice_in_dim(k, first // groups, 1, axis=2)  # [B, S, 1, D]
      v = lax.dynamic_slice_in_dim(v, first // groups, 1, axis=2)
    return flash_attention(q, k, v, segment_ids=seg, **kwargs)

  return jax.shard_map(body, mesh=mesh, in_specs=(act, kv_spec, kv_spec, seg_in),
                       out_specs=out_spec, check_vma=False)(q, k, v, segment_ids)
