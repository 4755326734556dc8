"""Builds the CPU kernels (`qwen2_jax._cpu_kernels`) with another C++ compiler and runs the kernel
tests against that build, once per instruction set (QWEN2_JAX_CPU_ISA amx, avx512, avx2, generic;
those this CPU lacks are reported as not run). The installed extension is left alone: the build
goes to a temporary directory and the tests import it in its place. Other arguments go to
pytest (e.g. -x).

  python scripts/check_cpu_kernels.py --cxx clang++
  python scripts/check_cpu_kernels.py --cxx "python -m ziglang c++" \\
      --flags="-target x86_64-linux-gnu.2.31"     # Clang from the ziglang wheel
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every .cc of the kernels directory, as setup.py's CPU_KERNEL_SOURCES.
SOURCES = sorted((ROOT / "qwen2_jax" / "kernels").glob("*.cc"))
sys.path.insert(0, str(ROOT / "tests"))


def _kernel_tests() -> list[str]:
  from test_cpu_extension import KERNEL_TESTS  # pylint: disable=import-outside-toplevel
  return KERNEL_TESTS


def build(cxx: str, flags: str, out: Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  cmd = [*shlex.split(cxx), "-O3", "-std=c++17", "-shared", "-fPIC", "-Wall",
         *shlex.split(flags), "-isystem", jax.ffi.include_dir(),
         "-I", sysconfig.get_paths()["include"],
         *map(str, SOURCES), "-o", str(out)]
  print("+", shlex.join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def run_tests(so: str, pytest_args: list[str]) -> int:
  """In this process: `so` imported as qwen2_jax._cpu_kernels, then pytest; 3 where the build
  running is not the one QWEN2_JAX_CPU_ISA asks for (this CPU lacks it)."""
  loader = importlib.machinery.ExtensionFileLoader("qwen2_jax._cpu_kernels", so)
  spec = importlib.util.spec_from_file_location("qwen2_jax._cpu_kernels", so, loader=loader)
  mod = importlib.util.module_from_spec(spec)
  loader.exec_module(mod)
  import qwen2_jax  # pylint: disable=import-outside-toplevel
  sys.modules["qwen2_jax._cpu_kernels"] = mod
  qwen2_jax._cpu_kernels = mod  # pylint: disable=protected-access
  from qwen2_jax.kernels import cpu_extension  # pylint: disable=import-outside-toplevel
  if cpu_extension.module() is not mod:
    raise SystemExit("the build under test was not the one imported")
  running = "amx" if mod.amx() else mod.isa()
  print(f"{so}: {running} build", flush=True)
  if running != os.environ.get("QWEN2_JAX_CPU_ISA", running):
    print(f"this CPU cannot run the {os.environ['QWEN2_JAX_CPU_ISA']} build", flush=True)
    return 3
  import pytest  # pylint: disable=import-outside-toplevel
  return pytest.main(["-q", "-p", "no:cacheprovider", "-m", "", *pytest_args])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--cxx", default="clang++", help="compiler command")
  parser.add_argument("--flags", default="", help="extra compiler flags")
  parser.add_argument("--so", help=argparse.SUPPRESS)  # the per-ISA test process
  args, rest = parser.parse_known_args()
  if args.so:
    return run_tests(args.so, rest)
  failed, passed, absent = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    so = Path(tmp) / ("_cpu_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    build(args.cxx, args.flags, so)
    for isa in ("amx", "avx512", "avx2", "generic"):
      env = dict(os.environ, QWEN2_JAX_CPU_ISA=isa, JAX_PLATFORMS="cpu")
      code = subprocess.run([sys.executable, __file__, "--so", str(so), *_kernel_tests(),
                             *rest], cwd=ROOT, env=env, check=False).returncode
      (passed if code == 0 else absent if code == 3 else failed).append(isa)
  print(f"passed: {', '.join(passed) or 'none'}; failed: {', '.join(failed) or 'none'}; "
        f"not run (this CPU lacks them): {', '.join(absent) or 'none'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
