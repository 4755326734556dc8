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
  (sparse layers, `qwen2_jax.moe.Qwen2MoeBlock`, instead hold under layers/mlp/:
   router [L, H, E], experts/{gate_proj, up_proj} [L, E, H, F'], experts/down_proj [L, E, F', H],
   shared_expert/{gate_proj, up_proj, down_proj}, shared_expert_gate [L, H, 1].
   A stack mixing dense and sparse layers (mlp_only_layers, decoder_sparse_step > 1) is never
   scanned: its layers are "layers_0", "layers_1", ... whatever scan_layers says.)
  norm/weight                     [H]
  lm_head                         [H, V]         (absent when tie_word_embeddings)

Code outside the model reads this layout only through the functions at the end of this file:
`split_layers` / `join_layers` / `layer_params` / `unstack_layers` (stacked <-> per-layer
params), `layer_intermediates` / `sparse_layer_stats` (what the layers sowed),
`weight_decay_mask`, `head_params` / `head_logits` (the LM head outside the module).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qwen2_jax import attention as attn_lib
from qwen2_jax import dca as dca_lib
from qwen2_jax import moe
from qwen2_jax import remat as remat_lib
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import RMSNorm, SwiGLU, apply_rope, dtype_of, rope_cos_sin, rope_inv_freq
from qwen2_jax.layers import PackedKernel, kernel_param, matmul, packed_kernel, weight_init

Array = jax.Array

BTH = ("activation_batch", "activation_length", "activation_embed")
BTND = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BTKD = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


class KVCache(NamedTuple):
  """Rotated keys / values of earlier tokens, for cached decoding (`qwen2_jax.infer`).

  Slot j of row b holds row b's token j; slots [0, lengths[b]) are valid. The model reads the
  cache and returns the new tokens' keys / values; writing them back is the caller's job.
  """
  k: Array        # [L, B, S, K, D]
  v: Array        # [L, B, S, K, D]
  lengths: Array  # [B] int32, tokens already cached per row


class PagedKVCache(NamedTuple):
  """A paged KV cache and one step's ragged token batch (continuous batching, `qwen2_jax.infer`).

  The model runs a flat batch of T tokens from S sequences (input_ids / positions [1, T], the
  positions being each token's index in its sequence); sequence i's tokens are
  [cu_q_lens[i], cu_q_lens[i + 1]), its last ones. Page j of sequence i (page_indices[i, j])
  holds its tokens [j * page_size, (j + 1) * page_size). Each layer's new keys / values go to
  `slot_mapping` (page * page_size + offset; out-of-range slots, e.g. of padding tokens, are
  dropped) and each layer attends (`attention.paged_attention`); off TPU, with unrolled layers
  and no DCA, all layers' keys / values are written after the last layer, in one scatter. The
  model returns (logits, (k, v)) with the updated pools.
  """
  k: Array             # [L, P, K, page_size, D] in the compute dtype
  v: Array             # [L, P, K, page_size, D]
  slot_mapping: Array  # [T] int32
  kv_lens: Array       # [S] int32 cached tokens per sequence, this step's included
  page_indices: Array  # [S, pages_per_seq] int32
  cu_q_lens: Array     # [S + 1] int32
  num_seqs: Array      # [1] int32: rows >= num_seqs are unused


class PagedMeta(NamedTuple):
  """What one layer needs of a `PagedKVCache` besides its pools; `layer` is the layer's index
  into full [L, ...] pools, or None when the layer is handed its own [P, ...] slice. With
  `write` False the layer leaves the pools as they are and returns its new keys / values
  [T, K, D] in their place (`attention.paged_attention`); the caller writes them."""
  slot_mapping: Array
  kv_lens: Array
  page_indices: Array
  cu_q_lens: Array
  num_seqs: Array
  layer: int | None = None
  write: bool = True


def _paged_out_proj(out: Array, wo: Array | PackedKernel) -> Array:
  """o_proj of a paged step's attention output [T, N, D] -> [1, T, H], as one [T, N*D] x
  [N*D, H] matmul: with the einsum over (N, D), XLA:CPU transposed the weight (a copy per layer
  per step, 14% of a Qwen2-0.5B decode step) instead of the 16-row activation."""
  T, N, D = out.shape
  if isinstance(wo, PackedKernel):
    return matmul(out.reshape(T, N * D), wo, out.dtype)[None]
  return jnp.dot(out.reshape(T, N * D), wo.reshape(N * D, wo.shape[-1]))[None]


def _out_proj(out: Array, wo: Array | PackedKernel) -> Array:
  """out [B, T, N, D] through o_proj [N, D, H] -> [B, T, H]."""
  if isinstance(wo, PackedKernel):
    return matmul(out.reshape(*out.shape[:-2], -1), wo, out.dtype)
  return jnp.einsum("BTND,NDH->BTH", out, wo)


def _in_proj(x: Array, w: Array | PackedKernel, eq: str, heads: int, dt) -> Array:
  """x [B, T, H] through a q/k/v kernel [H, heads, D] -> [B, T, heads, D]."""
  if isinstance(w, PackedKernel):
    return matmul(x, w, dt).reshape(*x.shape[:-1], heads, w.n // heads)
  return jnp.einsum(eq, x, w)


class Qwen2Attention(nn.Module):
  """GQA self-attention with q/k/v biases, RoPE, and no o_proj bias."""
  config: Qwen2Config

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, q_index: Array,
               segment_ids: Array | None, sliding_window: Array | int | None = None,
               cache: tuple[Array, Array, Array] | None = None):
    """Returns out [B, T, H]; with `cache` = (k [B, S, K, D], v, valid [B, S]): (out, (k, v) new)."""
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    H, N, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    init, zeros = weight_init(cfg), nn.initializers.zeros
    p = lambda name, init_fn, shape, axes: self.param(
        name, nn.with_logical_partitioning(init_fn, axes), shape, pdt).astype(dt)

    def w(name, shape, axes, in_dims=1):  # a kernel, or its packed matrix (CPU engines)
      kernel = kernel_param(self, name, init, shape, axes, pdt, in_dims)
      return kernel if isinstance(kernel, PackedKernel) else kernel.astype(dt)
    qkv = packed_kernel(self, "qkv_proj", (N + 2 * K) * D)
    if qkv is None:
      wq = w("q_proj", (H, N, D), ("embed", "q_heads", "head_dim"))
    bq = p("q_bias", zeros, (N, D), ("q_heads", "head_dim"))
    if qkv is None:
      wk = w("k_proj", (H, K, D), ("embed", "kv_heads", "head_dim"))
    bk = p("k_bias", zeros, (K, D), ("kv_heads", "head_dim"))
    if qkv is None:
      wv = w("v_proj", (H, K, D), ("embed", "kv_heads", "head_dim"))
    bv = p("v_bias", zeros, (K, D), ("kv_heads", "head_dim"))
    wo = w("o_proj", (N, D, H), ("q_heads", "head_dim", "embed"), in_dims=2)

    x = x.astype(dt)
    if qkv is None:
      q = _in_proj(x, wq, "BTH,HND->BTND", N, dt)  # [B, T, N, D]
      k = _in_proj(x, wk, "BTH,HKD->BTKD", K, dt)  # [B, T, K, D]
      v = _in_proj(x, wv, "BTH,HKD->BTKD", K, dt)  # [B, T, K, D]
    else:  # the engines' fused packed kernel
      q, k, v = jnp.split(matmul(x, qkv, dt).reshape(*x.shape[:-1], N + 2 * K, D),
                          (N, N + K), axis=-2)
    q, k, v = q + bq, k + bk, v + bv
    v = checkpoint_name(nn.with_logical_constraint(v, BTKD), "value_proj")
    if cfg.dual_chunk is not None:  # cos / sin [4, B, T, D]: keys, then three query rotations
      k = checkpoint_name(nn.with_logical_constraint(apply_rope(k, cos[0], sin[0]), BTKD),
                          "key_proj")
      qs = tuple(checkpoint_name(nn.with_logical_constraint(apply_rope(q, cos[i], sin[i]), BTND),
                                 "query_proj") for i in (1, 2, 3))
      out = self._dual_chunk(qs, k, v, q_index, segment_ids, cache)
      if cache is not None and isinstance(cache[2], PagedMeta):
        out, pages = out
        return _paged_out_proj(out, wo), pages
      out = checkpoint_name(nn.with_logical_constraint(out, BTND), "context")
      out = checkpoint_name(_out_proj(out, wo), "out_proj")
      return out if cache is None else (out, (k, v))
    q = checkpoint_name(nn.with_logical_constraint(apply_rope(q, cos, sin), BTND), "query_proj")
    k = checkpoint_name(nn.with_logical_constraint(apply_rope(k, cos, sin), BTKD), "key_proj")

    if cache is not None and isinstance(cache[2], PagedMeta):
      out, pages = attn_lib.paged_attention(q[0], k[0], v[0], *cache, scale=D ** -0.5,
                                            sliding_window=sliding_window,
                                            impl=cfg.attention_impl)
      return _paged_out_proj(out, wo), pages
    if cache is None:
      out = attn_lib.causal_self_attention(q, k, v, q_index, segment_ids, impl=cfg.attention_impl,
                                           scale=D ** -0.5, sliding_window=sliding_window)
    else:
      k_cache, v_cache, cache_valid = cache
      out = attn_lib.cached_attention(q, k, v, k_cache, v_cache, q_index, cache_valid,
                                      scale=D ** -0.5, sliding_window=sliding_window)
    out = checkpoint_name(nn.with_logical_constraint(out, BTND), "context")
    out = checkpoint_name(_out_proj(out, wo), "out_proj")
    return out if cache is None else (out, (k, v))

  def _dual_chunk(self, qs, k, v, q_index, segment_ids, cache):
    """Dual Chunk Attention (`qwen2_jax.dca`) of the three rotated queries."""
    cfg = self.config
    if segment_ids is not None:
      raise ValueError("dual_chunk_attention_config does not support packed rows (segment_ids)")
    common = dict(impl=cfg.attention_impl, chunk_len=dca_lib.chunk_length(cfg),
                  scale=cfg.head_size ** -0.5)
    if cache is None:
      return dca_lib.dual_chunk_self_attention(qs, k, v, **common)
    if isinstance(cache[2], PagedMeta):
      return dca_lib.paged_dual_chunk_attention(tuple(q[0] for q in qs), k[0], v[0], *cache,
                                                chunk_len=common["chunk_len"],
                                                scale=common["scale"])
    return dca_lib.cached_dual_chunk_attention(qs, k, v, *cache[:2], q_index, cache[2], **common)


class Qwen2DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""
  config: Qwen2Config
  sparse: bool = False  # the MLP is the MoE block (config.is_sparse_layer of this layer)

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, q_index: Array,
               segment_ids: Array | None, sliding_window: Array | None,
               cache_kv: tuple[Array, Array] | None = None, cache_valid: Array | None = None):
    """`sliding_window`: this layer's window (a scalar; huge = full attention) or None.

    With `cache_kv` (this layer's cached k, v [B, S, K, D]) and `cache_valid` [B, S], returns
    (x, (k, v)) with the new tokens' k, v [B, T, K, D]; otherwise (x, None).
    """
    cfg = self.config
    x = checkpoint_name(x, "decoder_layer_input")  # remat policies may save or offload it
    h = RMSNorm(cfg, name="input_layernorm")(x)
    cache = None if cache_kv is None else (*cache_kv, cache_valid)
    h = Qwen2Attention(cfg, name="self_attn")(h, cos, sin, q_index, segment_ids, sliding_window,
                                             cache)
    new_kv = None
    if cache is not None:
      h, new_kv = h
    x = nn.with_logical_constraint(x + h, BTH)
    h = RMSNorm(cfg, name="post_attention_layernorm")(x)
    # The seam for Qwen2-MoE: sparse layers swap this block for the MoE block, which sows its
    # router statistics (padding, segment id 0, excluded) into "intermediates".
    if self.sparse:
      h = moe.Qwen2MoeBlock(cfg, name="mlp")(h, None if segment_ids is None else segment_ids > 0)
    else:
      h = SwiGLU(cfg, cfg.intermediate_size, name="mlp")(h)
    x = nn.with_logical_constraint(x + h, BTH)
    return x, new_kv


def _layers_scannable(cfg: Qwen2Config) -> bool:
  """nn.scan needs layers with identical params: no dense/MoE mix."""
  return len({cfg.is_sparse_layer(i) for i in range(cfg.num_hidden_layers)}) == 1


def layer_windows(cfg: Qwen2Config) -> Array | None:
  """Per-layer sliding window [L] (int32; a huge value where the layer attends fully), or None."""
  if not cfg.use_sliding_window:
    return None
  full = jnp.iinfo(jnp.int32).max
  return jnp.array([cfg.sliding_window if cfg.uses_sliding_window(i) else full
                    for i in range(cfg.num_hidden_layers)], dtype=jnp.int32)


class Qwen2ForCausalLM(nn.Module):
  """Embedding, L decoder layers, final norm, LM head (tied or untied)."""
  config: Qwen2Config
  # False: stop after the final norm and return its hidden states [B, T, H] where logits would
  # be (for a loss that applies the head itself, chunk by chunk: `head_logits`).
  apply_head: bool = True

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array, segment_ids: Array | None,
               cache: KVCache | None = None, logits_index: Array | None = None):
    """Logits [B, T, V] of input_ids [B, T] at RoPE positions [B, T].

    Cached decoding (`qwen2_jax.infer`): with `cache`, the T tokens of row b are its tokens
    cache.lengths[b] + 0..T-1, attending to the valid cache slots and causally to each other;
    returns (logits, (k, v)) with the new keys / values [L, B, T, K, D]. `logits_index` [B, T']
    picks the positions whose logits are computed (e.g. each row's last prompt token).
    With Dual Chunk Attention (`config.dual_chunk_attention_config`) the RoPE positions are the
    token indices (`qwen2_jax.dca`) and `positions` is not used.
    """
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    B, T = input_ids.shape
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                     embedding_init=nn.with_logical_partitioning(weight_init(cfg),
                                                                 ("vocab", "embed")),
                     name="embed_tokens")
    x = nn.with_logical_constraint(embed(input_ids), BTH)  # [B, T, H]
    q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache_kv = cache_valid = None
    paged = isinstance(cache, PagedKVCache)
    if paged:  # a flat ragged batch [1, T]; positions are the token indices
      q_index = positions.astype(jnp.int32)
      cache_kv = (cache.k, cache.v)
      cache_valid = PagedMeta(cache.slot_mapping, cache.kv_lens, cache.page_indices,
                              cache.cu_q_lens, cache.num_seqs)
    elif cache is not None:
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
      q_index = cache.lengths.astype(jnp.int32)[:, None] + q_index  # [B, T]
      S = cache.k.shape[2]
      cache_valid = jnp.arange(S, dtype=jnp.int32)[None, :] < cache.lengths[:, None]  # [B, S]
      cache_kv = (cache.k, cache.v)
    if cfg.dual_chunk is not None:  # DCA rotates by token index: [4, B, T, D] tables
      cos, sin = dca_lib.rope_tables(cfg, q_index, dt)
    else:
      inv_freq, attention_factor = rope_inv_freq(cfg)
      cos, sin = rope_cos_sin(positions, inv_freq, attention_factor, dt)  # [B, T, D]

    layer_cls = Qwen2DecoderLayer
    windows = layer_windows(cfg)
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(layer_cls, policy=remat_lib.policy(cfg.remat_policy),
                           prevent_cse=not cfg.scan_layers)
    if stacks_layers(cfg):
      stack = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                               nn.broadcast if windows is None else 0, 0, nn.broadcast),
                      length=cfg.num_hidden_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = stack(cfg, sparse=cfg.is_sparse_layer(0), name="layers")(
          x, cos, sin, q_index, segment_ids, windows, cache_kv, cache_valid)
    else:
      # cos / sin once for all layers: without the barrier XLA:CPU fused the sine and cosine
      # into every layer's RoPE loops and evaluated them again per head, half and layer. On
      # every backend (the tables are [B, T, head_dim], small beside a layer's activations).
      cos, sin = jax.lax.optimization_barrier((cos, sin))
      new_kvs = []
      # Paged, where attention can read the step's keys / values without the pools holding them
      # (`attention.paged_writes_deferred`): the layers leave the pools alone and all layers'
      # keys / values are written at the end, in one scatter (per-layer scatters into the full
      # pools cost XLA:CPU a copy of the pools each).
      deferred = paged and cfg.dual_chunk is None and attn_lib.paged_writes_deferred()
      for i in range(cfg.num_hidden_layers):
        window = None if windows is None else windows[i]
        layer_kv = None if cache_kv is None else (cache_kv[0][i], cache_kv[1][i])
        layer_meta = cache_valid
        if paged:  # every layer updates the full pools in place (no per-layer copies)
          layer_kv, layer_meta = cache_kv, cache_valid._replace(layer=i, write=not deferred)
        x, kv = layer_cls(cfg, sparse=cfg.is_sparse_layer(i), name=f"layers_{i}")(
            x, cos, sin, q_index, segment_ids, window, layer_kv, layer_meta)
        if paged and not deferred:
          cache_kv = kv
        new_kvs.append(kv)
      if deferred:
        new_k, new_v = (jnp.stack(a) for a in zip(*new_kvs))  # [L, T, K, D]
        # The scatter must follow every layer's reads of the pools, or XLA copies the pools to
        # write them in place: tie the new keys / values to the last layer's output.
        x, new_k, new_v = jax.lax.optimization_barrier((x, new_k, new_v))
        new_kv = attn_lib.write_pages_all_layers(new_k, new_v, *cache_kv, cache.slot_mapping)
      elif paged:
        new_kv = cache_kv
      else:
        new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_kvs)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[..., None].astype(jnp.int32), axis=1)  # [B, T', H]
    x = RMSNorm(cfg, name="norm")(x)
    if not self.apply_head:
      return x if cache is None else (x, new_kv)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)  # [B, T, V]
    else:
      kernel = kernel_param(self, "lm_head", weight_init(cfg), (cfg.hidden_size, cfg.vocab_size),
                            ("embed", "vocab"), pdt)
      logits = matmul(x, kernel, dt)  # [B, T, V]
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                 "activation_vocab"))
    if cfg.logits_dtype is not None:
      logits = logits.astype(cfg.logits_dtype)
    return logits if cache is None else (logits, new_kv)


# ------------------------------------------------------------- the param and intermediates layout

def stacks_layers(config: Qwen2Config) -> bool:
  """True when the layers are one scanned stack ("layers", leaves [L, ...]); False when each
  layer has its own subtree ("layers_0", "layers_1", ...)."""
  return config.scan_layers and _layers_scannable(config)


def layer_param_prefix(config: Qwen2Config, i: int) -> tuple[Any, ...]:
  """Where layer i's params live: ("layers", i) as a stacked slice, or ("layers_i",)."""
  return ("layers", i) if stacks_layers(config) else (f"layers_{i}",)


def _layer_key(key: str) -> bool:
  return key == "layers" or (key.startswith("layers_") and key[len("layers_"):].isdigit())


def split_layers(params: dict[str, Any], config: Qwen2Config
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(the params outside the decoder layers, each layer's params in layer order); a stacked
  layout is sliced (views for NumPy leaves). Works on any tree laid out like the params (optimizer
  moments, shapes)."""
  rest = {k: v for k, v in params.items() if not _layer_key(k)}
  L = config.num_hidden_layers
  if stacks_layers(config):
    stacked = params["layers"]
    return rest, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]
  return rest, [params[f"layers_{i}"] for i in range(L)]


def join_layers(rest: dict[str, Any], layers: list[dict[str, Any]], config: Qwen2Config
                ) -> dict[str, Any]:
  """The inverse of `split_layers`: the params in `config`'s layout (layers stacked on a leading
  L axis when `stacks_layers(config)`; NumPy leaves stay NumPy)."""
  if len(layers) != config.num_hidden_layers:
    raise ValueError(f"{len(layers)} layers for a config of {config.num_hidden_layers}")
  out = dict(rest)
  if stacks_layers(config):
    stack = lambda *a: np.stack(a) if isinstance(a[0], np.ndarray) else jnp.stack(a)
    out["layers"] = jax.tree.map(stack, *layers)
  else:
    out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return out


def layer_params(params: dict[str, Any], config: Qwen2Config, i: int) -> dict[str, Any]:
  """Layer i's params (a slice of the stack when the layers are stacked)."""
  if stacks_layers(config):
    return jax.tree.map(lambda a: a[i], params["layers"])
  return params[f"layers_{i}"]


def unstack_layers(params: dict[str, Any], config: Qwen2Config) -> dict[str, Any]:
  """The same params with one subtree per layer ("layers_0", ...), the layout of
  `config.replace(scan_layers=False)`; params already laid out so are returned as they are."""
  return join_layers(*split_layers(params, config), config.replace(scan_layers=False))


def layer_intermediates(intermediates: dict[str, Any], config: Qwen2Config
                        ) -> list[dict[str, Any]]:
  """What each decoder layer sowed into "intermediates" (`Module.sow`), in layer order: layer
  i's subtree (sliced out of a scanned stack), {} for a layer that sowed nothing."""
  L = config.num_hidden_layers
  if stacks_layers(config):
    stacked = intermediates.get("layers", {})
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]
  return [intermediates.get(f"layers_{i}", {}) for i in range(L)]


def sparse_layer_stats(intermediates: dict[str, Any], config: Qwen2Config
                       ) -> list[dict[str, Any]]:
  """The router statistics (`moe.layer_stats`) every sparse layer sowed, in layer order."""
  return [layer["mlp"][moe.STATS_NAME] for layer in layer_intermediates(intermediates, config)
          if moe.STATS_NAME in layer.get("mlp", {})]


def head_params(params: dict[str, Any], config: Qwen2Config) -> dict[str, Any]:
  """The subtree of `params` the LM head reads (`lm_head`, or the embedding when tied); what
  `head_logits` takes."""
  if config.tie_word_embeddings:
    return {"embed_tokens": {"embedding": params["embed_tokens"]["embedding"]}}
  return {"lm_head": params["lm_head"]}


def head_logits(params: dict[str, Any], config: Qwen2Config, x: Array) -> Array:
  """Logits [..., V] of final-norm hidden states x [..., H], as `Qwen2ForCausalLM` makes them:
  the compute dtype (then `logits_dtype`), the embedding as the head when tied. `params`: the
  params or their `head_params`."""
  dt = dtype_of(config.dtype)
  if config.tie_word_embeddings:
    w = params["embed_tokens"]["embedding"].astype(dt)  # [V, H]
    logits = jnp.einsum("...H,VH->...V", x.astype(dt), w)
  else:
    logits = jnp.einsum("...H,HV->...V", x.astype(dt), params["lm_head"].astype(dt))
  return logits if config.logits_dtype is None else logits.astype(config.logits_dtype)


# The attention biases are 2-D ([N, D], [K, D]), but they are one bias vector per head.
_PER_HEAD_VECTORS = ("q_bias", "k_bias", "v_bias")


def weight_decay_mask(params: dict[str, Any]) -> Any:
  """True for the params that get weight decay: the matmul weights. False for the norm scales,
  the attention biases and the token embedding (a lookup table; a tied LM head shares it).

  By rank: a param decays iff it is at least 2-D within one layer (the leading L axis of a
  scanned "layers" stack not counted), except the embedding and the per-head bias vectors. Works
  on any tree laid out like the params (e.g. optimizer moments); leaves need only a `.shape`.
  """
  def decays(path, leaf) -> bool:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path] or [""]
    if keys[0] == "embed_tokens" or keys[-1] in _PER_HEAD_VECTORS:
      return False
    return len(leaf.shape) - (keys[0] == "layers") >= 2
  return jax.tree_util.tree_map_with_path(decays, params)
