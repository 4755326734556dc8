"""`qwen2-jax bench generate`: prefill / decode throughput of qwen2-jax vs `transformers`.

One process, one machine, the same random weights (written once as an HF checkpoint and loaded
by both). Per batch size: prefill tokens/s (prompt tokens / prefill time) and decode tokens/s
(B * (new_tokens - 1) / decode-loop time: the first new token comes from the prefill), medians
over `repeats` runs after a warm-up, ours and transformers interleaved so both see the same
machine load. Compile time is reported separately. The decode floor is the time to read, once,
every parameter plus the valid KV cache at the mean context length, at the machine's measured
copy bandwidth (numpy copy of 512 MiB on all CPUs, bytes read + written per second). Prefill
MFU: model FLOPs per prompt token (`qwen2_jax.flops.prefill_flops_per_token`) x prefill tokens/s
over the device's peak (`qwen2_jax.flops.peak_flops_for_devices`: a measured matmul rate on CPU).
transformers: `generate` (greedy, dynamic cache), timed as generate(max_new_tokens=1) for the
prefill and generate(max_new_tokens=N) minus that for the decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

import qwen2_jax as q
from qwen2_jax import flops
from qwen2_jax.checkpoint.hf import save_hf_checkpoint
from qwen2_jax.infer.static_engine import StaticEngine as Engine
from qwen2_jax.infer.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", default="qwen2-0.5b", help="model shape (random weights)")
  parser.add_argument("--dtype", default="float32", help="param and compute dtype")
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
  parser.add_argument("--no-transformers", action="store_true", help="time qwen2-jax only")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch intra-op threads (default: all CPUs; on a loaded machine 1 "
                           "can be much faster, as OpenMP threads spin)")
  parser.add_argument("--layout", default="auto", choices=("auto", "unrolled", "as_is"),
                      help="Engine layout (auto: unrolled layers on CPU)")
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
  results = run_generate_benchmark(
      preset=args.preset, dtype=args.dtype, prompt_len=args.prompt_len,
      new_tokens=args.new_tokens, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
      compare_transformers=not args.no_transformers, layout=args.layout,
      torch_threads=args.torch_threads)
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


def copy_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5, threads: int | None = None
                   ) -> float:
  """Median bytes/s (read + written) of a numpy copy between preallocated buffers, split over
  `threads` threads (default: all CPUs; numpy releases the GIL while copying)."""
  threads = threads or os.cpu_count() or 1
  src = np.ones(num_bytes // 4, np.float32)
  dst = np.empty_like(src)
  parts = np.array_split(np.arange(src.size), threads)
  bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
  times = []
  with ThreadPoolExecutor(threads) as pool:
    for _ in range(repeats + 1):
      t0 = time.perf_counter()
      list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
      times.append(time.perf_counter() - t0)
  return 2 * src.nbytes / statistics.median(times[1:])


def _median_ms(times):
  return 1000 * statistics.median(times)


def run_generate_benchmark(*, preset="qwen2-0.5b", dtype="float32", prompt_len=128,
                           new_tokens=128, batch_sizes=(1, 8), repeats=3,
                           compare_transformers=True, layout="auto", torch_threads=None,
                           log=None) -> dict:
  """Runs the benchmark; returns a dict of settings, machine facts and per-batch results."""
  say = lambda msg: print(msg, file=log or sys.stderr, flush=True)
  config = q.get_preset(preset, param_dtype=dtype, dtype=dtype, eos_token_id=None,
                        max_position_embeddings=max(32768, prompt_len + new_tokens))
  params = jax.jit(q.init_params, static_argnums=0)(config, jax.random.key(0))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  hf_model = None
  if compare_transformers:
    hf_model = _load_transformers(config, params, say, torch_threads or os.cpu_count() or 1)
  engine = Engine(config, params, max_batch_size=max(batch_sizes), layout=layout)
  del params
  bandwidth = copy_bandwidth()
  peak = flops.peak_flops_for_devices(jax.devices())
  prefill_flops = flops.prefill_flops_per_token(config, prompt_len)
  say(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; load average {os.getloadavg()}")
  c = config
  kv_bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * \
      np.dtype(dtype).itemsize
  out = {"preset": preset, "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens,
         "repeats": repeats, "layout": layout, "param_bytes": param_bytes,
         "copy_bandwidth_GBps": round(bandwidth / 1e9, 2), "cpu_count": os.cpu_count(),
         "peak_flops_per_device": peak, "prefill_flops_per_token": prefill_flops,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_start": os.getloadavg(),
         "torch_threads": torch_threads or os.cpu_count() if compare_transformers else None,
         "jax": jax.__version__, "backend": jax.default_backend(), "batches": {}}
  rng = np.random.RandomState(0)
  sp = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
  for B in batch_sizes:
    prompts = rng.randint(0, c.vocab_size, (B, prompt_len)).tolist()
    batch = engine.prepare(engine.validate(prompts, sp))
    compiles_before = dict(engine.compile_seconds)
    ours_p, ours_d, hf_p, hf_g = [], [], [], []
    ours_tokens = hf_tokens = None
    for rep in range(repeats + 1):  # run 0 compiles / warms up and is not counted
      t0 = time.perf_counter()
      state = jax.block_until_ready(engine.prefill(batch))
      t1 = time.perf_counter()
      state = jax.block_until_ready(engine.decode(batch, state, new_tokens))
      t2 = time.perf_counter()
      ours_tokens = np.asarray(state.tokens)[:, :new_tokens]
      if rep:
        ours_p.append(t1 - t0)
        ours_d.append(t2 - t1)
      if hf_model is not None:
        tp, tg, hf_tokens = _time_transformers(hf_model, prompts, new_tokens)
        if rep:
          hf_p.append(tp)
          hf_g.append(tg)
      say(f"B={B} run {rep}: ours prefill {t1 - t0:.3f}s decode {t2 - t1:.3f}s"
          + (f"; transformers prefill {tp:.3f}s generate {tg:.3f}s" if hf_model else ""))
    mean_context = prompt_len + (new_tokens - 1) / 2
    step_bytes = param_bytes + B * mean_context * kv_bytes_per_token
    floor_ms = 1000 * step_bytes / bandwidth
    steps = new_tokens - 1
    row = {"ours": {"prefill_ms": _median_ms(ours_p),
                    "prefill_tok_s": B * prompt_len / statistics.median(ours_p),
                    "decode_step_ms": _median_ms(ours_d) / steps,
                    "decode_tok_s": B * steps / statistics.median(ours_d),
                    "compile_s": {f"{k[0]}{k[1:]}": round(v, 2)
                                  for k, v in engine.compile_seconds.items()
                                  if k not in compiles_before}},
           "decode_floor_step_ms": floor_ms, "decode_bytes_per_step": step_bytes}
    row["ours"]["fraction_of_floor"] = floor_ms / row["ours"]["decode_step_ms"]
    row["ours"]["prefill_mfu"] = _mfu(row["ours"]["prefill_tok_s"], prefill_flops, peak)
    if hf_model is not None:
      prefill = statistics.median(hf_p)
      decode = statistics.median([g - p for g, p in zip(hf_g, hf_p)])
      row["transformers"] = {"prefill_ms": 1000 * prefill,
                             "prefill_tok_s": B * prompt_len / prefill,
                             "decode_step_ms": 1000 * decode / steps,
                             "decode_tok_s": B * steps / decode}
      row["transformers"]["prefill_mfu"] = _mfu(row["transformers"]["prefill_tok_s"],
                                                prefill_flops, peak)
      row["ratio_prefill"] = row["ours"]["prefill_tok_s"] / row["transformers"]["prefill_tok_s"]
      row["ratio_decode"] = row["ours"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
      same = ours_tokens == hf_tokens[:, :new_tokens]
      row["greedy_agreement"] = {"first_token": float(same[:, 0].mean()),
                                 "all_tokens_rows": float(same.all(axis=1).mean())}
    out["batches"][B] = row
  out["load_average_end"] = os.getloadavg()
  return out


def _mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
  return None if not peak else tokens_per_s * flops_per_token / peak


def _load_transformers(config, params, say, threads):
  # torch and transformers only when comparing: slow to import, and `qwen2-jax --help` imports
  # this module for its flags.
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers

  torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory(prefix="qwen2_bench_") as tmp:
    say(f"writing the random weights as an HF checkpoint for transformers ({tmp})")
    save_hf_checkpoint(os.path.join(tmp, "model"), config, params, show_progress=False)
    model = transformers.Qwen2ForCausalLM.from_pretrained(
        os.path.join(tmp, "model"), dtype=getattr(torch, config.param_dtype)).eval()
  model.generation_config.pad_token_id = 0
  model.generation_config.eos_token_id = None
  return model


def _time_transformers(model, prompts, new_tokens):
  """(prefill seconds, full generate seconds, tokens [B, new_tokens]) of greedy generate."""
  import torch  # pylint: disable=import-outside-toplevel
  ids = torch.tensor(prompts)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
  with torch.inference_mode():
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    t2 = time.perf_counter()
  return t1 - t0, t2 - t1, out[:, ids.shape[1]:].numpy()


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{x:.1%}"


def format_table(r: dict) -> str:
  """A markdown table of the results."""
  lines = [f"# generate benchmark: {r['preset']} {r['dtype']}, prompt {r['prompt_len']}, "
           f"{r['new_tokens']} new tokens, median of {r['repeats']}; backend {r['backend']}, "
           f"{r['cpu_count']} CPUs, copy bandwidth {r['copy_bandwidth_GBps']} GB/s, "
           f"XLA_FLAGS='{r['xla_flags']}', torch threads {r['torch_threads']}, "
           f"load avg {r['load_average_start']} -> "
           f"{r['load_average_end']}",
           "", "| B | impl | prefill tok/s | prefill MFU | decode tok/s | decode ms/step | "
           "floor ms/step | floor/step | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for B, row in r["batches"].items():
    o = row["ours"]
    lines.append(f"| {B} | qwen2-jax | {o['prefill_tok_s']:.1f} | {_pct(o['prefill_mfu'])} | "
                 f"{o['decode_tok_s']:.1f} | "
                 f"{o['decode_step_ms']:.1f} | {row['decode_floor_step_ms']:.1f} | "
                 f"{o['fraction_of_floor']:.2f} | "
                 f"{', '.join(f'{k} {v}' for k, v in o['compile_s'].items())} |")
    if "transformers" in row:
      t = row["transformers"]
      lines.append(f"| {B} | transformers | {t['prefill_tok_s']:.1f} | "
                   f"{_pct(t['prefill_mfu'])} | {t['decode_tok_s']:.1f} | "
                   f"{t['decode_step_ms']:.1f} | | | - |")
      lines.append(f"| {B} | ratio | {row['ratio_prefill']:.2f}x | | {row['ratio_decode']:.2f}x | "
                   f"| | | greedy agreement {row['greedy_agreement']} |")
  return "\n".join(lines)
