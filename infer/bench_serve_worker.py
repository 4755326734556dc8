"""The worker processes of `qwen2-jax bench serve` (`qwen2_jax.infer.bench_serve`), one per
stack, so that each stack has its own threads and none runs while another is timed:

  python -m qwen2_jax.infer.bench_serve_worker prepare --model-dir DIR --preset P --dtype D \
      --seed S --out OUT.json           # random weights of a preset, written as an HF directory
  python -m qwen2_jax.infer.bench_serve_worker {jax-new,jax-static} --spec SPEC.json --out OUT.json \
      [--gated]                         # --gated: wait for the driver before each timed run

A stack's result (OUT.json): startup_s (checkpoint load + engine build), warmup_s (each untimed
run), compile_s (the engine's own count), runs [{wall_s, output_tokens, ttft_s [per request]}],
outputs (the token ids of the last run), the engine's stats, for the new engine the timed runs'
steps and seconds by padded token count, per run (step_time_per_run), and the load average
around it.
vLLM's worker is `scripts/vllm_serve_bench.py` (its own virtualenv) and writes the same fields.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time

import jax
import numpy as np


def _load_avg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def prepare(model_dir: str, preset: str, dtype: str, seed: int) -> dict:
  """Writes a preset's shapes with random weights (`init_params`) as an HF directory."""
  import qwen2_jax as q  # pylint: disable=import-outside-toplevel
  from qwen2_jax.checkpoint import save_hf_checkpoint  # pylint: disable=import-outside-toplevel
  config = q.get_preset(preset, param_dtype=dtype, dtype=dtype)
  params = jax.jit(q.init_params, static_argnums=0)(config, jax.random.key(seed))
  save_hf_checkpoint(model_dir, config, params, show_progress=False)
  return {"model_dir": model_dir, "num_params": int(sum(x.size for x in jax.tree.leaves(params)))}


def engine_classes():
  """(continuous-batching Engine or None, static engine class): the new engine is the `Engine`
  that takes max_num_batched_tokens; before it existed, `Engine` was the static one."""
  from qwen2_jax.infer import engine as engine_lib  # pylint: disable=import-outside-toplevel
  params = inspect.signature(engine_lib.Engine).parameters
  new = engine_lib.Engine if "max_num_batched_tokens" in params else None
  try:
    # pylint: disable-next=import-outside-toplevel
    from qwen2_jax.infer.static_engine import StaticEngine
  except ImportError:
    StaticEngine = None if new is not None else engine_lib.Engine
  return new, StaticEngine


def _build(stack: str, spec: dict, config, params):
  new, static = engine_classes()
  S = spec["max_num_seqs"]
  if stack == "jax-new":
    if new is None:
      raise SystemExit("jax-new: this checkout has no continuous-batching Engine")
    # Prefix caching off (as for vLLM): the timed runs repeat the warm-up's prompts.
    return new(config, params, max_num_seqs=S,
               max_num_batched_tokens=spec["max_num_batched_tokens"],
               kv_cache_memory=int(spec["kv_cache_gib"] * 2**30),
               max_context=spec["max_model_len"], enable_prefix_caching=False,
               **({"admission": spec["admission"]} if "admission" in spec else {}),
               **({"matmul_precision": spec["matmul_precision"]}
                  if spec.get("matmul_precision") else {}))
  return static(config, params, max_batch_size=S, max_context=spec["max_model_len"])


def run_new(engine, requests) -> tuple[list[list[int]], list[float | None]]:
  """One batch through the continuous-batching engine; (outputs, TTFT per request). The engine
  calls `check` after every step, when no computation is in flight."""
  first: list[float | None] = [None] * len(requests)
  t0 = time.perf_counter()

  def check():
    now = time.perf_counter() - t0
    for seq in engine.scheduler.running:
      if seq.output and first[seq.rid] is None:
        first[seq.rid] = now

  results = engine.run_batch(requests, check=check, check_interval=1)
  return [r.output_ids for r in results], first


def run_static(engine, requests) -> tuple[list[list[int]], list[float | None]]:
  """One batch through the static engine, as its `generate` does (batches of max_batch_size in
  prompt-length order); a row's first token comes with its batch's prefill."""
  if not hasattr(engine, "prefill"):  # an engine without the exposed steps: no TTFT
    return [r.output_ids for r in engine.run_batch(requests)], [None] * len(requests)
  order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
  outputs: list[list[int] | None] = [None] * len(requests)
  first: list[float | None] = [None] * len(requests)
  t0 = time.perf_counter()
  for start in range(0, len(order), engine.max_batch_size):
    idx = order[start:start + engine.max_batch_size]
    batch = engine.prepare([requests[i] for i in idx])
    state = jax.block_until_ready(engine.prefill(batch))
    now = time.perf_counter() - t0
    state = engine.decode(batch, state, batch["max_steps"])
    for i, r in zip(idx, engine.results(batch, state)):
      outputs[i], first[i] = r.output_ids, now
  return outputs, first


def wait_for_go(out: str, run: int) -> None:
  """`bench serve --order interleaved`: tells the driver that this worker is idle before timed
  run `run` (it writes the file OUT.wait<run>), then blocks until the driver writes a line to
  stdin; exits if the driver has gone (EOF)."""
  with open(f"{out}.wait{run}", "w", encoding="utf-8"):
    pass
  if not sys.stdin.readline():
    raise SystemExit("bench serve worker: the driver closed stdin before the timed run")


def bench_stack(stack: str, spec: dict, gate=None) -> dict:
  """Loads the checkpoint, builds the engine, runs the workload warmup + repeats times;
  `gate(run)`, where given, is called before each timed run (`wait_for_go`)."""
  from qwen2_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from qwen2_jax.infer.sampling import SamplingParams  # pylint: disable=import-outside-toplevel
  load_start = _load_avg()
  with open(spec["workload"], encoding="utf-8") as f:
    workload = json.load(f)["requests"]
  t0 = time.perf_counter()
  config, params = checkpoint.load(spec["model_dir"], dtype=spec["dtype"],
                                   compute_dtype=spec["dtype"], progress=False)
  engine = _build(stack, spec, config, params)
  del params
  startup = time.perf_counter() - t0
  requests = engine.validate(
      [r["prompt_token_ids"] for r in workload],
      [SamplingParams(max_new_tokens=r["max_tokens"], ignore_eos=True) for r in workload])
  one_batch = run_new if stack == "jax-new" else run_static
  out = {"stack": stack, "engine": f"{type(engine).__module__}.{type(engine).__name__}",
         "startup_s": startup, "warmup_s": [], "runs": [], "jax": jax.__version__,
         "backend": jax.default_backend(), "load_average_start": load_start}
  expected = sum(r["max_tokens"] for r in workload)
  before = {}  # the new engine's step times before the timed runs
  for i in range(spec["warmup"] + spec["repeats"]):
    if i == spec["warmup"]:
      before = engine.stats.get("step_time") or {}
    if gate is not None and i >= spec["warmup"]:
      gate(i - spec["warmup"])
    t0 = time.perf_counter()
    outputs, first = one_batch(engine, requests)
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outputs)
    if n != expected:
      raise SystemExit(f"{stack}: {n} output tokens, the workload asks for {expected}")
    if i < spec["warmup"]:
      out["warmup_s"].append(wall)
      compiled = engine.stats.get("num_compilations")
    else:
      out["runs"].append({"wall_s": wall, "output_tokens": n,
                          "ttft_s": None if None in first else first})
    print(f"[{stack}] {'warm-up' if i < spec['warmup'] else 'run'} {i}: {wall:.2f} s, "
          f"{n / wall:.1f} output tok/s", file=sys.stderr, flush=True)
  out["outputs"] = outputs
  out["stats"] = engine.stats
  if "step_time" in out["stats"] and spec["repeats"]:  # timed runs' steps by T, per run
    out["step_time_per_run"] = {
        key: {"steps": (v["steps"] - before.get(key, {}).get("steps", 0)) / spec["repeats"],
              "seconds": (v["seconds"] - before.get(key, {}).get("seconds", 0.0)) /
                         spec["repeats"]}
        for key, v in out["stats"]["step_time"].items()}
  out["compile_s"] = engine.stats.get("compile_seconds")
  if spec["warmup"] and engine.stats.get("num_compilations") != compiled:
    out["note"] = "compiled during the timed runs (more warm-up runs needed)"
  if stack == "jax-static":
    out["note"] = "; ".join(filter(None, [out.get("note"),
                                          "TTFT = end of the prefill of the request's batch"]))
  out["load_average_end"] = _load_avg()
  return out


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m qwen2_jax.infer.bench_serve_worker")
  parser.add_argument("stack", choices=("prepare", "jax-new", "jax-static"))
  parser.add_argument("--spec")
  parser.add_argument("--out", required=True)
  parser.add_argument("--model-dir")
  parser.add_argument("--preset", default="qwen2-0.5b")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--gated", action="store_true",
                      help="wait for a line on stdin before each timed run (interleaved order)")
  args = parser.parse_args(argv)
  if args.stack == "prepare":
    result = prepare(args.model_dir, args.preset, args.dtype, args.seed)
  else:
    with open(args.spec, encoding="utf-8") as f:
      result = bench_stack(args.stack, json.load(f),
                           functools.partial(wait_for_go, args.out) if args.gated else None)
  tmp = f"{args.out}.tmp"  # written whole, then renamed: the driver waits for OUT to appear
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, default=lambda x: np.asarray(x).tolist())
  os.replace(tmp, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
