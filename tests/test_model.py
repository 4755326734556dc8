"""Model behaviour beyond parity: packed documents, positions, dtypes, the functional API."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax import api
from qwen2_jax import model as model_lib
from qwen2_jax import moe

TOL = 2e-5


@pytest.fixture(scope="module")
def tiny():
  config = q.get_preset("qwen2-tiny", initializer_range=0.2)
  return config, q.init_params(config, jax.random.key(0))


def test_packed_documents_equal_separate_documents(tiny):
  """Two documents packed in one row (segment ids, restarted positions) give each one's own logits."""
  config, params = tiny
  rng = np.random.RandomState(0)
  doc_a, doc_b = rng.randint(0, config.vocab_size, 7), rng.randint(0, config.vocab_size, 5)
  pad = 4
  packed = np.concatenate([doc_a, doc_b, np.zeros(pad, int)])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0] * pad])
  positions = np.array([list(range(7)) + list(range(5)) + list(range(pad))])
  out = np.asarray(q.forward(config, params, packed, positions=positions, segment_ids=segments))
  alone_a = np.asarray(q.forward(config, params, doc_a[None]))
  alone_b = np.asarray(q.forward(config, params, doc_b[None]))
  np.testing.assert_allclose(out[0, :7], alone_a[0], atol=TOL)
  np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=TOL)
  assert np.isfinite(out).all()  # padding rows stay finite too
  # Without segment ids the second document sees the first: results differ.
  mixed = np.asarray(q.forward(config, params, packed, positions=positions))
  assert np.abs(mixed[0, 7:12] - alone_b[0]).max() > 1e-3


def test_future_tokens_do_not_change_past_logits(tiny):
  """Causality: changing token t leaves logits at positions < t unchanged."""
  config, params = tiny
  ids = np.random.RandomState(1).randint(0, config.vocab_size, (1, 10))
  changed = ids.copy()
  changed[0, 6] = (changed[0, 6] + 1) % config.vocab_size
  a = np.asarray(q.forward(config, params, ids))
  b = np.asarray(q.forward(config, params, changed))
  np.testing.assert_allclose(a[0, :6], b[0, :6], atol=TOL)
  assert np.abs(a[0, 6:] - b[0, 6:]).max() > 1e-3


def test_explicit_positions_shift_is_rope_relative(tiny):
  """Shifting every position by a constant leaves logits unchanged (RoPE is relative)."""
  config, params = tiny
  ids = np.random.RandomState(2).randint(0, config.vocab_size, (2, 6))
  base = np.asarray(q.forward(config, params, ids))
  shifted = np.asarray(q.forward(config, params, ids, positions=np.arange(6)[None].repeat(2, 0) + 37))
  np.testing.assert_allclose(base, shifted, atol=1e-4)


def test_bf16_compute_with_f32_params(tiny):
  """Training precision (f32 params, bf16 compute) runs, returns bf16 logits close to f32."""
  config, params = tiny
  ids = np.random.RandomState(3).randint(0, config.vocab_size, (2, 8))
  f32 = np.asarray(q.forward(config, params, ids))
  bf16 = q.forward(config.replace(dtype="bfloat16"), params, ids)
  assert bf16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(bf16, np.float32) - f32).max() < 0.05 * np.abs(f32).max()
  logits32 = q.forward(config.replace(dtype="bfloat16", logits_dtype="float32"), params, ids)
  assert logits32.dtype == jnp.float32


def test_param_logical_axes_cover_every_param(tiny):
  """Every param has logical axis names, one per dimension, with the layer axis named 'layers'."""
  config, params = tiny
  axes = q.param_logical_axes(config)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_params = jax.tree.leaves(params)
  assert len(flat_axes) == len(flat_params)
  for spec, p in zip(flat_axes, flat_params):
    assert len(spec) == p.ndim and all(isinstance(a, str) for a in spec)
  assert axes["layers"]["self_attn"]["q_proj"] == jax.P("layers", "embed", "q_heads", "head_dim")


def test_forward_rejects_bad_shapes(tiny):
  """Mismatched positions / segment ids and non-2D input raise ValueError naming the argument."""
  config, params = tiny
  ids = np.zeros((2, 4), int)
  with pytest.raises(ValueError, match="positions"):
    q.forward(config, params, ids, positions=np.zeros((2, 3), int))
  with pytest.raises(ValueError, match="segment_ids"):
    q.forward(config, params, ids, segment_ids=np.zeros((1, 4), int))
  with pytest.raises(ValueError, match="input_ids"):
    q.forward(config, params, np.zeros(4, int))


def test_cli_help_for_every_subcommand(capsys):
  """`qwen2-jax --help` and every subcommand's --help exit 0 and describe themselves."""
  from qwen2_jax.cli import SUBCOMMANDS, build_parser, main

  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0
  parser = build_parser()
  for name in SUBCOMMANDS:
    with pytest.raises(SystemExit) as e:
      parser.parse_args([name, "--help"])
    assert e.value.code == 0
    assert name in capsys.readouterr().out


def _pallas_case():
  config = q.get_preset("qwen2-tiny", initializer_range=0.2, hidden_size=256, head_dim=64,
                        num_hidden_layers=1)  # head_dim 64 as on real Qwen2 sizes
  params = q.init_params(config, jax.random.key(3))
  rng = np.random.RandomState(4)
  ids = rng.randint(0, config.vocab_size, (4, 40))
  seg = np.array([[1] * 25 + [2] * 15] * 2 + [[1] * 40] + [[1] * 30 + [0] * 10])
  pos = np.array([list(range(25)) + list(range(15))] * 2 + [list(range(40))] +
                 [list(range(30)) + list(range(10))])
  return config, params, ids, pos, seg


def test_pallas_attention_impl_matches_xla_logits_and_grads():
  """attention_impl='pallas' (flash kernel, interpret mode) gives the XLA path's logits and
  gradients on packed rows, within 1e-4 (f32)."""
  from jax.experimental.pallas import tpu as pltpu

  config, params, ids, pos, seg = _pallas_case()

  def loss(p, cfg):
    logits = q.forward(cfg, p, ids, positions=pos, segment_ids=seg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1] * (seg > 0))

  ref_logits = q.forward(config, params, ids, positions=pos, segment_ids=seg)
  ref_grads = model_lib.unstack_layers(jax.grad(loss)(params, config), config)
  # Layers unrolled: the TPU interpret mode's callbacks are effects (jax 0.12), which flax's
  # nn.scan refuses in its loop-invariance check.
  pallas = config.replace(attention_impl="pallas", scan_layers=False)
  unstacked = model_lib.unstack_layers(params, config)
  with pltpu.force_tpu_interpret_mode():
    logits = q.forward(pallas, unstacked, ids, positions=pos, segment_ids=seg)
    grads = jax.grad(loss)(unstacked, pallas)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)
  with pytest.raises(ValueError, match="no sliding window"):
    q.forward(pallas.replace(use_sliding_window=True, sliding_window=8, max_window_layers=0),
              unstacked, ids)


def test_pallas_attention_under_the_sharded_forward():
  """On the 8-device mesh (fsdp x tensor rules) the Pallas path, in shard_map, equals XLA."""
  from jax.experimental.pallas import tpu as pltpu

  from qwen2_jax import sharding

  if jax.device_count() < 4:
    pytest.skip("needs the fake multi-device CPU mesh from conftest.py")
  config, params, ids, pos, seg = _pallas_case()
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("fsdp=2,tensor=2"), jax.devices()[:4])
  rules = sharding.get_rules("fsdp_tp")
  ref = q.forward(config, params, ids, positions=pos, segment_ids=seg)
  # Layers unrolled under the TPU interpret mode (see the test above).
  pallas = config.replace(attention_impl="pallas", scan_layers=False)
  unstacked = model_lib.unstack_layers(params, config)
  fwd = sharding.make_forward(pallas, mesh, rules)
  with pltpu.force_tpu_interpret_mode():
    out = fwd(jax.device_put(unstacked, sharding.param_shardings(pallas, mesh, rules)), ids, pos,
              seg)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)


# ------------------------------------------------------------------------ Pallas on CPU

def test_pallas_attention_runs_interpreted_on_cpu():
  """attention_impl='pallas' on the CPU backend (no interpret flag anywhere) runs the kernels in
  the Pallas interpreter and gives the XLA path's logits, for a dense and a pallas-MoE model."""
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU backend")
  ids = np.random.RandomState(0).randint(0, 512, (2, 24))
  for name, extra in (("qwen2-tiny", {}), ("qwen2-moe-tiny", {"moe_impl": "pallas"})):
    config = q.get_preset(name, initializer_range=0.2, **extra)
    params = q.init_params(config, jax.random.key(0))
    ref = q.forward(config.replace(moe_impl="dense") if extra else config, params, ids)
    out = q.forward(config.replace(attention_impl="pallas"), params, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4)


# ------------------------------------------------------------- param and intermediates layout

LAYOUTS = {  # name: (preset, overrides); mixed dense / sparse stacks are never scanned
    "dense": ("qwen2-tiny", {}),
    "tied": ("qwen2-tiny-tied", {}),
    "moe": ("qwen2-moe-tiny", {}),
    "moe_mixed": ("qwen2-moe-tiny", {"num_hidden_layers": 3, "mlp_only_layers": (1,)}),
}


def _name_rule_mask(params):
  """The weight-decay rule the optimizer used before the model owned it: decay every param
  except those with a path component containing "norm", "bias" or "embed_tokens"."""
  def keep(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return not any(p in n for n in names for p in ("norm", "bias", "embed_tokens"))
  return jax.tree_util.tree_map_with_path(keep, params)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_mask_by_rank_equals_the_name_rule(layout, scan):
  """`model.weight_decay_mask` (by rank) decays exactly the params the old by-name rule did, on
  dense, tied and MoE models, scanned and unscanned; matrices decay, vectors do not."""
  preset, overrides = LAYOUTS[layout]
  shapes = q.abstract_params(q.get_preset(preset, scan_layers=scan, **overrides))
  mask = model_lib.weight_decay_mask(shapes)
  assert mask == _name_rule_mask(shapes)
  decayed = sum(jax.tree.leaves(mask))
  assert 0 < decayed < len(jax.tree.leaves(mask))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stacked_and_per_layer_params_convert_both_ways(layout):
  """split_layers / join_layers round-trip; `unstack_layers` of scanned params runs in the
  unscanned model with the same logits and MoE statistics (`sparse_layer_stats`)."""
  preset, overrides = LAYOUTS[layout]
  config = q.get_preset(preset, initializer_range=0.2, **overrides)
  params = q.init_params(config, jax.random.key(1))
  rest, layers = model_lib.split_layers(params, config)
  assert len(layers) == config.num_hidden_layers and "embed_tokens" in rest
  assert jax.tree.all(jax.tree.map(jnp.array_equal, model_lib.join_layers(rest, layers, config),
                                   params))
  for i in (0, config.num_hidden_layers - 1):
    assert jax.tree.all(jax.tree.map(jnp.array_equal, model_lib.layer_params(params, config, i),
                                     layers[i]))
  unrolled_config = config.replace(scan_layers=False)
  unrolled = model_lib.unstack_layers(params, config)
  assert set(unrolled) >= {f"layers_{i}" for i in range(config.num_hidden_layers)}
  assert jax.tree.structure(unrolled) == jax.tree.structure(q.abstract_params(unrolled_config))
  ids = np.random.RandomState(2).randint(0, config.vocab_size, (2, 12))
  logits, aux = api.forward_with_aux(config, params, ids)
  logits_u, aux_u = api.forward_with_aux(unrolled_config, unrolled, ids)
  np.testing.assert_allclose(np.asarray(logits_u), np.asarray(logits), atol=TOL)
  assert aux["expert_load"].shape[0] == sum(map(config.is_sparse_layer,
                                                range(config.num_hidden_layers)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL), aux_u, aux)


def test_layer_intermediates_are_per_layer_in_both_layouts():
  """`layer_intermediates` gives each layer's sown values (a scanned stack sliced per layer):
  one entry per layer, the same in the scanned and unrolled layouts."""
  config = q.get_preset("qwen2-moe-tiny", initializer_range=0.2)
  params = q.init_params(config, jax.random.key(3))
  ids = jnp.asarray(np.random.RandomState(4).randint(0, config.vocab_size, (2, 8)))
  per_layout = []
  for cfg, p in ((config, params), (config.replace(scan_layers=False),
                                    model_lib.unstack_layers(params, config))):
    _, state = model_lib.Qwen2ForCausalLM(cfg).apply(
        {"params": p}, ids, jnp.broadcast_to(jnp.arange(8), (2, 8)), None,
        mutable=["intermediates"])
    layers = model_lib.layer_intermediates(state["intermediates"], cfg)
    assert len(layers) == config.num_hidden_layers
    assert layers[0]["mlp"][moe.STATS_NAME]["assigned"].shape == (config.num_experts,)
    per_layout.append(model_lib.sparse_layer_stats(state["intermediates"], cfg))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), *per_layout)


def test_apply_rope_is_x_cos_plus_rotate_half_x_sin_bit_for_bit():
  """`layers.apply_rope` (each half computed directly, one concatenate) gives exactly the bits of
  the textbook form x * cos + rotate_half(x) * sin, for several head counts and lengths."""
  from qwen2_jax import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for b, t, h, d in [(1, 16, 14, 64), (2, 5, 2, 16), (1, 512, 2, 128)]:
    x = jnp.asarray(rng.standard_normal((b, t, h, d), np.float32))
    angles = rng.standard_normal((b, t, d // 2)).astype(np.float32) * 10
    emb = np.concatenate([angles, angles], -1)
    cos, sin = jnp.asarray(np.cos(emb)), jnp.asarray(np.sin(emb))
    rotated = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    want = jax.jit(lambda x, c, s, r: x * c[:, :, None] + r * s[:, :, None])(x, cos, sin, rotated)
    np.testing.assert_array_equal(np.asarray(jax.jit(layers.apply_rope)(x, cos, sin)),
                                  np.asarray(want))


def test_unrolled_layers_evaluate_rope_tables_once(tiny):
  """With the layers unrolled, the compiled forward evaluates sine and cosine once per step, not
  inside every layer's RoPE loops (XLA:CPU fused them into each layer's loops before the
  barrier); the logits are the scanned layout's."""
  config, params = tiny
  unrolled = config.replace(scan_layers=False)
  assert unrolled.num_hidden_layers >= 2
  ids = (np.arange(12)[None] * 7) % config.vocab_size
  fn = jax.jit(lambda p, x: q.forward(unrolled, p, x))
  unstacked = model_lib.unstack_layers(params, config)
  text = fn.lower(unstacked, ids).compile().as_text()
  assert len(re.findall(r"\bsine\(", text)) == 1, text.count("sine(")
  assert len(re.findall(r"\bcosine\(", text)) == 1, text.count("cosine(")
  np.testing.assert_allclose(np.asarray(fn(unstacked, ids)),
                             np.asarray(q.forward(config, params, ids)), atol=TOL)
