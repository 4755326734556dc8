"""Attention cores. `attention(...)` is the one place that picks an implementation.

The XLA path here is the reference every faster path (the Pallas flash kernel,
`qwen2_jax.kernels.flash_attention`; the KV-cache decode) is tested against. GQA is computed by
grouping query heads per kv head ([B, T, K, G, D]), never by materialising repeated K/V.

Masking rule (shared by every implementation): query i may see key j iff
  causal:   kv_index[j] <= q_index[i]
  segments: q_segment[i] == kv_segment[j]   (packed documents never see each other)
  window:   q_index[i] - kv_index[j] < sliding_window   (only where a window applies)
Indices are token indices in the sequence (not RoPE positions, which restart per document).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax.kernels import flash_attention as flash_lib
from qwen2_jax.kernels import ragged_paged_attention as rpa

Array = jax.Array

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free


def attention_mask(q_index: Array, kv_index: Array, q_segment: Array | None,
                   kv_segment: Array | None, *, causal: bool = True,
                   sliding_window: int | None = None, kv_valid: Array | None = None) -> Array:
  """Boolean mask [B, T, S] from per-token indices [B, T] / [B, S] and optional segment ids."""
  mask = jnp.ones((q_index.shape[0], q_index.shape[1], kv_index.shape[1]), dtype=bool)
  if causal:
    mask &= kv_index[:, None, :] <= q_index[:, :, None]
  if sliding_window is not None:
    mask &= (q_index[:, :, None] - kv_index[:, None, :]) < sliding_window
  if q_segment is not None:
    mask &= q_segment[:, :, None] == kv_segment[:, None, :]
  if kv_valid is not None:
    mask &= kv_valid[:, None, :]
  return mask


def xla_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                  return_lse: bool = False):
  """Softmax attention in plain XLA ops.

  Args:
    q: [B, T, N, D] queries (already rotated).
    k, v: [B, S, K, D] keys / values; N % K == 0.
    mask: [B, T, S] boolean, True where attention is allowed.
    scale: logit multiplier (head_dim ** -0.5).
    return_lse: also return the log-sum-exp of the scaled logits, [B, T, N] (f32).

  Returns:
    out [B, T, N, D] in q's dtype (and lse when asked). Scores and softmax are f32.
  """
  B, T, N, D = q.shape
  K = k.shape[2]
  G = N // K
  qg = q.reshape(B, T, K, G, D)  # [B, T, K, G, D]
  scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
  lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, T]
  probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
  out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v).reshape(B, T, N, D)  # [B, T, N, D]
  if return_lse:
    return out, lse.reshape(B, N, T).transpose(0, 2, 1)  # [B, T, N]
  return out


def merge_attention(parts) -> Array:
  """Exact softmax attention over the union of disjoint key sets, from each set's (out, lse).

  `out = sum_k exp(lse_k - logsumexp_k(lse_k)) * out_k`; out_k [B, T, N, D], lse_k [B, T, N].
  A part whose keys are all masked (or empty) gets weight 0.
  """
  outs, lses = zip(*parts)
  lse_all = jax.nn.logsumexp(jnp.stack(lses), axis=0)  # [B, T, N]
  out = sum(o.astype(jnp.float32) * jnp.exp(l - lse_all)[..., None] for o, l in zip(outs, lses))
  return out.astype(outs[0].dtype)


def cached_attention(q: Array, k: Array, v: Array, k_cache: Array, v_cache: Array,
                     q_index: Array, cache_valid: Array, *, scale: float,
                     sliding_window=None) -> Array:
  """Attention of T new queries over a KV cache plus the T new keys (the decode / extend path).

  Cache slot j of a row holds that row's token j, so kv indices are the slot numbers. The new
  tokens come after every valid cache slot; the masking rule above applies to both key sets.

  Args:
    q: [B, T, N, D] new queries; k, v: [B, T, K, D] new keys / values (rotated).
    k_cache, v_cache: [B, S, K, D] keys / values of earlier tokens.
    q_index: [B, T] token index of each new token.
    cache_valid: [B, S] True where a slot holds an earlier token of the row.
    scale: logit multiplier; sliding_window: optional window (int or scalar array).

  Returns:
    out [B, T, N, D], equal to `xla_attention` over the whole sequence.
  """
  B, S = cache_valid.shape
  new_mask = attention_mask(q_index, q_index, None, None, sliding_window=sliding_window)
  if S == 0:  # prefill into an empty cache
    return xla_attention(q, k, v, new_mask, scale=scale)
  kv_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cache_mask = attention_mask(q_index, kv_index, None, None, sliding_window=sliding_window,
                              kv_valid=cache_valid)
  return merge_attention([
      xla_attention(q, k_cache, v_cache, cache_mask, scale=scale, return_lse=True),
      xla_attention(q, k, v, new_mask, scale=scale, return_lse=True)])


def resolve_impl(impl: str, sliding_window=None) -> str:
  """`Qwen2Config.attention_impl` as run: "auto" is "pallas" when lowering for TPU without a
  sliding window, else "xla". The platform is the traced mesh's (`jax.sharding.
  get_abstract_mesh`, so an ahead-of-time compile for a TPU topology picks the kernel on a CPU
  host); with no mesh, JAX's default backend."""
  if impl != "auto":
    return impl
  return "pallas" if traced_platform() == "tpu" and sliding_window is None else "xla"


def traced_platform() -> str:
  """The platform being lowered for: the traced abstract mesh's (so an ahead-of-time compile for
  a TPU topology on a CPU host says "tpu"), or with no mesh JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def causal_self_attention(q: Array, k: Array, v: Array, q_index: Array, segment_ids: Array | None,
                          *, impl: str, scale: float, sliding_window=None) -> Array:
  """Causal self-attention of a whole sequence: the one place that picks the implementation.

  impl "xla": `xla_attention` with the masking rule above. impl "pallas": the Pallas flash
  kernel (`qwen2_jax.kernels.flash_attention`) inside `jax.shard_map`, batch split over the mesh
  axes the rules give "activation_batch" and heads over those of "activation_heads". The kernel
  uses token indices 0..T-1 (what `q_index` is on this path) and has no sliding window. It runs
  as the Mosaic TPU kernel when lowered for TPU and in the Pallas interpreter on any other
  backend (correct, slow: for CPU tests and debugging). impl "auto": `resolve_impl`.
  """
  impl = resolve_impl(impl, sliding_window)
  if impl == "xla":
    mask = attention_mask(q_index, q_index, segment_ids, segment_ids,
                          sliding_window=sliding_window)
    return xla_attention(q, k, v, mask, scale=scale)
  if sliding_window is not None:
    raise ValueError("attention_impl='pallas' has no sliding window; use attention_impl='xla' "
                     "for configs with use_sliding_window")
  batch_axes, _, head_axes, _ = tuple(nn.logical_to_mesh_axes(
      ("activation_batch", "activation_length", "activation_heads", "activation_kv")))
  return flash_lib.sharded_flash_attention(q, k, v, segment_ids, batch_axes=batch_axes,
                                           head_axes=head_axes, causal=True, scale=scale,
                                           interpret=None)



def write_pages(k: Array, v: Array, k_pages: Array, v_pages: Array, slot_mapping: Array,
                layer: int | None = None) -> tuple[Array, Array]:
  """Scatters new keys / values k, v [T, K, D] into page pools at flat slots [T]
  (page * page_size + offset); slots past the pool are dropped. Pools are [P, K, ps, D], or
  [L, P, K, ps, D] with `layer` naming the one written."""
  def put(pool, new):
    ps = pool.shape[-2]
    page, off = slot_mapping // ps, slot_mapping % ps
    if layer is None:  # pool[page[t], :, off[t]] = new[t]
      return pool.at[page, :, off].set(new.astype(pool.dtype), mode="drop")
    return pool.at[layer, page, :, off].set(new.astype(pool.dtype), mode="drop")
  return put(k_pages, k), put(v_pages, v)


def write_pages_all_layers(k: Array, v: Array, k_pages: Array, v_pages: Array,
                           slot_mapping: Array) -> tuple[Array, Array]:
  """Scatters every layer's new keys / values k, v [L, T, K, D] into pools [L, P, K, ps, D] at
  flat slots [T] (as `write_pages`, one scatter for all layers); slots past the pool are
  dropped."""
  def put(pool, new):
    L, P, K, ps, D = pool.shape
    layer = jnp.arange(L, dtype=jnp.int32)[:, None]  # [L, 1]
    page = layer * P + slot_mapping[None, :] // ps  # [L, T] in the [L * P] page view
    page = jnp.where(slot_mapping[None, :] < P * ps, page, L * P)  # padding: dropped
    off = jnp.broadcast_to(slot_mapping[None, :] % ps, page.shape)
    flat = pool.reshape(L * P, K, ps, D).at[page, :, off].set(new.astype(pool.dtype),
                                                             mode="drop")
    return flat.reshape(pool.shape)
  return put(k_pages, k), put(v_pages, v)


def paged_writes_deferred() -> bool:
  """Whether `paged_attention` may be called with `meta.write` False: on every platform but TPU
  (the Pallas kernel reads the step's keys / values from the pools); `traced_platform`."""
  return traced_platform() != "tpu"


def layer_pages(k_pages: Array, v_pages: Array, page_indices: Array, layer: int | None
                ) -> tuple[Array, Array, Array]:
  """(k, v, page table) of one layer: full pools [L, P, ...] are viewed as [L * P, ...] pages
  and the table offset by layer * P (a free reshape; slicing the layer out would copy it)."""
  if layer is None:
    return k_pages, v_pages, page_indices
  L, P = k_pages.shape[:2]
  flat = lambda x: x.reshape(L * P, *x.shape[2:])
  return flat(k_pages), flat(v_pages), page_indices + jnp.int32(layer * P)


def paged_attention(q: Array, k: Array, v: Array, k_pages: Array, v_pages: Array, meta, *,
                    scale: float, sliding_window=None,
                    impl: str = "auto") -> tuple[Array, tuple[Array, Array]]:
  """One layer of a ragged paged step (`model.PagedKVCache`): writes the T new keys / values
  into the pools and attends each query over its sequence's pages.

  Args:
    q: [T, N, D] rotated queries; k, v: [T, K, D] rotated keys / values.
    k_pages, v_pages: the pools, [P, K, ps, D] or [L, P, K, ps, D] (then `meta.layer` says which).
    meta: `model.PagedMeta` (slot_mapping, kv_lens, page_indices, cu_q_lens, num_seqs, layer,
      write). With `meta.write` False (only where `paged_writes_deferred()`) the pools are not
      written and (k, v) come back in their place.
    scale: logit multiplier; sliding_window: optional window (int or scalar array).
    impl: `Qwen2Config.attention_impl`. Off TPU, "auto" runs the C++ kernel
      (`ragged_paged_attention_cpu`) on the CPU backend without a mesh for float32 q and
      pools where the extension is built, else (and with "xla") `ragged_paged_attention_blocked`.

  Returns:
    (out [T, N, D], (k_pages, v_pages) updated, or (k, v) when not written). On TPU the pools
    are written first and read by the Pallas kernel (`kernels.ragged_paged_attention`); on
    other backends the CPU kernel or the blocked path reads the step's keys / values from k, v
    and everything else from the pools as they were, so writing can come after (or later).
  """
  if paged_writes_deferred():
    kl, vl, table = layer_pages(k_pages, v_pages, meta.page_indices, meta.layer)
    fn = rpa.ragged_paged_attention_blocked
    if impl == "auto" and rpa.cpu_kernel_applies(q, kl, vl):
      fn = rpa.ragged_paged_attention_cpu
    out = fn(q, kl, vl, meta.kv_lens, table, meta.cu_q_lens, meta.num_seqs, scale=scale,
             sliding_window=sliding_window, k_new=k, v_new=v)
    if not meta.write:
      return out, (k, v)
    return out, write_pages(k, v, k_pages, v_pages, meta.slot_mapping, meta.layer)
  if not meta.write:
    raise ValueError("paged_attention on TPU writes the pools itself (meta.write must be True)")
  k_pages, v_pages = write_pages(k, v, k_pages, v_pages, meta.slot_mapping, meta.layer)
  kl, vl, table = layer_pages(k_pages, v_pages, meta.page_indices, meta.layer)
  args = (q, kl, vl, meta.kv_lens, table, meta.cu_q_lens, meta.num_seqs)
  # TPU: the Pallas kernel, with each device's kv heads under a mesh.
  kernel = functools.partial(rpa.ragged_paged_attention, scale=scale,
                             sliding_window=sliding_window, interpret=False)
  mesh = jax.sharding.get_abstract_mesh()
  heads = None if mesh.empty else nn.logical_to_mesh_axes(("activation_kv_heads",))[0]
  ways = 1 if heads is None else math.prod(
      mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads))
  if heads is None or kl.shape[1] % ways:
    out = kernel(*args)
  else:  # each device attends with its own kv heads (the pools are split the same way)
    P = jax.sharding.PartitionSpec
    q_spec, kv_spec = P(None, heads, None), P(None, heads, None, None)
    out = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (P(),) * 4,
                        out_specs=q_spec, check_vma=False)(*args)
  return out, (k_pages, v_pages)
