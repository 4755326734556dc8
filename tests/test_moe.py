"""Tests of the Qwen2-MoE block (`qwen2_jax.moe`), its checkpoints and its training losses.

The oracle is `transformers`' Qwen2MoeForCausalLM, tiny and randomly initialised (no downloads):
logits to 1e-4 in f32 and the same load-balancing loss, for sparse-every-layer, normalised top-k,
and mixed dense / sparse stacks. The three dispatch implementations are compared with each other
on random inputs (outputs and gradients), including experts that receive no token.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen2_jax import api, moe_dispatch, presets
from qwen2_jax.checkpoint import safetensors_io as st
from qwen2_jax.checkpoint.hf import load_hf_checkpoint, save_hf_checkpoint
from qwen2_jax.config import ConfigError
from qwen2_jax.model import KVCache, Qwen2ForCausalLM
from qwen2_jax.train import step as step_lib

IMPLS = ("dense", "ragged_dot", "pallas")


def make_hf_qwen2_moe(directory, *, seed=0, **config_kwargs):
  """Builds, randomises (O(1) logits) and saves a tiny Qwen2MoeForCausalLM; returns it reloaded."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                num_experts_per_tok=2, moe_intermediate_size=12,
                shared_expert_intermediate_size=20, max_position_embeddings=256,
                rope_theta=10000.0)
  kwargs.update(config_kwargs)
  model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, 0.15)
  model.save_pretrained(os.fspath(directory))
  return transformers.Qwen2MoeForCausalLM.from_pretrained(os.fspath(directory)).eval()


# name -> (transformers config overrides, our moe_impl, scan_layers)
PARITY = {
    "sparse_every_layer": (dict(norm_topk_prob=False), "dense", True),
    "norm_topk_prob": (dict(norm_topk_prob=True), "ragged_dot", True),
    "mlp_only_and_sparse_step_2": (dict(num_hidden_layers=4, decoder_sparse_step=2,
                                        mlp_only_layers=[3]), "pallas", True),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_aux_loss_match_transformers(case, tmp_path):
  """f32 logits within 1e-4 of transformers and the same aux loss (padding excluded)."""
  import torch  # pylint: disable=import-outside-toplevel
  overrides, impl, scan = PARITY[case]
  hf = make_hf_qwen2_moe(tmp_path, **overrides)
  ids = np.random.default_rng(1).integers(0, 97, (2, 13))
  mask = np.ones((2, 13), np.int64)
  mask[1, 9:] = 0  # right padding in row 1
  with torch.no_grad():
    ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
             output_router_logits=True)
  config, params = load_hf_checkpoint(tmp_path, show_progress=False, moe_impl=impl,
                                      scan_layers=scan)
  logits, aux = jax.jit(lambda p: api.forward_with_aux(
      config, p, ids, segment_ids=jnp.asarray(mask, jnp.int32)))(params)
  diff = np.abs(np.asarray(logits) - ref.logits.numpy())[mask.astype(bool)]
  assert diff.max() <= 1e-4, diff.max()
  np.testing.assert_allclose(float(aux["aux_loss"]), float(ref.aux_loss), rtol=1e-5)
  sparse = [i for i in range(config.num_hidden_layers) if config.is_sparse_layer(i)]
  assert aux["expert_load"].shape == (len(sparse), config.num_experts)


def test_hf_round_trip_is_bit_exact(tmp_path):
  """HF MoE checkpoint -> params -> HF (scanned and per-layer, sharded files) is bit-exact."""
  make_hf_qwen2_moe(tmp_path / "hf", num_hidden_layers=4, decoder_sparse_step=2)
  make_hf_qwen2_moe(tmp_path / "hf1", num_hidden_layers=2)  # all sparse: scanned layers
  for src in ("hf", "hf1"):
    original = st.SafetensorsFile(str(tmp_path / src / "model.safetensors"))
    for scan in (True, False):
      config, params = load_hf_checkpoint(tmp_path / src, dtype=None, show_progress=False,
                                          scan_layers=scan)
      out = tmp_path / f"{src}_{scan}"
      save_hf_checkpoint(out, config, params, max_shard_size="20KB", show_progress=False)
      loaded = {}
      for name in os.listdir(out):
        if name.endswith(".safetensors"):
          f = st.SafetensorsFile(str(out / name))
          loaded.update({k: f.read(k) for k in f.keys()})
      assert sorted(loaded) == sorted(original.keys())
      for key in original.keys():
        a = original.read(key)
        assert a.dtype == loaded[key].dtype and np.array_equal(a, loaded[key]), key


def _routing_inputs(seed, B=2, T=24, H=16, E=6, K=2, F=8, unused=(1, 4)):
  """Random x, routing and expert weights; experts in `unused` receive no token."""
  ks = jax.random.split(jax.random.key(seed), 6)
  allowed = jnp.asarray([e for e in range(E) if e not in unused])
  choice = jax.vmap(lambda k: jax.random.choice(k, allowed, (K,), replace=False))(
      jax.random.split(ks[0], B * T)).reshape(B, T, K)
  weights = jax.nn.softmax(jax.random.normal(ks[1], (B, T, K)), axis=-1)
  x = jax.random.normal(ks[2], (B, T, H))
  w = lambda k, shape: 0.3 * jax.random.normal(k, shape)
  return x, choice.astype(jnp.int32), weights, w(ks[3], (E, H, F)), w(ks[4], (E, H, F)), \
      w(ks[5], (E, F, H))


@pytest.mark.parametrize("capacity_factor", [None, 1.2])
def test_dispatch_implementations_agree_with_gradients(capacity_factor):
  """dense, ragged_dot and pallas: same outputs, keep masks and gradients; 2 experts unused."""
  x, idx, weights, wg, wu, wd = _routing_inputs(0)
  ct = jax.random.normal(jax.random.key(9), x.shape)

  def run(impl):
    def f(x, weights, wg, wu, wd):
      y, keep = moe_dispatch.local_routed_experts(x, idx, weights, wg, wu, wd, impl=impl,
                                                  capacity_factor=capacity_factor)
      return jnp.sum(y * ct), (y, keep)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, weights, wg, wu, wd)

  (g_ref, (y_ref, keep_ref)) = run("dense")
  if capacity_factor is not None:
    assert 0.05 < float(jnp.mean(~keep_ref)) < 0.5  # some assignments dropped
  for impl in ("ragged_dot", "pallas"):
    grads, (y, keep) = run(impl)
    np.testing.assert_array_equal(keep, keep_ref)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, g_ref):
      np.testing.assert_allclose(g, r, atol=5e-5, rtol=5e-5)
    for e in (1, 4):  # unused experts: zero gradient
      assert np.all(np.asarray(grads[2][e]) == 0) and np.all(np.asarray(grads[4][e]) == 0)


def test_capacity_drops_latest_tokens_and_reports_rate():
  """An expert keeps its first `capacity` assignments in token order; drop_rate counts the rest."""
  idx = jnp.asarray([[0, 1], [0, 2], [0, 1], [2, 0]], jnp.int32)
  keep = moe_dispatch.keep_mask(idx, 3, 2)
  np.testing.assert_array_equal(keep, [[1, 1], [1, 1], [0, 1], [1, 0]])
  assert moe_dispatch.expert_capacity(8, 3, 0.75) == 2
  assert moe_dispatch.expert_capacity(8, 3, None) is None
  cfg = presets.get_preset("qwen2-moe-tiny", moe_capacity_factor=0.5, moe_impl="ragged_dot")
  params = api.init_params(cfg, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  aux_of = lambda c: jax.jit(lambda p: api.forward_with_aux(c, p, ids)[1])(params)
  aux = aux_of(cfg)
  assert 0.2 < float(aux["drop_rate"]) < 0.8
  aux_big = aux_of(cfg.replace(moe_capacity_factor=8.0))
  assert float(aux_big["drop_rate"]) == 0.0
  with pytest.raises(ConfigError, match="moe_capacity_factor"):
    cfg.replace(moe_capacity_factor=0.0)


def test_model_impls_agree_and_forward_equals_forward_with_aux():
  """Whole-model logits and aux agree across impls; `forward` returns the same logits only."""
  base = presets.get_preset("qwen2-moe-tiny", norm_topk_prob=True)
  params = api.init_params(base, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, base.vocab_size)
  results = {impl: jax.jit(lambda p, c=base.replace(moe_impl=impl): api.forward_with_aux(
      c, p, ids))(params) for impl in IMPLS}
  for impl in IMPLS[1:]:
    np.testing.assert_allclose(results[impl][0], results["dense"][0], atol=1e-5, rtol=1e-5)
    for key in ("aux_loss", "router_z_loss", "expert_load"):
      np.testing.assert_allclose(results[impl][1][key], results["dense"][1][key], rtol=1e-5)
  logits = jax.jit(lambda p: api.forward(base, p, ids))(params)
  assert isinstance(logits, jax.Array)
  np.testing.assert_array_equal(logits, results["dense"][0])
  load = np.asarray(results["dense"][1]["expert_load"])
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)


def test_dense_model_has_zero_aux_and_unchanged_metrics():
  """A dense model: forward_with_aux gives zero losses; train metrics have no MoE keys."""
  cfg = presets.get_preset("qwen2-tiny")
  params = api.init_params(cfg, jax.random.key(0))
  ids = jnp.ones((1, 4), jnp.int32)
  logits, aux = jax.jit(lambda p: api.forward_with_aux(cfg, p, ids))(params)
  np.testing.assert_array_equal(logits, jax.jit(lambda p: api.forward(cfg, p, ids))(params))
  assert float(aux["aux_loss"]) == 0 and aux["expert_load"].shape == (0, 0)
  metrics = jax.eval_shape(lambda p: step_lib.loss_fn(cfg, p, _batch(cfg, 1, 4))[1], params)
  assert not any(k.startswith("moe_") for k in metrics)


def _batch(cfg, B, T, seed=0):
  ids = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size)
  seg = jnp.ones((B, T), jnp.int32).at[0, T - 3:].set(0)  # padding at the end of row 0
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": (seg > 0) * 1.0,
          "positions": jnp.broadcast_to(jnp.arange(T), (B, T)), "segment_ids": seg}


def test_training_objective_adds_weighted_aux_and_router_z_loss():
  """loss_fn = CE + router_aux_loss_coef * aux + router_z_loss * z; train_step's update is the
  gradient of that objective; with 2 micro-batches it reports the same loss and MoE metrics."""
  cfg = presets.get_preset("qwen2-moe-tiny", moe_impl="ragged_dot", router_aux_loss_coef=0.1)
  params = api.init_params(cfg, jax.random.key(0))
  batch = _batch(cfg, 4, 8)
  (objective, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: step_lib.loss_fn(cfg, p, batch, router_z_loss=0.01), has_aux=True))(params)
  expected = metrics["loss"] + 0.1 * metrics["moe_aux_loss"] + 0.01 * metrics["moe_router_z_loss"]
  np.testing.assert_allclose(objective, expected, rtol=1e-6)
  assert float(metrics["moe_aux_loss"]) > 1 and float(metrics["moe_load_max"]) >= 1
  optimizer = optax.sgd(1.0)
  state = step_lib.init_train_state(params, optimizer)
  for accum in (1, 2):
    new, m = jax.jit(lambda s, b, a=accum: step_lib.train_step(
        cfg, optimizer, s, b, accum_steps=a, router_z_loss=0.01))(state, batch)
    np.testing.assert_allclose(m["loss"], metrics["loss"], rtol=1e-5)
    assert set(step_lib.MOE_METRICS) <= set(m) and int(new.step) == 1
    assert all(np.isfinite(float(m[k])) for k in step_lib.MOE_METRICS)
    if accum == 1:  # sgd(1): new = old - grad of the whole objective, router included
      expect = jax.tree.map(lambda p, g: p - g, params, grads)
      np.testing.assert_allclose(new.params["layers"]["mlp"]["router"],
                                 expect["layers"]["mlp"]["router"], atol=1e-6)


def test_kv_cache_decoding_matches_full_forward():
  """A sparse model decoded with the KV cache gives the full forward's logits."""
  cfg = presets.get_preset("qwen2-moe-tiny", moe_impl="ragged_dot")
  params = api.init_params(cfg, jax.random.key(0))
  B, T, S = 2, 7, 16
  ids = jax.random.randint(jax.random.key(2), (B, T + 1), 0, cfg.vocab_size)
  full = jax.jit(lambda p: api.forward(cfg, p, ids))(params)
  apply = jax.jit(Qwen2ForCausalLM(cfg).apply)
  L, K, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size
  cache = KVCache(jnp.zeros((L, B, S, K, D)), jnp.zeros((L, B, S, K, D)),
                  jnp.zeros((B,), jnp.int32))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  _, (k, v) = apply({"params": params}, ids[:, :T], pos, None, cache)
  cache = KVCache(cache.k.at[:, :, :T].set(k), cache.v.at[:, :, :T].set(v),
                  jnp.full((B,), T, jnp.int32))
  step_logits, _ = apply({"params": params}, ids[:, T:], jnp.full((B, 1), T), None, cache)
  np.testing.assert_allclose(step_logits[:, 0], full[:, T], atol=1e-5, rtol=1e-5)


def test_qwen2_57b_a14b_parameter_count():
  """eval_shape of qwen2-57b-a14b gives 57,408,658,944 parameters (and matches num_params)."""
  from qwen2_jax.config import num_params  # pylint: disable=import-outside-toplevel
  cfg = presets.get_preset("qwen2-57b-a14b")
  shapes = api.abstract_params(cfg)
  assert api.count_params(shapes) == 57_408_658_944 == num_params(cfg)
  assert shapes["layers"]["mlp"]["experts"]["gate_proj"].shape == (28, 64, 3584, 2560)
