"""Typed, strict settings: one mechanism that turns a parsed recipe into the frozen dataclasses
describing a model or a run.

- Types come from the dataclass annotations and are checked by pydantic (a `TypeAdapter` over the
  standard-library dataclasses, so the classes stay plain frozen dataclasses usable as static
  `jax.jit` arguments). A value is converted only where that is unambiguous (`"8"` -> 8 for an
  int field, `"1e-3"` -> 0.001 for a float field); booleans are accepted only as booleans and never
  as numbers (annotate with `Bool`, `Int`, `Float` below); an unknown key is an error.
- Value ranges stay in each dataclass's `__post_init__` (one place per class), which raises
  `ConfigError("ClassName.field: ...")`; that also runs when code builds the class directly.
- Every error is one `ConfigError` line naming the dotted path of the field, the value and the
  expected type and, for recipes, where the value came from: `configs/x.yaml:12` or
  `--set optim.learning_rate=abc`.

Recipes are YAML (or JSON, a subset): `read_recipe` reads one with floats as YAML 1.2 writes them
(PyYAML implements YAML 1.1, where `1e-3` without a dot is a string) and applies `a.b.c=value`
overrides, whose values are parsed the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Annotated, Any, Iterable, Mapping

import pydantic
import yaml

from qwen2_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A setting is missing, unknown, of the wrong type or out of range; the message names it."""


def _refuse_bool(value: Any) -> Any:
  if isinstance(value, bool):
    raise ValueError("a boolean is not a number")
  return value


Int = Annotated[int, pydantic.BeforeValidator(_refuse_bool)]
"""An int field: accepts ints, integral floats and integer strings; refuses booleans."""
Float = Annotated[float, pydantic.BeforeValidator(_refuse_bool)]
"""A float field: accepts ints, floats and numeric strings (`"1e-3"`); refuses booleans."""
Bool = Annotated[bool, pydantic.Strict()]
"""A bool field: accepts only `true` / `false`."""

_STRICT = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)


# ----------------------------------------------------------------------------- recipes

class _Loader(yaml.SafeLoader):
  """PyYAML's safe loader with YAML 1.2 floats: `1e-3` and `1E5` are numbers, not strings."""


_Loader.yaml_implicit_resolvers = {
    key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A parsed recipe and where each of its values came from."""
  data: dict[str, Any]
  path: str | None = None                                   # the file, if any
  lines: Mapping[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
  overrides: Mapping[tuple[str, ...], str] = dataclasses.field(default_factory=dict)

  def where(self, keys: Iterable[str]) -> str | None:
    """`--set k=v` or `file:line` of the most specific key of `keys` that has a source."""
    keys = tuple(keys)
    for n in range(len(keys), 0, -1):
      if keys[:n] in self.overrides:
        return f"--set {self.overrides[keys[:n]]}"
      if keys[:n] in self.lines:
        return f"{self.path}:{self.lines[keys[:n]]}"
    return self.path


def parse_value(text: str) -> Any:
  """A scalar or collection written as YAML (1.2 floats), as in `--set key=value`."""
  return yaml.load(text, Loader=_Loader)


def _key_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict) -> None:
  if isinstance(node, yaml.MappingNode):
    for key_node, value_node in node.value:
      keys = prefix + (str(key_node.value),)
      out[keys] = key_node.start_mark.line + 1
      _key_lines(value_node, keys, out)


def read_recipe(path: str, overrides: Iterable[str] = ()) -> Recipe:
  """Reads a YAML/JSON recipe and applies `a.b.c=value` overrides (values parsed as YAML)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise ConfigError(f"--config: no such file: {path}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"--config: cannot read {path}: {e}") from None
  try:
    data = yaml.load(text, Loader=_Loader)
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(yaml.compose(text, Loader=_Loader), (), lines)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    at = f"{path}:{mark.line + 1}" if mark is not None else path
    raise ConfigError(f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
  if data is None:
    data = {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: a recipe is a mapping of settings, got {type(data).__name__}")
  return apply_overrides(Recipe(data, path, lines), overrides)


def apply_overrides(recipe: Recipe, overrides: Iterable[str]) -> Recipe:
  """`recipe` with each `a.b.c=value` of `overrides` set (a new copy; nested keys created)."""
  data = _copy(recipe.data)
  sources = dict(recipe.overrides)
  for item in overrides:
    key, sep, text = item.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
      raise ConfigError(f"--set {item}: expected KEY=VALUE with a dotted KEY, e.g. steps=100")
    try:
      value = parse_value(text)
    except yaml.YAMLError as e:
      raise ConfigError(f"--set {item}: the value is not valid YAML: "
                        f"{getattr(e, 'problem', None) or e}") from None
    node = data
    for i, k in enumerate(keys[:-1]):
      child = node.setdefault(k, {})
      if not isinstance(child, dict):
        raise ConfigError(f"--set {item}: {'.'.join(keys[:i + 1])} is a value "
                          f"({child!r}), not a section")
      node = child
    node[keys[-1]] = value
    sources[keys] = item
  return dataclasses.replace(recipe, data=data, overrides=sources)


def _copy(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _copy(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_copy(v) for v in value]
  return value


# ----------------------------------------------------------------------------- structure

def structure(cls: type, data: Any, *, path: str = "", recipe: Recipe | None = None,
              source: str | None = None) -> Any:
  """`cls` (a dataclass) built from `data` (a mapping), typed and strict.

  Args:
    cls: a (frozen) dataclass whose annotations give the types; nested dataclass fields are
      built from nested mappings, and an instance already of the field's class is kept.
    data: the mapping of settings (or an instance of `cls`, returned unchanged).
    path: the dotted path of `data` inside the whole recipe (e.g. "model"), for messages.
    recipe: where the values came from; errors then name the file and line or the `--set`.
    source: a file name for errors when there is no recipe (e.g. a config.json path).

  Raises:
    ConfigError: one line naming the first bad field (and how many more there are).
  """
  if isinstance(data, cls):
    return data
  prefix = tuple(path.split(".")) if path else ()
  if not isinstance(data, Mapping):
    raise ConfigError(_message(recipe, source, prefix, f"expected a mapping of {cls.__name__} "
                               f"settings, got {type(data).__name__} {data!r}"))
  try:
    return _adapter(cls).validate_python(dict(data))
  except pydantic.ValidationError as e:
    errors = e.errors(include_url=False)
    first = _describe(cls, prefix, errors[0])
    keys, text = first
    more = len({_field_path(cls, err["loc"])[0] for err in errors}) - 1
    if more > 0:
      text += f" (and {more} more setting{'s' * (more > 1)})"
    raise ConfigError(_message(recipe, source, keys, text)) from None
  except ConfigError as e:  # raised by a __post_init__ outside pydantic's wrapping
    raise ConfigError(_message(recipe, source, prefix, _rename(str(e), cls, prefix))) from None


def _message(recipe: Recipe | None, source: str | None, keys: tuple[str, ...], text: str) -> str:
  where = recipe.where(keys) if recipe is not None else source
  return f"{where}: {text}" if where else text


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
  _mark_strict(cls, set())
  return pydantic.TypeAdapter(cls)


def _mark_strict(tp: Any, seen: set) -> None:
  """Sets pydantic's strict config (unknown keys are errors) on every dataclass reachable from
  `tp`'s annotations."""
  if id(tp) in seen:
    return
  seen.add(id(tp))
  if dataclasses.is_dataclass(tp) and isinstance(tp, type):
    if "__pydantic_config__" not in vars(tp):
      tp.__pydantic_config__ = _STRICT
    for hint in typing.get_type_hints(tp).values():
      _mark_strict(hint, seen)
  for arg in typing.get_args(tp):
    _mark_strict(arg, seen)


def _field_path(cls: type, loc: tuple) -> tuple[tuple[str, ...], Any, type | None]:
  """(field names along `loc`, the last field's annotation, the dataclass holding it)."""
  names: list[str] = []
  owner, hint = cls, cls
  for part in loc:
    if not (dataclasses.is_dataclass(owner) and isinstance(part, str)):
      break
    hints = typing.get_type_hints(owner, include_extras=False)
    if part not in hints:
      names.append(part)
      break
    names.append(part)
    hint = hints[part]
    owner = _dataclass_in(hint)
    if owner is None:
      owner = hint
      break
  return tuple(names), hint, owner


def _dataclass_in(hint: Any) -> type | None:
  if dataclasses.is_dataclass(hint) and isinstance(hint, type):
    return hint
  for arg in typing.get_args(hint):
    found = _dataclass_in(arg)
    if found is not None:
      return found
  return None


def _type_name(hint: Any) -> str:
  if typing.get_origin(hint) is Annotated:
    return _type_name(typing.get_args(hint)[0])
  if isinstance(hint, type) and not typing.get_args(hint):
    return hint.__name__
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
  if typing.get_origin(hint) is typing.Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
  return str(hint).replace("typing.", "")


def _rename(text: str, cls: type, prefix: tuple[str, ...]) -> str:
  """'OptimConfig.lr: ...' raised by a nested class -> 'optim.lr: ...' (the recipe's spelling)."""
  match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_.]*): (.*)$", text, re.S)
  if match:
    return f"{'.'.join(prefix + (match.group(2),))}: {match.group(3)}"
  return text


def _describe(cls: type, prefix: tuple[str, ...], err: Mapping[str, Any]
              ) -> tuple[tuple[str, ...], str]:
  names, hint, owner = _field_path(cls, err["loc"])
  keys = prefix + names
  dotted = ".".join(keys) or cls.__name__
  kind = err["type"]
  if kind in ("unexpected_keyword_argument", "extra_forbidden"):
    holder = _field_path(cls, err["loc"][:-1])[2] if len(err["loc"]) > 1 else cls
    known = ""
    if dataclasses.is_dataclass(holder):
      names = [f.name for f in dataclasses.fields(holder)]
      close = difflib.get_close_matches(str(err["loc"][-1]), names, n=1)
      if close:
        known = f"; did you mean {close[0]}?"
      elif len(names) <= 16:
        known = "; known: " + ", ".join(names)
    return keys, f"{dotted}: unknown setting{known}"
  if kind == "missing" or kind == "missing_keyword_argument":
    return keys, f"{dotted}: required setting is missing"
  if kind == "value_error":
    inner = err.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):
      text = _rename(str(inner), cls, keys)
      field = re.match(r"^[A-Za-z_][A-Za-z0-9_]*\.([A-Za-z_][A-Za-z0-9_]*): ", str(inner))
      return keys + ((field.group(1),) if field else ()), text
  value = err.get("input")
  shown = repr(value)
  if len(shown) > 60:
    shown = shown[:57] + "..."
  msg = err["msg"].removeprefix("Value error, ")
  return keys, f"{dotted}: {msg} (got {shown}; expected {_type_name(hint)})"
