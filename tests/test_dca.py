"""Tests of Dual Chunk Attention (`qwen2_jax.dca`): config, the reference against a per-pair
rotation oracle, one chunk == ordinary attention, the Pallas path (interpret mode) == the
reference across several chunks (forward and gradients), the model's KV-cache decode == the last
row of a prefill, generation with a DCA config, and libtpu AOT compiles of the Pallas path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwen2_jax import api, attention as attn_lib, dca, presets
from qwen2_jax import model as model_lib
from qwen2_jax.config import ConfigError, Qwen2Config, enable_dual_chunk_attention
from qwen2_jax.infer import engine as engine_lib
from qwen2_jax.infer.sampling import SamplingParams
from qwen2_jax.layers import apply_rope, rope_cos_sin, rope_inv_freq
from qwen2_jax.model import KVCache, Qwen2ForCausalLM

QWEN25_1M_DCA = {"chunk_size": 262144, "local_size": 8192,
                 "original_max_position_embeddings": 262144}


def _tiny(chunk=12, local=4, original=16, **kw):
  """qwen2-tiny (4/2 heads, D 16) with DCA: chunk length s = chunk - local."""
  config = presets.get_preset("qwen2-tiny", **kw)
  return enable_dual_chunk_attention(config, chunk_size=chunk, local_size=local,
                                     original_max_position_embeddings=original)


def _err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _rotated(config, q, k, index):
  """The three rotated queries and the rotated keys of unrotated q [B, T, N, D], k [B, T, K, D]."""
  cos, sin = dca.rope_tables(config, index, q.dtype)
  return tuple(apply_rope(q, cos[i], sin[i]) for i in (1, 2, 3)), apply_rope(k, cos[0], sin[0])


def _qkv(seed, b, t, n, kh, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, d), dtype), jax.random.normal(kk, (b, t, kh, d), dtype),
          jax.random.normal(kv, (b, t, kh, d), dtype))


# --------------------------------------------------------------------------------- config

def test_config_round_trips_the_qwen25_1m_spelling():
  """`dual_chunk_attention_config` is read from config.json and written back unchanged."""
  hf = {**presets.get_preset("qwen2-tiny").to_hf_dict(),
        "dual_chunk_attention_config": {**QWEN25_1M_DCA, "sparse_attention_enabled": False}}
  config = Qwen2Config.from_hf(hf)
  assert config.dual_chunk == (262144, 8192, 262144)
  assert config.to_hf_dict()["dual_chunk_attention_config"] == hf["dual_chunk_attention_config"]
  assert Qwen2Config.from_hf(config.to_hf_dict()) == config


def test_enable_uses_chunkllama_defaults_and_drops_yarn():
  """Qwen2-7B with YaRN: L0 = 32768 -> chunk 24576 (3/4), local 2048 (1/16); rope_scaling off."""
  yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
  config = enable_dual_chunk_attention(presets.get_preset("qwen2-7b", rope_scaling=yarn))
  assert config.dual_chunk == (24576, 2048, 32768) and config.rope_scaling is None
  kept = enable_dual_chunk_attention(Qwen2Config.from_hf(
      {**presets.get_preset("qwen2-tiny").to_hf_dict(),
       "dual_chunk_attention_config": QWEN25_1M_DCA}))
  assert kept.dual_chunk == (262144, 8192, 262144)


@pytest.mark.parametrize("bad", [{"chunk_size": 8, "local_size": 8},
                                 {"chunk_size": 8}, {"chunk_size": 8, "local_size": -1},
                                 {"chunk_size": 8, "local_size": 2,
                                  "original_max_position_embeddings": -5}])
def test_config_rejects_inconsistent_dca(bad):
  """chunk_size > local_size >= 0 integers, original length >= 0: else a ConfigError by name."""
  with pytest.raises(ConfigError, match="dual_chunk_attention_config"):
    presets.get_preset("qwen2-tiny", dual_chunk_attention_config=bad)


def test_config_rejects_dca_with_yarn_or_sliding_window():
  yarn = {"type": "yarn", "factor": 4.0}
  with pytest.raises(ConfigError, match="rope_scaling"):
    presets.get_preset("qwen2-tiny", rope_scaling=yarn, dual_chunk_attention_config=QWEN25_1M_DCA)
  with pytest.raises(ConfigError, match="sliding"):
    presets.get_preset("qwen2-tiny", use_sliding_window=True, sliding_window=8,
                       dual_chunk_attention_config=QWEN25_1M_DCA)


# ----------------------------------------------------------------------- the reference

def _numpy_rope(x, pos, theta, d):
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  ang = pos * inv
  cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
  return x * cos + np.concatenate([-x[d // 2:], x[:d // 2]]) * sin


def test_reference_matches_a_per_pair_rotation_oracle():
  """Every (query i, key j) pair rotates q at the position of its part, k at j mod s, and scales
  by f(i + 1)^2: an explicit float64 loop over pairs equals rope_tables + the reference."""
  config = _tiny(chunk=7, local=2, original=6)  # s = 5, 4 chunks over T = 19
  C, w, L0 = config.dual_chunk
  s = C - w
  T, N, K, D = 19, 4, 2, 16
  q, k, v = _qkv(0, 1, T, N, K, D)
  index = jnp.arange(T)[None]
  qs, kr = _rotated(config, q, k, index)
  out = dca.dual_chunk_attention_reference(qs, kr, v, index, index, chunk_len=s, scale=D ** -0.5)
  qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
  expected = np.zeros((T, N, D))
  for i in range(T):
    f2 = max(1.0, 0.1 * np.log((i + 1) / L0) + 1.0) ** 2
    for n in range(N):
      logits = []
      for j in range(i + 1):
        apart = i // s - j // s
        pos = (i % s, min(i % s + s, C), min(2 * s - 1, C))[min(apart, 2)]
        qr = _numpy_rope(qn[i, n], pos, config.rope_theta, D)
        krj = _numpy_rope(kn[j, n // (N // K)], j % s, config.rope_theta, D)
        logits.append(f2 * D ** -0.5 * qr @ krj)
      p = np.exp(np.array(logits) - max(logits))
      expected[i, n] = (p / p.sum()) @ vn[:i + 1, n // (N // K)]
  assert _err(out[0], expected) < 1e-5


def test_one_chunk_is_ordinary_attention():
  """T <= s (and T <= L0, so f = 1): DCA == causal attention with plain RoPE, for the attention
  function and for the whole model's logits."""
  config = _tiny(chunk=40, local=8, original=64)  # s = 32
  T, N, K, D = 32, 4, 2, 16
  q, k, v = _qkv(1, 2, T, N, K, D)
  index = jnp.broadcast_to(jnp.arange(T), (2, T))
  qs, kr = _rotated(config, q, k, index)
  out = dca.dual_chunk_attention_reference(qs, kr, v, index, index, chunk_len=32, scale=0.25)
  cos, sin = rope_cos_sin(index, *rope_inv_freq(config), jnp.float32)
  plain = attn_lib.xla_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                 attn_lib.attention_mask(index, index, None, None), scale=0.25)
  assert _err(out, plain) < 1e-5
  base = presets.get_preset("qwen2-tiny")
  params = api.init_params(base, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, T), 0, base.vocab_size)
  assert _err(api.forward(config, params, ids), api.forward(base, params, ids)) < 1e-5


def test_dca_differs_from_ordinary_attention_past_one_chunk():
  """Past one chunk the parts use other query positions, so the logits change (sanity)."""
  config = _tiny()
  base = presets.get_preset("qwen2-tiny")
  params = api.init_params(base, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (1, 30), 0, base.vocab_size)
  a, b = api.forward(config, params, ids), api.forward(base, params, ids)
  assert _err(a[:, :8], b[:, :8]) < 1e-5 and _err(a[:, 8:], b[:, 8:]) > 1e-3


# ------------------------------------------------------------------------ the Pallas path

def _pallas(qs, k, v, s):
  return dca.dual_chunk_flash_attention(qs, k, v, chunk_len=s, scale=0.25, interpret=True,
                                        block_sizes=(128, 128))


@pytest.mark.parametrize("t,s", [(300, 80), (200, 200)])
def test_pallas_path_matches_reference_forward_and_gradients(t, s):
  """Kernel path (interpret mode) == reference over 4 chunks (the last one partial) and over one
  chunk: outputs and the VJP of a random cotangent for all three queries, k and v (f32)."""
  N, K, D = 4, 2, 16
  q, k, v = _qkv(2, 2, t, N, K, D)
  qs = tuple(q * (1 + 0.1 * i) for i in range(3))  # three different queries
  index = jnp.broadcast_to(jnp.arange(t), (2, t))
  ref = lambda qs, k, v: dca.dual_chunk_attention_reference(qs, k, v, index, index,
                                                            chunk_len=s, scale=0.25)
  ct = jax.random.normal(jax.random.key(3), q.shape)
  outs = []
  for fn in (lambda qs, k, v: _pallas(qs, k, v, s), ref):
    out, vjp = jax.vjp(fn, qs, k, v)
    outs.append((out, vjp(ct)))
  (out_p, grads_p), (out_r, grads_r) = outs
  assert _err(out_p, out_r) < 5e-5
  for gp, gr in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_r)):
    assert _err(gp, gr) < 1e-4


@pytest.mark.slow
def test_model_with_pallas_dca_equals_xla_dca():
  """The whole model (2 layers, 3 chunks): attention_impl pallas == xla, logits and gradients."""
  config = _tiny(chunk=20, local=4, original=16)  # s = 16
  params = api.init_params(config, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (1, 40), 0, config.vocab_size)
  loss = lambda c: lambda p: jnp.mean(api.forward(c, p, ids) ** 2)
  # Layers unrolled: the TPU interpret mode's callbacks are effects (jax 0.12), which flax's
  # nn.scan refuses in its loop-invariance check.
  pal = config.replace(attention_impl="pallas", scan_layers=False)
  unstacked = model_lib.unstack_layers(params, config)
  with pltpu.force_tpu_interpret_mode():
    logits_p, grads_p = api.forward(pal, unstacked, ids), jax.grad(loss(pal))(unstacked)
  logits_x = api.forward(config, params, ids)
  grads_x = model_lib.unstack_layers(jax.grad(loss(config))(params), config)
  assert _err(logits_p, logits_x) < 1e-4
  assert jax.tree.structure(grads_p) == jax.tree.structure(grads_x)
  for gp, gx in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
    assert _err(gp, gx) < 1e-4


# ---------------------------------------------------------------------- KV cache and decode

def test_decode_step_equals_last_row_of_prefill():
  """Prefill T - 1 tokens into the model's KV cache, decode token T - 1 against it: its logits
  equal the last row of a T-token forward without cache (T spans 4 chunks, f > 1)."""
  config = _tiny()  # s = 8, L0 = 16
  params = api.init_params(config, jax.random.key(0))
  T, B = 30, 2
  ids = jax.random.randint(jax.random.key(2), (B, T), 0, config.vocab_size)
  full = api.forward(config, params, ids)  # [B, T, V]
  model = Qwen2ForCausalLM(config)
  pos = jnp.broadcast_to(jnp.arange(T - 1), (B, T - 1))
  logits, new_kv = model.apply({"params": params}, ids[:, :-1], pos, None,
                               engine_lib.init_cache(config, B, 0))
  assert _err(logits, full[:, :-1]) < 1e-5
  cache = engine_lib.write_kv(engine_lib.init_cache(config, B, T + 3), new_kv,
                              jnp.full((B,), T - 1))
  step, _ = model.apply({"params": params}, ids[:, -1:], cache.lengths[:, None], None, cache)
  assert _err(step[:, 0], full[:, -1]) < 1e-5


@pytest.mark.slow
def test_generation_with_dca_matches_full_forward_greedy():
  """The engine (prefill + in-program decode loop) with a DCA config emits the greedy tokens of
  re-running the whole sequence without a cache, across chunk boundaries, rows of 2 lengths."""
  config = _tiny(chunk=10, local=2, original=8)  # s = 8
  params = api.init_params(config, jax.random.key(4))
  prompts = [[5, 17, 99, 3, 250, 11, 42, 7, 8, 300, 1], [9, 8, 7]]
  eng = engine_lib.Engine(config, params, max_batch_size=2, eos_token_ids=())
  results = eng.generate(prompts, SamplingParams(max_new_tokens=14))
  for prompt, result in zip(prompts, results):
    seq = list(prompt)
    for _ in range(14):
      logits = api.forward(config, params, jnp.asarray([seq]))
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert result.output_ids == seq[len(prompt):]


# -------------------------------------------------------------- ahead-of-time TPU compiles

# Qwen2-7B attention (28/4 heads, D 128, bf16) with its DCA defaults (chunk 24576, local 2048:
# s = 22528): T = 65536 covers intra, successive and two-chunk inter parts.
AOT_T, AOT_N, AOT_K, AOT_D = 65536, 28, 4, 128


def _run_aot(arg, timeout=900):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'jax[tpu]'): no TPU compiler")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5p-8",
         "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  proc = subprocess.run([sys.executable, __file__, arg], env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  for r in results:
    print(r)
  return results


@pytest.mark.slow
def test_dca_pallas_path_compiles_for_tpu():
  """DCA forward and forward+backward (bf16, Qwen2-7B heads, T 65536, 3 chunks) compile for one
  v5p chip through libtpu; the temporaries stay far below the chip's HBM."""
  results = _run_aot("aot")
  assert len(results) == 2 and all(r["ok"] for r in results), results
  assert all(r["temp_bytes"] < 16 << 30 for r in results), results


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: no TPU compiler")


def _compile_prefill(capsys, *argv):
  from qwen2_jax.cli import compile_cmd  # pylint: disable=import-outside-toplevel
  code = compile_cmd.main(["--topology", "v5p:1x1x1", "--target", "prefill", "--batch", "1",
                           "--no-cost", "--json", *argv])
  return code, json.loads(capsys.readouterr().out)


@needs_libtpu
def test_compile_command_prefill_with_dca(capsys):
  """`compile --target prefill --dca-*` builds the engine's prefill with DCA on the kernel path
  (tiny model, 512 tokens = 4 chunks) and reports the DCA setting."""
  code, report = _compile_prefill(capsys, "--preset", "qwen2-tiny", "--seq-len", "512",
                                  "--attention-impl", "pallas", "--dca-chunk-size", "160",
                                  "--dca-local-size", "32")
  assert code == 0 and report["fits"] and report["target"] == "prefill"
  assert report["model"]["dual_chunk_attention"]["chunk_size"] == 160


@needs_libtpu
@pytest.mark.slow
def test_qwen2_7b_prefill_of_131072_tokens_fits_one_v5p_chip_with_dca(capsys):
  """The README's figure: Qwen2-7B (bf16) prefill of 131,072 tokens with DCA (ChunkLlama defaults)
  on the Pallas path fits one v5p chip's HBM (compiler estimate); the XLA path does not."""
  common = ("--preset", "qwen2-7b", "--seq-len", "131072", "--param-dtype", "bfloat16", "--dca")
  code, report = _compile_prefill(capsys, *common, "--attention-impl", "pallas")
  assert code == 0 and report["fits"], report
  assert report["memory_per_device"]["total_bytes"] < 60 << 30
  code, xla = _compile_prefill(capsys, *common, "--attention-impl", "xla")
  assert code == 3 and not xla["fits"] and "RESOURCE_EXHAUSTED" in xla["error"]
  print("DCA pallas:", report["memory_per_device"], report["compile_seconds"], "s")
  print("DCA xla:", xla["error"])


def _aot_main():
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:1x1x1",
                                         chip_config_name="default",
                                         chips_per_host_bounds=(1, 1, 1), num_slices=1).devices
  one = jax.sharding.SingleDeviceSharding(devices[0])
  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=one)
  q, kv = spec((1, AOT_T, AOT_N, AOT_D)), spec((1, AOT_T, AOT_K, AOT_D))
  s = 24576 - 2048
  fwd = lambda qi, qs, qx, k, v: dca.dual_chunk_flash_attention((qi, qs, qx), k, v, chunk_len=s,
                                                                scale=AOT_D ** -0.5)
  loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32) ** 2)
  for name, fn in (("fwd", fwd), ("fwd+bwd", jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))):
    t0 = time.time()
    try:
      compiled = jax.jit(fn).lower(q, q, q, kv, kv).compile()
      r = {"ok": True, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
    except Exception as e:  # pylint: disable=broad-except
      r = {"ok": False, "error": str(e)[:500]}
    print(json.dumps({"name": f"dca_{name}_T{AOT_T}", "seconds": round(time.time() - t0, 1),
                      **r}), flush=True)


if __name__ == "__main__":
  _aot_main()
