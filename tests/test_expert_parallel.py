"""Tests of expert parallelism (`qwen2_jax.expert_parallel`) on 8 fake CPU devices.

conftest.py gives the CPU backend 8 devices, so a sharded run (experts over the `expert` mesh
axis, tokens exchanged by all-to-all inside `jax.shard_map`, FSDP / tensor sharding of the rest)
and a single-device run are compared in one process: same loss, aux loss and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen2_jax import api, presets, sharding
from qwen2_jax.train import step as step_lib


def _loss(cfg, params, ids):
  logits, aux = api.forward_with_aux(cfg, params, ids)
  return jnp.mean(jnp.sin(logits.astype(jnp.float32))) + aux["aux_loss"], aux


# (moe_impl, mesh, rules, capacity factor)
CASES = {
    "ragged_dot_expert4_fsdp2": ("ragged_dot", "fsdp=2,expert=4", "fsdp", None),
    "pallas_expert2_fsdp2_tensor2": ("pallas", "fsdp=2,expert=2,tensor=2", "fsdp_tp", None),
    # 8 tokens per device choose 2 distinct experts each, so a capacity of 8 (factor 4) never
    # drops, yet the all-to-all buffers shrink to 8 of the 16 dropless rows per destination.
    "ragged_dot_expert8_capacity": ("ragged_dot", "expert=8,fsdp=1", "fsdp", 4.0),
}


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if "pallas" in c else c for c in CASES])
def test_expert_parallel_equals_single_device(case):
  """Sharded loss, aux loss and every gradient equal the single-device ones; all-to-all is used."""
  impl, mesh_spec, rules_name, capacity = CASES[case]
  cfg = presets.get_preset("qwen2-moe-tiny", moe_impl=impl, moe_capacity_factor=capacity)
  params = api.init_params(cfg, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (8, 8), 0, cfg.vocab_size)
  grad_fn = jax.value_and_grad(lambda p, i: _loss(cfg, p, i), has_aux=True)
  (loss_1, aux_1), grads_1 = jax.jit(grad_fn)(params, ids)

  mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_spec))
  rules = sharding.get_rules(rules_name)
  p_sh = sharding.param_shardings(cfg, mesh, rules)

  def sharded(p, i):
    with sharding.activation_rules(rules, mesh, cfg):
      return grad_fn(p, i)

  step = jax.jit(sharded, in_shardings=(p_sh, sharding.batch_sharding(mesh, rules)))
  hlo = step.lower(params, ids).as_text()
  assert "all_to_all" in hlo or "all-to-all" in hlo
  (loss_8, aux_8), grads_8 = step(jax.device_put(params, p_sh), ids)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  np.testing.assert_allclose(aux_8["aux_loss"], aux_1["aux_loss"], rtol=1e-6)
  assert float(aux_8["drop_rate"]) == 0.0
  for (path, g8), g1 in zip(jax.tree_util.tree_leaves_with_path(grads_8),
                            jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(g8, g1, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
  expert_sh = grads_8["layers"]["mlp"]["experts"]["gate_proj"].sharding
  assert "expert" in str(expert_sh.spec)  # expert weights (and grads) split over `expert`


@pytest.mark.slow
def test_sharded_train_step_runs_with_expert_parallelism():
  """make_train_step on an fsdp x expert mesh: same loss and MoE metrics as the plain step."""
  cfg = presets.get_preset("qwen2-moe-tiny", moe_impl="ragged_dot")
  optimizer = optax.adamw(1e-3)
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("fsdp=4,expert=2"))
  rules = sharding.get_rules("fsdp")
  ids = jax.random.randint(jax.random.key(3), (8, 9), 0, cfg.vocab_size)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones((8, 8)),
           "positions": jnp.broadcast_to(jnp.arange(8), (8, 8)),
           "segment_ids": jnp.ones((8, 8), jnp.int32)}
  params = api.init_params(cfg, jax.random.key(0))
  _, ref = jax.jit(lambda s, b: step_lib.train_step(cfg, optimizer, s, b))(
      step_lib.init_train_state(params, optimizer), batch)
  state = step_lib.init_train_state_sharded(cfg, optimizer, jax.random.key(0), mesh, rules)
  _, metrics = step_lib.make_train_step(cfg, optimizer, mesh, rules)(
      state, sharding.shard_batch(batch, mesh, rules))
  for key in ("loss", "grad_norm", *step_lib.MOE_METRICS):
    np.testing.assert_allclose(metrics[key], ref[key], rtol=1e-5, err_msg=key)
