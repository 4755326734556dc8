"""Tiny randomly initialised `transformers` Qwen2 models, saved with `save_pretrained`: the oracle.

Weights are drawn larger than the default init (and biases / norm weights are randomised) so
logits are O(1-10) and every parameter visibly matters in a parity check.
"""

from __future__ import annotations

import os

import numpy as np


def make_hf_qwen2(directory: str | os.PathLike, *, seed: int = 0, vocab_size: int = 257,
                  num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 8,
                  num_hidden_layers: int = 2, intermediate_size: int = 48,
                  tie_word_embeddings: bool = False, rope_theta: float = 10000.0,
                  weight_std: float = 0.15, torch_dtype: str = "float32", **config_kwargs):
  """Builds, randomises and saves a tiny Qwen2ForCausalLM; returns the torch model (eval mode)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=num_attention_heads * head_dim,
      intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
      tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta, max_position_embeddings=512,
      **config_kwargs)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, weight_std)
  model = model.to(getattr(torch, torch_dtype))
  model.save_pretrained(os.fspath(directory))
  # Reload: `.to(bfloat16)` also casts the rotary inv_freq buffer, `from_pretrained` does not.
  return transformers.Qwen2ForCausalLM.from_pretrained(
      os.fspath(directory), dtype=getattr(torch, torch_dtype)).eval()


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
  """Logits of the torch model as float32 numpy."""
  import torch

  kwargs = {}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(attention_mask)
  if position_ids is not None:
    kwargs["position_ids"] = torch.as_tensor(position_ids)
  with torch.no_grad():
    out = model(torch.as_tensor(input_ids), **kwargs).logits
  return out.float().numpy()
