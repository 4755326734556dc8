"""Reward model: a Qwen2 backbone and a scalar head `score`; HF `Qwen2ForSequenceClassification`.

Params are the causal LM's without `lm_head` (`Qwen2ForCausalLM(apply_head=False)`: embedding,
layers, final norm) plus `score` [H, 1], the head's kernel (no bias). A sequence's reward is
`score` applied to the final-norm hidden state of its last token, in float32:

  hidden = backbone(input_ids)[b, last[b]]   # [B, H]
  reward = hidden @ score                     # [B]

Which token is last: with `lengths` (right padding; the training data's rows), token
lengths[b] - 1; without, transformers' rule: the rightmost token that is not
`config.pad_token_id` (`last_token_index`; every row's last position when pad_token_id is None).
The two agree when real tokens never equal the pad id; a sequence that ends in its own pad-id
token (pad = EOS, say) is read one token earlier by transformers' rule than by `lengths`.

HF format: config.json with `architectures: ["Qwen2ForSequenceClassification"]` (the MoE
backbone: Qwen2MoeForSequenceClassification) and one label (`id2label` {"0": "LABEL_0"}), the
backbone's tensors `model.*` and `score.weight` [1, H], no `lm_head` (`checkpoint.keymap`,
head "score"); `transformers.AutoModelForSequenceClassification` loads it. `load` also starts a
reward model from a causal LM (HF or Orbax): its `lm_head` is dropped and `score` starts at
`score_std` times a standard normal (0: zeros, so every initial reward is 0).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2_jax import api, sharding
from qwen2_jax.checkpoint import keymap
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import dtype_of
from qwen2_jax.model import Qwen2ForCausalLM

Params = dict[str, Any]
SCORE = "score"
SCORE_AXES = P("embed", None)  # logical names of score [H, 1]


def _backbone(config: Qwen2Config) -> Qwen2ForCausalLM:
  return Qwen2ForCausalLM(config, apply_head=False)


def _dummy_inputs():
  ids = jnp.zeros((1, 1), jnp.int32)
  return ids, ids, None


def init_params(config: Qwen2Config, rng: jax.Array, *, score_std: float = 0.0) -> Params:
  """Random backbone params (as `api.init_params`) and score [H, 1] = score_std * N(0, 1)."""
  backbone_rng, score_rng = jax.random.split(rng)
  params = nn.unbox(_backbone(config).init(backbone_rng, *_dummy_inputs())["params"])
  score = score_std * jax.random.normal(score_rng, (config.hidden_size, 1), jnp.float32)
  return {**params, SCORE: score.astype(dtype_of(config.param_dtype))}


def abstract_params(config: Qwen2Config) -> Params:
  """Shapes and dtypes of the params as `jax.ShapeDtypeStruct`s, without allocating them."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_logical_axes(config: Qwen2Config) -> Params:
  """A tree like the params of `jax.P` logical axis names (the backbone's, score: embed)."""
  boxed = jax.eval_shape(
      lambda: _backbone(config).init(jax.random.key(0), *_dummy_inputs())["params"])
  return {**nn.get_partition_spec(boxed), SCORE: SCORE_AXES}


def param_shardings(config: Qwen2Config, mesh: Mesh, rules: sharding.Rules) -> Params:
  """A tree like the params of `NamedSharding`s (the rules as for the causal LM)."""
  def one(shape, names):
    return NamedSharding(mesh, sharding.logical_to_spec(tuple(names), rules, mesh, shape.shape))
  return jax.tree.map(one, abstract_params(config), param_logical_axes(config),
                      is_leaf=lambda x: isinstance(x, P))


def init_params_sharded(config: Qwen2Config, rng: jax.Array, mesh: Mesh, rules: sharding.Rules,
                        *, score_std: float = 0.0) -> Params:
  """`init_params` created directly in its shards."""
  def init(key):
    with sharding.activation_rules(rules, mesh, config):
      return init_params(config, key, score_std=score_std)
  return jax.jit(init, out_shardings=param_shardings(config, mesh, rules))(rng)


# ----------------------------------------------------------------------------------- forward

def last_token_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
  """[B] transformers' choice of each row's scored token in input_ids [B, T]: the rightmost
  token not equal to `pad_token_id` (0 for an all-padding row; T - 1 when it is None)."""
  B, T = input_ids.shape
  if pad_token_id is None:
    return jnp.full((B,), T - 1, jnp.int32)
  positions = jnp.arange(T, dtype=jnp.int32)
  return jnp.max(jnp.where(input_ids != pad_token_id, positions, 0), axis=-1)


def rewards_with_aux(config: Qwen2Config, params: Params, input_ids: jax.Array, *,
                     lengths: jax.Array | None = None, positions: jax.Array | None = None,
                     segment_ids: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(rewards [B] f32, the MoE aux of `api.forward_hidden`) of input_ids [B, T].

  Args:
    lengths: [B] real tokens of each right-padded row (the reward is read at lengths - 1; a row
      of length 0 reads position 0); None: `last_token_index` with `config.pad_token_id`.
    positions, segment_ids: as `api.forward` (default 0..T-1, one document per row).
  """
  backbone = {k: v for k, v in params.items() if k != SCORE}
  hidden, aux = api.forward_hidden(config, backbone, input_ids, positions=positions,
                                   segment_ids=segment_ids)  # [B, T, H]
  if lengths is None:
    last = last_token_index(jnp.asarray(input_ids), config.pad_token_id)
  else:
    last = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)  # [B]
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, H]
  score = params[SCORE].astype(jnp.float32)  # [H, 1]
  return jnp.einsum("BH,HO->BO", h.astype(jnp.float32), score)[:, 0], aux  # [B]


def rewards(config: Qwen2Config, params: Params, input_ids: jax.Array, *,
            lengths: jax.Array | None = None, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
  """Rewards [B] f32 of input_ids [B, T] (`rewards_with_aux` without the aux)."""
  return rewards_with_aux(config, params, input_ids, lengths=lengths, positions=positions,
                          segment_ids=segment_ids)[0]


# ----------------------------------------------------------------------------------- files

def is_reward_model_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is an HF directory whose config.json names a sequence-classification
  architecture.

  Raises:
    CheckpointError: it does, with other than one label (not a scalar reward model).
  """
  from qwen2_jax.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(os.fspath(path), "config.json")
  if not os.path.isfile(config_path):
    return False
  with open(config_path, encoding="utf-8") as f:
    d = json.load(f)
  architectures = d.get("architectures") if isinstance(d, dict) else None
  if not any(str(a).endswith("ForSequenceClassification") for a in architectures or ()):
    return False
  labels = d.get("num_labels", len(d.get("id2label") or {"0": 0, "1": 1}))
  if labels != 1:
    raise CheckpointError(f"{config_path}: a classifier with {labels} labels (id2label / "
                          f"num_labels); a reward model has one")
  return True


def from_causal_lm(config: Qwen2Config, params: Params, rng: jax.Array, *,
                   score_std: float = 0.0, score_sharding: Any = None) -> Params:
  """Reward-model params from causal-LM params: `lm_head` dropped, a new score head."""
  score = score_std * jax.random.normal(rng, (config.hidden_size, 1), jnp.float32)
  score = score.astype(dtype_of(config.param_dtype))
  if score_sharding is not None:
    score = jax.device_put(score, score_sharding)
  return {**{k: v for k, v in params.items() if k != "lm_head"}, SCORE: score}


def load(path: str | os.PathLike, *, dtype: str | None = None, mesh: Mesh | None = None,
         rules: sharding.Rules | None = None, score_std: float = 0.0,
         rng: jax.Array | None = None, progress: bool = True,
         **config_overrides) -> tuple[Qwen2Config, Params]:
  """(config, params) of a reward model from an HF sequence-classification directory, or a
  new one from a causal LM (HF or Orbax; `from_causal_lm` with `score_std` and `rng`).

  Args:
    dtype: the params' dtype; None keeps the stored one.
    mesh, rules: place the params in their shardings (`param_shardings`); None: default device.
    **config_overrides: implementation settings, as `checkpoint.load`.

  Raises:
    CheckpointError: a malformed checkpoint, or a classifier with more than one label.
  """
  from qwen2_jax import checkpoint  # pylint: disable=import-outside-toplevel
  rules = None if mesh is None else sharding.get_rules(rules or "fsdp")
  if checkpoint.checkpoint_format(path) == "hf" and is_reward_model_dir(path):
    shardings = None if mesh is None else lambda c: param_shardings(c, mesh, rules)
    config, params = checkpoint.load_hf_checkpoint(path, dtype=dtype, shardings=shardings,
                                                   show_progress=progress, head=keymap.SCORE_HEAD,
                                                   **config_overrides)
    return config, params
  shardings = None if mesh is None else lambda c: sharding.param_shardings(c, mesh, rules)
  config, params = checkpoint.load(path, dtype=dtype, shardings=shardings, progress=progress,
                                   **config_overrides)
  score_sharding = None if mesh is None else param_shardings(config, mesh, rules)[SCORE]
  rng = jax.random.key(0) if rng is None else rng
  return config, from_causal_lm(config, params, rng, score_std=score_std,
                                score_sharding=score_sharding)


def save(path: str | os.PathLike, config: Qwen2Config, params: Params, **kwargs) -> None:
  """Writes an HF `Qwen2ForSequenceClassification` directory (`save_hf_checkpoint` kwargs)."""
  from qwen2_jax import checkpoint  # pylint: disable=import-outside-toplevel
  checkpoint.save_hf_checkpoint(path, config, params, head=keymap.SCORE_HEAD, **kwargs)
