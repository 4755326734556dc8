"""The Qwen2-MoE sparse block: router, top-k, routed experts (dropless dispatch), shared expert.

Shape letters: B batch, T length, N = B*T tokens, H hidden, E experts, K = num_experts_per_tok,
A = N*K token-expert assignments, F expert width (moe_intermediate_size).

Numerics follow `transformers`' Qwen2MoeSparseMoeBlock (shared/reference/qwen2.md §3): router
logits in the activation dtype, softmax in f32, top-k, optional renormalisation of the k
weights, weights cast back to the activation dtype; y = sum_k w_k * expert_k(x) +
sigmoid(shared_expert_gate(x)) * shared_expert(x).

Routed experts, chosen by `config.moe_impl` in `routed_experts` (the one place that picks):
  dense       every expert on every token, combined with the (mostly zero) routing weights: the
              obviously-correct reference, E/K times the FLOPs.
  ragged_dot  dropless: sort the A assignments by expert, three grouped matmuls
              (`jax.lax.ragged_dot`), unsort, weighted sum over the K choices.
  pallas      the same with this project's Pallas TPU kernel (`qwen2_jax.kernels.gmm`; Mosaic
              on TPU, the Pallas interpreter elsewhere).
Under a mesh, ragged_dot and pallas run inside `jax.shard_map` with experts split over the
`expert` mesh axis and tokens exchanged by all-to-all (`qwen2_jax.expert_parallel`).

Capacity mode (`config.moe_capacity_factor`, None = dropless): each expert takes at most
ceil(factor * A / E) assignments of a token group (all tokens of the call; the tokens of one
device under a mesh), first come first served in token order; a dropped assignment contributes
0 (the token keeps its residual and the shared expert). All three implementations drop the same
assignments.

Statistics for the losses: each sparse layer sows `MoeStats` (sums over non-padding tokens) into
the "intermediates" collection; `moe_aux` turns those of all layers into the load-balancing loss
(`transformers`' pooled Switch formula), the router z-loss, per-expert load and the drop rate.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qwen2_jax.config import Qwen2Config
from qwen2_jax.kernels import gmm as gmm_lib
from qwen2_jax.layers import SwiGLU, dtype_of, weight_init

Array = jax.Array

STATS_NAME = "moe"  # the name sown into "intermediates" by every sparse layer


# ------------------------------------------------------------------------------------ dispatch

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


def routed_experts(x: Array, idx: Array, weights: Array, w_gate: Array, w_up: Array,
                   w_down: Array, *, impl: str, capacity_factor: float | None = None
                   ) -> tuple[Array, Array]:
  """The routed part of the MoE block by `impl` (see the module docstring).

  Args:
    x: [B, T, H] activations; idx: [B, T, K] int experts; weights: [B, T, K] routing weights.
    w_gate, w_up: [E, H, F]; w_down: [E, F, H].
    impl: "dense" | "ragged_dot" | "pallas".
    capacity_factor: None (dropless) or the capacity factor.

  Returns:
    (y [B, T, H], keep [B, T, K]: False where an assignment was dropped).
  """
  if impl != "dense":
    from qwen2_jax import expert_parallel  # pylint: disable=import-outside-toplevel
    if expert_parallel.current_mesh() is not None:
      return expert_parallel.sharded_routed_experts(
          x, idx, weights, w_gate, w_up, w_down, impl=impl, capacity_factor=capacity_factor)
  return local_routed_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl,
                              capacity_factor=capacity_factor)


# ---------------------------------------------------------------------------------- the block

def route(x: Array, router: Array, k: int, norm_topk_prob: bool
          ) -> tuple[Array, Array, Array, Array]:
  """Router: x [..., H], router [H, E] -> (logits f32, probs f32 [..., E], weights in x.dtype
  [..., K], idx int32 [..., K]). Logits in x.dtype as the reference, softmax in f32."""
  logits = jnp.einsum("...H,HE->...E", x, router.astype(x.dtype)).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top, idx = lax.top_k(probs, k)
  if norm_topk_prob:
    top = top / jnp.sum(top, axis=-1, keepdims=True)
  return logits, probs, top.astype(x.dtype), idx.astype(jnp.int32)


class _Experts(nn.Module):
  """Holds the stacked routed-expert weights (params only)."""
  config: Qwen2Config

  @nn.compact
  def __call__(self) -> tuple[Array, Array, Array]:
    cfg = self.config
    pdt = dtype_of(cfg.param_dtype)
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    p = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(weight_init(cfg), axes), shape, pdt)
    return (p("gate_proj", (E, H, F), ("experts", "embed", "mlp")),
            p("up_proj", (E, H, F), ("experts", "embed", "mlp")),
            p("down_proj", (E, F, H), ("experts", "mlp", "embed")))


class Qwen2MoeBlock(nn.Module):
  """Router + top-k routed experts + gated shared expert; sows `MoeStats` (see `moe_aux`).

  Params: router [H, E]; experts/{gate_proj, up_proj} [E, H, F], experts/down_proj [E, F, H];
  shared_expert/{gate_proj, up_proj, down_proj} (a SwiGLU of width
  shared_expert_intermediate_size) and shared_expert_gate [H, 1] when that width is > 0.
  """
  config: Qwen2Config

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None) -> Array:
    """x [B, T, H] -> [B, T, H]. `token_mask` [B, T] (0 = padding) only affects the statistics."""
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    B, T, H = x.shape
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    x = x.astype(dt)
    router = self.param("router", nn.with_logical_partitioning(weight_init(cfg), ("embed", None)),
                        (H, E), pdt)
    logits, probs, weights, idx = route(x, router, K, cfg.norm_topk_prob)  # [B, T, E|K]
    w_gate, w_up, w_down = (w.astype(dt) for w in _Experts(cfg, name="experts")())
    y, keep = routed_experts(x, idx, weights, w_gate, w_up, w_down, impl=cfg.moe_impl,
                             capacity_factor=cfg.moe_capacity_factor)
    if cfg.shared_expert_intermediate_size:
      gate = self.param("shared_expert_gate",
                        nn.with_logical_partitioning(weight_init(cfg), ("embed", None)), (H, 1),
                        pdt)
      shared = SwiGLU(cfg, cfg.shared_expert_intermediate_size, name="shared_expert")(x)
      y = y + jax.nn.sigmoid(jnp.einsum("BTH,HO->BTO", x, gate.astype(dt))) * shared
    mask = (jnp.ones((B, T), jnp.float32) if token_mask is None
            else token_mask.astype(jnp.float32))
    self.sow("intermediates", STATS_NAME, layer_stats(logits, probs, idx, keep, mask),
             init_fn=dict, reduce_fn=lambda _, new: new)
    return y


# --------------------------------------------------------------------------------- statistics

def layer_stats(logits: Array, probs: Array, idx: Array, keep: Array, mask: Array
                ) -> dict[str, Array]:
  """One layer's sums over non-padding tokens (mask [B, T]); all f32.

  assigned [E]: top-k choices per expert; prob_sum [E]: router probabilities per expert;
  tokens []: tokens counted; z_sum []: sum of logsumexp(logits)^2; dropped []: assignments
  dropped by the capacity.
  """
  E = probs.shape[-1]
  assigned = jnp.einsum("BTKE,BT->E", jax.nn.one_hot(idx, E, dtype=jnp.float32), mask)
  z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  return {"assigned": assigned,
          "prob_sum": jnp.einsum("BTE,BT->E", probs, mask),
          "tokens": jnp.sum(mask),
          "z_sum": jnp.sum(z * z * mask),
          "dropped": jnp.einsum("BTK,BT->", 1.0 - keep.astype(jnp.float32), mask)}


def _layer_number(key: str) -> int:
  return int(key.split("_")[-1]) if key.startswith("layers_") else -1


def collect_stats(intermediates: Any) -> list[dict[str, Array]]:
  """Every sparse layer's stats from an "intermediates" tree, in layer order (a scanned stack
  contributes one dict whose arrays carry a leading layer axis)."""
  found = []

  def walk(node):
    if not isinstance(node, dict):
      return
    if STATS_NAME in node and isinstance(node[STATS_NAME], dict) and \
        "assigned" in node[STATS_NAME]:
      found.append(node[STATS_NAME])
    for key in sorted((k for k in node if k != STATS_NAME), key=lambda k: (_layer_number(k), k)):
      walk(node[key])

  walk(dict(intermediates))
  return found


def moe_aux(config: Qwen2Config, intermediates: Any) -> dict[str, Array]:
  """The MoE losses and metrics from the stats all sparse layers sowed.

  Returns:
    aux_loss: E * sum_e f_e * P_e, f_e = share of top-k choices (over the k choices) and P_e =
      mean router probability of expert e, both pooled over all sparse layers and non-padding
      tokens (`transformers`' `load_balancing_loss_func`); 0 for a dense model.
    router_z_loss: mean over sparse layers and tokens of logsumexp(router logits)^2.
    expert_load: [S, E] each sparse layer's share of choices per expert (rows sum to 1).
    drop_rate: dropped / all assignments (0 unless `moe_capacity_factor` is set).
  """
  stats = collect_stats(intermediates)
  if not stats:
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "router_z_loss": zero, "drop_rate": zero,
            "expert_load": jnp.zeros((0, config.num_experts), jnp.float32)}
  E, K = config.num_experts, config.num_experts_per_tok
  per_layer = lambda name, width: jnp.concatenate(
      [s[name].reshape(-1, *width) for s in stats], axis=0)
  assigned = per_layer("assigned", (E,))  # [S, E]
  prob_sum = per_layer("prob_sum", (E,))  # [S, E]
  tokens = per_layer("tokens", ())  # [S]
  rows = jnp.maximum(jnp.sum(tokens), 1.0)
  aux = E * jnp.sum((assigned.sum(0) / rows) * (prob_sum.sum(0) / rows))
  return {"aux_loss": aux,
          "router_z_loss": jnp.sum(per_layer("z_sum", ())) / rows,
          "drop_rate": jnp.sum(per_layer("dropped", ())) / (rows * K),
          "expert_load": assigned / jnp.maximum(tokens * K, 1.0)[:, None]}
