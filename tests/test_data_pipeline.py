"""The Beam data preparation (`qwen2-jax data prepare --recipe`): each rule on crafted
documents, MinHash near-duplicates, decontamination at the 13-gram / LCS boundaries, and on the
DirectRunner: exact kept set and counts, dead letters, byte-identical shards for 1 and several
workers and across runs, no partial shard after a crash, and shards the grain pipeline reads
exactly as it reads the text."""

from __future__ import annotations

import json
import os
import random
import unicodedata

import numpy as np
import pytest

from qwen2_jax.cli import main as cli_main
from qwen2_jax.tokenizer import load_tokenizer
from qwen2_jax.train import data as D
from qwen2_jax.train.pipeline import beam_prepare, dedup, outputs, rules
from qwen2_jax.train.pipeline.decontam import (BenchmarkIndex, lcs_length, lcs_length_reference,
                                               normalized_words)
from qwen2_jax.train.pipeline.recipe import (BenchmarkFile, CleanRecipe, DecontaminateConfig,
                                             HeuristicsConfig, RepetitionConfig)
from qwen2_jax.typed_config import ConfigError


def _vocab(seed: int, n: int) -> list[str]:
  """`n` distinct lower-case words of 4-8 letters."""
  rng = random.Random(seed)
  out: set[str] = set()
  while len(out) < n:
    out.add("".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou")
                    for _ in range(rng.randint(2, 4))))
  return sorted(out)


FILLER = _vocab(0, 400)
BENCH_WORDS = [w for w in _vocab(1, 200) if w not in set(FILLER)]


def _filler(seed: int, n: int) -> list[str]:
  rng = random.Random(seed)
  return [rng.choice(FILLER) for _ in range(n)]


def _text(words: list[str], per_line: int = 12) -> str:
  lines = [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]
  return "\n".join(line[0].upper() + line[1:] + "." for line in lines)


# ----------------------------------------------------------------------------- rules

NO_RULES = dict(min_words=None, max_words=None, min_mean_word_length=None,
                max_mean_word_length=None, max_symbol_word_ratio=None,
                max_ellipsis_line_fraction=None, max_bullet_line_fraction=None,
                min_alpha_word_fraction=None)


@pytest.mark.parametrize("rule,value,passing,failing", [
    ("min_words", 5, "one two three four five", "one two three four"),
    ("max_words", 3, "one two three", "one two three four"),
    ("min_chars", 5, "abcde", "abcd"),
    ("max_chars", 5, "abcde", "abcdef"),
    ("min_mean_word_length", 3.0, "abc de fghi", "ab cd efg"),          # 3.0 vs 2.33
    ("max_mean_word_length", 4.0, "abcd efgh", "abcde efgh"),           # 4.0 vs 4.5
    ("max_symbol_word_ratio", 0.25, "# a b c", "# a b ..."),            # 1/4 vs 2/4
    ("max_ellipsis_line_fraction", 0.5, "a...\nb\n", "a...\nb…\nc"),  # 1/2 vs 2/3
    ("max_bullet_line_fraction", 0.5, "• a\nb", "• a\n- b\nc"),        # 1/2 vs 2/3
    ("min_alpha_word_fraction", 0.5, "a 1 b 2", "a 1 2 b3 %"),          # 2/4 vs 2/5
])
def test_each_quality_rule_keeps_at_its_threshold_and_drops_past_it(rule, value, passing,
                                                                     failing):
  """Each Gopher quality rule alone: the document at the threshold passes, the one past fails."""
  config = HeuristicsConfig(**{**NO_RULES, rule: value})
  assert rules.heuristics_reason(passing, config) is None
  expected = {"max_symbol_word_ratio": "symbol_word_ratio",
              "max_ellipsis_line_fraction": "ellipsis_lines",
              "max_bullet_line_fraction": "bullet_lines",
              "min_alpha_word_fraction": "alpha_words"}.get(rule, rule)
  assert rules.heuristics_reason(failing, config) == expected


def test_script_check_counts_letters_of_allowed_scripts():
  """Latin and CJK letters count for [latin, cjk]; a mostly Cyrillic text is dropped."""
  config = HeuristicsConfig(**NO_RULES, allowed_scripts=("latin", "cjk"), min_script_fraction=0.5)
  assert rules.heuristics_reason("hello 你好世界 123", config) is None
  # 2 of 11 letters are Latin:
  assert rules.heuristics_reason("Привет мир hi", config) == "script"
  assert rules.heuristics_reason("1234 !!", config) == "script"         # no letters at all
  assert rules.words("ab 你好 c") == ["ab", "你", "好", "c"]


def test_chinese_prose_passes_the_default_rules_and_its_mean_word_length_ignores_cjk():
  """Default Gopher thresholds keep a 60-character Chinese text (CJK characters are words of
  their own; the mean word length counts only spaced words)."""
  chinese = "".join(chr(0x4E00 + (i * 37) % 3000) for i in range(60)) + "。"
  assert rules.heuristics_reason(chinese, HeuristicsConfig(allowed_scripts=("cjk",))) is None
  config = HeuristicsConfig(**{**NO_RULES, "min_mean_word_length": 3.0})
  assert rules.heuristics_reason("你好 ab", config) == "min_mean_word_length"  # "ab": 2
  assert rules.heuristics_reason("你好 abc", config) is None


def test_repetition_rules_on_crafted_texts():
  """Duplicate lines / paragraphs (count and characters), top n-gram and duplicate n-gram."""
  off = dict(max_duplicate_line_fraction=None, max_duplicate_paragraph_fraction=None,
             max_duplicate_line_char_fraction=None, max_duplicate_paragraph_char_fraction=None,
             max_top_ngram_char_fraction={}, max_duplicate_ngram_char_fraction={})
  lines = "aa\nbb\naa\ncc"                       # 1 duplicate of 4 lines, 2 of 11 chars
  assert rules.repetition_reason(lines, RepetitionConfig(**{
      **off, "max_duplicate_line_fraction": 0.25})) is None
  assert rules.repetition_reason(lines, RepetitionConfig(**{
      **off, "max_duplicate_line_fraction": 0.2})) == "duplicate_lines"
  assert rules.repetition_reason(lines, RepetitionConfig(**{
      **off, "max_duplicate_line_char_fraction": 0.18})) == "duplicate_line_chars"
  assert rules.repetition_reason(lines, RepetitionConfig(**{
      **off, "max_duplicate_line_char_fraction": 0.19})) is None
  paragraphs = "p one\n\np two\n\np one"
  assert rules.repetition_reason(paragraphs, RepetitionConfig(**{
      **off, "max_duplicate_paragraph_fraction": 0.3})) == "duplicate_paragraphs"
  ws = "ab cd ab cd ef".split()                  # top bigram "ab cd" twice: 8 of 10 chars
  assert rules.top_ngram_char_fraction(ws, 2) == pytest.approx(0.8)
  assert rules.top_ngram_char_fraction("ab cd ef".split(), 2) == 0.0
  ws = "a b c x a b c y".split()                 # trigram "a b c" twice covers 6 of 8 chars
  assert rules.duplicate_ngram_char_fraction(ws, 3) == pytest.approx(0.75)
  assert rules.repetition_reason(" ".join(ws), RepetitionConfig(**{
      **off, "max_duplicate_ngram_char_fraction": {3: 0.7}})) == "duplicate_3grams"
  assert rules.repetition_reason(" ".join(ws), RepetitionConfig(**{
      **off, "max_duplicate_ngram_char_fraction": {3: 0.75}})) is None


def test_minhash_near_duplicates_share_a_bucket_distinct_do_not():
  """A one-word edit of 100 words (5-gram Jaccard 0.90) is found; an unrelated text is not."""
  base = _filler(10, 100)
  edited = base[:50] + ["zzzz"] + base[51:]
  other = _filler(11, 100)
  hasher = dedup.MinHasher(num_perm=128, ngram=5, seed=1)
  a, b, c = (hasher.signature(" ".join(x)) for x in (base, edited, other))
  bands = dedup.lsh_bands(0.7, 128)
  assert set(dedup.band_keys(a, *bands)) & set(dedup.band_keys(b, *bands))
  assert not set(dedup.band_keys(a, *bands)) & set(dedup.band_keys(c, *bands))
  members = [((0, 0), a), ((0, 1), b), ((0, 2), c)]
  assert list(dedup.similar_pairs(members, 0.7)) == [((0, 0), (0, 1))]


def test_clusters_keep_the_smallest_key_of_each_component():
  """Union-find over pairs: a chain 1-2-3 and a pair 5-4 leave only 1 and 4."""
  k = lambda i: (0, i)
  drops = dedup.cluster_drops([(k(2), k(3)), (k(1), k(2)), (k(4), k(5))])
  assert drops == {k(2): k(1), k(3): k(1), k(5): k(4)}


def test_bit_parallel_lcs_equals_the_dynamic_programme():
  """`lcs_length` equals the textbook O(nm) LCS on random sequences, multi-word alphabets too."""
  rng = random.Random(0)
  for _ in range(300):
    a = [rng.randrange(4) for _ in range(rng.randrange(0, 70))]
    b = [rng.randrange(4) for _ in range(rng.randrange(0, 90))]
    assert lcs_length(a, b) == lcs_length_reference(a, b)


def _bench_file(tmp_path):
  """Items A (20 words), B (15), C (30), D (15), as JSONL under "question", plus noise."""
  w = BENCH_WORDS
  items = {"A": w[0:20], "B": w[20:35], "C": w[35:65], "D": w[65:80]}
  (tmp_path / "evals").mkdir(exist_ok=True)
  path = tmp_path / "evals" / "bench.jsonl"
  with open(path, "w") as f:
    for name, ws in items.items():
      f.write(json.dumps({"question": _text(ws).replace(" ", ", ", 2), "id": name}) + "\n")
  return path, items


def _interleave(item_words, seed):
  return [x for w, f in zip(item_words, _filler(seed, len(item_words))) for x in (w, f)]


def _decontam_docs(items):
  """name -> (words, expected rule or None)."""
  A, B, C, D_ = items["A"], items["B"], items["C"], items["D"]
  return {
      "ngram13": (_filler(20, 30) + A[3:16] + _filler(21, 30), "ngram"),       # 13 in a row
      "ngram12": (_filler(22, 30) + A[3:15] + _filler(23, 30), None),          # 12 in a row
      "lcs15": (_interleave(B, 24) + _filler(25, 30), "lcs"),                  # LCS 15 >= 13, 9
      "lcs17of30": (_interleave(C[:17], 26) + _filler(27, 30), None),          # 17 < 0.6 * 30
      "lcs18of30": (_interleave(C[:18], 28) + _filler(29, 30), "lcs"),         # 18 = 0.6 * 30
      "lcs12of15": (_interleave(D_[:12], 30) + _filler(31, 30), None),         # 12 < 13
  }


def test_decontamination_rules_at_their_boundaries(tmp_path):
  """13-gram: 13 shared words in a row drop, 12 keep; LCS: >= 13 words and >= 60% drop."""
  path, items = _bench_file(tmp_path)
  index = BenchmarkIndex(DecontaminateConfig(benchmarks=(BenchmarkFile(path=str(path),
                                                                       field="question"),)))
  names = {"A": 1, "B": 2, "C": 3, "D": 4}
  for name, (words, rule) in _decontam_docs(items).items():
    match = index.match(_text(words).upper())  # case and punctuation do not matter
    assert (match[0] if match else None) == rule, name
  assert index.match(_text(_decontam_docs(items)["lcs15"][0])) == ("lcs", f"{path}:{names['B']}")
  assert normalized_words("Hello, World! 你好。") == ["hello", "world", "你", "好"]


def test_readers_split_like_data_prepare_and_route_bad_records(tmp_path):
  """Text paragraphs / lines carry their first line number; bad bytes and null or non-string
  Parquet values become dead letters; the good documents match `data.TextDocuments`."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from qwen2_jax.train.pipeline import sources  # pylint: disable=import-outside-toplevel
  text = tmp_path / "t.txt"
  text.write_bytes(b"one\ntwo\n\n\n\nthree \xff\n\n  \n\nfour\n")
  got = list(sources.read_text(0, str(text), "paragraph"))
  assert [(type(r).__name__, r.source.split(":")[-1]) for r in got] == [
      ("Document", "1"), ("DeadLetter", "6"), ("Document", "10")]
  assert [r.text for r in got if isinstance(r, sources.Document)] == ["one\ntwo", "four\n"]
  good = tmp_path / "good.txt"
  good.write_text("a\n\nb c\n\n\n\nd\n")
  docs = [r.text for r in sources.read_text(0, str(good), "paragraph")]
  assert docs == list(D.TextDocuments([str(good)], "paragraph"))
  assert [r.source for r in sources.read_text(0, str(good), "line")] == [
      f"{good}:1", f"{good}:3", f"{good}:7"]
  table = pa.table({"body": ["x", None, "y"], "n": [1, 2, 3]})
  pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
  rows = list(sources.read_parquet(0, str(tmp_path / "p.parquet"), "body"))
  assert [(type(r).__name__, r.source.split(":")[-1]) for r in rows] == [
      ("Document", "1"), ("DeadLetter", "2"), ("Document", "3")]
  assert rows[1].reason == "missing_field"
  assert next(sources.read_parquet(0, str(tmp_path / "p.parquet"), "n")).reason == "not_a_string"


# ----------------------------------------------------------------------------- recipes

def test_recipe_errors_name_the_setting_and_line(tmp_path):
  """Unknown keys and bad values are one-line errors with the recipe's file:line."""
  path = tmp_path / "r.yaml"
  good = "input:\n  kind: jsonl\n  paths: [a]\noutput:\n  prefix: o\n  tokenizer: t\n"
  (tmp_path / "ok.yaml").write_text(good)
  path.write_text(good + "dedup:\n  treshold: 0.5\n")
  with pytest.raises(ConfigError, match=r"r\.yaml:8: dedup\.treshold: unknown setting; did you "
                                        r"mean threshold\?"):
    CleanRecipe.load(str(path))
  with pytest.raises(ConfigError, match=r"--set dedup.threshold=1.5: dedup\.threshold: must be "):
    CleanRecipe.load(str(path).replace("r.yaml", "ok.yaml"), ["dedup.threshold=1.5"])
  path.write_text("input:\n  kind: csv\n  paths: [a]\noutput:\n  prefix: o\n  tokenizer: t\n")
  with pytest.raises(ConfigError, match=r"r\.yaml:2: input\.kind: must be one of"):
    CleanRecipe.load(str(path))


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
  """`data prepare --recipe` with a bad key exits 2 with one line naming file:line."""
  path = tmp_path / "r.yaml"
  path.write_text("input:\n  kind: jsonl\n  paths: [a]\n  colour: red\n")
  assert cli_main(["data", "prepare", "--recipe", str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and f"{path}:4: input.colour: unknown setting" in err
  assert cli_main(["data", "prepare", "--tokenizer", "t", "--kind", "text", "--input", "x",
                   "--output-prefix", "o", "--direct_num_workers", "2"]) == 2
  assert "--direct_num_workers 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pipeline

_CYRILLIC = dict(zip("abcdefghiklmnoprstuvz", "абцдефгхиклмнопрстувз"))


def _corpus(tmp_path):
  """Two JSONL files; returns (recipe path, expected kept texts, expected drops by name)."""
  bench, items = _bench_file(tmp_path)
  dec = _decontam_docs(items)
  g = [_text(_filler(100 + i, 60)) for i in range(4)]
  g[2] += " Un café noir."
  near = g[1].split(" ")
  near[30] = "zzzz"
  a = [{"text": g[0]}, {"text": g[1]}, {"text": "Too short to keep."},
       {"text": "".join(_CYRILLIC.get(c, c) for c in g[3])},
       {"text": "\n".join(["The same line again and again here."] * 10)},
       "{not json", {"content": "no text field"}, {"text": g[2]}, "", {"text": 5}]
  b = [{"text": g[0]}, {"text": unicodedata.normalize("NFD", g[2])}, {"text": " ".join(near)},
       b'{"text": "caf\xe9 is latin-1"}',
       *({"text": _text(words)} for words, _ in dec.values()), {"text": g[3]}]
  for name, rows in (("a", a), ("b", b)):
    with open(tmp_path / f"{name}.jsonl", "wb") as f:
      for row in rows:
        line = row if isinstance(row, bytes) else (
            row.encode() if isinstance(row, str) else json.dumps(row).encode())
        f.write(line + b"\n")
  recipe = tmp_path / "clean.yaml"
  recipe.write_text(f"""\
input:
  kind: jsonl
  paths: ["{tmp_path}/*.jsonl"]
output:
  prefix: unset
  tokenizer: unset
  docs_per_shard: 3
normalize: {{form: NFC}}
heuristics:
  allowed_scripts: [latin, cjk]
repetition: {{}}
dedup:
  threshold: 0.7
decontaminate:
  benchmarks:
    - {{path: "{bench}", field: question}}
""")
  kept = [g[0], g[1], g[2], *(_text(w) for w, rule in dec.values() if rule is None), g[3]]
  return recipe, [unicodedata.normalize("NFC", t) for t in kept], bench


def _prepare(recipe, tokenizer, prefix, *beam_args) -> int:
  return cli_main(["data", "prepare", "--recipe", str(recipe), "--tokenizer", str(tokenizer),
                   "--output-prefix", str(prefix), *beam_args])


def _files(prefix) -> dict[str, bytes]:
  folder, stem = os.path.split(str(prefix))
  return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
          if name.startswith(stem)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_tokenizer_dir):
  """The crafted corpus prepared once on the DirectRunner's default (one worker)."""
  root = tmp_path_factory.mktemp("beam")
  recipe, kept, bench = _corpus(root)
  assert _prepare(recipe, hf_tokenizer_dir, root / "ref" / "c") == 0
  return root, recipe, kept, bench


def _records(path) -> list[np.ndarray]:
  import grain  # pylint: disable=import-outside-toplevel
  source = grain.sources.ArrayRecordDataSource([str(path)])
  return [np.frombuffer(source[i], np.int32) for i in range(len(source))]


def test_pipeline_keeps_exactly_the_clean_documents_in_corpus_order(reference, hf_tokenizer_dir):
  """Shards hold the 7 clean documents (tokens + EOS) in (file, line) order, 3 per shard."""
  root, _, kept, _ = reference
  tok = load_tokenizer(hf_tokenizer_dir)
  shards = sorted((root / "ref").glob("c-*.arrayrecord"))
  assert [s.name for s in shards] == [f"c-0000{i}-of-00003.arrayrecord" for i in range(3)]
  got = [r.tolist() for s in shards for r in _records(s)]
  assert got == [tok.encode(t, parse_special=False) + [tok.eos_id] for t in kept]
  manifest = json.loads((root / "ref" / "c.manifest.json").read_text())
  assert [s["documents"] for s in manifest["shards"]] == [3, 3, 1]
  assert manifest["tokens"] == sum(map(len, got))
  assert manifest["tokenizer_sha256"] == outputs.TokenizerRef(str(hf_tokenizer_dir)).sha256


def test_summary_counts_every_record_once_with_its_reason(reference):
  """records in = kept + dropped (per stage and reason) + bad; each count is the crafted one."""
  root = reference[0]
  s = json.loads((root / "ref" / "c.summary.json").read_text())
  dropped = {st["stage"]: {k: v["documents"] for k, v in st["dropped"].items()}
             for st in s["stages"]}
  assert dropped == {"normalize": {}, "heuristics": {"min_words": 1, "script": 1},
                     "repetition": {"duplicate_lines": 1}, "exact_dedup": {"duplicate": 2},
                     "near_dedup": {"duplicate": 1}, "decontaminate": {"ngram": 1, "lcs": 2}}
  assert s["bad_records"] == {"total": 4, "invalid_utf8": 1, "malformed_json": 1,
                              "missing_field": 1, "not_a_string": 1}
  assert s["output"]["documents"] == 7 and s["records_in"] == 20
  assert s["records_in"] == s["output"]["documents"] + sum(
      sum(d.values()) for d in dropped.values()) + s["bad_records"]["total"]
  for before, after in zip(s["stages"], s["stages"][1:]):
    assert after["documents_in"] == before["documents_kept"]
  assert s["stages"][-1]["documents_kept"] == 7


def test_bad_records_and_decontaminated_documents_are_written_for_audit(reference):
  """Dead letters name file:line and reason; removed documents name their benchmark item."""
  root, _, _, bench = reference
  dead = [json.loads(l) for l in (root / "ref" / "c.dead_letter.jsonl").read_text().splitlines()]
  assert [(d["source"].replace(str(root) + "/", ""), d["reason"]) for d in dead] == [
      ("a.jsonl:6", "malformed_json"), ("a.jsonl:7", "missing_field"),
      ("a.jsonl:10", "not_a_string"), ("b.jsonl:4", "invalid_utf8")]
  audit = [json.loads(l)
           for l in (root / "ref" / "c.decontaminated.jsonl").read_text().splitlines()]
  assert [(a["source"].replace(str(root) + "/", ""), a["rule"], a["benchmark_item"])
          for a in audit] == [("b.jsonl:5", "ngram", f"{bench}:1"),
                              ("b.jsonl:7", "lcs", f"{bench}:2"),
                              ("b.jsonl:9", "lcs", f"{bench}:3")]
  assert audit[0]["doc_id"] == "1:5"


def _same_outputs(a, b):
  fa, fb = _files(a), _files(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    if name.endswith("manifest.json"):
      ma, mb = json.loads(fa[name]), json.loads(fb[name])
      ma["recipe"]["output"]["prefix"] = mb["recipe"]["output"]["prefix"] = None
      assert ma == mb
    else:
      assert fa[name] == fb[name], name


def test_outputs_are_byte_identical_with_several_workers(reference, hf_tokenizer_dir):
  """Three worker threads give the same bytes as one: shards, summary and side outputs."""
  root, recipe = reference[:2]
  assert _prepare(recipe, hf_tokenizer_dir, root / "mt" / "c", "--direct_num_workers", "3",
                  "--direct_running_mode", "multi_threading") == 0
  _same_outputs(root / "ref" / "c", root / "mt" / "c")


@pytest.mark.slow
def test_outputs_are_byte_identical_with_worker_processes(reference, hf_tokenizer_dir):
  """Two worker processes (the multi-process DirectRunner) give the same bytes as one."""
  root, recipe = reference[:2]
  assert _prepare(recipe, hf_tokenizer_dir, root / "mp" / "c", "--direct_num_workers", "2",
                  "--direct_running_mode", "multi_processing") == 0
  _same_outputs(root / "ref" / "c", root / "mp" / "c")


@pytest.mark.slow
def test_a_crash_while_writing_leaves_no_partial_shard_and_a_rerun_completes(
    reference, hf_tokenizer_dir, monkeypatch):
  """A writer failing mid-shard: no manifest, no partial shard; the rerun (over a leftover
  temporary file, as kill -9 leaves) writes exactly the reference outputs, twice identically."""
  root, recipe = reference[:2]
  real = outputs._open_writer  # pylint: disable=protected-access

  class Failing:
    def __init__(self, path):
      self.inner, self.count = real(path), 0

    def write(self, data):
      self.count += 1
      if self.count == 2:
        raise OSError("disk on fire")
      self.inner.write(data)

  monkeypatch.setattr(outputs, "_open_writer", Failing)
  prefix = root / "crash" / "c"
  with pytest.raises(Exception, match="disk on fire"):
    beam_prepare.run(CleanRecipe.load(str(recipe), [f"output.prefix={prefix}",
                                                    f"output.tokenizer={hf_tokenizer_dir}"]))
  monkeypatch.setattr(outputs, "_open_writer", real)
  left = _files(prefix)
  assert not any(n.endswith((".json", ".jsonl", ".arrayrecord")) or ".tmp-" in n for n in left)
  (root / "crash" / "c-00001-of-00003.arrayrecord.tmp-killed").write_bytes(b"partial")
  (root / "crash" / "c-00000-of-00009.arrayrecord").write_bytes(b"an older run's shard")
  assert _prepare(recipe, hf_tokenizer_dir, prefix) == 0
  _same_outputs(root / "ref" / "c", prefix)
  first = _files(prefix)
  assert _prepare(recipe, hf_tokenizer_dir, prefix) == 0
  assert _files(prefix) == first


def test_stages_off_matches_single_process_prepare_and_the_text_source(tmp_path, sp_model_path):
  """With no stage on, the Beam shards equal today's `data prepare` byte for byte, and grain's
  packed batches from them equal those tokenised from the text files on the fly."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(5):
    (corpus / f"f{i}.txt").write_text(f"Document {i}.\n\nSecond paragraph of {i}, 你好.\n\n"
                                      + ("\n\n   \n\n" if i == 2 else "") + f"Third {i}.\n")
  common = ["--tokenizer", str(sp_model_path), "--kind", "text", "--input",
            str(corpus / "*.txt"), "--split", "paragraph", "--docs-per-shard", "4"]
  assert cli_main(["data", "prepare", *common, "--output-prefix", str(tmp_path / "old" / "c")]) == 0
  assert cli_main(["data", "prepare", *common, "--output-prefix", str(tmp_path / "new" / "c"),
                   "--runner", "DirectRunner"]) == 0
  old = sorted((tmp_path / "old").glob("*.arrayrecord"))
  new = sorted((tmp_path / "new").glob("*.arrayrecord"))
  assert [p.name for p in old] == [p.name for p in new] and len(new) == 4  # 15 docs, 4 a shard
  assert [p.read_bytes() for p in old] == [p.read_bytes() for p in new]
  tok = load_tokenizer(sp_model_path)
  text = D.SourceConfig(kind="text", paths=(str(corpus / "*.txt"),), split="paragraph")
  prepared = D.SourceConfig(kind="arrayrecord", paths=tuple(map(str, new)))
  make = lambda s: D.DataConfig(sources=(s,), seq_len=16, batch_size=2, num_epochs=1, seed=3)
  a, b = (list(D.build_dataset(make(s), tok)) for s in (text, prepared))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_the_example_recipe_loads_with_every_stage():
  """configs/data/clean.yaml is a valid recipe (strict) and turns every stage on."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  recipe = CleanRecipe.load(os.path.join(root, "configs", "data", "clean.yaml"))
  assert recipe.stage_names() == ["normalize", "heuristics", "repetition", "exact_dedup",
                                  "near_dedup", "decontaminate"]
  assert recipe.repetition.max_duplicate_ngram_char_fraction[10] == 0.10
  assert recipe.decontaminate.benchmarks[1].field is None


def test_a_bad_benchmark_file_is_a_one_line_error_naming_its_line(tmp_path):
  """A benchmark line without the text field, or a missing file, stops before any work."""
  from qwen2_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  bench = tmp_path / "b.jsonl"
  bench.write_text('{"question": "fine"}\n\n{"answer": "no question"}\n')
  config = lambda path: DecontaminateConfig(benchmarks=(BenchmarkFile(path=str(path),
                                                                      field="question"),))
  with pytest.raises(UserError, match=rf"^decontaminate.benchmarks: {bench}:3: not a JSON "
                                      r"object with a 'question' field$"):
    BenchmarkIndex(config(bench))
  with pytest.raises(UserError, match="no such file"):
    BenchmarkIndex(config(tmp_path / "missing.jsonl"))
