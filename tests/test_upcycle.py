"""Tests of dense -> MoE upcycling (`qwen2_jax.train.upcycle`, `qwen2-jax upcycle`).

The recipe's invariants are checked on tiny random weights: before re-initialisation the expert
slices of one shuffled copy add up to the dense FFN exactly, the shared expert is the dense FFN,
re-initialisation touches the requested share of each expert, and the command writes a loadable
checkpoint that is byte-identical for the same seed.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import make_hf_qwen2
from qwen2_jax import api
from qwen2_jax.checkpoint.hf import load_hf_checkpoint
from qwen2_jax.checkpoint.orbax_io import restore_orbax, save_orbax
from qwen2_jax.cli import upcycle_cmd
from qwen2_jax.train import upcycle


def _swiglu(x, gate, up, down):
  """x [N, H], gate / up [H, F], down [F, H], in NumPy float64."""
  g = x @ gate
  return (g / (1 + np.exp(-g)) * (x @ up)) @ down


def _dense_ffn(seed, H=16, F=48):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((H, F)), rng.standard_normal((H, F)), rng.standard_normal((F, H)),
          rng.standard_normal((5, H)))


@pytest.mark.parametrize("num_experts,width", [(8, 12), (8, 20)])
def test_expert_slices_of_one_copy_sum_to_the_dense_ffn(num_experts, width):
  """Before re-initialisation, the expert units cut from copy c add up to the dense FFN."""
  gate, up, down, x = _dense_ffn(0)
  F = gate.shape[1]
  units = upcycle.expert_units(F, num_experts, width, seed=1, layer=0)
  g_e, u_e, d_e = upcycle.cut_experts(gate, up, down, units)  # [E, H, W], [E, W, H]
  copies = upcycle.num_copies(num_experts, width, F)
  assert copies == -(-num_experts * width // F)
  flat = np.arange(num_experts * width)  # position of each expert unit in the concatenation
  dense = _swiglu(x, gate, up, down)
  full_copies = 0
  for c in range(copies):
    in_copy = (flat >= c * F) & (flat < (c + 1) * F)
    if in_copy.sum() < F:  # the last copy's remainder was dropped
      continue
    full_copies += 1
    e, j = np.divmod(flat[in_copy], width)
    assert sorted(units[e, j]) == list(range(F))  # the copy is a permutation
    out = _swiglu(x, g_e[e, :, j].T, u_e[e, :, j].T, d_e[e, j])
    np.testing.assert_allclose(out, dense, rtol=1e-10, atol=1e-10)
  assert full_copies >= 1 and not np.array_equal(units.ravel()[:F], np.arange(F))  # shuffled


def test_shared_expert_is_the_dense_ffn_and_gate_is_half():
  """Shared expert (wider than the dense FFN) computes the dense FFN exactly; gate 0 -> 1/2."""
  gate, up, down, x = _dense_ffn(2)
  shared = upcycle.shared_expert(gate, up, down, 64, seed=0, layer=3)
  assert shared["gate_proj"].shape == (16, 64) and shared["down_proj"].shape == (64, 16)
  np.testing.assert_allclose(_swiglu(x, shared["gate_proj"], shared["up_proj"],
                                     shared["down_proj"]), _swiglu(x, gate, up, down), rtol=1e-6)
  cfg = upcycle.moe_config(_tiny_dense_config(), num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=12, shared_expert_intermediate_size=64)
  mlp = upcycle.upcycle_layer_mlp({"gate_proj": gate, "up_proj": up, "down_proj": down}, cfg,
                                  seed=0, layer=0)
  assert np.all(mlp["shared_expert_gate"] == 0) and mlp["router"].shape == (16, 8)
  assert 0 < np.std(mlp["router"]) < 0.1


def _tiny_dense_config():
  from qwen2_jax.config import Qwen2Config  # pylint: disable=import-outside-toplevel
  return Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)


def test_reinitialisation_redraws_the_requested_share_of_each_expert():
  """About `reinit_fraction` of each expert's entries change, at the dense matrix's scale."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 64, 96)).astype(np.float32) * 0.5
  for fraction in (0.0, 0.5, 0.25):
    out = upcycle.reinitialise(w, fraction, 0.5, seed=0, layer=0, purpose=1)
    changed = (out != w).mean(axis=(1, 2))  # per expert
    np.testing.assert_allclose(changed, fraction, atol=0.03)
    np.testing.assert_allclose(out.std(), 0.5, rtol=0.05)


def _checksums(directory):
  return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
          for name in sorted(os.listdir(directory))}


def test_upcycle_command_writes_loadable_reproducible_checkpoints(tmp_path):
  """`qwen2-jax upcycle`: the HF output loads and runs, copies attention/norms/embeddings, the
  same seed gives byte-identical files and another seed does not; Orbax output loads too."""
  make_hf_qwen2(tmp_path / "dense", num_hidden_layers=3, intermediate_size=48)
  common = ["--src", str(tmp_path / "dense"), "--num-experts", "8", "--experts-per-tok", "2",
            "--expert-size", "20", "--shared-expert-size", "64", "--mlp-only-layers", "1"]
  for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
    assert upcycle_cmd.main([*common, "--out", str(tmp_path / name), "--seed", seed]) == 0
  assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")
  assert _checksums(tmp_path / "a") != _checksums(tmp_path / "c")
  assert upcycle_cmd.main([*common, "--out", str(tmp_path / "o"), "--format", "orbax",
                           "--seed", "7"]) == 0

  dense_cfg, dense = load_hf_checkpoint(tmp_path / "dense", show_progress=False,
                                        scan_layers=False)
  cfg, moe_params = load_hf_checkpoint(tmp_path / "a", show_progress=False, moe_impl="ragged_dot")
  assert [cfg.is_sparse_layer(i) for i in range(3)] == [True, False, True]
  for i in range(3):  # attention and norms copied; the dense layer keeps its FFN
    layer, ref = moe_params[f"layers_{i}"], dense[f"layers_{i}"]
    for key in ("self_attn", "input_layernorm", "post_attention_layernorm"):
      jax.tree.map(np.testing.assert_array_equal, layer[key], ref[key])
  jax.tree.map(np.testing.assert_array_equal, moe_params["layers_1"]["mlp"],
               dense["layers_1"]["mlp"])
  for key in ("embed_tokens", "norm", "lm_head"):
    jax.tree.map(np.testing.assert_array_equal, moe_params[key], dense[key])
  ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
  logits, aux = api.forward_with_aux(cfg, moe_params, ids)
  assert np.all(np.isfinite(np.asarray(logits))) and float(aux["aux_loss"]) > 0
  orbax_cfg, orbax_params = restore_orbax(tmp_path / "o")
  assert orbax_cfg.num_experts == 8
  np.testing.assert_allclose(api.forward(orbax_cfg, orbax_params, ids),
                             api.forward(cfg.replace(moe_impl="dense"), moe_params, ids),
                             atol=1e-5)
  del dense_cfg


def test_upcycle_rejects_bad_requests(tmp_path):
  """Missing MoE fields, an MoE source and a bad fraction are reported clearly."""
  make_hf_qwen2(tmp_path / "dense", num_hidden_layers=1, intermediate_size=48)
  assert upcycle_cmd.main(["--src", str(tmp_path / "dense"), "--out", str(tmp_path / "x"),
                           "--num-experts", "4"]) == 2
  cfg = _tiny_dense_config()
  moe = upcycle.moe_config(cfg, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
                           shared_expert_intermediate_size=0)
  with pytest.raises(Exception, match="dense model"):
    upcycle.moe_config(moe, num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
                       shared_expert_intermediate_size=0)
  with pytest.raises(ValueError, match="reinit_fraction"):
    upcycle.upcycle_params(cfg, api.init_params(cfg, jax.random.key(0)), moe,
                           reinit_fraction=1.5)


def test_upcycle_refuses_a_nonfinite_source_unless_allowed(tmp_path, capsys):
  """A dense source holding NaN is refused (exit 2, the tensor named, nothing written) unless
  --allow-nonfinite; an HF and an Orbax source load alike (`checkpoint.load`)."""
  make_hf_qwen2(tmp_path / "dense", num_hidden_layers=1, intermediate_size=48)
  config, params = load_hf_checkpoint(tmp_path / "dense", show_progress=False)
  params["norm"]["weight"] = params["norm"]["weight"].at[0].set(jnp.nan)
  save_orbax(tmp_path / "orbax", config, params)
  flags = ["--num-experts", "4", "--experts-per-tok", "2", "--expert-size", "24",
           "--shared-expert-size", "0"]
  assert upcycle_cmd.main(["--src", str(tmp_path / "orbax"), "--out", str(tmp_path / "x"),
                           *flags]) == 2
  assert "param norm/weight holds 1 non-finite value" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  assert upcycle_cmd.main(["--src", str(tmp_path / "orbax"), "--out", str(tmp_path / "x"),
                           "--allow-nonfinite", *flags]) == 0
  assert upcycle_cmd.main(["--src", str(tmp_path / "dense"), "--out", str(tmp_path / "y"),
                           *flags]) == 0
  assert upcycle_cmd.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z"),
                           *flags]) == 2
  assert f"{tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
