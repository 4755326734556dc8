"""The compiled CPU kernels, `qwen2_jax._cpu_kernels` (setup.py builds it on x86-64): XLA FFI
custom calls for the generation engines, registered with jax on first use.

- `cpu_matmul.cc`: the prepacked fp32 matmul (`cpu_matmul.packed_matmul`), and its bf16x3
  variant on AMX tiles (`cpu_matmul.pack_bf16x3`), with SwiGLU fused (`packed_swiglu`) and as
  a whole SwiGLU MLP (`packed_mlp`);
- `cpu_attention.cc`: ragged paged attention over fp32 pools
  (`ragged_paged_attention.ragged_paged_attention_cpu`);
- `cpu_logits.cc`: the sampler's per-row argmax / max / sum of exp (`cpu_logits.row_stats`).

`module()` is None where the extension is not built (a source tree without `setup.py build_ext`,
no C++ compiler, another architecture); callers then keep XLA's own ops.

Each kernel is compiled for AVX-512 (F/VL/BW/DQ), AVX2 + FMA and baseline x86-64, and runs the
widest build this CPU has. `QWEN2_JAX_CPU_ISA` ("amx", "avx512", "avx2", "generic"), read once
per process, picks a narrower one (the tests run every build on one CPU that way); a build this
CPU cannot run is never picked. `module().isa()` names the build in use. The bf16x3 matmul uses
AMX tiles where `module().amx()` (the CPU has AMX-BF16, the OS grants the tile state, and the
variable is unset or "amx"), else a slow portable loop.

The kernels split their work between the calling thread and tasks of XLA's intra-op pool. A
pool thread that has done its share waits (spinning) up to `QWEN2_JAX_CPU_LINGER_US`
microseconds (default 200; 0 to 1000000, read once per process) for the kernels' next parallel
loop and joins it directly: waking a parked pool thread took about 35 us per loop on a 2-vCPU
VM, about 4% of a decode step. A waiting thread is busy (XLA's own pool tasks can start up to
that much later); set it to 0 where other processes need the cores more than the engine does.
`module().loop_stats()` counts the loops and those a lingering thread joined.
"""

from __future__ import annotations

import functools
import os

import jax

from qwen2_jax.errors import UserError

MATMUL_TARGET = "qwen2_jax_packed_matmul"
MATMUL_BF16X3_TARGET = "qwen2_jax_packed_matmul_bf16x3"
SWIGLU_BF16X3_TARGET = "qwen2_jax_packed_swiglu_bf16x3"
MLP_BF16X3_TARGET = "qwen2_jax_packed_mlp_bf16x3"
ATTENTION_TARGET = "qwen2_jax_paged_attention"
LOGITS_TARGET = "qwen2_jax_logit_row_stats"
ISA_VARIABLE = "QWEN2_JAX_CPU_ISA"
LINGER_VARIABLE = "QWEN2_JAX_CPU_LINGER_US"
ISAS = ("amx", "avx512", "avx2", "generic")


class IsaChoiceError(UserError, ValueError):
  """QWEN2_JAX_CPU_ISA names no build of the kernels."""


class LingerChoiceError(UserError, ValueError):
  """QWEN2_JAX_CPU_LINGER_US is not a whole number of microseconds in [0, 1000000]."""


@functools.cache
def module():
  """The extension module with its targets registered for the CPU platform, or None."""
  check_isa_variable()
  check_linger_variable()
  try:
    from qwen2_jax import _cpu_kernels
  except ImportError:
    return None
  jax.ffi.register_ffi_target(MATMUL_TARGET, _cpu_kernels.matmul_handler(), platform="cpu")
  jax.ffi.register_ffi_target(MATMUL_BF16X3_TARGET, _cpu_kernels.matmul_bf16x3_handler(),
                              platform="cpu")
  jax.ffi.register_ffi_target(SWIGLU_BF16X3_TARGET, _cpu_kernels.swiglu_bf16x3_handler(),
                              platform="cpu")
  jax.ffi.register_ffi_target(MLP_BF16X3_TARGET, _cpu_kernels.mlp_bf16x3_handler(),
                              platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_TARGET, _cpu_kernels.attention_handler(), platform="cpu")
  jax.ffi.register_ffi_target(LOGITS_TARGET, _cpu_kernels.logits_handler(), platform="cpu")
  _cpu_kernels.linger_us()  # the kernels read QWEN2_JAX_CPU_LINGER_US once: now, as checked
  return _cpu_kernels


def check_isa_variable() -> None:
  """Raises IsaChoiceError if QWEN2_JAX_CPU_ISA is set to no build's name."""
  want = os.environ.get(ISA_VARIABLE)
  if want is not None and want not in ISAS:
    raise IsaChoiceError(f"{ISA_VARIABLE}={want!r}: must be one of {', '.join(ISAS)}")


def check_linger_variable() -> None:
  """Raises LingerChoiceError if QWEN2_JAX_CPU_LINGER_US is set to anything but a whole number
  of microseconds in [0, 1000000] (the kernels would otherwise fall back to the default)."""
  want = os.environ.get(LINGER_VARIABLE)
  if want is None or want == "":
    return
  if not (len(want) <= 7 and want.isascii() and want.isdigit() and int(want) <= 1_000_000):
    raise LingerChoiceError(f"{LINGER_VARIABLE}={want!r}: must be a whole number of "
                            "microseconds from 0 to 1000000 (0: helper threads do not wait)")


def available() -> bool:
  """Whether the extension is built."""
  return module() is not None


def runs_here() -> bool:
  """Whether a program traced now can call the kernels: the extension is built, and the program
  lowers for the CPU backend without a mesh (sharded programs keep XLA's ops)."""
  return (available() and jax.default_backend() == "cpu"
          and jax.sharding.get_abstract_mesh().empty)


def missing(what: str) -> RuntimeError:
  """The error of a kernel called where the extension is not built."""
  return RuntimeError(f"{what}: the qwen2_jax._cpu_kernels extension is not built "
                      "(pip install . builds it on x86-64; it needs a C++17 compiler)")
