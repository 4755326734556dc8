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
"""

from __future__ import annotations

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


def packed_matmul(x: Array, packed: Array, n: int) -> Array:
  """x [..., K] @ W [K, n] with W given as `pack(W, nr)`; fp32 on the CPU backend only."""
  if not cpu_extension.available():
    raise cpu_extension.missing("packed_matmul")
  if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
    raise TypeError(f"packed_matmul: float32 only, got x {x.dtype}, packed {packed.dtype}")
  p, k, nr = packed.shape
  if x.shape[-1] != k or not (p - 1) * nr < n <= p * nr:
    raise ValueError(f"packed_matmul: x {x.shape} and packed {packed.shape} do not make "
                     f"[..., {n}]")
  out = jax.ShapeDtypeStruct((*x.shape[:-1], n), jnp.float32)
  return jax.ffi.ffi_call(cpu_extension.MATMUL_TARGET, out)(x, packed)


def packed_matmul_reference(x: Array, packed: Array, n: int) -> Array:
  """The oracle: unpack and multiply with XLA's dot at full fp32 precision."""
  return jnp.matmul(x, unpack(packed, n), precision=jax.lax.Precision.HIGHEST)
