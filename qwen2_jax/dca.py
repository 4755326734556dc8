"""Dual Chunk Attention (DCA; ChunkLlama, arXiv 2402.17463; Qwen2 and Qwen2.5-1M long context).

Exact softmax attention over every earlier key, split into three parts that rotate the query
at different positions, so no relative distance exceeds what the model saw in pretraining
(ChunkLlama, arXiv 2402.17463; the Qwen2 technical report, arXiv 2407.10671). C = chunk_size,
w = local_size, s = C - w is the chunk length; token i lies in chunk i // s. Every key j is
rotated at position j mod s; query i is rotated at
  intra       keys of its own chunk, causal        i mod s
  successive  every key of the previous chunk      min(i mod s + s, C)
  inter       every key of all earlier chunks      min(2s - 1, C)   (one constant)
Each part returns (out, logsumexp) and `attention.merge_attention` combines them exactly. A
sequence that fits in one chunk is ordinary causal attention.

Long inputs: when `original_max_position_embeddings` L0 > 0, query i's logits are multiplied by
f^2, f = max(1, 0.1 ln((i + 1) / L0) + 1) (vLLM's factor, which vLLM computes from the whole
prompt length; here each query uses its own length i + 1, so the last query of a prefill gets
vLLM's value, and prefill and token-by-token decoding agree exactly). f^2 is folded into the
query rotation tables, like YaRN's attention factor.

Positions are token indices (RoPE positions are derived from them here; the model's `positions`
argument is not used): packed rows (segment ids) are not supported.

Implementations: `dual_chunk_attention_reference` (plain jnp, any query / key indices: the test
oracle and the XLA path, also used against the KV cache when decoding) and the Pallas path, which
runs the three parts through the flash kernel (`kernels.flash_attention`) with its logsumexp:
intra as one causal call over the chunks folded into the batch, successive as one
non-causal call pairing chunk c with chunk c - 1, inter as one non-causal call per chunk c >= 2
over keys [0, (c - 1) s). Memory stays linear in T; every call is differentiable.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from qwen2_jax.attention import layer_pages, merge_attention, resolve_impl, write_pages
from qwen2_jax.config import Qwen2Config
from qwen2_jax.kernels import flash_attention as flash_lib
from qwen2_jax.kernels import ragged_paged_attention as rpa
from qwen2_jax.layers import rope_cos_sin, rope_inv_freq

Array = jax.Array

_MASK_LSE = -0.7 * float(jnp.finfo(jnp.float32).max)  # lse of a query that sees no key


def chunk_length(config: Qwen2Config) -> int:
  """s = chunk_size - local_size of a DCA config."""
  chunk_size, local_size, _ = config.dual_chunk
  return chunk_size - local_size


def query_positions(index: Array, chunk_size: int, local_size: int) -> tuple[Array, Array, Array]:
  """RoPE positions [B, T] of the intra, successive and inter queries at token indices [B, T]."""
  s = chunk_size - local_size
  r = index % s
  return r, jnp.minimum(r + s, chunk_size), jnp.full_like(index, min(2 * s - 1, chunk_size))


def logit_factor(index: Array, original: int) -> Array:
  """f^2 [B, T] (f32): the long-input logit multiplier of queries at token indices [B, T]."""
  if not original:
    return jnp.ones(index.shape, jnp.float32)
  f = jnp.maximum(1.0, 0.1 * jnp.log((index + 1).astype(jnp.float32) / original) + 1.0)
  return f * f


def rope_tables(config: Qwen2Config, index: Array, dtype) -> tuple[Array, Array]:
  """cos, sin [4, B, T, D]: the keys' rotation, then the intra / successive / inter queries'
  (those three include the logit factor f^2), for tokens at indices [B, T]."""
  chunk_size, local_size, original = config.dual_chunk
  inv_freq, _ = rope_inv_freq(config)  # plain RoPE: the config forbids rope_scaling with DCA
  positions = jnp.stack([index % (chunk_size - local_size),
                         *query_positions(index, chunk_size, local_size)])  # [4, B, T]
  cos, sin = rope_cos_sin(positions, inv_freq, 1.0, jnp.float32)  # [4, B, T, D]
  f2 = logit_factor(index, original)  # [B, T]
  gain = jnp.concatenate([jnp.ones((1, *f2.shape)), jnp.broadcast_to(f2, (3, *f2.shape))])
  gain = gain[..., None]  # [4, B, T, 1]
  return (cos * gain).astype(dtype), (sin * gain).astype(dtype)


# ------------------------------------------------------------------------------ the reference

def dual_chunk_attention_reference(qs, k: Array, v: Array, q_index: Array, kv_index: Array,
                                   kv_valid: Array | None = None, *, chunk_len: int,
                                   scale: float, return_lse: bool = False):
  """DCA written out: each (query, key) pair takes its logit from the part it belongs to.

  Args:
    qs: (q_intra, q_succ, q_inter), each [B, T, N, D], rotated as the module docstring says.
    k, v: [B, S, K, D] keys (rotated at kv_index mod s) / values; N % K == 0.
    q_index, kv_index: [B, T] / [B, S] token indices; key j is visible to query i iff
      kv_index[j] <= q_index[i] (and kv_valid[j]).
    kv_valid: optional [B, S] bool.
    chunk_len: s = chunk_size - local_size. scale: logit multiplier.
    return_lse: also return the logsumexp [B, T, N] (f32; a very negative constant for a query
      that sees no key, whose output is 0).

  Returns:
    out [B, T, N, D] in q's dtype (scores and softmax in f32), and lse when asked.
  """
  B, T, N, D = qs[0].shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  visible = kv_index[:, None, :] <= q_index[:, :, None]  # [B, T, S]
  if kv_valid is not None:
    visible &= kv_valid[:, None, :]
  distance = q_index[:, :, None] // chunk_len - kv_index[:, None, :] // chunk_len  # chunks apart
  masks = (visible & (distance == 0), visible & (distance == 1), visible & (distance >= 2))
  logits = jnp.full((B, K, G, T, S), -jnp.inf, jnp.float32)
  for q, mask in zip(qs, masks):
    qg = q.reshape(B, T, K, G, D)  # [B, T, K, G, D]
    part = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * scale
    logits = jnp.where(mask[:, None, None], part, logits)
  m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(logits - m)  # [B, K, G, T, S]
  l = jnp.sum(p, axis=-1, keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  probs = (p / l_safe).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)
  out = out.reshape(B, T, N, D).astype(qs[0].dtype)  # [B, T, N, D]
  if not return_lse:
    return out
  lse = jnp.where(l > 0, m + jnp.log(l_safe), _MASK_LSE)[..., 0]  # [B, K, G, T]
  return out, lse.reshape(B, N, T).transpose(0, 2, 1)  # [B, T, N]


# ------------------------------------------------------------------------- the Pallas path

def _empty_part(like: Array, length: int) -> tuple[Array, Array]:
  """(zeros [B, length, N, D], MASK_LSE [B, length, N]): queries that see no key of a part."""
  B, _, N, D = like.shape
  return (jnp.zeros((B, length, N, D), like.dtype),
          jnp.full((B, length, N), _MASK_LSE, jnp.float32))


def dual_chunk_flash_attention(qs, k: Array, v: Array, *, chunk_len: int, scale: float,
                               attend=None, **flash_kwargs) -> Array:
  """DCA of a whole sequence (token indices 0..T-1) through the flash kernel.

  Args:
    qs: (q_intra, q_succ, q_inter) [B, T, N, D]; k, v: [B, T, K, D].
    chunk_len: s. scale: logit multiplier.
    attend: the flash call, `(q, k, v, causal=, return_lse=) -> (out, lse)`; default
      `flash_attention.flash_attention` (pass `sharded_flash_attention` bound to a mesh to run
      each part under `shard_map`).
    **flash_kwargs: more keywords for every call (e.g. interpret, block_sizes).

  Returns:
    out [B, T, N, D] in q's dtype.
  """
  attend = functools.partial(attend or flash_lib.flash_attention, scale=scale, **flash_kwargs)
  q_intra, q_succ, q_inter = qs
  B, T = q_intra.shape[:2]
  s = chunk_len
  nc = -(-T // s)  # chunks
  if nc == 1:
    return attend(q_intra, k, v, causal=True)
  fold = lambda x, n: x.reshape(B * n, s, *x.shape[2:])  # [B, n s, ...] -> [B n, s, ...]
  unfold = lambda x, n: x.reshape(B, n * s, *x.shape[2:])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, nc * s - x.shape[1])) + ((0, 0),) * (x.ndim - 2))

  # Intra: every chunk against itself, causal (the padded tail keys come after every real query).
  out, lse = attend(fold(pad(q_intra), nc), fold(pad(k), nc), fold(pad(v), nc), causal=True,
                    return_lse=True)
  parts = [(unfold(out, nc)[:, :T], unfold(lse, nc)[:, :T])]

  # Successive: chunk c's queries against all of chunk c - 1 (always a full chunk).
  head = _empty_part(q_succ, s)
  kv_prev = lambda x: fold(x[:, :(nc - 1) * s], nc - 1)
  out, lse = attend(fold(pad(q_succ)[:, s:], nc - 1), kv_prev(k), kv_prev(v), causal=False,
                    return_lse=True)
  parts.append((jnp.concatenate([head[0], unfold(out, nc - 1)], axis=1)[:, :T],
                jnp.concatenate([head[1], unfold(lse, nc - 1)], axis=1)[:, :T]))

  # Inter: chunk c >= 2 against keys [0, (c - 1) s), one call per chunk.
  if nc > 2:
    pieces = [_empty_part(q_inter, 2 * s)]
    for c in range(2, nc):
      q = q_inter[:, c * s:min((c + 1) * s, T)]
      pieces.append(attend(q, k[:, :(c - 1) * s], v[:, :(c - 1) * s], causal=False,
                           return_lse=True))
    outs, lses = zip(*pieces)
    parts.append((jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)))
  return merge_attention(parts)


# ---------------------------------------------------------------------- model entry points

def dual_chunk_self_attention(qs, k: Array, v: Array, *, impl: str, chunk_len: int,
                              scale: float) -> Array:
  """DCA of a whole sequence (token indices 0..T-1), the model's no-cache / prefill path.

  impl "xla": the reference (T x T scores in memory). impl "pallas": `dual_chunk_flash_attention`
  with each kernel call under `shard_map` (batch over the mesh axes of "activation_batch",
  heads over those of "activation_heads"), as `attention.causal_self_attention` does (Mosaic
  when lowered for TPU, the Pallas interpreter elsewhere). impl "auto": `attention.resolve_impl`.
  """
  if resolve_impl(impl) == "xla":
    B, T = qs[0].shape[:2]
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return dual_chunk_attention_reference(qs, k, v, index, index, chunk_len=chunk_len,
                                          scale=scale)
  batch_axes, _, head_axes, _ = tuple(nn.logical_to_mesh_axes(
      ("activation_batch", "activation_length", "activation_heads", "activation_kv")))
  attend = functools.partial(flash_lib.sharded_flash_attention, batch_axes=batch_axes,
                             head_axes=head_axes, interpret=None)
  return dual_chunk_flash_attention(qs, k, v, chunk_len=chunk_len, scale=scale, attend=attend)


def cached_dual_chunk_attention(qs, k: Array, v: Array, k_cache: Array, v_cache: Array,
                                q_index: Array, cache_valid: Array, *, impl: str, chunk_len: int,
                                scale: float) -> Array:
  """DCA of T new tokens over a KV cache plus themselves (decode / extend), cf.
  `attention.cached_attention`: cache slot j holds token j (keys rotated at j mod s).

  An empty cache (S == 0) is a prefill: `dual_chunk_self_attention` with `impl`. Otherwise the
  reference runs over the cache and over the new keys, merged by logsumexp (the cache is never
  concatenated with the new keys).
  """
  B, S = cache_valid.shape
  if S == 0:
    return dual_chunk_self_attention(qs, k, v, impl=impl, chunk_len=chunk_len, scale=scale)
  kv_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  ref = functools.partial(dual_chunk_attention_reference, chunk_len=chunk_len, scale=scale,
                          return_lse=True)
  return merge_attention([ref(qs, k_cache, v_cache, q_index, kv_index, cache_valid),
                          ref(qs, k, v, q_index, q_index)])


def paged_dual_chunk_attention(qs, k: Array, v: Array, k_pages: Array, v_pages: Array, meta, *,
                               chunk_len: int, scale: float):
  """DCA of a ragged paged step (`model.PagedKVCache`): writes the new keys / values k, v
  [T, K, D] (rotated at index mod s) into the pools, then runs the reference for each query
  token over its sequence's pages, gathered for a chunk of tokens at a time (about 4M elements
  of keys per chunk, so memory stays bounded for long caches).

  qs: the three rotated queries, [T, N, D] each. Returns (out [T, N, D], updated pools).
  """
  k_pages, v_pages = write_pages(k, v, k_pages, v_pages, meta.slot_mapping, meta.layer)
  kl, vl, table = layer_pages(k_pages, v_pages, meta.page_indices, meta.layer)
  T, N, D = qs[0].shape
  S, pps = table.shape
  K, ps = kl.shape[1], kl.shape[2]
  C = pps * ps
  n = jnp.reshape(meta.num_seqs, (-1,))[0]
  tok = jnp.arange(T, dtype=jnp.int32)
  live = jnp.arange(S, dtype=jnp.int32) < n
  seq = jnp.sum(live[None, :] & (meta.cu_q_lens[1:][None, :] <= tok[:, None]), axis=1)
  valid = tok < meta.cu_q_lens[n]
  seq = jnp.where(valid, seq, 0).astype(jnp.int32)
  q_lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
  pos = meta.kv_lens[seq] - q_lens[seq] + tok - meta.cu_q_lens[seq]  # [T] token index
  chunk = max(1, min(T, (1 << 22) // (C * K * D)))
  n_chunks = -(-T // chunk)
  fold = lambda x: jnp.pad(x, ((0, n_chunks * chunk - T),) + ((0, 0),) * (x.ndim - 1)).reshape(
      n_chunks, chunk, *x.shape[1:])
  kv_index = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (chunk, C))

  def one_chunk(xs):
    q3, sc, pc, vc = xs
    pages = table[sc]  # [chunk, pps]
    kg = rpa.gather_pages(kl, pages)  # [chunk, C, K, D]
    vg = rpa.gather_pages(vl, pages)
    out = dual_chunk_attention_reference(tuple(q[:, None] for q in q3), kg, vg, pc[:, None],
                                         kv_index, jnp.broadcast_to(vc[:, None], (chunk, C)),
                                         chunk_len=chunk_len, scale=scale)
    return out[:, 0]

  out = lax.map(one_chunk, (tuple(fold(q) for q in qs), fold(seq), fold(pos), fold(valid)))
  return out.reshape(n_chunks * chunk, N, D)[:T], (k_pages, v_pages)
