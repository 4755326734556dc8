"""User errors through the real command line: one line on stderr naming what to fix, exit 2,
no traceback (unless `--debug`), and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwen2_jax import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"pretrain": "configs/cpu_demo.yaml", "sft": "configs/sft_cpu_demo.yaml",
           "dpo": "configs/dpo_cpu_demo.yaml"}


def cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", QWEN2_JAX_CORPUS="/nonexistent-corpus")
  env.pop("QWEN2_JAX_DEBUG", None)
  return subprocess.run([sys.executable, "-m", "qwen2_jax", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
  """Exit 2; stderr's last line is `qwen2-jax <command>: error: ...` holding every fragment;
  no traceback."""
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f"qwen2-jax {command}: error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  return line


@pytest.mark.parametrize("command", sorted(RECIPES))
@pytest.mark.parametrize("override, fragments", [
    ("steps=ten", ("--set steps=ten", "steps:", "'ten'", "int")),
    ("model.tie_word_embeddings='false'", ("model.tie_word_embeddings", "bool")),
    ("optim.learning_rate=fast", ("optim.learning_rate", "float")),
    ("optim.learning_rat=1e-3", ("optim.learning_rat", "did you mean learning_rate")),
    ("log_every=0", ("log_every",)),
])
def test_bad_recipe_values_are_one_line(tmp_path, command, override, fragments):
  """Wrong types, unknown keys and out-of-range values in `--set` name the field and the --set."""
  result = cli(command, "--config", RECIPES[command], "--set", override,
               "--set", f"output_dir={tmp_path / 'run'}")
  assert_user_error(result, command, *fragments)
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_yaml_float_spelling_is_accepted(tmp_path):
  """`--set optim.learning_rate=1e-3` (a string to YAML 1.1) is read as a float: the run gets as
  far as the next real problem, a tokenizer path that does not exist, and names that."""
  result = cli("pretrain", "--config", RECIPES["pretrain"], "--set", "optim.learning_rate=1e-3",
               "--set", "tokenizer=/no/such/tokenizer.model",
               "--set", f"output_dir={tmp_path / 'run'}")
  line = assert_user_error(result, "pretrain", "/no/such/tokenizer.model")
  assert "learning_rate" not in line


def test_recipe_file_errors_name_file_and_line(tmp_path):
  recipe = tmp_path / "bad.yaml"
  text = open(os.path.join(ROOT, RECIPES["pretrain"])).read()
  recipe.write_text(text.replace("steps: 200", "steps: two hundred"))
  line_no = text.splitlines().index("steps: 200") + 1
  assert_user_error(cli("pretrain", "--config", str(recipe)), "pretrain",
                    f"{recipe}:{line_no}: steps:")
  assert_user_error(cli("pretrain", "--config", str(tmp_path / "missing.yaml")), "pretrain",
                    "missing.yaml")


def test_debug_shows_the_traceback(tmp_path):
  result = cli("pretrain", "--config", RECIPES["pretrain"], "--set", "steps=ten", "--debug")
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_bad_config_json_names_the_file(tmp_path):
  """A config.json that is not JSON, or has a string where a bool belongs, names the file."""
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text('{"model_type": "qwen2",\n "vocab_size": }')
  result = cli("convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "out"))
  assert_user_error(result, "convert", f"{src / 'config.json'}:2", "not valid JSON")
  hf = get_preset("qwen2-tiny").to_hf_dict()
  (src / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": "false"}))
  result = cli("convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "out"))
  assert_user_error(result, "convert", "config.json", "tie_word_embeddings")
  assert not os.path.exists(tmp_path / "out")
