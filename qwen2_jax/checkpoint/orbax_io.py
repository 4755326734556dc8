"""Orbax param checkpoints: `<dir>/config.json` (HF spelling plus our settings) + `<dir>/params`.

Restore takes an optional tree of target shardings (or a mesh + rules via the sharding module),
so each array is read straight into its place; without it, arrays land on the default device.
Training checkpoints (params + optimizer + data state) are managed by the training loop; this
module is the params-only format that `qwen2-jax convert` reads and writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from qwen2_jax.api import abstract_params
from qwen2_jax.config import Qwen2Config

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_orbax(path: str | os.PathLike, config: Qwen2Config, params: dict[str, Any], *,
               overwrite: bool = False) -> None:
  """Saves params (and the config) to an Orbax directory; atomic (Orbax finalises by rename)."""
  directory = os.path.abspath(os.fspath(path))
  if os.path.exists(os.path.join(directory, PARAMS_DIR)) and not overwrite:
    raise FileExistsError(f"{directory} already holds an Orbax checkpoint; pass overwrite=True")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=overwrite)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    hf = config.to_hf_dict()
    hf["qwen2_jax"] = {k: v for k, v in config.to_dict().items()
                       if k in ("param_dtype", "dtype", "scan_layers", "remat_policy",
                                "attention_impl", "moe_impl", "logits_dtype")}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))
  if jax.process_count() > 1:
    # Other processes may read config.json right after this returns (restore, resume).
    multihost_utils.sync_global_devices(f"qwen2_jax.save_orbax:{directory}")


def load_orbax_config(path: str | os.PathLike, **overrides) -> Qwen2Config:
  directory = os.fspath(path)
  file = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {CONFIG_FILE} in Orbax checkpoint directory {directory}")
  with open(file) as f:
    d = json.load(f)
  ours = d.pop("qwen2_jax", {})
  ours.update(overrides)
  return Qwen2Config.from_hf(d, **ours)


def restore_orbax(path: str | os.PathLike, *, shardings: Any | None = None,
                  dtype: str | None = None, mesh: Any = None, rules: Any = None,
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
    **overrides: implementation settings for the returned config.
  """
  directory = os.path.abspath(os.fspath(path))
  config = load_orbax_config(directory, **overrides)
  if dtype is not None:
    config = config.replace(param_dtype=dtype)
  shapes = abstract_params(config)
  if mesh is not None and shardings is None:
    from qwen2_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    shardings = sharding_lib.param_shardings(config, mesh, sharding_lib.get_rules(rules or "fsdp"))
  if callable(shardings):
    shardings = shardings(config)
  if shardings is None:
    device = jax.devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype), sharding=sh),
                        shapes, shardings)
  params_dir = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"no '{PARAMS_DIR}' Orbax directory in {directory}")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, target)
  return config, params
