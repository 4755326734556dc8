"""Numerical parity with the `transformers` Qwen2 reference, model-level and layer-level.

Tolerances: fp32 logits max |diff| <= 1e-4 (measured ~2e-6 at logit scale ~3). bf16: our bf16
logits within 0.125 of transformers' bf16 logits, and no further from the fp32 reference than
2x transformers' own bf16 drift + 0.02 (measured 0.058, 0.050 and 0.039 at logit scale ~3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen2_jax as q
from qwen2_jax import layers as L
from qwen2_jax.model import Qwen2Attention
from hf_reference import hf_logits, make_hf_qwen2

FP32_TOL = 1e-4


@pytest.mark.parametrize("tied,heads,kv,vocab,head_dim", [
    (False, 4, 2, 257, 8),    # GQA ratio 2, odd vocab
    (True, 4, 2, 257, 8),     # tied head
    (False, 4, 4, 300, 8),    # ratio 1 (MHA)
    (True, 7, 1, 509, 8),     # ratio 7 (like Qwen2-0.5B's 14/2), odd vocab
    (False, 8, 2, 131, 16),   # ratio 4, wider heads
])
def test_fp32_logits_match_transformers(tmp_path, tied, heads, kv, vocab, head_dim):
  """fp32 logits equal transformers' within 1e-4 for tied/untied heads and GQA ratios 1/2/4/7."""
  model = make_hf_qwen2(tmp_path, vocab_size=vocab, num_attention_heads=heads,
                        num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied)
  ids = np.random.RandomState(1).randint(0, vocab, (2, 17))
  ref = hf_logits(model, ids)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  assert config.tie_word_embeddings == tied and ("lm_head" in params) != tied
  out = np.asarray(jax.jit(q.forward, static_argnums=0)(config, params, ids))
  assert out.shape == ref.shape
  assert np.abs(ref).max() > 1.0  # the check is not vacuous
  np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0)


def test_unscanned_layers_match_scanned(tmp_path):
  """scan_layers=False (one param subtree per layer) gives the same logits as the scanned model."""
  model = make_hf_qwen2(tmp_path, num_hidden_layers=3)
  ids = np.random.RandomState(2).randint(0, 257, (1, 9))
  ref = hf_logits(model, ids)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False, scan_layers=False)
  assert set(params) >= {"layers_0", "layers_1", "layers_2"}
  np.testing.assert_allclose(np.asarray(q.forward(config, params, ids)), ref, atol=FP32_TOL)


def test_remat_policies_do_not_change_logits_or_grads(tmp_path):
  """Every remat policy gives the same loss gradient as no remat (remat is a memory trade only)."""
  make_hf_qwen2(tmp_path)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  ids = np.random.RandomState(3).randint(0, 257, (2, 8))

  def loss(p, cfg):
    return jnp.mean(jax.nn.log_softmax(q.forward(cfg, p, ids))[..., 0])

  base = jax.grad(loss)(params, config)
  for policy in ("full", "dots", "dots_with_no_batch_dims", "save_qkv_proj"):
    g = jax.grad(loss)(params, config.replace(remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), base, g)


def test_sliding_window_matches_transformers(tmp_path):
  """With use_sliding_window, layers >= max_window_layers see only the last `sliding_window` keys."""
  model = make_hf_qwen2(tmp_path, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                        max_window_layers=1, attn_implementation="eager")
  ids = np.random.RandomState(4).randint(0, 257, (2, 12))
  ref = hf_logits(model, ids)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  assert config.use_sliding_window and config.sliding_window == 4
  out = np.asarray(q.forward(config, params, ids))
  np.testing.assert_allclose(out, ref, atol=FP32_TOL)
  full = np.asarray(q.forward(config.replace(use_sliding_window=False), params, ids))
  assert np.abs(full - ref).max() > 1e-2  # the window really changes the result


def test_bf16_logits_close_to_transformers_bf16(tmp_path):
  """bf16 compute on bf16 weights stays within the stated tolerance of transformers' bf16."""
  ids = np.random.RandomState(5).randint(0, 257, (2, 13))
  ref32 = hf_logits(make_hf_qwen2(tmp_path / "f32"), ids)
  ref16 = hf_logits(make_hf_qwen2(tmp_path / "bf16", torch_dtype="bfloat16"), ids)
  config, params = q.load_hf_checkpoint(tmp_path / "bf16", dtype=None, compute_dtype="bfloat16",
                                        show_progress=False)
  assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
  out = q.forward(config, params, ids)
  assert out.dtype == jnp.bfloat16
  out = np.asarray(out.astype(jnp.float32))
  assert np.abs(out - ref16).max() <= 0.125
  assert np.abs(out - ref32).max() <= 2 * np.abs(ref16 - ref32).max() + 0.02


# ----------------------------------------------------------------------------- layer level

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  path = tmp_path_factory.mktemp("layers")
  model = make_hf_qwen2(path, num_attention_heads=7, num_key_value_heads=1, head_dim=8,
                        rms_norm_eps=1e-5)
  config, params = q.load_hf_checkpoint(path, show_progress=False, scan_layers=False)
  return model, config, params


def test_rms_norm_layer(reference):
  """RMSNorm (f32 normalise, cast, then scale) equals Qwen2RMSNorm, incl. a non-default eps."""
  model, config, params = reference
  x = np.random.RandomState(6).randn(2, 5, config.hidden_size).astype(np.float32) * 3
  with torch.no_grad():
    ref = model.model.layers[0].input_layernorm(torch.as_tensor(x)).numpy()
  out = L.rms_norm(jnp.asarray(x), params["layers_0"]["input_layernorm"]["weight"],
                   config.rms_norm_eps)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, rtol=1e-6)


def test_rope_layer(reference):
  """cos/sin and the half-split rotation equal transformers' rotary embedding at arbitrary positions."""
  from transformers.models.qwen2 import modeling_qwen2 as hf

  model, config, _ = reference
  pos = np.array([[0, 1, 2, 7, 100, 511]], dtype=np.int64)
  x = np.random.RandomState(7).randn(1, 6, 3, config.head_size).astype(np.float32)
  with torch.no_grad():
    cos_ref, sin_ref = model.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(pos))
    rot_ref, _ = hf.apply_rotary_pos_emb(torch.as_tensor(x).transpose(1, 2),
                                         torch.as_tensor(x).transpose(1, 2), cos_ref, sin_ref)
  inv_freq, factor = L.rope_inv_freq(config)
  cos, sin = L.rope_cos_sin(jnp.asarray(pos), inv_freq, factor, jnp.float32)
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-5)
  rot = L.apply_rope(jnp.asarray(x), cos, sin)
  np.testing.assert_allclose(np.asarray(rot), rot_ref.transpose(1, 2).numpy(), atol=1e-5)


def test_attention_layer(reference):
  """GQA attention (ratio 7, q/k/v biases, no o bias, causal) equals Qwen2Attention."""
  model, config, params = reference
  B, T = 2, 9
  x = np.random.RandomState(8).randn(B, T, config.hidden_size).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (B, T))
  layer = model.model.layers[0].self_attn
  mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    cos_t, sin_t = model.model.rotary_emb(torch.as_tensor(x), torch.as_tensor(pos))
    ref, _ = layer(torch.as_tensor(x), (cos_t, sin_t), mask)
  inv_freq, factor = L.rope_inv_freq(config)
  cos, sin = L.rope_cos_sin(jnp.asarray(pos), inv_freq, factor, jnp.float32)
  out = Qwen2Attention(config).apply({"params": params["layers_0"]["self_attn"]}, jnp.asarray(x),
                                     cos, sin, jnp.asarray(pos, jnp.int32), None)
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5)


def test_mlp_layer(reference):
  """SwiGLU MLP equals Qwen2MLP."""
  model, config, params = reference
  x = np.random.RandomState(9).randn(2, 4, config.hidden_size).astype(np.float32)
  with torch.no_grad():
    ref = model.model.layers[1].mlp(torch.as_tensor(x)).numpy()
  out = L.SwiGLU(config, config.intermediate_size).apply(
      {"params": params["layers_1"]["mlp"]}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
     "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3},
    {"rope_type": "linear", "factor": 2.0},
])
def test_rope_scaling_logits_match_transformers(tmp_path, scaling):
  """YaRN (incl. explicit beta/attention_factor) and linear rope scaling match transformers,
  read from the config.json transformers writes, at positions past the original length."""
  model = make_hf_qwen2(tmp_path, rope_parameters={"rope_theta": 10000.0, **scaling})
  ids = np.random.RandomState(10).randint(0, 257, (1, 150))
  ref = hf_logits(model, ids)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  assert config.rope_type == scaling["rope_type"]
  out = np.asarray(q.forward(config, params, ids))
  np.testing.assert_allclose(out, ref, atol=FP32_TOL)
  plain = np.asarray(q.forward(config.replace(rope_scaling=None), params, ids))
  assert np.abs(plain - ref).max() > 1e-2  # the scaling really matters here


def test_yarn_sanity_numbers_from_the_reference():
  """head_dim 128, theta 1e6, L0 32768, factor 4: attention_factor 1.13863 and the ramp edges."""
  config = q.get_preset("qwen2-7b", rope_scaling={"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 32768})
  inv_freq, factor = L.rope_inv_freq(config)
  assert factor == pytest.approx(1.13863, abs=1e-5)
  base, _ = L.rope_inv_freq(config.replace(rope_scaling=None))
  np.testing.assert_array_equal(inv_freq[:23], base[:23])            # below low=23: extrapolate
  np.testing.assert_allclose(inv_freq[40:], base[40:] / 4, rtol=1e-6)  # from high=40: interpolate
