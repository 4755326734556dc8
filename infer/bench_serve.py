"""`qwen2-jax bench serve`: offline generation throughput of qwen2-jax's continuous-batching
engine vs vLLM's CPU backend vs qwen2-jax's static-batching engine, in one run on one machine.

Workload: a seeded batch of requests (`make_workload`): random token ids within the vocab,
prompt lengths log-uniform in [min_prompt, max_prompt], output lengths a lognormal clipped to
[min_output, max_output] (median the geometric mean of the bounds: mostly short, a long tail),
greedy, EOS ignored, so every request generates exactly its max_tokens. The whole batch is
submitted at once.

Model: a preset's shapes (default Qwen2-0.5B) with random weights, written once as an HF
directory (config.json + safetensors) that every stack loads.

Stacks, each in its own process, one after the other (so memory and threads do not interfere):
  jax-new     `qwen2_jax.infer.Engine`: continuous batching over a paged KV cache
  jax-static  `StaticEngine`: batches of max_num_seqs requests (sorted by prompt length), each a
              prefill + a decode loop until its longest request ends
  vllm        vLLM's CPU backend (`scripts/vllm_serve_bench.py`, run by the python of its own
              virtualenv, made by `scripts/setup_vllm_cpu.sh`); skipped with a note if missing

Per stack: `warmup` untimed runs of the whole batch (they compile), then `repeats` timed runs.
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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qwen2_jax.errors import UserError

STACKS = ("jax-new", "vllm", "jax-static")
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
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per stack")
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
           f"median of {result['repeats']} runs",
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


def run(args: argparse.Namespace) -> int:
  say = lambda msg: print(f"[bench serve] {msg}", file=sys.stderr, flush=True)
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
  stacks = {}
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
    say(f"--- {stack} (load average {[round(x, 2) for x in os.getloadavg()]})")
    r = _child(cmd, out, args.timeout, say, env)
    if "runs" in r:
      r["summary"] = summarize_runs(r["runs"])
      s = r["summary"]
      say(f"{stack}: {s['output_tok_s']:.1f} output tok/s, TTFT median "
          f"{_fmt(s['ttft_median_s'], '.3f')} s")
    stacks[stack] = r
  machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
  result = {"preset": args.preset, "dtype": args.dtype, "model_dir": str(model_dir),
            "repeats": args.repeats, "warmup": args.warmup, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_gib": args.kv_cache_gib, "vllm_cpus": args.vllm_cpus,
            "admission": args.admission, "matmul_precision": args.matmul_precision,
            "machine": machine,
            "workload": _workload_facts(workload), "stacks": stacks}
  result.update(_compare(stacks))
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


def _compare(stacks: dict) -> dict:
  """Throughput ratios of the new engine over the others, and greedy agreement with it."""
  ok = {k: r for k, r in stacks.items() if "summary" in r}
  out = {"ratios": {}, "agreement": {}}
  if "jax-new" not in ok:
    return out
  base = ok["jax-new"]
  for name, r in ok.items():
    if name != "jax-new":
      out["ratios"][f"jax-new/{name}"] = (base["summary"]["output_tok_s"]
                                          / r["summary"]["output_tok_s"])
      if base.get("outputs") and r.get("outputs"):
        out["agreement"][name] = agreement(base["outputs"], r["outputs"])
  return out

