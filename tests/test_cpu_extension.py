"""The CPU kernels' builds (`qwen2_jax.kernels.cpu_extension`): each kernel is compiled for
AVX-512, AVX2 + FMA and baseline x86-64, and a process runs one of them; the bf16x3 matmul runs
on AMX tiles or a portable loop. The kernel tests run in the widest build in the main suite;
here they run again in processes that pick the AVX2 and the generic build with
QWEN2_JAX_CPU_ISA, and on a CPU with AMX the AVX-512 build without it, so every build is checked
against its reference on this CPU, not only on a CPU that has no wider one."""

from __future__ import annotations

import json
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
    "tests/test_cpu_matmul.py::test_bf16x3_mlp_is_swiglu_then_down_bit_for_bit",
    "tests/test_cpu_matmul.py::test_bf16x3_mlp_refuses_mismatched_tiles",
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


def test_linger_variable_is_checked(monkeypatch):
  """QWEN2_JAX_CPU_LINGER_US must be a whole number of microseconds in [0, 1000000]: anything
  else is a one-line error naming the variable, raised when the extension is first loaded."""
  for bad in ("-1", "1e3", "200us", "1000001", " 5"):
    monkeypatch.setenv(cpu_extension.LINGER_VARIABLE, bad)
    with pytest.raises(cpu_extension.LingerChoiceError,
                       match=re.escape(f"QWEN2_JAX_CPU_LINGER_US={bad!r}")):
      cpu_extension.check_linger_variable()
  for good in ("0", "200", "1000000", ""):
    monkeypatch.setenv(cpu_extension.LINGER_VARIABLE, good)
    cpu_extension.check_linger_variable()
  env = dict(os.environ, QWEN2_JAX_CPU_LINGER_US="fast", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "from qwen2_jax.kernels import cpu_extension\n"
                         "cpu_extension.available()"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert "LingerChoiceError: QWEN2_JAX_CPU_LINGER_US='fast'" in proc.stderr


# A decode-like chain: few-row bf16x3 calls back to back (each split into several tasks), at 3
# row counts; then the same program from two Python threads at once (two loops posting to the
# lingering helpers together). Prints the outputs' hashes and the loop counters as JSON.
_LINGER_PROBE = r"""
import hashlib, json, threading
import jax, numpy as np
from qwen2_jax.kernels import cpu_extension, cpu_matmul
rng = np.random.default_rng(0)
dims = [256, 640, 256, 1536, 768, 256]
packs = [cpu_matmul.pack_bf16x3(rng.standard_normal((k, n), np.float32) / np.sqrt(k))
         for k, n in zip(dims, dims[1:])]

@jax.jit
def chain(x, packs):
  for _ in range(4):
    for p, n in zip(packs, dims[1:]):
      x = cpu_matmul.packed_matmul(x, p, n)
  return x

def digest(a):
  return hashlib.sha256(np.asarray(a).tobytes()).hexdigest()

xs = {m: rng.standard_normal((m, dims[0]), np.float32) for m in (4, 16, 80)}
alone = {m: digest(chain(x, packs)) for m, x in xs.items()}
together = {}
def worker(m):
  together[m] = {digest(chain(xs[m], packs)) for _ in range(6)}
threads = [threading.Thread(target=worker, args=(m,)) for m in (4, 16)]
for t in threads: t.start()
for t in threads: t.join()
kernels = cpu_extension.module()
loops, handed = kernels.loop_stats()
print(json.dumps({"alone": alone, "together": {m: sorted(v) for m, v in together.items()},
                  "loops": loops, "handed": handed, "linger_us": kernels.linger_us()}))
"""


@needs_extension
def test_lingering_helpers_join_loops_and_change_no_bits():
  """With helper threads lingering (the default, 200 us) a chain of few-row matmul calls hands
  loops to a waiting helper, and without (QWEN2_JAX_CPU_LINGER_US=0) none is handed; the outputs
  are the same bits either way, and the same when two threads run the chain at once."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("one CPU: XLA's pool has no second thread to help")
  runs = {}
  for linger in (None, "0"):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(cpu_extension.LINGER_VARIABLE, None)
    if linger is not None:
      env[cpu_extension.LINGER_VARIABLE] = linger
    proc = subprocess.run([sys.executable, "-c", _LINGER_PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[linger] = json.loads(proc.stdout.strip().splitlines()[-1])
  on, off = runs[None], runs["0"]
  assert on["linger_us"] == 200 and off["linger_us"] == 0
  assert on["loops"] > 0 and off["loops"] > 0
  assert on["handed"] > 0, on
  assert off["handed"] == 0, off
  assert on["alone"] == off["alone"]
  for run in (on, off):
    for m, hashes in run["together"].items():
      assert hashes == [run["alone"][m]], (m, hashes)
