"""Rewards: math answers on crafted responses, the code sandbox (passing, failing, looping,
forking, writing outside, using the network: penalties within the limit, nothing left behind),
user functions by import path, weighted sums, the reward model's batched scores, and failures
that score the penalty and are counted instead of raising."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import jax
import numpy as np
import pytest

from qwen2_jax import get_preset, reward_model
from qwen2_jax.errors import UserError
from qwen2_jax.tokenizer import DEFAULT_SYSTEM, load_tokenizer
from qwen2_jax.train import chat_data, rewards, rm
from run_helpers import write_jsonl

# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("response, gold, expected", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),                                      # wrong
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2", 1.0),     # the last box counts
    ("first \\boxed{1}, then corrected: \\boxed{2}", "1", 0.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),                           # nested braces, fractions
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("$\\boxed{-\\frac{1}{2}}$", "-0.5", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{2/4}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{x^{2}+1}", "x^{2} + 1", 1.0),                         # symbolic: normalised text
    ("\\boxed{x^{2}+1}", "x^{3}+1", 0.0),
    ("\\boxed{\\text{(B)}}", "(B)", 1.0),
    ("\\boxed {7}", "7", 1.0),
    ("I think it is 12, or maybe 13.", "13", 1.0),                   # fallback: last number
    ("I think it is 12, or maybe 13.", "12", 0.0),
    ("\\boxed{12", "12", 1.0),                                       # unclosed box: fallback
    ("no idea", "42", 0.0),                                          # missing answer
])
def test_math_reward_on_crafted_answers(response, gold, expected):
  """Exact scores of boxed, nested, fractional, symbolic, fallback and missing answers."""
  reward = rewards.MathReward()
  assert reward([""], [response], [{"answer": gold}]).tolist() == [expected]
  assert reward.counts["scored"] == 1 and reward.counts["errors"] == 0


def test_math_boxed_extraction_fallback_and_tolerance():
  """Nested braces are balanced; fallback "none" scores an unboxed answer 0; numeric tolerance
  is relative (x max(1, |gold|)) and 0 means exact."""
  assert rewards.last_boxed("a \\boxed{\\frac{a}{b^{2}}} b") == "\\frac{a}{b^{2}}"
  assert rewards.last_boxed("\\boxed{1} \\fbox{2}") == "2"
  assert rewards.last_boxed("\\boxed{unclosed") is None
  strict = rewards.MathReward(fallback="none")
  assert strict(["", ""], ["it is 13", "\\boxed{13}"], [{"answer": 13}] * 2).tolist() == [0, 1]
  loose = rewards.MathReward(tolerance=1e-4)
  exact = rewards.MathReward(tolerance=0.0)
  data = [{"answer": "3.1416"}]
  assert loose([""], ["\\boxed{3.14159}"], data)[0] == 1.0
  assert exact([""], ["\\boxed{3.14159}"], data)[0] == 0.0
  assert exact([""], ["\\boxed{0.5}"], [{"answer": "\\frac{1}{2}"}])[0] == 1.0
  assert loose([""], ["\\boxed{1001}"], [{"answer": 1000}])[0] == 0.0  # 1e-3 relative: too far
  with pytest.raises(UserError, match="fallback"):
    rewards.MathReward(fallback="first_number")


def test_missing_answer_metadata_scores_the_penalty_and_is_counted():
  """An example without metadata["answer"] scores the penalty; the others are scored."""
  reward = rewards.MathReward(penalty=-1.0)
  out = reward(["", ""], ["\\boxed{1}", "\\boxed{1}"], [{"answer": 1}, {}])
  assert out.tolist() == [1.0, -1.0]
  assert reward.counts == {"scored": 1, "errors": 1, "timeouts": 0, "violations": 0,
                           "nonfinite": 0}
  assert "answer" in reward.last_error


# ----------------------------------------------------------------------------- code

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
TIMEOUT = 3.0


def _session_processes(sid: int) -> list[int]:
  """Pids of live processes in session `sid` (field 6 of /proc/PID/stat)."""
  out = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[3]) == sid and fields[0] != "Z":
      out.append(int(pid))
  return out


@pytest.fixture
def code_reward(tmp_path):
  root = tmp_path / "sandboxes"
  root.mkdir()
  reward = rewards.CodeReward(timeout_s=TIMEOUT, penalty=-1.0, work_root=str(root), workers=4)
  yield reward
  assert os.listdir(root) == []  # every run's temporary directory was deleted


def test_code_reward_correct_passes_wrong_fails(code_reward):
  """A correct solution (in a fenced block, after prose) scores 1, a wrong one 0, an early
  sys.exit(0) before the tests 0 (not a pass)."""
  good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n"
  wrong = "```python\ndef add(a, b):\n    return a - b\n```"
  exits = "```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```"
  out = code_reward(["", "", ""], [good, wrong, exits], [{"tests": TESTS}] * 3)
  assert out.tolist() == [1.0, 0.0, 0.0]
  assert code_reward.counts["scored"] == 3


def test_code_reward_penalises_loops_forks_stray_writes_and_network(code_reward, tmp_path):
  """An endless loop, a fork bomb, a write outside the sandbox and a network connection each
  score the penalty, all four within the time limit (+2 s) run in parallel; no file appears
  outside, no connection reaches a listening socket, no process of theirs survives."""
  outside = tmp_path / "outside.txt"
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.setblocking(False)
  port = server.getsockname()[1]
  responses = [
      "while True:\n    pass\n",
      "import os\nwhile True:\n    os.fork()\n",
      f"open({str(outside)!r}, 'w').write('escaped')\ndef add(a, b):\n    return a + b\n",
      f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'x')\n"
      "def add(a, b):\n    return a + b\n",
  ]
  start = time.monotonic()
  out = code_reward([""] * 4, responses, [{"tests": TESTS}] * 4)
  elapsed = time.monotonic() - start
  assert out.tolist() == [-1.0] * 4
  assert elapsed < TIMEOUT + 2.0, elapsed
  assert code_reward.counts["timeouts"] == 1 and code_reward.counts["violations"] == 3
  statuses = [r["status"] for r in code_reward.last_runs]
  assert sorted(statuses) == ["timeout", "violation", "violation", "violation"]
  assert not outside.exists()
  with pytest.raises(BlockingIOError):
    server.accept()
  server.close()
  for run in code_reward.last_runs:
    assert _session_processes(run["pid"]) == []


@pytest.mark.skipif(not rewards.network_namespace_available(), reason="no `unshare -n` here")
def test_sandbox_network_namespace_has_only_loopback(tmp_path):
  """Under `unshare -n` the program sees no network interface but lo (reading is allowed)."""
  result = rewards.run_sandboxed("print(open('/proc/net/dev').read())", work_root=str(tmp_path))
  assert result["status"] == "passed", result
  names = [line.split(":")[0].strip() for line in result["stdout"].splitlines()[2:] if line]
  assert names == ["lo"], result["stdout"]


def test_sandbox_limits_memory_and_file_size(tmp_path):
  """RLIMIT_AS stops a 4 GiB allocation (MemoryError: failed), RLIMIT_FSIZE a 2 MiB file in
  the sandbox's own directory (failed), while writing inside it is allowed."""
  kwargs = dict(memory_mb=512, max_file_mb=1, work_root=str(tmp_path))
  assert rewards.run_sandboxed("x = bytearray(4 << 30)", **kwargs)["status"] == "failed"
  big = rewards.run_sandboxed("open('f', 'wb').write(b'x' * (2 << 20))", **kwargs)
  assert big["status"] == "failed" and big["returncode"] != 0
  small = rewards.run_sandboxed("open('f', 'wb').write(b'x' * 1000)\nimport os\n"
                                "assert os.path.getsize('f') == 1000", **kwargs)
  assert small["status"] == "passed", small
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- user code, sums

USER_MODULE = """
import time

def length_reward(prompt, response, metadata):
    return len(response) / metadata.get("scale", 1)

def broken(prompt, response, metadata):
    raise RuntimeError("boom")

def slow(prompt, response, metadata):
    time.sleep(5)
    return 1.0

def not_a_number(prompt, response, metadata):
    return float("nan")
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "my_rewards_mod"
  sys.modules.pop("my_rewards_mod", None)


def test_function_reward_by_import_path(user_module):
  """'module:function' is imported and called per example; a raising, a NaN and a too-slow
  function score the penalty and are counted as an error, nonfinite and a timeout."""
  reward = rewards.FunctionReward(f"{user_module}:length_reward")
  assert reward(["p", "p"], ["abcd", "ab"], [{"scale": 2}, {}]).tolist() == [2.0, 2.0]
  broken = rewards.FunctionReward(f"{user_module}:broken", penalty=-2.0)
  assert broken(["p"], ["r"]).tolist() == [-2.0] and broken.counts["errors"] == 1
  assert "boom" in broken.last_error
  nan = rewards.FunctionReward(f"{user_module}:not_a_number", penalty=-3.0)
  assert nan(["p"], ["r"]).tolist() == [-3.0] and nan.counts["nonfinite"] == 1
  slow = rewards.FunctionReward(f"{user_module}:slow", timeout_s=0.2, penalty=-4.0)
  start = time.monotonic()
  assert slow(["p"], ["r"]).tolist() == [-4.0] and slow.counts["timeouts"] == 1
  assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("path, fragment", [
    ("no_colon_here", "expected 'package.module:function'"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("json:no_such_function", "has no no_such_function"),
    ("json:__doc__", "is not callable"),
])
def test_bad_function_paths_are_one_line_errors(path, fragment):
  with pytest.raises(UserError, match=fragment):
    rewards.FunctionReward(path)


def test_weighted_sum_applies_each_terms_penalty_and_counts_per_source(user_module):
  """1.0 x math + 0.5 x length - with a broken term of weight 2 and penalty -1 - sums per
  example; each source keeps its own counters."""
  math_reward = rewards.MathReward()
  length = rewards.FunctionReward(f"{user_module}:length_reward", name="length")
  broken = rewards.FunctionReward(f"{user_module}:broken", name="broken", penalty=-1.0)
  total = rewards.WeightedSum([(math_reward, 1.0), (length, 0.5), (broken, 2.0)])
  out = total(["", ""], ["\\boxed{3}", "\\boxed{4}"], [{"answer": 3}, {"answer": 3}])
  np.testing.assert_array_equal(out, [1.0 + 0.5 * 9 - 2.0, 0.0 + 0.5 * 9 - 2.0])
  np.testing.assert_array_equal(total.last_terms["math"], [1.0, 0.0])
  counts = total.all_counts()
  assert counts["broken"]["errors"] == 2 and counts["math"]["scored"] == 2
  assert counts["length"]["scored"] == 2
  with pytest.raises(UserError, match="distinct names"):
    rewards.WeightedSum([(math_reward, 1.0), (rewards.MathReward(), 1.0)])


def test_a_reward_that_fails_wholesale_never_raises():
  """A batch reward whose `score` raises (or returns the wrong count) scores every example the
  penalty and counts each; mismatched batch lengths are a caller error."""
  class Exploding(rewards.Reward):
    def score(self, prompts, responses, metadata):
      raise RuntimeError("device on fire")

  class Short(rewards.Reward):
    def score(self, prompts, responses, metadata):
      return [1.0]

  for cls in (Exploding, Short):
    reward = cls("x", penalty=-5.0)
    assert reward(["a", "b", "c"], ["a", "b", "c"]).tolist() == [-5.0] * 3
    assert reward.counts["errors"] == 3
  with pytest.raises(ValueError, match="2 prompts, 1 responses"):
    rewards.MathReward()(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- reward model

@pytest.mark.slow
def test_reward_model_reward_matches_training_rows_and_is_padding_invariant(sp_model_path,
                                                                            tmp_path):
  """The reward model reward encodes an example exactly as the RM training rows
  (`RewardPairs`); batched scores (mixed lengths, right-padded) equal each example alone
  within 1e-5 and `reward_model.rewards` on the training row; too long scores the penalty."""
  tok = load_tokenizer(sp_model_path)
  config = get_preset("qwen2-tiny")
  params = reward_model.init_params(config, jax.random.key(0), score_std=1.0)
  record = {"prompt": "say: red cat", "chosen": "red fish cat", "rejected": "red no cat"}
  data = write_jsonl(tmp_path / "p.jsonl", [record])
  ds = rm.RewardPairs(chat_data.ChatDataConfig(paths=(data,), seq_len=96, batch_size=1), tok)
  batch = ds.batch(0, 0)
  n = int(batch["segment_ids"][0].sum())
  reward = rewards.RewardModelReward(config, params, tok, max_length=256, batch_size=4,
                                     default_system=DEFAULT_SYSTEM,
                                     penalty=-9.0)
  assert reward.encode(record["prompt"], record["chosen"], {}) == \
      batch["input_ids"][0, :n].tolist()
  expected = reward_model.rewards(config, params, batch["input_ids"][:1],
                                  lengths=np.array([n]))
  prompts = [record["prompt"], "say: a much longer prompt with many more words in it", "x"]
  responses = [record["chosen"], "blue", "tree " * 200]
  together = reward(prompts, responses, [{}] * 3)
  np.testing.assert_allclose(together[0], expected[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(together[1], reward(prompts[1:2], responses[1:2])[0],
                             rtol=1e-5, atol=1e-5)
  assert together[2] == -9.0 and "max_length" in reward.last_error
  assert reward.counts["errors"] == 1 and reward.counts["scored"] == 3, reward.counts
  assert abs(together[0]) > 1e-3 and together[0] != together[1]
  json.dumps(reward.counts)  # plain ints: loggable
