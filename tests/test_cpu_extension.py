"""The CPU kernels' builds (`qwen2_jax.kernels.cpu_extension`): each kernel is compiled for
AVX-512, AVX2 + FMA and baseline x86-64, and a process runs one of them; the bf16x3 matmul runs
on AMX tiles or a portable loop. The kernel tests run in the widest build in the main suite;
here they run again in processes that pick the AVX2 and the generic build with
QWEN2_JAX_CPU_ISA, and on a CPU with AMX the AVX-512 build without it, so every build is checked
against its reference on this CPU, not only on a CPU that has no wider one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2_jax.kernels import cpu_extension
from test_cpu_matmul import _cpu_flags

needs_extension = pytest.mark.skipif(
    not cpu_extension.available(),
    reason="qwen2_jax._cpu_kernels is not built here (test_cpu_matmul checks it is on x86-64)")

ROOT = Path(__file__).resolve().parents[1]
# The tests of the three kernels and of their use by the sampler; the first one checks that the
# process runs the build asked for.
KERNEL_TESTS = [
    "tests/test_cpu_matmul.py::test_extension_is_built_and_picks_this_cpus_kernel",
    "tests/test_cpu_matmul.py::test_packed_matmul_equals_the_float64_product",
    "tests/test_cpu_matmul.py::test_empty_inputs",
    "tests/test_cpu_matmul.py::test_leading_axes_and_pack_round_trip",
    "tests/test_cpu_matmul.py::test_bf16x3_matmul_equals_its_reference",
    "tests/test_cpu_matmul.py::test_bf16x3_pack_round_trip_and_leading_axes",
    "tests/test_cpu_matmul.py::test_bf16x3_swiglu_equals_its_reference",
    "tests/test_ragged_paged_attention.py::test_cpu_kernel_matches_reference",
    "tests/test_ragged_paged_attention.py::test_cpu_kernel_window_edge_values",
    "tests/test_ragged_paged_attention.py::test_cpu_kernel_refuses_bad_inputs",
    "tests/test_cpu_logits.py",
]


@needs_extension
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_build_passes_the_kernel_tests(isa):
  """The kernel tests pass in a process running the `isa` build (every test of the list runs:
  none is skipped, none is deselected)."""
  if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
    pytest.skip("this CPU has no AVX2 + FMA")
  if isa == "avx512" and not {"amx_tile", "amx_bf16"} <= _cpu_flags():
    pytest.skip("the main suite runs the AVX-512 build (this CPU has no AMX to turn off)")
  env = dict(os.environ, QWEN2_JAX_CPU_ISA=isa, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-m", "", "-rs", *KERNEL_TESTS], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert re.fullmatch(r"\d+ passed in .*", summary.strip("= ")), summary  # only passes


def test_unknown_isa_name_is_a_named_error(monkeypatch):
  """A QWEN2_JAX_CPU_ISA that names no build is a one-line error naming the variable, raised
  when the extension is first loaded (before any kernel runs); the three names are accepted."""
  monkeypatch.setenv("QWEN2_JAX_CPU_ISA", "avx10")
  with pytest.raises(cpu_extension.IsaChoiceError, match="QWEN2_JAX_CPU_ISA='avx10'"):
    cpu_extension.check_isa_variable()
  for name in cpu_extension.ISAS:
    monkeypatch.setenv("QWEN2_JAX_CPU_ISA", name)
    cpu_extension.check_isa_variable()
  env = dict(os.environ, QWEN2_JAX_CPU_ISA="avx10", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "from qwen2_jax.kernels import cpu_extension\n"
                         "cpu_extension.available()"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode != 0 and "IsaChoiceError: QWEN2_JAX_CPU_ISA='avx10'" in proc.stderr
