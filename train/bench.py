"""`qwen2-jax bench train`: training throughput of qwen2-jax vs transformers + PyTorch AdamW.

Both sides train the same model config on the same batch shape in the same process, fp32,
AdamW with the same hyper-parameters (weight decay on the weight matrices only): a full step is
forward, backward, clipping and the optimizer update. Reported: median tokens/s after warm-up for
each, the ratio, compile time (JAX) separately, and MFU (`qwen2_jax.flops`) against a matmul peak
measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import qwen2_jax as q
from qwen2_jax import flops
from qwen2_jax.presets import get_preset


@dataclasses.dataclass(frozen=True)
class TrainBenchResult:
  config: dict[str, Any]
  batch: int
  seq_len: int
  jax_tokens_per_s: float
  torch_tokens_per_s: float
  ratio: float
  jax_compile_s: float
  jax_step_ms: list[float]
  torch_step_ms: list[float]
  matmul_peak_flops: float
  flops_per_token: float
  jax_mfu: float
  torch_mfu: float
  threads: int


def _median(xs):
  return float(np.median(xs))


def bench_train(*, hidden_size: int = 512, num_layers: int = 4, heads: int = 8,
                kv_heads: int = 2, intermediate_size: int = 1408, vocab_size: int = 8192,
                batch: int = 8, seq_len: int = 256, steps: int = 6, warmup: int = 2,
                threads: int | None = None) -> TrainBenchResult:
  # Imported when the benchmark runs: `qwen2-jax --help` imports this module for its flags, and
  # torch, transformers and the training stack (optax) would slow it down.
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers

  from qwen2_jax.train import step as step_lib
  from qwen2_jax.train.optim import OptimConfig, make_optimizer

  threads = threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  config = get_preset("qwen2-tiny", vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=False, max_position_embeddings=max(seq_len, 2048))
  optim = OptimConfig(learning_rate=1e-4, min_learning_rate=1e-4, warmup_steps=0,
                      decay_steps=1, weight_decay=0.1, clip_norm=1.0)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
  tokens = batch * seq_len

  # --- qwen2-jax: the project's jitted train step (donated state), one device.
  optimizer = make_optimizer(optim)
  state = step_lib.init_train_state(q.init_params(config, jax.random.key(0)), optimizer)
  jbatch = {"input_ids": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
            "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
            "loss_mask": jnp.ones((batch, seq_len), jnp.float32), "segment_ids": None}
  step = jax.jit(lambda s, b: step_lib.train_step(config, optimizer, s, b), donate_argnums=0)
  t = time.perf_counter()
  compiled = step.lower(state, jbatch).compile()
  compile_s = time.perf_counter() - t
  jax_times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    state, out = compiled(state, jbatch)
    jax.block_until_ready(out["loss"])
    if i >= warmup:
      jax_times.append(time.perf_counter() - t)

  # --- transformers + torch.optim.AdamW on the same config and batch.
  hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      tie_word_embeddings=False, max_position_embeddings=max(seq_len, 2048)))
  hf.train()
  # Weight decay on the same params as ours (`model.weight_decay_mask`): matrices, not the
  # embedding, norms or biases.
  decayed = [p.ndim >= 2 and "embed_tokens" not in n for n, p in hf.named_parameters()]
  params = [p for _, p in hf.named_parameters()]
  groups = [{"params": [p for p, d in zip(params, decayed) if d], "weight_decay": 0.1},
            {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-4, betas=(optim.b1, optim.b2), eps=optim.eps)
  tids = torch.as_tensor(ids, dtype=torch.long)
  torch_times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    loss = hf(input_ids=tids[:, :-1], labels=tids[:, :-1].clone()).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      torch_times.append(time.perf_counter() - t)

  peak = flops.measure_matmul_flops()
  fpt = flops.train_flops_per_token(config, seq_len)
  jax_tps = tokens / _median(jax_times)
  torch_tps = tokens / _median(torch_times)
  return TrainBenchResult(
      config={"hidden_size": hidden_size, "num_layers": num_layers, "heads": heads,
              "kv_heads": kv_heads, "intermediate_size": intermediate_size,
              "vocab_size": vocab_size},
      batch=batch, seq_len=seq_len, jax_tokens_per_s=jax_tps, torch_tokens_per_s=torch_tps,
      ratio=jax_tps / torch_tps, jax_compile_s=compile_s,
      jax_step_ms=[1e3 * x for x in jax_times], torch_step_ms=[1e3 * x for x in torch_times],
      matmul_peak_flops=peak, flops_per_token=fpt, jax_mfu=fpt * jax_tps / peak,
      torch_mfu=fpt * torch_tps / peak, threads=threads)


def format_result(r: TrainBenchResult) -> str:
  return "\n".join([
      f"train step, fp32, AdamW, batch {r.batch} x seq {r.seq_len}, model {r.config}",
      f"  qwen2-jax     : {r.jax_tokens_per_s:10,.0f} tok/s (median of {len(r.jax_step_ms)} steps, "
      f"{np.median(r.jax_step_ms):.0f} ms/step), MFU {r.jax_mfu:.1%}, compile {r.jax_compile_s:.1f} s",
      f"  transformers  : {r.torch_tokens_per_s:10,.0f} tok/s (median of {len(r.torch_step_ms)} steps, "
      f"{np.median(r.torch_step_ms):.0f} ms/step), MFU {r.torch_mfu:.1%}",
      f"  ratio (qwen2-jax / transformers): {r.ratio:.2f}x;  measured matmul peak "
      f"{r.matmul_peak_flops / 1e9:.1f} GFLOP/s;  model FLOPs/token {r.flops_per_token / 1e6:.1f} M",
  ])


def to_json(r: TrainBenchResult) -> str:
  return json.dumps(dataclasses.asdict(r), indent=2)


def add_arguments(parser) -> None:
  """Flags of `qwen2-jax bench train`."""
  parser.add_argument("--hidden-size", type=int, default=512)
  parser.add_argument("--num-layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--intermediate-size", type=int, default=1408)
  parser.add_argument("--vocab-size", type=int, default=8192)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=6, help="timed steps (after warm-up)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
  result = bench_train(hidden_size=args.hidden_size, num_layers=args.num_layers,
                       heads=args.heads, kv_heads=args.kv_heads,
                       intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                       batch=args.batch, seq_len=args.seq_len, steps=args.steps,
                       warmup=args.warmup, threads=args.threads)
  print(to_json(result) if args.json else format_result(result))
  return 0
