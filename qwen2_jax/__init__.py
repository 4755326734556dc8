"""qwen2-jax: Qwen2 / Qwen2.5 / Qwen2-MoE in pure functional JAX + Flax.

Stable API:
  Qwen2Config, get_preset, init_params, forward, load_hf_checkpoint, save_hf_checkpoint,
  save_orbax, restore_orbax, load_tokenizer.
"""

from qwen2_jax.api import abstract_params, count_params, forward, init_params, param_logical_axes
from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.presets import get_preset, preset_names

__version__ = "0.1.0"


def __getattr__(name):
  # Checkpoint and tokenizer modules pull in safetensors/orbax/tokenizers: import on first use.
  if name in ("load_hf_checkpoint", "save_hf_checkpoint", "CheckpointError"):
    from qwen2_jax.checkpoint import hf
    return getattr(hf, name)
  if name in ("save_orbax", "restore_orbax"):
    from qwen2_jax.checkpoint import orbax_io
    return getattr(orbax_io, name)
  if name == "load_tokenizer":
    from qwen2_jax.tokenizer import load_tokenizer
    return load_tokenizer
  raise AttributeError(f"module 'qwen2_jax' has no attribute {name!r}")
