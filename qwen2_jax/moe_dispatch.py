"""MoE dispatch primitives: capacity, sort / permute / unpermute, the grouped matmul.

Shared by the single-device path (`qwen2_jax.moe.routed_experts`) and expert parallelism
(`qwen2_jax.expert_parallel`), which both import this module and not each other's internals.

Shape letters: B batch, T length, N = B*T tokens, H hidden, E experts, K = num_experts_per_tok,
A = N*K token-expert assignments, F expert width, M rows of a grouped matmul.

`expert_ffn` is the one place that picks the grouped matmul for `moe_impl`: "ragged_dot" is XLA's
`jax.lax.ragged_dot`; "pallas" is this project's kernel (`qwen2_jax.kernels.gmm`), chosen when
lowering: Mosaic for TPU, the Pallas interpreter on any other backend (CPU included).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from qwen2_jax.kernels import gmm as gmm_lib

Array = jax.Array


def expert_capacity(num_assignments: int, num_experts: int, factor: float | None) -> int | None:
  """Assignments one expert may take from a group of `num_assignments` (None: unlimited)."""
  if factor is None:
    return None
  return max(1, math.ceil(factor * num_assignments / num_experts))


def keep_mask(idx: Array, num_experts: int, capacity: int | None) -> Array:
  """[N, K] bool: assignment (n, k) fits its expert's capacity (token order, then choice order)."""
  if capacity is None:
    return jnp.ones(idx.shape, bool)
  onehot = jax.nn.one_hot(idx.reshape(-1), num_experts, dtype=jnp.int32)  # [A, E]
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # [A] place in its expert
  return (rank < capacity).reshape(idx.shape)


def group_by(key: Array, num_groups: int) -> tuple[Array, Array]:
  """(order [A], group_sizes [G]): a stable sort of rows by key; key == G marks rows to leave
  out (sorted last, in no group)."""
  order = jnp.argsort(key, stable=True)
  sizes = jnp.bincount(key, length=num_groups + 1)[:num_groups].astype(jnp.int32)
  return order, sizes


def inverse_permutation(order: Array) -> Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def expert_ffn(xs: Array, group_sizes: Array, w_gate: Array, w_up: Array, w_down: Array,
               impl: str, rows_hint: int | None = None) -> Array:
  """SwiGLU of rows grouped by expert: [M, H] -> [M, H]; rows past sum(group_sizes) give 0.

  `rows_hint`: rows expected in groups when M is a padded buffer (cost estimate only)."""
  if impl == "ragged_dot":
    mm = lambda a, w: lax.ragged_dot(a, w, group_sizes)
  elif impl == "pallas":
    mm = lambda a, w: gmm_lib.gmm(a, w, group_sizes, interpret=None, rows_hint=rows_hint)
  else:
    raise ValueError(f"expert_ffn: moe_impl {impl!r} is not a grouped implementation")
  h = jax.nn.silu(mm(xs, w_gate)) * mm(xs, w_up)  # [M, F]
  return mm(h, w_down)  # [M, H]


def sorted_dispatch(x: Array, idx: Array, weights: Array, keep: Array, w_gate: Array,
                    w_up: Array, w_down: Array, impl: str) -> Array:
  """Dropless grouped dispatch: sort assignments by expert, grouped SwiGLU, unsort, combine.

  x [N, H], idx / weights / keep [N, K], w_gate / w_up [E, H, F], w_down [E, F, H] -> [N, H].
  """
  N, K = idx.shape
  E = w_gate.shape[0]
  key = jnp.where(keep, idx, E).reshape(-1)  # [A], dropped assignments -> E (no group)
  order, sizes = group_by(key, E)
  ys = expert_ffn(x[order // K], sizes, w_gate, w_up, w_down, impl)  # [A, H] by expert
  ys = ys[inverse_permutation(order)].reshape(N, K, -1)  # [N, K, H] by token
  return jnp.einsum("NKH,NK->NH", ys, (weights * keep).astype(ys.dtype))


def dense_dispatch(x: Array, idx: Array, weights: Array, keep: Array, w_gate: Array,
                   w_up: Array, w_down: Array) -> Array:
  """Every expert on every token, weighted by the routing weights (0 for unchosen experts)."""
  E = w_gate.shape[0]
  g = jnp.einsum("NH,EHF->NEF", x, w_gate)
  u = jnp.einsum("NH,EHF->NEF", x, w_up)
  y = jnp.einsum("NEF,EFH->NEH", jax.nn.silu(g) * u, w_down)
  combine = jnp.einsum("NKE,NK->NE", jax.nn.one_hot(idx, E, dtype=x.dtype),
                       (weights * keep).astype(x.dtype))  # [N, E]
  return jnp.einsum("NEH,NE->NH", y, combine)


def local_routed_experts(x: Array, idx: Array, weights: Array, w_gate: Array, w_up: Array,
                         w_down: Array, *, impl: str, capacity_factor: float | None
                         ) -> tuple[Array, Array]:
  """Routed experts of one token group on one device: x [B, T, H], idx / weights [B, T, K] ->
  (y [B, T, H], keep [B, T, K])."""
  B, T, H = x.shape
  K = idx.shape[-1]
  E = w_gate.shape[0]
  xf, idxf, wf = x.reshape(B * T, H), idx.reshape(B * T, K), weights.reshape(B * T, K)
  keep = keep_mask(idxf, E, expert_capacity(B * T * K, E, capacity_factor))
  if impl == "dense":
    y = dense_dispatch(xf, idxf, wf, keep, w_gate, w_up, w_down)
  else:
    y = sorted_dispatch(xf, idxf, wf, keep, w_gate, w_up, w_down, impl)
  return y.reshape(B, T, H), keep.reshape(B, T, K)
