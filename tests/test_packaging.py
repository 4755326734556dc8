"""What a user installs: the built wheel, installed non-editable into a fresh virtualenv.

Every other test imports the editable install, which maps `qwen2_jax` onto the source tree and so
hides a package that `setup.py` leaves out of the wheel. Here the wheel is built from a copy of
the source tree and installed into a new virtualenv that sees neither the repository nor the
editable install. Its dependencies are not downloaded: the distributions that the wheel's
`Requires-Dist` needs, transitively, are linked in from the test environment's site-packages,
and nothing else, so an import of an undeclared dependency fails here as it would for a user.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow   # ~1-2 minutes on the 2-core CPU: wheel, venv, ~20 CLI processes

REPO = Path(__file__).resolve().parents[1]
# Import name -> source folder: the product layout that setup.py's package_dir installs.
PACKAGE_DIR = {"qwen2_jax": "qwen2_jax", "qwen2_jax.train": "train", "qwen2_jax.infer": "infer"}
# Not copied into the build: environments, outputs, caches, earlier build products.
COPY_IGNORE = shutil.ignore_patterns(".venv*", ".git", "out", "runs", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", "*.pyc", "*.so")

# Run by the venv's python: imports every module of the installed package (recursively, as
# pkgutil.walk_packages does, but recording any exception instead of stopping) and lists every
# subcommand path of the CLI parser. Writes JSON to argv[1].
PROBE = r"""
import argparse, importlib, json, pkgutil, sys, traceback
modules, errors, commands = [], {}, []
def walk(pkg):
  for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
    if info.name.endswith(".__main__"):   # `python -m qwen2_jax`: runs the CLI on import
      continue
    try:
      mod = importlib.import_module(info.name)
    except BaseException:
      errors[info.name] = traceback.format_exc(limit=-3)
      continue
    modules.append(info.name)
    if info.ispkg:
      walk(mod)
def subcommands(parser, path):
  yield path
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield from subcommands(sub, path + [name])
try:
  import qwen2_jax
  modules.append("qwen2_jax")
  walk(qwen2_jax)
  from qwen2_jax.cli import build_parser
  commands = list(subcommands(build_parser(), []))
except BaseException:
  errors["qwen2_jax"] = traceback.format_exc(limit=-3)
json.dump({"file": getattr(sys.modules.get("qwen2_jax"), "__file__", None), "modules": modules,
           "errors": errors, "commands": commands}, open(sys.argv[1], "w"))
"""


def _source_modules() -> set[str]:
  """Module names of every .py file under the package folders (`__main__` included)."""
  names = set()
  for package, folder in PACKAGE_DIR.items():
    for path in (REPO / folder).rglob("*.py"):
      parts = path.relative_to(REPO / folder).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      names.add(".".join((package, *parts)))
  return names


def _wheel_modules(wheel: Path) -> set[str]:
  """Python modules and compiled extensions (`name.cpython-312-...so`) in the wheel."""
  with zipfile.ZipFile(wheel) as z:
    files = [n for n in z.namelist() if n.endswith(".py")]
    extensions = [n for n in z.namelist() if n.endswith(".so")]
  return ({n[:-len(".py")].removesuffix("/__init__").replace("/", ".") for n in files}
          | {n.split(".", 1)[0].replace("/", ".") for n in extensions})


def _wheel_metadata(wheel: Path, field: str) -> list[str]:
  """Values of one METADATA field of the wheel, e.g. Requires-Dist or Provides-Extra."""
  with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
  return [line.split(":", 1)[1].strip() for line in lines if line.startswith(f"{field}:")]


def _wheel_requirements(wheel: Path) -> list[Requirement]:
  return [Requirement(r) for r in _wheel_metadata(wheel, "Requires-Dist")]


def _wheel_sources(wheel: Path) -> dict[str, str]:
  """{path in the wheel: source} of its .py files."""
  with zipfile.ZipFile(wheel) as z:
    return {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}


def _closure(requirements: list[Requirement]):
  """Installed distributions that `requirements` need (markers evaluated, extras followed).

  Returns ({canonical name: Distribution}, [problems: missing or wrong-version requirements]).
  """
  found, problems, seen = {}, [], set()
  todo = [(r, "") for r in requirements]
  while todo:
    req, extra = todo.pop()
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
      continue
    key = (canonicalize_name(req.name), frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = importlib.metadata.distribution(req.name)
    except importlib.metadata.PackageNotFoundError:
      problems.append(f"{req} is not installed (run scripts/setup_env.sh)")
      continue
    if not req.specifier.contains(dist.version, prereleases=True):
      problems.append(f"{req}: installed {dist.version}")
    found[key[0]] = dist
    todo += [(Requirement(r), e) for r in dist.requires or [] for e in ("", *req.extras)]
  return found, problems


def _run(cmd, *, cwd, env, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def env():
  """Environment of the subprocesses: no PYTHONPATH or user site, CPU JAX."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
  env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")
  return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, env) -> Path:
  """The wheel built from a copy of the source tree."""
  tmp = tmp_path_factory.mktemp("wheel")
  # Build from a copy: in-tree builds leave build/ behind, whose stale files can land in wheels.
  src = tmp / "src"
  shutil.copytree(REPO, src, ignore=COPY_IGNORE)
  # No build isolation: the test environment's setuptools builds, with no download.
  r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
            "-w", tmp / "wheels", src], cwd=tmp, env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  (path,) = (tmp / "wheels").glob("qwen2_jax-*.whl")
  return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel, env):
  """(venv dir, probe report, scratch cwd) for the wheel installed into a fresh virtualenv."""
  tmp = tmp_path_factory.mktemp("venv")
  venv_dir = tmp / "venv"
  r = _run([sys.executable, "-m", "venv", "--without-pip", venv_dir], cwd=tmp, env=env)
  assert r.returncode == 0, r.stderr
  python = venv_dir / "bin" / "python"
  r = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
            "--no-index", wheel], cwd=tmp, env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
              cwd=tmp, env=env).stdout.strip()

  # The declared dependencies, and only those, linked from this environment: offline, and well
  # under a second, where `pip install` would download hundreds of MB (jaxlib, scipy, ...).
  dists, problems = _closure(_wheel_requirements(wheel))
  assert not problems, "\n".join(problems)
  for dist in dists.values():
    assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
    for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
      target = Path(site) / top
      if top.endswith(".pth") or top == "__pycache__" or target.exists():
        continue
      target.symlink_to(dist.locate_file(top))

  cwd = tmp / "cwd"   # anywhere but the repository, which must not be importable
  cwd.mkdir()
  r = _run([python, "-c", PROBE, tmp / "probe.json"], cwd=cwd, env=env)
  assert r.returncode == 0, r.stdout + r.stderr
  return venv_dir, json.loads((tmp / "probe.json").read_text()), cwd


def test_wheel_holds_every_source_module(wheel):
  """Every .py file of qwen2_jax/, train/ and infer/ is in the wheel, under qwen2_jax.*."""
  modules = _wheel_modules(wheel)
  missing = sorted(_source_modules() - modules)
  assert not missing, (f"not in the wheel: {missing} (setup.py's packages; a folder without "
                       "__init__.py is not a package)")
  assert all(m.split(".")[0] == "qwen2_jax" for m in modules), sorted(modules)
  if platform.machine().lower() in ("x86_64", "amd64"):  # built from source by the wheel build
    assert "qwen2_jax._cpu_kernels" in modules, sorted(modules)


def test_installed_wheel_imports_every_module(wheel, venv):
  """The wheel, not the source tree, is imported, and every module in it imports."""
  venv_dir, report, _ = venv
  # The one module that needs an extra at import time (`[data]`: the Beam pipeline, whose DoFns
  # subclass Beam's); `data prepare --recipe` says which extra to install instead of importing it.
  needs_extra = {"qwen2_jax.train.pipeline.beam_prepare": "No module named 'apache_beam'"}
  errors = {k: v for k, v in report["errors"].items()
            if not (k in needs_extra and needs_extra[k] in v)}
  assert not errors, "\n".join(f"{k}:\n{v}" for k, v in errors.items())
  assert Path(report["file"]).resolve().is_relative_to(venv_dir.resolve()), report["file"]
  assert set(report["modules"]) | set(needs_extra) == _wheel_modules(wheel) - {"qwen2_jax.__main__"}


def test_every_third_party_import_is_declared(wheel):
  """Each non-stdlib module the package imports comes from a distribution the wheel requires.

  Imports inside functions are only reached by some commands, so the import test above cannot
  see them: this reads them from the wheel's sources. Declared: a requirement (an extra's too)
  or what the plain requirements pull in.
  """
  requirements = _wheel_requirements(wheel)
  declared = {canonicalize_name(r.name) for r in requirements} | _closure(requirements)[0].keys()
  providers = importlib.metadata.packages_distributions()
  undeclared = {}
  for path, source in _wheel_sources(wheel).items():
    for name in _imported_top_level_names(source):
      if name in sys.stdlib_module_names or name in ("__future__", "qwen2_jax"):
        continue
      if not {canonicalize_name(d) for d in providers.get(name, [])} & declared:
        undeclared.setdefault(name, []).append(path)
  assert not undeclared, f"imported but not in setup.py's requirements: {undeclared}"


def _imported_top_level_names(source: str) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module.split(".")[0])
  return names


def test_console_script_help_for_every_command(venv, env):
  """`qwen2-jax --help` and `--help` of every (sub)command exit 0 from the venv's script."""
  venv_dir, report, cwd = venv
  script = venv_dir / "bin" / "qwen2-jax"
  assert script.exists()
  assert [] in report["commands"] and ["convert", "hf-to-orbax"] in report["commands"]

  def run_help(path):
    return path, _run([script, *path, "--help"], cwd=cwd, env=env, timeout=120)

  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for path, r in pool.map(run_help, report["commands"]):
      assert r.returncode == 0, (path, r.stderr)
      assert r.stdout.startswith(" ".join(["usage: qwen2-jax", *path])), (path, r.stdout[:200])


def test_convert_round_trip_from_the_installed_script(venv, env, tmp_path):
  """HF -> Orbax -> HF of a tiny random checkpoint by the installed CLI is bit-exact."""
  import jax
  import qwen2_jax as q
  from safetensors.numpy import load_file

  venv_dir, _, cwd = venv
  script = venv_dir / "bin" / "qwen2-jax"
  config = q.get_preset("qwen2-tiny")
  q.save_hf_checkpoint(tmp_path / "hf", config, q.init_params(config, jax.random.key(0)))
  for cmd in (["convert", "hf-to-orbax", "--hf", tmp_path / "hf", "--out", tmp_path / "orbax"],
              ["convert", "orbax-to-hf", "--orbax", tmp_path / "orbax", "--out", tmp_path / "hf2"]):
    r = _run([script, *cmd], cwd=cwd, env=env)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)
  before = load_file(str(tmp_path / "hf" / "model.safetensors"))
  after = load_file(str(tmp_path / "hf2" / "model.safetensors"))
  assert before.keys() == after.keys()
  for key, value in before.items():
    assert value.dtype == after[key].dtype and np.array_equal(value, after[key]), key
