"""Grouped matrix multiplication for TPU in Pallas: the expert matmuls of dropless MoE.

Rows of `lhs` [m, k] are sorted by group: the first group_sizes[0] rows belong to group 0, the
next group_sizes[1] to group 1, and so on. Two products, both with f32 accumulation:

  gmm   out[r] = lhs[r] @ rhs[g(r)]                rhs [g, k, n] (or [g, n, k] with
        transpose_rhs), out [m, n]; rows past sum(group_sizes) are exactly 0.
  tgmm  out[i] = lhs[rows of i].T @ dout[rows of i]     out [g, k, n]; an empty group gives 0.

`gmm` is differentiable (`custom_vjp`): d lhs = gmm(d out, rhs, transpose_rhs=True) and
d rhs = tgmm(lhs, d out). Group sizes need not be multiples of the row tile, and may be 0.

How the kernels walk the rows. The m rows are cut into tiles of tm rows; a "visit" is one
(row tile, group) pair whose row ranges intersect, plus one empty visit for each empty group
and for each row tile past the last group (so every output block is written, with zeros where
no row belongs). Visits are listed in group order, so their row tiles never decrease: in `gmm`
an output tile stays in VMEM across the visits that share it, and in `tgmm` a group's output
block stays in VMEM across that group's visits. Each visit masks the rows of its tile outside
its group's range. The visit tables (tile, group, row range, first/last flags) are computed with
jnp from `group_sizes` and scalar-prefetched; the number of visits (at most m/tm + g) is the
dynamic length of the grid, so no step is spent on padding.

Grids: gmm (n tiles, visits, k tiles) with the contraction innermost; tgmm (k tiles, n tiles,
visits) with the rows (the contraction) innermost. Tiles default to 512 (clipped to the array;
an array dimension that is neither <= the tile nor a multiple of 128 is zero-padded).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen2_jax.kernels import on_platform

Array = jax.Array

_FIRST, _LAST = 1, 2  # visit flags: first / last visit of its output block
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Preferred tile sizes along m (rows), k (contraction of gmm) and n (output columns).

  512 x 512 x 512: one step is 2 * 512^3 = 268 MFLOP, enough to hide the fixed cost of a grid
  step on v5e/v5p/v6e, and the double-buffered bf16 inputs plus the f32 accumulator take about
  3 MiB of VMEM, well inside the default scoped limit of every generation.
  """
  tm: int = 512
  tk: int = 512
  tn: int = 512


def _fit(dim: int, preferred: int) -> tuple[int, int]:
  """(tile, padded dim): the whole dim when it fits in one tile, else the largest multiple of
  128 <= preferred that divides dim, else `preferred` rounded to 128 with dim padded to it."""
  if dim <= preferred:
    return dim, dim
  for tile in range(preferred - preferred % 128, 127, -128):
    if dim % tile == 0:
      return tile, dim
  tile = max(128, preferred - preferred % 128)
  return tile, -(-dim // tile) * tile


def _fit_rows(m: int, preferred: int) -> tuple[int, int]:
  """Row tile: rows are masked per visit anyway, so pad m to a multiple of the tile."""
  if m <= preferred:
    return m, m
  tile = max(8, preferred - preferred % 8)
  return tile, -(-m // tile) * tile


def _pad_to(x: Array, axis: int, size: int) -> Array:
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


class _Visits(NamedTuple):
  tile: Array    # [V] int32 row tile of each visit
  group: Array   # [V] int32 group of each visit
  lo: Array      # [V] int32 first row of the group (lo == hi: an empty visit)
  hi: Array      # [V] int32 one past its last row
  flags: Array   # [V] int32 _FIRST / _LAST of the output block (row tile or group)
  count: Array   # [] int32 number of real visits (the grid length)


def _visits(group_sizes: Array, m: int, tm: int, *, by_group: bool) -> _Visits:
  """The visit tables (see the module docstring). `by_group`: flags mark the first / last visit
  of each group (tgmm) instead of each row tile (gmm)."""
  g = group_sizes.shape[0]
  tiles_m = m // tm
  capacity = tiles_m + g  # upper bound on the number of visits
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(sizes), m)  # [g]
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])  # [g]
  first = jnp.minimum(starts // tm, tiles_m - 1)  # [g]
  last = jnp.where(ends > starts, (ends - 1) // tm, first)  # [g]
  per_group = last - first + 1  # [g], >= 1 (an empty group gets one empty visit)
  group_end = jnp.cumsum(per_group)  # [g]
  in_groups = group_end[-1]
  tail_start = last[-1] + 1  # row tiles past the last group's rows
  count = in_groups + (tiles_m - tail_start)
  v = jnp.arange(capacity, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(group_end, v, side="right"), g - 1).astype(jnp.int32)
  in_group = v < in_groups
  offset = v - (group_end[group] - per_group[group])
  tile = jnp.where(in_group, first[group] + offset, tail_start + v - in_groups)
  tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
  lo = jnp.where(in_group, starts[group], 0)
  hi = jnp.where(in_group, ends[group], 0)
  key = group if by_group else tile
  prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), key[:-1]])
  nxt = jnp.concatenate([key[1:], jnp.full((1,), -1, jnp.int32)])
  is_last = (key != nxt) | (v == count - 1)
  flags = jnp.where(key != prev, _FIRST, 0) | jnp.where(is_last, _LAST, 0)
  return _Visits(tile, group, lo, hi, flags.astype(jnp.int32), count.astype(jnp.int32))


def _row_mask(tile, lo, hi, shape) -> Array:
  rows = tile * shape[0] + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


# ------------------------------------------------------------------------------------- kernels

def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, flags_ref, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, transpose_rhs: bool):
  del group_ref  # used by the index maps only
  v, kk = pl.program_id(1), pl.program_id(2)
  flags = flags_ref[v]

  @pl.when((kk == 0) & ((flags & _FIRST) != 0))
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  lo, hi = lo_ref[v], hi_ref[v]

  @pl.when(lo < hi)
  def _():
    x = lhs_ref[...]  # [tm, tk]
    x = jnp.where(_row_mask(tile_ref[v], lo, hi, x.shape), x, jnp.zeros_like(x))
    acc_ref[...] += lax.dot_general(x, rhs_ref[...], _NT if transpose_rhs else _NN,
                                    preferred_element_type=jnp.float32)

  @pl.when((kk == pl.num_programs(2) - 1) & ((flags & _LAST) != 0))
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, flags_ref, lhs_ref, dout_ref, out_ref,
                 acc_ref):
  del group_ref
  v = pl.program_id(2)
  flags = flags_ref[v]

  @pl.when((flags & _FIRST) != 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  lo, hi = lo_ref[v], hi_ref[v]

  @pl.when(lo < hi)
  def _():
    x = lhs_ref[...]  # [tm, tk]
    x = jnp.where(_row_mask(tile_ref[v], lo, hi, x.shape), x, jnp.zeros_like(x))
    acc_ref[...] += lax.dot_general(x, dout_ref[...], _TN, preferred_element_type=jnp.float32)

  @pl.when((flags & _LAST) != 0)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _gmm_call(lhs, rhs, group_sizes, *, transpose_rhs: bool, tiling: Tiling, out_dtype,
              interpret, rows_hint: int | None = None) -> Array:
  call = functools.partial(_gmm_pallas, transpose_rhs=transpose_rhs, tiling=tiling,
                           out_dtype=out_dtype, rows_hint=rows_hint)
  return on_platform(call, lhs, rhs, group_sizes, interpret=interpret)


def _gmm_pallas(lhs, rhs, group_sizes, *, transpose_rhs: bool, tiling: Tiling, out_dtype,
                interpret, rows_hint: int | None) -> Array:
  m, k = lhs.shape
  rows = min(m, rows_hint or m)  # rows the cost estimate assumes are in groups
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, m_pad = _fit_rows(m, tiling.tm)
  tk, k_pad = _fit(k, tiling.tk)
  tn, n_pad = _fit(n, tiling.tn)
  lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)
  rhs = _pad_to(_pad_to(rhs, 2 if transpose_rhs else 1, k_pad), 1 if transpose_rhs else 2, n_pad)
  vis = _visits(group_sizes, m_pad, tm, by_group=False)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, t, g, *_: (g[v], j, kk))
  else:
    rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, t, g, *_: (g[v], kk, j))
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * rows * k * n, transcendentals=0,
                         bytes_accessed=itemsize * (rows * k * (n_pad // tn) + rhs.size)
                         + m * n * jnp.dtype(out_dtype).itemsize)
  out = pl.pallas_call(
      functools.partial(_gmm_kernel, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(n_pad // tn, vis.count, k_pad // tk),
          in_specs=[pl.BlockSpec((tm, tk), lambda j, v, kk, t, *_: (t[v], kk)), rhs_spec],
          out_specs=pl.BlockSpec((tm, tn), lambda j, v, kk, t, *_: (t[v], j)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost, interpret=interpret,
  )(vis.tile, vis.group, vis.lo, vis.hi, vis.flags, lhs, rhs)
  return out[:m, :n]


def tgmm(lhs: Array, dout: Array, group_sizes: Array, *, tiling: Tiling = Tiling(),
         out_dtype=None, interpret=False, rows_hint: int | None = None) -> Array:
  """Per-group lhs.T @ dout: [m, k] x [m, n] -> [g, k, n] (the weight gradient of `gmm`).

  Rows past sum(group_sizes) are ignored; an empty group's block is 0. `interpret` and
  `rows_hint` as in `gmm`.
  """
  call = functools.partial(_tgmm_pallas, tiling=tiling, out_dtype=out_dtype or lhs.dtype,
                           rows_hint=rows_hint)
  return on_platform(call, lhs, dout, group_sizes.astype(jnp.int32), interpret=interpret)


def _tgmm_pallas(lhs, dout, group_sizes, *, tiling: Tiling, out_dtype, interpret,
                 rows_hint: int | None) -> Array:
  m, k = lhs.shape
  rows = min(m, rows_hint or m)  # rows the cost estimate assumes are in groups
  n = dout.shape[1]
  g = group_sizes.shape[0]
  tm, m_pad = _fit_rows(m, tiling.tm)
  tk, k_pad = _fit(k, tiling.tk)
  tn, n_pad = _fit(n, tiling.tn)
  lhs = _pad_to(_pad_to(lhs, 0, m_pad), 1, k_pad)
  dout = _pad_to(_pad_to(dout, 0, m_pad), 1, n_pad)
  vis = _visits(group_sizes, m_pad, tm, by_group=True)
  itemsize = jnp.dtype(lhs.dtype).itemsize
  cost = pl.CostEstimate(flops=2 * rows * k * n, transcendentals=0,
                         bytes_accessed=itemsize * rows * (k * (n_pad // tn) + n * (k_pad // tk))
                         + g * k * n * jnp.dtype(out_dtype).itemsize)
  out = pl.pallas_call(
      _tgmm_kernel,
      out_shape=jax.ShapeDtypeStruct((g, k_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(k_pad // tk, n_pad // tn, vis.count),
          in_specs=[pl.BlockSpec((tm, tk), lambda i, j, v, t, *_: (t[v], i)),
                    pl.BlockSpec((tm, tn), lambda i, j, v, t, *_: (t[v], j))],
          out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, v, t, g, *_: (g[v], i, j)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret,
  )(vis.tile, vis.group, vis.lo, vis.hi, vis.flags, lhs, dout)
  return out[:, :k, :n]


# ---------------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, tiling, interpret, rows_hint):
  return _gmm_call(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, tiling=tiling,
                   out_dtype=lhs.dtype, interpret=interpret, rows_hint=rows_hint)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, tiling, interpret, rows_hint):
  out = _gmm(lhs, rhs, group_sizes, transpose_rhs, tiling, interpret, rows_hint)
  return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, tiling, interpret, rows_hint, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dout = dout.astype(lhs.dtype)
  # d lhs [m, k] = dout [m, n] @ rhs[g].T (or @ rhs[g] when rhs is stored transposed).
  dlhs = _gmm_call(dout, rhs, group_sizes, transpose_rhs=not transpose_rhs, tiling=tiling,
                   out_dtype=lhs.dtype, interpret=interpret, rows_hint=rows_hint)
  a, b = (dout, lhs) if transpose_rhs else (lhs, dout)  # rhs [g, n, k]: d rhs[g] = dout.T @ lhs
  drhs = tgmm(a, b, group_sizes, tiling=tiling, out_dtype=rhs.dtype, interpret=interpret,
              rows_hint=rows_hint)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False,
        tiling: Tiling = Tiling(), interpret=False, rows_hint: int | None = None) -> Array:
  """Grouped matmul: out[r] = lhs[r] @ rhs[group(r)] (see the module docstring).

  Args:
    lhs: [m, k] rows sorted by group.
    rhs: [g, k, n], or [g, n, k] with `transpose_rhs` (out[r] = lhs[r] @ rhs[group(r)].T).
    group_sizes: [g] int, rows per group; sum <= m (rows past the sum come out 0).
    tiling: preferred tile sizes.
    interpret: False: the Mosaic TPU kernel; True (or `pltpu.InterpretParams`): the Pallas
      interpreter, on any backend; None: chosen when lowering (Mosaic for TPU, else interpreter).
    rows_hint: rows expected to fall in groups, for the cost estimate XLA sees (the kernel skips
      rows past the groups, so a padded buffer costs what its used rows cost); default m.

  Returns:
    [m, n] in lhs.dtype, accumulated in f32. Differentiable in lhs and rhs.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"gmm: lhs [m, k], rhs [g, k, n] and group_sizes [g] expected, got "
                     f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
  k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if lhs.shape[1] != k:
    raise ValueError(f"gmm: lhs has k={lhs.shape[1]}, rhs has k={k} "
                     f"(transpose_rhs={transpose_rhs})")
  return _gmm(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), transpose_rhs, tiling,
              interpret, rows_hint)


# ----------------------------------------------------------------------------------- reference

def group_ids_reference(group_sizes: Array, m: int) -> Array:
  """[m] group of each row; g (one past the last group) for rows past sum(group_sizes)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(m), side="right")


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array, *,
                  transpose_rhs: bool = False) -> Array:
  """Obviously-correct gmm: every group's matmul on every row, masked to that group's rows."""
  if transpose_rhs:
    rhs = rhs.swapaxes(1, 2)
  g = rhs.shape[0]
  onehot = jax.nn.one_hot(group_ids_reference(group_sizes, lhs.shape[0]), g,
                          dtype=jnp.float32)  # [m, g]
  per_group = jnp.einsum("mk,gkn->mgn", lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  return jnp.einsum("mgn,mg->mn", per_group, onehot).astype(lhs.dtype)


def tgmm_reference(lhs: Array, dout: Array, group_sizes: Array) -> Array:
  """Obviously-correct tgmm: out[i] = sum over rows r of group i of outer(lhs[r], dout[r])."""
  g = group_sizes.shape[0]
  onehot = jax.nn.one_hot(group_ids_reference(group_sizes, lhs.shape[0]), g,
                          dtype=jnp.float32)  # [m, g]
  return jnp.einsum("mk,mn,mg->gkn", lhs.astype(jnp.float32), dout.astype(jnp.float32),
                    onehot).astype(lhs.dtype)
