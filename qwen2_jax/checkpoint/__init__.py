"""Checkpoint formats: HF safetensors (`hf`), Orbax (`orbax_io`), the key map between them
(`keymap`), and `load`, the one place that tells them apart.

  config, params = checkpoint.load("path/to/Qwen2-0.5B")                 # HF or Orbax dir
  config, params = checkpoint.load(path, dtype="bfloat16",
                                   shardings=lambda c: sharding.param_shardings(c, mesh, rules))
"""

from __future__ import annotations

import os
from typing import Any, Callable

from qwen2_jax.checkpoint import hf, orbax_io
from qwen2_jax.checkpoint.checks import (CheckpointError, CheckpointNotFoundError,
                                         NonFiniteWeightsError, OutputExistsError)
from qwen2_jax.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from qwen2_jax.checkpoint.orbax_io import load_orbax_config, restore_orbax, save_orbax
from qwen2_jax.checkpoint.safetensors_io import SafetensorsError
from qwen2_jax.config import Qwen2Config

__all__ = ["CheckpointError", "CheckpointNotFoundError", "NonFiniteWeightsError",
           "OutputExistsError", "SafetensorsError", "checkpoint_format", "load", "load_config",
           "load_hf_checkpoint", "load_orbax_config", "restore_orbax", "save_hf_checkpoint",
           "save_orbax"]

_EXPECTED = (f"expected an HF checkpoint directory (config.json + {hf.SINGLE_FILE} or "
             f"{hf.INDEX_FILE}) or an Orbax one (config.json + {orbax_io.PARAMS_DIR}/)")


def checkpoint_format(path: str | os.PathLike) -> str:
  """"orbax" or "hf": which kind of checkpoint directory `path` is.

  Raises:
    CheckpointNotFoundError: `path` does not exist, is not a directory, or is neither kind.
  """
  directory = os.fspath(path)
  if not os.path.exists(directory):
    raise CheckpointNotFoundError(f"{directory}: no such directory ({_EXPECTED})")
  if not os.path.isdir(directory):
    raise CheckpointNotFoundError(f"{directory}: not a directory ({_EXPECTED})")
  if os.path.isdir(os.path.join(directory, orbax_io.PARAMS_DIR)):
    return "orbax"
  if any(os.path.isfile(os.path.join(directory, name)) for name in (hf.SINGLE_FILE, hf.INDEX_FILE)):
    return "hf"
  raise CheckpointNotFoundError(f"{directory}: not a checkpoint ({_EXPECTED})")


def load(path: str | os.PathLike, *, dtype: str | None = None,
         shardings: Any | Callable[[Qwen2Config], Any] = None, progress: bool = True,
         allow_nonfinite: bool = False, **config_overrides) -> tuple[Qwen2Config, dict[str, Any]]:
  """(config, params) from an HF directory or an Orbax params directory.

  Args:
    path: the checkpoint directory (`checkpoint_format` says which kind).
    dtype: the params' dtype ("float32", "bfloat16", ...); None keeps the stored dtype.
    shardings: where to put the params: a tree like the params of `jax.sharding.Sharding`, or a
      function config -> such a tree (e.g. `lambda c: sharding.param_shardings(c, mesh,
      rules)`); each process then reads only what its devices hold. None: the default device.
    progress: a progress bar while reading (HF).
    allow_nonfinite: load weights holding NaN or Inf (logged as warnings) instead of raising
      `NonFiniteWeightsError`.
    **config_overrides: implementation settings of the returned config (`scan_layers`,
      `attention_impl`, `moe_impl`, ...); `compute_dtype` sets the activation dtype
      (`config.dtype`), since `dtype` here is the params'.

  Raises:
    CheckpointNotFoundError: `path` is missing or not a checkpoint directory (the message says
      what was expected); `CheckpointError` and its kinds: a checkpoint that is malformed or
      does not match its config.json, naming the file and key.
  """
  if checkpoint_format(path) == "orbax":
    return restore_orbax(path, dtype=dtype, shardings=shardings,
                         allow_nonfinite=allow_nonfinite, **config_overrides)
  return load_hf_checkpoint(path, dtype=dtype, shardings=shardings, show_progress=progress,
                            allow_nonfinite=allow_nonfinite, **config_overrides)


def load_config(path: str | os.PathLike, **config_overrides) -> Qwen2Config:
  """The config of the checkpoint at `path` (HF or Orbax), without reading weights."""
  if checkpoint_format(path) == "orbax":
    return load_orbax_config(path, **config_overrides)
  compute_dtype = config_overrides.pop("compute_dtype", None)
  if compute_dtype is not None:
    config_overrides["dtype"] = compute_dtype
  return Qwen2Config.from_hf(path, **config_overrides)
