"""Per-document rules: the script check, the Gopher quality and repetition rules (Rae et al.
2021, appendix A, table A1) and the word splitter they share. Each `*_reason` function returns
the name of the first rule a document fails, or None when it passes them all."""

from __future__ import annotations

import collections
import functools
import re
import unicodedata

from qwen2_jax.train.pipeline.recipe import HeuristicsConfig, RepetitionConfig

# Ideographs, kana, Hangul syllables and CJK / full-width punctuation: one word per character
# (these scripts use no spaces).
_CJK = ("\u3001-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
        "\uff01-\uff65")
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_BULLETS = ("•", "‣", "○", "●", "◦", "▪", "■", "□", "➢", "►", "-", "*", "–")
_ELLIPSES = ("...", "…")


def words(text: str) -> list[str]:
  """Whitespace-separated words, with each CJK character a word of its own."""
  return _WORD.findall(text)


@functools.lru_cache(maxsize=1 << 16)
def script_of(char: str) -> str:
  """The script of a letter: the first word of its Unicode name, lower-case ("latin", "cjk",
  "hiragana", "hangul", "cyrillic", ...); width prefixes are skipped ("FULLWIDTH LATIN ...")."""
  name = unicodedata.name(char, "UNKNOWN").split()
  if name[0] in ("FULLWIDTH", "HALFWIDTH") and len(name) > 1:
    return name[1].lower()
  return name[0].lower()


def script_fraction(text: str, allowed: frozenset[str]) -> float:
  """Letters whose script is in `allowed`, over all letters (0 when there are none)."""
  letters = [c for c in text if c.isalpha()]
  if not letters:
    return 0.0
  return sum(script_of(c) in allowed for c in letters) / len(letters)


def heuristics_reason(text: str, config: HeuristicsConfig) -> str | None:
  """The first quality rule `text` fails, in the order of `HeuristicsConfig`'s fields."""
  c = config
  if c.allowed_scripts is not None and (
      script_fraction(text, frozenset(c.allowed_scripts)) < c.min_script_fraction):
    return "script"
  ws = words(text)
  n = len(ws)
  if c.min_words is not None and n < c.min_words:
    return "min_words"
  if c.max_words is not None and n > c.max_words:
    return "max_words"
  if c.min_chars is not None and len(text) < c.min_chars:
    return "min_chars"
  if c.max_chars is not None and len(text) > c.max_chars:
    return "max_chars"
  # Mean word length over the words of spaced scripts: a CJK character is always one "word".
  spaced = [w for w in ws if not _CJK_CHAR.fullmatch(w)]
  mean = sum(map(len, spaced)) / len(spaced) if spaced else None
  if c.min_mean_word_length is not None and mean is not None and mean < c.min_mean_word_length:
    return "min_mean_word_length"
  if c.max_mean_word_length is not None and mean is not None and mean > c.max_mean_word_length:
    return "max_mean_word_length"
  if c.max_symbol_word_ratio is not None:
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols > c.max_symbol_word_ratio * max(n, 1):
      return "symbol_word_ratio"
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  if lines and c.max_ellipsis_line_fraction is not None:
    if sum(line.endswith(_ELLIPSES) for line in lines) > c.max_ellipsis_line_fraction * len(lines):
      return "ellipsis_lines"
  if lines and c.max_bullet_line_fraction is not None:
    if sum(line.startswith(_BULLETS) for line in lines) > c.max_bullet_line_fraction * len(lines):
      return "bullet_lines"
  if c.min_alpha_word_fraction is not None:
    if sum(any(ch.isalpha() for ch in w) for w in ws) < c.min_alpha_word_fraction * n:
      return "alpha_words"
  return None


def _duplicates(pieces: list[str]) -> tuple[int, int]:
  """(pieces equal to an earlier piece, their characters)."""
  seen: set[str] = set()
  count = chars = 0
  for piece in pieces:
    if piece in seen:
      count += 1
      chars += len(piece)
    seen.add(piece)
  return count, chars


def top_ngram_char_fraction(ws: list[str], n: int) -> float:
  """Characters of the most frequent word n-gram times its count, over all word characters
  (0 unless some n-gram occurs twice; ties go to the n-gram with the most characters)."""
  total = sum(map(len, ws))
  grams = collections.Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
  if not grams or not total:
    return 0.0
  count, chars = max((k, sum(map(len, g))) for g, k in grams.items())
  return count * chars / total if count > 1 else 0.0


def duplicate_ngram_char_fraction(ws: list[str], n: int) -> float:
  """Characters of the words covered by any word n-gram occurring more than once (every
  occurrence, each word counted once), over all word characters."""
  total = sum(map(len, ws))
  if len(ws) < n or not total:
    return 0.0
  grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
  counts = collections.Counter(grams)
  covered = [False] * len(ws)
  for i, gram in enumerate(grams):
    if counts[gram] > 1:
      covered[i:i + n] = [True] * n
  return sum(len(w) for w, hit in zip(ws, covered) if hit) / total


def repetition_reason(text: str, config: RepetitionConfig) -> str | None:
  """The first repetition rule `text` fails: lines, paragraphs, top n-grams, duplicate n-grams."""
  c = config
  total = max(len(text), 1)
  for unit, pieces in (("line", text.split("\n")), ("paragraph", re.split(r"\n\s*\n", text))):
    pieces = [p.strip() for p in pieces if p.strip()]
    count, chars = _duplicates(pieces)
    limit = getattr(c, f"max_duplicate_{unit}_fraction")
    if pieces and limit is not None and count > limit * len(pieces):
      return f"duplicate_{unit}s"
    limit = getattr(c, f"max_duplicate_{unit}_char_fraction")
    if limit is not None and chars > limit * total:
      return f"duplicate_{unit}_chars"
  ws = words(text)
  for n, limit in sorted(c.max_top_ngram_char_fraction.items()):
    if top_ngram_char_fraction(ws, n) > limit:
      return f"top_{n}gram"
  for n, limit in sorted(c.max_duplicate_ngram_char_fraction.items()):
    if duplicate_ngram_char_fraction(ws, n) > limit:
      return f"duplicate_{n}grams"
  return None
