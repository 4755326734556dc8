"""qwen2-jax: Qwen2 / Qwen2.5 / Qwen2-MoE in pure functional JAX + Flax.

Stable API:
  Qwen2Config, get_preset, init_params, forward, load_checkpoint (HF or Orbax, see
  `qwen2_jax.checkpoint.load`), load_hf_checkpoint, save_hf_checkpoint, save_orbax,
  restore_orbax, CheckpointError, load_tokenizer.

Names are imported on first use, so that `qwen2-jax --help` and the CLI's argument errors do not
wait for jax, flax, orbax and tokenizers to import.
"""

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS = {
    "abstract_params": ("qwen2_jax.api", "abstract_params"),
    "count_params": ("qwen2_jax.api", "count_params"),
    "forward": ("qwen2_jax.api", "forward"),
    "init_params": ("qwen2_jax.api", "init_params"),
    "param_logical_axes": ("qwen2_jax.api", "param_logical_axes"),
    "ConfigError": ("qwen2_jax.config", "ConfigError"),
    "Qwen2Config": ("qwen2_jax.config", "Qwen2Config"),
    "get_preset": ("qwen2_jax.presets", "get_preset"),
    "preset_names": ("qwen2_jax.presets", "preset_names"),
    "load_checkpoint": ("qwen2_jax.checkpoint", "load"),
    "load_hf_checkpoint": ("qwen2_jax.checkpoint", "load_hf_checkpoint"),
    "save_hf_checkpoint": ("qwen2_jax.checkpoint", "save_hf_checkpoint"),
    "save_orbax": ("qwen2_jax.checkpoint", "save_orbax"),
    "restore_orbax": ("qwen2_jax.checkpoint", "restore_orbax"),
    "CheckpointError": ("qwen2_jax.checkpoint", "CheckpointError"),
    "load_tokenizer": ("qwen2_jax.tokenizer", "load_tokenizer"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'qwen2_jax' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
