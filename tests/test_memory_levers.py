"""Memory levers of training: chunked cross entropy (`loss_chunk_size`), the remat policies
(`qwen2_jax.remat`), bf16 Adam first moments (`optim.mu_dtype`) and `attention_impl: auto`.

Each lever must leave the math alone: the loss, z-loss and gradients (or one optimizer step)
equal the plain path's on random inputs, within the stated tolerances.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qwen2_jax as q
from qwen2_jax import aot, attention, config as config_lib, remat, sharding
from qwen2_jax.train import dpo, step as step_lib, targets as train_targets
from qwen2_jax.train.optim import OptimConfig, make_optimizer


def _batch(config, B: int, T: int, seed: int, packed: bool) -> dict:
  """Random [B, T] batch; packed rows hold 2-3 documents and trailing padding (segment 0)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, config.vocab_size, (B, T)).astype(np.int32)
  targets = rng.randint(0, config.vocab_size, (B, T)).astype(np.int32)
  mask = (rng.rand(B, T) > 0.25).astype(np.float32)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  segments = None
  if packed:
    segments = np.zeros((B, T), np.int32)
    for b in range(B):
      cuts = sorted(rng.choice(np.arange(2, T - 2), 2, replace=False))
      end = T - 1 - b % 2  # odd rows end with one padding token
      for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end]), start=1):
        segments[b, lo:hi] = s
        positions[b, lo:hi] = np.arange(hi - lo)
    mask *= segments > 0
  return {"input_ids": ids, "targets": targets, "loss_mask": mask, "positions": positions,
          "segment_ids": segments}


def _close(actual, expected, rel: float, what: str) -> None:
  """max |actual - expected| <= rel * max |expected| (one scale per array)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def _objective_and_grads(config, params, batch, z_loss):
  fn = jax.value_and_grad(
      lambda p: step_lib.objective_sums(config, p, batch, z_loss=z_loss), has_aux=True)
  return jax.jit(fn)(params)


# (preset, dtype, logits_dtype, T, loss_chunk_size, packed, relative tolerance)
CHUNK_CASES = {
    "f32_untied_packed_chunk_does_not_divide": ("qwen2-tiny", "float32", None, 13, 4, True,
                                                1e-5),
    "bf16_tied_packed_vocab_509": ("qwen2-tiny-tied", "bfloat16", None, 13, 5, True, 2e-2),
    "bf16_compute_f32_logits_one_chunk": ("qwen2-tiny", "bfloat16", "float32", 12, 64, False,
                                          2e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_chunked_loss_and_grads_equal_the_plain_path(case):
  """With loss_chunk_size the objective (nll + z-loss), its sums and every gradient equal the
  plain path's: loss masks, packed rows, tied heads, chunks that do not divide T. Tolerance:
  1e-5 of each array's scale in f32, 2e-2 (about 2.5 bf16 ulps) with bf16 logits."""
  preset, dtype, logits_dtype, T, chunk, packed, rel = CHUNK_CASES[case]
  plain = q.get_preset(preset, dtype=dtype, logits_dtype=logits_dtype, initializer_range=0.2)
  chunked = plain.replace(loss_chunk_size=chunk)
  params = q.init_params(plain, jax.random.key(0))
  batch = _batch(plain, 3, T, seed=1, packed=packed)
  (obj1, sums1), g1 = _objective_and_grads(plain, params, batch, z_loss=0.1)
  (obj2, sums2), g2 = _objective_and_grads(chunked, params, batch, z_loss=0.1)
  _close(obj2, obj1, rel / 10, "objective")
  for key in ("loss", "z_loss", "tokens"):
    _close(sums2[key], sums1[key], rel / 10, key)
  assert float(sums1["z_loss"]) > 0 and float(sums1["tokens"]) < 3 * T  # masks are in play
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g2),
                        jax.tree.leaves(g1)):
    _close(a, b, rel, jax.tree_util.keystr(path[0]))
  nll1, lse1 = jax.jit(lambda p: step_lib.token_losses(plain, p, batch))(params)
  nll2, lse2 = jax.jit(lambda p: step_lib.token_losses(chunked, p, batch))(params)
  _close(nll2, nll1, rel / 10, "nll")
  _close(lse2, lse1, rel / 10, "lse")


def _reference_nll_lse(logits, targets):
  """The textbook loss: f32 log_softmax, indexed at the targets."""
  z = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(z, axis=-1)
  return (-jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0],
          jax.nn.logsumexp(z, axis=-1))


@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_plain_nll_lse_equals_log_softmax_and_index(dtype, rel):
  """The plain loss `_nll_lse` (select-and-reduce target logit, custom_vjp backward that keeps
  no f32 logits) equals log_softmax-and-index in value and in the gradient of an objective
  weighting nll and lse by random cotangents, negative (from-the-end) targets included.
  Tolerance, relative to each array's max: values 1e-5 (f32 math either way); gradients 1e-5
  with f32 logits and 1e-2 with bf16 ones (both round to bf16, about one bf16 ulp apart)."""
  V = 509
  logits = (4 * jax.random.normal(jax.random.key(0), (3, 7, V))).astype(dtype)
  targets = jax.random.randint(jax.random.key(1), (3, 7), -V, V)  # some from the end
  g_nll, g_lse = (jax.random.normal(jax.random.key(i), (3, 7)) for i in (2, 3))

  def objective(fn):
    def f(z):
      nll, lse = fn(z, targets)
      return (g_nll * nll + g_lse * lse + 0.1 * lse * lse).sum()
    return jax.jit(jax.value_and_grad(f))

  for actual, expected, what in zip(jax.jit(step_lib._nll_lse)(logits, targets),  # pylint: disable=protected-access
                                    _reference_nll_lse(logits, targets), ("nll", "lse")):
    _close(actual, expected, 1e-5, what)
  (value, grad), (ref_value, ref_grad) = (
      objective(step_lib._nll_lse)(logits), objective(_reference_nll_lse)(logits))  # pylint: disable=protected-access
  _close(value, ref_value, 1e-5, "objective")
  assert grad.dtype == logits.dtype == ref_grad.dtype
  _close(grad, ref_grad, rel, "d logits")
  assert float(np.abs(np.asarray(grad, np.float32)).max()) > 0.1  # not vacuous


def _largest_array(hlo_text: str) -> int:
  """Elements of the largest array shape in an HLO module's text."""
  sizes = [int(np.prod([int(d) for d in dims.split(",")]))
           for dims in re.findall(r"[a-z]+[0-9]*\[([0-9]+(?:,[0-9]+)*)\]", hlo_text)]
  return max(sizes)


@pytest.mark.slow
def test_chunked_loss_never_holds_the_whole_logits():
  """The compiled gradient with loss_chunk_size holds no array as large as the [B, T, V] logits
  (the plain path does) and needs fewer temporary bytes."""
  # Full remat, so that no stack of per-layer attention scores rivals the logits in size.
  config = q.get_preset("qwen2-tiny", vocab_size=8192, remat_policy="full")
  params = q.init_params(config, jax.random.key(0))
  B, T, chunk = 2, 128, 16
  batch = _batch(config, B, T, seed=0, packed=False)

  def compiled(cfg):
    grad = jax.grad(lambda p: step_lib.objective_sums(cfg, p, batch, z_loss=1e-4)[0])
    return jax.jit(grad).lower(params).compile()

  plain, chunked = compiled(config), compiled(config.replace(loss_chunk_size=chunk))
  logits = B * T * config.vocab_size
  assert _largest_array(plain.as_text()) >= logits
  assert _largest_array(chunked.as_text()) < logits // 2  # chunk logits: logits / 8
  assert chunked.memory_analysis().temp_size_in_bytes < \
      plain.memory_analysis().temp_size_in_bytes / 2


@pytest.mark.slow
def test_dpo_and_eval_log_probs_do_not_change_with_chunking():
  """DPO's sequence log-probs and the eval step's token losses (the SFT/DPO objective code) are
  the same with loss_chunk_size (f32, 1e-6 relative)."""
  plain = q.get_preset("qwen2-tiny", initializer_range=0.2)
  chunked = plain.replace(loss_chunk_size=3)
  params = q.init_params(plain, jax.random.key(2))
  batch = _batch(plain, 4, 10, seed=3, packed=True)
  logps = [jax.jit(lambda p, c=c: dpo.sequence_logps(c, p, batch))(params)
           for c in (plain, chunked)]
  _close(logps[1], logps[0], 1e-6, "sequence_logps")
  assert np.all(np.asarray(logps[0]) < 0)


@pytest.mark.slow
def test_moe_objective_does_not_change_with_chunking():
  """Qwen2-MoE: the objective and every sum (nll, z-loss, router aux / z-loss, loads, drop rate)
  are the same with loss_chunk_size (f32, 1e-5 relative)."""
  plain = q.get_preset("qwen2-moe-tiny", initializer_range=0.2)
  params = q.init_params(plain, jax.random.key(4))
  batch = _batch(plain, 2, 10, seed=5, packed=True)
  (obj1, sums1), (obj2, sums2) = [
      jax.jit(lambda p, c=c: step_lib.objective_sums(c, p, batch, z_loss=0.1,
                                                     router_z_loss=0.01))(params)
      for c in (plain, plain.replace(loss_chunk_size=4))]
  _close(obj2, obj1, 1e-5, "objective")
  assert set(sums1) == set(sums2) and "moe_aux_loss" in sums1
  for key in sums1:
    _close(sums2[key], sums1[key], 1e-5, key)


def test_remat_policies_match_the_config_and_their_names_exist():
  """`remat.POLICIES` lists exactly `config.REMAT_POLICIES`, and every activation name a policy
  saves or offloads is one the decoder layer gives (a missing name would silently save
  nothing)."""
  assert tuple(remat.POLICIES) == config_lib.REMAT_POLICIES
  config = q.get_preset("qwen2-tiny", remat_policy="full")
  params = q.init_params(config, jax.random.key(0))
  ids = jnp.zeros((1, 4), jnp.int32)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: q.forward(config, p, ids).sum()))(params))
  given = set(re.findall(r"name=([a-z_0-9]+)", jaxpr))
  wanted = {*remat.MINIMAL, "context", "decoder_layer_input"}
  assert wanted <= given, wanted - given


# ------------------------------------------------------ one sharded step on 8 fake CPU devices

def _sharded_steps(config, optimizer, steps: int = 1):
  """`steps` train steps of `config` on an 8-device FSDP mesh from a fixed init and batches:
  (final state on the host, metrics of the last step)."""
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  rules = sharding.get_rules("fsdp")
  params = q.init_params(config.replace(remat_policy="none", loss_chunk_size=None),
                         jax.random.key(0))
  params = jax.device_put(params, sharding.param_shardings(config, mesh, rules))
  state = step_lib.init_train_state_sharded(config, optimizer, jax.random.key(0), mesh, rules,
                                            params=params)
  step = step_lib.make_train_step(config, optimizer, mesh, rules, z_loss=1e-3, donate=False)
  for i in range(steps):
    batch = sharding.shard_batch(_batch(config, 8, 16, seed=10 + i, packed=True), mesh, rules)
    state, metrics = step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


_BASE = q.get_preset("qwen2-tiny", initializer_range=0.1)


@pytest.fixture(scope="module")
def no_remat_step():
  return _sharded_steps(_BASE, optax.sgd(0.5))


def _assert_same_step(result, reference, rel: float) -> None:
  (state, metrics), (ref_state, ref_metrics) = result, reference
  for key in ("loss", "z_loss", "grad_norm"):
    _close(metrics[key], ref_metrics[key], rel, key)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
              zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(
                  q.init_params(_BASE, jax.random.key(0)))))
  assert moved > 1e-3  # the step is not vacuous
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    err = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
    assert err <= rel * moved, f"params differ by {err:.3g} (step moved them {moved:.3g})"


@pytest.mark.slow
@pytest.mark.parametrize("policy", [p for p in config_lib.REMAT_POLICIES if p != "none"])
def test_remat_policy_step_equals_no_remat(policy, no_remat_step):
  """One sharded SGD step (8 fake devices, FSDP, packed rows, z-loss) under each remat policy
  (offloading ones included) gives the loss, grad norm and params of no remat, to 1e-5
  relative (f32: only recomputation order differs)."""
  _assert_same_step(_sharded_steps(_BASE.replace(remat_policy=policy), optax.sgd(0.5)),
                    no_remat_step, 1e-5)


@pytest.mark.slow
def test_chunked_loss_sharded_step_equals_plain(no_remat_step):
  """The sharded step with loss_chunk_size 6 (T = 16: 3 chunks of 6, 2 padding positions) and
  full remat equals the plain step (1e-5 relative)."""
  config = _BASE.replace(loss_chunk_size=6, remat_policy="full")
  _assert_same_step(_sharded_steps(config, optax.sgd(0.5)), no_remat_step, 1e-5)


@pytest.mark.slow
def test_bf16_first_moment_tracks_f32_adam():
  """optim.mu_dtype=bfloat16 stores Adam's mu in bf16 (nu stays f32) and three sharded AdamW
  steps land within 5% of the f32 run's parameter movement, per param in L2 norm (bf16 rounds mu
  to 2^-9 relative; elementwise, where mu nearly cancels, the direction is ill-conditioned)."""
  # eps 1e-6: Adam scales a gradient of ~0 (e.g. 1e-12 of summation-order noise) up to a full
  # step; with eps above such noise both runs move those elements alike.
  optim = OptimConfig(learning_rate=1e-2, min_learning_rate=1e-2, warmup_steps=0, eps=1e-6)
  f32_state, f32_metrics = _sharded_steps(_BASE, make_optimizer(optim), steps=3)
  bf16_opt = make_optimizer(dataclasses.replace(optim, mu_dtype="bfloat16"))
  state, metrics = _sharded_steps(_BASE, bf16_opt, steps=3)
  adam = next(s for s in state.opt_state if hasattr(s, "mu"))
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype(np.float32)}
  start = q.init_params(_BASE, jax.random.key(0))
  for a, b, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(f32_state.params),
                     jax.tree.leaves(start)):
    moved = float(np.linalg.norm(np.asarray(b) - np.asarray(s)))
    assert float(np.linalg.norm(np.asarray(a) - np.asarray(b))) <= 0.05 * moved + 1e-7
  _close(metrics["loss"], f32_metrics["loss"], 1e-3, "loss")


def test_attention_auto_picks_xla_off_tpu_and_explicit_choices_stand():
  """"auto" (the default) resolves to XLA on this CPU backend, with or without a mesh and with
  a sliding window; explicit choices pass through."""
  assert q.get_preset("qwen2-tiny").attention_impl == "auto"
  assert attention.resolve_impl("auto") == "xla"
  assert attention.resolve_impl("auto", sliding_window=8) == "xla"
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  with sharding.activation_rules(sharding.get_rules("fsdp"), mesh):
    assert attention.resolve_impl("auto") == "xla"
    assert attention.resolve_impl("pallas") == "pallas"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: no TPU compiler")
def test_attention_auto_lowers_the_flash_kernel_for_tpu():
  """Lowered for a TPU topology (on this CPU host), the default "auto" train step calls the
  Mosaic flash kernel; attention_impl xla does not."""
  topology = aot.parse_topology("v5e:2x2")
  mesh = sharding.make_mesh(sharding.MeshConfig(), aot.topology_devices(topology))
  rules = sharding.get_rules("fsdp")
  train = train_targets.TARGETS["train"]
  config = q.get_preset("qwen2-tiny", dtype="bfloat16", remat_policy="full")
  texts = {impl: train.lower(config.replace(attention_impl=impl), mesh, rules, 4, 128).as_text()
           for impl in ("auto", "xla")}
  assert "tpu_custom_call" in texts["auto"] and "flash_attention" in texts["auto"]
  assert "flash_attention" not in texts["xla"]


def test_compile_set_reaches_the_model_and_optimizer_levers():
  """`qwen2-jax compile --set model.X=V --set optim.X=V` sets any lever as a recipe would
  (typed), and a bad key or value is an error naming the `--set`."""
  from qwen2_jax.cli import compile_cmd  # pylint: disable=import-outside-toplevel
  from qwen2_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  base = q.get_preset("qwen2-tiny")
  config, optim = compile_cmd._apply_sets(  # pylint: disable=protected-access
      base, ["model.loss_chunk_size=512", "model.remat_policy=minimal_offloaded",
             "optim.mu_dtype=bfloat16"])
  assert (config.loss_chunk_size, config.remat_policy) == (512, "minimal_offloaded")
  assert config.replace(loss_chunk_size=None, remat_policy="none") == base
  assert optim == OptimConfig(mu_dtype="bfloat16")
  assert compile_cmd._apply_sets(base, []) == (base, None)  # pylint: disable=protected-access
  for bad, message in (("model.loss_chunk_size=0", "model.loss_chunk_size=0"),
                       ("optim.mu_dtype=float8", "optim.mu_dtype=float8"),
                       ("steps=3", "steps=3: only model"), ("model.remat=full", "model.remat")):
    with pytest.raises(UserError, match=re.escape(message)):
      compile_cmd._apply_sets(base, [bad])  # pylint: disable=protected-access
