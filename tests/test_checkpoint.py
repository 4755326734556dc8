"""HF safetensors and Orbax checkpoints: bit-exact round trips, `checkpoint.load`, every
bad-checkpoint error (non-finite weights included), and how saves write and overwrite outputs."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import qwen2_jax as q
from qwen2_jax import checkpoint, sharding
from qwen2_jax.checkpoint import keymap
from qwen2_jax.checkpoint import safetensors_io as st
from qwen2_jax.checkpoint.hf import CheckpointError
from qwen2_jax.cli import build_parser, main as cli_main
from qwen2_jax.errors import UserError
from qwen2_jax.infer.api import load_model
from qwen2_jax.tokenizer import copy_tokenizer_files
from hf_reference import hf_logits, make_hf_qwen2


def _read_all_torch(directory) -> dict[str, torch.Tensor]:
  """Every tensor of an HF directory through the independent `safetensors` reader (torch)."""
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(safetensors.torch.load_file(os.path.join(directory, name)))
  return out


def _assert_same_tensors(a_dir, b_dir):
  a, b = _read_all_torch(a_dir), _read_all_torch(b_dir)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert a[key].shape == b[key].shape, key
    assert a[key].view(torch.uint8).numpy().tobytes() == b[key].view(torch.uint8).numpy().tobytes(), key


@pytest.mark.parametrize("tied,torch_dtype,shard", [
    (False, "float32", None), (True, "float32", 3000), (False, "bfloat16", 5000),
    (True, "bfloat16", None)])
def test_hf_round_trip_is_bit_exact(tmp_path, tied, torch_dtype, shard):
  """HF -> params -> HF keeps keys, dtypes and bytes; transformers loads it with equal logits."""
  model = make_hf_qwen2(tmp_path / "src", tie_word_embeddings=tied, torch_dtype=torch_dtype)
  config, params = q.load_hf_checkpoint(tmp_path / "src", dtype=None, show_progress=False)
  kwargs = {} if shard is None else {"max_shard_size": shard}
  q.save_hf_checkpoint(tmp_path / "out", config, params, show_progress=False, **kwargs)
  files = os.listdir(tmp_path / "out")
  assert ("model.safetensors.index.json" in files) == (shard is not None)
  if shard is not None:
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
  _assert_same_tensors(tmp_path / "src", tmp_path / "out")
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out",
                                                           dtype=getattr(torch, torch_dtype))
  ids = np.random.RandomState(0).randint(0, 257, (2, 7))
  np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no temp dir left behind


def test_load_casts_dtype_and_records_it(tmp_path):
  """dtype='float32' on a bf16 checkpoint gives f32 params and config.param_dtype float32."""
  make_hf_qwen2(tmp_path, torch_dtype="bfloat16")
  config, params = q.load_hf_checkpoint(tmp_path, dtype="float32", show_progress=False)
  assert config.param_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_config_round_trip_keeps_unknown_fields(tmp_path):
  """config.json fields that do not affect the model survive load -> save unchanged."""
  make_hf_qwen2(tmp_path / "src")
  path = tmp_path / "src" / "config.json"
  d = json.loads(path.read_text())
  d["my_note"] = {"kept": [1, 2]}
  path.write_text(json.dumps(d))
  config, params = q.load_hf_checkpoint(tmp_path / "src", dtype=None, show_progress=False)
  q.save_hf_checkpoint(tmp_path / "out", config, params, show_progress=False)
  out = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out["my_note"] == {"kept": [1, 2]}
  for key in ("hidden_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
              "vocab_size"):
    assert out[key] == d[key], key
  assert out["rope_theta"] == d["rope_parameters"]["rope_theta"]


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def good_dir(tmp_path):
  make_hf_qwen2(tmp_path / "good")
  return tmp_path / "good"


def _rewrite(directory, edit):
  """Rewrites model.safetensors after `edit(dict of numpy arrays)`."""
  path = directory / "model.safetensors"
  f = st.SafetensorsFile(path)
  tensors = {k: f.read(k).copy() for k in f.keys()}
  edit(tensors)
  st.write_file(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], tensors.__getitem__)


def test_truncated_file_raises_naming_file_and_key(good_dir):
  """A truncated safetensors file is rejected with the file and the first tensor past the end."""
  path = good_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  with pytest.raises(st.SafetensorsError, match=r"model\.safetensors: truncated: tensor '"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_garbage_header_raises(good_dir):
  """A file that is not safetensors at all is rejected with its path."""
  (good_dir / "model.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(st.SafetensorsError, match="model.safetensors"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_missing_tensor_raises_naming_key(good_dir):
  """A missing tensor is reported by key; nothing is silently initialised instead."""
  _rewrite(good_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_unexpected_tensor_raises_naming_key_and_file(good_dir):
  """An extra tensor is reported with its key and file."""
  _rewrite(good_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_wrong_shape_raises_naming_key_and_file(good_dir):
  """A tensor of the wrong shape is reported with key, file, and both shapes."""
  _rewrite(good_dir, lambda t: t.__setitem__("model.norm.weight", np.ones(31, np.float32)))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[31\], config\.json implies \[32\]"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_wrong_dtype_raises_naming_key_and_file(good_dir):
  """An integer tensor, or one that contradicts config.json's dtype, is rejected by key and file."""
  _rewrite(good_dir, lambda t: t.__setitem__("model.norm.weight", np.ones(32, np.int32)))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I32, expected a float dtype"):
    q.load_hf_checkpoint(good_dir, show_progress=False)
  _rewrite(good_dir, lambda t: t.__setitem__("model.norm.weight", np.ones(32, np.float16)))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype F16, config\.json declares float32"):
    q.load_hf_checkpoint(good_dir, show_progress=False)


def test_config_weights_mismatch_lists_every_problem(good_dir):
  """A config.json that disagrees with the weights reports every mismatching tensor at once."""
  path = good_dir / "config.json"
  d = json.loads(path.read_text())
  d["intermediate_size"] = 64
  path.write_text(json.dumps(d))
  with pytest.raises(CheckpointError) as err:
    q.load_hf_checkpoint(good_dir, show_progress=False)
  message = str(err.value)
  assert "6 problem(s)" in message  # gate/up/down in each of 2 layers
  assert "'model.layers.1.mlp.down_proj.weight' has shape [32, 48], config.json implies [32, 64]" in message


def test_missing_shard_file_raises(tmp_path):
  """An index that names a shard file which is absent is rejected naming that file."""
  make_hf_qwen2(tmp_path / "src")
  config, params = q.load_hf_checkpoint(tmp_path / "src", show_progress=False)
  q.save_hf_checkpoint(tmp_path / "sharded", config, params, max_shard_size=4000, show_progress=False)
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  second = sorted(set(index["weight_map"].values()))[1]
  (tmp_path / "sharded" / second).unlink()
  with pytest.raises(CheckpointError, match=re.escape(second) + ": listed in"):
    q.load_hf_checkpoint(tmp_path / "sharded", show_progress=False)


def test_tied_checkpoint_with_different_lm_head_raises(tmp_path):
  """tie_word_embeddings with an lm_head.weight that differs from the embedding is an error."""
  make_hf_qwen2(tmp_path, tie_word_embeddings=True)
  _rewrite(tmp_path, lambda t: t.__setitem__(
      "lm_head.weight", t["model.embed_tokens.weight"] + np.float32(1.0)))
  with pytest.raises(CheckpointError, match="lm_head.weight' is present and differs"):
    q.load_hf_checkpoint(tmp_path, show_progress=False)


def test_missing_directory_contents_raise(tmp_path):
  """No config.json, or no weights, raise a UserError naming the path."""
  with pytest.raises(UserError, match=re.escape(str(tmp_path / "config.json"))):
    q.load_hf_checkpoint(tmp_path, show_progress=False)
  make_hf_qwen2(tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors") as err:
    q.load_hf_checkpoint(tmp_path / "m", show_progress=False)
  assert isinstance(err.value, UserError) and str(tmp_path / "m") in str(err.value)


def test_failed_save_leaves_nothing_at_target(good_dir, tmp_path, monkeypatch):
  """A save that fails midway leaves neither the target nor a temp dir; an existing target survives."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  calls = {"n": 0}
  real_write = st.write_file

  def failing_write(path, specs, produce, **kw):
    calls["n"] += 1
    if calls["n"] == 2:
      raise OSError("disk full (injected)")
    return real_write(path, specs, produce, **kw)

  monkeypatch.setattr(st, "write_file", failing_write)
  with pytest.raises(OSError, match="injected"):
    q.save_hf_checkpoint(tmp_path / "out", config, params, max_shard_size=4000, show_progress=False)
  assert not (tmp_path / "out").exists()
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]
  # An existing checkpoint is only replaced once the new one is complete.
  shutil.copytree(good_dir, tmp_path / "out")
  calls["n"] = 0
  with pytest.raises(OSError, match="injected"):
    q.save_hf_checkpoint(tmp_path / "out", config, params, max_shard_size=4000,
                         overwrite=True, show_progress=False)
  _assert_same_tensors(good_dir, tmp_path / "out")
  with pytest.raises(FileExistsError):
    q.save_hf_checkpoint(tmp_path / "out", config, params, show_progress=False)


def test_save_rejects_params_that_do_not_match_config(good_dir, tmp_path):
  """Saving params whose tree or shapes disagree with the config names each bad param."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  bad = jax.tree.map(lambda x: x, params)
  bad["norm"]["weight"] = np.ones(5, np.float32)
  del bad["lm_head"]
  with pytest.raises(CheckpointError, match=r"param lm_head is missing[\s\S]*param norm/weight has shape \[5\]"):
    q.save_hf_checkpoint(tmp_path / "out", config, bad, show_progress=False)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Orbax + CLI

def test_orbax_round_trip(good_dir, tmp_path):
  """save_orbax -> restore_orbax returns identical params and an equal config."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  q.save_orbax(tmp_path / "ckpt", config, params)
  config2, params2 = q.restore_orbax(tmp_path / "ckpt")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  with pytest.raises(FileExistsError):
    q.save_orbax(tmp_path / "ckpt", config, params)


def test_convert_cli_hf_orbax_hf_is_bit_exact(tmp_path):
  """`convert hf-to-orbax` then `orbax-to-hf` reproduces the HF tensors bit for bit."""
  make_hf_qwen2(tmp_path / "src", torch_dtype="bfloat16", tie_word_embeddings=True)
  assert cli_main(["convert", "hf-to-orbax", "--hf", str(tmp_path / "src"),
                   "--out", str(tmp_path / "orbax")]) == 0
  assert cli_main(["convert", "orbax-to-hf", "--orbax", str(tmp_path / "orbax"),
                   "--out", str(tmp_path / "hf"), "--max-shard-size", "3KB"]) == 0
  _assert_same_tensors(tmp_path / "src", tmp_path / "hf")
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")


def test_safetensors_files_readable_by_reference_library(tmp_path):
  """Files from our writer load in the `safetensors` package; bf16 comes back as bf16."""
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones((3,), dtype=jax.numpy.bfloat16)}
  st.write_file(tmp_path / "x.safetensors", [(k, v.dtype, v.shape) for k, v in arrays.items()],
                arrays.__getitem__)
  loaded = safetensors.torch.load_file(tmp_path / "x.safetensors")
  assert loaded["b"].dtype == torch.bfloat16
  np.testing.assert_array_equal(loaded["a"].numpy(), arrays["a"])
  np.testing.assert_array_equal(safetensors.numpy.load_file(tmp_path / "x.safetensors")["a"],
                                arrays["a"])


# ----------------------------------------------------------------------------- checkpoint.load

def test_load_reads_hf_and_orbax_with_and_without_shardings(good_dir, tmp_path):
  """`checkpoint.load` tells HF from Orbax; both give the same params, on one device or placed
  as `shardings` says (a tree, or a function of the config)."""
  config, ref = q.load_hf_checkpoint(good_dir, dtype=None, show_progress=False)
  q.save_orbax(tmp_path / "orbax", config, ref)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  rules = sharding.get_rules("fsdp_tp")
  want = sharding.param_shardings(config, mesh, rules)
  for path in (good_dir, tmp_path / "orbax"):
    for shardings in (None, want, lambda c: sharding.param_shardings(c, mesh, rules)):
      got_config, params = checkpoint.load(path, shardings=shardings, progress=False)
      assert got_config == config, path
      jax.tree.map(np.testing.assert_array_equal, params, ref)
      for leaf, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        if shardings is None:
          assert len(leaf.sharding.device_set) == 1
        else:
          assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (path, leaf.shape)
  assert checkpoint.checkpoint_format(good_dir) == "hf"
  assert checkpoint.checkpoint_format(tmp_path / "orbax") == "orbax"
  bf16_config, bf16 = checkpoint.load(tmp_path / "orbax", dtype="bfloat16",
                                      compute_dtype="bfloat16", scan_layers=True)
  assert bf16_config.param_dtype == "bfloat16" and bf16_config.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jax.numpy.dtype("bfloat16")}


def test_load_of_neither_format_names_the_path_and_what_was_expected(tmp_path):
  """A missing path, a file, or a directory that is neither HF nor Orbax is a one-line
  UserError naming the path and the two layouts it could have had."""
  (tmp_path / "empty").mkdir()
  (tmp_path / "file").write_text("x")
  for name, reason in (("missing", "no such directory"), ("file", "not a directory"),
                       ("empty", "not a checkpoint")):
    with pytest.raises(checkpoint.CheckpointNotFoundError) as err:
      checkpoint.load(tmp_path / name)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert message.startswith(f"{tmp_path / name}: {reason}")
    assert "config.json + model.safetensors" in message and "params/" in message


def test_transform_reads_only_the_requested_slice():
  """`Transform.read_param` (per-device sharded reads) equals slicing the whole converted
  tensor, for every transform of the key map and random slices, steps included."""
  rng = np.random.default_rng(0)
  cases = [(keymap.IDENTITY, (6, 5)), (keymap.LINEAR, (4, 6)), (keymap.heads_in(3), (12, 5)),
           (keymap.heads_bias(3), (12,)), (keymap.heads_out(3), (5, 12))]
  for transform, hf_shape in cases:
    w = rng.standard_normal(hf_shape)
    param = transform.to_param(w)
    assert param.shape == transform.param_shape(hf_shape)
    np.testing.assert_array_equal(transform.to_hf(param), w)
    for _ in range(200):
      index = []
      for n in param.shape:
        start = int(rng.integers(0, n + 1))
        index.append(slice(start, int(rng.integers(start, n + 1)), int(rng.integers(1, 3))))
      reads = []
      got = transform.read_param(lambda ix: reads.append(ix) or w[ix], hf_shape, tuple(index))
      np.testing.assert_array_equal(got, param[tuple(index)])
      assert w[reads[0]].size <= w.size


def test_malformed_index_names_the_file(tmp_path):
  """A model.safetensors.index.json that is not JSON, or has no weight_map, names the file."""
  make_hf_qwen2(tmp_path / "src")
  config, params = q.load_hf_checkpoint(tmp_path / "src", show_progress=False)
  q.save_hf_checkpoint(tmp_path / "s", config, params, max_shard_size=4000, show_progress=False)
  index = tmp_path / "s" / "model.safetensors.index.json"
  index.write_text('{"weight_map": {\n  "a": 1,,\n}')
  with pytest.raises(CheckpointError, match=re.escape(str(index)) + r":2: not valid JSON"):
    q.load_hf_checkpoint(tmp_path / "s", show_progress=False)
  index.write_text('{"metadata": {}}')
  with pytest.raises(CheckpointError, match=re.escape(str(index)) + ": not a safetensors index"):
    q.load_hf_checkpoint(tmp_path / "s", show_progress=False)


def test_malformed_orbax_config_names_the_file(good_dir, tmp_path):
  """An Orbax config.json that is not JSON, or holds a bad value, is reported with its path."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  q.save_orbax(tmp_path / "o", config, params)
  file = tmp_path / "o" / "config.json"
  text = file.read_text()
  file.write_text(text.replace('"hidden_size": 32', '"hidden_size": 32,,'))
  with pytest.raises(UserError, match=re.escape(str(file)) + r":\d+: not valid JSON"):
    checkpoint.load(tmp_path / "o")
  file.write_text(text.replace('"hidden_size": 32', '"hidden_size": "wide"'))
  with pytest.raises(UserError, match=re.escape(str(file)) + ".*hidden_size"):
    checkpoint.load(tmp_path / "o")
  file.unlink()
  with pytest.raises(checkpoint.CheckpointNotFoundError, match=re.escape(str(file))):
    checkpoint.load(tmp_path / "o")


# ----------------------------------------------------------------------------- non-finite weights

def _poison(directory, key="model.layers.1.mlp.up_proj.weight", values=(np.nan, np.inf, -np.inf)):
  def edit(tensors):
    tensors[key].reshape(-1)[:len(values)] = values
  _rewrite(directory, edit)


def test_nonfinite_weights_are_refused_unless_allowed(good_dir):
  """A NaN/Inf tensor is a UserError naming key, file and count, unsharded and sharded; with
  allow_nonfinite the values load as stored."""
  _poison(good_dir)
  message = (rf"{re.escape(str(good_dir / 'model.safetensors'))}: tensor "
             r"'model\.layers\.1\.mlp\.up_proj\.weight' holds 3 non-finite value")
  with pytest.raises(checkpoint.NonFiniteWeightsError, match=message + r".*of 1536 values"):
    checkpoint.load(good_dir)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  with pytest.raises(checkpoint.NonFiniteWeightsError, match=message):
    checkpoint.load(good_dir, shardings=lambda c: sharding.param_shardings(
        c, mesh, sharding.get_rules("fsdp_tp")))
  config, params = checkpoint.load(good_dir, allow_nonfinite=True, scan_layers=False)
  up = np.asarray(params["layers_1"]["mlp"]["up_proj"])  # [H, F]: HF row 0 is column 0
  assert np.isnan(up[0, 0]) and up[1, 0] == np.inf and up[2, 0] == -np.inf
  assert np.isfinite(up).sum() == up.size - 3 and config.scan_layers is False


def test_nonfinite_orbax_params_are_refused_unless_allowed(good_dir, tmp_path):
  """An Orbax checkpoint holding NaN names the param and the params directory."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  params["norm"]["weight"] = params["norm"]["weight"].at[5].set(np.nan)
  q.save_orbax(tmp_path / "o", config, params)
  message = re.escape(str(tmp_path / "o" / "params")) + ": param norm/weight holds 1 "
  with pytest.raises(checkpoint.NonFiniteWeightsError, match=message):
    checkpoint.load(tmp_path / "o")
  _, loaded = checkpoint.load(tmp_path / "o", allow_nonfinite=True)
  assert np.isnan(np.asarray(loaded["norm"]["weight"][5]))


def _qwen2_jax(*args, cwd):
  return subprocess.run([sys.executable, "-m", "qwen2_jax", *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)


def test_convert_cli_refuses_nonfinite_weights_in_one_line(good_dir, tmp_path):
  """`qwen2-jax convert` on a checkpoint with a NaN exits 2 with one line naming the tensor (no
  traceback) and writes nothing; --allow-nonfinite converts it."""
  _poison(good_dir, values=(np.nan,))
  out = tmp_path / "orbax"
  run = _qwen2_jax("convert", "hf-to-orbax", "--hf", good_dir, "--out", out, cwd=tmp_path)
  assert run.returncode == 2, run.stderr
  errors = [line for line in run.stderr.split("\n") if "error" in line]  # not the progress bar
  assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
  assert errors[0].startswith("qwen2-jax convert: error: ")
  assert "'model.layers.1.mlp.up_proj.weight' holds 1 non-finite value" in errors[0]
  assert not out.exists()
  assert cli_main(["convert", "hf-to-orbax", "--hf", str(good_dir), "--out", str(out),
                   "--allow-nonfinite"]) == 0
  assert cli_main(["convert", "orbax-to-hf", "--orbax", str(out), "--out",
                   str(tmp_path / "hf")]) == 2
  assert not (tmp_path / "hf").exists()


def test_convert_cli_names_a_missing_input_flag(tmp_path, capsys):
  """A missing --hf / --orbax directory is reported with the flag and the path."""
  assert cli_main(["convert", "hf-to-orbax", "--hf", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "o")]) == 2
  assert f"--hf {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
  assert cli_main(["convert", "orbax-to-hf", "--orbax", str(tmp_path / "nope"), "--out",
                   str(tmp_path / "o")]) == 2
  assert f"--orbax {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- writing outputs

def _tree_bytes(directory) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_overwrite_refuses_a_directory_holding_other_files(good_dir, tmp_path, fmt):
  """Overwriting a directory that holds a file the writer did not write is refused, naming
  that file, before anything is written: the user's file and the old checkpoint survive."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  save = q.save_hf_checkpoint if fmt == "hf" else q.save_orbax
  kwargs = {"show_progress": False} if fmt == "hf" else {}
  out = tmp_path / "out"
  save(out, config, params, **kwargs)
  (out / "NOTES.md").write_text("my notes")
  before = _tree_bytes(out)
  with pytest.raises(checkpoint.OutputExistsError,
                     match=re.escape(str(out / "NOTES.md")) + ": not a file .* refusing"):
    save(out, config, params, overwrite=True, **kwargs)
  assert _tree_bytes(out) == before
  assert sorted(os.listdir(tmp_path)) == ["good", "out"]  # no staging directory left
  (out / "NOTES.md").unlink()
  params["norm"]["weight"] = params["norm"]["weight"] + 1
  save(out, config, params, overwrite=True, **kwargs)
  _, reloaded = checkpoint.load(out)
  np.testing.assert_array_equal(reloaded["norm"]["weight"], params["norm"]["weight"])
  assert sorted(os.listdir(tmp_path)) == ["good", "out"]


def test_hf_overwrite_replaces_the_checkpoint_and_keeps_tokenizer_files(good_dir, tmp_path):
  """Overwriting a sharded checkpoint with a single-file one removes the stale shards and index
  and keeps the tokenizer files that were there."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  out = tmp_path / "out"
  q.save_hf_checkpoint(out, config, params, max_shard_size=4000, show_progress=False)
  (out / "tokenizer.json").write_text('{"kept": true}')
  (out / "tokenizer_config.json").write_text("{}")
  q.save_hf_checkpoint(out, config, params, overwrite=True, show_progress=False)
  names = sorted(os.listdir(out))
  assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")], names
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= set(names)
  assert (out / "tokenizer.json").read_text() == '{"kept": true}'
  _assert_same_tensors(good_dir, out)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_the_umask_gives(good_dir, tmp_path, umask):
  """Every directory and file a save writes has mode 0777 / 0666 less the umask (not the 0700
  of a `mkdtemp` directory)."""
  config, params = q.load_hf_checkpoint(good_dir, show_progress=False)
  old = os.umask(umask)
  try:
    q.save_hf_checkpoint(tmp_path / "hf", config, params, max_shard_size=4000, show_progress=False)
    q.save_orbax(tmp_path / "orbax", config, params)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"x")
    copy_tokenizer_files(tmp_path / "tok", tmp_path / "hf")
  finally:
    os.umask(old)
  for root in (tmp_path / "hf", tmp_path / "orbax"):
    for path in [root, *root.rglob("*")]:
      mode = stat.S_IMODE(path.stat().st_mode)
      if path.is_dir():
        assert mode == 0o777 & ~umask, (path, oct(mode))
      else:
        assert mode == 0o666 & ~umask, (path, oct(mode))


def test_generate_loads_through_checkpoint_load(good_dir):
  """`qwen2-jax generate` loads with `checkpoint.load`: a NaN checkpoint is refused unless
  --allow-nonfinite, which its parser accepts."""
  _poison(good_dir)
  with pytest.raises(checkpoint.NonFiniteWeightsError, match="up_proj"):
    load_model(good_dir)
  config, _ = load_model(good_dir, allow_nonfinite=True, compute_dtype="bfloat16")
  assert config.dtype == "bfloat16" and config.param_dtype == "float32"
  args = build_parser().parse_args(["generate", str(good_dir), "--prompt", "x",
                                    "--allow-nonfinite"])
  assert args.allow_nonfinite is True
