"""Typed errors for generation inputs, checked on the host before anything reaches XLA.

Every error is a `GenerationInputError` (a `ValueError`) whose `.param` names the offending
parameter and whose `.index` (when set) is the request's position in its batch. Nothing is ever
truncated or clamped silently (after vLLM's `SamplingParams._verify_args` and TGI's validation).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


class GenerationInputError(ValueError):
  """A generation input is invalid; `.param` names it, `.index` is the request's batch position."""

  def __init__(self, param: str, message: str, index: int | None = None):
    self.param, self.index, self.message = param, index, message
    where = "" if index is None else f"request {index}: "
    super().__init__(f"{where}{param}: {message}")

  def at(self, index: int) -> "GenerationInputError":
    """The same error, attributed to request `index` of a batch."""
    return type(self)(self.param, self.message, index)


class EmptyPromptError(GenerationInputError):
  """The prompt has no tokens."""


class PromptTooLongError(GenerationInputError):
  """The prompt alone is longer than the model's context."""


class ContextOverflowError(GenerationInputError):
  """Prompt length + max_new_tokens exceeds the context."""


class TokenIdError(GenerationInputError):
  """A prompt token id is not an integer in [0, vocab_size)."""


class InvalidParameterError(GenerationInputError):
  """A sampling setting (temperature, top_k, top_p, max_new_tokens, seed, stop ids) is invalid."""


class RequestFormatError(GenerationInputError):
  """A request record (e.g. a JSONL line) is malformed: bad JSON, no prompt, unknown key."""


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(p) -> None:
  """Validates a `SamplingParams`; raises `InvalidParameterError` naming the field."""
  bad = lambda param, msg: InvalidParameterError(param, msg)
  if not _is_int(p.max_new_tokens) or p.max_new_tokens <= 0:
    raise bad("max_new_tokens", f"must be a positive integer, got {p.max_new_tokens!r}")
  if not _is_real(p.temperature) or math.isnan(p.temperature) or p.temperature < 0 \
      or math.isinf(p.temperature):
    raise bad("temperature", f"must be a finite number >= 0, got {p.temperature!r}")
  if not _is_int(p.top_k) or p.top_k < 0:
    raise bad("top_k", f"must be an integer >= 0 (0 disables), got {p.top_k!r}")
  if not _is_real(p.top_p) or math.isnan(p.top_p) or not 0.0 < p.top_p <= 1.0:
    raise bad("top_p", f"must be in (0, 1], got {p.top_p!r}")
  if not _is_int(p.seed):
    raise bad("seed", f"must be an integer, got {p.seed!r}")
  for t in p.stop_token_ids:
    if not _is_int(t) or t < 0:
      raise bad("stop_token_ids", f"ids must be integers >= 0, got {t!r}")
  if not isinstance(p.ignore_eos, bool):
    raise bad("ignore_eos", f"must be true or false, got {p.ignore_eos!r}")


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
