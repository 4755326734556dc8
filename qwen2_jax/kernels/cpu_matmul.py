"""Prepacked fp32 matmul for XLA:CPU: a C++ XLA FFI custom call (`cpu_matmul.cc`), for inference.

XLA:CPU's dot back ends repack the weight on every call; for the few-row matmuls of a decode
step that repacking costs more than the arithmetic. Here the weight [K, N] is packed once, at
engine build, into panels [ceil(N / NR), K, NR] of NR output columns (zero-padded at the end),
and the kernel streams them: AVX-512 (NR 32) or AVX2+FMA (NR 16) register kernels chosen at run
time, split over panels with XLA's intra-op threads.

`pack` / `unpack` convert kernels, `packed_matmul` multiplies, `packed_matmul_reference` is the
plain jnp oracle. `available()` says whether the extension is built (setup.py builds it on
x86-64); `panel_width()` is 0 where it is not or the CPU has neither instruction set; callers
then keep XLA's dots. No gradient: generation only.

A second, opt-in packing runs the products on the AMX tile unit of Intel CPUs since Sapphire
Rapids, in three bf16 passes accumulated in fp32 (x_hi W_hi + x_lo W_hi + x_hi W_lo, with
v_hi = bf16(v), v_lo = bf16(v - v_hi): lax.DotAlgorithmPreset.BF16_BF16_F32_X3, what
lax.Precision.HIGH means on TPU). `pack_bf16x3` stores W's two parts as AMX tiles,
[ceil(N / 16), ceil(K / 32), 2, 512] bf16: 4 bytes per weight, as fp32. Each product keeps
about 16 of fp32's 24 significand bits (relative error ~1e-5 against ~1e-7). `amx()` says
whether the tiles run here; elsewhere the same products run in a slow portable loop.
`packed_matmul` takes either packing; `packed_matmul_bf16x3_reference` is the jnp oracle of the
bf16x3 products. `packed_swiglu` multiplies by a bf16x3 packing of [W_gate | W_up] and returns
silu(x W_gate) * (x W_up), computed as each tile of products is done, so the [..., 2F] product
never goes to memory (`packed_swiglu_reference` is its oracle). `packed_mlp` runs a whole SwiGLU
MLP, down(silu(x W_gate) * (x W_up)), as one call: its SwiGLU tiles are stored straight as the
bf16 parts that the down products read, so the [..., F] activations are neither stored in fp32
nor split again (the same bits as `packed_swiglu` then `packed_matmul`; `packed_mlp_reference`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.kernels import cpu_extension

Array = jax.Array


def available() -> bool:
  """Whether the extension is built (then `packed_matmul` runs, with any panel width)."""
  return cpu_extension.available()


def panel_width() -> int:
  """Columns per panel of this CPU's register kernel: 32 (AVX-512), 16 (AVX2+FMA), or 0 when
  the extension is missing or the CPU has neither (then nothing should be packed)."""
  module = cpu_extension.module()
  return 0 if module is None else int(module.panel_width())


def amx() -> bool:
  """Whether `pack_bf16x3` kernels multiply on AMX tiles here (the extension is built, the CPU
  has AMX-BF16, the OS grants the tile state, QWEN2_JAX_CPU_ISA is unset or "amx")."""
  module = cpu_extension.module()
  return module is not None and bool(module.amx())


def pack(kernel, nr: int):
  """[K, N] -> [ceil(N / nr), K, nr], zero-padded; numpy in, numpy out (jax in, jax out)."""
  xp = np if isinstance(kernel, np.ndarray) else jnp
  k, n = kernel.shape
  panels = -(-n // nr)
  padded = xp.pad(kernel, ((0, 0), (0, panels * nr - n)))
  return xp.transpose(padded.reshape(k, panels, nr), (1, 0, 2))


def unpack(packed, n: int):
  """[P, K, nr] -> [K, n]: the inverse of `pack` for a kernel of n output columns."""
  xp = np if isinstance(packed, np.ndarray) else jnp
  p, k, nr = packed.shape
  return xp.transpose(packed, (1, 0, 2)).reshape(k, p * nr)[:, :n]


def _split_bf16(v):
  """fp32 v -> (hi, lo) bf16 with v = hi + lo + O(2^-17 |v|) (round to nearest even)."""
  xp = np if isinstance(v, np.ndarray) else jnp
  hi = v.astype(jnp.bfloat16)
  return hi, (v - hi.astype(xp.float32)).astype(jnp.bfloat16)


def pack_bf16x3(kernel):
  """fp32 [K, N] -> [ceil(N / 16), ceil(K / 32), 2, 512] bf16: per 16-column panel and 32-row
  k-block, the hi then the lo part as a 16 x 32 AMX tile in VNNI order (k pairs of one column
  adjacent), zero-padded. numpy in, numpy out (jax in, jax out)."""
  xp = np if isinstance(kernel, np.ndarray) else jnp
  k, n = kernel.shape
  kb, p = -(-k // 32), -(-n // 16)
  padded = xp.pad(xp.asarray(kernel, xp.float32), ((0, kb * 32 - k), (0, p * 16 - n)))
  def tiles(part):  # [kb*32, p*16] -> [p, kb, 512]: (pair, column, parity) within a tile
    t = part.reshape(kb, 16, 2, p, 16)
    return xp.transpose(t, (3, 0, 1, 4, 2)).reshape(p, kb, 512)
  hi, lo = _split_bf16(padded)
  return xp.stack([tiles(hi), tiles(lo)], axis=2)


def unpack_bf16x3(packed, k: int, n: int):
  """[P, Kb, 2, 512] bf16 -> the fp32 [k, n] kernel hi + lo (the weight to about 2^-17)."""
  xp = np if isinstance(packed, np.ndarray) else jnp
  p, kb = packed.shape[:2]
  def matrix(t):  # [p, kb, 512] -> [kb*32, p*16]
    t = xp.transpose(t.reshape(p, kb, 16, 16, 2), (1, 2, 4, 0, 3))
    return t.reshape(kb * 32, p * 16)[:k, :n].astype(xp.float32)
  return matrix(packed[:, :, 0]) + matrix(packed[:, :, 1])


def packed_matmul(x: Array, packed: Array, n: int) -> Array:
  """x [..., K] @ W [K, n] with W given as `pack(W, nr)` (fp32 products) or `pack_bf16x3(W)`
  (bf16x3 products); x fp32, on the CPU backend only."""
  if not cpu_extension.available():
    raise cpu_extension.missing("packed_matmul")
  if packed.dtype == jnp.bfloat16:
    p, kb = packed.shape[:2]
    k = x.shape[-1]
    if x.dtype != jnp.float32:
      raise TypeError(f"packed_matmul: x must be float32, got {x.dtype}")
    if packed.shape[2:] != (2, 512) or kb != -(-k // 32) or p != -(-n // 16):
      raise ValueError(f"packed_matmul: x {x.shape} and bf16x3 tiles {packed.shape} do not "
                       f"make [..., {n}]")
    out = jax.ShapeDtypeStruct((*x.shape[:-1], n), jnp.float32)
    return jax.ffi.ffi_call(cpu_extension.MATMUL_BF16X3_TARGET, out)(x, packed)
  if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
    raise TypeError(f"packed_matmul: float32 only, got x {x.dtype}, packed {packed.dtype}")
  p, k, nr = packed.shape
  if x.shape[-1] != k or not (p - 1) * nr < n <= p * nr:
    raise ValueError(f"packed_matmul: x {x.shape} and packed {packed.shape} do not make "
                     f"[..., {n}]")
  out = jax.ShapeDtypeStruct((*x.shape[:-1], n), jnp.float32)
  return jax.ffi.ffi_call(cpu_extension.MATMUL_TARGET, out)(x, packed)


def swiglu_fusable(packed: Array, n: int) -> bool:
  """Whether `packed_swiglu` takes this packing of [W_gate | W_up] (n = 2F columns): bf16x3
  tiles and F a multiple of 32."""
  return packed.dtype == jnp.bfloat16 and n % 64 == 0


def packed_swiglu(x: Array, packed: Array, n: int) -> Array:
  """silu(x @ W_gate) * (x @ W_up) [..., n / 2] for packed = `pack_bf16x3([W_gate | W_up])`
  (n = 2F columns, F % 32 == 0); x fp32, on the CPU backend only. The bf16x3 products as
  `packed_matmul`; silu(g) = g / (1 + exp(-g)) with exp to ~2e-7 relative."""
  if not cpu_extension.available():
    raise cpu_extension.missing("packed_swiglu")
  if x.dtype != jnp.float32:
    raise TypeError(f"packed_swiglu: x must be float32, got {x.dtype}")
  if not swiglu_fusable(packed, n):
    raise ValueError(f"packed_swiglu: bf16x3 tiles of [W_gate | W_up] with n % 64 == 0 only, "
                     f"got {packed.dtype} tiles and n={n}")
  p, kb = packed.shape[:2]
  if packed.shape[2:] != (2, 512) or kb != -(-x.shape[-1] // 32) or p != n // 16:
    raise ValueError(f"packed_swiglu: x {x.shape} and bf16x3 tiles {packed.shape} do not make "
                     f"[..., {n}]")
  out = jax.ShapeDtypeStruct((*x.shape[:-1], n // 2), jnp.float32)
  return jax.ffi.ffi_call(cpu_extension.SWIGLU_BF16X3_TARGET, out)(x, packed)


def packed_mlp(x: Array, gate_up: Array, down: Array, f: int, n: int) -> Array:
  """down(silu(x @ W_gate) * (x @ W_up)) [..., n] for gate_up = `pack_bf16x3([W_gate | W_up])`
  (f columns each, f % 32 == 0) and down = `pack_bf16x3(W_down)` (W_down [f, n]); x fp32, on
  the CPU backend only. The same bits as `packed_matmul(packed_swiglu(x, gate_up, 2f), down, n)`
  in one call."""
  if not cpu_extension.available():
    raise cpu_extension.missing("packed_mlp")
  if x.dtype != jnp.float32:
    raise TypeError(f"packed_mlp: x must be float32, got {x.dtype}")
  if not (swiglu_fusable(gate_up, 2 * f) and down.dtype == jnp.bfloat16):
    raise ValueError(f"packed_mlp: bf16x3 tiles with f % 32 == 0 only, got {gate_up.dtype} "
                     f"{gate_up.shape} and {down.dtype} {down.shape} tiles, f={f}")
  if (gate_up.shape != (2 * f // 16, -(-x.shape[-1] // 32), 2, 512)
      or down.shape != (-(-n // 16), f // 32, 2, 512)):
    raise ValueError(f"packed_mlp: x {x.shape}, gate_up tiles {gate_up.shape} and down tiles "
                     f"{down.shape} do not make [..., {n}] through f={f}")
  out = jax.ShapeDtypeStruct((*x.shape[:-1], n), jnp.float32)
  return jax.ffi.ffi_call(cpu_extension.MLP_BF16X3_TARGET, out)(x, gate_up, down)


def packed_mlp_reference(x: Array, gate_up: Array, down: Array, f: int, n: int) -> Array:
  """The oracle of `packed_mlp`: `packed_swiglu_reference`, then the bf16x3 reference product."""
  return packed_matmul_bf16x3_reference(packed_swiglu_reference(x, gate_up, 2 * f), down, n)


def packed_swiglu_reference(x: Array, packed: Array, n: int) -> Array:
  """The oracle of `packed_swiglu`: the bf16x3 reference product, then jax.nn.silu(g) * u."""
  g, u = jnp.split(packed_matmul_bf16x3_reference(x, packed, n), 2, axis=-1)
  return jax.nn.silu(g) * u


def packed_matmul_reference(x: Array, packed: Array, n: int) -> Array:
  """The oracle: unpack and multiply with XLA's dot at full fp32 precision."""
  return jnp.matmul(x, unpack(packed, n), precision=jax.lax.Precision.HIGHEST)


def packed_matmul_bf16x3_reference(x: Array, packed: Array, n: int) -> Array:
  """The oracle of the bf16x3 products: the three fp32 matmuls of the bf16 parts (each product
  of two bf16 values is exact in fp32)."""
  k = x.shape[-1]
  w_hi = unpack_bf16x3(packed.at[:, :, 1].set(0), k, n)
  w_lo = unpack_bf16x3(packed.at[:, :, 0].set(0), k, n)
  x_hi, x_lo = (part.astype(jnp.float32) for part in _split_bf16(x))
  dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  return dot(x_hi, w_hi) + dot(x_lo, w_hi) + dot(x_hi, w_lo)
