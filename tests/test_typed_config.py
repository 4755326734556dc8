"""Typed, strict settings (`qwen2_jax.typed_config`): conversion, refusal, and where errors point."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import pytest

from qwen2_jax import Qwen2Config, get_preset
from qwen2_jax.presets import config_from_dict
from qwen2_jax.errors import UserError
from qwen2_jax.typed_config import (Bool, ConfigError, Float, Int, apply_overrides, parse_value,
                                    read_recipe, structure)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
  learning_rate: Float = 3e-4
  names: tuple[str, ...] = ("norm",)
  clip: Float | None = 1.0

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ConfigError(f"_Inner.learning_rate: must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
  steps: Int
  inner: _Inner = dataclasses.field(default_factory=_Inner)
  export: Bool = True
  mode: Literal["skip", "abort"] = "skip"
  anything: Any = "fsdp"


@pytest.fixture
def recipe(tmp_path):
  path = tmp_path / "run.yaml"
  path.write_text("steps: 10\ninner:\n  learning_rate: 1e-3\n  clip: null\nexport: true\n")
  return read_recipe(str(path))


def test_yaml_1_2_floats_and_unambiguous_conversions(recipe):
  """`1e-3` is a float (PyYAML alone reads a string); "8" becomes 8 for an int field."""
  assert parse_value("1e-3") == 0.001 and parse_value("2E5") == 2e5 and parse_value("1") == 1
  assert recipe.data["inner"]["learning_rate"] == 0.001
  out = structure(_Outer, apply_overrides(recipe, ["steps='8'", "inner.learning_rate='3e-4'"]).data)
  assert out == _Outer(steps=8, inner=_Inner(learning_rate=3e-4, clip=None))
  assert structure(_Outer, {"steps": 4.0}).steps == 4  # an integral float is unambiguous


@pytest.mark.parametrize("override, field, expected", [
    ("steps=ten", "steps", "expected int"),
    ("steps=true", "steps", "a boolean is not a number"),
    ("steps=1.5", "steps", "fractional part"),
    ("export='false'", "export", "expected bool"),
    ("export=1", "export", "expected bool"),
    ("inner.learning_rate=fast", "inner.learning_rate", "expected float"),
    ("inner.learning_rate=-1", "inner.learning_rate", "must be > 0"),
    ("inner.names=norm", "inner.names", "expected tuple"),
    ("mode=sometimes", "mode", "'skip' or 'abort'"),
    ("inner=3", "inner", "expected _Inner"),
    ("inner.learning_rat=1", "inner.learning_rat", "did you mean learning_rate?"),
    ("inner.lr=1", "inner.lr", "known: learning_rate, names, clip"),
])
def test_bad_values_name_the_field_and_the_override(recipe, override, field, expected):
  """Each refusal is one ConfigError line naming the `--set` it came from and the dotted field."""
  bad = apply_overrides(recipe, [override])
  with pytest.raises(ConfigError) as info:
    structure(_Outer, bad.data, recipe=bad)
  message = str(info.value)
  assert isinstance(info.value, UserError)
  assert message.startswith(f"--set {override}: {field}: "), message
  assert expected in message and "\n" not in message


def test_errors_from_the_file_name_its_line(tmp_path):
  """A bad value written in the recipe file is reported as file:line."""
  path = tmp_path / "bad.yaml"
  path.write_text("steps: 3\ninner:\n  learning_rate: 0.1\n  clip: big\n")
  bad = read_recipe(str(path))
  with pytest.raises(ConfigError, match=rf"^{path}:4: inner.clip: .*got 'big'"):
    structure(_Outer, bad.data, recipe=bad)
  with pytest.raises(ConfigError, match=r"^.*steps: required setting is missing"):
    structure(_Outer, {})


@pytest.mark.parametrize("text, expected", [
    ("steps: [1\n", r"bad.yaml:\d+: not valid YAML"),
    ("- 1\n- 2\n", r"a recipe is a mapping"),
])
def test_unreadable_recipes(tmp_path, text, expected):
  path = tmp_path / "bad.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError, match=expected):
    read_recipe(str(path))
  with pytest.raises(ConfigError, match=r"--config: no such file"):
    read_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("override, expected", [
    ("steps", "expected KEY=VALUE"),
    ("steps.sub=1", "steps is a value"),
    ("steps=[1", "not valid YAML"),
])
def test_malformed_overrides(recipe, override, expected):
  with pytest.raises(ConfigError, match=rf"^--set {override.replace('[', '.')}: .*{expected}"):
    apply_overrides(recipe, [override])


def test_model_config_from_dict_is_typed_and_takes_presets():
  """Qwen2Config.from_dict: presets with overrides; string bools and unknown fields refused."""
  config = config_from_dict({"preset": "qwen2-tiny", "dtype": "bfloat16",
                                  "num_hidden_layers": "3"}, path="model")
  assert config == get_preset("qwen2-tiny", dtype="bfloat16", num_hidden_layers=3)
  with pytest.raises(ConfigError, match=r"^model.tie_word_embeddings: .*got 'false'"):
    config_from_dict({"preset": "qwen2-tiny", "tie_word_embeddings": "false"}, path="model")
  with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'qwen9'"):
    config_from_dict({"preset": "qwen9"}, path="model")


def test_hf_config_json_is_typed_and_names_the_file(tmp_path):
  """A string where config.json needs a bool, or text that is not JSON, names the file."""
  good = get_preset("qwen2-tiny").to_hf_dict()
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**good, "tie_word_embeddings": "false"}))
  with pytest.raises(ConfigError, match=rf"^{path}: tie_word_embeddings: .*expected bool"):
    Qwen2Config.from_hf(str(tmp_path))
  path.write_text('{"vocab_size": 16,\n  oops}')
  with pytest.raises(ConfigError, match=rf"^{path}:2: not valid JSON"):
    Qwen2Config.from_hf(str(tmp_path))
