"""Needle in a haystack / passkey retrieval: exact-retrieval scores by context length and depth.

A prompt of exactly `length` tokens is an instruction, a haystack (a local text file, or the
classic passkey filler "The grass is green. The sky is blue. ..." repeated), a needle sentence
holding a random numeric key inserted at a relative `depth` of the haystack (0 = first, 1 = last,
snapped back to a sentence boundary), and a question. The model answers greedily; a case scores
1 when the key's digits appear in the answer. `run_needle` returns one record per case and a
table of mean scores (rows: depths, columns: lengths), the long-context figure of the Qwen2
report. With `chat=True` the prompt is one ChatML user turn plus the generation prompt
(instruct models).

The harness takes any `Engine` (any checkpoint, DCA or YaRN config) and any tokenizer; a random
tiny model scores ~0 (the mechanics are what the tests check). Pieces are tokenised separately
and concatenated as ids, so every prompt of a length has exactly that many tokens.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from qwen2_jax.infer.engine import Engine
from qwen2_jax.infer.sampling import SamplingParams
from qwen2_jax.infer.validation import InvalidParameterError
from qwen2_jax.tokenizer import apply_chat_template

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")


@dataclasses.dataclass(frozen=True)
class NeedleTask:
  """The texts of a prompt; `needle` holds `{key}`."""
  instruction: str = ("There is an important piece of information hidden inside a lot of "
                      "irrelevant text. Find it and memorize it. I will quiz you about it.")
  needle: str = "The pass key is {key}. Remember it. {key} is the pass key."
  question: str = "What is the pass key? The pass key is"
  key_digits: int = 5
  chat: bool = False


@dataclasses.dataclass(frozen=True)
class NeedleCase:
  """One prompt: ids of exactly `length` tokens; the needle starts at token `needle_start`."""
  length: int
  depth: float
  trial: int
  key: str
  prompt_ids: tuple[int, ...]
  needle_start: int


class Haystack:
  """Token ids of a text split at sentence ends, tiled to any length; `boundaries` are the token
  offsets where a sentence starts (insertion points for the needle)."""

  def __init__(self, tokenizer, text: str):
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    if not sentences:
      raise InvalidParameterError("haystack", "the text is empty")
    self.pieces = [tokenizer.encode(" " + s, parse_special=False) for s in sentences]

  def take(self, n: int) -> tuple[list[int], list[int]]:
    """(ids [n], sentence-start offsets < n): the sentences repeated until n tokens."""
    ids, starts = [], []
    while len(ids) < n:
      for piece in self.pieces:
        starts.append(len(ids))
        ids.extend(piece)
        if len(ids) >= n:
          break
    return ids[:n], [s for s in starts if s < n]


def _frame(tokenizer, task: NeedleTask) -> tuple[list[int], list[int]]:
  """Ids before the haystack and after it (the question, and the chat turn around it)."""
  head, tail = task.instruction + "\n", "\n" + task.question
  if task.chat:
    marker = "\x00HAYSTACK\x00"
    rendered = apply_chat_template([{"role": "user", "content": head + marker + tail}],
                                   add_generation_prompt=True)
    head, tail = rendered.split(marker)
  return tokenizer.encode(head), tokenizer.encode(tail)


def build_case(tokenizer, haystack: Haystack, task: NeedleTask, length: int, depth: float,
               key: str, trial: int = 0) -> NeedleCase:
  """The prompt of one (length, depth, key): exactly `length` tokens.

  Raises:
    InvalidParameterError: (a `UserError` and `ValueError`) naming "depths" or "lengths".
  """
  if not 0.0 <= depth <= 1.0:
    raise InvalidParameterError("depths", f"depth must be in [0, 1], got {depth}")
  head, tail = _frame(tokenizer, task)
  needle = tokenizer.encode(" " + task.needle.format(key=key), parse_special=False)
  budget = length - len(head) - len(needle) - len(tail)
  if budget < 0:
    raise InvalidParameterError("lengths", f"length {length} is shorter than the prompt "
                                f"without haystack ({length - budget} tokens)")
  hay, starts = haystack.take(budget)
  target = round(depth * budget)
  cut = max([s for s in starts if s <= target], default=0) if depth < 1.0 else budget
  ids = head + hay[:cut] + needle + hay[cut:] + tail
  return NeedleCase(length, depth, trial, key, tuple(ids), len(head) + cut)


def make_cases(tokenizer, haystack: Haystack, task: NeedleTask, lengths: Sequence[int],
               depths: Sequence[float], trials: int, seed: int = 0) -> list[NeedleCase]:
  """Every (length, depth, trial), each trial with its own random key (seeded)."""
  rng = np.random.default_rng(seed)
  low, high = 10 ** (task.key_digits - 1), 10 ** task.key_digits
  cases = []
  for length in lengths:
    for depth in depths:
      for trial in range(trials):
        key = str(int(rng.integers(low, high)))
        cases.append(build_case(tokenizer, haystack, task, int(length), float(depth), key,
                                trial))
  return cases


def score(answer: str, key: str) -> int:
  """1 when the key's digits appear in the answer as a whole number, else 0."""
  return int(re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None)


def run_needle(engine: Engine, tokenizer, cases: Sequence[NeedleCase], *,
               max_new_tokens: int = 16) -> dict[str, Any]:
  """Generates greedily for every case; returns {"records": [...], "table": {...}}."""
  sampling = SamplingParams(max_new_tokens=max_new_tokens)
  results = engine.generate([list(c.prompt_ids) for c in cases], sampling)
  records = []
  for case, result in zip(cases, results):
    answer = tokenizer.decode(result.output_ids, skip_special_tokens=True)
    records.append({"length": case.length, "depth": case.depth, "trial": case.trial,
                    "key": case.key, "answer": answer, "score": score(answer, case.key),
                    "needle_start": case.needle_start})
  return {"records": records, "table": score_table(records)}


def score_table(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Mean score per (depth, length), per length, and overall."""
  lengths = sorted({r["length"] for r in records})
  depths = sorted({r["depth"] for r in records})
  cell = lambda d, n: [r["score"] for r in records if r["depth"] == d and r["length"] == n]
  mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
  return {"lengths": lengths, "depths": depths,
          "scores": [[mean(cell(d, n)) for n in lengths] for d in depths],
          "by_length": [mean([r["score"] for r in records if r["length"] == n])
                        for n in lengths],
          "overall": mean([r["score"] for r in records])}


def format_table(table: dict[str, Any]) -> str:
  """The score table as text: one row per depth, one column per length."""
  width = max(8, *(len(f"{n:,}") + 2 for n in table["lengths"]))
  lines = ["depth \\ length" + "".join(f"{n:>{width},}" for n in table["lengths"])]
  for depth, row in zip(table["depths"], table["scores"]):
    lines.append(f"{depth:>14.2f}" + "".join(f"{s:>{width}.2f}" for s in row))
  lines.append(f"{'mean':>14}" + "".join(f"{s:>{width}.2f}" for s in table["by_length"]))
  lines.append(f"overall exact retrieval: {table['overall']:.3f}")
  return "\n".join(lines)
