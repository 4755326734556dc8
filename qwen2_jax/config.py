"""Model configuration: `Qwen2Config`, HF `config.json` conversion, and presets by name.

One frozen dataclass describes a Qwen2, Qwen2.5 or Qwen2-MoE model (the HF fields) plus the
settings that only this implementation has (dtypes, layer scan, remat, kernel choices), marked
`runtime` in their field metadata: `RUNTIME_FIELDS` is derived from those marks and is the one
list of them (never written to HF `config.json`, free to differ between a checkpoint and the
run that loads it). Types are checked by `typed_config.structure` when a config is read from a
dict, a recipe or `config.json`; value ranges and consistency are checked once, in
`__post_init__`, and raise `ConfigError` naming the field. `from_hf` accepts both HF spellings
of the rope settings and keeps unknown HF fields; `from_dict` (the project's own config files and
recipes) rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from qwen2_jax.typed_config import Bool, ConfigError, Float, Int, Recipe, structure

# `qwen2_jax.remat` defines them (what each saves, in the order listed here).
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_qkv_proj",
                  "save_out_proj", "save_dot_except_mlp", "save_dot_with_context_except_mlp",
                  "save_dot_except_mlpwi", "minimal", "minimal_with_context",
                  "offload_layer_input", "qkv_proj_offloaded", "minimal_offloaded")
ATTENTION_IMPLS = ("auto", "xla", "pallas")
MOE_IMPLS = ("dense", "ragged_dot", "pallas")
_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "yarn", "linear")


def _runtime(default: Any) -> Any:
  """A field that only this implementation has (see the module docstring)."""
  return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config:
  """Architecture (HF `config.json` fields) and implementation settings of one model.

  Frozen and hashable, so it can be a static argument of `jax.jit`.
  """
  # --- architecture (names and meaning as in HF config.json) ---
  vocab_size: Int                    # embedding rows, >= tokenizer ids (Qwen2: 151936 / 152064)
  hidden_size: Int                   # model width H
  intermediate_size: Int             # dense SwiGLU width F (unused by MoE layers)
  num_hidden_layers: Int             # decoder layers L
  num_attention_heads: Int           # query heads N
  num_key_value_heads: Int           # key/value heads K; N % K == 0 (GQA)
  head_dim: Int | None = None        # None -> hidden_size // num_attention_heads (Qwen2 has none)
  max_position_embeddings: Int = 32768
  rms_norm_eps: Float = 1e-6         # read from config.json: 1e-5 on some checkpoints
  rope_theta: Float = 1_000_000.0
  rope_scaling: Mapping[str, Any] | None = None  # e.g. {"rope_type": "yarn", "factor": 4.0, ...}
  tie_word_embeddings: Bool = False  # True for 0.5B/1.5B/3B: lm_head is embed_tokens
  hidden_act: str = "silu"
  use_sliding_window: Bool = False   # False on every published checkpoint
  sliding_window: Int | None = None  # window w: key j visible from query i iff i - j < w
  max_window_layers: Int = 28        # layers i >= this use the sliding window when enabled
  attention_dropout: Float = 0.0     # kept for round trips; training here uses no dropout
  initializer_range: Float = 0.02    # std of the normal init of weights
  bos_token_id: Int | None = None
  eos_token_id: Int | tuple[Int, ...] | None = None
  pad_token_id: Int | None = None
  # --- MoE (Qwen2-MoE); num_experts == 0 means a dense model ---
  num_experts: Int = 0
  num_experts_per_tok: Int = 0
  moe_intermediate_size: Int = 0     # width of one routed expert
  shared_expert_intermediate_size: Int = 0  # width of the shared expert (0: none)
  norm_topk_prob: Bool = False       # renormalise the top-k router weights
  decoder_sparse_step: Int = 1       # layer i is sparse iff (i + 1) % step == 0 ...
  mlp_only_layers: tuple[Int, ...] = ()  # ... and i is not listed here
  router_aux_loss_coef: Float = 0.001
  # --- long context ---
  dual_chunk_attention_config: Mapping[str, Any] | None = None
  # --- implementation settings (not part of HF config.json) ---
  param_dtype: str = _runtime("float32")       # storage dtype of params
  dtype: str = _runtime("float32")             # activations' dtype (bfloat16 for training)
  logits_dtype: str | None = _runtime(None)    # None: logits in `dtype`, like the reference
  scan_layers: Bool = _runtime(True)           # nn.scan over layers: params stacked on a layer axis
  remat_policy: str = _runtime("none")         # activation checkpointing per layer: REMAT_POLICIES
  # "auto": the Pallas flash kernel when lowering for TPU (without a sliding window), else XLA.
  attention_impl: str = _runtime("auto")       # "auto" | "xla" | "pallas"
  # Training loss: LM head + cross entropy over chunks of this many sequence positions, each
  # chunk's logits recomputed in the backward pass; None: whole [B, T, V] logits at once.
  loss_chunk_size: Int | None = _runtime(None)
  moe_impl: str = _runtime("dense")            # "dense" | "ragged_dot" | "pallas"
  # None: dropless; else each expert takes at most ceil(factor * assignments / num_experts).
  moe_capacity_factor: Float | None = _runtime(None)
  # HF fields that do not affect the model, kept verbatim for round trips (JSON text).
  extra: tuple[tuple[str, str], ...] = ()

  def __post_init__(self):
    def fail(field, msg):
      raise ConfigError(f"Qwen2Config.{field}: {msg}")

    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(field, f"must be a positive integer, got {value!r}")
    if self.num_experts == 0 and self.intermediate_size <= 0:
      fail("intermediate_size", f"must be positive, got {self.intermediate_size}")
    if self.num_attention_heads % self.num_key_value_heads:
      fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
           f"num_attention_heads={self.num_attention_heads}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      fail("num_attention_heads", f"{self.num_attention_heads} does not divide "
           f"hidden_size={self.hidden_size} (and no head_dim is given)")
    if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
      fail("head_dim", f"must be a positive even integer, got {self.head_dim}")
    if self.head_dim is None and (self.hidden_size // self.num_attention_heads) % 2:
      fail("hidden_size", "hidden_size // num_attention_heads must be even for RoPE")
    if not self.rms_norm_eps > 0:
      fail("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
    if not self.rope_theta > 0:
      fail("rope_theta", f"must be > 0, got {self.rope_theta}")
    if self.hidden_act != "silu":
      fail("hidden_act", f"only 'silu' is supported (Qwen2), got {self.hidden_act!r}")
    if self.use_sliding_window and not (self.sliding_window and self.sliding_window > 0):
      fail("sliding_window", "must be a positive integer when use_sliding_window is true")
    if self.num_experts < 0:
      fail("num_experts", f"must be >= 0, got {self.num_experts}")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts:
        fail("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}], "
             f"got {self.num_experts_per_tok}")
      if self.moe_intermediate_size <= 0:
        fail("moe_intermediate_size", f"must be positive, got {self.moe_intermediate_size}")
      if self.decoder_sparse_step <= 0:
        fail("decoder_sparse_step", f"must be positive, got {self.decoder_sparse_step}")
      if self.shared_expert_intermediate_size < 0:
        fail("shared_expert_intermediate_size", "must be >= 0")
    for i in self.mlp_only_layers:
      if not 0 <= i < self.num_hidden_layers:
        fail("mlp_only_layers", f"layer {i} is outside [0, {self.num_hidden_layers})")
    if self.rope_scaling is not None:
      rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if rope_type not in _ROPE_TYPES:
        fail("rope_scaling", f"unknown rope_type {rope_type!r}; known: {_ROPE_TYPES}")
      if rope_type != "default" and not self.rope_scaling.get("factor", 0) > 0:
        fail("rope_scaling", "'factor' must be > 0")
    for field, allowed in (("param_dtype", _DTYPES), ("dtype", _DTYPES),
                           ("remat_policy", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                           ("moe_impl", MOE_IMPLS)):
      if getattr(self, field) not in allowed:
        fail(field, f"{getattr(self, field)!r} is not one of {allowed}")
    if self.dual_chunk_attention_config is not None:
      self._check_dual_chunk(fail)
    if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
      fail("moe_capacity_factor", f"must be None (dropless) or > 0, got {self.moe_capacity_factor}")
    if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
      fail("loss_chunk_size", f"must be None (whole logits) or > 0, got {self.loss_chunk_size}")
    if self.logits_dtype is not None and self.logits_dtype not in _DTYPES:
      fail("logits_dtype", f"{self.logits_dtype!r} is not one of {_DTYPES}")
    # Normalise containers so the config stays hashable and comparable.
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
    for field in ("rope_scaling", "dual_chunk_attention_config"):
      value = getattr(self, field)
      if value is not None:
        object.__setattr__(self, field, _FrozenDict(value))

  def __hash__(self):
    return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

  def _check_dual_chunk(self, fail) -> None:
    dca = self.dual_chunk_attention_config
    if not isinstance(dca, Mapping):
      fail("dual_chunk_attention_config", f"must be a mapping, got {type(dca).__name__}")
    chunk, local = dca.get("chunk_size"), dca.get("local_size")
    original = dca.get("original_max_position_embeddings", 0) or 0
    if not (isinstance(chunk, int) and isinstance(local, int) and 0 <= local < chunk):
      fail("dual_chunk_attention_config", "needs integers chunk_size > local_size >= 0, got "
           f"chunk_size={chunk!r}, local_size={local!r}")
    if not (isinstance(original, int) and original >= 0):
      fail("dual_chunk_attention_config", "original_max_position_embeddings must be an "
           f"integer >= 0, got {original!r}")
    if self.rope_type != "default":
      fail("dual_chunk_attention_config", f"DCA uses plain RoPE; rope_scaling "
           f"({self.rope_type}) cannot be combined with it (see enable_dual_chunk_attention)")
    if self.use_sliding_window:
      fail("dual_chunk_attention_config", "cannot be combined with use_sliding_window")

  # ----- derived quantities -----
  @property
  def head_size(self) -> int:
    """Per-head width D."""
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def is_sparse_layer(self, i: int) -> bool:
    """Whether decoder layer i uses the MoE block (the rule of HF Qwen2-MoE)."""
    return (self.num_experts > 0 and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0)

  def uses_sliding_window(self, i: int) -> bool:
    return bool(self.use_sliding_window) and i >= self.max_window_layers

  @property
  def dual_chunk(self) -> tuple[int, int, int] | None:
    """(chunk_size C, local_size w, original_max_position_embeddings or 0) when Dual Chunk
    Attention is on (a `dual_chunk_attention_config` is set), else None."""
    dca = self.dual_chunk_attention_config
    if dca is None:
      return None
    return (dca["chunk_size"], dca["local_size"],
            dca.get("original_max_position_embeddings", 0) or 0)

  @property
  def rope_type(self) -> str:
    if self.rope_scaling is None:
      return "default"
    return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

  def replace(self, **changes) -> "Qwen2Config":
    """A copy with `changes` applied (validated like any new config)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(f"Qwen2Config has no field(s) {sorted(unknown)}")
    return dataclasses.replace(self, **changes)

  # ----- project config files (strict) -----
  def to_dict(self) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Mapping):
        value = dict(value)
      elif isinstance(value, tuple) and f.name != "extra":
        value = list(value)
      out[f.name] = value
    out["extra"] = {k: json.loads(v) for k, v in self.extra}
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, path: str = "", recipe: Recipe | None = None,
                source: str | None = None) -> "Qwen2Config":
    """Builds a config from this project's own dict/YAML/JSON form, typed and strict.

    `path`, `recipe` and `source` say where `d` sits, for error messages (see
    `typed_config.structure`). Recipes that name a published size (`{"preset": name, ...}`) go
    through `presets.config_from_dict`.
    """
    if isinstance(d, Mapping) and isinstance(d.get("extra"), Mapping):
      d = dict(d, extra=tuple(sorted((k, json.dumps(v)) for k, v in d["extra"].items())))
    return structure(cls, d, path=path, recipe=recipe, source=source)

  # ----- HF config.json -----
  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "Qwen2Config":
    """Reads an HF config (a directory, a config.json path, or its dict).

    Accepts the published spelling (`rope_theta` + `rope_scaling`) and the one written by
    transformers >= 5 (`rope_parameters` holding `rope_theta` and the scaling). Fields that do
    not affect the model are kept in `extra`. `overrides` set implementation fields (dtype, ...).
    """
    if isinstance(source, Mapping):
      d, where = dict(source), "config dict"
    else:
      path = os.fspath(source)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.isfile(path):
        raise ConfigError(f"no HF config.json at {path}")
      try:
        with open(path, encoding="utf-8") as f:
          d = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
      except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
      if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
      where = path
    model_type = d.get("model_type", "qwen2")
    if model_type not in ("qwen2", "qwen2_moe"):
      raise ConfigError(f"{where}: model_type {model_type!r} is not qwen2 or qwen2_moe")
    names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - {"extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in d.items():
      if key in ("rope_parameters", "rope_scaling") and not isinstance(value,
                                                                      (Mapping, type(None))):
        raise ConfigError(f"{where}: {key}: expected a JSON object or null, got {value!r}")
      if key == "rope_parameters" and value is not None:
        params = dict(value)
        if "rope_theta" in params:
          kwargs["rope_theta"] = params.pop("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        kwargs["rope_scaling"] = None if rope_type == "default" else params
      elif key == "rope_scaling":
        if value is not None and value.get("rope_type", value.get("type")) != "default":
          kwargs["rope_scaling"] = dict(value)
      elif key in names and key not in ("rope_scaling",):
        kwargs[key] = value
      elif key in ("architectures", "model_type"):
        continue  # derived from the config on write
      else:
        extra[key] = value
    if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
      kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    if kwargs.get("intermediate_size") is None:
      kwargs["intermediate_size"] = 0
    if not kwargs.get("use_sliding_window", False):
      extra.setdefault("sliding_window", kwargs.pop("sliding_window", None))
    if model_type == "qwen2" and "num_experts" in kwargs:
      extra["num_experts"] = kwargs.pop("num_experts")
    kwargs["extra"] = tuple(sorted((k, json.dumps(v)) for k, v in extra.items()))
    config = structure(cls, kwargs, source=where)
    try:
      return config.replace(**overrides)
    except ConfigError as e:
      raise ConfigError(f"{where}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict (published spelling: `rope_theta` + `rope_scaling`)."""
    extra = {k: json.loads(v) for k, v in self.extra}
    d: dict[str, Any] = {
        "architectures": ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"],
        "model_type": "qwen2_moe" if self.is_moe else "qwen2",
    }
    skip = set(RUNTIME_FIELDS) | {"extra", "head_dim", "dual_chunk_attention_config"}
    if not self.is_moe:
      skip |= {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
               "mlp_only_layers", "router_aux_loss_coef"}
    for f in dataclasses.fields(self):
      if f.name in skip:
        continue
      value = getattr(self, f.name)
      if isinstance(value, Mapping):
        value = dict(value)
      elif isinstance(value, tuple):
        value = list(value)
      d[f.name] = value
    if self.head_dim is not None:
      d["head_dim"] = self.head_dim
    if self.dual_chunk_attention_config is not None:
      d["dual_chunk_attention_config"] = dict(self.dual_chunk_attention_config)
    for key, value in extra.items():
      if d.get(key) is None:  # e.g. an unused sliding_window kept verbatim
        d[key] = value
    # transformers >= 5 rejects a stale layer_types list of the wrong length; drop it so the
    # reader recomputes it from use_sliding_window / max_window_layers.
    if len(d.get("layer_types") or []) != self.num_hidden_layers:
      d.pop("layer_types", None)
    return d

  def save_hf(self, directory: str | os.PathLike) -> None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
      f.write("\n")


def enable_dual_chunk_attention(config: Qwen2Config, *, chunk_size: int | None = None,
                                local_size: int | None = None,
                                original_max_position_embeddings: int | None = None
                                ) -> Qwen2Config:
  """`config` with Dual Chunk Attention on (An et al. 2024, "Training-Free Long-Context Scaling
  of Large Language Models", as used by Qwen2 for contexts beyond 32K).

  Defaults are ChunkLlama's, from the pretraining length L0 (`original_max_position_embeddings`
  if given, else the YaRN setting's, else min(max_position_embeddings, 32768), Qwen2's
  pretraining context): chunk_size = 3/4 L0, local_size = L0 / 16; the logit scale of long
  inputs uses L0 too. DCA rotates with plain RoPE, so `rope_scaling` is dropped (YaRN and DCA
  are alternatives here). A config that already has a DCA setting keeps the values not given.
  """
  old = dict(config.dual_chunk_attention_config or {})
  base = original_max_position_embeddings or old.get("original_max_position_embeddings") or (
      (config.rope_scaling or {}).get("original_max_position_embeddings")
      or min(config.max_position_embeddings, 32768))
  dca = {**old,
         "chunk_size": int(chunk_size or old.get("chunk_size") or base * 3 // 4),
         "local_size": int(local_size if local_size is not None
                           else old.get("local_size", base // 16)),
         "original_max_position_embeddings": int(base)}
  return config.replace(dual_chunk_attention_config=dca, rope_scaling=None)


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(Qwen2Config) if f.metadata.get("runtime"))


class _FrozenDict(dict):
  """A read-only dict, so configs holding rope/DCA settings stay immutable."""

  def _readonly(self, *args, **kwargs):
    raise TypeError("config mappings are read-only; use Qwen2Config.replace")

  __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly

  def __hash__(self):
    return hash(json.dumps(self, sort_keys=True))


def num_params(config: Qwen2Config) -> int:
  """Analytic parameter count (also checked against `jax.eval_shape` in tests)."""
  H, L, V, D = config.hidden_size, config.num_hidden_layers, config.vocab_size, config.head_size
  N, K = config.num_attention_heads, config.num_key_value_heads
  attn = H * N * D + N * D + 2 * (H * K * D + K * D) + N * D * H
  total = V * H * (1 if config.tie_word_embeddings else 2) + H
  for i in range(L):
    if config.is_sparse_layer(i):
      mlp = config.num_experts * 3 * H * config.moe_intermediate_size + config.num_experts * H
      if config.shared_expert_intermediate_size:
        mlp += 3 * H * config.shared_expert_intermediate_size + H
    else:
      mlp = 3 * H * config.intermediate_size
    total += attn + mlp + 2 * H
  return total

