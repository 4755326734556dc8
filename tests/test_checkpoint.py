"""HF safetensors and Orbax checkpoints: bit-exact round trips and every bad-checkpoint error."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import qwen2_jax as q
from qwen2_jax.checkpoint import hf as hf_io
from qwen2_jax.checkpoint import safetensors_io as st
from qwen2_jax.checkpoint.hf import CheckpointError
from qwen2_jax.cli import main as cli_main
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
  """No config.json, or no weights, raise FileNotFoundError naming the path."""
  with pytest.raises(FileNotFoundError, match="config.json"):
    q.load_hf_checkpoint(tmp_path, show_progress=False)
  make_hf_qwen2(tmp_path / "m")
  (tmp_path / "m" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    q.load_hf_checkpoint(tmp_path / "m", show_progress=False)


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
