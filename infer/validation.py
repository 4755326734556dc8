"""Validation of everything a generation request or run is given, on the host, before XLA.

One place checks each value, whether it came from a command-line flag, a JSONL record field or a
Python call: `check_sampling` (a `SamplingParams`, run on construction), `check_engine_settings`
(batch size, context, default max_new_tokens), `check_request` (one prompt against the model) and
`check_jsonl_paths` (batch input / output files). Nothing is ever truncated or clamped silently
(after vLLM's `SamplingParams._verify_args` and TGI's validation).

Every error is a `GenerationInputError`: a `qwen2_jax.errors.UserError` (the CLI prints it as one
line and exits 2) and a `ValueError`. Its `.param` names the offending parameter (a field name; the
CLI renames it to the flag), `.index` the request's position in its batch and `.source` the
`file:line` of a JSONL record, when known.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Sequence

from qwen2_jax.errors import UserError

SEED_LIMIT = 2**32  # seeds are unsigned 32-bit (the sampler's `jax.random.key`)


class GenerationInputError(UserError, ValueError):
  """A generation input is invalid; `.param` names it, `.index` is the request's batch position,
  `.source` the "file:line" of the record it came from."""

  def __init__(self, param: str, message: str, index: int | None = None,
               source: str | None = None):
    # One line always: the CLI prints the message alone, and JSONL error records hold it.
    message = " ".join(str(message).split("\n"))
    self.param, self.index, self.message, self.source = param, index, message, source
    where = f"{source}: " if source else "" if index is None else f"request {index}: "
    super().__init__(f"{where}{param}: {message}")

  def at(self, index: int) -> "GenerationInputError":
    """The same error, attributed to request `index` of a batch."""
    return type(self)(self.param, self.message, index, self.source)

  def in_file(self, path: str | os.PathLike, line: int) -> "GenerationInputError":
    """The same error, attributed to line `line` (1-based) of the JSONL file `path`."""
    return type(self)(self.param, self.message, line - 1, f"{os.fspath(path)}:{line}")

  def renamed(self, param: str) -> "GenerationInputError":
    """The same error naming the parameter as `param` (e.g. its command-line flag)."""
    return type(self)(param, self.message, self.index, self.source)


class EmptyPromptError(GenerationInputError):
  """The prompt has no tokens."""


class PromptTooLongError(GenerationInputError):
  """The prompt alone is longer than the model's context."""


class ContextOverflowError(GenerationInputError):
  """Prompt length + max_new_tokens exceeds the context."""


class TokenIdError(GenerationInputError):
  """A prompt token id is not an integer in [0, vocab_size)."""


class InvalidParameterError(GenerationInputError):
  """A setting (temperature, top_k, top_p, max_new_tokens, seed, stop ids, batch size, context)
  is invalid."""


class RequestFormatError(GenerationInputError):
  """A request record (e.g. a JSONL line) is malformed: bad JSON or UTF-8, no prompt, unknown
  key."""


class InvalidPathError(GenerationInputError):
  """An input or output path cannot be used: missing, a directory, or output == input."""


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def stop_id_tuple(value: Any) -> tuple:
  """`stop_token_ids` as a tuple; raises `InvalidParameterError` for a non-sequence."""
  if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
    raise InvalidParameterError("stop_token_ids", f"must be a list of token ids, got "
                                f"{type(value).__name__} {value!r}")
  return tuple(value)


def check_sampling(p) -> None:
  """Validates a `SamplingParams`; raises `InvalidParameterError` naming the field."""
  bad = InvalidParameterError
  if not _is_int(p.max_new_tokens) or p.max_new_tokens <= 0:
    raise bad("max_new_tokens", f"must be a positive integer, got {p.max_new_tokens!r}")
  if not _is_real(p.temperature) or math.isnan(p.temperature) or p.temperature < 0 \
      or math.isinf(p.temperature):
    raise bad("temperature", f"must be a finite number >= 0, got {p.temperature!r}")
  if not _is_int(p.top_k) or p.top_k < 0:
    raise bad("top_k", f"must be an integer >= 0 (0 disables), got {p.top_k!r}")
  if not _is_real(p.top_p) or math.isnan(p.top_p) or not 0.0 < p.top_p <= 1.0:
    raise bad("top_p", f"must be in (0, 1], got {p.top_p!r}")
  if not _is_int(p.seed) or not 0 <= p.seed < SEED_LIMIT:
    raise bad("seed", f"must be an integer in [0, 2**32), got {p.seed!r}")
  for t in p.stop_token_ids:
    if not _is_int(t) or t < 0:
      raise bad("stop_token_ids", f"ids must be integers >= 0, got {t!r}")
  if not isinstance(p.ignore_eos, bool):
    raise bad("ignore_eos", f"must be true or false, got {p.ignore_eos!r}")


def context_limit(config) -> int | None:
  """The longest context (prompt + new tokens) the model's positions support; None for none.

  `max_position_embeddings`, times the factor of a YaRN / linear `rope_scaling` (YaRN from its
  `original_max_position_embeddings`, as vLLM's `_get_and_verify_max_len` derives it); None
  with Dual Chunk Attention, whose positions stay within a chunk at any length.
  """
  if config.dual_chunk_attention_config is not None:
    return None
  scaling = config.rope_scaling or {}
  if config.rope_type in ("yarn", "linear"):
    base = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    return int(base * scaling["factor"])
  return int(config.max_position_embeddings)


def check_engine_settings(*, max_batch_size: Any, max_context: Any = None,
                          limit: int | None = None, max_new_tokens: Any = None) -> None:
  """Validates engine settings: max_batch_size >= 1, max_context in [1, limit] (None: the
  default), and a default max_new_tokens that leaves room for a prompt token in max_context."""
  if not _is_int(max_batch_size) or max_batch_size < 1:
    raise InvalidParameterError("max_batch_size",
                                f"must be an integer >= 1, got {max_batch_size!r}")
  if max_context is None:
    return
  if not _is_int(max_context) or max_context < 1:
    raise InvalidParameterError("max_context", f"must be an integer >= 1, got {max_context!r}")
  if limit is not None and max_context > limit:
    raise InvalidParameterError("max_context", f"{max_context} exceeds the model's context of "
                                f"{limit} tokens")
  if max_new_tokens is not None and max_new_tokens >= max_context:
    raise InvalidParameterError("max_new_tokens", f"{max_new_tokens} leaves no room for a prompt "
                                f"in the context of {max_context} tokens")


def check_jsonl_paths(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
  """The batch input must be a readable file and the output a new or regular file in an existing
  directory, not the input itself (compared by inode, so symlinks and other spellings count)."""
  src, dst = os.fspath(input_path), os.fspath(output_path)
  if not os.path.isfile(src):
    raise InvalidPathError("input_path", f"{src} is not a file" if os.path.exists(src)
                           else f"{src} does not exist")
  if os.path.isdir(dst):
    raise InvalidPathError("output_path", f"{dst} is a directory")
  parent = os.path.dirname(os.path.abspath(dst))
  if not os.path.isdir(parent):
    raise InvalidPathError("output_path", f"directory {parent} of {dst} does not exist")
  if os.path.exists(dst) and os.path.samefile(src, dst) or \
      os.path.realpath(src) == os.path.realpath(dst):
    raise InvalidPathError("output_path", f"{dst} is the input file {src}; writing it would "
                           "destroy the input")


def check_request(prompt_ids: Sequence[Any], sampling, *, vocab_size: int,
                  max_context: int) -> list[int]:
  """Validates one request against the model; returns the prompt as a list of ints.

  Raises:
    EmptyPromptError, TokenIdError, PromptTooLongError (param "prompt" / "prompt_ids"),
    ContextOverflowError (param "max_new_tokens"), InvalidParameterError ("stop_token_ids").
  """
  ids = list(prompt_ids)
  if not ids:
    raise EmptyPromptError("prompt", "is empty; at least one token is needed")
  for pos, t in enumerate(ids):
    if not _is_int(t):
      raise TokenIdError("prompt_ids", f"token {pos} is {t!r}, not an integer")
    if not 0 <= t < vocab_size:
      raise TokenIdError("prompt_ids", f"token {pos} is {t}, outside [0, vocab_size={vocab_size})")
  if len(ids) > max_context:
    raise PromptTooLongError("prompt", f"has {len(ids)} tokens, longer than the context "
                             f"({max_context} tokens)")
  if len(ids) + sampling.max_new_tokens > max_context:
    raise ContextOverflowError(
        "max_new_tokens", f"prompt ({len(ids)} tokens) + max_new_tokens "
        f"({sampling.max_new_tokens}) = {len(ids) + sampling.max_new_tokens} exceeds the context "
        f"({max_context} tokens)")
  for t in sampling.stop_token_ids:
    if t >= vocab_size:
      raise InvalidParameterError("stop_token_ids", f"id {t} is outside [0, {vocab_size})")
  return [int(t) for t in ids]


def check_requests(prompts: Sequence[Sequence[Any]], sampling, *, vocab_size: int,
                   max_context: int, check=None) -> list[tuple[list[int], Any]]:
  """`check_request` over a batch: `sampling` is None, one `SamplingParams` for every prompt or
  one per prompt; `check(ids, params)` may add an engine's own test. Returns (ids, params) per
  request; an error carries the index of its request (`.at(i)`)."""
  # sampling imports this module: a top-level import would be a cycle.
  from qwen2_jax.infer.sampling import SamplingParams  # pylint: disable=import-outside-toplevel
  if sampling is None or isinstance(sampling, SamplingParams):
    sampling = [sampling or SamplingParams()] * len(prompts)
  if len(sampling) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(sampling)} SamplingParams")
  out = []
  for i, (p, sp) in enumerate(zip(prompts, sampling)):
    try:
      ids = check_request(p, sp, vocab_size=vocab_size, max_context=max_context)
      if check is not None:
        check(ids, sp)
    except GenerationInputError as e:
      raise e.at(i) from None
    out.append((ids, sp))
  return out
