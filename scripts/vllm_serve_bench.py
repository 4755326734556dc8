"""vLLM's CPU backend on the workload of `qwen2-jax bench serve`: the peer's worker process.

Run by the python of vLLM's own virtualenv (`scripts/setup_vllm_cpu.sh`), never imported by
qwen2-jax; it reads the spec the benchmark wrote and writes the same result fields as the JAX
workers (`qwen2_jax.infer.bench_serve_worker`):

  .venv-vllm/bin/python scripts/vllm_serve_bench.py --spec runs/bench_serve/spec.json \
      --out runs/bench_serve/result-vllm.json [--gated]

With --gated (the benchmark's interleaved order) it writes OUT.wait<i> and waits for a line on
stdin before timed run i, as the JAX workers do.

No tokenizer and no network: prompts are token ids (`TokensPrompt`), the model is the local HF
directory, sampling is greedy with EOS ignored. The batch is added to the engine at once and
stepped to completion (what `LLM.generate` does), so each request's first token is seen at the
step that produced it.
"""

import argparse
import json
import os
import sys
import time


def _load_avg():
  return [round(x, 2) for x in os.getloadavg()]


def wait_for_go(out, run):
  """--gated (`bench serve --order interleaved`): writes OUT.wait<run> (this worker is idle
  before timed run `run`), then blocks until the driver writes a line to stdin."""
  with open(f"{out}.wait{run}", "w", encoding="utf-8"):
    pass
  if not sys.stdin.readline():
    sys.exit("vllm: the driver closed stdin before the timed run")


def run_batch(engine, workload, vllm_api, run_index, admission="fifo"):
  """Adds every request, steps the engine until all are done; (outputs, TTFT per request).
  Outputs come as deltas (new tokens of the step), as a streaming server asks for them."""
  TokensPrompt, SamplingParams, RequestOutputKind = vllm_api
  outputs, first = [[] for _ in workload], [None] * len(workload)
  order = range(len(workload))
  if admission == "longest_first":  # as qwen2-jax's Engine orders a batch (vLLM admits FCFS)
    order = sorted(order, key=lambda i: (-workload[i]["max_tokens"],
                                         -len(workload[i]["prompt_token_ids"]), i))
  t0 = time.perf_counter()
  for i in order:
    r = workload[i]
    sp = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True,
                        detokenize=False, output_kind=RequestOutputKind.DELTA)
    engine.add_request(f"r{run_index}_{i}", TokensPrompt(prompt_token_ids=r["prompt_token_ids"]),
                       sp)
  while engine.has_unfinished_requests():
    step_outputs = engine.step()
    now = time.perf_counter() - t0
    for o in step_outputs:
      i = int(o.request_id.split("-")[0].split("_")[1])  # vLLM may append "-<random>"
      if o.outputs and len(o.outputs[0].token_ids) > 0:
        outputs[i].extend(o.outputs[0].token_ids)
        if first[i] is None:
          first[i] = now
  return outputs, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--spec", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--gated", action="store_true",
                      help="wait for a line on stdin before each timed run (interleaved order)")
  args = parser.parse_args()
  with open(args.spec, encoding="utf-8") as f:
    spec = json.load(f)
  with open(spec["workload"], encoding="utf-8") as f:
    workload = json.load(f)["requests"]
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch  # pylint: disable=import-outside-toplevel
  import vllm  # pylint: disable=import-outside-toplevel
  from vllm import LLM, SamplingParams  # pylint: disable=import-outside-toplevel
  from vllm.inputs import TokensPrompt  # pylint: disable=import-outside-toplevel
  from vllm.sampling_params import RequestOutputKind  # pylint: disable=import-outside-toplevel

  load_start = _load_avg()
  t0 = time.perf_counter()
  # Prefix caching off (as for qwen2-jax): the timed runs repeat the warm-up's prompts.
  llm = LLM(model=spec["model_dir"], skip_tokenizer_init=True, dtype=spec["dtype"],
            max_num_seqs=spec["max_num_seqs"],
            max_num_batched_tokens=spec["max_num_batched_tokens"],
            max_model_len=spec["max_model_len"], enable_prefix_caching=False, seed=0,
            kv_cache_memory_bytes=int(spec["kv_cache_gib"] * 2**30))
  startup = time.perf_counter() - t0
  engine = llm.llm_engine
  out = {"stack": "vllm", "engine": f"vllm {vllm.__version__} (torch {torch.__version__})",
         "startup_s": startup, "warmup_s": [], "runs": [], "compile_s": None,
         "load_average_start": load_start, "torch_threads": torch.get_num_threads(),
         "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
         "note": "startup includes vLLM's own compilation and KV-cache setup; compute threads "
                 f"bound to CPUs {os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')}"}
  expected = sum(r["max_tokens"] for r in workload)
  api = (TokensPrompt, SamplingParams, RequestOutputKind)
  for i in range(spec["warmup"] + spec["repeats"]):
    if args.gated and i >= spec["warmup"]:
      wait_for_go(args.out, i - spec["warmup"])
    t0 = time.perf_counter()
    outputs, first = run_batch(engine, workload, api, i, spec.get("admission", "fifo"))
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outputs)
    if n != expected:
      sys.exit(f"vllm: {n} output tokens, the workload asks for {expected}")
    if i < spec["warmup"]:
      out["warmup_s"].append(wall)
    else:
      out["runs"].append({"wall_s": wall, "output_tokens": n,
                          "ttft_s": None if None in first else first})
    print(f"[vllm] {'warm-up' if i < spec['warmup'] else 'run'} {i}: {wall:.2f} s, "
          f"{n / wall:.1f} output tok/s", file=sys.stderr, flush=True)
  out["outputs"] = outputs
  out["load_average_end"] = _load_avg()
  tmp = f"{args.out}.tmp"  # written whole, then renamed: the driver waits for OUT to appear
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(out, f)
  os.replace(tmp, args.out)


if __name__ == "__main__":
  main()
