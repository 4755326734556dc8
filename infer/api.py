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
for a bad record; "index" is the 0-based line number of the input.

Nothing finished is lost: output lines are flushed as their batch finishes, and a run that
stops early keeps them in `OUT.partial` (`run_jsonl`). A stop request (`stop_requested`, set by
the command line's SIGINT / SIGTERM handler) is honoured between engine steps and records.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from qwen2_jax import checkpoint
from qwen2_jax.infer import validation
from qwen2_jax.infer.engine import Engine, GenerationResult
from qwen2_jax.infer.sampling import SamplingParams
from qwen2_jax.tokenizer import encode_chat, load_tokenizer

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
               compute_dtype: str | None = None, show_progress: bool = False,
               allow_nonfinite: bool = False):
  """(config, params) from an HF directory (config.json + safetensors) or an Orbax directory
  (`qwen2_jax.checkpoint.load`); weights holding NaN or Inf raise unless `allow_nonfinite`."""
  overrides = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
  return checkpoint.load(path, dtype=dtype, progress=show_progress,
                         allow_nonfinite=allow_nonfinite, **overrides)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


class GenerationInterrupted(Exception):
  """Generation stopped at a stop request (`Generator.stop_requested`, e.g. after SIGINT); the
  message says what was kept. Not a `UserError`: the command line exits 128 + the signal."""


class Generator:
  """An `Engine` plus an optional tokenizer (needed for text prompts, chat and output text).

  With a tokenizer (and `mask_vocab`, the default), ids the tokenizer does not have are never
  generated (`Engine.vocab_limit`; see `qwen2_jax.infer.sampling`).

  `stop_requested` is called between engine steps (every `check_interval` of them) and between
  records; when it returns true, generation raises `GenerationInterrupted` at that point, so a
  signal handler that only sets a flag stops generation outside of any JAX call.
  """

  check_interval = 16  # engine steps between two calls of `stop_requested`

  def __init__(self, engine: Engine, tokenizer=None, *, mask_vocab: bool = True):
    self.engine = engine
    self.tokenizer = tokenizer
    self.stop_requested: Callable[[], bool] | None = None
    stops = set(engine.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_id is not None:
      stops.add(int(tokenizer.eos_id))
    engine.eos_token_ids = tuple(sorted(stops))
    if tokenizer is not None and mask_vocab and tokenizer.vocab_size < engine.config.vocab_size:
      engine.vocab_limit = tokenizer.vocab_size
    im_end = None if tokenizer is None else tokenizer.token_to_id("<|im_end|>")
    self._chat_stops = () if im_end is None else (int(im_end),)

  @classmethod
  def from_pretrained(cls, model_path: str | os.PathLike, tokenizer_path=None, *,
                      dtype: str = "float32", compute_dtype: str | None = None,
                      show_progress: bool = False, allow_nonfinite: bool = False,
                      mask_vocab: bool = True, **engine_kwargs) -> "Generator":
    """Loads the model (HF or Orbax dir) and the tokenizer (default: the model dir's, if any).

    The engine settings (max_batch_size, max_context: at most `validation.context_limit` of the
    model) and the tokenizer are checked before the weights are read.
    """
    validation.check_engine_settings(
        max_batch_size=engine_kwargs.get("max_batch_size", 8),
        max_context=engine_kwargs.get("max_context"),
        limit=validation.context_limit(checkpoint.load_config(model_path)))
    tokenizer = None
    path = tokenizer_path or (model_path if _has_tokenizer(os.fspath(model_path)) else None)
    if path is not None:
      tokenizer = load_tokenizer(path)
    config, params = load_model(model_path, dtype=dtype, compute_dtype=compute_dtype,
                                show_progress=show_progress, allow_nonfinite=allow_nonfinite)
    engine = Engine(config, params, **engine_kwargs)
    del params
    return cls(engine, tokenizer, mask_vocab=mask_vocab)

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
    try:
      return encode_chat(self._require_tokenizer("messages"), messages, add_generation_prompt=True)
    except validation.GenerationInputError:
      raise
    except (ValueError, TypeError) as e:
      raise validation.RequestFormatError("messages", str(e)) from None

  def chat_sampling(self, sampling: SamplingParams) -> SamplingParams:
    """`sampling` plus the ChatML end-of-turn token as a stop id."""
    extra = tuple(t for t in self._chat_stops if t not in sampling.stop_token_ids)
    return dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids + extra)

  def parse_record(self, record: Any, default: SamplingParams) -> tuple[list[int], SamplingParams]:
    """One JSONL record -> (prompt ids, sampling). Raises a `GenerationInputError` subclass
    naming the field for any bad field, whatever its type."""
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
    sampling = dataclasses.replace(default, **{k: record[k] for k in SAMPLING_KEYS if k in record})
    if "messages" in record:
      if not isinstance(record["messages"], list):
        raise validation.RequestFormatError("messages", f"must be a list of {{\"role\", "
                                            f"\"content\"}} objects, got "
                                            f"{type(record['messages']).__name__}")
      return self.encode_messages(record["messages"]), self.chat_sampling(sampling)
    if "prompt" in record:
      if not isinstance(record["prompt"], str):
        raise validation.RequestFormatError("prompt", "must be a string (use prompt_ids for ids)")
      return self.encode_prompt(record["prompt"]), sampling
    ids = record["prompt_ids"]
    if not isinstance(ids, list):
      raise validation.TokenIdError("prompt_ids", f"must be a list of integers, got "
                                    f"{type(ids).__name__}")
    return ids, sampling

  def text_of(self, result: GenerationResult) -> str | None:
    if self.tokenizer is None:
      return None
    ids = result.output_ids[:-1] if result.finish_reason == "stop" else result.output_ids
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  # ----- generation -----
  def _check_stop(self) -> None:
    if self.stop_requested is not None and self.stop_requested():
      raise GenerationInterrupted("interrupted")

  def run_batch(self, requests: list[tuple[list[int], SamplingParams]]
                ) -> list[GenerationResult]:
    """`Engine.run_batch`, with `stop_requested` checked every `check_interval` engine steps.

    Each check follows the device-to-host read of a step's sampled tokens, so no computation is
    in flight when `GenerationInterrupted` is raised.
    """
    if self.stop_requested is None:
      return self.engine.run_batch(requests)
    return self.engine.run_batch(requests, check=self._check_stop,
                                 check_interval=self.check_interval)

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> list[GenerationResult]:
    """`Engine.generate` (validated first; results in the order of `prompts`) through
    `run_batch`, so a stop request is honoured between engine steps."""
    return self.run_batch(self.engine.validate(prompts, sampling))

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
    return [Completion(r, self.text_of(r)) for r in self.generate(ids, sampling)]

  def stream_text(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                  *, interval: int = 4) -> Iterable[str]:
    """Yields text pieces as tokens arrive (held back while a UTF-8 character is incomplete)."""
    tok = self._require_tokenizer("prompt")
    stops = set(self.engine.eos_token_ids) | set((sampling or SamplingParams()).stop_token_ids)
    ids, shown, text = [], "", ""
    self._check_stop()
    for chunk in self.engine.stream(prompt_ids, sampling, interval=interval):
      ids += chunk
      visible = ids[:-1] if ids and ids[-1] in stops else ids
      text = tok.decode(visible, skip_special_tokens=True)
      if not text.endswith("\ufffd") and text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
        shown = text
      self._check_stop()  # the stream has read this chunk back: nothing is in flight
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

  # ----- JSONL batches -----
  def read_jsonl(self, input_path: str | os.PathLike, sampling: SamplingParams | None = None,
                 *, on_error: str = "skip", log=None) -> list[tuple[int, Any, Any, Any]]:
    """Parses and validates every record of a JSONL file: (index, record, prompt ids, sampling)
    per non-blank line, or (index, None, error, None) for a bad one (any bad field, invalid
    JSON or UTF-8), whose error names `file:line` and the field. `on_error="stop"` raises the
    first bad line's error instead; "skip" reports each to `log`."""
    if on_error not in ("skip", "stop"):
      raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    default = sampling or SamplingParams()
    parsed: list[tuple[int, Any, Any, Any]] = []
    with open(input_path, "rb") as f:  # bytes: a bad line must not stop the others decoding
      for index, raw in enumerate(f):
        if not raw.strip():
          continue
        try:
          try:
            line = raw.decode("utf-8-sig" if index == 0 else "utf-8")
          except UnicodeDecodeError as e:
            raise validation.RequestFormatError(
                "record", f"invalid UTF-8 at byte {e.start}: {raw[e.start:e.start + 4]!r}"
            ) from None
          try:
            record = json.loads(line)
          except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits
            raise validation.RequestFormatError("record", f"invalid JSON: {e}") from None
          except RecursionError:
            raise validation.RequestFormatError("record", "invalid JSON: nested too deeply"
                                                ) from None
          ids, sp = self.parse_record(record, default)
          ids = validation.check_request(ids, sp, vocab_size=self.engine.config.vocab_size,
                                         max_context=self.engine.max_context)
          parsed.append((index, record, ids, sp))
        except validation.GenerationInputError as e:
          e = e.in_file(input_path, index + 1)
          if on_error == "stop":
            raise e from None
          print(f"skipped {e}", file=log or sys.stderr)
          parsed.append((index, None, e, None))
    return parsed

  def run_jsonl(self, input_path: str | os.PathLike, output_path: str | os.PathLike,
                sampling: SamplingParams | None = None, *, on_error: str = "skip",
                progress: bool = True, log=None, chunk_size: int | None = None
                ) -> dict[str, Any]:
    """Generates for every JSONL record; the output has one line per input line, in order.

    Every line is parsed and validated first (`read_jsonl`): a bad line becomes an {"index",
    "error", "param"} output line (`on_error="skip"`), or its error is raised before anything
    is generated or written ("stop"). Lines are written and flushed as their batch finishes, to
    a temporary file beside the output (`OUT.<pid>.tmp`), which is renamed to the output once
    every line is there. If generation stops early (`GenerationInterrupted`, or any exception),
    the lines finished so far are kept in `OUT.partial`, in the order they finished, each with
    its input "index"; the output itself is left as it was. Returns a summary: requests,
    errors, generated tokens, seconds, tokens/s, compilations, output.

    Raises:
      validation.InvalidPathError: the input is missing, the output's directory is missing, or
        the output is the input.
      GenerationInterrupted: on a stop request; its message says how many of how many records
        were kept, and where.
    """
    validation.check_jsonl_paths(input_path, output_path)
    log = log or sys.stderr
    parsed = self.read_jsonl(input_path, sampling, on_error=on_error, log=log)
    good = [p for p in parsed if p[1] is not None]
    chunk_size = chunk_size or self.engine.max_batch_size * 16
    tokens, t0 = 0, time.perf_counter()
    compiles0 = self.engine.stats["num_compilations"]
    out = _ResultFile(output_path, input_path)
    bar = tqdm(total=len(good), unit="req", disable=not progress, file=log, desc="generate")
    try:
      for index, record, error, _ in parsed:
        if record is None:
          out.write(index, {"index": index, "error": str(error), "param": error.param})
      for start in range(0, len(good), chunk_size):
        chunk = good[start:start + chunk_size]
        order = sorted(range(len(chunk)), key=lambda i: len(chunk[i][2]))  # less padding
        for b in range(0, len(order), self.engine.max_batch_size):
          self._check_stop()
          idx = order[b:b + self.engine.max_batch_size]
          for i, r in zip(idx, self.run_batch([(chunk[i][2], chunk[i][3]) for i in idx])):
            index, record = chunk[i][0], chunk[i][1]
            line = {"index": index, "output_ids": r.output_ids, "text": self.text_of(r),
                    "finish_reason": r.finish_reason, "num_prompt_tokens": len(r.prompt_ids)}
            line.update({k: record[k] for k in _PASSTHROUGH_KEYS if k in record})
            out.write(index, line)
            tokens += len(r.output_ids)
          out.flush()
          bar.update(len(idx))
          bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
      out.commit()
    except BaseException as e:
      kept = out.keep_partial()
      note = (f"{out.num_lines} of {len(parsed)} records finished"
              + (f", kept in {kept} (in the order they finished; each line has its input "
                 f"\"index\")" if kept else "") + f"; {os.fspath(output_path)} was not written")
      if isinstance(e, GenerationInterrupted):
        raise GenerationInterrupted(f"interrupted: {note}") from None
      print(f"generation failed: {note}", file=log)
      raise
    finally:
      bar.close()
    seconds = time.perf_counter() - t0
    return {"requests": len(good), "errors": len(parsed) - len(good), "generated_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 2),
            "new_compilations": self.engine.stats["num_compilations"] - compiles0,
            "output": os.fspath(output_path)}


class _ResultFile:
  """Output lines of a JSONL batch, written and flushed as they finish to a temporary file beside
  the output (same directory: the final rename is atomic). `commit` puts them in input order
  and renames the file to the output; `keep_partial` renames it to `OUT.partial`.

  Files are created with O_EXCL ("x"): a name already taken is never overwritten, and the mode
  follows the umask like any new file.
  """

  def __init__(self, path: str | os.PathLike, input_path: str | os.PathLike):
    self.path, self.input_path = os.fspath(path), os.fspath(input_path)
    self.tmp, self.file = self._create(f"{self.path}.{os.getpid()}", ".tmp")
    self.spans: list[tuple[int, int, int]] = []  # (input index, offset, bytes) per line

  @property
  def num_lines(self) -> int:
    return len(self.spans)

  @staticmethod
  def _create(stem: str, suffix: str):
    for n in itertools.count():
      name = f"{stem}{f'-{n}' if n else ''}{suffix}"
      try:
        return name, open(name, "x+b")
      except FileExistsError:
        continue

  def write(self, index: int, line: dict) -> None:
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
    self.spans.append((index, self.file.tell(), len(data)))
    self.file.write(data)

  def flush(self) -> None:
    self.file.flush()  # in the OS: survives the process, whatever ends it

  def _close(self, file) -> None:
    file.flush()
    os.fsync(file.fileno())  # the rename that follows must not outlive the data on a crash
    file.close()

  def commit(self) -> None:
    """Writes the output in input order (a rewrite only when lines finished out of order)."""
    ordered = sorted(self.spans)
    if ordered != self.spans:
      name, final = self._create(f"{self.path}.{os.getpid()}", ".sorted.tmp")
      self.file.flush()
      try:
        for _, offset, size in ordered:
          self.file.seek(offset)
          final.write(self.file.read(size))
      except BaseException:
        final.close()
        os.unlink(name)  # the unsorted results stay in self.tmp for keep_partial
        raise
      self.file.close()
      os.unlink(self.tmp)
      self.tmp, self.file = name, final
    self._close(self.file)
    os.replace(self.tmp, self.path)

  def keep_partial(self) -> str | None:
    """Renames what was written to `OUT.partial` (or `OUT.<pid>.partial` when that name is taken,
    by the input or by an earlier interrupted run's results); None if nothing was written."""
    if not os.path.exists(self.tmp):  # committed already
      return None
    if not self.file.closed:
      self._close(self.file)
    if not self.spans:
      os.unlink(self.tmp)
      return None
    partial = f"{self.path}.partial"
    if os.path.lexists(partial):  # never overwrite earlier results (or the input)
      partial = self.tmp[:-len(".tmp")] + ".partial"
    os.replace(self.tmp, partial)
    return partial
