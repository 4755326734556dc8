"""HF checkpoints (config.json + safetensors, single or sharded) to params and back.

Loading is strict: missing, unexpected, wrong-shape or wrong-dtype tensors and truncated files
are all collected and raised together as one `CheckpointError` naming each key and file, before
any data is read; every param slot must be filled exactly once, so nothing is left randomly
initialised; a tensor holding NaN or Inf is an error unless `allow_nonfinite` (`checks`).
Tensors are read one at a time through the `safetensors` library and each param is handed to JAX
as soon as it is complete, so peak host memory is about the params plus one stacked param being
assembled. Saving writes into a staging directory beside the target and renames it only when
complete; overwriting never removes a file this module did not write (`output_dir`).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qwen2_jax import sharding as sharding_lib
from qwen2_jax.api import abstract_params
from qwen2_jax.checkpoint import output_dir
from qwen2_jax.checkpoint import safetensors_io as st
from qwen2_jax.checkpoint.checks import (CheckpointError, CheckpointNotFoundError,
                                         OutputExistsError, check_finite, read_json)
from qwen2_jax.checkpoint.keymap import LM_HEAD, SCORE_HEAD, Entry, architecture, checkpoint_entries
from qwen2_jax.config import Qwen2Config

__all__ = ["CheckpointError", "CheckpointNotFoundError", "OutputExistsError", "INDEX_FILE",
           "SINGLE_FILE", "load_hf_checkpoint", "save_hf_checkpoint"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Every name a save (or `qwen2_jax.tokenizer.copy_tokenizer_files`) writes in a model directory.
_OWNED = re.compile(r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                    r"model-\d{5}-of-\d{5}\.safetensors|"
                    + "|".join(re.escape(n) for n in TOKENIZER_FILES))
_FLOAT_NAMES = ("F32", "BF16", "F16")


def owned_file(name: str) -> bool:
  """Whether `name` is a file an HF save (or its tokenizer copy) writes in a model directory."""
  return _OWNED.fullmatch(name) is not None


def _tree_get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _open_files(directory: str) -> dict[str, st.SafetensorsFile]:
  """key -> open file, from the index (sharded) or the single file."""
  index_path = os.path.join(directory, INDEX_FILE)
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(index_path):
    index = read_json(index_path, "a safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and v and os.path.basename(v) == v for v in weight_map.values()):
      raise CheckpointError(f"{index_path}: not a safetensors index (expected a 'weight_map' "
                            "object mapping each tensor name to a file name in this directory)")
    files = {}
    for name in sorted(set(weight_map.values())):
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        missing = sorted(k for k, v in weight_map.items() if v == name)
        raise CheckpointError(f"{path}: listed in {INDEX_FILE} for {len(missing)} tensors "
                              f"(e.g. {missing[0]!r}) but missing")
      files[name] = st.SafetensorsFile(path)
    by_key = {}
    for key, name in weight_map.items():
      if key not in files[name]:
        raise CheckpointError(f"{files[name].path}: {INDEX_FILE} maps {key!r} here but the "
                              "file does not contain it")
      by_key[key] = files[name]
    for name, f in files.items():  # tensors present in a shard but not in the index
      for key in f.keys():
        if weight_map.get(key) != name:
          by_key.setdefault(key, f)
    return by_key
  if os.path.isfile(single):
    f = st.SafetensorsFile(single)
    return {key: f for key in f.keys()}
  raise CheckpointNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def _param_shapes(config: Qwen2Config, head: str) -> Any:
  """The abstract params of a model of `config` with `head` (the reward model's for "score")."""
  if head == SCORE_HEAD:
    from qwen2_jax import reward_model  # pylint: disable=import-outside-toplevel
    return reward_model.abstract_params(config)
  return abstract_params(config)


def _declared_dtype(config: Qwen2Config) -> str | None:
  extra = dict(config.extra)
  value = extra.get("torch_dtype") or extra.get("dtype")
  return json.loads(value) if value else None


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str | None = "float32",
                       show_progress: bool = True, shardings: Any = None, mesh: Any = None,
                       rules: Any = None, allow_nonfinite: bool = False, head: str = LM_HEAD,
                       **config_overrides) -> tuple[Qwen2Config, dict[str, Any]]:
  """Reads an HF Qwen2 directory into (config, params).

  Sharded loading: with `shardings` (a tree like the params of `jax.sharding.Sharding`, or a
  function config -> such a tree) or `mesh` (+ `rules`, default "fsdp"; see
  `qwen2_jax.sharding`), every param is built in place with `jax.make_array_from_callback`:
  each process reads (memory-mapped) only the slices its own devices hold, and no whole
  sharded param is ever assembled on a host. The non-finite check then covers those slices.

  Args:
    path: directory with config.json and model.safetensors or a sharded index.
    dtype: dtype of the returned params ("float32", "bfloat16", ...); None keeps each
      tensor's checkpoint dtype (bit-exact). Sets `config.param_dtype`.
    show_progress: a progress bar over tensors.
    allow_nonfinite: load tensors holding NaN or Inf (each is logged as a warning).
    head: "lm" (a causal LM) or "score" (a reward model: `score.weight`, no `lm_head`; see
      `qwen2_jax.reward_model`).
    **config_overrides: implementation settings for the returned config (e.g. `dtype` is not
      accepted here; pass `compute_dtype="bfloat16"` to set `config.dtype`, or `scan_layers`,
      `remat_policy`, `attention_impl`).

  Raises:
    CheckpointError: missing / unexpected / wrong-shape / wrong-dtype tensors (all listed), a
      malformed index; `NonFiniteWeightsError` for a tensor holding NaN or Inf.
    CheckpointNotFoundError: no weights; `qwen2_jax.config.ConfigError`: no or a bad
      config.json.
    safetensors_io.SafetensorsError: a truncated or malformed file.
  """
  directory = os.fspath(path)
  compute_dtype = config_overrides.pop("compute_dtype", None)
  if compute_dtype is not None:
    config_overrides["dtype"] = compute_dtype
  config = Qwen2Config.from_hf(directory, **config_overrides)
  by_key = _open_files(directory)
  entries = checkpoint_entries(config, head)
  expected = {e.hf_key: e for e in entries}
  declared = _declared_dtype(config)
  problems = []
  for e in entries:
    if e.hf_key not in by_key:
      problems.append(f"missing tensor {e.hf_key!r} (expected {list(e.hf_shape)}) in {directory}")
      continue
    f = by_key[e.hf_key]
    if f.shape(e.hf_key) != e.hf_shape:
      problems.append(f"{f.path}: tensor {e.hf_key!r} has shape {list(f.shape(e.hf_key))}, "
                      f"config.json implies {list(e.hf_shape)}")
    got = f.dtype(e.hf_key)
    if got not in _FLOAT_NAMES:
      problems.append(f"{f.path}: tensor {e.hf_key!r} has dtype {got}, expected a float dtype")
    elif declared and got != st.dtype_name(jnp.dtype(declared)):
      problems.append(f"{f.path}: tensor {e.hf_key!r} has dtype {got}, config.json declares "
                      f"{declared}")
  tied_head = None
  for key, f in sorted(by_key.items()):
    if key in expected:
      continue
    if key == "lm_head.weight" and config.tie_word_embeddings and head == LM_HEAD:
      tied_head = f  # accepted only if it equals the embedding (checked below)
      continue
    problems.append(f"{f.path}: unexpected tensor {key!r} (not part of a "
                    f"{architecture(config, head)} with this config.json)")
  if problems:
    raise CheckpointError(f"{len(problems)} problem(s) in checkpoint {directory}:\n  "
                          + "\n  ".join(problems))

  shapes = _param_shapes(config, head)
  slots: dict[tuple[str, ...], list[Entry]] = defaultdict(list)
  for e in entries:
    slots[e.path].append(e)
  if mesh is not None and shardings is None:
    shardings = sharding_lib.param_shardings(config, mesh, sharding_lib.get_rules(rules or "fsdp"))
  if callable(shardings):
    shardings = shardings(config)
  if shardings is not None:
    params = _load_sharded(directory, by_key, slots, shapes, shardings, dtype, show_progress,
                           allow_nonfinite)
  else:
    params = _load_whole(directory, by_key, entries, slots, shapes, dtype, show_progress,
                         allow_nonfinite)
  if tied_head is not None:
    _check_tied_head(tied_head, by_key)
  leaf_dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  if len(leaf_dtypes) == 1:
    config = config.replace(param_dtype=leaf_dtypes.pop())
  return config, params


def _load_whole(directory: str, by_key, entries: list[Entry],
                slots: dict[tuple[str, ...], list[Entry]], shapes, dtype: str | None,
                show_progress: bool, allow_nonfinite: bool) -> dict[str, Any]:
  """Reads every tensor in file order; each param goes to the default device once complete."""
  remaining = {p: len(v) for p, v in slots.items()}
  buffers: dict[tuple[str, ...], np.ndarray] = {}
  params: dict[str, Any] = {}
  position = {f.path: {k: i for i, k in enumerate(f.keys())} for f in set(by_key.values())}
  order = sorted(entries, key=lambda e: (by_key[e.hf_key].path,
                                         position[by_key[e.hf_key].path][e.hf_key]))
  for e in tqdm(order, desc=f"loading {os.path.basename(directory) or directory}", unit="tensor",
                disable=not show_progress):
    f = by_key[e.hf_key]
    raw = f.read(e.hf_key)
    check_finite(raw, key=e.hf_key, file=f.path, allow=allow_nonfinite)
    value = e.transform.to_param(raw)
    target_shape = _tree_get(shapes, e.path).shape
    target_dtype = raw.dtype if dtype is None else jnp.dtype(dtype)
    if e.path not in buffers:
      buffers[e.path] = np.empty(target_shape, dtype=target_dtype)
    buf = buffers[e.path]
    buf[e.index] = value.astype(buf.dtype)
    remaining[e.path] -= 1
    if remaining[e.path] == 0:  # param complete: hand it to JAX, free the host copy
      _tree_set(params, e.path, jnp.asarray(buffers.pop(e.path)))
  assert not buffers, f"unfilled params: {list(buffers)}"
  return params


def _check_tied_head(tied_head: st.SafetensorsFile, by_key: dict[str, st.SafetensorsFile]) -> None:
  head = tied_head.read("lm_head.weight")
  embed = by_key["model.embed_tokens.weight"].read("model.embed_tokens.weight")
  if head.shape != embed.shape or not np.array_equal(head, embed, equal_nan=True):
    raise CheckpointError(f"{tied_head.path}: 'lm_head.weight' is present and differs from "
                          "'model.embed_tokens.weight' but config.json sets "
                          "tie_word_embeddings=true")


def _load_sharded(directory: str, by_key, slots: dict[tuple[str, ...], list[Entry]], shapes,
                  shardings, dtype: str | None, show_progress: bool,
                  allow_nonfinite: bool) -> dict[str, Any]:
  """Builds each param from the slices this process's devices hold (see `load_hf_checkpoint`)."""
  params: dict[str, Any] = {}
  for path, slot in tqdm(sorted(slots.items()), desc=f"loading {os.path.basename(directory)}",
                         unit="param", disable=not show_progress):
    shape = _tree_get(shapes, path).shape
    sharding = _tree_get(shardings, path)
    first = slot[0]
    target_dtype = (st.numpy_dtype(by_key[first.hf_key].dtype(first.hf_key)) if dtype is None
                    else np.dtype(jnp.dtype(dtype)))
    stacked = len(first.index)  # leading param dims that select a checkpoint tensor
    by_index = {e.index: e for e in slot}

    def read(index, by_index=by_index, stacked=stacked, shape=shape, target_dtype=target_dtype):
      index = tuple(index) + (slice(None),) * (len(shape) - len(index))
      outer = [range(*ix.indices(n)) for ix, n in zip(index[:stacked], shape[:stacked])]
      out = np.empty([len(r) for r in outer] + [len(range(*ix.indices(n)))
                     for ix, n in zip(index[stacked:], shape[stacked:])], dtype=target_dtype)
      for pos in np.ndindex(*[len(r) for r in outer]):
        e = by_index[tuple(r[p] for r, p in zip(outer, pos))]
        f = by_key[e.hf_key]
        value = e.transform.read_param(lambda ix, f=f, e=e: f.read_slice(e.hf_key, ix),
                                       e.hf_shape, index[stacked:])
        check_finite(value, key=e.hf_key, file=f.path, allow=allow_nonfinite,
                     part=" in the slice this process reads")
        out[pos] = value
      return out

    _tree_set(params, path, jax.make_array_from_callback(shape, sharding, read))
  return params


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
  if not m:
    raise CheckpointError(f"max_shard_size: cannot parse {size!r} (e.g. '5GB', '500MB', 10**9)")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0] if unit != "B" else "B"]
  return int(float(m.group(1)) * base ** power)


def save_hf_checkpoint(path: str | os.PathLike, config: Qwen2Config, params: dict[str, Any], *,
                       max_shard_size: int | str = "5GB", dtype: str | None = None,
                       overwrite: bool = False, show_progress: bool = True,
                       head: str | None = None) -> None:
  """Writes config.json + safetensors (sharded with an index when over `max_shard_size`).

  The checkpoint is written into a staging directory beside `path` and renamed onto it only when
  complete. With `overwrite`, an existing `path` may hold only files this function writes
  (config.json, generation_config.json, model*.safetensors, the index) and tokenizer files
  (tokenizer.json, tokenizer_config.json, tokenizer.model); anything else makes it refuse, naming
  the file, before writing anything. The old checkpoint files are replaced (stale shards
  included); tokenizer files are kept unchanged.

  Args:
    path: output directory.
    config: the model config (implementation settings are not written).
    params: the params pytree, host or device (sharded arrays are gathered one tensor at a time).
    max_shard_size: bytes per safetensors file, an int or a string like "5GB" / "500MiB".
    dtype: cast every tensor to this dtype; None keeps each param's dtype (bit-exact round trip).
    overwrite: replace the checkpoint in an existing, non-empty `path` (see above).
    head: "lm" (a causal LM) or "score" (a reward model: `*ForSequenceClassification` with one
      label, no generation_config.json); None: "score" when `params` hold a "score" head.

  Raises:
    OutputExistsError: `path` is not empty and `overwrite` is off, or holds other files.
    CheckpointError: `params` do not match `config` (every bad param listed).
  """
  target = os.path.realpath(os.fspath(path))  # a symlinked output: replace what it points at
  output_dir.check_target(target, overwrite=overwrite, owned=owned_file,
                          writer="save_hf_checkpoint")
  limit = _parse_size(max_shard_size)
  if head is None:
    head = SCORE_HEAD if isinstance(params, dict) and SCORE_HEAD in params else LM_HEAD
  entries = checkpoint_entries(config, head)
  shapes = _param_shapes(config, head)
  problems = []
  flat_expected = {tuple(str(getattr(k, "key", k)) for k in kp): v.shape
                   for kp, v in jax.tree_util.tree_leaves_with_path(shapes)}
  flat_given = {tuple(str(getattr(k, "key", k)) for k in kp): np.shape(v)
                for kp, v in jax.tree_util.tree_leaves_with_path(params)}
  for p in sorted(set(flat_expected) | set(flat_given)):
    name = "/".join(p)
    if p not in flat_given:
      problems.append(f"param {name} is missing")
    elif p not in flat_expected:
      problems.append(f"param {name} is not part of this config's model")
    elif tuple(flat_given[p]) != tuple(flat_expected[p]):
      problems.append(f"param {name} has shape {list(flat_given[p])}, config implies "
                      f"{list(flat_expected[p])}")
  if problems:
    raise CheckpointError("params do not match the config:\n  " + "\n  ".join(problems))

  def out_dtype(e: Entry):
    return np.dtype(jnp.dtype(dtype)) if dtype else np.dtype(_tree_get(params, e.path).dtype)

  # Greedy sharding in write order.
  shards: list[list[Entry]] = [[]]
  used = 0
  for e in entries:
    nbytes = int(np.prod(e.hf_shape)) * out_dtype(e).itemsize
    if shards[-1] and used + nbytes > limit:
      shards.append([])
      used = 0
    shards[-1].append(e)
    used += nbytes
  by_name = {e.hf_key: e for e in entries}
  total = sum(int(np.prod(e.hf_shape)) * out_dtype(e).itemsize for e in entries)

  def produce(key: str) -> np.ndarray:
    e = by_name[key]
    value = np.asarray(jax.device_get(_tree_get(params, e.path)[e.index]))
    return e.transform.to_hf(value).astype(out_dtype(e))

  tmp = output_dir.make_staging(target, output_dir.new_token())
  try:
    hf_config = config.to_hf_dict()
    dtypes = {str(out_dtype(e)) for e in entries}
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    if head == SCORE_HEAD:
      _set_one_label(hf_config, architecture(config, head))
    _write_json(os.path.join(tmp, "config.json"), hf_config, sort_keys=True)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {os.path.basename(target)}",
               disable=not show_progress)
    weight_map = {}
    for name, shard in zip(names, shards):
      st.write_file(os.path.join(tmp, name),
                    [(e.hf_key, out_dtype(e), e.hf_shape) for e in shard], produce,
                    on_tensor=lambda _, n: bar.update(n))
      weight_map.update({e.hf_key: name for e in shard})
    bar.close()
    if len(shards) > 1:
      _write_json(os.path.join(tmp, INDEX_FILE),
                  {"metadata": {"total_size": total}, "weight_map": weight_map})
    if head == LM_HEAD:
      _write_generation_config(tmp, config)
    output_dir.commit(tmp, target, owned=owned_file, keep=lambda n: n in TOKENIZER_FILES,
                      writer="save_hf_checkpoint")
  except BaseException:
    output_dir.discard(tmp)
    raise


def _write_json(path: str, value: Any, *, sort_keys: bool = False) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=sort_keys)
    f.write("\n")


def _set_one_label(hf_config: dict[str, Any], name: str) -> None:
  """A sequence classifier with one output (a scalar reward): `architectures` and the label
  maps as transformers writes them (its own one-label maps are kept)."""
  hf_config["architectures"] = [name]
  hf_config.pop("num_labels", None)
  labels = hf_config.get("id2label")
  if not (isinstance(labels, dict) and len(labels) == 1 and "0" in labels):
    hf_config["id2label"] = {"0": "LABEL_0"}
  hf_config["label2id"] = {hf_config["id2label"]["0"]: 0}


def _write_generation_config(directory: str, config: Qwen2Config) -> None:
  gen = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                           ("eos_token_id", config.eos_token_id),
                           ("pad_token_id", config.pad_token_id)) if v is not None}
  if gen:
    if isinstance(gen.get("eos_token_id"), tuple):
      gen["eos_token_id"] = list(gen["eos_token_id"])
    _write_json(os.path.join(directory, "generation_config.json"), gen)
