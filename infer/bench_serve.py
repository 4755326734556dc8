"""`qwen2-jax bench serve`: offline generation throughput of qwen2-jax's continuous-batching
engine vs vLLM's CPU backend vs qwen2-jax's static-batching engine, in one run on one machine.

Workload: a seeded batch of requests (`make_workload`): random token ids within the vocab,
prompt lengths log-uniform in [min_prompt, max_prompt], output lengths a lognormal clipped to
[min_output, max_output] (median the geometric mean of the bounds: mostly short, a long tail),
greedy, EOS ignored, so every request generates exactly its max_tokens. The whole batch is
submitted at once.

Model: a preset's shapes (default Qwen2-0.5B) with random weights, written once as an HF
directory (config.json + safetensors) that every stack loads.

Stacks, each in its own process:
  jax-new     `qwen2_jax.infer.Engine`: continuous batching over a paged KV cache
  jax-static  `StaticEngine`: batches of max_num_seqs requests (sorted by prompt length), each a
              prefill + a decode loop until its longest request ends
  vllm        vLLM's CPU backend (`scripts/vllm_serve_bench.py`, run by the python of its own
              virtualenv, made by `scripts/setup_vllm_cpu.sh`); skipped with a note if missing

Per stack: `warmup` untimed runs of the whole batch (they compile), then `repeats` timed runs.
The order (`--order`): "interleaved" (the default) starts the stacks one at a time, each
through its start-up and warm-up while the others wait, then runs the timed batches in rounds,
one stack at a time, the order within a round reversed every other round (A B, B A, A B, ...),
with a 2 s pause before each run, so that a machine that slows down or speeds up during the
benchmark weighs on every stack alike; a waiting worker blocks on its stdin (its weights and KV
cache stay in memory), and the CPU seconds the waiting stacks' processes used during each run
are recorded. Each round gives a paired ratio (jax-new's tok/s over the other's in the same
round). "sequential" runs each stack's warm-up and timed runs to the end before the next stack
starts (one stack in memory at a time).
Output tokens/s = output tokens of the batch / wall time of the batch. TTFT = time from the
start of the batch to a request's first generated token: the new engine and vLLM are watched
after every engine step; the static engine's rows get their first token at the end of their
batch's prefill. Reported: medians over the timed runs; startup (checkpoint load + engine
build; for vLLM also its own compilation and KV-cache setup) and compile seconds separately.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qwen2_jax.errors import UserError

STACKS = ("jax-new", "vllm", "jax-static")
ORDERS = ("interleaved", "sequential")
# Seconds between two interleaved timed runs: the threads of the stack that just ran go idle
# (OpenMP workers spin for a while after a parallel region) before the next one starts.
_PAUSE_S = 2.0
REPO = Path(__file__).resolve().parents[1]
VLLM_SCRIPT = REPO / "scripts" / "vllm_serve_bench.py"
VLLM_SETUP = REPO / "scripts" / "setup_vllm_cpu.sh"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
  parser.add_argument("--preset", default="qwen2-0.5b", help="model shape (random weights)")
  parser.add_argument("--dtype", default="float32", help="param and compute dtype")
  parser.add_argument("--model-dir", help="an existing HF directory to load instead "
                      "(default: random weights written once under --workdir)")
  parser.add_argument("--workdir", default="runs/bench_serve",
                      help="where the checkpoint, workload and per-stack results go")
  parser.add_argument("--num-requests", type=int, default=48)
  parser.add_argument("--seed", type=int, default=0, help="workload and weights seed")
  parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
  parser.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per stack")
  parser.add_argument("--warmup", type=int, default=1, help="untimed runs per stack (compile)")
  parser.add_argument("--admission", default="longest_first", choices=("longest_first", "fifo"),
                      help="order in which the continuous batchers take the batch's requests: "
                      "most max_tokens first (the Engine's default), or as generated; vLLM gets "
                      "its requests added in the same order (its scheduler admits them in order)")
  parser.add_argument("--matmul-precision", choices=("highest", "high"), default=None,
                      help="jax-new: Engine(matmul_precision=...); 'high' runs the packed CPU "
                      "matmuls in bf16x3 on AMX where the CPU has it (default: fp32)")
  parser.add_argument("--max-num-seqs", type=int, default=16,
                      help="sequences at once (static engine: rows per batch)")
  parser.add_argument("--max-num-batched-tokens", type=int, default=512,
                      help="tokens per engine step (new engine and vLLM)")
  parser.add_argument("--kv-cache-gib", type=float, default=0.5,
                      help="KV-cache memory of the new engine and vLLM (0.5 GiB holds 21k "
                      "tokens of Qwen2-0.5B in fp32)")
  parser.add_argument("--vllm-python", default=os.environ.get("QWEN2_JAX_VLLM_PYTHON",
                                                              str(DEFAULT_VLLM_PYTHON)),
                      help="python of the vLLM virtualenv")
  parser.add_argument("--vllm-cpus", choices=("all", "auto"), default="all",
                      help="all: vLLM's compute threads on every CPU, as JAX's are (sets "
                      "VLLM_CPU_OMP_THREADS_BIND unless set); auto: vLLM's default binding, "
                      "which on x86 keeps one CPU for its scheduler process")
  parser.add_argument("--order", choices=ORDERS, default="interleaved",
                      help="interleaved: timed runs in rounds, one stack at a time, the order "
                      "reversed every other round (the other stacks wait, loaded); sequential: "
                      "each stack's runs to the end before the next stack starts")
  parser.add_argument("--timeout", type=float, default=3600,
                      help="seconds per stack (sequential), or for a stack's start-up and "
                      "warm-up and for each timed run (interleaved)")
  parser.add_argument("--json", metavar="PATH", help="results JSON (default WORKDIR/results.json)")


# --------------------------------------------------------------------------- workload


class WorkloadError(UserError, ValueError):
  """Workload bounds that describe no requests (printed as one line by the CLI)."""


def make_workload(num_requests: int, vocab_size: int, seed: int = 0,
                  prompt_len: tuple[int, int] = (16, 256),
                  output_len: tuple[int, int] = (16, 256)) -> dict:
  """A deterministic offline batch: {"requests": [{"prompt_token_ids", "max_tokens"}], ...}.

  Prompt lengths are log-uniform in [min, max]; output lengths a lognormal (sigma 0.8, median
  sqrt(min * max)) clipped to [min, max]; token ids uniform in [0, vocab_size).
  """
  (p_lo, p_hi), (o_lo, o_hi) = prompt_len, output_len
  if not (1 <= p_lo <= p_hi and 1 <= o_lo <= o_hi and num_requests >= 1):
    raise WorkloadError(f"bad workload bounds: prompt {prompt_len}, output {output_len}, "
                     f"{num_requests} requests")
  rng = np.random.default_rng(seed)
  p_len = np.exp(rng.uniform(np.log(p_lo), np.log(p_hi + 1), num_requests)).astype(int)
  p_len = np.clip(p_len, p_lo, p_hi)
  o_len = np.exp(rng.normal(np.log(np.sqrt(o_lo * o_hi)), 0.8, num_requests)).round()
  o_len = np.clip(o_len, o_lo, o_hi).astype(int)
  requests = [{"prompt_token_ids": rng.integers(0, vocab_size, int(p)).tolist(),
               "max_tokens": int(o)} for p, o in zip(p_len, o_len)]
  return {"seed": seed, "vocab_size": vocab_size, "prompt_len": list(prompt_len),
          "output_len": list(output_len), "requests": requests}


def max_model_len(workload: dict) -> int:
  """Longest prompt + output of the workload, rounded up to a multiple of 64."""
  n = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in workload["requests"])
  return -(-n // 64) * 64


# --------------------------------------------------------------------------- summaries

def _quantile(xs, q):
  return float(np.quantile(np.asarray(xs, float), q)) if xs else None


def summarize_runs(runs: list[dict]) -> dict:
  """Medians over timed runs ({"wall_s", "output_tokens", "ttft_s": [per request] | None})."""
  tok_s = [r["output_tokens"] / r["wall_s"] for r in runs]
  ttfts = [r["ttft_s"] for r in runs if r.get("ttft_s") and None not in r["ttft_s"]]
  return {"output_tok_s": statistics.median(tok_s), "output_tok_s_runs": tok_s,
          "wall_s": statistics.median(r["wall_s"] for r in runs),
          "output_tokens": runs[0]["output_tokens"],
          "ttft_median_s": statistics.median(_quantile(t, 0.5) for t in ttfts) if ttfts else None,
          "ttft_p90_s": statistics.median(_quantile(t, 0.9) for t in ttfts) if ttfts else None}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
  """Greedy agreement of two stacks' outputs: share of requests with the same first token and
  with the same whole output."""
  pairs = list(zip(a, b))
  return {"first_token": sum(x[:1] == y[:1] for x, y in pairs) / len(pairs),
          "whole_output": sum(x == y for x, y in pairs) / len(pairs)}


def _fmt(x, spec=".1f", scale=1.0):
  return "n/a" if x is None else format(x * scale, spec)


def format_report(result: dict) -> str:
  """A Markdown table of `result` (the JSON this benchmark writes)."""
  m, w = result["machine"], result["workload"]
  lines = [f"# serve benchmark: {result['preset']} {result['dtype']}, {w['num_requests']} requests"
           f" (prompt {w['prompt_tokens']} tokens, output {w['output_tokens']} tokens), "
           f"max_num_seqs {result['max_num_seqs']}, max_num_batched_tokens "
           f"{result['max_num_batched_tokens']}, admission {result.get('admission', 'fifo')}, "
           f"jax-new matmul_precision {result.get('matmul_precision') or 'default (fp32)'}, "
           f"median of {result['repeats']} runs"
           + (", interleaved rounds" if result.get("order") == "interleaved" else ""),
           f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), load average "
           f"{m['load_average_start']} -> {m['load_average_end']}", "",
           "| stack | output tok/s | TTFT median ms | TTFT p90 ms | wall s | startup s | "
           "compile s | jax-new / this |", "|---|---|---|---|---|---|---|---|"]
  stacks = result["stacks"]
  base = stacks.get("jax-new", {}).get("summary", {}).get("output_tok_s")
  for name, r in stacks.items():
    if "summary" not in r:
      why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '?')}"
      lines.append(f"| {name} | {why} | | | | | | |")
      continue
    s = r["summary"]
    ratio = ("1.00x" if name == "jax-new" else "n/a" if not base
             else f"{base / s['output_tok_s']:.2f}x")
    lines.append(f"| {name} | {s['output_tok_s']:.1f} | {_fmt(s['ttft_median_s'], '.0f', 1e3)}"
                 f" | {_fmt(s['ttft_p90_s'], '.0f', 1e3)} | {s['wall_s']:.2f} | "
                 f"{_fmt(r.get('startup_s'))} | {_fmt(r.get('compile_s'))} | {ratio} |")
  if result.get("ratios"):
    lines += ["", "ratios (output tok/s): " + ", ".join(f"{k} {v:.2f}x"
                                                       for k, v in result["ratios"].items())]
  if result.get("paired_ratios"):
    lines.append("paired ratios (the runs of each round): " + ", ".join(
        f"{k} {v['median']:.2f}x median ({', '.join(f'{x:.2f}x' for x in v['rounds'])})"
        for k, v in result["paired_ratios"].items()))
  if result.get("schedule"):
    waiting = [c for e in result["schedule"] for c in e["waiting_stacks_cpu_s"].values()]
    if waiting:
      lines.append(f"waiting stacks' CPU use during another stack's run: at most "
                   f"{max(waiting):.2f} CPU-s")
  if result.get("agreement"):
    lines.append("greedy agreement with jax-new: " + ", ".join(
        f"{k}: first token {v['first_token']:.0%}, whole output {v['whole_output']:.0%}"
        for k, v in result["agreement"].items()))
  steps = stacks.get("jax-new", {}).get("step_time_per_run")
  if steps:
    lines.append("jax-new steps per timed run, by padded token count: " + ", ".join(
        f"{key}: {v['steps']:.0f} steps, {v['seconds']:.2f} s"
        + (f" ({v['seconds'] / v['steps'] * 1e3:.0f} ms each)" if v["steps"] else "")
        for key, v in steps.items()))
  for name, r in stacks.items():
    if r.get("note"):
      lines.append(f"{name}: {r['note']}")
  return "\n".join(lines)


# --------------------------------------------------------------------------- the driver

def _machine() -> dict:
  model = "?"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
  except OSError:
    pass
  return {"cpu_count": len(os.sched_getaffinity(0)), "cpu_model": model,
          "load_average_start": [round(x, 2) for x in os.getloadavg()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "jax_platforms": os.environ.get("JAX_PLATFORMS", "")}


def _child(cmd: list[str], out: Path, timeout: float, say, env: dict | None = None) -> dict:
  """Runs a worker process; its JSON result, or {"error": ...}."""
  say("$ " + " ".join(cmd))
  out.unlink(missing_ok=True)
  try:
    proc = subprocess.run(cmd, timeout=timeout, check=False, env=env)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  if proc.returncode != 0 or not out.exists():
    return {"error": f"exit code {proc.returncode} (see its output above)"}
  return json.loads(out.read_text())


def _tree_cpu_seconds(pid: int, proc: str = "/proc") -> float:
  """CPU seconds (user + system) of a process and its living descendants, with those of their
  children that have exited and been waited for (from /proc; 0.0 where it is missing)."""
  parents, times = {}, {}
  tick = os.sysconf("SC_CLK_TCK")
  try:
    entries = [int(e) for e in os.listdir(proc) if e.isdigit()]
  except OSError:
    return 0.0
  for p in entries:
    try:
      with open(f"{proc}/{p}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
      parents[p] = int(fields[1])
      times[p] = sum(int(x) for x in fields[11:15]) / tick  # utime stime cutime cstime
    except (OSError, IndexError, ValueError):
      continue  # gone since the listing, or not a process's stat
  tree, grew = {pid}, True
  while grew:
    new = {p for p, pp in parents.items() if pp in tree and p not in tree}
    tree |= new
    grew = bool(new)
  return sum(times.get(p, 0.0) for p in tree)


def _wait_idle(proc: subprocess.Popen, out: Path, run: int, repeats: int,
               timeout: float) -> str | None:
  """Waits until an interleaved worker is idle before its timed run `run` (it has written
  OUT.wait<run> and blocks on stdin) or, for run = repeats, until its result OUT is written
  (the workers write it whole, by rename). None, or why not (the worker is then killed)."""
  deadline = time.monotonic() + timeout
  flag = out if run == repeats else out.with_name(f"{out.name}.wait{run}")
  while not flag.exists():
    rc = proc.poll()
    if rc is not None:
      return (f"exit code {rc} (see its output above)" if rc else
              f"exited before timed run {run + 1} of {repeats}")
    if time.monotonic() > deadline:
      _kill(proc)
      return f"timed out after {timeout:.0f} s"
    time.sleep(0.05)
  return None


def _kill(proc: subprocess.Popen) -> None:
  """Kills a worker and every process of its session (vLLM's engine runs in a child)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except OSError:
    pass  # already gone
  proc.wait()


def run_interleaved(workers: dict[str, tuple[list[str], Path, dict | None]], repeats: int,
                    timeout: float, say, pause: float = _PAUSE_S) -> tuple[dict, list[dict]]:
  """Runs gated workers ({stack: (cmd, out, env)}; each run with --gated) in interleaved
  rounds: every worker through its start-up and warm-up, one at a time; then `repeats` rounds
  of one timed run per stack, one stack at a time, in the given order and reversed every other
  round, `pause` seconds before each. Returns ({stack: its result JSON, or {"error"}}, the
  schedule: one entry per timed run with its start and end in seconds from the first round and
  the CPU seconds each waiting stack used meanwhile). Each worker runs in its own session; any
  left when this returns or raises are killed with their children."""
  procs, errors = {}, {}
  try:
    for stack, (cmd, out, env) in workers.items():
      for stale in out.parent.glob(f"{out.name}.wait*"):
        stale.unlink()
      out.unlink(missing_ok=True)
      say(f"--- {stack}: start-up and warm-up (load average "
          f"{[round(x, 2) for x in os.getloadavg()]})")
      say("$ " + " ".join(cmd + ["--gated"]))
      procs[stack] = subprocess.Popen(cmd + ["--gated"], env=env, stdin=subprocess.PIPE,
                                      text=True, start_new_session=True)
      err = _wait_idle(procs[stack], out, 0, repeats, timeout)
      if err is not None:
        errors[stack] = err
    names = [s for s in workers if s not in errors]
    schedule, t_start = [], time.monotonic()
    for i in range(repeats):
      for stack in (names if i % 2 == 0 else names[::-1]):
        if stack in errors:
          continue
        time.sleep(pause)
        others = {s: p for s, p in procs.items() if s != stack and p.poll() is None}
        cpu0 = {s: _tree_cpu_seconds(p.pid) for s, p in others.items()}
        t0 = time.monotonic()
        say(f"round {i + 1}/{repeats}: {stack}")
        try:
          procs[stack].stdin.write("go\n")
          procs[stack].stdin.flush()
        except OSError:
          pass  # it has exited: _wait_idle says how
        err = _wait_idle(procs[stack], workers[stack][1], i + 1, repeats, timeout)
        t1 = time.monotonic()
        schedule.append({"round": i, "stack": stack, "start_s": round(t0 - t_start, 3),
                         "end_s": round(t1 - t_start, 3),
                         "waiting_stacks_cpu_s": {
                             s: round(_tree_cpu_seconds(p.pid) - cpu0[s], 2)
                             for s, p in others.items()}})
        if err is not None:
          errors[stack] = err
    results = {}
    for stack, proc in procs.items():
      try:
        proc.stdin.close()  # a worker still waiting reads EOF and exits
      except OSError:
        pass  # it has exited ("go" still buffered for a closed pipe)
      try:
        proc.wait(timeout=60)  # its result is written; this is its shutdown
      except subprocess.TimeoutExpired:
        say(f"{stack}: still running 60 s after its result, killed")
      out = workers[stack][1]
      if stack in errors or not out.exists():
        results[stack] = {"error": errors.get(stack, f"exit code {proc.returncode}")}
      else:
        results[stack] = json.loads(out.read_text())
    return results, schedule
  finally:
    for stack, proc in procs.items():
      if proc.poll() is None:
        _kill(proc)
      out = workers[stack][1]
      for flag in out.parent.glob(f"{out.name}.wait*"):
        flag.unlink()


def run(args: argparse.Namespace) -> int:
  say = lambda msg: print(f"[bench serve] {msg}", file=sys.stderr, flush=True)
  if args.repeats < 1:
    raise UserError(f"--repeats must be at least 1 (timed runs per stack), got {args.repeats}")
  if args.warmup < 0:
    raise UserError(f"--warmup must be at least 0, got {args.warmup}")
  workdir = Path(args.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  machine = _machine()
  say(f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), load average "
      f"{machine['load_average_start']}")
  model_dir = Path(args.model_dir or workdir / f"model-{args.preset}-{args.dtype}-seed{args.seed}")
  me = [sys.executable, "-m", "qwen2_jax.infer.bench_serve_worker"]
  if not (model_dir / "config.json").exists():
    if args.model_dir:
      say(f"{model_dir}: no config.json")
      return 2
    say(f"writing random {args.preset} weights to {model_dir}")
    r = _child(me + ["prepare", "--model-dir", str(model_dir), "--preset", args.preset,
                     "--dtype", args.dtype, "--seed", str(args.seed),
                     "--out", str(workdir / "prepare.json")],
               workdir / "prepare.json", args.timeout, say)
    if "error" in r:
      say(f"writing the checkpoint failed: {r['error']}")
      return 1
  vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
  workload = make_workload(args.num_requests, vocab, args.seed, tuple(args.prompt_len),
                           tuple(args.output_len))
  wl_path = workdir / "workload.json"
  wl_path.write_text(json.dumps(workload))
  spec = {"model_dir": str(model_dir), "workload": str(wl_path), "dtype": args.dtype,
          "repeats": args.repeats, "warmup": args.warmup, "max_num_seqs": args.max_num_seqs,
          "max_num_batched_tokens": args.max_num_batched_tokens,
          "kv_cache_gib": args.kv_cache_gib, "max_model_len": max_model_len(workload),
          "admission": args.admission, "matmul_precision": args.matmul_precision}
  spec_path = workdir / "spec.json"
  spec_path.write_text(json.dumps(spec, indent=2))
  stacks, workers = {}, {}
  for stack in [s for s in STACKS if s in args.stacks]:
    out = workdir / f"result-{stack}.json"
    if stack == "vllm":
      if not Path(args.vllm_python).exists():
        stacks[stack] = {"skipped": f"no vLLM virtualenv at {args.vllm_python}"}
        say(f"vLLM skipped: {args.vllm_python} not found; create it with `bash {VLLM_SETUP}` "
            "(or pass --vllm-python)")
        continue
      cmd = [args.vllm_python, str(VLLM_SCRIPT), "--spec", str(spec_path), "--out", str(out)]
      env = dict(os.environ)
      if args.vllm_cpus == "all":
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpus)
    else:
      cmd, env = me + [stack, "--spec", str(spec_path), "--out", str(out)], None
    workers[stack] = (cmd, out, env)
  interleaved = args.order == "interleaved"
  schedule = None
  if interleaved:
    results, schedule = run_interleaved(workers, args.repeats, args.timeout, say)
  else:
    results = {}
    for stack, (cmd, out, env) in workers.items():
      say(f"--- {stack} (load average {[round(x, 2) for x in os.getloadavg()]})")
      results[stack] = _child(cmd, out, args.timeout, say, env)
  for stack, r in results.items():
    if "runs" in r:
      r["summary"] = summarize_runs(r["runs"])
      s = r["summary"]
      say(f"{stack}: {s['output_tok_s']:.1f} output tok/s, TTFT median "
          f"{_fmt(s['ttft_median_s'], '.3f')} s")
    stacks[stack] = r
  stacks = {k: stacks[k] for k in STACKS if k in stacks}
  machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  result = {"preset": args.preset, "dtype": args.dtype, "model_dir": str(model_dir),
            "repeats": args.repeats, "warmup": args.warmup, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_gib": args.kv_cache_gib, "vllm_cpus": args.vllm_cpus,
            "admission": args.admission, "matmul_precision": args.matmul_precision,
            "order": "interleaved" if interleaved else "sequential", "machine": machine,
            "workload": _workload_facts(workload), "stacks": stacks}
  if schedule is not None:
    result.update(pause_s=_PAUSE_S, schedule=schedule)
  result.update(_compare(stacks, paired=interleaved))
  path = Path(args.json or workdir / "results.json")
  path.write_text(json.dumps(result, indent=2))
  print(format_report(result))
  say(f"results: {path}")
  return 0 if all("summary" in r or "skipped" in r for r in stacks.values()) else 1


def _workload_facts(workload: dict) -> dict:
  reqs = workload["requests"]
  return {"num_requests": len(reqs), "seed": workload["seed"],
          "prompt_len": workload["prompt_len"], "output_len": workload["output_len"],
          "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
          "output_tokens": sum(r["max_tokens"] for r in reqs)}


def _compare(stacks: dict, paired: bool = False) -> dict:
  """Throughput ratios of the new engine over the others (of the medians; with `paired`, also
  run i over run i: the runs of one interleaved round), and greedy agreement with it."""
  ok = {k: r for k, r in stacks.items() if "summary" in r}
  out = {"ratios": {}, "agreement": {}}
  if paired:
    out["paired_ratios"] = {}
  if "jax-new" not in ok:
    return out
  base = ok["jax-new"]
  for name, r in ok.items():
    if name != "jax-new":
      key = f"jax-new/{name}"
      out["ratios"][key] = base["summary"]["output_tok_s"] / r["summary"]["output_tok_s"]
      if paired:
        pairs = [a / b for a, b in zip(base["summary"]["output_tok_s_runs"],
                                       r["summary"]["output_tok_s_runs"])]
        out["paired_ratios"][key] = {"median": statistics.median(pairs), "rounds": pairs}
      if base.get("outputs") and r.get("outputs"):
        out["agreement"][name] = agreement(base["outputs"], r["outputs"])
  return out

