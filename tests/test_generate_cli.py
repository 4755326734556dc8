"""`qwen2-jax generate` / `bench generate` and the text API: prompt, chat (streamed, multi-turn),
JSONL batches with bad lines, Orbax checkpoints."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import numpy as np
import pytest

from qwen2_jax.cli import bench_cmd, generate_cmd
from qwen2_jax.infer import Generator, SamplingParams
from hf_reference import make_hf_qwen2


def _cli(argv) -> int:
  """Runs a `generate` / `bench` command line through its own parser (not yet in SUBCOMMANDS)."""
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers(dest="command", required=True)
  generate_cmd.register(sub)
  bench_cmd.register(sub)
  args = parser.parse_args(argv)
  return args.func(args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_tokenizer_dir):
  """A tiny random Qwen2 with Qwen2's vocabulary size and the test tokenizer in one directory."""
  path = tmp_path_factory.mktemp("gen_cli_model")
  make_hf_qwen2(path, seed=5, vocab_size=151936, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, intermediate_size=32, eos_token_id=151643)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(hf_tokenizer_dir / name, path / name)
  return path


@pytest.fixture(scope="module")
def gen(model_dir):
  return Generator.from_pretrained(model_dir, max_batch_size=4)


@pytest.fixture
def loaded(gen, monkeypatch):
  """Makes the CLI reuse the already compiled `gen` instead of loading MODEL again."""
  monkeypatch.setattr(Generator, "from_pretrained", classmethod(lambda cls, *a, **k: gen))


def test_prompt_mode_prints_the_completion(model_dir, gen, capsys):
  """--prompt prints the greedy completion text of the Python API."""
  assert _cli(["generate", str(model_dir), "--prompt", "The quick brown fox",
               "--max-new-tokens", "6"]) == 0
  expected, = gen.complete(["The quick brown fox"], SamplingParams(max_new_tokens=6))
  assert capsys.readouterr().out == expected.text + "\n"


def test_chat_streams_and_keeps_the_conversation(gen, loaded, model_dir, capsys, monkeypatch):
  """Chat streams the reply in token chunks; turn 2 is generated from the whole conversation."""
  sp = SamplingParams(max_new_tokens=9, ignore_eos=True)
  prompt = gen.encode_messages([{"role": "user", "content": "hi"}])
  chunks = list(gen.engine.stream(prompt, gen.chat_sampling(sp), interval=4))
  assert [len(c) for c in chunks][:3] == [1, 4, 4]
  reply = gen.chat([{"role": "user", "content": "hi"}], sp)
  assert reply == gen.text_of(gen.engine.generate([prompt], gen.chat_sampling(sp))[0])
  monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand then?\n\n"))
  assert _cli(["generate", str(model_dir), "--chat", "--max-new-tokens", "9",
               "--ignore-eos"]) == 0
  second = gen.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
                     {"role": "user", "content": "and then?"}], sp)
  assert capsys.readouterr().out == f"{reply}\n{second}\n"


def _write_jsonl(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


BAD_LINES = {  # line index: the parameter its error must name
    1: "prompt", 3: "temperature", 4: "prompt_ids", 5: "record", 6: "max_new_tokens",
    8: "top_p", 9: "messages"}


def test_jsonl_batch_skips_bad_lines_and_keeps_order(gen, loaded, model_dir, tmp_path, capsys):
  """Batch mode writes one line per input in order: outputs for good records, the error (naming
  the parameter) for bad ones; the good outputs equal the Python API's."""
  lines = [{"prompt": "Hello there", "id": "a"}, {"prompt": ""},
           {"prompt_ids": [5, 6, 7, 8], "max_new_tokens": 3, "temperature": 0.8, "seed": 4},
           {"prompt": "x", "temperature": -1}, {"prompt_ids": [1, 151936]}, "{not json",
           {"prompt_ids": [1] * 500, "max_new_tokens": 20},
           {"messages": [{"role": "user", "content": "What is 2+2?"}]},
           {"prompt": "y", "top_p": 0}, {"messages": [{"role": "robot", "content": "?"}]},
           {"prompt_ids": [9, 10], "stop_token_ids": [3]}]
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_jsonl(src, lines)
  assert _cli(["generate", str(model_dir), "--input", str(src), "--output", str(dst),
               "--max-new-tokens", "5", "--max-context", "512", "--batch-size", "4"]) == 0
  out = [json.loads(l) for l in dst.read_text().splitlines()]
  assert [o["index"] for o in out] == list(range(len(lines)))
  for i, o in enumerate(out):
    if i in BAD_LINES:
      assert o["param"] == BAD_LINES[i] and "error" in o and "output_ids" not in o, (i, o)
    else:
      assert o["finish_reason"] in ("stop", "length") and isinstance(o["text"], str)
  assert out[0]["id"] == "a" and len(out[2]["output_ids"]) == 3
  sp = SamplingParams(max_new_tokens=3, temperature=0.8, seed=4)
  assert out[2]["output_ids"] == gen.engine.generate([[5, 6, 7, 8]], sp)[0].output_ids
  chat_ids = gen.encode_messages(lines[7]["messages"])
  expected = gen.engine.generate([chat_ids], gen.chat_sampling(SamplingParams(max_new_tokens=5)))
  assert out[7]["output_ids"] == expected[0].output_ids
  err = capsys.readouterr().err
  assert "line 2: skipped" in err and "tokens_per_second" in err


def test_jsonl_batch_stop_mode_reports_first_bad_line(model_dir, tmp_path, capsys):
  """--on-error stop exits 2 naming the first bad line and parameter; no output is written."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_jsonl(src, [{"prompt": "ok"}, {"prompt": "bad", "top_k": -2}, {"prompt": ""}])
  assert _cli(["generate", str(model_dir), "--input", str(src), "--output", str(dst),
               "--on-error", "stop"]) == 2
  err = capsys.readouterr().err
  assert "request 1: top_k" in err and not dst.exists()


def test_bad_cli_settings_are_typed_errors(model_dir, capsys):
  """Invalid sampling flags exit 2 with the parameter named, before loading the model."""
  assert _cli(["generate", str(model_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
  assert "top_p" in capsys.readouterr().err


def test_orbax_checkpoint_generates_like_hf(gen, model_dir, tmp_path, capsys):
  """An Orbax directory (with --tokenizer) gives the same tokens as the HF directory."""
  import qwen2_jax as q
  config, params = q.load_hf_checkpoint(model_dir, show_progress=False)
  q.save_orbax(tmp_path / "orbax", config, params)
  assert _cli(["generate", str(tmp_path / "orbax"), "--tokenizer", str(model_dir),
               "--prompt-ids", "5", "6", "7", "--max-new-tokens", "4"]) == 0
  got = capsys.readouterr().out.strip()
  expected, = gen.complete([[5, 6, 7]], SamplingParams(max_new_tokens=4))
  assert got == expected.text


def test_bench_generate_runs_on_a_tiny_preset(tmp_path, capsys):
  """`bench generate` times both implementations and reports ratios, floor and compile time."""
  out = tmp_path / "bench.json"
  assert _cli(["bench", "generate", "--preset", "qwen2-tiny", "--prompt-len", "8",
               "--new-tokens", "4", "--batch-sizes", "2", "--repeats", "1", "--json",
               str(out)]) == 0
  table = capsys.readouterr().out
  assert "| 2 | qwen2-jax |" in table and "| 2 | transformers |" in table
  row = json.loads(out.read_text())["batches"]["2"]
  assert np.isfinite(row["ratio_decode"]) and row["decode_floor_step_ms"] > 0
  assert row["ours"]["compile_s"] and np.isfinite(row["ours"]["fraction_of_floor"])
