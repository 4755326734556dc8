"""Property: every field of every training recipe refuses a value of each wrong type, and the
error names that field (its dotted path) and the `--set` it came from.

The fields are found by walking the recipe dataclasses (`PretrainConfig`, `SFTConfig`,
`DPOConfig`, `RMConfig`, `GRPOConfig` and everything nested in them: model, data, optimizer, mesh), so a field added later
is covered without editing this test.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal

import pytest

from qwen2_jax.config import Qwen2Config
from qwen2_jax.presets import config_from_dict
from qwen2_jax.train import dpo, grpo, pretrain, rm, sft
from qwen2_jax.typed_config import ConfigError, apply_overrides, read_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {"pretrain": (pretrain.PretrainConfig, "configs/cpu_demo.yaml"),
        "sft": (sft.SFTConfig, "configs/sft_cpu_demo.yaml"),
        "dpo": (dpo.DPOConfig, "configs/dpo_cpu_demo.yaml"),
        "rm": (rm.RMConfig, "configs/rm_cpu_demo.yaml"),
        "grpo": (grpo.GRPOConfig, "configs/grpo_cpu_demo.yaml")}
# Fields whose type admits anything (a rules table, free-form mappings kept verbatim).
OPEN = {"rules", "extra", "rope_scaling", "dual_chunk_attention_config", "model.rope_scaling",
        "model.dual_chunk_attention_config", "model.extra"}


def _base_type(hint: Any) -> Any:
  if typing.get_origin(hint) is typing.Annotated:
    return _base_type(typing.get_args(hint)[0])
  return hint


def _members(hint: Any) -> list[Any]:
  hint = _base_type(hint)
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return [_base_type(a) for a in typing.get_args(hint)]
  return [hint]


def _wrong_values(hint: Any) -> list[Any]:
  """Values of types the field does not take (YAML-writable: what `--set` can carry)."""
  members = _members(hint)
  origins = {typing.get_origin(m) or m for m in members}
  takes_none = type(None) in members
  wrong = []
  if not origins & {str, Literal}:
    wrong.append("not-a-value")
  if bool not in origins:
    wrong.append(True)
  if not origins & {int, float, bool}:
    wrong.append(7)
  if int in origins and float not in origins:
    wrong.append(2.5)
  if not origins & {tuple, list}:
    wrong.append([1, 2])
  if not any(dataclasses.is_dataclass(m) for m in members) and not origins & {dict}:
    wrong.append({"k": 1})
  if typing.Literal in origins or any(typing.get_origin(m) is Literal for m in members):
    wrong.append("no-such-choice")
  del takes_none
  return wrong


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for field in dataclasses.fields(cls):
    hint = typing.get_type_hints(cls, include_extras=True)[field.name]
    path = f"{prefix}{field.name}"
    if path in OPEN or field.name in ("data",) and _base_type(hint) is Any:
      continue
    nested = [m for m in _members(hint) if dataclasses.is_dataclass(m)]
    if nested:
      out += _leaf_fields(nested[0], path + ".")
    elif _base_type(hint) is not Any:
      out.append((path, hint))
  return out


def _cases():
  for job, (cls, recipe) in JOBS.items():
    fields = _leaf_fields(cls)
    # The job's data settings are typed on the job's data class, not on RunSettings.data (Any).
    data_hint = typing.get_type_hints(cls)["data"]
    if dataclasses.is_dataclass(data_hint):
      fields += _leaf_fields(data_hint, "data.")
    for path, hint in fields:
      for value in _wrong_values(hint):
        yield pytest.param(job, path, value, id=f"{job}-{path}-{value!r}")


def test_the_walk_covers_the_recipes():
  """The walk reaches the model, data, optimizer and mesh fields of each job."""
  for cls, _ in JOBS.values():
    paths = {p for p, _ in _leaf_fields(cls)}
    assert {"steps", "model.vocab_size", "model.tie_word_embeddings", "optim.learning_rate",
            "mesh.fsdp", "log_every"} <= paths, sorted(paths)
    assert dataclasses.is_dataclass(typing.get_type_hints(cls)["data"])
  assert len(list(_cases())) > 300


@pytest.mark.parametrize("job, path, value", list(_cases()))
def test_every_field_refuses_each_wrong_type(job, path, value):
  cls, recipe_file = JOBS[job]
  text = repr(value) if not isinstance(value, str) else value
  if isinstance(value, (list, dict)):
    text = str(value).replace("'", "")
  elif isinstance(value, bool):
    text = "true"
  override = f"{path}={text}"
  recipe = apply_overrides(read_recipe(os.path.join(ROOT, recipe_file)), [override])
  with pytest.raises(ConfigError) as info:
    cls.from_dict(recipe.data, recipe=recipe)
  message = str(info.value)
  assert f"--set {override}" in message and path in message, message
  assert "\n" not in message


def test_model_field_types_are_checked_on_hf_configs_too():
  """The same walk over Qwen2Config fields: a model section refuses a string for every bool."""
  bools = [f.name for f in dataclasses.fields(Qwen2Config)
           if bool in _members(typing.get_type_hints(Qwen2Config, include_extras=True)[f.name])]
  assert "tie_word_embeddings" in bools and "scan_layers" in bools
  for name in bools:
    with pytest.raises(ConfigError, match=rf"model\.{name}: .*expected bool"):
      config_from_dict({"preset": "qwen2-tiny", name: "false"}, path="model")
