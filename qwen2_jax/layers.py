"""Building blocks of the Qwen2 decoder: RMSNorm, rotary embeddings (plain, linear, YaRN), SwiGLU.

Shape letters: B batch, T query length, S key length, H hidden, N query heads, K key/value
heads, G = N // K query heads per kv head, D head width, F MLP width, V vocabulary, L layers.
Numerics follow `transformers` exactly (`transformers/models/qwen2/modeling_qwen2.py`; the RoPE
variants from `transformers/modeling_rope_utils.py`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qwen2_jax.config import Qwen2Config
from qwen2_jax.kernels import cpu_matmul

Array = jax.Array

# Suffix of a dense kernel's param name whose array is packed for `cpu_matmul.packed_matmul`
# ([N / NR, K, NR] panels of the [K, N] kernel, or `cpu_matmul.pack_bf16x3` tiles). Only the generation engines on CPU store such
# params (`qwen2_jax.infer.static_engine.decode_layout`); a layer reads the packed form where the
# params hold it instead of the plain name.
PACKED_SUFFIX = "@packed"


def dtype_of(name: str | None):
  return None if name is None else jnp.dtype(name)


def kernel_param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes, dtype,
                 in_dims: int = 1):
  """`module.param(name, ...)` of a dense kernel whose first `in_dims` axes are its input, or
  `PackedKernel` where the params hold `name + PACKED_SUFFIX` in its place (the kernel as a
  [prod(input axes), prod(output axes)] matrix, packed)."""
  packed = packed_kernel(module, name, math.prod(shape[in_dims:]))
  if packed is not None:
    return packed
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def packed_kernel(module: nn.Module, name: str, n: int) -> PackedKernel | None:
  """The `PackedKernel` (n output columns) where the params hold `name + PACKED_SUFFIX`, else
  None. For a FUSED_KERNELS name, None means the module reads its kernels one by one."""
  if module.has_variable("params", name + PACKED_SUFFIX):
    return PackedKernel(module.get_variable("params", name + PACKED_SUFFIX), n)
  return None


# Packed kernels that read the same input, stored side by side along their outputs under one
# name (`decode_layout`): one packed matmul, its output split in this order. On a 2-core AVX-512
# Xeon (2026-12-06), Qwen2-0.5B's 24 layers at 16 rows took 2.5 ms (q/k/v) and 1.6 ms (gate/up)
# less this way with bf16x3 tiles, and 2.9 ms less (gate/up; q/k/v level) with fp32 panels.
FUSED_KERNELS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                 "gate_up_proj": ("gate_proj", "up_proj")}


class PackedKernel:
  """A [K, n] kernel packed for `cpu_matmul.packed_matmul` (trace-time wrapper)."""

  def __init__(self, panels: Array, n: int):
    self.panels, self.n = panels, n


def matmul(x: Array, kernel: Array | PackedKernel, dtype) -> Array:
  """x [..., K] @ kernel [K, N] in `dtype`; a `PackedKernel` through the packed CPU kernel."""
  if isinstance(kernel, PackedKernel):
    if kernel.panels.dtype == jnp.bfloat16:  # bf16x3 tiles (`cpu_matmul.pack_bf16x3`)
      return cpu_matmul.packed_matmul(x.astype(jnp.float32), kernel.panels, kernel.n)
    return cpu_matmul.packed_matmul(x.astype(dtype), kernel.panels.astype(dtype), kernel.n)
  return jnp.einsum("...K,KN->...N", x.astype(dtype), kernel.astype(dtype))


def weight_init(config: Qwen2Config):
  return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
  """RMSNorm as in the reference: normalise in f32, cast back, THEN scale by `weight`."""
  config: Qwen2Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), dtype_of(self.config.param_dtype))
    return rms_norm(x, weight, self.config.rms_norm_eps)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * weight.astype(x.dtype)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_inv_freq(config: Qwen2Config, head_dim: int | None = None,
                  theta: float | None = None) -> tuple[np.ndarray, float]:
  """Inverse frequencies [D/2] (float32) and the cos/sin multiplier (`attention_factor`).

  Supports `rope_scaling` types "default", "linear" and "yarn"; YaRN (Peng et al. 2023, arXiv
  2309.00071) as `transformers/modeling_rope_utils.py` computes it (`_compute_yarn_parameters`),
  including an explicit `attention_factor`, `mscale` / `mscale_all_dim`, `beta_fast` /
  `beta_slow` and `truncate`.
  """
  dim = head_dim or config.head_size
  base = config.rope_theta if theta is None else theta
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  scaling = config.rope_scaling or {}
  rope_type = config.rope_type
  if rope_type == "default":
    return inv_freq, 1.0
  factor = float(scaling["factor"])
  if rope_type == "linear":
    return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
  # YaRN.
  original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    get = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    if mscale and mscale_all_dim:
      attention_factor = get(factor, mscale) / get(factor, mscale_all_dim)
    else:
      attention_factor = get(factor)
  beta_fast = scaling.get("beta_fast") or 32
  beta_slow = scaling.get("beta_slow") or 1
  corr = lambda rotations: dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
  low, high = corr(beta_fast), corr(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = (1 - ramp).astype(np.float32)
  interpolated = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
  inv_freq = interpolated * (1 - extrapolation) + inv_freq * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray, attention_factor: float,
                 dtype) -> tuple[Array, Array]:
  """cos, sin of shape [B, T, D] (half-split layout), angles in f32, cast to `dtype`."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, D]
  cos = jnp.cos(emb) * attention_factor
  sin = jnp.sin(emb) * attention_factor
  return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x [B, T, heads, D] by cos/sin [B, T, D] ("NeoX" half-split layout):
  x * cos + rotate_half(x) * sin, written per half: XLA:CPU made rotate_half's slices, negation
  and concatenate into separate loops that each wrote their result, and that form alone took
  1.4-3.3x as long. The same values, bit for bit."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c[..., :half] + -x2 * s[..., :half],
                          x2 * c[..., half:] + x1 * s[..., half:]], axis=-1)


# ----------------------------------------------------------------------------- MLP

class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases. Also the shared expert of Qwen2-MoE."""
  config: Qwen2Config
  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    pdt, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
    init = weight_init(cfg)
    H, F = x.shape[-1], self.width
    gate_up = packed_kernel(self, "gate_up_proj", 2 * F)
    if gate_up is None:
      gate = kernel_param(self, "gate_proj", init, (H, F), ("embed", "mlp"), pdt)
      up = kernel_param(self, "up_proj", init, (H, F), ("embed", "mlp"), pdt)
    down = kernel_param(self, "down_proj", init, (F, H), ("mlp", "embed"), pdt)
    if gate_up is None:
      # Names for the remat policies (`qwen2_jax.remat`).
      g = checkpoint_name(matmul(x, gate, dt), "mlpwi_0")  # [B, T, F]
      u = checkpoint_name(matmul(x, up, dt), "mlpwi_1")    # [B, T, F]
      h = jax.nn.silu(g) * u
    elif cpu_matmul.swiglu_fusable(gate_up.panels, gate_up.n):
      if (isinstance(down, PackedKernel) and down.panels.dtype == jnp.bfloat16
          and dt == jnp.float32):
        # The engines' whole-MLP bf16x3 kernel: the SwiGLU tiles go straight into the down
        # projection's bf16 parts (the same bits as the two calls below).
        return checkpoint_name(cpu_matmul.packed_mlp(x.astype(jnp.float32), gate_up.panels,
                                                     down.panels, F, down.n), "mlpwo")
      # The engines' fused bf16x3 kernel: SwiGLU applied in the kernel, tile by tile.
      h = cpu_matmul.packed_swiglu(x.astype(jnp.float32), gate_up.panels, gate_up.n).astype(dt)
    else:  # the engines' fused packed kernel
      g, u = jnp.split(matmul(x, gate_up, dt), 2, axis=-1)
      h = jax.nn.silu(g) * u
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return checkpoint_name(matmul(h, down, dt), "mlpwo")
