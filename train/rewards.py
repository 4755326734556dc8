"""Rewards for online post-training: (prompts, responses, metadata) of a batch -> float scores.

A `Reward` is called on a batch, `reward(prompts, responses, metadata) -> [B] float64`, where
metadata[i] is a dict of what the data hold for example i (the math answer, the code's tests).
It never raises for a bad example: an example whose scoring raises, times out, breaks the code
sandbox or gives a non-finite value scores the reward's `penalty` instead, and is counted in
`reward.counts` (scored, errors, timeouts, violations, nonfinite; `last_error` keeps the latest
message). Implementations:

  RewardModelReward  a trained reward model (`qwen2_jax.reward_model`), batched over token ids
  MathReward         1 if the final answer equals metadata["answer"], else 0
  CodeReward         1 if the response's code passes metadata["tests"] in a sandboxed process
  FunctionReward     a user function "pkg.module:function" (prompt, response, metadata) -> float
  WeightedSum        sum of weight x reward over other rewards (each with its own penalty)

The code sandbox (`run_sandboxed`) is described in its docstring: what it enforces and what it
does not.
"""

from __future__ import annotations

import concurrent.futures
import fractions
import importlib
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qwen2_jax.errors import UserError

COUNTERS = ("scored", "errors", "timeouts", "violations", "nonfinite")


class RewardTimeout(TimeoutError):
  """Scoring one example took longer than its time limit."""


class SandboxViolation(RuntimeError):
  """Sandboxed code attempted something the sandbox refuses (its stderr says what)."""


class Reward:
  """A batch reward with a penalty for examples it cannot score (see the module docstring).

  Subclasses implement `score`, returning per example a float or the exception that example
  raised.
  """

  def __init__(self, name: str, *, penalty: float = 0.0):
    if not math.isfinite(penalty):
      raise UserError(f"{name}: penalty must be finite, got {penalty}")
    self.name, self.penalty = name, float(penalty)
    self.counts = dict.fromkeys(COUNTERS, 0)
    self.last_error: str | None = None

  def score(self, prompts: Sequence[str], responses: Sequence[str],
            metadata: Sequence[Mapping[str, Any]]) -> list[float | BaseException]:
    raise NotImplementedError

  def __call__(self, prompts: Sequence[str], responses: Sequence[str],
               metadata: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
    """[B] float64 scores; failures score `penalty` and are counted."""
    metadata = [{}] * len(prompts) if metadata is None else list(metadata)
    if not len(prompts) == len(responses) == len(metadata):
      raise ValueError(f"{self.name}: {len(prompts)} prompts, {len(responses)} responses and "
                       f"{len(metadata)} metadata")
    try:
      values = list(self.score(list(prompts), list(responses), metadata))
      if len(values) != len(prompts):
        raise ValueError(f"returned {len(values)} scores for {len(prompts)} examples")
    except Exception as e:  # pylint: disable=broad-except
      values = [e] * len(prompts)
    out = np.empty(len(values), np.float64)
    for i, v in enumerate(values):
      out[i] = self._value(v)
    return out

  def _value(self, v: Any) -> float:
    if isinstance(v, BaseException):
      kind = ("timeouts" if isinstance(v, TimeoutError) else
              "violations" if isinstance(v, SandboxViolation) else "errors")
      self.counts[kind] += 1
      self.last_error = f"{type(v).__name__}: {v}"
      return self.penalty
    try:
      v = float(v)
    except (TypeError, ValueError) as e:
      return self._value(e)
    if not math.isfinite(v):
      self.counts["nonfinite"] += 1
      return self.penalty
    self.counts["scored"] += 1
    return v


class ItemReward(Reward):
  """A reward scored one example at a time by `score_one` (errors caught per example)."""

  def score_one(self, prompt: str, response: str, metadata: Mapping[str, Any]) -> float:
    raise NotImplementedError

  def score(self, prompts, responses, metadata):
    out = []
    for p, r, m in zip(prompts, responses, metadata):
      try:
        out.append(self.score_one(p, r, m))
      except Exception as e:  # pylint: disable=broad-except
        out.append(e)
    return out


# ----------------------------------------------------------------------------- reward model

class RewardModelReward(Reward):
  """The reward model's score of prompt + response in ChatML, batched.

  Each example is encoded as chat data is for reward-model training (`train.rm.RewardPairs`):
  metadata["messages"] (the prompt turns) or a user turn holding the prompt, then the response
  as the assistant turn, cut after the response's `<|im_end|>`, where the reward is read. Rows
  are right-padded to a multiple of `pad_to` tokens (one compilation per padded length). An
  example longer than `max_length` tokens is not truncated: it scores the penalty (an error).
  """

  def __init__(self, config, params, tokenizer, *, max_length: int, batch_size: int = 32,
               pad_to: int = 64, default_system: str | None = None, penalty: float = 0.0,
               name: str = "reward_model"):
    import jax  # pylint: disable=import-outside-toplevel
    from qwen2_jax import reward_model  # pylint: disable=import-outside-toplevel
    super().__init__(name, penalty=penalty)
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.max_length, self.batch_size, self.pad_to = max_length, batch_size, pad_to
    self.default_system = default_system
    self._rewards = jax.jit(lambda p, ids, n: reward_model.rewards(config, p, ids, lengths=n))

  def encode(self, prompt: str, response: str, metadata: Mapping[str, Any]) -> list[int]:
    """Token ids of one example, through the response's `<|im_end|>`."""
    from qwen2_jax.tokenizer import IM_END, encode_chat_with_mask  # pylint: disable=C0415
    turns = list(metadata.get("messages") or [{"role": "user", "content": prompt}])
    ids, _ = encode_chat_with_mask(self.tokenizer,
                                   turns + [{"role": "assistant", "content": response}],
                                   default_system=self.default_system)
    end = len(ids) - ids[::-1].index(self.tokenizer.token_to_id(IM_END))
    if end > self.max_length:
      raise ValueError(f"{end} tokens, over max_length={self.max_length}")
    return ids[:end]

  def score(self, prompts, responses, metadata):
    out: list[Any] = [None] * len(prompts)
    encoded = []
    for i, example in enumerate(zip(prompts, responses, metadata)):
      try:
        encoded.append((i, self.encode(*example)))
      except Exception as e:  # pylint: disable=broad-except
        out[i] = e
    for start in range(0, len(encoded), self.batch_size):
      chunk = encoded[start:start + self.batch_size]
      longest = max(len(ids) for _, ids in chunk)
      T = min(-(-longest // self.pad_to) * self.pad_to, max(self.max_length, longest))
      rows = np.zeros((self.batch_size, T), np.int32)  # [B, T], fixed B: one compile per T
      lengths = np.zeros((self.batch_size,), np.int32)
      for r, (_, ids) in enumerate(chunk):
        rows[r, :len(ids)], lengths[r] = ids, len(ids)
      values = np.asarray(self._rewards(self.params, rows, lengths))
      for r, (i, _) in enumerate(chunk):
        out[i] = float(values[r])
    return out


# ----------------------------------------------------------------------------- math

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_THOUSANDS = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?"
_NUMBER = re.compile(rf"-?(?:{_THOUSANDS}|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)")


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces
  balanced; None when there is none (or it is never closed)."""
  starts = sorted((m.start(), len(c)) for c in _BOX_COMMANDS
                  for m in re.finditer(re.escape(c), text))
  for start, size in reversed(starts):
    i = start + size
    while i < len(text) and text[i] == " ":
      i += 1
    if i >= len(text) or text[i] != "{":
      continue
    depth = 0
    for j in range(i, len(text)):
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      if depth == 0:
        return text[i + 1:j]
  return None


def last_number(text: str) -> str | None:
  """The last number in `text` (integers, decimals, 1,000-style, a/b), or None."""
  found = _NUMBER.findall(text)
  return found[-1] if found else None


def normalize_answer(answer: str) -> str:
  """The comparable form of an answer: no spaces, `$`, `\\left`/`\\right`, thin spaces,
  `\\text{}`/`\\mathrm{}` wrappers, degree marks or trailing period; `\\dfrac`/`\\tfrac` ->
  `\\frac`."""
  s = str(answer).strip()
  s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", s)
  for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""),
                   ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\!", ""),
                   ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("$", "")):
    s = s.replace(old, new)
  s = re.sub(r"\s+", "", s)
  return s.rstrip(".")


def parse_number(answer: str) -> fractions.Fraction | None:
  """An exact rational value of a normalised answer: integers, decimals, 1,000-style,
  scientific notation, a/b, \\frac{a}{b} and \\frac12 (a sign in front allowed); else None."""
  s = normalize_answer(answer)
  sign = 1
  if s.startswith("-"):
    sign, s = -1, s[1:]
  m = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}|\\frac(\d)(\d)", s)
  if m:
    a, b = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
    num, den = parse_number(a), parse_number(b)
    return None if num is None or den is None or den == 0 else sign * num / den
  if re.fullmatch(_THOUSANDS, s):
    s = s.replace(",", "")
  m = re.fullmatch(r"(\d+)/(\d+)", s)
  if m:
    return None if int(m.group(2)) == 0 else sign * fractions.Fraction(int(m.group(1)),
                                                                       int(m.group(2)))
  if re.fullmatch(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
    return sign * fractions.Fraction(s)
  return None


def answers_match(predicted: str, gold: str, *, tolerance: float = 1e-6) -> bool:
  """Equal as numbers (|p - g| <= tolerance * max(1, |g|); exact when tolerance is 0) when both
  parse (`parse_number`), else equal after `normalize_answer`."""
  p, g = parse_number(predicted), parse_number(gold)
  if p is not None and g is not None:
    return abs(p - g) <= fractions.Fraction(tolerance) * max(1, abs(g))
  return normalize_answer(predicted) == normalize_answer(gold)


class MathReward(ItemReward):
  """1.0 when the response's final answer matches metadata["answer"], else 0.0.

  The final answer is the last `\\boxed{...}`; without one, `fallback`: "last_number" (the last
  number in the response) or "none" (no answer: 0.0). Matching: `answers_match`. An example
  without metadata["answer"] is an error (the penalty).
  """
  FALLBACKS = ("last_number", "none")

  def __init__(self, *, fallback: str = "last_number", tolerance: float = 1e-6,
               penalty: float = 0.0, name: str = "math"):
    super().__init__(name, penalty=penalty)
    if fallback not in self.FALLBACKS:
      raise UserError(f"{name}: fallback {fallback!r} is not one of {self.FALLBACKS}")
    if not tolerance >= 0:
      raise UserError(f"{name}: tolerance must be >= 0, got {tolerance}")
    self.fallback, self.tolerance = fallback, tolerance

  def extract(self, response: str) -> str | None:
    boxed = last_boxed(response)
    if boxed is not None or self.fallback == "none":
      return boxed
    return last_number(response)

  def score_one(self, prompt, response, metadata):
    if "answer" not in metadata:
      raise KeyError("metadata has no 'answer'")
    answer = self.extract(response)
    if answer is None:
      return 0.0
    return float(answers_match(answer, str(metadata["answer"]), tolerance=self.tolerance))


# ----------------------------------------------------------------------------- code

VIOLATION_EXIT = 86  # the sandbox driver's exit status after refusing an operation

# Runs as `python -I -c _DRIVER PROGRAM RESULT_FD BOX LIMITS...`: sets the limits, installs the
# audit hook, runs PROGRAM, and writes "passed" to RESULT_FD only if it ran to its end.
_DRIVER = r'''
import os, resource, sys
program, result_fd, box = sys.argv[1], int(sys.argv[2]), os.path.realpath(sys.argv[3])
memory, nproc, fsize, cpu = (int(x) for x in sys.argv[4:8])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
REFUSED = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
           "os.startfile", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
           "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
           "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
           "resource.setrlimit", "resource.prlimit", "os.chroot", "os.setuid"}
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2,
             "os.symlink": 2, "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1,
             "shutil.rmtree": 1, "os.setxattr": 1, "os.removexattr": 1, "os.chflags": 1}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path):
    if isinstance(path, int) or path is None:
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real == box or real.startswith(box + os.sep)
def refuse(event, detail):
    os.write(2, ("\nsandbox: refused %s %r\n" % (event, detail)).encode())
    os._exit(%(violation)d)
def hook(event, args):
    if event in REFUSED:
        refuse(event, args[:1])
    elif event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE
        if writing and not inside(path):
            refuse(event, path)
    elif event in PATH_ARGS:
        for path in args[:PATH_ARGS[event]]:
            if not inside(path):
                refuse(event, path)
with open(program, encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
sys.addaudithook(hook)
status = 1
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    status = 0
except SystemExit as e:
    sys.stderr.write("sandbox: the program exited (%r) before its tests finished\n" % (e.code,))
except BaseException:
    import traceback
    traceback.print_exc()
for stream in (sys.stdout, sys.stderr):
    try:
        stream.flush()
    except BaseException:
        pass
if status == 0:
    os.write(result_fd, b"passed")
os._exit(status)
'''.replace("%(violation)d", str(VIOLATION_EXIT))

_UNSHARE: list[bool] = []  # whether `unshare -n` works here (checked once)


def network_namespace_available() -> bool:
  """Whether `unshare -n` can start a process in a new network namespace (no interfaces but a
  down loopback) on this machine."""
  if not _UNSHARE:
    path = shutil.which("unshare")
    ok = False
    if path:
      try:
        ok = subprocess.run([path, "-n", "true"], capture_output=True, timeout=10).returncode == 0
      except (OSError, subprocess.SubprocessError):
        ok = False
    _UNSHARE.append(ok)
  return _UNSHARE[0]


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(path: str, limit: int = 4000) -> str:
  with open(path, "rb") as f:
    f.seek(max(os.path.getsize(path) - limit, 0))
    return f.read().decode("utf-8", "replace")


def run_sandboxed(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                  max_processes: int = 1, max_file_mb: int = 16,
                  work_root: str | None = None) -> dict[str, Any]:
  """Runs Python `source` in a separate, limited process; returns {"status": "passed" |
  "failed" | "timeout" | "violation", "returncode", "seconds", "stdout", "stderr" (tails),
  "pid"}. "passed" means the program ran to its end (no exception, no exit).

  Enforced by the OS (they bind whatever the program does in Python or C):
    - wall-clock `timeout_s`: the process runs in its own session and process group, which is
      killed (SIGKILL) at the limit and, always, when the run ends, so nothing it started
      survives it; RLIMIT_CPU = timeout_s + 1 CPU seconds as well;
    - memory: RLIMIT_AS = memory_mb; files: RLIMIT_FSIZE = max_file_mb per file written (its
      stdout and stderr included); no core dumps;
    - processes: RLIMIT_NPROC = max_processes (counted per user, so only for an unprivileged
      user; root is exempt);
    - network: when `unshare -n` works (`network_namespace_available`), the process runs in a
      new network namespace with no usable interface;
    - files: the working directory is a new temporary directory (HOME and TMPDIR too), deleted
      with everything in it when the run ends; `python -I` ignores PYTHON* variables and the
      user's site-packages.
  Enforced by a Python audit hook installed before the program runs (exit status
  `VIOLATION_EXIT`, status "violation"): creating processes (fork, exec, spawn, system,
  subprocess), signalling other processes, creating or using sockets and resolving names,
  loading C code through ctypes, changing resource limits, and writing, creating, renaming,
  linking or deleting files outside the working directory (symlinks resolved).
  Not enforced: reading files the user can read; CPU or memory of C extensions beyond the
  limits above; a program deliberately defeating the audit hook from Python (walking into the
  driver's frames, writing to the result pipe itself). The sandbox contains mistakes and
  ordinary bad programs (loops, fork bombs, stray writes, network use); it is not a security
  boundary against hostile code, for which run the trainer as an unprivileged user in a
  container.
  """
  root = tempfile.mkdtemp(prefix="qwen2jax-code-", dir=work_root)
  read_fd, write_fd = os.pipe()
  proc = None
  try:
    box = os.path.join(root, "box")
    os.mkdir(box)
    program = os.path.join(root, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    limits = [memory_mb << 20, max_processes, max_file_mb << 20, int(math.ceil(timeout_s)) + 1]
    command = [sys.executable, "-I", "-B", "-c", _DRIVER, program, str(write_fd), box,
               *map(str, limits)]
    if network_namespace_available():
      command = [shutil.which("unshare"), "-n", *command]
    env = {"PATH": os.defpath, "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8"}
    stdout, stderr = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    start = time.monotonic()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
      proc = subprocess.Popen(command, cwd=box, env=env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=err, pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    write_fd = -1
    try:
      proc.wait(timeout=timeout_s)
      timed_out = False
    except subprocess.TimeoutExpired:
      timed_out = True
    _kill_group(proc.pid)
    proc.wait()
    seconds = time.monotonic() - start
    ready, _, _ = select.select([read_fd], [], [], 0)
    passed = bool(ready) and os.read(read_fd, 16) == b"passed"
    status = ("timeout" if timed_out else "violation" if proc.returncode == VIOLATION_EXIT
              else "passed" if passed and proc.returncode == 0 else "failed")
    return {"status": status, "returncode": proc.returncode, "seconds": seconds,
            "stdout": _tail(stdout), "stderr": _tail(stderr), "pid": proc.pid}
  finally:
    if proc is not None and proc.returncode is None:
      _kill_group(proc.pid)
      proc.wait()
    for fd in (read_fd, write_fd):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(root, ignore_errors=True)


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
  """The last fenced code block of the response (```python ... ``` or ``` ... ```); the whole
  response when it has none."""
  blocks = _FENCE.findall(response)
  return blocks[-1] if blocks else response


class CodeReward(Reward):
  """1.0 when the response's code (`extract_code`) followed by metadata["tests"] (Python,
  e.g. asserts) runs to its end in the sandbox (`run_sandboxed`), 0.0 when it fails (an
  exception, a failed assert, an exit); a timeout or a sandbox violation scores the penalty
  and is counted. Examples run in parallel, `workers` at a time.
  """

  def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_processes: int = 1,
               max_file_mb: int = 16, workers: int = 4, work_root: str | None = None,
               penalty: float = 0.0, name: str = "code"):
    super().__init__(name, penalty=penalty)
    for field, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb),
                         ("max_processes", max_processes), ("max_file_mb", max_file_mb),
                         ("workers", workers)):
      if not value > 0:
        raise UserError(f"{name}: {field} must be > 0, got {value}")
    self.limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                       max_file_mb=max_file_mb, work_root=work_root)
    self.workers = workers
    self.last_runs: list[dict[str, Any]] = []  # the latest batch's `run_sandboxed` results

  def _one(self, response: str, metadata: Mapping[str, Any]) -> float:
    if "tests" not in metadata:
      raise KeyError("metadata has no 'tests'")
    result = run_sandboxed(extract_code(response) + "\n\n" + str(metadata["tests"]) + "\n",
                           **self.limits)
    self.last_runs.append(result)
    if result["status"] == "timeout":
      raise RewardTimeout(f"over {self.limits['timeout_s']} s")
    if result["status"] == "violation":
      raise SandboxViolation(result["stderr"].strip().splitlines()[-1])
    return 1.0 if result["status"] == "passed" else 0.0

  def score(self, prompts, responses, metadata):
    self.last_runs = []
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      futures = [pool.submit(self._one, r, m) for r, m in zip(responses, metadata)]
    out = []
    for f in futures:
      try:
        out.append(f.result())
      except Exception as e:  # pylint: disable=broad-except
        out.append(e)
    return out


# ----------------------------------------------------------------------------- user code, sums

def import_function(path: str) -> Callable[..., Any]:
  """The callable named by "package.module:function" (a dotted attribute path after the
  colon is followed)."""
  module_name, sep, attr = path.partition(":")
  if not sep or not module_name or not attr:
    raise UserError(f"reward function {path!r}: expected 'package.module:function'")
  try:
    target: Any = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"reward function {path!r}: cannot import {module_name}: {e}") from None
  for part in attr.split("."):
    if not hasattr(target, part):
      raise UserError(f"reward function {path!r}: {module_name} has no {attr}")
    target = getattr(target, part)
  if not callable(target):
    raise UserError(f"reward function {path!r}: {attr} is not callable")
  return target


class FunctionReward(ItemReward):
  """A user function `fn(prompt, response, metadata) -> float` named by import path, called
  per example. With `timeout_s`, a call still running after it scores the penalty (counted as
  a timeout); Python cannot stop a thread, so that call runs on in the background."""

  def __init__(self, path: str, *, timeout_s: float | None = None, penalty: float = 0.0,
               name: str | None = None):
    super().__init__(name or path, penalty=penalty)
    self.fn = import_function(path)
    self.timeout_s = timeout_s
    self._pool = (None if timeout_s is None else
                  concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix=self.name))

  def score_one(self, prompt, response, metadata):
    if self._pool is None:
      return self.fn(prompt, response, metadata)
    future = self._pool.submit(self.fn, prompt, response, metadata)
    try:
      return future.result(timeout=self.timeout_s)
    except concurrent.futures.TimeoutError:
      raise RewardTimeout(f"over {self.timeout_s} s") from None


class WeightedSum(Reward):
  """sum_k weight_k x reward_k(batch): each term applies its own penalty and counts its own
  failures (`counts` here counts only the sum's own); `last_terms` holds the latest batch's
  per-term scores by name."""

  def __init__(self, terms: Sequence[tuple[Reward, float]], *, name: str = "sum"):
    super().__init__(name)
    names = [r.name for r, _ in terms]
    if not terms or len(set(names)) != len(names):
      raise UserError(f"{name}: needs one or more terms with distinct names, got {names}")
    for reward, weight in terms:
      if not math.isfinite(weight):
        raise UserError(f"{name}: the weight of {reward.name} must be finite, got {weight}")
    self.terms = list(terms)
    self.last_terms: dict[str, np.ndarray] = {}

  def score(self, prompts, responses, metadata):
    self.last_terms = {r.name: r(prompts, responses, metadata) for r, _ in self.terms}
    total = sum(w * self.last_terms[r.name] for r, w in self.terms)
    return list(total)

  def all_counts(self) -> dict[str, dict[str, int]]:
    """Per-source counters: each term's `counts` by name."""
    return {r.name: dict(r.counts) for r, _ in self.terms}
