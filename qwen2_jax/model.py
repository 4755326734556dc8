"""The Qwen2 decoder in Flax Linen: attention, decoder layer, the causal LM.

Params are an explicit pytree (see `qwen2_jax.api` for `init_params` / `forward`). Every param
and key activation carries logical axis names; `qwen2_jax.sharding` maps them to mesh axes.
Param tree (scan_layers=True stacks every per-layer leaf on a leading L axis under "layers";
scan_layers=False names them "layers_0", "layers_1", ...):

  embed_tokens/embedding          [V, H]
  layers/input_layernorm/weight   [L, H]
  layers/self_attn/q_proj         [L, H, N, D]   .../q_bias [L, N, D]
  layers/self_attn/k_proj, v_proj [L, H, K, D]   .../k_bias, v_bias [L, K, D]
  layers/self_attn/o_proj         [L, N, D, H]
  layers/post_attention_layernorm/weight [L, H]
  layers/mlp/{gate_proj, up_proj} [L, H, F]      down_proj [L, F, H]
  norm/weight                     [H]
  lm_head                         [H, V]         (absent when tie_word_embeddings)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwen2_jax import attention as attn_lib
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import RMSNorm, SwiGLU, apply_rope, dtype_of, rope_cos_sin, rope_inv_freq
from qwen2_jax.layers import weight_init

Array = jax.Array

BTH = ("activation_batch", "activation_length", "activation_embed")
BTND = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTKD = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


class Qwen2Attention(nn.Module):
  """GQA self-attention with q/k/v biases, RoPE, and no o_proj bias."""
  config: Qwen2Config
  sliding_window: int | None = None

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, q_index: Array,
               segment_ids: Array | None) -> Array:
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    H, N, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    init, zeros = weight_init(cfg), nn.initializers.zeros
    p = lambda name, init_fn, shape, axes: self.param(
        name, nn.with_logical_partitioning(init_fn, axes), shape, pdt).astype(dt)
    wq = p("q_proj", init, (H, N, D), ("embed", "q_heads", "head_dim"))
    bq = p("q_bias", zeros, (N, D), ("q_heads", "head_dim"))
    wk = p("k_proj", init, (H, K, D), ("embed", "kv_heads", "head_dim"))
    bk = p("k_bias", zeros, (K, D), ("kv_heads", "head_dim"))
    wv = p("v_proj", init, (H, K, D), ("embed", "kv_heads", "head_dim"))
    bv = p("v_bias", zeros, (K, D), ("kv_heads", "head_dim"))
    wo = p("o_proj", init, (N, D, H), ("q_heads", "head_dim", "embed"))

    x = x.astype(dt)
    q = jnp.einsum("BTH,HND->BTND", x, wq) + bq  # [B, T, N, D]
    k = jnp.einsum("BTH,HKD->BTKD", x, wk) + bk  # [B, T, K, D]
    v = jnp.einsum("BTH,HKD->BTKD", x, wv) + bv  # [B, T, K, D]
    q = checkpoint_name(nn.with_logical_constraint(apply_rope(q, cos, sin), BTND), "query_proj")
    k = checkpoint_name(nn.with_logical_constraint(apply_rope(k, cos, sin), BTKD), "key_proj")
    v = checkpoint_name(nn.with_logical_constraint(v, BTKD), "value_proj")

    mask = attn_lib.attention_mask(q_index, q_index, segment_ids, segment_ids,
                                   sliding_window=self.sliding_window)
    out = attn_lib.xla_attention(q, k, v, mask, scale=D ** -0.5)  # [B, T, N, D]
    out = nn.with_logical_constraint(out, BTND)
    return jnp.einsum("BTND,NDH->BTH", out, wo)


class Qwen2DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""
  config: Qwen2Config
  sliding_window: int | None = None  # set by the parent for layers that use the window

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, q_index: Array,
               segment_ids: Array | None):
    cfg = self.config
    h = RMSNorm(cfg, name="input_layernorm")(x)
    h = Qwen2Attention(cfg, sliding_window=self.sliding_window, name="self_attn")(h, cos, sin, q_index,
                                                                     segment_ids)
    x = nn.with_logical_constraint(x + h, BTH)
    h = RMSNorm(cfg, name="post_attention_layernorm")(x)
    # The seam for Qwen2-MoE: sparse layers swap this block for the MoE block.
    h = SwiGLU(cfg, cfg.intermediate_size, name="mlp")(h)
    x = nn.with_logical_constraint(x + h, BTH)
    return x, None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"),
}


def _layers_scannable(cfg: Qwen2Config) -> bool:
  """nn.scan needs identical layers: no per-layer sliding window split, no dense/MoE mix."""
  if cfg.use_sliding_window and 0 < cfg.max_window_layers < cfg.num_hidden_layers:
    return False
  return len({cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)}) == 1


class Qwen2ForCausalLM(nn.Module):
  """Embedding, L decoder layers, final norm, LM head (tied or untied)."""
  config: Qwen2Config

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array, segment_ids: Array | None) -> Array:
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    B, T = input_ids.shape
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                     embedding_init=nn.with_logical_partitioning(weight_init(cfg),
                                                                 ("vocab", "embed")),
                     name="embed_tokens")
    x = nn.with_logical_constraint(embed(input_ids), BTH)  # [B, T, H]
    inv_freq, attention_factor = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, dt)  # [B, T, D]
    q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

    layer_cls = Qwen2DecoderLayer
    window = lambda i: cfg.sliding_window if cfg.uses_sliding_window(i) else None
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers and _layers_scannable(cfg):
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, window(0), name="layers")(x, cos, sin, q_index, segment_ids)
    else:
      for i in range(cfg.num_hidden_layers):
        x, _ = layer_cls(cfg, window(i), name=f"layers_{i}")(x, cos, sin, q_index, segment_ids)
    x = RMSNorm(cfg, name="norm")(x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)  # [B, T, V]
    else:
      kernel = self.param("lm_head", nn.with_logical_partitioning(weight_init(cfg),
                                                                  ("embed", "vocab")),
                          (cfg.hidden_size, cfg.vocab_size), pdt)
      logits = jnp.einsum("BTH,HV->BTV", x, kernel.astype(dt))
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                 "activation_vocab"))
    if cfg.logits_dtype is not None:
      logits = logits.astype(cfg.logits_dtype)
    return logits


def layer_param_prefix(config: Qwen2Config, i: int) -> tuple[Any, ...]:
  """Where layer i's params live: ("layers", i) as a stacked slice, or ("layers_i",)."""
  if config.scan_layers and _layers_scannable(config):
    return ("layers", i)
  return (f"layers_{i}",)
