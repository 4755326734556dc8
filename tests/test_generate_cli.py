"""`qwen2-jax generate` / `bench generate` and the text API: prompt, chat (streamed, multi-turn),
JSONL batches with bad lines, output files that survive a stop, Orbax checkpoints. The same
command lines run as a user runs them (new processes, signals) in test_generate_cli_process."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat

import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax import cli
from qwen2_jax.infer import Generator, SamplingParams, validation
from qwen2_jax.infer.api import SAMPLING_KEYS, GenerationInterrupted
from hf_reference import make_hf_qwen2


def _cli(argv) -> int:
  """Runs a `qwen2-jax` command line in this process (errors reported as the CLI does)."""
  return cli.main(argv)


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


def test_matmul_precision_flag_reaches_the_engine(model_dir, capsys, monkeypatch):
  """--matmul-precision is passed to the Engine (default None: the precision in force), and
  "high" generates (here the same 4 greedy tokens)."""
  seen = []
  original = Generator.from_pretrained.__func__
  def spy(cls, *args, **kwargs):
    seen.append(kwargs.get("matmul_precision"))
    return original(cls, *args, **kwargs)
  monkeypatch.setattr(Generator, "from_pretrained", classmethod(spy))
  outs = []
  for flags in ([], ["--matmul-precision", "high"]):
    assert _cli(["generate", str(model_dir), "--prompt-ids", "1", "2", "3",
                 "--max-new-tokens", "4", *flags]) == 0
    outs.append(capsys.readouterr().out)
  assert seen == [None, "high"] and outs[0] == outs[1]


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
  assert f"skipped {src}:2: prompt: " in err and "tokens_per_second" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_jsonl_batch_stop_mode_reports_first_bad_line(model_dir, tmp_path, capsys):
  """--on-error stop exits 2 naming the first bad line (file:line) and field; nothing is
  written."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_jsonl(src, [{"prompt": "ok"}, {"prompt": "bad", "top_k": -2}, {"prompt": ""}])
  assert _cli(["generate", str(model_dir), "--input", str(src), "--output", str(dst),
               "--on-error", "stop"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"qwen2-jax generate: error: {src}:2: top_k: ") and err.count("\n") == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_bad_cli_settings_are_typed_errors(model_dir, capsys):
  """Invalid sampling flags exit 2 with the flag named, before loading the model."""
  assert _cli(["generate", str(model_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
  assert capsys.readouterr().err.startswith("qwen2-jax generate: error: --top-p: ")


ODD_VALUES = [None, True, False, -1, 0, 3, 2**70, 1.5, float("nan"), "x", "", [], [1], [[1]],
              ["a"], [True], {}, {"role": "user"}]


def test_every_bad_field_of_a_record_is_reported_for_that_record(gen, tmp_path):
  """Any field of a JSONL record set to any JSON type is accepted or reported as an error of that
  record naming file:line and the field; no other exception escapes."""
  fields = SAMPLING_KEYS + ("prompt", "prompt_ids", "messages", "id", "metadata")
  records = [({field: v} if field in ("prompt", "prompt_ids", "messages")
              else {"prompt": "hi", field: v}) for field in fields for v in ODD_VALUES]
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in records))
  parsed = gen.read_jsonl(src, SamplingParams(max_new_tokens=4), log=io.StringIO())
  assert [p[0] for p in parsed] == list(range(len(records)))
  errors = 0
  for (index, record, error, _), given in zip(parsed, records):
    field = next(k for k in given if k != "prompt") if len(given) > 1 else next(iter(given))
    if record is None:
      errors += 1
      assert isinstance(error, validation.GenerationInputError)
      allowed = {field, "prompt"} if field in ("prompt_ids", "messages") else {field}
      assert error.param in allowed and str(error).startswith(f"{src}:{index + 1}: "), error
    else:
      assert field not in ("prompt", "prompt_ids") or isinstance(given[field], (str, list))
  assert errors > len(records) // 2


def test_vocab_mask_follows_the_tokenizer(gen):
  """With a tokenizer smaller than the embedding, the engine masks the ids it lacks; a Generator
  built with mask_vocab=False leaves them."""
  assert gen.tokenizer.vocab_size == 151646 < gen.engine.config.vocab_size
  assert gen.engine.vocab_limit == gen.tokenizer.vocab_size
  unmasked = Generator(gen.engine, gen.tokenizer, mask_vocab=False)
  try:
    assert unmasked.engine.vocab_limit == gen.tokenizer.vocab_size  # the engine's, unchanged
    gen.engine.vocab_limit = None
    Generator(gen.engine, gen.tokenizer, mask_vocab=False)
    assert gen.engine.vocab_limit is None
  finally:
    gen.engine.vocab_limit = gen.tokenizer.vocab_size


def test_decode_in_checked_slices_equals_one_call(gen):
  """With a stop check, decoding runs in slices of check_interval steps and gives the same tokens
  and logprobs as one call; a stop request raises GenerationInterrupted, after which the
  Generator works as before."""
  prompts = [[5, 6, 7], [9] * 20, [11, 12]]
  sps = [SamplingParams(max_new_tokens=n, temperature=t, seed=1, ignore_eos=True)
         for n, t in ((11, 0.0), (7, 1.0), (3, 0.0))]
  expected = gen.engine.generate(prompts, sps)
  checks = []
  gen.stop_requested, gen.check_interval = lambda: checks.append(1) and False, 3
  try:
    got = gen.generate(prompts, sps)
    assert len(checks) >= 4  # ten decode steps in slices of three
    gen.stop_requested = lambda: True
    with pytest.raises(GenerationInterrupted):
      gen.generate(prompts, sps)
  finally:
    gen.stop_requested, gen.check_interval = None, Generator.check_interval
  assert [(r.output_ids, r.finish_reason) for r in got] == \
      [(r.output_ids, r.finish_reason) for r in expected]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                             np.concatenate([r.logprobs for r in expected]), atol=1e-5)
  assert gen.generate(prompts, sps)[0].output_ids == expected[0].output_ids


def test_a_stopped_batch_keeps_its_finished_records(gen, tmp_path):
  """A stop request after the first batch: GenerationInterrupted says how many of how many
  records were kept in OUT.partial, which holds them (plus the bad record's line); OUT, a file
  from before, is untouched; no temporary file remains; files follow the umask."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  records = [{"prompt_ids": [3 + i, 4], "max_new_tokens": 5} for i in range(9)]
  records[2] = {"prompt": ""}
  src.write_text("".join(json.dumps(r) + "\n" for r in records))
  dst.write_text("an earlier result\n")
  flushed = lambda: sum(f.stat().st_size for f in tmp_path.glob("out.jsonl.*.tmp"))
  gen.stop_requested = lambda: flushed() > 0
  old_umask = os.umask(0o027)
  try:
    with pytest.raises(GenerationInterrupted) as info:
      gen.run_jsonl(src, dst, progress=False, log=io.StringIO())
  finally:
    os.umask(old_umask)
    gen.stop_requested = None
  partial = tmp_path / "out.jsonl.partial"
  kept = [json.loads(l) for l in partial.read_text().splitlines()]
  assert len(kept) == 1 + gen.engine.max_batch_size  # the bad line, then the first batch
  assert str(info.value) == (
      f"interrupted: {len(kept)} of 9 records finished, kept in {partial} (in the order they "
      f"finished; each line has its input \"index\"); {dst} was not written")
  assert kept[0] == {"index": 2, "error": f"{src}:3: prompt: is empty; at least one token is "
                     "needed", "param": "prompt"}
  assert all(len(k["output_ids"]) == 5 for k in kept[1:])
  assert dst.read_text() == "an earlier result\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl",
                                                        "out.jsonl.partial"]
  assert stat.S_IMODE(partial.stat().st_mode) == 0o640


def test_output_paths_are_checked(tmp_path):
  """The output may not be the input under any spelling (relative, symlink, hard link), a
  directory, or in a missing directory; the input must exist. Errors name the parameter."""
  src = tmp_path / "in.jsonl"
  src.write_text("{}\n")
  (tmp_path / "link.jsonl").symlink_to(src)
  os.link(src, tmp_path / "hard.jsonl")
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    for out in ("in.jsonl", "./x/../in.jsonl", "link.jsonl", "hard.jsonl", str(src)):
      with pytest.raises(validation.InvalidPathError, match="is the input file") as info:
        validation.check_jsonl_paths(src, out)
      assert info.value.param == "output_path"
    with pytest.raises(validation.InvalidPathError, match="is a directory"):
      validation.check_jsonl_paths(src, tmp_path)
    with pytest.raises(validation.InvalidPathError, match="does not exist"):
      validation.check_jsonl_paths(src, tmp_path / "nope" / "out.jsonl")
    with pytest.raises(validation.InvalidPathError, match="missing.jsonl does not exist") as info:
      validation.check_jsonl_paths("missing.jsonl", "out.jsonl")
    assert info.value.param == "input_path"
    validation.check_jsonl_paths(src, "out.jsonl")
  finally:
    os.chdir(cwd)


def test_orbax_checkpoint_generates_like_hf(gen, model_dir, tmp_path, capsys):
  """An Orbax directory (with --tokenizer) gives the same tokens as the HF directory."""
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
