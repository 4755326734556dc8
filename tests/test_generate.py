"""Generation engine: parity with `transformers` generate, cache == full recomputation, batch
independence, stop tokens, sharded generation, and typed input validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen2_jax as q
from qwen2_jax.config import enable_dual_chunk_attention
from qwen2_jax.errors import UserError
from qwen2_jax.infer import Engine, SamplingParams, StaticEngine, validation
from qwen2_jax.infer.engine import init_cache, write_kv
from qwen2_jax.model import KVCache, Qwen2ForCausalLM
from hf_reference import make_hf_qwen2

LENGTHS = (5, 11, 1, 8)  # mixed prompt lengths in one batch


def _prompts(vocab, lengths=LENGTHS, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
  """(torch model, config, params) of a tiny random untied Qwen2 saved with save_pretrained."""
  path = tmp_path_factory.mktemp("gen_tiny")
  model = make_hf_qwen2(path, seed=3)
  config, params = q.load_hf_checkpoint(path, show_progress=False)
  return model, config, params


@pytest.fixture(scope="module")
def engine(hf_tiny):
  _, config, params = hf_tiny
  return Engine(config, params, eos_token_ids=())


def _hf_greedy(model, prompts, new_tokens):
  """transformers greedy generate of a left-padded batch; per-row new tokens."""
  T = max(map(len, prompts))
  ids = np.zeros((len(prompts), T), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=0)
  return out[:, T:].numpy().tolist()


def _assert_greedy_equals_hf(model, config, params, new_tokens):
  """Our greedy tokens for the LENGTHS batch == transformers' generate, row by row."""
  prompts = _prompts(config.vocab_size)
  expected = _hf_greedy(model, prompts, new_tokens)
  results = Engine(config, params, eos_token_ids=()).generate(
      prompts, SamplingParams(max_new_tokens=new_tokens))
  for row, (r, e) in enumerate(zip(results, expected)):
    assert r.output_ids == e, f"row {row} (prompt length {LENGTHS[row]})"
    assert r.finish_reason == "length"


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_equals_transformers_generate_mixed_lengths(tmp_path, tied):
  """Greedy tokens equal transformers' left-padded greedy generate, per row, tied and untied."""
  model = make_hf_qwen2(tmp_path, seed=1, tie_word_embeddings=tied)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  _assert_greedy_equals_hf(model, config, params, 12)


@pytest.mark.parametrize("impl", ["ragged_dot", "pallas"])
def test_moe_greedy_equals_transformers_generate(tmp_path, impl):
  """Qwen2-MoE (shared expert, top-2 of 6, a dense layer via mlp_only_layers): greedy tokens
  equal transformers' Qwen2MoeForCausalLM generate for a batch of mixed prompt lengths."""
  from test_moe import make_hf_qwen2_moe  # pylint: disable=import-outside-toplevel
  model = make_hf_qwen2_moe(tmp_path, seed=2, mlp_only_layers=[1])
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False, moe_impl=impl)
  assert config.is_moe and config.moe_impl == impl
  _assert_greedy_equals_hf(model, config, params, 10)


def test_write_kv_equals_per_slot_loop():
  """write_kv puts row b's T new keys / values at slots lengths[b] + 0..T-1 of every layer,
  leaves every other slot alone, drops slots past the end, and advances lengths by num_new."""
  L, B, S, K, D, T = 3, 4, 6, 2, 5, 2
  rng = np.random.default_rng(0)
  k0, v0 = rng.normal(size=(2, L, B, S, K, D)).astype(np.float32)
  k_new, v_new = rng.normal(size=(2, L, B, T, K, D)).astype(np.float32)
  lengths = np.array([0, 3, 5, 6])  # row 2: one slot left; row 3: full (both dropped)
  num_new = np.array([2, 2, 1, 0])
  cache = KVCache(jnp.asarray(k0), jnp.asarray(v0), jnp.asarray(lengths, jnp.int32))
  out = jax.jit(write_kv)(cache, (jnp.asarray(k_new), jnp.asarray(v_new)), jnp.asarray(num_new))
  k_ref, v_ref = k0.copy(), v0.copy()
  for b in range(B):
    for t in range(T):
      if lengths[b] + t < S:
        k_ref[:, b, lengths[b] + t] = k_new[:, b, t]
        v_ref[:, b, lengths[b] + t] = v_new[:, b, t]
  np.testing.assert_array_equal(np.asarray(out.k), k_ref)
  np.testing.assert_array_equal(np.asarray(out.v), v_ref)
  np.testing.assert_array_equal(np.asarray(out.lengths), lengths + num_new)


@pytest.mark.parametrize("variant", ["scan", "unrolled_sliding_window", "yarn"])
def test_cached_step_logits_equal_full_forward(variant):
  """Each cached step's logits equal `forward` over the whole sequence so far (per row)."""
  overrides = {"initializer_range": 0.3, "scan_layers": variant != "unrolled_sliding_window"}
  if variant == "unrolled_sliding_window":
    overrides.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
  if variant == "yarn":
    overrides.update(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 8})
  config = q.get_preset("qwen2-tiny", **overrides)
  params = q.init_params(config, jax.random.key(0))
  model = Qwen2ForCausalLM(config)
  apply = jax.jit(lambda p, ids, pos, cache: model.apply({"params": p}, ids, pos, None, cache))
  prompts = _prompts(config.vocab_size, (3, 9, 6))
  B, P, S = len(prompts), 9, 16
  ids = np.zeros((B, P), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  pos = np.broadcast_to(np.arange(P), (B, P))
  logits, kv = apply(params, ids, pos, init_cache(config, B, 0))  # prefill, right-padded
  lengths = jnp.asarray([len(p) for p in prompts])
  cache = init_cache(config, B, S)
  cache = write_kv(cache._replace(lengths=jnp.zeros_like(lengths)), kv, lengths)
  seqs = [list(p) + [int(np.argmax(logits[b, len(p) - 1]))] for b, p in enumerate(prompts)]
  cached = [[logits[b, t] for t in range(len(p))] for b, p in enumerate(prompts)]
  for _ in range(5):  # decode: one token per row at its own position
    last = jnp.asarray([[s[-1]] for s in seqs])
    logits, kv = apply(params, last, cache.lengths[:, None], cache)
    cache = write_kv(cache, kv, jnp.ones_like(cache.lengths))
    for b in range(B):
      cached[b].append(logits[b, 0])
      seqs[b].append(int(np.argmax(logits[b, 0])))
  # Causal: forward over the final right-padded sequences gives every step's logits at once.
  full = np.zeros((B, max(map(len, seqs))), np.int32)
  for b, s in enumerate(seqs):
    full[b, :len(s)] = s
  expected = np.asarray(jax.jit(q.forward, static_argnums=0)(config, params, full))
  for b, s in enumerate(seqs):
    np.testing.assert_allclose(np.stack(cached[b]), expected[b, :len(s) - 1], atol=1e-4,
                               rtol=1e-4)


def test_loop_logprobs_equal_forward(engine):
  """The compiled loop's tokens are the argmax and its logprobs the log-softmax of `forward`,
  for the unrolled decode layout and the params as given (scanned layers)."""
  config, params = engine.config, engine.params
  prompts = _prompts(config.vocab_size, (4, 10))
  scanned = Engine(*_restack(config, params), eos_token_ids=(), layout="as_is")
  assert "layers" in scanned.params
  forward = jax.jit(q.forward, static_argnums=0)
  for eng in (engine, scanned):
    results = eng.generate(prompts, SamplingParams(max_new_tokens=6))
    for p, r in zip(prompts, results):
      seq = p + r.output_ids
      logp = np.asarray(jax.nn.log_softmax(forward(config, params, jnp.asarray([seq]))[0]))
      steps = logp[len(p) - 1:-1]
      np.testing.assert_array_equal(np.argmax(steps, -1), r.output_ids)
      np.testing.assert_allclose(r.logprobs, steps[np.arange(6), r.output_ids], atol=1e-4)


def _restack(config, params):
  """The scanned layout (layers stacked under "layers") of unrolled params."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[
      params[f"layers_{i}"] for i in range(config.num_hidden_layers)])
  return config.replace(scan_layers=True), out


def test_row_output_does_not_depend_on_batch(engine):
  """A request gives the same tokens alone and in batches of other prompts (greedy and sampled)."""
  prompts = _prompts(engine.config.vocab_size, (7, 2, 13, 5))
  greedy, sampled = SamplingParams(max_new_tokens=9), SamplingParams(
      max_new_tokens=9, temperature=1.0, seed=11)
  batch = engine.generate(prompts, [greedy, sampled, greedy, sampled])
  for i, sp in enumerate([greedy, sampled, greedy, sampled]):
    alone, = engine.generate([prompts[i]], sp)
    assert alone.output_ids == batch[i].output_ids
    np.testing.assert_allclose(alone.logprobs, batch[i].logprobs, atol=1e-5)
  reordered = engine.generate(prompts[::-1], [sampled, greedy, sampled, greedy])
  assert [r.output_ids for r in reordered[::-1]] == [r.output_ids for r in batch]


def test_stop_token_ends_only_its_row(engine):
  """A row's stop token (per-request or EOS) ends that row with "stop"; the others run on."""
  prompts = _prompts(engine.config.vocab_size, (6, 3, 9))
  base = engine.generate(prompts, SamplingParams(max_new_tokens=10))
  stop = base[0].output_ids[3]
  first = base[0].output_ids.index(stop)
  params = [SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)),
            SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10)]
  out = engine.generate(prompts, params)
  assert out[0].output_ids == base[0].output_ids[:first + 1] and out[0].finish_reason == "stop"
  assert len(out[0].logprobs) == first + 1
  for r, b in zip(out[1:], base[1:]):
    assert r.output_ids == b.output_ids and r.finish_reason == "length"
  # The same id as the engine's EOS stops every row that emits it, unless ignore_eos.
  eos_engine = Engine(engine.config, engine.params, eos_token_ids=(stop,), layout="as_is")
  eos_out = eos_engine.generate(prompts, SamplingParams(max_new_tokens=10))
  for r, b in zip(eos_out, base):
    n = b.output_ids.index(stop) + 1 if stop in b.output_ids else 10
    assert r.output_ids == b.output_ids[:n]
  ignored = eos_engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
  assert [r.output_ids for r in ignored] == [b.output_ids for b in base]


@pytest.mark.parametrize("static", [False, True])
def test_per_row_settings_share_one_compilation(engine, static):
  """Per-row max_new_tokens and sampling settings never recompile; the static engine buckets
  prompt lengths (bucket 16 here); the paged engine's steps here are decodes or prompt chunks of
  at most 16 tokens (a 22-token step is cut to 16 by `fit_tokens`), so at most two of its token
  buckets (8 and 16)."""
  if static:
    engine = StaticEngine(engine.config, engine.params, eos_token_ids=(), layout="as_is")
  else:  # a fresh engine without prefix caching: cache hits would shorten the prompt steps
    engine = Engine(engine.config, engine.params, eos_token_ids=(), layout="as_is",
                    enable_prefix_caching=False)
  prompts = _prompts(engine.config.vocab_size, (3, 12, 7))
  sps = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, top_p=p, seed=s)
         for n, t, k, p, s in ((2, 0.0, 0, 1.0, 0), (9, 0.7, 5, 1.0, 1), (5, 1.3, 0, 0.9, 2))]
  out = engine.generate(prompts, sps)
  assert [len(r.output_ids) for r in out] == [2, 9, 5]
  compiled = engine.stats["num_compilations"]
  engine.generate(prompts[::-1], [dataclasses.replace(s, seed=7, max_new_tokens=3) for s in sps])
  engine.generate(_prompts(engine.config.vocab_size, (10, 5, 1)), sps)  # same buckets
  assert engine.stats["num_compilations"] == compiled
  if static:
    assert compiled == 2 and all(k[2] == 16 for k in engine.compile_seconds)  # prompt bucket
  else:
    assert compiled <= 2


@pytest.mark.parametrize("mesh_text,rules", [("data=2,fsdp=2,tensor=2", "fsdp_tp"),
                                             ("data=2,fsdp=4", "fsdp")])
def test_sharded_generation_matches_one_device(engine, mesh_text, rules):
  """On 8 CPU devices (a replica per data index, weights FSDP / tensor parallel within it)
  tokens are unchanged."""
  from qwen2_jax import sharding
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_text))
  prompts = _prompts(engine.config.vocab_size, (4, 9, 2, 6))
  sp = SamplingParams(max_new_tokens=6)
  sharded = Engine(engine.config, engine.params, eos_token_ids=(), mesh=mesh, rules=rules)
  placed = [r.params["layers_0"]["mlp"]["gate_proj"].sharding.device_set
            for r in sharded._replicas]  # pylint: disable=protected-access
  assert len(placed) == mesh.shape["data"] and len(set().union(*placed)) == 8
  assert [r.output_ids for r in sharded.generate(prompts, sp)] == \
      [r.output_ids for r in engine.generate(prompts, sp)]


# ------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("prompt,kwargs,error,param", [
    ([1] * 600, {}, validation.PromptTooLongError, "prompt"),
    ([1] * 500, {"max_new_tokens": 13}, validation.ContextOverflowError, "max_new_tokens"),
    ([], {}, validation.EmptyPromptError, "prompt"),
    ([1, -1], {}, validation.TokenIdError, "prompt_ids"),
    ([1, 257], {}, validation.TokenIdError, "prompt_ids"),
    ([1, 2.5], {}, validation.TokenIdError, "prompt_ids"),
    ([1], {"stop_token_ids": (257,)}, validation.InvalidParameterError, "stop_token_ids"),
])
def test_request_validation_raises_named_errors(engine, prompt, kwargs, error, param):
  """Context / prompt / token-id problems raise their typed error naming the parameter."""
  sampling = [SamplingParams(max_new_tokens=1), SamplingParams(**{"max_new_tokens": 1, **kwargs})]
  with pytest.raises(error) as info:
    engine.generate([[1, 2, 3], prompt], sampling)
  assert info.value.param == param and info.value.index == 1
  assert isinstance(info.value, ValueError) and param in str(info.value)


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"stop_token_ids": (-2,)}, "stop_token_ids"), ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": "12"}, "stop_token_ids"), ({"stop_token_ids": {"a": 1}}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"), ({"max_new_tokens": True}, "max_new_tokens"),
])
def test_sampling_validation_raises_named_errors(kwargs, param):
  """Bad sampling settings raise InvalidParameterError naming the field, at construction."""
  with pytest.raises(validation.InvalidParameterError) as info:
    SamplingParams(**kwargs)
  assert info.value.param == param and param in str(info.value)
  assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_errors_name_their_place_in_one_line():
  """An error says where it comes from: a request index, a file:line, or a renamed flag; its
  message is one line whatever it was given."""
  e = validation.InvalidParameterError("top_k", "must be >= 0,\ngot -1")
  assert str(e) == "top_k: must be >= 0, got -1"
  assert str(e.at(3)) == "request 3: top_k: must be >= 0, got -1" and e.at(3).index == 3
  assert str(e.in_file("in.jsonl", 7)) == "in.jsonl:7: top_k: must be >= 0, got -1"
  assert str(e.renamed("--top-k")) == "--top-k: must be >= 0, got -1"
  assert type(e.in_file("x", 1)) is validation.InvalidParameterError


@pytest.mark.parametrize("settings,param", [
    ({"max_batch_size": 0}, "max_batch_size"), ({"max_batch_size": -1}, "max_batch_size"),
    ({"max_batch_size": 2.0}, "max_batch_size"), ({"max_batch_size": 1, "max_context": 0},
                                                  "max_context"),
    ({"max_batch_size": 1, "max_context": 513, "limit": 512}, "max_context"),
    ({"max_batch_size": 1, "max_context": 64, "max_new_tokens": 64}, "max_new_tokens"),
])
def test_engine_settings_are_validated(settings, param):
  """Batch size >= 1, context in [1, the model's], room for a prompt: errors name the setting."""
  with pytest.raises(validation.InvalidParameterError) as info:
    validation.check_engine_settings(**settings)
  assert info.value.param == param
  validation.check_engine_settings(max_batch_size=1, max_context=512, limit=512,
                                   max_new_tokens=511)


def test_context_limit_of_rope_scaling_and_dca():
  """The model's context: max_position_embeddings; times the factor under YaRN (of its original
  length) or linear scaling; no limit under Dual Chunk Attention."""
  base = q.get_preset("qwen2-tiny", max_position_embeddings=4096)
  assert validation.context_limit(base) == 4096
  yarn = base.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 1024})
  assert validation.context_limit(yarn) == 4096
  assert validation.context_limit(base.replace(rope_scaling={"type": "linear", "factor": 2.0})) \
      == 8192
  assert validation.context_limit(enable_dual_chunk_attention(base)) is None


def test_engine_max_context_is_enforced(hf_tiny):
  """A smaller max_context is enforced exactly: prompt + new tokens == context is accepted."""
  _, config, params = hf_tiny
  eng = Engine(config, params, eos_token_ids=(), max_context=20)
  r, = eng.generate([[1] * 15], SamplingParams(max_new_tokens=5))
  assert len(r.output_ids) == 5
  with pytest.raises(validation.ContextOverflowError):
    eng.generate([[1] * 15], SamplingParams(max_new_tokens=6))
