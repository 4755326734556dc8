"""Dense -> MoE upcycling: build a Qwen2-MoE checkpoint from a dense Qwen2 one.

The recipe of the Qwen2 technical report (arXiv 2407.10671, §2.2.2), which made Qwen2-57B-A14B
from Qwen2-7B. With dense FFN width F, n experts of width F_e:

  1. replicate the dense FFN c = ceil(n * F_e / F) times;
  2. shuffle each copy's intermediate dimension with its own random permutation (the same one
     for the gate_proj / up_proj columns and the down_proj rows, so a copy still computes the
     dense FFN exactly: SwiGLU is a sum over intermediate units);
  3. cut the n experts as consecutive F_e-unit slices of the concatenated copies; drop the rest;
  4. re-initialise a fraction (default 0.5) of each expert's parameters: every entry of each
     expert matrix is independently redrawn with that probability, from N(0, s^2) with s the
     standard deviation of the dense matrix it came from (the scale is kept).

Everything else is copied: embeddings, attention, norms, the final norm and the LM head, and the
FFN of the layers that stay dense (mlp_only_layers, decoder_sparse_step). The report does not
say how the rest of a sparse layer starts; our choices:

  shared expert  the dense FFN itself: its first min(S, F) units are the dense units in order;
                 when S > F the S - F extra units are copies of randomly chosen dense units with
                 a ZERO down_proj row, so at step 0 the shared expert computes exactly the dense
                 FFN (and the extra units still get gradients through down_proj). When S < F it
                 keeps a random S of the F units (a truncation: no longer exact).
  shared gate    zeros: sigmoid(0) = 1/2 for every token.
  router         N(0, initializer_range^2), like a fresh model: a zero router would tie every
                 expert and top-k would send every token to the same first k experts.

Reproducible: every random draw comes from a NumPy generator seeded with (seed, layer, purpose),
so the same inputs and seed give bit-identical checkpoints, whatever the order of work.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from qwen2_jax import api, checkpoint, model
from qwen2_jax.checkpoint import hf, orbax_io
from qwen2_jax.config import ConfigError, Qwen2Config

_PERMUTE, _GATE, _UP, _DOWN, _ROUTER, _SHARED = range(6)  # purposes of the random streams


def moe_config(dense: Qwen2Config, *, num_experts: int, num_experts_per_tok: int,
               moe_intermediate_size: int, shared_expert_intermediate_size: int,
               norm_topk_prob: bool = False, decoder_sparse_step: int = 1,
               mlp_only_layers: tuple[int, ...] = (), router_aux_loss_coef: float = 0.001
               ) -> Qwen2Config:
  """The MoE config of an upcycled dense model: the dense fields plus the MoE ones (dense
  layers keep the dense `intermediate_size`)."""
  if dense.is_moe:
    raise ConfigError("upcycling needs a dense model; this config already has experts")
  return dense.replace(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                       moe_intermediate_size=moe_intermediate_size,
                       shared_expert_intermediate_size=shared_expert_intermediate_size,
                       norm_topk_prob=norm_topk_prob, decoder_sparse_step=decoder_sparse_step,
                       mlp_only_layers=tuple(mlp_only_layers),
                       router_aux_loss_coef=router_aux_loss_coef)


def num_copies(num_experts: int, expert_width: int, dense_width: int) -> int:
  """ceil(n * F_e / F): how many shuffled copies of the dense FFN the experts are cut from."""
  return math.ceil(num_experts * expert_width / dense_width)


def _rng(seed: int, layer: int, purpose: int) -> np.random.Generator:
  return np.random.default_rng([seed, layer, purpose])


def expert_units(dense_width: int, num_experts: int, expert_width: int, seed: int,
                 layer: int) -> np.ndarray:
  """[E, F_e] int: the dense intermediate unit behind each unit of each expert (steps 1-3).

  Expert e holds units e*F_e ... (e+1)*F_e - 1 of the concatenation of the shuffled copies;
  copy c is `permutation_c` of 0..F-1.
  """
  rng = _rng(seed, layer, _PERMUTE)
  copies = num_copies(num_experts, expert_width, dense_width)
  units = np.concatenate([rng.permutation(dense_width) for _ in range(copies)])
  return units[:num_experts * expert_width].reshape(num_experts, expert_width)


def cut_experts(gate: np.ndarray, up: np.ndarray, down: np.ndarray, units: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Dense gate / up [H, F], down [F, H] -> expert gate / up [E, H, F_e], down [E, F_e, H]."""
  return (np.moveaxis(gate[:, units], 1, 0), np.moveaxis(up[:, units], 1, 0), down[units])


def reinitialise(w: np.ndarray, fraction: float, std: float, seed: int, layer: int,
                 purpose: int) -> np.ndarray:
  """Redraws each entry of each expert w[e] with probability `fraction` from N(0, std^2)
  (step 4); expert e's draws come from the stream (seed, layer, purpose, e)."""
  if fraction <= 0:
    return w
  out = np.empty_like(w)
  for e in range(w.shape[0]):
    rng = np.random.default_rng([seed, layer, purpose, e])
    redraw = rng.random(w.shape[1:], dtype=np.float32) < fraction
    fresh = rng.standard_normal(w.shape[1:], dtype=np.float32) * np.float32(std)
    out[e] = np.where(redraw, fresh.astype(w.dtype), w[e])
  return out


def shared_expert(gate: np.ndarray, up: np.ndarray, down: np.ndarray, width: int, seed: int,
                  layer: int) -> dict[str, np.ndarray]:
  """The shared expert of width S from the dense FFN (see the module docstring)."""
  F = gate.shape[1]
  rng = _rng(seed, layer, _SHARED)
  if width <= F:
    units = np.arange(F) if width == F else np.sort(rng.permutation(F)[:width])
    return {"gate_proj": gate[:, units], "up_proj": up[:, units], "down_proj": down[units]}
  extra = rng.integers(0, F, width - F)
  units = np.concatenate([np.arange(F), extra])
  new_down = down[units].copy()
  new_down[F:] = 0
  return {"gate_proj": gate[:, units], "up_proj": up[:, units], "down_proj": new_down}


def upcycle_layer_mlp(dense_mlp: dict[str, np.ndarray], config: Qwen2Config, *, seed: int,
                      layer: int, reinit_fraction: float = 0.5) -> dict[str, Any]:
  """A sparse layer's MLP params (`qwen2_jax.moe.Qwen2MoeBlock`) from a dense layer's."""
  gate, up, down = (np.asarray(dense_mlp[k]) for k in ("gate_proj", "up_proj", "down_proj"))
  units = expert_units(gate.shape[1], config.num_experts, config.moe_intermediate_size, seed,
                       layer)
  experts = {}
  for name, w, src, purpose in zip(("gate_proj", "up_proj", "down_proj"), cut_experts(
      gate, up, down, units), (gate, up, down), (_GATE, _UP, _DOWN)):
    experts[name] = reinitialise(w, reinit_fraction, float(np.std(src.astype(np.float32))),
                                 seed, layer, purpose)
  H, E = gate.shape[0], config.num_experts
  router = (_rng(seed, layer, _ROUTER).standard_normal((H, E)) * config.initializer_range)
  out: dict[str, Any] = {"router": router.astype(gate.dtype), "experts": experts}
  if config.shared_expert_intermediate_size:
    out["shared_expert"] = shared_expert(gate, up, down, config.shared_expert_intermediate_size,
                                         seed, layer)
    out["shared_expert_gate"] = np.zeros((H, 1), gate.dtype)
  return out


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def upcycle_params(dense_config: Qwen2Config, dense_params: dict[str, Any],
                   config: Qwen2Config, *, seed: int = 0, reinit_fraction: float = 0.5
                   ) -> dict[str, Any]:
  """MoE params for `config` (from `moe_config`) built from a dense model's params.

  Args:
    dense_config, dense_params: the dense model (scanned or not).
    config: the MoE config (same attention / embedding shapes; its scan_layers decides the
      layout of the result).
    seed: seeds every random draw (permutations, re-initialisation, router).
    reinit_fraction: probability that an expert parameter is redrawn (step 4).

  Returns:
    Host (NumPy) params matching `api.abstract_params(config)`, in the dense params' dtype.
  """
  if not 0 <= reinit_fraction <= 1:
    raise ValueError(f"reinit_fraction must be in [0, 1], got {reinit_fraction}")
  for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings", "intermediate_size"):
    if getattr(dense_config, field) != getattr(config, field):
      raise ConfigError(f"upcycle: {field} differs between the dense model "
                        f"({getattr(dense_config, field)}) and the MoE config "
                        f"({getattr(config, field)})")
  rest, dense_layers = model.split_layers(_to_numpy(dense_params), dense_config)
  layers = []
  for i, layer in enumerate(dense_layers):
    if config.is_sparse_layer(i):
      layer = {**layer, "mlp": upcycle_layer_mlp(layer["mlp"], config, seed=seed, layer=i,
                                                 reinit_fraction=reinit_fraction)}
    layers.append(layer)
  out = model.join_layers(rest, layers, config)
  _check_shapes(out, api.abstract_params(config))
  return out


def _check_shapes(params: dict, expected: dict) -> None:
  got = {jax.tree_util.keystr(p): np.shape(v)
         for p, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  if got != want:
    bad = sorted(set(got.items()) ^ set(want.items()))
    raise ValueError(f"upcycled params do not match the MoE config: {bad[:10]}")


def upcycle_checkpoint(src: str, out: str, *, out_format: str = "hf", seed: int = 0,
                       reinit_fraction: float = 0.5, dtype: str | None = None,
                       overwrite: bool = False, max_shard_size: str = "5GB",
                       allow_nonfinite: bool = False, **moe_fields) -> Qwen2Config:
  """Reads a dense HF or Orbax checkpoint, upcycles it, writes the MoE one ("hf" or "orbax").

  `moe_fields` are `moe_config`'s keywords; `dtype` (None: keep) is the output dtype;
  `allow_nonfinite` accepts a source whose weights hold NaN or Inf. Returns the MoE config.
  """
  dense_config, dense_params = checkpoint.load(src, dtype=dtype, progress=False,
                                               allow_nonfinite=allow_nonfinite)
  config = moe_config(dense_config, **moe_fields)
  params = upcycle_params(dense_config, dense_params, config, seed=seed,
                          reinit_fraction=reinit_fraction)
  del dense_params
  if out_format == "hf":
    hf.save_hf_checkpoint(out, config, params, overwrite=overwrite,
                          max_shard_size=max_shard_size, show_progress=False)
  elif out_format == "orbax":
    orbax_io.save_orbax(out, config, params, overwrite=overwrite)
  else:
    raise ValueError(f"out_format must be 'hf' or 'orbax', got {out_format!r}")
  return config
