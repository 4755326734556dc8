"""Expert parallelism: routed experts inside `jax.shard_map`, tokens exchanged by all-to-all.

Used by `qwen2_jax.moe.routed_experts` for the grouped implementations ("ragged_dot", "pallas")
whenever the model is traced under a mesh (`qwen2_jax.sharding.activation_rules`). The layout
comes from the logical rules in force, so it composes with whatever data / FSDP / tensor
sharding the rest of the model uses:

  tokens   x [B, T, H] split like the activations ("activation_batch", "activation_length");
  experts  the E axis of the expert weights over the mesh axes of the "experts" rule (ep
           shards, E / ep experts each); their F axis over the "mlp" rule's axes (tensor
           parallelism: partial sums, added up outside the shard_map); H unsplit (an FSDP-
           sharded H is all-gathered at the shard_map boundary, grads reduce-scattered back).

Inside, per device (A = local tokens * K assignments), when ep > 1:
  1. sort the local assignments by expert (so also by destination shard);
  2. pack them into a [ep, C, H] send buffer, one slot row per assignment, with its expert's
     local index alongside (sentinel E/ep in unused slots);
  3. all_to_all: shard s receives every device's rows for its experts;
  4. group the received rows by local expert, grouped SwiGLU (rows of unused slots are sorted
     past every group and come out 0);
  5. all_to_all back, unpack to assignment order, weighted sum over the K choices.
C (rows per destination) is A when dropless: the worst case of every assignment going to one
shard, so nothing is ever dropped and results equal a single device's exactly; with a capacity
factor it is (E / ep) * capacity. XLA:CPU has no ragged all-to-all, so the buffers are dense;
on TPU a ragged all-to-all would move only the used rows (see the README's note).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from qwen2_jax import moe_dispatch

Array = jax.Array


def current_mesh() -> Any:
  """The mesh the model is traced under (abstract or concrete), or None without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or not mesh.shape or math.prod(mesh.shape.values()) == 1:
    return None
  return mesh


def _rule_axes(name: str, mesh, dim: int | None, taken: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Mesh axes the current logical rules give `name`: present in the mesh, size > 1, not in
  `taken`, and (cumulatively) dividing `dim`."""
  entry = nn.logical_to_mesh_axes((name,))[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  kept: list[str] = []
  for a in axes:
    size = mesh.shape.get(a, 1)
    if size <= 1 or a in taken:
      continue
    if dim is not None and dim % (math.prod(mesh.shape[b] for b in kept) * size):
      continue
    kept.append(a)
  return tuple(kept)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def sharded_routed_experts(x: Array, idx: Array, weights: Array, w_gate: Array, w_up: Array,
                           w_down: Array, *, impl: str, capacity_factor: float | None = None,
                           mesh: Any = None) -> tuple[Array, Array]:
  """`moe.routed_experts` under `jax.shard_map` (see the module docstring).

  Args/returns as `moe.routed_experts`; `mesh` defaults to the current one.
  """
  mesh = current_mesh() if mesh is None else mesh
  B, T, H = x.shape
  E, _, F = w_gate.shape
  batch = _rule_axes("activation_batch", mesh, B)
  length = _rule_axes("activation_length", mesh, T, batch)
  experts = _rule_axes("experts", mesh, E)
  tensor = _rule_axes("mlp", mesh, F, batch + length + experts)
  ep = math.prod(mesh.shape[a] for a in experts)
  tok = P(_spec_entry(batch), _spec_entry(length), None)
  w_in = P(_spec_entry(experts), None, _spec_entry(tensor))
  w_out = P(_spec_entry(experts), _spec_entry(tensor), None)
  y_spec = P(_spec_entry(tensor), *tok) if tensor else tok

  def body(x, idx, weights, w_gate, w_up, w_down):
    b, t, _ = x.shape
    K = idx.shape[-1]
    xf, idxf, wf = x.reshape(b * t, H), idx.reshape(b * t, K), weights.reshape(b * t, K)
    capacity = moe_dispatch.expert_capacity(b * t * K, E, capacity_factor)
    keep = moe_dispatch.keep_mask(idxf, E, capacity)
    if ep == 1:
      y = moe_dispatch.sorted_dispatch(xf, idxf, wf, keep, w_gate, w_up, w_down, impl)
    else:
      y = _exchange_dispatch(xf, idxf, wf, keep, w_gate, w_up, w_down, impl=impl,
                             axis=experts, ep=ep, num_experts=E, capacity=capacity)
    y = y.reshape(b, t, H)
    return (y[None] if tensor else y), keep.reshape(b, t, K)

  y, keep = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                          out_specs=(y_spec, tok), check_vma=False)(
                              x, idx, weights, w_gate, w_up, w_down)
  if tensor:  # partial sums over the F shards
    y = jnp.sum(y.astype(jnp.float32), axis=0).astype(x.dtype)
  return y, keep


def _exchange_dispatch(x: Array, idx: Array, weights: Array, keep: Array, w_gate: Array,
                       w_up: Array, w_down: Array, *, impl: str, axis: tuple[str, ...], ep: int,
                       num_experts: int, capacity: int | None) -> Array:
  """One device's side of the all-to-all dispatch: x [n, H], idx / weights / keep [n, K] ->
  [n, H]; the expert weights are this shard's [E / ep, ...]."""
  n, K = idx.shape
  H = x.shape[-1]
  A, E = n * K, num_experts
  local = E // ep
  C = A if capacity is None else min(A, local * capacity)  # rows per destination
  key = jnp.where(keep, idx, E).reshape(-1)  # [A], dropped -> E
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]  # [A]
  counts = jnp.bincount(key, length=E + 1)[:E].reshape(ep, local).sum(1)  # [ep] rows per dest
  start = jnp.cumsum(counts) - counts  # [ep]
  slot = jnp.arange(C, dtype=jnp.int32)
  valid = slot[None, :] < counts[:, None]  # [ep, C]
  src = jnp.where(valid, start[:, None] + slot[None, :], 0)  # [ep, C] sorted row of each slot
  send_x = jnp.where(valid[..., None], x[order[src] // K], 0).reshape(ep * C, H)
  dest = jnp.arange(ep, dtype=jnp.int32)[:, None]
  send_e = jnp.where(valid, sorted_key[src] - dest * local, local).reshape(ep * C)
  recv_x = lax.all_to_all(send_x, axis, 0, 0, tiled=True)  # [ep * C, H], by source shard
  recv_e = lax.all_to_all(send_e, axis, 0, 0, tiled=True)  # [ep * C] local expert or sentinel
  r_order, sizes = moe_dispatch.group_by(recv_e, local)
  # Balanced routing brings each shard A rows of its ep * C slots (the rest are skipped).
  ys = moe_dispatch.expert_ffn(recv_x[r_order], sizes, w_gate, w_up, w_down, impl, rows_hint=A)
  ys = ys[moe_dispatch.inverse_permutation(r_order)]  # [ep * C, H] by slot
  back = lax.all_to_all(ys, axis, 0, 0, tiled=True)  # my slots' results, by destination shard
  row = jnp.arange(A, dtype=jnp.int32)
  d = jnp.minimum(sorted_key // local, ep - 1)
  kept = sorted_key < E
  y_sorted = jnp.where(kept[:, None], back[jnp.where(kept, d * C + row - start[d], 0)], 0)
  ys = y_sorted[moe_dispatch.inverse_permutation(order)].reshape(n, K, H)  # [n, K, H] by token
  return jnp.einsum("NKH,NK->NH", ys, (weights * keep).astype(ys.dtype))
