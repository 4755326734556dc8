"""Orbax param checkpoints: `<dir>/config.json` (HF spelling plus our settings) + `<dir>/params`.

Restore takes an optional tree of target shardings (or a mesh + rules via the sharding module),
so each array is read straight into its place; without it, arrays land on the default device.
Restored params are checked for NaN / Inf on device (`checks.check_finite_tree`). Saving writes
the whole directory into a staging directory beside the target and renames it when complete;
overwriting never removes a file this module did not write (`output_dir`). Training checkpoints
(params + optimizer + data state) are managed by the training loop; this module is the
params-only format that `qwen2-jax convert` reads and writes.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from qwen2_jax import sharding as sharding_lib
from qwen2_jax.api import abstract_params
from qwen2_jax.checkpoint import output_dir
from qwen2_jax.checkpoint.checks import (CheckpointError, CheckpointNotFoundError,
                                         check_finite_tree, read_json)
from qwen2_jax.config import RUNTIME_FIELDS, ConfigError, Qwen2Config

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
_OURS = "qwen2_jax"  # the config.json key holding the implementation settings


def owned_entry(name: str) -> bool:
  """Whether `name` is an entry `save_orbax` writes in its directory."""
  return name in (CONFIG_FILE, PARAMS_DIR)


def _shared_token() -> str:
  """A staging-directory token every process agrees on (they all write into it)."""
  if jax.process_count() == 1:
    return output_dir.new_token()
  token = multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31)))
  return f"{int(token):08x}"


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"qwen2_jax.save_orbax:{name}")


def save_orbax(path: str | os.PathLike, config: Qwen2Config, params: dict[str, Any], *,
               overwrite: bool = False) -> None:
  """Saves params (and the config) to an Orbax directory, complete-then-rename.

  With `overwrite`, an existing `path` may hold only config.json and params/ (what this writes);
  anything else makes it refuse, naming the entry, before writing anything.

  Raises:
    OutputExistsError: `path` is not empty and `overwrite` is off, or holds other entries.
  """
  target = os.path.realpath(os.fspath(path))  # a symlinked output: replace what it points at
  output_dir.check_target(target, overwrite=overwrite, owned=owned_entry, writer="save_orbax")
  token = _shared_token()
  staging = output_dir.staging_path(target, token)
  if jax.process_index() == 0:
    output_dir.make_staging(target, token)
  _sync(f"staging:{target}")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(staging, PARAMS_DIR), params)
      ckptr.wait_until_finished()
    _sync(f"saved:{target}")
    if jax.process_index() == 0:
      hf = config.to_hf_dict()
      hf[_OURS] = {k: v for k, v in config.to_dict().items() if k in RUNTIME_FIELDS}
      with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
      output_dir.commit(staging, target, owned=owned_entry, keep=lambda _: False,
                        writer="save_orbax")
  except BaseException:
    if jax.process_index() == 0:
      output_dir.discard(staging)
    raise
  # Other processes may read the checkpoint right after this returns (restore, resume).
  _sync(f"done:{target}")


def load_orbax_config(path: str | os.PathLike, **overrides) -> Qwen2Config:
  """The config stored in an Orbax directory, with implementation `overrides` (`compute_dtype`
  sets the activation dtype, like `dtype` does).

  Raises:
    CheckpointNotFoundError: no config.json; `CheckpointError` / `ConfigError`: a malformed one
      (the message names the file).
  """
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(file):
    raise CheckpointNotFoundError(f"{file}: missing (an Orbax params checkpoint holds "
                                  f"{CONFIG_FILE} and {PARAMS_DIR}/)")
  d = read_json(file, "an Orbax checkpoint's config")
  if not isinstance(d, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
  ours = d.pop(_OURS, {})
  if not isinstance(ours, dict) or set(ours) - set(RUNTIME_FIELDS):
    raise CheckpointError(f"{file}: '{_OURS}' must be an object with keys among "
                          f"{list(RUNTIME_FIELDS)}, got {ours!r}")
  try:
    config = Qwen2Config.from_hf(d, **ours)
  except ConfigError as e:
    raise ConfigError(f"{file}: {str(e).removeprefix('config dict: ')}") from None
  compute_dtype = overrides.pop("compute_dtype", None)
  if compute_dtype is not None:
    overrides["dtype"] = compute_dtype
  return config.replace(**overrides)


def restore_orbax(path: str | os.PathLike, *, shardings: Any | None = None,
                  dtype: str | None = None, mesh: Any = None, rules: Any = None,
                  allow_nonfinite: bool = False,
                  **overrides) -> tuple[Qwen2Config, dict[str, Any]]:
  """Restores (config, params) from `save_orbax`'s directory.

  Args:
    path: the checkpoint directory.
    shardings: optional tree (like the params) of `jax.sharding.Sharding`, or a function
      config -> such a tree; each array is restored directly into it (each process reads only
      the chunks its devices hold).
    mesh, rules: instead of `shardings`, the mesh and rules (default "fsdp") of
      `qwen2_jax.sharding` that give them.
    dtype: cast params to this dtype on restore; None keeps the saved dtype.
    allow_nonfinite: restore params holding NaN or Inf (each is logged as a warning).
    **overrides: implementation settings for the returned config; `compute_dtype` sets the
      activation dtype (`config.dtype`), since `dtype` here is the params'.

  Raises:
    CheckpointNotFoundError: no config.json or params/; `NonFiniteWeightsError`: a param holds
      NaN or Inf.
  """
  directory = os.path.abspath(os.fspath(path))
  config = load_orbax_config(directory, **overrides)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointNotFoundError(f"{params_dir}: missing (an Orbax params checkpoint holds "
                                  f"{CONFIG_FILE} and {PARAMS_DIR}/)")
  shapes = abstract_params(config)
  if mesh is not None and shardings is None:
    shardings = sharding_lib.param_shardings(config, mesh, sharding_lib.get_rules(rules or "fsdp"))
  if callable(shardings):
    shardings = shardings(config)
  if shardings is None:
    device = jax.devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype), sharding=sh),
                        shapes, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, target)
  check_finite_tree(params, file=params_dir, allow=allow_nonfinite)
  return config, params
