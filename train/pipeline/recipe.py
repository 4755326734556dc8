"""The cleaning recipe: one YAML file that says what `qwen2-jax data prepare --recipe` reads,
which stages run with which thresholds, and where the shards go.

Every stage is a section; a section left out is a stage switched off, and inside a section a
threshold set to `null` switches that one rule off. The classes are built with
`qwen2_jax.typed_config.structure`, so an unknown key or a bad value is one `ConfigError` line
naming the setting and its `file:line` (or the `--set` it came from).
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from typing import Iterable

from qwen2_jax.typed_config import Bool, ConfigError, Float, Int, Recipe, read_recipe, structure

NORMAL_FORMS = ("NFC", "NFKC")
INPUT_KINDS = ("text", "jsonl", "parquet")
TEXT_SPLITS = ("file", "paragraph", "line")


def _check(cls: str, name: str, ok: bool, rule: str, value) -> None:
  if not ok:
    raise ConfigError(f"{cls}.{name}: {rule}, got {value!r}")


def _fractions(obj, names: Iterable[str]) -> None:
  for name in names:
    value = getattr(obj, name)
    _check(type(obj).__name__, name, value is None or 0 <= value <= 1, "must be in [0, 1] or null",
           value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputConfig:
  """The raw corpus: as a `data prepare` source (files sorted per pattern, in pattern order)."""
  kind: str                          # "text" | "jsonl" | "parquet"
  paths: tuple[str, ...]             # files or glob patterns (local, or gs:// etc. on workers)
  field: str = "text"                # JSONL key / Parquet column holding the document text
  split: str = "file"                # text: one document per "file", "paragraph" or "line"

  def __post_init__(self):
    _check("input", "kind", self.kind in INPUT_KINDS, f"must be one of {INPUT_KINDS}", self.kind)
    _check("input", "split", self.split in TEXT_SPLITS, f"must be one of {TEXT_SPLITS}",
           self.split)
    _check("input", "paths", len(self.paths) > 0, "needs at least one file or pattern", self.paths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputConfig:
  """Where the shards go: `{prefix}-00000-of-0000N.arrayrecord` plus `{prefix}.manifest.json`,
  `.summary.json`, `.dead_letter.jsonl` and `.decontaminated.jsonl` beside them."""
  prefix: str
  tokenizer: str                     # tokenizer.json, an HF tokenizer directory or a .model
  docs_per_shard: Int = 100_000      # consecutive kept documents per shard

  def __post_init__(self):
    _check("output", "docs_per_shard", self.docs_per_shard > 0, "must be positive",
           self.docs_per_shard)
    for name in ("prefix", "tokenizer"):  # `~` and `$VARS`, as in input paths
      object.__setattr__(self, name, expand(getattr(self, name)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormalizeConfig:
  """Unicode normalisation of every document before any rule looks at it."""
  form: str = "NFC"                  # "NFC" | "NFKC"

  def __post_init__(self):
    _check("normalize", "form", self.form in NORMAL_FORMS, f"must be one of {NORMAL_FORMS}",
           self.form)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeuristicsConfig:
  """Document-level quality rules (Gopher, Rae et al. 2021, appendix A) and a script check.

  Words are whitespace-separated runs, except that each CJK ideograph, kana or Hangul syllable
  counts as one word (so the length rules mean something for Chinese and Japanese); the mean
  word length is taken over the other words only (a text of CJK words alone passes it).
  """
  allowed_scripts: tuple[str, ...] | None = None  # e.g. [latin, cjk]: the first word of each
                                                  # letter's Unicode name; null: no check
  min_script_fraction: Float = 0.5   # letters in an allowed script / all letters
  min_words: Int | None = 50
  max_words: Int | None = 100_000
  min_chars: Int | None = None
  max_chars: Int | None = None
  min_mean_word_length: Float | None = 3.0
  max_mean_word_length: Float | None = 10.0
  max_symbol_word_ratio: Float | None = 0.1       # ('#' + ellipses) / words
  max_ellipsis_line_fraction: Float | None = 0.3  # lines ending with "..." or "…"
  max_bullet_line_fraction: Float | None = 0.9    # lines starting with a bullet
  min_alpha_word_fraction: Float | None = 0.8     # words with at least one letter

  def __post_init__(self):
    if self.allowed_scripts is not None:
      scripts = tuple(self.allowed_scripts)
      _check("heuristics", "allowed_scripts", bool(scripts) and all(
          isinstance(s, str) and s == s.lower() and s.isidentifier() for s in scripts),
          "must be a non-empty list of lower-case script names (latin, cjk, ...) or null",
          self.allowed_scripts)
    for name in ("min_words", "max_words", "min_chars", "max_chars", "min_mean_word_length",
                 "max_mean_word_length", "max_symbol_word_ratio"):
      value = getattr(self, name)
      _check("heuristics", name, value is None or value >= 0, "must be >= 0 or null", value)
    _fractions(self, ("min_script_fraction", "max_ellipsis_line_fraction",
                      "max_bullet_line_fraction", "min_alpha_word_fraction"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepetitionConfig:
  """Repetition rules of Gopher (Rae et al. 2021, table A1); each a maximum fraction."""
  max_duplicate_line_fraction: Float | None = 0.30
  max_duplicate_paragraph_fraction: Float | None = 0.30
  max_duplicate_line_char_fraction: Float | None = 0.20
  max_duplicate_paragraph_char_fraction: Float | None = 0.20
  # n -> the most frequent word n-gram's characters (times its count) / all word characters
  max_top_ngram_char_fraction: dict[Int, Float] = dataclasses.field(
      default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
  # n -> characters of words covered by word n-grams that occur more than once / all
  max_duplicate_ngram_char_fraction: dict[Int, Float] = dataclasses.field(
      default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

  def __post_init__(self):
    _fractions(self, ("max_duplicate_line_fraction", "max_duplicate_paragraph_fraction",
                      "max_duplicate_line_char_fraction",
                      "max_duplicate_paragraph_char_fraction"))
    for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
      table = getattr(self, name)
      _check("repetition", name, all(n >= 1 and 0 <= f <= 1 for n, f in table.items()),
             "maps n >= 1 to a fraction in [0, 1]", table)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DedupConfig:
  """Exact deduplication (content hash) and near-duplicate removal (MinHash LSH)."""
  exact: Bool = True                 # drop documents whose normalised text is already kept
  near: Bool = True                  # MinHash LSH over word n-grams
  threshold: Float = 0.8             # Jaccard similarity at which two documents are duplicates
  num_perm: Int = 128                # MinHash permutations
  ngram: Int = 5                     # words per shingle
  seed: Int = 1                      # MinHash permutation seed

  def __post_init__(self):
    _check("dedup", "threshold", 0 < self.threshold <= 1, "must be in (0, 1]", self.threshold)
    _check("dedup", "num_perm", self.num_perm >= 2, "must be >= 2", self.num_perm)
    _check("dedup", "ngram", self.ngram >= 1, "must be >= 1", self.ngram)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkFile:
  """A local benchmark: JSONL (`field` holds an item's text) or plain text (one item a line)."""
  path: str
  field: str | None = None           # JSONL key; null: the file is plain text


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
  """Removal of training documents that overlap benchmark items (Qwen2 report, section 5.2.6).

  Both sides are normalised the same way: case-folded, Unicode punctuation and symbols removed,
  split into words (CJK characters one word each).
  """
  benchmarks: tuple[BenchmarkFile, ...]
  ngram: Int | None = 13             # drop on any shared n-gram of words; null: rule off
  lcs: Bool = True                   # the strict rule: longest common subsequence of words
  lcs_min_tokens: Int = 13           # ... covers at least this many words
  lcs_min_fraction: Float = 0.6      # ... and this fraction of the shorter sequence

  def __post_init__(self):
    _check("decontaminate", "benchmarks", len(self.benchmarks) > 0, "needs at least one file",
           self.benchmarks)
    _check("decontaminate", "ngram", self.ngram is None or self.ngram >= 1, "must be >= 1 or null",
           self.ngram)
    _check("decontaminate", "lcs_min_tokens", self.lcs_min_tokens >= 1, "must be >= 1",
           self.lcs_min_tokens)
    _fractions(self, ("lcs_min_fraction",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CleanRecipe:
  """A whole `data prepare --recipe`: input, stages (each optional), output."""
  input: InputConfig
  output: OutputConfig
  normalize: NormalizeConfig | None = None
  heuristics: HeuristicsConfig | None = None
  repetition: RepetitionConfig | None = None
  dedup: DedupConfig | None = None
  decontaminate: DecontaminateConfig | None = None

  @classmethod
  def load(cls, path: str, overrides: Iterable[str] = ()) -> "CleanRecipe":
    """The recipe of YAML file `path` with `a.b=value` overrides applied."""
    recipe = read_recipe(path, overrides)
    return cls.from_dict(recipe.data, recipe=recipe)

  @classmethod
  def from_dict(cls, data, *, recipe: Recipe | None = None) -> "CleanRecipe":
    """The recipe from a parsed mapping (`recipe`: where its values came from, for errors)."""
    return structure(cls, data, recipe=recipe)

  def stage_names(self) -> list[str]:
    """The stages that run, in order."""
    names = [name for name in ("normalize", "heuristics", "repetition") if getattr(self, name)]
    if self.dedup is not None:
      names += (["exact_dedup"] if self.dedup.exact else []) + (
          ["near_dedup"] if self.dedup.near else [])
    return names + (["decontaminate"] if self.decontaminate is not None else [])

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def normalize_text(text: str, config: NormalizeConfig | None) -> str:
  """`text` in Unicode normal form `config.form` (unchanged when normalisation is off)."""
  return text if config is None else unicodedata.normalize(config.form, text)


def expand(path: str) -> str:
  return os.path.expandvars(os.path.expanduser(path))
