"""`qwen2-jax eval needle` and `qwen2_jax.infer.needle`: prompt construction (exact lengths, the
needle at its depth, chat framing), scoring, the table, and end-to-end runs of a tiny random model
(HF dir and Orbax dir, with and without DCA). A random model scores ~0: only the mechanics are
checked; an oracle engine that reads the key from the prompt scores 1 everywhere."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest

from qwen2_jax.checkpoint.orbax_io import save_orbax
from qwen2_jax.cli import eval_cmd
from qwen2_jax.infer import needle as needle_lib
from qwen2_jax.infer.api import load_model
from qwen2_jax.tokenizer import load_tokenizer
from hf_reference import make_hf_qwen2


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir):
  return load_tokenizer(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_tokenizer_dir):
  """A tiny random Qwen2 (Qwen2's vocabulary size) with the test tokenizer beside it."""
  path = tmp_path_factory.mktemp("needle_model")
  make_hf_qwen2(path, seed=3, vocab_size=151936, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, intermediate_size=32, eos_token_id=151643)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(hf_tokenizer_dir / name, path / name)
  return path


@pytest.mark.parametrize("chat", [False, True])
def test_prompts_have_exact_lengths_and_the_needle_at_its_depth(tokenizer, chat):
  """Every prompt has exactly `length` tokens; the needle's ids sit at `needle_start`, which
  grows with depth (0: right after the instruction; 1: right before the question)."""
  task = needle_lib.NeedleTask(chat=chat)
  hay = needle_lib.Haystack(tokenizer, needle_lib.FILLER)
  cases = needle_lib.make_cases(tokenizer, hay, task, [300, 500], [0.0, 0.5, 1.0], 2, seed=1)
  assert len(cases) == 12 and len({c.key for c in cases}) > 1
  for c in cases:
    assert len(c.prompt_ids) == c.length and re.fullmatch(r"\d{5}", c.key)
    needle = tokenizer.encode(" " + task.needle.format(key=c.key), parse_special=False)
    assert list(c.prompt_ids[c.needle_start:c.needle_start + len(needle)]) == needle
    text = tokenizer.decode(c.prompt_ids)
    assert text.count(c.key) == 2 and text.rstrip().endswith(
        "<|im_start|>assistant" if chat else task.question)
    assert text.startswith("<|im_start|>system" if chat else task.instruction)
  starts = {(c.length, c.depth): c.needle_start for c in cases}
  for length in (300, 500):
    assert starts[length, 0.0] < starts[length, 0.5] < starts[length, 1.0]
    last = next(c for c in cases if c.length == length and c.depth == 1.0)
    assert text_after(tokenizer, last).startswith(
        (" " + task.needle.format(key=last.key)).strip())


def text_after(tokenizer, case):
  return tokenizer.decode(case.prompt_ids[case.needle_start:]).strip()


def test_needle_lands_on_a_sentence_boundary_of_a_file_haystack(tokenizer, tmp_path):
  """A text-file haystack is split at sentence ends; the needle never cuts a sentence."""
  text = " ".join(f"Sentence number {i} talks about topic {i * 7}." for i in range(40))
  hay = needle_lib.Haystack(tokenizer, text)
  task = needle_lib.NeedleTask()
  case = needle_lib.build_case(tokenizer, hay, task, 400, 0.37, "12345")
  before = tokenizer.decode(case.prompt_ids[:case.needle_start])
  assert before.rstrip().endswith(".") and len(case.prompt_ids) == 400
  with pytest.raises(ValueError, match="shorter"):
    needle_lib.build_case(tokenizer, hay, task, 20, 0.5, "12345")
  with pytest.raises(ValueError, match="depth"):
    needle_lib.build_case(tokenizer, hay, task, 400, 1.5, "12345")


def test_score_needs_the_whole_key():
  assert needle_lib.score(" 48213. Remember", "48213") == 1
  assert needle_lib.score("The key is 482130", "48213") == 0
  assert needle_lib.score("4821", "48213") == 0


def test_oracle_engine_scores_one_and_the_table_is_laid_out(tokenizer):
  """An engine that answers with the key it finds in the prompt scores 1.0 in every cell; the
  table has one row per depth and one column per length."""
  task = needle_lib.NeedleTask()
  hay = needle_lib.Haystack(tokenizer, needle_lib.FILLER)
  cases = needle_lib.make_cases(tokenizer, hay, task, [300, 420], [0.0, 0.3, 1.0], 2)

  class Oracle:
    def generate(self, prompts, sampling):
      del sampling
      keys = [re.search(r"pass key is (\d+)", tokenizer.decode(p)).group(1) for p in prompts]
      return [SimpleNamespace(output_ids=tokenizer.encode(f" {k}.")) for k in keys]

  report = needle_lib.run_needle(Oracle(), tokenizer, cases)
  table = report["table"]
  assert table["lengths"] == [300, 420] and table["depths"] == [0.0, 0.3, 1.0]
  assert table["scores"] == [[1.0, 1.0]] * 3 and table["overall"] == 1.0
  text = needle_lib.format_table(table)
  assert "420" in text and "0.30" in text and "overall exact retrieval: 1.000" in text


def test_cli_runs_a_tiny_model_end_to_end(model_dir, tmp_path, capsys):
  """`eval needle` on a tiny random HF model with DCA (several chunks): JSON table, one record
  per case; scores are valid fractions (a random model finds nothing, by design)."""
  out = tmp_path / "needle.jsonl"
  code = eval_cmd.main(["needle", str(model_dir), "--lengths", "300,420", "--depths", "0,0.5,1",
                        "--trials", "1", "--max-new-tokens", "6", "--dca-chunk-size", "128",
                        "--dca-local-size", "16", "--dca-original-length", "256", "--json",
                        "--output", str(out)])
  assert code == 0
  report = json.loads(capsys.readouterr().out)
  assert report["dual_chunk_attention"]["chunk_size"] == 128
  assert report["lengths"] == [300, 420] and len(report["scores"]) == 3
  assert all(0.0 <= s <= 1.0 for row in report["scores"] for s in row)
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(records) == 6 and {r["length"] for r in records} == {300, 420}
  assert all(set(r) >= {"key", "answer", "score", "depth"} for r in records)


def test_cli_reads_orbax_and_a_haystack_file_and_prints_the_table(model_dir, tmp_path, capsys):
  """An Orbax checkpoint with --tokenizer and --haystack FILE, text table; bad depths exit 2."""
  config, params = load_model(model_dir)
  save_orbax(tmp_path / "orbax", config, params)
  hay = tmp_path / "hay.txt"
  hay.write_text("Alpha beta gamma. Delta epsilon zeta! Eta theta iota? " * 5)
  code = eval_cmd.main(["needle", str(tmp_path / "orbax"), "--tokenizer", str(model_dir),
                        "--haystack", str(hay), "--lengths", "300", "--depths", "0.5",
                        "--max-new-tokens", "4"])
  text = capsys.readouterr().out
  assert code == 0 and "depth \\ length" in text and "overall exact retrieval" in text
  assert eval_cmd.main(["needle", str(model_dir), "--depths", "2"]) == 2


@pytest.mark.parametrize("flags,named", [
    (["--depths", "2"], "--depths"), (["--lengths", "0"], "--lengths"),
    (["--lengths", "20"], "--lengths"), (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--trials", "0"], "--trials"),
    (["--key-digits", "40"], "--key-digits"), (["--seed", "-1"], "--seed"),
])
def test_cli_bad_flags_are_one_line_naming_the_flag(model_dir, capsys, flags, named):
  """Bad flags exit 2 with one line naming the flag (a length too short for the prompt's frame
  included), before the model is loaded."""
  assert eval_cmd.main(["needle", str(model_dir), *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"qwen2-jax eval: error: {named}: ") and err.count("\n") == 1, err
