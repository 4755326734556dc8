"""The sampler's per-row statistics of a step's logits on the CPU: a C++ XLA FFI call
(`cpu_logits.cc`) and its jnp reference.

For logits [B, V] and a vocabulary limit [B] (ids >= limit[b] are masked out of row b), each row
gives the greedy id (the first id holding the row's max; the first NaN if the row has one, as
`jnp.argmax`), the max (NaN with a NaN), and sum(exp(logits - shift)) with shift the max where it is
finite, else 0 (so 0 for a row of -inf); the row's logsumexp is shift + log(sum). One pass of the
logits where XLA:CPU's fusions of the same took ~8 ms of a Qwen2-0.5B 16-row decode step (a [16,
151936] reduction) on a 2-core Xeon. float32, CPU backend, no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen2_jax.kernels import cpu_extension

Array = jax.Array


def applies(logits: Array) -> bool:
  """Whether `row_stats` can run here (`cpu_extension.runs_here`) on these float32 logits
  [B, V]; else the sampler takes the jnp path."""
  return cpu_extension.runs_here() and logits.dtype == jnp.float32 and logits.ndim == 2


def row_stats(logits: Array, limit: Array) -> tuple[Array, Array, Array]:
  """(greedy id [B] int32, max [B], sum of exp [B]) of logits [B, V] f32 under limit [B]."""
  if not cpu_extension.available():
    raise cpu_extension.missing("row_stats")
  if logits.dtype != jnp.float32 or logits.ndim != 2 or limit.shape != logits.shape[:1]:
    raise ValueError(f"row_stats: float32 logits [B, V] and limit [B], got {logits.dtype} "
                     f"{logits.shape} and {limit.shape}")
  b = logits.shape[0]
  out = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.float32),
         jax.ShapeDtypeStruct((b,), jnp.float32))
  return jax.ffi.ffi_call(cpu_extension.LOGITS_TARGET, out)(logits, limit.astype(jnp.int32))


def row_stats_reference(logits: Array, limit: Array) -> tuple[Array, Array, Array]:
  """The same in jnp: argmax as the max and then the first id holding it (or the first NaN),
  two plain reductions that XLA fuses with the mask (its variadic argmax reduce is slow on the
  CPU); the path the sampler takes where `row_stats` does not apply."""
  v = logits.shape[-1]
  ids = jnp.arange(v, dtype=jnp.int32)
  x = jnp.where(ids[None, :] < limit[:, None], logits.astype(jnp.float32), -jnp.inf)
  top = jnp.max(x, axis=-1)  # XLA:CPU's max may skip NaN: NaN rows are handled apart
  first_max = jnp.min(jnp.where(x == top[:, None], ids[None, :], v - 1), axis=-1)
  first_nan = jnp.min(jnp.where(jnp.isnan(x), ids[None, :], v), axis=-1)
  has_nan = first_nan < v
  greedy = jnp.where(has_nan, first_nan, first_max)
  top = jnp.where(has_nan, jnp.nan, top)
  shift = jnp.where(jnp.isfinite(top), top, 0.0)
  return greedy, top, jnp.sum(jnp.exp(x - shift[:, None]), axis=-1)
