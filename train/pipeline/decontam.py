"""Benchmark decontamination (Qwen2 Technical Report, arXiv:2407.10671, section 5.2.6; kept for
Qwen2.5, arXiv:2412.15115): a training document is removed when it shares a word 13-gram with a
benchmark item, or (the strict rule) when the longest common subsequence (LCS) of its words and
an item's covers at least 13 words and 60% of the shorter of the two. Both texts are first
case-folded and stripped of punctuation and symbols, as the report does before tokenising.
"""

from __future__ import annotations

import collections
import json
import unicodedata
from typing import Iterator

import numpy as np

from qwen2_jax.errors import UserError
from qwen2_jax.train.pipeline import sources
from qwen2_jax.train.pipeline.recipe import DecontaminateConfig, expand
from qwen2_jax.train.pipeline.rules import words


def normalized_words(text: str) -> list[str]:
  """Case-folded words of `text` with Unicode punctuation (P*) and symbols (S*) removed."""
  kept = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text.casefold())
  return words(kept)


def lcs_length(a: list, b: list) -> int:
  """Length of the longest common subsequence of `a` and `b`, bit-parallel over `a` (the rows
  of the dynamic programme as one integer, Allison-Dix / Hyyro): O(len(b)) big-integer steps."""
  if not a or not b:
    return 0
  masks: dict = {}
  for i, token in enumerate(a):
    masks[token] = masks.get(token, 0) | (1 << i)
  full = (1 << len(a)) - 1
  row = full
  for token in b:
    match = masks.get(token)
    if match:
      u = row & match
      row = ((row + u) | (row - u)) & full
  return len(a) - row.bit_count()


def lcs_length_reference(a: list, b: list) -> int:
  """The textbook O(len(a) * len(b)) dynamic programme (for tests of `lcs_length`)."""
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def read_benchmark_items(path: str, field: str | None) -> Iterator[tuple[str, str]]:
  """(item id `path:line`, text) of each non-blank line of a JSONL or plain-text benchmark."""
  try:
    with sources.open_file(expand(path)) as f:
      for number, raw in enumerate(f, 1):
        where = f"{path}:{number}"
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          raise UserError(f"decontaminate.benchmarks: {where}: not UTF-8") from None
        if not line.strip():
          continue
        if field is None:
          yield where, line.rstrip("\n")
          continue
        try:
          value = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise UserError(f"decontaminate.benchmarks: {where}: not a JSON object with a "
                          f"{field!r} field") from None
        if not isinstance(value, str):
          raise UserError(f"decontaminate.benchmarks: {where}: {field!r} is not a string")
        yield where, value
  except FileNotFoundError:
    raise UserError(f"decontaminate.benchmarks: no such file: {path}") from None


class BenchmarkIndex:
  """The benchmark items' n-grams and words, and an inverted index of their words."""

  def __init__(self, config: DecontaminateConfig):
    self.config = config
    self.ids: list[str] = []
    self.items: list[list[str]] = []
    self.ngrams: dict[str, int] = {}             # "w1 w2 ... wn" -> the first item holding it
    for bench in config.benchmarks:
      for item_id, text in read_benchmark_items(bench.path, bench.field):
        ws = normalized_words(text)
        k = len(self.items)
        self.ids.append(item_id)
        self.items.append(ws)
        n = config.ngram
        if n is not None:
          for i in range(len(ws) - n + 1):
            self.ngrams.setdefault(" ".join(ws[i:i + n]), k)
    # Inverted index for the LCS rule's cheap bound: word -> (items, count in each item).
    postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for k, ws in enumerate(self.items):
      for w, count in collections.Counter(ws).items():
        postings[w].append((k, count))
    self.postings = {w: (np.array([k for k, _ in p], np.int64), np.array([c for _, c in p]))
                     for w, p in postings.items()}
    self.lengths = np.array([len(ws) for ws in self.items], np.int64)

  def match(self, text: str) -> tuple[str, str] | None:
    """(rule, benchmark item id) of the first rule `text` meets: "ngram" (the first shared
    n-gram in document order), then "lcs" (the lowest-numbered item); None when clean."""
    ws = normalized_words(text)
    n = self.config.ngram
    if n is not None and self.ngrams:
      for i in range(len(ws) - n + 1):
        k = self.ngrams.get(" ".join(ws[i:i + n]))
        if k is not None:
          return "ngram", self.ids[k]
    if self.config.lcs and ws and self.items:
      k = self._lcs_match(ws)
      if k is not None:
        return "lcs", self.ids[k]
    return None

  def _needed(self, doc_len: int) -> np.ndarray:
    shorter = np.minimum(self.lengths, doc_len)
    return np.maximum(self.config.lcs_min_tokens,
                      np.ceil(self.config.lcs_min_fraction * shorter - 1e-9)).astype(np.int64)

  def _lcs_match(self, ws: list[str]) -> int | None:
    # An LCS is at most the size of the multiset intersection: compute that bound for every
    # item from the postings, then run the exact LCS only where the bound reaches the rule.
    counts = collections.Counter(ws)
    present = [w for w in counts if w in self.postings]
    if not present:
      return None
    items = np.concatenate([self.postings[w][0] for w in present])
    shared = np.concatenate([np.minimum(self.postings[w][1], counts[w]) for w in present])
    bound = np.bincount(items, weights=shared, minlength=len(self.items))
    needed = self._needed(len(ws))
    for k in np.flatnonzero(bound >= needed):
      if lcs_length(self.items[k], ws) >= needed[k]:
        return int(k)
    return None

