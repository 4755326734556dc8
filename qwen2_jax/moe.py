"""The Qwen2-MoE sparse block: router, top-k, routed experts (dropless dispatch), shared expert.

Shape letters: B batch, T length, N = B*T tokens, H hidden, E experts, K = num_experts_per_tok,
A = N*K token-expert assignments, F expert width (moe_intermediate_size).

Numerics follow `transformers`' Qwen2MoeSparseMoeBlock
(`transformers/models/qwen2_moe/modeling_qwen2_moe.py`): router logits in the activation dtype,
softmax in f32, top-k, optional renormalisation of the k weights, weights cast back to the
activation dtype; y = sum_k w_k * expert_k(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x).

Routed experts, chosen by `config.moe_impl` in `routed_experts` (the one place that picks):
  dense       every expert on every token, combined with the (mostly zero) routing weights: the
              obviously-correct reference, E/K times the FLOPs.
  ragged_dot  dropless: sort the A assignments by expert, three grouped matmuls
              (`jax.lax.ragged_dot`), unsort, weighted sum over the K choices.
  pallas      the same with this project's Pallas TPU kernel (`qwen2_jax.kernels.gmm`; Mosaic
              on TPU, the Pallas interpreter elsewhere).
The dispatch primitives (capacity, sort / unsort, the grouped matmul) are in
`qwen2_jax.moe_dispatch`.
Under a mesh, ragged_dot and pallas run inside `jax.shard_map` with experts split over the
`expert` mesh axis and tokens exchanged by all-to-all (`qwen2_jax.expert_parallel`).

Capacity mode (`config.moe_capacity_factor`, None = dropless): each expert takes at most
ceil(factor * A / E) assignments of a token group (all tokens of the call; the tokens of one
device under a mesh), first come first served in token order; a dropped assignment contributes
0 (the token keeps its residual and the shared expert). All three implementations drop the same
assignments.

Statistics for the losses: each sparse layer sows `layer_stats` (sums over non-padding tokens)
into the "intermediates" collection; `moe_aux` turns those of all layers (read back in layer order
by `qwen2_jax.model.sparse_layer_stats`) into the load-balancing loss (`transformers`' pooled
Switch formula), the router z-loss, per-expert load and the drop rate.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qwen2_jax import expert_parallel, moe_dispatch
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import SwiGLU, dtype_of, weight_init

Array = jax.Array

STATS_NAME = "moe"  # the name sown into "intermediates" by every sparse layer


# --------------------------------------------------------------------------- routed experts

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
  if impl != "dense" and expert_parallel.current_mesh() is not None:
    return expert_parallel.sharded_routed_experts(
        x, idx, weights, w_gate, w_up, w_down, impl=impl, capacity_factor=capacity_factor)
  return moe_dispatch.local_routed_experts(x, idx, weights, w_gate, w_up, w_down, impl=impl,
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
  """Router + top-k routed experts + gated shared expert; sows `layer_stats` (see `moe_aux`).

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


def moe_aux(config: Qwen2Config, stats: list[dict[str, Array]]) -> dict[str, Array]:
  """The MoE losses and metrics from the `layer_stats` of every sparse layer, in layer order.

  Returns:
    aux_loss: E * sum_e f_e * P_e, f_e = share of top-k choices (over the k choices) and P_e =
      mean router probability of expert e, both pooled over all sparse layers and non-padding
      tokens (`transformers`' `load_balancing_loss_func`); 0 for a dense model.
    router_z_loss: mean over sparse layers and tokens of logsumexp(router logits)^2.
    expert_load: [S, E] each sparse layer's share of choices per expert (rows sum to 1).
    drop_rate: dropped / all assignments (0 unless `moe_capacity_factor` is set).
  """
  if not stats:
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "router_z_loss": zero, "drop_rate": zero,
            "expert_load": jnp.zeros((0, config.num_experts), jnp.float32)}
  E, K = config.num_experts, config.num_experts_per_tok
  per_layer = lambda name: jnp.stack([s[name] for s in stats])
  assigned = per_layer("assigned")  # [S, E]
  prob_sum = per_layer("prob_sum")  # [S, E]
  tokens = per_layer("tokens")  # [S]
  rows = jnp.maximum(jnp.sum(tokens), 1.0)
  aux = E * jnp.sum((assigned.sum(0) / rows) * (prob_sum.sum(0) / rows))
  return {"aux_loss": aux,
          "router_z_loss": jnp.sum(per_layer("z_sum")) / rows,
          "drop_rate": jnp.sum(per_layer("dropped")) / (rows * K),
          "expert_load": assigned / jnp.maximum(tokens * K, 1.0)[:, None]}
