"""Model FLOPs per token and the accelerators' peak numbers: one definition for everyone.

The AOT planner (`qwen2_jax.aot`, `qwen2-jax compile`), the training logs' MFU and the
benchmarks all count with these functions, the way MaxText does
(`maxtext_utils.calculate_tflops_training_per_device`): 2 FLOPs per multiply-add of every model
matmul, the backward pass twice the forward, and causal attention as half of the T x T square.
With P the params one token's matmuls use (the embedding lookup is not a matmul, the LM head is;
for MoE only the top-k routed experts, plus the router and the shared expert), L layers, N query
heads of width D and T tokens per sequence:

  training  6 P + 6 L N D T      per trained token: 3 x the forward 2 P + 2 L N D T, where
                                 QK^T and PV cost 2 * 2 * T * N * D per layer over the full
                                 square and the causal mask halves it
  prefill   2 (P - V H) + 2 V H / T + 2 L N D T
                                 per prompt token: the forward, with the [H, V] LM head run only
                                 at each row's last token
  decode    2 P + 4 L N D S      per generated token attending to S cached keys (one query
                                 sees every earlier key: nothing to halve)
  DPO       `dpo_flops_factor` x training, per sequence token (the frozen reference's forward,
                                 when run in the step, adds 2 P + 2 L N D T)

These are model FLOPs (what MFU divides by), not what a given implementation executes: the XLA
attention path computes the whole T x T square, remat recomputes the forward.

`CHIPS` holds each accelerator's peak numbers (bf16 FLOP/s, HBM, bandwidths; the TPU slice
geometry the planner needs); `peak_flops_for_devices` picks the one of the devices in use, or
measures a matmul rate on CPU.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config, num_params

GiB = 1 << 30


# ------------------------------------------------------------------------------ model FLOPs

def matmul_params(config: Qwen2Config) -> int:
  """P: params one token's matmuls use (the LM head included, the embedding lookup not; MoE:
  only the top-k of the routed experts)."""
  H, V = config.hidden_size, config.vocab_size
  params = num_params(config) - (0 if config.tie_word_embeddings else V * H)
  if config.is_moe:
    sparse = sum(config.is_sparse_layer(i) for i in range(config.num_hidden_layers))
    params -= sparse * (config.num_experts - config.num_experts_per_tok) * 3 * H \
        * config.moe_intermediate_size
  return params


def _attention(config: Qwen2Config) -> int:
  """L N D: the per-token attention FLOPs are a multiple of this times the keys attended."""
  return config.num_hidden_layers * config.num_attention_heads * config.head_size


def train_flops_per_token(config: Qwen2Config, seq_len: int) -> float:
  """Model FLOPs per trained token at sequence length T: 6 P + 6 L N D T (module docstring)."""
  return 6.0 * matmul_params(config) + 6.0 * _attention(config) * seq_len


def prefill_flops_per_token(config: Qwen2Config, seq_len: int) -> float:
  """Forward FLOPs per prompt token of a [B, T] prefill: 2 (P - V H) + 2 V H / T + 2 L N D T."""
  head = config.vocab_size * config.hidden_size
  return 2.0 * (matmul_params(config) - head) + 2.0 * head / seq_len \
      + 2.0 * _attention(config) * seq_len


def decode_flops_per_token(config: Qwen2Config, context_len: int) -> float:
  """FLOPs per generated token attending to `context_len` = S keys: 2 P + 4 L N D S."""
  return 2.0 * matmul_params(config) + 4.0 * _attention(config) * context_len


def serve_flops_per_token(config: Qwen2Config, num_tokens: int, num_seqs: int,
                          context_len: int) -> float:
  """FLOPs per token of a continuous-batching step of T = num_tokens tokens from S = num_seqs
  sequences, the LM head at S of them, each token attending to at most `context_len` keys (an
  upper bound): 2 (P - V H) + 2 V H S / T + 4 L N D S_ctx."""
  head = config.vocab_size * config.hidden_size
  return 2.0 * (matmul_params(config) - head) + 2.0 * head * num_seqs / num_tokens \
      + 4.0 * _attention(config) * context_len


def dpo_flops_factor(precomputed: bool) -> float:
  """DPO step FLOPs per sequence token relative to a training step: 1 with the reference's
  log-probs precomputed; 4/3 when the step also runs the frozen reference's forward (a forward
  is a third of forward + backward)."""
  return 1.0 if precomputed else 4.0 / 3.0


# ------------------------------------------------------------------------------- the chips

@dataclasses.dataclass(frozen=True, kw_only=True)
class ChipSpec:
  """Per-chip peak numbers of one accelerator generation (one JAX device per chip)."""
  generation: str                   # the planner's name ("v5p"); GPUs by model ("h100")
  device_kinds: tuple[str, ...]     # `jax.Device.device_kind` substrings that mean this chip
  peak_bf16_flops: float            # dense bf16 matmul peak, FLOP/s
  hbm_bytes: int                    # HBM capacity
  hbm_bandwidth: float              # bytes/s
  # TPU slices only (the planner's topologies):
  ici_bandwidth: float | None = None  # bytes/s per chip, all ICI links together (bidirectional)
  torus_dims: int | None = None     # 3: v4/v5p (names count TensorCores, 2 per chip); 2: v5e/v6e
  chip_config: str | None = None    # libtpu chip config: one device per chip

  @property
  def is_tpu(self) -> bool:
    return self.torus_dims is not None


# Sources (Cloud TPU system-architecture pages, cloud.google.com/tpu/docs/<gen>, 2025):
#   v4  (/tpu/docs/v4):  275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s, ICI 2400 Gbps per chip
#   v5e (/tpu/docs/v5e): 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1600 Gbps per chip
#   v5p (/tpu/docs/v5p): 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, ICI 4800 Gbps per chip
#   v6e (/tpu/docs/v6e): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s, ICI 3584 Gbps per chip
# HBM is taken in GiB (the pages write "GB"; the runtime reports 16/32/95 GiB usable-ish).
# NVIDIA data sheets, dense bf16 without sparsity, SXM boards: A100 312 TFLOP/s, 80 GB at
# 2039 GB/s; H100 989 TFLOP/s, 80 GB at 3350 GB/s; H200 989 TFLOP/s, 141 GB at 4800 GB/s.
CHIPS = {c.generation: c for c in (
    ChipSpec(generation="v4", device_kinds=("TPU v4",), peak_bf16_flops=275e12,
             hbm_bytes=32 * GiB, hbm_bandwidth=1200e9, ici_bandwidth=2400e9 / 8, torus_dims=3,
             chip_config="megacore"),
    ChipSpec(generation="v5e", device_kinds=("TPU v5 lite", "TPU v5e"), peak_bf16_flops=197e12,
             hbm_bytes=16 * GiB, hbm_bandwidth=819e9, ici_bandwidth=1600e9 / 8, torus_dims=2,
             chip_config="default"),
    ChipSpec(generation="v5p", device_kinds=("TPU v5p", "TPU v5"), peak_bf16_flops=459e12,
             hbm_bytes=95 * GiB, hbm_bandwidth=2765e9, ici_bandwidth=4800e9 / 8, torus_dims=3,
             chip_config="megacore"),
    ChipSpec(generation="v6e", device_kinds=("TPU v6 lite", "TPU v6e"), peak_bf16_flops=918e12,
             hbm_bytes=32 * GiB, hbm_bandwidth=1640e9, ici_bandwidth=3584e9 / 8, torus_dims=2,
             chip_config="default"),
    ChipSpec(generation="a100", device_kinds=("A100",), peak_bf16_flops=312e12,
             hbm_bytes=80 * 10**9, hbm_bandwidth=2039e9),
    ChipSpec(generation="h100", device_kinds=("H100",), peak_bf16_flops=989e12,
             hbm_bytes=80 * 10**9, hbm_bandwidth=3350e9),
    ChipSpec(generation="h200", device_kinds=("H200",), peak_bf16_flops=989e12,
             hbm_bytes=141 * 10**9, hbm_bandwidth=4800e9),
)}


def chip_for_device_kind(device_kind: str) -> ChipSpec | None:
  """The chip a `jax.Device.device_kind` names (longest matching substring wins: "TPU v5 lite"
  is a v5e, "TPU v5" a v5p), or None."""
  kinds = [(kind, chip) for chip in CHIPS.values() for kind in chip.device_kinds]
  for kind, chip in sorted(kinds, key=lambda kc: len(kc[0]), reverse=True):
    if kind.lower() in device_kind.lower():
      return chip
  return None


def peak_flops_per_device(device_kind: str) -> float | None:
  """Spec-sheet peak bf16 FLOP/s of one device of this kind, or None when unknown."""
  chip = chip_for_device_kind(device_kind)
  return None if chip is None else chip.peak_bf16_flops


_MEASURED: dict[str, float] = {}


def measure_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
  """Measured dense f32 matmul FLOP/s of the default device (median of `repeats`)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def peak_flops_for_devices(devices) -> float | None:
  """Per-device peak FLOP/s: the spec sheet for known accelerators, a measured matmul rate on
  CPU (once per process), None otherwise."""
  peak = peak_flops_per_device(devices[0].device_kind)
  if peak is None and devices[0].platform == "cpu":
    if "cpu" not in _MEASURED:
      _MEASURED["cpu"] = measure_matmul_flops()
    peak = _MEASURED["cpu"]
  return peak
