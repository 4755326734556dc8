"""Meshes, logical rules and sharded computation on 8 fake CPU devices (see conftest.py).

Sharded results are compared with one device in float32: logits and gradients to atol 1e-5
(observed differences are ~3e-7: only the order of reductions changes).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qwen2_jax import api, presets, sharding
from qwen2_jax.checkpoint import hf, orbax_io
from qwen2_jax.train import step as train_lib
from qwen2_jax.typed_config import ConfigError

ATOL = 1e-5

# (rules preset, mesh): every preset, and each of data / fsdp / sequence / tensor above 1.
CASES = [("dp", "data=-1"), ("fsdp", "fsdp=-1"), ("fsdp", "data=2,fsdp=2,sequence=2"),
         ("fsdp_tp", "fsdp=2,tensor=4"), ("fsdp_tp", "data=2,fsdp=2,tensor=2")]


def _batch(config, B=8, T=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
  segments = np.repeat(np.arange(2), T // 2)[None].repeat(B, 0).astype(np.int32)
  positions = np.concatenate([np.arange(T // 2)] * 2)[None].repeat(B, 0).astype(np.int32)
  return {"input_ids": ids, "targets": np.roll(ids, -1, 1),
          "loss_mask": (rng.random((B, T)) > 0.2).astype(np.float32),
          "positions": positions, "segment_ids": segments}


def _logits_and_grads(config):
  """(params, batch) -> (logits, loss, grads): one function, so one compile per mesh."""
  def f(params, batch):
    logits = api.forward(config, params, batch["input_ids"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    (loss, _), grads = jax.value_and_grad(train_lib.loss_fn, argnums=1, has_aux=True)(
        config, params, batch)
    return logits, loss, grads
  return f


@pytest.fixture(scope="module")
def tiny():
  """The tiny config, its params (jitted init, key 0), a packed batch, and the one-device
  (logits, loss, grads) of that batch."""
  config = presets.get_preset("qwen2-tiny")
  params = jax.jit(lambda k: api.init_params(config, k))(jax.random.key(0))
  batch = _batch(config)
  return config, params, batch, jax.jit(_logits_and_grads(config))(params, batch)


def _assert_tree_close(a, b, atol=ATOL):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _assert_shardings_follow_rules(config, params, mesh, rules):
  """Every param's sharding is the rules' spec for its logical names and shape."""
  names = api.param_logical_axes(config)
  for (path, x), n in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(names, is_leaf=lambda v: isinstance(v, P))):
    expected = NamedSharding(mesh, sharding.logical_to_spec(tuple(n), rules, mesh, x.shape))
    assert x.sharding.is_equivalent_to(expected, x.ndim), (jax.tree_util.keystr(path),
                                                           x.sharding, expected)


# ------------------------------------------------------------------------------ mesh and rules

def test_mesh_config_fills_one_axis_and_rejects_bad_sizes():
  """-1 takes the remaining devices; two -1s, non-divisors and unknown axes are errors."""
  assert sharding.MeshConfig().shape(8) == dict(data=1, fsdp=8, sequence=1, expert=1, tensor=1)
  m = sharding.MeshConfig.from_string("data=-1,tensor=2")
  assert m.shape(8) == dict(data=4, fsdp=1, sequence=1, expert=1, tensor=2)
  assert sharding.MeshConfig(num_slices=2, fsdp=2, tensor=2).shape(8)["data"] == 2
  with pytest.raises(sharding.ShardingError, match="at most one"):
    sharding.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(sharding.ShardingError, match="does not fit"):
    sharding.MeshConfig(tensor=3).shape(8)
  with pytest.raises(ConfigError, match="^mesh.model: unknown setting"):
    sharding.MeshConfig.from_string("model=2")


def test_make_mesh_axes_and_multislice_layout():
  """The mesh has the five named Auto axes; with 2 slices the DCN axis splits device halves."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.size == 8
  multi = sharding.make_mesh(sharding.MeshConfig(num_slices=2, fsdp=-1))
  assert dict(multi.shape)["data"] == 2 and dict(multi.shape)["fsdp"] == 4
  first_slice = {d.id for d in multi.devices[0].flat}
  assert first_slice == {d.id for d in jax.devices()[:4]}


def test_rules_presets_custom_tables_and_errors(tmp_path):
  """Presets, tables, files and preset+overrides give rules; unknown names are errors."""
  fsdp = dict(sharding.get_rules("fsdp"))
  assert fsdp["embed"] == ("fsdp", "sequence") and "mlp" not in fsdp
  assert dict(sharding.get_rules("fsdp_tp"))["mlp"] == ("tensor",)
  assert "embed" not in dict(sharding.get_rules("dp"))
  custom = sharding.get_rules({"preset": "fsdp", "overrides": {"mlp": "tensor", "embed": None}})
  assert dict(custom)["mlp"] == ("tensor",) and "embed" not in dict(custom)
  path = tmp_path / "rules.json"
  path.write_text(json.dumps({"activation_batch": ["data"], "vocab": "tensor"}))
  assert sharding.get_rules(str(path)) == (("vocab", ("tensor",)), ("activation_batch", ("data",)))
  with pytest.raises(sharding.ShardingError, match="unknown logical axis"):
    sharding.get_rules({"hidden": "fsdp"})
  with pytest.raises(sharding.ShardingError, match="not a mesh axis"):
    sharding.get_rules({"embed": "model"})


def test_logical_to_spec_drops_used_trivial_and_non_dividing_axes():
  """A mesh axis is used once per array; size-1 and non-dividing axes are dropped."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  rules = sharding.get_rules({"embed": ["fsdp", "sequence"], "mlp": "tensor", "vocab": "tensor"})
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", "mlp"), rules, mesh) == P("tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (64, 6)) == P("fsdp")


def test_param_specs_of_each_preset():
  """q_proj [L, H, N, D] and embed [V, H]: replicated (dp), H over fsdp, plus N / V over tensor."""
  config = presets.get_preset("qwen2-tiny")
  expect = {"dp": (P(), P()), "fsdp": (P(None, "fsdp"), P(None, "fsdp")),
            "fsdp_tp": (P(None, "fsdp", "tensor"), P("tensor", "fsdp"))}
  for name, (q_spec, e_spec) in expect.items():
    mesh = sharding.make_mesh(sharding.MeshConfig.from_string(
        "data=-1" if name == "dp" else "fsdp=2,tensor=4" if name == "fsdp_tp" else ""))
    specs = sharding.param_specs(config, mesh, sharding.get_rules(name))
    assert specs["layers"]["self_attn"]["q_proj"] == q_spec, name
    assert specs["embed_tokens"]["embedding"] == e_spec, name


def test_unused_mesh_axis_is_an_error():
  """A mesh axis > 1 that no rule names would duplicate work: make_forward refuses it."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  with pytest.raises(sharding.ShardingError, match="tensor"):
    sharding.make_forward(presets.get_preset("qwen2-tiny"), mesh, sharding.get_rules("fsdp"))


def test_replicated_check_flags_large_replicated_params():
  """Under dp the embedding is replicated and flagged; under fsdp nothing large is."""
  config = presets.get_preset("qwen2-tiny")
  shapes = api.abstract_params(config)
  for name, mesh_text, flagged in (("dp", "data=-1", True), ("fsdp", "", False)):
    mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_text))
    found = sharding.replicated_params(
        shapes, sharding.param_shardings(config, mesh, sharding.get_rules(name)),
        min_bytes=16 << 10)
    assert ("embed_tokens/embedding" in dict(found)) == flagged, (name, found)


# ------------------------------------------------------------------------ sharded == unsharded

@pytest.mark.parametrize("preset,mesh_text", CASES)
def test_sharded_forward_and_grad_match_one_device(tiny, preset, mesh_text):
  """Params are initialised in the rules' shardings equal to the unsharded init, and sharded
  logits and gradients equal the single-device ones (fp32, atol 1e-5)."""
  config, ref_params, batch, (ref_logits, ref_loss, ref_grads) = tiny
  rules = sharding.get_rules(preset)
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_text))
  params = sharding.init_params_sharded(config, jax.random.key(0), mesh, rules)
  _assert_shardings_follow_rules(config, params, mesh, rules)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, ref_params))

  def sharded(p, b):
    with sharding.activation_rules(rules, mesh, config):
      return _logits_and_grads(config)(p, b)

  shardings = sharding.param_shardings(config, mesh, rules)
  logits, loss, grads = jax.jit(
      sharded, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
      out_shardings=(None, None, shardings))(params, batch)
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _assert_tree_close(grads, ref_grads)
  _assert_shardings_follow_rules(config, grads, mesh, rules)


def test_make_forward_matches_one_device(tiny):
  """`make_forward` (fsdp over 8 devices) gives the one-device logits, batch-sharded."""
  config, _, batch, (ref_logits, _, _) = tiny
  rules = sharding.get_rules("fsdp")
  mesh = sharding.make_mesh(sharding.MeshConfig())
  params = sharding.init_params_sharded(config, jax.random.key(0), mesh, rules)
  logits = sharding.make_forward(config, mesh, rules)(
      params, batch["input_ids"], batch["positions"], batch["segment_ids"])
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=1e-5)
  assert logits.sharding.spec == P("fsdp")


def test_train_step_sharded_matches_one_device_and_donates(tiny):
  """The jitted FSDP+TP train step gives the unsharded loss, grad norm and AdamW update,
  keeps Adam moments in the params' shardings, and donates the old state's buffers."""
  config, ref_params, batch, (_, ref_loss, ref_grads) = tiny
  optimizer = optax.adamw(1e-3, eps=1e-6)  # eps >> grad rounding: no sign flips near g = 0
  rules = sharding.get_rules("fsdp_tp")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  state = train_lib.init_train_state_sharded(config, optimizer, jax.random.key(0), mesh, rules)
  step = train_lib.make_train_step(config, optimizer, mesh, rules)
  new_state, metrics = step(state, sharding.shard_batch(batch, mesh, rules))
  assert state.params["lm_head"].is_deleted()  # donated

  updates, _ = optimizer.update(ref_grads, optimizer.init(ref_params), ref_params)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(ref_grads), rtol=1e-5)
  np.testing.assert_allclose(metrics["tokens"], batch["loss_mask"].sum())
  _assert_tree_close(new_state.params, optax.apply_updates(ref_params, updates))
  assert int(new_state.step) == 1
  mu = new_state.opt_state[0].mu["layers"]["mlp"]["gate_proj"]
  assert mu.sharding.is_equivalent_to(new_state.params["layers"]["mlp"]["gate_proj"].sharding, 3)


def test_uneven_model_dims_stay_replicated_and_match():
  """7 heads, 1 KV head and a prime vocab under tensor=4: those dims stay whole, results match."""
  config = presets.get_preset("qwen2-tiny-tied")
  rules = sharding.get_rules("fsdp_tp")
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  specs = sharding.param_specs(config, mesh, rules)
  assert specs["layers"]["self_attn"]["q_proj"] == P(None, "fsdp")
  assert specs["embed_tokens"]["embedding"] == P(None, "fsdp")
  params = sharding.init_params_sharded(config, jax.random.key(1), mesh, rules)
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (4, 12)).astype(np.int32)
  positions = np.arange(12, dtype=np.int32)[None].repeat(4, 0)
  logits = sharding.make_forward(config, mesh, rules)(params, ids, positions, None)
  ref = api.forward(config, jax.device_get(params), ids)
  np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------- checkpoints

def test_hf_checkpoint_loads_directly_into_shardings(tiny, tmp_path):
  """An HF checkpoint loads straight into the fsdp_tp shardings with identical values."""
  config, params, _, _ = tiny
  hf.save_hf_checkpoint(tmp_path / "hf", config, params, show_progress=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=4))
  rules = sharding.get_rules("fsdp_tp")
  loaded_config, loaded = hf.load_hf_checkpoint(tmp_path / "hf", mesh=mesh, rules=rules,
                                                show_progress=False)
  assert loaded_config.param_dtype == "float32"
  _assert_shardings_follow_rules(config, loaded, mesh, rules)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, params))
  _, bf16 = hf.load_hf_checkpoint(tmp_path / "hf", dtype="bfloat16", show_progress=False,
                                  shardings=lambda c: sharding.param_shardings(c, mesh, rules))
  assert bf16["lm_head"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(bf16["lm_head"], params["lm_head"].astype(jnp.bfloat16))


def test_orbax_restores_directly_into_shardings(tiny, tmp_path):
  """An Orbax checkpoint restores into the fsdp shardings of a 4x2 mesh with identical values."""
  config, params, _, _ = tiny
  orbax_io.save_orbax(tmp_path / "ckpt", config, params)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
  rules = sharding.get_rules("fsdp")
  _, restored = orbax_io.restore_orbax(tmp_path / "ckpt", mesh=mesh, rules=rules)
  _assert_shardings_follow_rules(config, restored, mesh, rules)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, params))


def test_host_local_batch_equals_global_placement():
  """In one process, building the batch from process-local rows equals placing the global one."""
  mesh = sharding.make_mesh(sharding.MeshConfig())
  rules = sharding.get_rules("fsdp")
  batch = {"input_ids": np.arange(64, dtype=np.int32).reshape(8, 8), "segment_ids": None}
  local = sharding.host_local_batch(batch, mesh, rules)
  placed = sharding.shard_batch(batch, mesh, rules)
  np.testing.assert_array_equal(local["input_ids"], placed["input_ids"])
  assert local["input_ids"].sharding.spec == P("fsdp") and local["segment_ids"] is None
