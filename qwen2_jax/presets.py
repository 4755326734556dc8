"""Published model sizes by name (`get_preset("qwen2-7b")`), plus tiny configs for tests and demos.

Values are those of the released `config.json` files of the Qwen2 / Qwen2.5 checkpoints. A config
read from a checkpoint's own `config.json` always wins over a preset: presets exist for planning
(`qwen2-jax compile`), training from scratch and parameter-count checks.
"""

from __future__ import annotations

from typing import Any, Mapping

from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.typed_config import Recipe

_ENDOFTEXT = 151643

# name: (vocab, hidden, intermediate, layers, heads, kv_heads, tied, extra fields)
_DENSE = {
    "qwen2-0.5b": (151936, 896, 4864, 24, 14, 2, True, {}),
    "qwen2-1.5b": (151936, 1536, 8960, 28, 12, 2, True, {}),
    "qwen2-7b": (152064, 3584, 18944, 28, 28, 4, False, {}),
    # Qwen2-72B base ships rms_norm_eps 1e-5; a loaded config.json always wins.
    "qwen2-72b": (152064, 8192, 29568, 80, 64, 8, False, {"rms_norm_eps": 1e-5}),
    "qwen2.5-0.5b": (151936, 896, 4864, 24, 14, 2, True, {}),
    "qwen2.5-1.5b": (151936, 1536, 8960, 28, 12, 2, True, {}),
    "qwen2.5-3b": (151936, 2048, 11008, 36, 16, 2, True, {}),
    "qwen2.5-7b": (152064, 3584, 18944, 28, 28, 4, False, {}),
    "qwen2.5-14b": (152064, 5120, 13824, 48, 40, 8, False, {}),
    "qwen2.5-32b": (152064, 5120, 27648, 64, 40, 8, False, {}),
    "qwen2.5-72b": (152064, 8192, 29568, 80, 64, 8, False, {}),
}

_MOE = {
    "qwen2-57b-a14b": dict(
        vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480, norm_topk_prob=False, decoder_sparse_step=1,
        router_aux_loss_coef=0.001),
}

# Tiny shapes for tests and the CPU demo: same code paths as the real sizes.
_TINY = {
    "qwen2-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, max_position_embeddings=2048),
    "qwen2-tiny-tied": dict(vocab_size=509, hidden_size=56, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
                            tie_word_embeddings=True, max_position_embeddings=2048),
    "qwen2-moe-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, max_position_embeddings=2048,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=64),
}


def preset_names() -> list[str]:
  return sorted([*_DENSE, *_MOE, *_TINY])


def get_preset(name: str, **overrides) -> Qwen2Config:
  """The config of a published size (or a tiny test size) by name, with `overrides` applied."""
  key = name.lower()
  if key in _DENSE:
    vocab, hidden, inter, layers, heads, kv, tied, extra = _DENSE[key]
    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                  tie_word_embeddings=tied, **extra)
  elif key in _MOE:
    fields = dict(_MOE[key])
  elif key in _TINY:
    fields = dict(_TINY[key])
  else:
    raise ConfigError(f"unknown preset {name!r}; known presets: {preset_names()}")
  fields.setdefault("max_position_embeddings", 32768)
  fields.setdefault("bos_token_id", _ENDOFTEXT if key not in _TINY else None)
  fields.setdefault("eos_token_id", _ENDOFTEXT if key not in _TINY else None)
  fields.setdefault("rope_theta", 1_000_000.0)
  fields.update(overrides)
  return Qwen2Config(**fields)


def config_from_dict(d: Mapping[str, Any], *, path: str = "", recipe: Recipe | None = None
                     ) -> Qwen2Config:
  """A model config from a recipe's `model` section: `{"preset": name, **fields}` (a published
  size with `fields` set on it) or every field (`Qwen2Config.from_dict`); typed and strict."""
  if not isinstance(d, Mapping) or "preset" not in d:
    return Qwen2Config.from_dict(d, path=path, recipe=recipe)
  fields = dict(d)
  name = fields.pop("preset")
  try:
    base = get_preset(str(name)).to_dict()
  except ConfigError as e:
    where = recipe.where(tuple(path.split(".")) + ("preset",)) if recipe else None
    raise ConfigError(f"{where + ': ' if where else ''}{path + '.' if path else ''}preset: "
                      f"{e}") from None
  return Qwen2Config.from_dict({**base, **fields}, path=path, recipe=recipe)
