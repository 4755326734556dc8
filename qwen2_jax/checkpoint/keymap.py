"""The one declarative map between HF checkpoint keys and this project's params, used both ways.

Each `Entry` says: this HF tensor is that slot of that param (a layer slice of a stacked param
when layers are scanned), converted by a `Transform` that has an exact inverse (transposes and
reshapes only, so HF -> params -> HF is bit-exact). Qwen2-MoE's per-expert tensors
(`mlp.experts.{e}.*`) are slots of stacked [E, ...] expert params: `index` = (layer, expert)
when layers are scanned, (expert,) otherwise.

The head: "lm" (the causal LM: `lm_head.weight`, absent when tied) or "score" (a reward model,
HF `*ForSequenceClassification` with one label: `score.weight` [1, H] <-> params["score"]
[H, 1]; `qwen2_jax.reward_model`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import layer_param_prefix


@dataclasses.dataclass(frozen=True)
class Transform:
  """HF array <-> param array: an optional transpose, then an optional split of one axis into
  (n, size // n). Transposes and reshapes only, so `to_param(to_hf(p)) == p` bit for bit."""
  name: str
  transpose: bool = False
  split: tuple[int, int] | None = None  # (axis after the transpose, n): that axis -> (n, -1)

  def to_param(self, w: np.ndarray) -> np.ndarray:
    w = w.T if self.transpose else w
    if self.split is not None:
      axis, n = self.split
      w = w.reshape(w.shape[:axis] + (n, w.shape[axis] // n) + w.shape[axis + 1:])
    return w

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    if self.split is not None:
      axis, _ = self.split
      p = p.reshape(p.shape[:axis] + (-1,) + p.shape[axis + 2:])
    return p.T if self.transpose else p

  def param_shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(hf_shape[::-1]) if self.transpose else tuple(hf_shape)
    if self.split is not None:
      axis, n = self.split
      shape = shape[:axis] + (n, shape[axis] // n) + shape[axis + 1:]
    return shape

  def read_param(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray],
                 hf_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """`to_param(w)[index]`, where `read_hf(hf_index)` returns `w[hf_index]`: reads only the
    part of w the slice covers (whole heads along a split axis).

    Args:
      read_hf: reads a basic slice (one per HF axis) of the HF tensor w.
      hf_shape: w's shape.
      index: basic slices with positive steps, one per param axis (missing trailing ones: all).
    """
    shape = self.param_shape(hf_shape)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    index = tuple(slice(*ix.indices(n)) for ix, n in zip(index, shape))
    if any(ix.step <= 0 for ix in index):
      raise ValueError(f"read_param: negative steps are not supported: {index}")
    outer, inner, axis = [], [], 0  # outer: slices of the (transposed) HF array
    while axis < len(shape):
      if self.split is not None and len(outer) == self.split[0]:
        heads, size = range(*index[axis].indices(shape[axis])), shape[axis + 1]
        first = heads[0] if heads else 0
        outer.append(slice(first * size, (heads[-1] + 1) * size if heads else 0))
        inner += [slice(0, len(range(first, heads[-1] + 1)) if heads else 0, index[axis].step),
                  index[axis + 1]]
        axis += 2
      else:
        outer.append(index[axis])
        inner.append(slice(None))
        axis += 1
    block = read_hf(tuple(outer[::-1]) if self.transpose else tuple(outer))
    block = block.T if self.transpose else block
    if self.split is not None:
      a, size = self.split[0], shape[self.split[0] + 1]
      block = block.reshape(block.shape[:a] + (block.shape[a] // size, size) + block.shape[a + 1:])
    return block[tuple(inner)]


IDENTITY = Transform("identity")
# nn.Linear stores [out, in]; params store [in, out].
LINEAR = Transform("linear", transpose=True)


def heads_in(n: int) -> Transform:
  """q/k/v_proj weight [n*D, H] <-> [H, n, D]."""
  return Transform(f"heads_in({n})", transpose=True, split=(1, n))


def heads_bias(n: int) -> Transform:
  """q/k/v_proj bias [n*D] <-> [n, D]."""
  return Transform(f"heads_bias({n})", split=(0, n))


def heads_out(n: int) -> Transform:
  """o_proj weight [H, n*D] <-> [n, D, H]."""
  return Transform(f"heads_out({n})", transpose=True, split=(0, n))


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_key: str
  path: tuple[str, ...]          # param path in the params tree
  index: tuple[int, ...]         # slot inside that param (e.g. the layer of a stacked param)
  transform: Transform
  hf_shape: tuple[int, ...]      # shape of the HF tensor


def dense_layer_entries(config: Qwen2Config) -> list[tuple[str, tuple[str, ...], Transform,
                                                           tuple[int, ...]]]:
  """Per-layer (HF suffix, param sub-path, transform, HF shape) of a dense decoder layer."""
  H, N, K, D, F = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_size, config.intermediate_size)
  return [
      ("input_layernorm.weight", ("input_layernorm", "weight"), IDENTITY, (H,)),
      ("self_attn.q_proj.weight", ("self_attn", "q_proj"), heads_in(N), (N * D, H)),
      ("self_attn.q_proj.bias", ("self_attn", "q_bias"), heads_bias(N), (N * D,)),
      ("self_attn.k_proj.weight", ("self_attn", "k_proj"), heads_in(K), (K * D, H)),
      ("self_attn.k_proj.bias", ("self_attn", "k_bias"), heads_bias(K), (K * D,)),
      ("self_attn.v_proj.weight", ("self_attn", "v_proj"), heads_in(K), (K * D, H)),
      ("self_attn.v_proj.bias", ("self_attn", "v_bias"), heads_bias(K), (K * D,)),
      ("self_attn.o_proj.weight", ("self_attn", "o_proj"), heads_out(N), (H, N * D)),
      ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), IDENTITY, (H,)),
      ("mlp.gate_proj.weight", ("mlp", "gate_proj"), LINEAR, (F, H)),
      ("mlp.up_proj.weight", ("mlp", "up_proj"), LINEAR, (F, H)),
      ("mlp.down_proj.weight", ("mlp", "down_proj"), LINEAR, (H, F)),
  ]


def moe_layer_entries(config: Qwen2Config) -> list[tuple[str, tuple[str, ...], Transform,
                                                         tuple[int, ...], tuple[int, ...]]]:
  """Per-layer (HF suffix, param sub-path, transform, HF shape, expert slot) of a sparse layer's
  MLP (`qwen2_jax.moe.Qwen2MoeBlock`): each expert's HF tensor is one slot of a stacked
  [E, ...] param."""
  H, E, F, S = (config.hidden_size, config.num_experts, config.moe_intermediate_size,
                config.shared_expert_intermediate_size)
  out = [("mlp.gate.weight", ("mlp", "router"), LINEAR, (E, H), ())]
  for e in range(E):
    for name, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))):
      out.append((f"mlp.experts.{e}.{name}.weight", ("mlp", "experts", name), LINEAR, shape,
                  (e,)))
  if S:
    for name, shape in (("gate_proj", (S, H)), ("up_proj", (S, H)), ("down_proj", (H, S))):
      out.append((f"mlp.shared_expert.{name}.weight", ("mlp", "shared_expert", name), LINEAR,
                  shape, ()))
    out.append(("mlp.shared_expert_gate.weight", ("mlp", "shared_expert_gate"), LINEAR, (1, H),
                ()))
  return out


LM_HEAD, SCORE_HEAD = "lm", "score"
HEADS = (LM_HEAD, SCORE_HEAD)


def architecture(config: Qwen2Config, head: str = LM_HEAD) -> str:
  """The HF `architectures` name of a checkpoint of `config` with `head`."""
  base = "Qwen2Moe" if config.is_moe else "Qwen2"
  return base + ("ForSequenceClassification" if head == SCORE_HEAD else "ForCausalLM")


def checkpoint_entries(config: Qwen2Config, head: str = LM_HEAD) -> list[Entry]:
  """Every HF tensor of a checkpoint of `config` with `head` ("lm" or "score"), in the order
  `save_pretrained` writes them."""
  if head not in HEADS:
    raise ValueError(f"head: {head!r} is not one of {HEADS}")
  V, H = config.vocab_size, config.hidden_size
  entries = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), IDENTITY,
                   (V, H))]
  for i in range(config.num_hidden_layers):
    prefix = layer_param_prefix(config, i)
    root, index = (prefix[0],), tuple(prefix[1:])
    layer = dense_layer_entries(config)
    if config.is_sparse_layer(i):
      layer = [e for e in layer if not e[0].startswith("mlp.")]
      layer = [(*e, ()) for e in layer] + moe_layer_entries(config)
    else:
      layer = [(*e, ()) for e in layer]
    for suffix, sub, transform, shape, slot in layer:
      entries.append(Entry(f"model.layers.{i}.{suffix}", root + sub, index + slot, transform,
                           shape))
  entries.append(Entry("model.norm.weight", ("norm", "weight"), (), IDENTITY, (H,)))
  if head == SCORE_HEAD:
    entries.append(Entry("score.weight", ("score",), (), LINEAR, (1, H)))
  elif not config.tie_word_embeddings:
    entries.append(Entry("lm_head.weight", ("lm_head",), (), LINEAR, (V, H)))
  return entries
