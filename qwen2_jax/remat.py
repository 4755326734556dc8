"""Activation checkpointing (remat) policies of the decoder layer, by `Qwen2Config.remat_policy`.

A policy decides which activations of a decoder layer the forward pass keeps for the backward
pass; everything else is recomputed from the layer's input. The decoder layer names its key
activations with `jax.ad_checkpoint.checkpoint_name` (the names follow MaxText's, so its
`remat_policy` settings translate one to one):

  decoder_layer_input  x at the layer's start                 [B, T, H]
  query_proj           rotated queries                        [B, T, N, D]
  key_proj, value_proj rotated keys, values                   [B, T, K, D]
  context              attention output before o_proj         [B, T, N, D]
  out_proj             attention output after o_proj          [B, T, H]
  mlpwi_0, mlpwi_1     SwiGLU gate and up projections         [B, T, F]
  mlpwo                SwiGLU down projection                 [B, T, H]

Per layer and token, in units of H elements (Qwen2-7B: N D = H, K D = H / 7, F = 5.3 H):
query 1, key and value 0.14 each, context 1, out_proj 1, mlpwi_0 and mlpwi_1 5.3 each, mlpwo 1.
"none" (no remat) keeps every intermediate including the attention's; "full" keeps only the
layer input (as the scan's carry). The `*offloaded` policies move the named activations to
pinned host memory after the forward and back before the backward: device memory of "full" or
less, paid for with host <-> device copies (TPU: overlapped with compute; any backend runs them).
"""

from __future__ import annotations

from typing import Any

import jax

_CP = jax.checkpoint_policies
QKV = ("query_proj", "key_proj", "value_proj")
MLP_IN = ("mlpwi_0", "mlpwi_1")
MINIMAL = (*QKV, "out_proj", *MLP_IN, "mlpwo")  # every matmul output of the layer


def _offload(*names: str):
  return _CP.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
      offload_src="device", offload_dst="pinned_host")


# name -> jax.checkpoint policy; "none" is no remat at all. Kept in the order of
# `config.REMAT_POLICIES` (tested).
POLICIES: dict[str, Any] = {
    "none": None,
    "full": _CP.nothing_saveable,
    "dots": _CP.checkpoint_dots,
    "dots_with_no_batch_dims": _CP.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": _CP.save_only_these_names(*QKV),
    "save_out_proj": _CP.save_only_these_names("out_proj"),
    "save_dot_except_mlp": _CP.save_only_these_names(*QKV, "out_proj"),
    "save_dot_with_context_except_mlp": _CP.save_only_these_names(*QKV, "context", "out_proj"),
    "save_dot_except_mlpwi": _CP.save_only_these_names(*QKV, "out_proj", "mlpwo"),
    "minimal": _CP.save_only_these_names(*MINIMAL),
    "minimal_with_context": _CP.save_only_these_names(*MINIMAL, "context"),
    "offload_layer_input": _offload("decoder_layer_input"),
    "qkv_proj_offloaded": _offload(*QKV),
    "minimal_offloaded": _offload(*MINIMAL),
}


def policy(name: str) -> Any:
  """The `jax.checkpoint` policy of `remat_policy` `name` (None for "none": no remat)."""
  return POLICIES[name]
