"""Text-level generation: a checkpoint plus a tokenizer, for prompts, chat and JSONL batches.

`Generator` wraps an `Engine` (token ids in, token ids out) with a tokenizer:

  gen = Generator.from_pretrained("path/to/Qwen2-0.5B-Instruct")   # HF dir or Orbax dir
  gen.complete(["The capital of France is"], SamplingParams(max_new_tokens=16))
  gen.chat([{"role": "user", "content": "Hi!"}], on_text=print)    # streams the reply
  gen.run_jsonl("in.jsonl", "out.jsonl")                            # offline batch

JSONL records hold exactly one of "prompt" (text), "prompt_ids" (token ids) or "messages"
(a ChatML conversation; the generation prompt is appended), optionally "id" / "metadata"
(copied to the output) and per-request sampling fields (max_new_tokens, temperature, top_k,
top_p, seed, stop_token_ids, ignore_eos). Each output line is {"index", "output_ids", "text",
"finish_reason", "num_prompt_tokens"} (+ "id" / "metadata"), or {"index", "error", "param"}
for a bad record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from qwen2_jax.infer import validation
from qwen2_jax.infer.engine import Engine, GenerationResult
from qwen2_jax.infer.sampling import SamplingParams

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_PROMPT_KEYS = ("prompt", "prompt_ids", "messages")
_PASSTHROUGH_KEYS = ("id", "metadata")


@dataclasses.dataclass
class Completion:
  """A request's result: the engine's `GenerationResult` plus its text (stop token excluded)."""
  result: GenerationResult
  text: str | None

  @property
  def output_ids(self) -> list[int]:
    return self.result.output_ids

  @property
  def finish_reason(self) -> str:
    return self.result.finish_reason


def load_model(path: str | os.PathLike, *, dtype: str = "float32",
               compute_dtype: str | None = None, show_progress: bool = False):
  """(config, params) from an HF directory (config.json + safetensors) or an Orbax directory."""
  path = os.fspath(path)
  overrides = {} if compute_dtype is None else {"dtype": compute_dtype}
  if os.path.isdir(os.path.join(path, "params")):
    from qwen2_jax.checkpoint.orbax_io import restore_orbax  # pylint: disable=import-outside-toplevel
    return restore_orbax(path, dtype=dtype, **overrides)
  from qwen2_jax.checkpoint.hf import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
  if compute_dtype is not None:
    overrides = {"compute_dtype": compute_dtype}
  return load_hf_checkpoint(path, dtype=dtype, show_progress=show_progress, **overrides)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


class Generator:
  """An `Engine` plus an optional tokenizer (needed for text prompts, chat and output text)."""

  def __init__(self, engine: Engine, tokenizer=None):
    self.engine = engine
    self.tokenizer = tokenizer
    stops = set(engine.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_id is not None:
      stops.add(int(tokenizer.eos_id))
    engine.eos_token_ids = tuple(sorted(stops))
    im_end = None if tokenizer is None else tokenizer.token_to_id("<|im_end|>")
    self._chat_stops = () if im_end is None else (int(im_end),)

  @classmethod
  def from_pretrained(cls, model_path: str | os.PathLike, tokenizer_path=None, *,
                      dtype: str = "float32", compute_dtype: str | None = None,
                      show_progress: bool = False, **engine_kwargs) -> "Generator":
    """Loads the model (HF or Orbax dir) and the tokenizer (default: the model dir's, if any)."""
    config, params = load_model(model_path, dtype=dtype, compute_dtype=compute_dtype,
                                show_progress=show_progress)
    engine = Engine(config, params, **engine_kwargs)
    del params
    tokenizer = None
    path = tokenizer_path or (model_path if _has_tokenizer(os.fspath(model_path)) else None)
    if path is not None:
      from qwen2_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
      tokenizer = load_tokenizer(path)
    return cls(engine, tokenizer)

  # ----- requests -----
  def _require_tokenizer(self, what: str):
    if self.tokenizer is None:
      raise validation.RequestFormatError(what, "needs a tokenizer (pass --tokenizer / "
                                          "tokenizer_path)")
    return self.tokenizer

  def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
      return self._require_tokenizer("prompt").encode(prompt)
    return list(prompt)

  def encode_messages(self, messages) -> list[int]:
    from qwen2_jax.tokenizer import encode_chat  # pylint: disable=import-outside-toplevel
    try:
      return encode_chat(self._require_tokenizer("messages"), messages, add_generation_prompt=True)
    except validation.GenerationInputError:
      raise
    except ValueError as e:
      raise validation.RequestFormatError("messages", str(e)) from None

  def chat_sampling(self, sampling: SamplingParams) -> SamplingParams:
    """`sampling` plus the ChatML end-of-turn token as a stop id."""
    extra = tuple(t for t in self._chat_stops if t not in sampling.stop_token_ids)
    return dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids + extra)

  def parse_record(self, record: Any, default: SamplingParams) -> tuple[list[int], SamplingParams]:
    """One JSONL record -> (prompt ids, sampling). Raises a `GenerationInputError` subclass."""
    if not isinstance(record, Mapping):
      raise validation.RequestFormatError("record", f"must be a JSON object, got "
                                          f"{type(record).__name__}")
    unknown = sorted(set(record) - set(_PROMPT_KEYS + SAMPLING_KEYS + _PASSTHROUGH_KEYS))
    if unknown:
      raise validation.RequestFormatError(unknown[0], f"unknown key(s) {unknown}")
    given = [k for k in _PROMPT_KEYS if k in record]
    if len(given) != 1:
      raise validation.RequestFormatError(
          "prompt", f"needs exactly one of {list(_PROMPT_KEYS)}, got {given or 'none'}")
    overrides = {k: record[k] for k in SAMPLING_KEYS if k in record}
    if "stop_token_ids" in overrides:
      overrides["stop_token_ids"] = tuple(overrides["stop_token_ids"])
    sampling = dataclasses.replace(default, **overrides)
    if "messages" in record:
      return self.encode_messages(record["messages"]), self.chat_sampling(sampling)
    if "prompt" in record:
      if not isinstance(record["prompt"], str):
        raise validation.RequestFormatError("prompt", "must be a string (use prompt_ids for ids)")
      return self.encode_prompt(record["prompt"]), sampling
    ids = record["prompt_ids"]
    if not isinstance(ids, list):
      raise validation.TokenIdError("prompt_ids", "must be a list of integers")
    return ids, sampling

  def text_of(self, result: GenerationResult) -> str | None:
    if self.tokenizer is None:
      return None
    ids = result.output_ids[:-1] if result.finish_reason == "stop" else result.output_ids
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  # ----- generation -----
  def complete(self, prompts: Sequence[str | Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> list[Completion]:
    """Completions of text or token-id prompts (one batch call; errors name the request)."""
    ids = []
    for i, p in enumerate(prompts):
      try:
        ids.append(self.encode_prompt(p))
      except validation.GenerationInputError as e:
        raise e.at(i) from None
    return [Completion(r, self.text_of(r)) for r in self.engine.generate(ids, sampling)]

  def stream_text(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                  *, interval: int = 4) -> Iterable[str]:
    """Yields text pieces as tokens arrive (held back while a UTF-8 character is incomplete)."""
    tok = self._require_tokenizer("prompt")
    stops = set(self.engine.eos_token_ids) | set((sampling or SamplingParams()).stop_token_ids)
    ids, shown, text = [], "", ""
    for chunk in self.engine.stream(prompt_ids, sampling, interval=interval):
      ids += chunk
      visible = ids[:-1] if ids and ids[-1] in stops else ids
      text = tok.decode(visible, skip_special_tokens=True)
      if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
        shown = text
    if text != shown and text.startswith(shown):  # a trailing incomplete character
      yield text[len(shown):]

  def chat(self, messages: Sequence[Mapping[str, str]], sampling: SamplingParams | None = None,
           *, on_text: Callable[[str], Any] | None = None) -> str:
    """The assistant's reply to a ChatML conversation, streamed piecewise to `on_text`."""
    sampling = self.chat_sampling(sampling or SamplingParams())
    pieces = []
    for piece in self.stream_text(self.encode_messages(messages), sampling):
      pieces.append(piece)
      if on_text is not None:
        on_text(piece)
    return "".join(pieces)

  def run_jsonl(self, input_path: str | os.PathLike, output_path: str | os.PathLike,
                sampling: SamplingParams | None = None, *, on_error: str = "skip",
                progress: bool = True, log=None, chunk_size: int | None = None
                ) -> dict[str, Any]:
    """Generates for every JSONL record; writes one output line per input line, in order.

    Every line is parsed and validated first. `on_error="skip"` reports each bad line (to `log`
    and as an {"index", "error", "param"} output line) and generates the rest; "stop" reports
    the first bad line and raises it before generating anything (no output file is written).
    Returns a summary: requests, errors, generated tokens, seconds, tokens/s, compilations.
    """
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    if on_error not in ("skip", "stop"):
      raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    log = log or sys.stderr
    default = sampling or SamplingParams()
    parsed: list[Any] = []
    with open(input_path, encoding="utf-8") as f:
      for index, line in enumerate(f):
        if not line.strip():
          continue
        try:
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise validation.RequestFormatError("record", f"invalid JSON: {e}") from None
          ids, sp = self.parse_record(record, default)
          ids = validation.check_request(ids, sp, vocab_size=self.engine.config.vocab_size,
                                         max_context=self.engine.max_context)
          parsed.append((index, record, ids, sp))
        except validation.GenerationInputError as e:
          e = e.at(index)
          if on_error == "stop":
            raise e from None
          print(f"line {index + 1}: skipped: {e}", file=log)
          parsed.append((index, None, e, None))
    good = [p for p in parsed if p[1] is not None]
    chunk_size = chunk_size or self.engine.max_batch_size * 16
    tokens, t0 = 0, time.perf_counter()
    compiles0 = self.engine.stats["num_compilations"]
    out_lines: dict[int, dict] = {p[0]: {"index": p[0], "error": str(p[2]), "param": p[2].param}
                                  for p in parsed if p[1] is None}
    tmp = f"{os.fspath(output_path)}.tmp"
    bar = tqdm(total=len(good), unit="req", disable=not progress, file=log, desc="generate")
    with open(tmp, "w", encoding="utf-8") as out:
      for start in range(0, len(good), chunk_size):
        chunk = good[start:start + chunk_size]
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][2]))
        for b in range(0, len(order), self.engine.max_batch_size):
          idx = order[b:b + self.engine.max_batch_size]
          for i, r in zip(idx, self.engine.run_batch([(chunk[i][2], chunk[i][3]) for i in idx])):
            index, record = chunk[i][0], chunk[i][1]
            line = {"index": index, "output_ids": r.output_ids, "text": self.text_of(r),
                    "finish_reason": r.finish_reason, "num_prompt_tokens": len(r.prompt_ids)}
            line.update({k: record[k] for k in _PASSTHROUGH_KEYS if k in record})
            out_lines[index] = line
            tokens += len(r.output_ids)
          bar.update(len(idx))
          bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
        for index in sorted(i for i in out_lines if i <= chunk[-1][0]):  # in input order
          out.write(json.dumps(out_lines.pop(index), ensure_ascii=False) + "\n")
      for index in sorted(out_lines):
        out.write(json.dumps(out_lines.pop(index), ensure_ascii=False) + "\n")
    bar.close()
    os.replace(tmp, output_path)
    seconds = time.perf_counter() - t0
    return {"requests": len(good), "errors": len(parsed) - len(good), "generated_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 2),
            "new_compilations": self.engine.stats["num_compilations"] - compiles0}
