"""The stable functional API: `init_params`, `forward`, `forward_with_aux`, `forward_hidden`,
`param_logical_axes`, `count_params`.

Params are a plain nested dict of arrays (no Flax boxing), so they can be saved, converted and
sharded without Flax. `forward` is a pure function of (config, params, inputs); jit it with the
config static: `jax.jit(forward, static_argnums=0)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax import model as model_lib
from qwen2_jax import moe
from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM

Params = dict[str, Any]


def _model(config: Qwen2Config, apply_head: bool = True) -> Qwen2ForCausalLM:
  return Qwen2ForCausalLM(config, apply_head=apply_head)


def _dummy_inputs(config: Qwen2Config):
  ids = jnp.zeros((1, 1), jnp.int32)
  return ids, ids, None


def init_params(config: Qwen2Config, rng: jax.Array) -> Params:
  """Randomly initialised params (normal(initializer_range) weights, zero biases, unit norms)."""
  boxed = _model(config).init(rng, *_dummy_inputs(config))["params"]
  return nn.unbox(boxed)


def abstract_params(config: Qwen2Config) -> Params:
  """Shapes and dtypes of the params as `jax.ShapeDtypeStruct`s, without allocating them."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_logical_axes(config: Qwen2Config) -> Params:
  """A tree like the params whose leaves are `jax.P` of logical axis names (e.g. ("embed", "mlp"))."""
  boxed = jax.eval_shape(
      lambda: _model(config).init(jax.random.key(0), *_dummy_inputs(config))["params"])
  return nn.get_partition_spec(boxed)


def count_params(params_or_shapes: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params_or_shapes))


def _check_inputs(input_ids, positions, segment_ids):
  """Validated (input_ids, positions, segment_ids) arrays; positions default to 0..T-1."""
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  B, T = input_ids.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  elif jnp.shape(positions) != (B, T):
    raise ValueError(f"positions shape {jnp.shape(positions)} != input_ids shape {(B, T)}")
  if segment_ids is not None and jnp.shape(segment_ids) != (B, T):
    raise ValueError(f"segment_ids shape {jnp.shape(segment_ids)} != input_ids shape {(B, T)}")
  return (input_ids, jnp.asarray(positions),
          None if segment_ids is None else jnp.asarray(segment_ids))


def forward(config: Qwen2Config, params: Params, input_ids: jax.Array, *,
            positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
  """Logits of the causal LM.

  Args:
    config: the model config (static under jit).
    params: the params pytree (`init_params`, `load_hf_checkpoint`, ...).
    input_ids: [B, T] int token ids.
    positions: [B, T] RoPE positions; default 0..T-1 per row. For packed rows, restart at 0
      for each document.
    segment_ids: [B, T] document ids of a packed row; tokens attend only within their own
      segment (and causally). None: one document per row.

  Returns:
    logits [B, T, V] in the compute dtype (or `config.logits_dtype`).
  """
  return _model(config).apply({"params": params},
                              *_check_inputs(input_ids, positions, segment_ids))


def forward_with_aux(config: Qwen2Config, params: Params, input_ids: jax.Array, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`forward` plus the Qwen2-MoE losses and metrics (`qwen2_jax.moe.moe_aux`).

  Tokens with segment id 0 (padding) are left out of the router statistics.

  Returns:
    (logits [B, T, V], aux) with aux = {"aux_loss": [] load-balancing loss (`transformers`'
    value; multiply by `config.router_aux_loss_coef` for the objective), "router_z_loss": [],
    "expert_load": [S, E] share of each sparse layer's top-k choices per expert, "drop_rate":
    [] share of assignments dropped by `config.moe_capacity_factor`}. For a dense model the
    losses are 0 and expert_load is [0, E].
  """
  logits, state = _model(config).apply({"params": params},
                                       *_check_inputs(input_ids, positions, segment_ids),
                                       mutable=["intermediates"])
  stats = model_lib.sparse_layer_stats(state.get("intermediates", {}), config)
  return logits, moe.moe_aux(config, stats)


def forward_hidden(config: Qwen2Config, params: Params, input_ids: jax.Array, *,
                   positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`forward_with_aux` without the LM head: (hidden [B, T, H], aux), the final norm's output
  in the compute dtype; `qwen2_jax.model.head_logits(params, config, hidden)` gives the logits.

  For losses that apply the head a chunk at a time (`Qwen2Config.loss_chunk_size`), so that the
  [B, T, V] logits never exist at once.
  """
  hidden, state = _model(config, apply_head=False).apply(
      {"params": params}, *_check_inputs(input_ids, positions, segment_ids),
      mutable=["intermediates"])
  stats = model_lib.sparse_layer_stats(state.get("intermediates", {}), config)
  return hidden, moe.moe_aux(config, stats)
