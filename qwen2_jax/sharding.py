"""Device meshes and logical sharding rules: the one place that maps model axis names to mesh axes.

The model names every param dimension and key activation with a logical axis ("embed", "mlp",
"activation_batch", ...; see `qwen2_jax.model`). A rules table maps each logical name to a tuple
of mesh axes; nothing else in the package names a mesh axis. The mesh has five named axes,
outermost first (the last axis gets the closest devices, so tensor parallelism rides the fastest
ICI links):

  data      pure data parallelism: params replicated, batch split
  fsdp      ZeRO-3 style: batch split AND params/grads/optimizer state sharded
  sequence  context parallelism through GSPMD: activations split on the length axis (attention
            gathers K/V); params are sharded over it like fsdp in the fsdp presets
  expert    expert parallelism for Qwen2-MoE ("experts" params); batch is split over it too
  tensor    Megatron-style tensor parallelism: heads, MLP width and vocabulary split

Rule presets: "dp" (params replicated), "fsdp" (params sharded on the hidden axis over fsdp and
sequence; with data > 1 this is hybrid sharding), "fsdp_tp" (fsdp plus tensor parallel heads,
MLP width and vocabulary). A custom table is a mapping {logical name: mesh axis | [mesh axes] |
null}, alone or as {"preset": name, "overrides": {...}}.

Resolution rules (the same for params and activations): a mesh axis is used at most once per
array (the first dimension that claims it keeps it), size-1 axes are dropped, and for arrays of
known shape an axis that does not divide its dimension is dropped (so 2 KV heads stay replicated
under tensor=4 instead of failing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from qwen2_jax import api, typed_config
from qwen2_jax.typed_config import Int
from qwen2_jax.config import Qwen2Config
from qwen2_jax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")

PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm", "layers",
              "experts")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_heads", "activation_kv_heads", "activation_kv", "activation_mlp",
                   "activation_vocab", "activation_experts")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

# (logical name, mesh axes) pairs; hashable, so it can be a static argument of jit.
Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = {"activation_batch": ("data", "fsdp", "expert"), "activation_length": ("sequence",)}
_FSDP = {"embed": ("fsdp", "sequence"), "experts": ("expert",)}
_TP = {"vocab": ("tensor",), "q_heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
       "activation_heads": ("tensor",), "activation_kv_heads": ("tensor",),
       "activation_mlp": ("tensor",), "activation_vocab": ("tensor",)}
RULE_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "dp": {**_BATCH},
    "fsdp": {**_BATCH, **_FSDP},
    "fsdp_tp": {**_BATCH, **_FSDP, **_TP},
}


class ShardingError(UserError, ValueError):
  """A mesh or rules table is inconsistent; the message names the axis or logical name."""


# ----------------------------------------------------------------------------------------- mesh

@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Sizes of the mesh axes within one slice; one of them may be -1 (all remaining devices)."""
  data: Int = 1
  fsdp: Int = -1
  sequence: Int = 1
  expert: Int = 1
  tensor: Int = 1
  num_slices: Int = 1      # multi-slice: this many ICI slices joined over DCN
  dcn_axis: str = "data"   # the mesh axis that spans slices (its total size is ici * num_slices)

  def __post_init__(self):
    sizes = [getattr(self, a) for a in MESH_AXES]
    if any(not isinstance(s, int) or (s < 1 and s != -1) for s in sizes):
      raise ShardingError(f"mesh axis sizes must be positive or -1, got {self.ici_dict()}")
    if sizes.count(-1) > 1:
      raise ShardingError(f"at most one mesh axis may be -1, got {self.ici_dict()}")
    if self.num_slices < 1:
      raise ShardingError(f"num_slices must be >= 1, got {self.num_slices}")
    if self.dcn_axis not in MESH_AXES:
      raise ShardingError(f"dcn_axis {self.dcn_axis!r} is not one of {MESH_AXES}")

  def ici_dict(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in MESH_AXES}

  def ici_shape(self, num_devices: int) -> dict[str, int]:
    """Per-slice axis sizes with the -1 filled in, for `num_devices` devices in all slices."""
    if num_devices % self.num_slices:
      raise ShardingError(f"{num_devices} devices do not split into {self.num_slices} slices")
    per_slice = num_devices // self.num_slices
    sizes = self.ici_dict()
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
      if per_slice % known:
        raise ShardingError(f"mesh {sizes} does not fit {per_slice} devices per slice: the fixed "
                            f"axes multiply to {known}, which does not divide {per_slice}")
      sizes = {a: (per_slice // known if s == -1 else s) for a, s in sizes.items()}
    elif known != per_slice:
      raise ShardingError(f"mesh {sizes} needs {known} devices per slice, have {per_slice}")
    return sizes

  def shape(self, num_devices: int) -> dict[str, int]:
    """Global axis sizes (the DCN axis multiplied by num_slices)."""
    sizes = self.ici_shape(num_devices)
    sizes[self.dcn_axis] *= self.num_slices
    return sizes

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, path: str = "mesh",
                recipe: typed_config.Recipe | None = None) -> "MeshConfig":
    """A mesh from a recipe's `mesh:` mapping, typed and strict (`typed_config.structure`).
    When another axis is the fill-in one (-1), `fsdp` no longer defaults to -1 but to 1."""
    if isinstance(d, MeshConfig):
      return d
    if isinstance(d, Mapping) and "fsdp" not in d and any(
        str(v).strip() == "-1" for k, v in d.items() if k != "dcn_axis"):
      d = {**d, "fsdp": 1}
    return typed_config.structure(cls, d, path=path, recipe=recipe)

  @classmethod
  def from_string(cls, text: str) -> "MeshConfig":
    """Parses "fsdp=-1,tensor=4" (unnamed axes keep their defaults; "" is the default mesh)."""
    items = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      key, sep, value = part.partition("=")
      if not sep:
        raise ShardingError(f"mesh item {part!r} is not name=size (e.g. 'fsdp=-1,tensor=4')")
      items[key.strip()] = value.strip()
    return cls.from_dict(items)


def make_mesh(mesh_config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes MESH_AXES over `devices` (default: all devices of all processes).

  Multi-slice: devices carrying a `slice_index` are laid out with the DCN axis across slices;
  devices without one (CPU) are split into `num_slices` contiguous groups.
  """
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  devices = list(jax.devices() if devices is None else devices)
  ici = mesh_config.ici_shape(len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  # Physical torus axes may be split (tensor=4 on a 16x16 slice), else some shapes are refused.
  if mesh_config.num_slices == 1:
    grid = mesh_utils.create_device_mesh([ici[a] for a in MESH_AXES], devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  dcn = [mesh_config.num_slices if a == mesh_config.dcn_axis else 1 for a in MESH_AXES]
  if all(hasattr(d, "slice_index") for d in devices):
    grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], dcn, devices,
                                                allow_split_physical_axes=True)
  else:
    k = MESH_AXES.index(mesh_config.dcn_axis)
    per = len(devices) // mesh_config.num_slices
    slices = [np.array(devices[i * per:(i + 1) * per], dtype=object).reshape(
        [ici[a] for a in MESH_AXES]) for i in range(mesh_config.num_slices)]
    grid = np.concatenate(slices, axis=k)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


# ---------------------------------------------------------------------------------------- rules

def _as_axes(value: Any, name: str) -> tuple[str, ...]:
  if value is None:
    return ()
  axes = (value,) if isinstance(value, str) else tuple(value)
  for a in axes:
    if a not in MESH_AXES:
      raise ShardingError(f"rule for {name!r}: {a!r} is not a mesh axis; known: {MESH_AXES}")
  return axes


def make_rules(table: Mapping[str, Any]) -> Rules:
  """Validates a {logical name: mesh axis | [mesh axes] | None} table into `Rules`."""
  unknown = sorted(set(table) - set(LOGICAL_AXES))
  if unknown:
    raise ShardingError(f"unknown logical axis name(s) {unknown}; known: {list(LOGICAL_AXES)}")
  return tuple((name, _as_axes(table[name], name)) for name in LOGICAL_AXES
               if _as_axes(table.get(name), name))


def get_rules(spec: str | os.PathLike | Mapping[str, Any] | Rules = "fsdp") -> Rules:
  """Rules from a preset name, a JSON file, a table, or {"preset": ..., "overrides": {...}}."""
  if isinstance(spec, tuple):
    return make_rules(dict(spec))
  if isinstance(spec, (str, os.PathLike)):
    if str(spec) in RULE_PRESETS:
      return make_rules(RULE_PRESETS[str(spec)])
    if not os.path.isfile(spec):
      raise ShardingError(f"rules {str(spec)!r} is neither a preset {sorted(RULE_PRESETS)} nor "
                          "a JSON file")
    with open(spec) as f:
      spec = json.load(f)
  spec = dict(spec)
  if "preset" in spec or "overrides" in spec:
    extra = sorted(set(spec) - {"preset", "overrides"})
    if extra:
      raise ShardingError(f"rules with a preset take only 'preset' and 'overrides', got {extra}")
    preset = spec.get("preset", "dp")
    if preset not in RULE_PRESETS:
      raise ShardingError(f"unknown rules preset {preset!r}; known: {sorted(RULE_PRESETS)}")
    return make_rules({**RULE_PRESETS[preset], **dict(spec.get("overrides") or {})})
  return make_rules(spec)


def check_mesh_uses_rules(mesh: Mesh, rules: Rules) -> None:
  """Raises if a mesh axis of size > 1 is named by no rule (its devices would do duplicate work)."""
  used = {a for _, axes in rules for a in axes}
  idle = [a for a, s in mesh.shape.items() if s > 1 and a not in used]
  if idle:
    raise ShardingError(f"mesh axis/axes {idle} have size > 1 but no rule uses them "
                        f"(rules name {sorted(used)}); pick other rules or shrink the mesh")


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
  """The `PartitionSpec` of one array from its logical names (see the module docstring).

  `shape` (optional; None for a dimension of unknown size) drops axes that do not divide."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    kept: list[str] = []
    for axis in table.get(name, ()) if name is not None else ():
      size = 1 if mesh is None else mesh.shape.get(axis, 0)
      if axis in used or (mesh is not None and size <= 1):
        continue
      if mesh is not None and shape is not None and shape[i] is not None and \
          shape[i] % (math.prod(mesh.shape[a] for a in kept) * size):
        continue
      kept.append(axis)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _activation_sizes(config: Qwen2Config) -> dict[str, int]:
  return {"activation_embed": config.hidden_size, "activation_heads": config.num_attention_heads,
          "activation_kv_heads": config.num_key_value_heads, "activation_kv": config.head_size,
          "activation_mlp": config.intermediate_size, "activation_vocab": config.vocab_size}


def flax_rules(rules: Rules, mesh: Mesh, config: Qwen2Config | None = None):
  """Rules in Flax's format for `nn.with_logical_constraint`, filtered for this mesh (and model:
  axes that do not divide a model dimension, such as tensor=8 over 4 KV heads, are dropped)."""
  sizes = _activation_sizes(config) if config is not None else {}
  out = []
  for name, axes in rules:
    spec = logical_to_spec((name,), rules, mesh, (sizes[name],) if name in sizes else None)
    out.append((name, spec[0] if len(spec) else None))
  return tuple(out)


@contextlib.contextmanager
def activation_rules(rules: Rules, mesh: Mesh, config: Qwen2Config | None = None) -> Iterator[None]:
  """Context for tracing the model: the abstract mesh plus the rules for its activations."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(flax_rules(rules, mesh, config)):
    yield


# ------------------------------------------------------------------------------------ shardings

def param_specs(config: Qwen2Config, mesh: Mesh, rules: Rules) -> Any:
  """A tree like the params of `PartitionSpec`s (shape-aware, see `logical_to_spec`)."""
  shapes = api.abstract_params(config)
  names = api.param_logical_axes(config)
  return jax.tree.map(lambda s, n: logical_to_spec(tuple(n), rules, mesh, s.shape), shapes, names,
                      is_leaf=lambda x: isinstance(x, P))


def param_shardings(config: Qwen2Config, mesh: Mesh, rules: Rules) -> Any:
  """A tree like the params of `NamedSharding`s."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None) -> P:
  """Spec of a [B, T] batch array (token ids, targets, masks)."""
  return logical_to_spec(("activation_batch", "activation_length"), rules, mesh, shape)


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(mesh, rules, shape))


def num_batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch axis is split: a global batch must be a multiple of this."""
  spec = batch_spec(mesh, rules)
  axes = spec[0] if len(spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def tree_shardings_like(tree: Any, reference: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose subtrees mirror `reference` (e.g. Adam's mu/nu mirror params).

  Each leaf whose key path ends with a reference leaf's path, and has the same shape, takes that
  leaf's sharding; every other leaf (step counters, scalars) is replicated.
  """
  ref = {tuple(map(str, path)): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      reference, is_leaf=lambda x: isinstance(x, NamedSharding))}
  depth = {len(k) for k in ref}

  def pick(path, leaf):
    keys = tuple(map(str, path))
    for d in depth:
      match = ref.get(keys[-d:]) if len(keys) >= d else None
      if match is not None and _sharding_fits(match, np.shape(leaf)):
        return match
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def _sharding_fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
  return len(sharding.spec) <= len(shape) and all(
      s is None or dim % math.prod(sharding.mesh.shape[a] for a in
                                   ((s,) if isinstance(s, str) else s)) == 0
      for s, dim in zip(sharding.spec, shape))


def replicated_params(shapes: Any, shardings: Any, *, min_bytes: int = 4 << 20) -> list[tuple[str, int]]:
  """(path, bytes) of params of at least `min_bytes` that are fully replicated over a mesh of more
  than one device: candidates for a missing rule. Empty when everything large is sharded."""
  out = []
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(shapes),
                              jax.tree.leaves(shardings)):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    if sh.is_fully_replicated and len(sh.device_set) > 1 and nbytes >= min_bytes:
      out.append(("/".join(str(getattr(k, "key", k)) for k in path), nbytes))
  return out


def warn_replicated(shapes: Any, shardings: Any, *, min_bytes: int = 4 << 20) -> list[tuple[str, int]]:
  """`replicated_params`, logging one warning that lists them (skipped when none)."""
  found = replicated_params(shapes, shardings, min_bytes=min_bytes)
  if found:
    total = sum(n for _, n in found)
    log.warning("%d param(s) of >= %d bytes are replicated on every device (%.1f MiB each "
                "device): %s", len(found), min_bytes, total / 2**20,
                ", ".join(f"{p} ({n / 2**20:.1f} MiB)" for p, n in found))
  return found


# -------------------------------------------------------------------------- sharded computation

def init_params_sharded(config: Qwen2Config, rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
  """Random params created directly in their shards: no host or device ever holds a whole
  sharded param. Values equal `api.init_params(config, rng)` (partitionable threefry)."""
  shardings = param_shardings(config, mesh, rules)
  warn_replicated(api.abstract_params(config), shardings)

  def init(key):
    with activation_rules(rules, mesh, config):
      return api.init_params(config, key)

  return jax.jit(init, out_shardings=shardings)(rng)


def make_forward(config: Qwen2Config, mesh: Mesh, rules: Rules):
  """`forward(params, input_ids, positions, segment_ids) -> logits [B, T, V]`, jitted with the
  params' shardings and the batch sharding; logits come back batch-sharded."""
  check_mesh_uses_rules(mesh, rules)
  batch = batch_sharding(mesh, rules)
  logits = NamedSharding(mesh, logical_to_spec(
      ("activation_batch", "activation_length", "activation_vocab"), rules, mesh,
      (None, None, config.vocab_size)))

  def fwd(params, input_ids, positions, segment_ids):
    with activation_rules(rules, mesh, config):
      return api.forward(config, params, input_ids, positions=positions, segment_ids=segment_ids)

  return jax.jit(fwd, in_shardings=(param_shardings(config, mesh, rules), batch, batch, batch),
                 out_shardings=logits)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Places a batch of global host arrays (every process holds the whole batch) on the mesh."""
  return {k: None if v is None else jax.device_put(v, batch_sharding(mesh, rules, np.shape(v)))
          for k, v in batch.items()}


def host_local_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Builds global arrays from each process's own rows (multi-host data loading): process i
  passes its [B / num_processes, T] slice; the result is the [B, T] global batch."""
  out = {}
  for k, v in batch.items():
    if v is None:
      out[k] = None
      continue
    global_shape = (np.shape(v)[0] * jax.process_count(),) + tuple(np.shape(v)[1:])
    out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, rules, global_shape), np.asarray(v), global_shape)
  return out
