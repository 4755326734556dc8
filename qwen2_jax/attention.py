"""Attention cores. `attention(...)` is the one place that picks an implementation.

The XLA path here is the reference every faster path (the Pallas kernels of the long-context
issue, the KV-cache decode) is tested against. GQA is computed by grouping query heads per kv
head ([B, T, K, G, D]), never by materialising repeated K/V.

Masking rule (shared by every implementation): query i may see key j iff
  causal:   kv_index[j] <= q_index[i]
  segments: q_segment[i] == kv_segment[j]   (packed documents never see each other)
  window:   q_index[i] - kv_index[j] < sliding_window   (only where a window applies)
Indices are token indices in the sequence (not RoPE positions, which restart per document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
