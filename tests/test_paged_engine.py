"""Continuous batching: the host-side pages / prefix cache / scheduler (pure Python, property
style over random request streams), the paged model step against `forward`, and the engine
against `transformers` generate and the static engine."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax.config import enable_dual_chunk_attention
from qwen2_jax.infer import Engine, SamplingParams, StaticEngine, validation
from qwen2_jax.infer import engine as engine_lib
from qwen2_jax.infer import paged
from qwen2_jax.infer.paged import KVCacheTooSmallError, PagePool, PoolExhaustedError, Scheduler
from qwen2_jax.model import PagedKVCache, Qwen2ForCausalLM
from hf_reference import make_hf_qwen2


# ------------------------------------------------------------------------- the host-side parts

def test_page_pool_refcounts_and_named_error_when_empty():
  """Pages are handed out once; shared pages need every release; an empty pool raises
  PoolExhaustedError; cached unreferenced pages are reused least recently released first."""
  pool = PagePool(3)
  a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
  assert sorted([a, b, c]) == [0, 1, 2]
  with pytest.raises(PoolExhaustedError):
    pool.allocate()
  pool.acquire(a)
  pool.release(a, cached=False)
  assert pool.num_available == 0  # still referenced once
  pool.release(a, cached=False)
  pool.release(b, cached=True)
  pool.release(c, cached=True)
  pool.check()
  assert pool.allocate() == a  # free pages first
  evicted = []
  pool.on_evict = evicted.append
  assert pool.allocate() == b and evicted == [b]  # then the least recently released cached page
  with pytest.raises(RuntimeError):
    pool.release(a, cached=False) or pool.release(a, cached=False)


def _fake_token(rid: int, index: int) -> int:
  """The 'model' of the scheduler tests: request rid's index-th output token."""
  return (rid * 7919 + index * 104729) % 50 + 2


def _drain(sched: Scheduler, requests, *, stop_id: int | None = None, max_steps: int = 10000):
  """Runs `requests` [(prompt, max_new)] through `sched` with `_fake_token`; checks the page
  invariants after every call and the plan's limits; returns {rid: (output, finish)}."""
  for rid, (prompt, max_new) in enumerate(requests):
    sched.add(rid, prompt, max_new, () if stop_id is None else (stop_id,))
  out = {}
  for _ in range(max_steps):
    plan = sched.schedule()
    sched.check()
    if plan is None:
      break
    assert plan.num_tokens <= sched.max_num_batched_tokens
    assert len(plan.seqs) <= sched.max_num_seqs
    assert len(set(map(id, plan.seqs))) == len(plan.seqs)
    ps = sched.page_size
    for seq, start, n in zip(plan.seqs, plan.starts, plan.counts):
      assert n >= 1 and start == seq.num_computed and start + n <= len(seq.tokens)
      written = {seq.pages[p // ps] for p in range(start, start + n)}
      assert all(sched.pool.refs[p] == 1 for p in written), "a shared page would be written"
    # Every running sequence that is decoding gets its token (decode first).
    for seq in sched.running:
      if seq.num_left == 1:
        assert seq in plan.seqs
    arrays = sched.arrays(plan, sched.max_num_batched_tokens, sched.max_num_seqs)
    assert arrays.cu_q_lens[len(plan.seqs)] == plan.num_tokens
    sampled = [_fake_token(s.rid, len(s.output)) for s in plan.seqs]
    for seq in sched.complete(plan, sampled, [0.0] * len(sampled)):
      out[seq.rid] = (seq.output, seq.finish_reason)
    sched.check()
  else:
    raise AssertionError("did not drain")
  assert not sched.has_work
  assert sched.pool.num_available == sched.pool.num_pages, "a page was not returned"
  assert not sched.pool.refs.any()
  return out


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_page_invariants_over_random_streams(seed):
  """Random request streams (shared prefixes, tiny pools forcing preemption, small budgets, steps
  cut by `fit_tokens`): no page is owned twice or written while shared, budgets and slots hold,
  every decode is in its step, every page is back when the stream drains, and each request's
  output is what it would be alone."""
  rng = np.random.default_rng(seed)
  ps = int(rng.choice([1, 2, 4, 8]))
  n = int(rng.integers(1, 25))
  base = rng.integers(0, 50, 40).tolist()
  requests = []
  for _ in range(n):
    shared = int(rng.integers(0, 40))
    prompt = base[:shared] + rng.integers(0, 50, int(rng.integers(1 if shared == 0 else 0,
                                                                  20))).tolist()
    requests.append((prompt or [1], int(rng.integers(1, 20))))
  need = max(paged.pages_for(paged.tokens_to_cache(len(p), m), ps) for p, m in requests)
  num_pages = need + int(rng.integers(0, 3 * need))
  S = int(rng.integers(1, 6))
  sched = Scheduler(num_pages=num_pages, page_size=ps, max_num_seqs=S,
                    max_num_batched_tokens=S + int(rng.integers(0, 30)), pages_per_seq=need,
                    enable_prefix_caching=bool(rng.integers(0, 2)) or seed == 0)
  if seed >= 3:  # steps cut to "buckets" (multiples of 4 here), as the engine's fit_tokens does
    planned = []
    sched.fit_tokens = lambda k: planned.append(k) or max(k - k % 4, 1)
  stop = 7 if seed % 2 else None
  out = _drain(sched, requests, stop_id=stop)
  for rid, (prompt, max_new) in enumerate(requests):
    expected = []
    for i in range(max_new):
      expected.append(_fake_token(rid, i))
      if expected[-1] == stop:
        break
    assert out[rid][0] == expected
    assert out[rid][1] == ("stop" if expected[-1] == stop else "length")
  if seed >= 3:
    assert any(k % 4 for k in planned)  # some steps were cut
  # A second stream through the same scheduler (cached pages from the first) drains as well.
  _drain(sched, requests[::-1], stop_id=stop)


def test_scheduler_preempts_the_latest_and_reuses_prefix_pages():
  """A pool too small for all: the most recently admitted sequence is preempted and recomputed
  later; a shared prompt prefix is computed once and hit by later requests."""
  sched = Scheduler(num_pages=6, page_size=2, max_num_seqs=3, max_num_batched_tokens=64,
                    pages_per_seq=8)
  prompt = list(range(10, 18))  # 4 full blocks
  out = _drain(sched, [(prompt, 4), (prompt, 4), (prompt + [3], 4)])
  assert sched.num_preemptions > 0
  assert sched.prefix.hit_tokens > 0
  assert [len(out[i][0]) for i in range(3)] == [4, 4, 4]


def test_request_too_big_for_the_pool_is_refused_by_name():
  """check_fits: a request whose prompt + max_new_tokens can never fit raises
  KVCacheTooSmallError naming max_new_tokens, in one line; one that just fits is accepted."""
  sched = Scheduler(num_pages=4, page_size=4, max_num_seqs=2, max_num_batched_tokens=8,
                    pages_per_seq=16)
  sched.check_fits(10, 7)  # 16 slots = 4 pages
  with pytest.raises(KVCacheTooSmallError) as info:
    sched.check_fits(10, 8)
  assert info.value.param == "max_new_tokens" and "\n" not in str(info.value)
  assert isinstance(info.value, validation.GenerationInputError)


# ------------------------------------------------------------------------- the paged model step

def _paged_forward_chunks(config, params, seqs, chunks, page_size, num_pages, seed=0):
  """Runs sequences through the paged model in steps; step j computes chunks[j][i] tokens of
  sequence i (0: none), on randomly permuted pages. Returns each sequence's logits [len, V]."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(num_pages)
  pps = max(paged.pages_for(len(s), page_size) for s in seqs)
  tables = [perm[i * pps:(i + 1) * pps] for i in range(len(seqs))]
  L, K, D = config.num_hidden_layers, config.num_key_value_heads, config.head_size
  k = jnp.zeros((L, num_pages, K, page_size, D))
  v = jnp.zeros_like(k)
  model = Qwen2ForCausalLM(config)
  apply = jax.jit(lambda p, ids, pos, cache, li: model.apply({"params": p}, ids, pos, None,
                                                             cache, li))
  done = [0] * len(seqs)
  logits = [[] for _ in seqs]
  for step in chunks:
    ids, pos, slots, kv_lens, cu, rows = [], [], [], [], [0], []
    for i, n in enumerate(step):
      if n == 0:
        continue
      p = np.arange(done[i], done[i] + n)
      ids += [seqs[i][j] for j in p]
      pos += p.tolist()
      slots += (tables[i][p // page_size] * page_size + p % page_size).tolist()
      kv_lens.append(done[i] + n)
      cu.append(cu[-1] + n)
      rows.append(i)
      done[i] += n
    T = 16  # one shape for every step; the padding tokens' slots are dropped
    pad = lambda x, val, m: np.array(list(x) + [val] * (m - len(x)), np.int32)
    S = len(seqs)
    cache = PagedKVCache(k, v, pad(slots, num_pages * page_size, T), pad(kv_lens, 0, S),
                         np.stack([tables[i] for i in rows] + [tables[0]] * (S - len(rows))
                                  ).astype(np.int32),
                         pad(cu, cu[-1], S + 1), np.array([len(rows)], np.int32))
    out, (k, v) = apply(params, pad(ids, 0, T)[None], pad(pos, 0, T)[None], cache,
                        np.arange(T, dtype=np.int32)[None])
    for r, i in enumerate(rows):
      logits[i].append(np.asarray(out[0, cu[r]:cu[r + 1]]))
  return [np.concatenate(x) for x in logits]


@pytest.mark.parametrize("variant", ["scan", "unrolled_sliding_window",
                                     "unrolled_sliding_window_jnp", "dca"])
def test_paged_step_logits_equal_full_forward(variant):
  """Chunked prefill and decode steps over randomly placed pages (two sequences, interleaved,
  ragged chunks) give the logits of `forward` over each whole sequence. On the CPU the paged
  attention is the C++ kernel where it is built, and the jnp blocked path with
  attention_impl "xla" (the "_jnp" variant)."""
  overrides = {"initializer_range": 0.3, "scan_layers": variant == "scan"}
  if variant.startswith("unrolled_sliding_window"):
    overrides.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
  if variant.endswith("_jnp"):
    overrides.update(attention_impl="xla")
  config = q.get_preset("qwen2-tiny", **overrides)
  if variant == "dca":
    config = enable_dual_chunk_attention(config, chunk_size=8, local_size=2)
  params = q.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, config.vocab_size, 17).tolist(),
          rng.integers(0, config.vocab_size, 11).tolist()]
  chunks = [(5, 0), (4, 3), (1, 6), (3, 1), (1, 1), (3, 0)]  # prefill chunks, then decodes
  got = _paged_forward_chunks(config, params, seqs, chunks, page_size=4, num_pages=12)
  for s, g in zip(seqs, got):
    expected = np.asarray(q.forward(config, params, jnp.asarray([s]))[0])
    np.testing.assert_allclose(g, expected, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
  """(torch model, config, params) of a tiny random untied Qwen2."""
  path = tmp_path_factory.mktemp("paged_tiny")
  model = make_hf_qwen2(path, seed=5)
  config, params = q.load_hf_checkpoint(path, show_progress=False)
  return model, config, params


def _hf_greedy_each(model, prompts, new_tokens):
  """transformers greedy generate, one request at a time (no padding)."""
  import torch  # pylint: disable=import-outside-toplevel
  model.generation_config.eos_token_id = None
  out = []
  with torch.no_grad():
    for p, n in zip(prompts, new_tokens):
      ids = torch.tensor([p])
      g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, pad_token_id=0)
      out.append(g[0, len(p):].numpy().tolist())
  return out


def _stream(vocab, n, seed, max_prompt=20, max_new=9, prefix=None):
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, vocab, int(rng.integers(1, max_prompt))).tolist() for _ in range(n)]
  if prefix is not None:
    prompts = [prefix + p for p in prompts]
  news = [int(rng.integers(1, max_new)) for _ in range(n)]
  return prompts, news


def _assert_engine_equals_hf(model, eng, prompts, news, orders):
  expected = _hf_greedy_each(model, prompts, news)
  compiled = None
  for order in orders:
    res = eng.generate([prompts[i] for i in order],
                       [SamplingParams(max_new_tokens=news[i]) for i in order])
    for r, i in zip(res, order):
      assert r.output_ids == expected[i], f"request {i} (order {order})"
      assert r.finish_reason == "length"
    eng.scheduler.check()
    assert eng.scheduler.pool.num_available == eng.num_pages
    if compiled is None:
      compiled = eng.stats["num_compilations"]
    assert eng.stats["num_compilations"] == compiled  # requests come and go: no recompiles
    assert compiled <= len(eng.token_buckets) * len(_table_widths(eng))


def _table_widths(eng):
  return {int(k.split("pages_per_seq=")[1].rstrip(")")) for k in eng.stats["programs"]}


def _token_counts(eng):
  return {int(k.split("T=")[1].split(",")[0]) for k in eng.stats["programs"]}


def test_step_token_buckets(hf_tiny):
  """A step of n tokens is padded to max_num_seqs, then powers of two, capped at
  max_num_batched_tokens; a stream with decode steps and prefill chunks of several sizes
  compiles one program per bucket used, every T among the buckets."""
  _, config, params = hf_tiny
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=3, max_num_batched_tokens=24,
               page_size=4)
  assert eng.token_buckets == [3, 4, 8, 16, 24]
  assert [eng.token_bucket(n) for n in (1, 3, 4, 5, 9, 16, 17, 24)] == [3, 3, 4, 8, 16, 16, 24, 24]
  # Steps filling under 3/4 of their bucket are cut to the bucket below.
  assert [eng.fit_tokens(n) for n in (2, 3, 5, 6, 9, 12, 13, 17, 18, 24)] == \
      [2, 3, 4, 6, 8, 12, 13, 16, 18, 24]
  prompts, news = _stream(config.vocab_size, 8, 5, max_prompt=30, max_new=6)
  eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
  used = _token_counts(eng)
  assert used <= set(eng.token_buckets) and len(used) >= 3


def test_steps_with_few_sequences_use_fewer_rows(hf_tiny, monkeypatch):
  """With max_num_seqs above the smallest bucket (16), a step of fewer tokens is padded to the
  power of two covering them (16, 32) or to max_num_seqs, with as many rows: a batch whose
  sequences finish one by one runs its tail in smaller programs, and generates what an engine
  with one decode program (max_num_seqs 16) generates (tokens, logprobs within 1e-5). On TPU
  such steps keep max_num_seqs (one decode program)."""
  _, config, params = hf_tiny
  kw = dict(eos_token_ids=(), max_num_batched_tokens=64, page_size=4)
  eng = Engine(config, params, max_num_seqs=40, **kw)
  assert eng.token_buckets == [16, 32, 40, 64]
  assert [eng.token_bucket(n) for n in (1, 16, 17, 32, 33, 40, 41)] == [16, 16, 32, 32, 40, 40,
                                                                        64]
  assert [eng.row_bucket(t) for t in (16, 32, 40, 64)] == [16, 32, 40, 40]
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, config.vocab_size, int(rng.integers(1, 5))).tolist()
             for _ in range(36)]
  sps = [SamplingParams(max_new_tokens=2 + i) for i in range(36)]  # one finishes per step
  got = eng.generate(prompts, sps)
  programs = {(int(k.split("T=")[1].split(",")[0]), int(k.split("rows=")[1].split(",")[0]))
              for k in eng.stats["programs"]}
  assert {(16, 16), (32, 32), (40, 40)} <= programs, programs
  assert all(r == min(t, 40) for t, r in programs)
  small = Engine(config, params, max_num_seqs=16, **kw)
  want = small.generate(prompts, sps)
  assert [r.output_ids for r in got] == [r.output_ids for r in want]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                             np.concatenate([r.logprobs for r in want]), atol=1e-5)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  tpu = Engine(config, params, max_num_seqs=40, layout="as_is", **kw)
  assert tpu.token_buckets == [40, 64]
  assert [tpu.token_bucket(n) for n in (1, 17, 40, 41)] == [40, 40, 40, 64]


def test_greedy_equals_transformers_for_a_stream_in_several_orders(hf_tiny):
  """11 requests (mixed prompt and output lengths) through 3 slots with a 12-token budget and a
  pool small enough to preempt: every request's greedy tokens equal transformers' generate of
  that request alone, in three admission orders."""
  model, config, params = hf_tiny
  prompts, news = _stream(config.vocab_size, 11, 0)
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=3, max_num_batched_tokens=12,
               page_size=4, num_pages=9)
  rng = np.random.default_rng(0)
  orders = [list(range(11)), list(range(11))[::-1], rng.permutation(11).tolist()]
  _assert_engine_equals_hf(model, eng, prompts, news, orders)
  assert eng.stats["preemptions"] > 0


@pytest.mark.parametrize("impl", ["dense", "ragged_dot"])
def test_moe_greedy_equals_transformers_for_a_stream(tmp_path, impl):
  """Qwen2-MoE (shared expert, top-2 of 6, one dense layer) through the paged engine."""
  from test_moe import make_hf_qwen2_moe  # pylint: disable=import-outside-toplevel
  model = make_hf_qwen2_moe(tmp_path, seed=2, mlp_only_layers=[1])
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False, moe_impl=impl)
  assert config.is_moe and config.moe_impl == impl
  prompts, news = _stream(config.vocab_size, 6, 1, max_prompt=14, max_new=7)
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8,
               page_size=4)
  _assert_engine_equals_hf(model, eng, prompts, news, [list(range(6)), [5, 3, 1, 0, 2, 4]])


def test_logprobs_equal_forward_with_preemption_and_prefix_hits(hf_tiny):
  """With a shared prompt prefix (prefix-cache hits) and a pool that forces preemption and
  recomputation, each token is the argmax of `forward` over the sequence so far and its
  logprob is that of forward's log-softmax."""
  _, config, params = hf_tiny
  prefix = np.random.default_rng(7).integers(0, config.vocab_size, 13).tolist()
  prompts, news = _stream(config.vocab_size, 7, 2, max_prompt=6, max_new=12, prefix=prefix)
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=4, max_num_batched_tokens=16,
               page_size=4, num_pages=12)
  res = eng.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
  st = eng.stats
  assert st["preemptions"] > 0 and st["prefix_cache_hit_tokens"] >= 12
  # Every step is timed under its padded token count.
  assert sum(v["steps"] for v in st["step_time"].values()) == st["steps"]
  assert {int(k[2:]) for k in st["step_time"]} <= set(eng.token_buckets)
  assert all(v["seconds"] > 0 for v in st["step_time"].values())
  forward = jax.jit(q.forward, static_argnums=0)
  for p, n, r in zip(prompts, news, res):
    seq = p + r.output_ids
    logp = np.asarray(jax.nn.log_softmax(forward(config, params, jnp.asarray([seq]))[0]))
    steps = logp[len(p) - 1:-1]
    np.testing.assert_array_equal(np.argmax(steps, -1), r.output_ids)
    np.testing.assert_allclose(r.logprobs, steps[np.arange(n), r.output_ids], atol=1e-4)


@pytest.mark.slow
def test_step_table_widths_are_bucketed_without_changing_results(hf_tiny, monkeypatch):
  """Off TPU each step's block table is the power of two of pages covering its longest sequence
  (from a floor of 8 tokens here): short and long requests run under several widths, every
  width is compiled once (the count in `stats`), and tokens / logprobs equal those of the same
  engine with one fixed width (logprobs 1e-5)."""
  _, config, params = hf_tiny
  monkeypatch.setattr(engine_lib, "_MIN_TABLE_TOKENS", 8)
  prompts, news = _stream(config.vocab_size, 6, 11, max_prompt=30, max_new=12)
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  # No prefix caching: a second run then plans the same steps (cache hits would shorten chunks).
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=3, max_num_batched_tokens=16,
               page_size=4, max_context=64, enable_prefix_caching=False)
  got = eng.generate(prompts, sps)
  widths = _table_widths(eng)
  assert len(widths) > 1 and max(widths) <= eng.scheduler.pages_per_seq
  assert eng.stats["num_compilations"] <= len(eng.token_buckets) * len(widths)
  compiled = eng.stats["num_compilations"]
  assert [r.output_ids for r in eng.generate(prompts, sps)] == [r.output_ids for r in got]
  assert eng.stats["num_compilations"] == compiled  # a second run compiles nothing new
  fixed = Engine(config, params, eos_token_ids=(), max_num_seqs=3, max_num_batched_tokens=16,
                 page_size=4, max_context=64)
  fixed._bucket_tables = False  # pylint: disable=protected-access
  want = fixed.generate(prompts, sps)
  assert len(_table_widths(fixed)) == 1
  assert [r.output_ids for r in got] == [r.output_ids for r in want]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                             np.concatenate([r.logprobs for r in want]), atol=1e-5)


def test_sampled_tokens_do_not_depend_on_neighbours_or_admission(hf_tiny):
  """A sampled request's tokens equal those of the same request alone and those of the static
  engine (same seed): the key of output t is fold_in(key(seed), t) everywhere."""
  _, config, params = hf_tiny
  prompts, news = _stream(config.vocab_size, 5, 3, max_new=10)
  sps = [SamplingParams(max_new_tokens=n, temperature=1.0, top_k=0 if i % 2 else 20,
                        top_p=1.0 if i % 3 else 0.9, seed=100 + i)
         for i, n in enumerate(news)]
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8,
               page_size=4)
  batch = eng.generate(prompts, sps)
  reversed_ = eng.generate(prompts[::-1], sps[::-1])[::-1]
  static = StaticEngine(config, params, eos_token_ids=()).generate(prompts, sps)
  for i in (0, 3):
    alone, = eng.generate([prompts[i]], sps[i])
    assert alone.output_ids == batch[i].output_ids
  assert [r.output_ids for r in reversed_] == [r.output_ids for r in batch]
  assert [r.output_ids for r in static] == [r.output_ids for r in batch]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in static]),
                             np.concatenate([r.logprobs for r in batch]), atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's split step")
def test_split_step_equals_the_one_program_step(hf_tiny):
  """On the CPU backend a step is two programs, the model (its float32 logits written into a
  donated buffer per row count) and the sampler: the same requests through the one-program step
  give the same tokens and logprobs, greedy and sampled rows mixed; the model programs alias
  their logits output to the donated buffer, so steps write them into the same memory."""
  _, config, params = hf_tiny
  prompts, news = _stream(config.vocab_size, 7, 11, max_new=10)
  sps = [SamplingParams(max_new_tokens=n, temperature=0.0 if i % 2 else 0.8,
                        top_k=0 if i % 3 else 5, seed=40 + i) for i, n in enumerate(news)]
  kw = dict(eos_token_ids=(), max_num_seqs=3, max_num_batched_tokens=16, page_size=4)
  split = Engine(config, params, **kw)
  one = Engine(config, params, **kw)
  one._split_sampler = False  # pylint: disable=protected-access
  got, want = split.generate(prompts, sps), one.generate(prompts, sps)
  assert [r.output_ids for r in got] == [r.output_ids for r in want]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                             np.concatenate([r.logprobs for r in want]), rtol=1e-6, atol=1e-6)
  assert split.stats["num_sampler_compilations"] >= 1
  assert one.stats["num_sampler_compilations"] == 0
  buffers = split._replicas[0].logits_buffers  # pylint: disable=protected-access
  assert buffers and all(b.shape == (s, config.vocab_size) and b.dtype == jnp.float32
                         for s, b in buffers.items())
  for program in split._replicas[0].compiled.values():  # pylint: disable=protected-access
    header = program.model.as_text().split("\n", 1)[0]
    # Output 0 (the logits) reuses a parameter (the donated buffer), as outputs 1 and 2 (the
    # pools) do.
    aliases = header.split("input_output_alias={", 1)[1].split("}, entry", 1)[0]
    assert "{0}: (" in aliases and "{1}: (" in aliases and "{2}: (" in aliases, header[:300]
  before = {s: b.unsafe_buffer_pointer() for s, b in buffers.items()}
  again = split.generate(prompts[:3], sps[:3])  # another number of steps
  assert [r.output_ids for r in again] == [r.output_ids for r in got[:3]]
  assert {s: b.unsafe_buffer_pointer() for s, b in buffers.items()} == before


def test_finish_reasons_and_a_pool_too_small(hf_tiny):
  """Stop ids end a request with "stop" (the stop token included), EOS too unless ignore_eos,
  max_new_tokens with "length"; a request the pool can never hold is refused before any step
  with KVCacheTooSmallError naming the request."""
  _, config, params = hf_tiny
  prompts, _ = _stream(config.vocab_size, 3, 4)
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8,
               page_size=4, num_pages=16)
  base = eng.generate(prompts, SamplingParams(max_new_tokens=8))
  stop = base[1].output_ids[4]
  first = base[1].output_ids.index(stop)
  out = eng.generate(prompts, [SamplingParams(max_new_tokens=8),
                               SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)),
                               SamplingParams(max_new_tokens=3)])
  assert out[0].output_ids == base[0].output_ids and out[0].finish_reason == "length"
  assert out[1].output_ids == base[1].output_ids[:first + 1] and out[1].finish_reason == "stop"
  assert out[2].output_ids == base[2].output_ids[:3] and out[2].finish_reason == "length"
  eng.eos_token_ids = (stop,)
  try:
    eos = eng.generate([prompts[1]], SamplingParams(max_new_tokens=8))[0]
    ign = eng.generate([prompts[1]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
  finally:
    eng.eos_token_ids = ()
  assert eos.output_ids == out[1].output_ids and eos.finish_reason == "stop"
  assert ign.output_ids == base[1].output_ids
  steps = eng.stats["steps"]
  with pytest.raises(KVCacheTooSmallError) as info:  # 16 pages of 4 = 64 slots
    eng.generate([[1, 2], [3] * 40], [SamplingParams(max_new_tokens=5),
                                       SamplingParams(max_new_tokens=26)])
  assert info.value.index == 1 and info.value.param == "max_new_tokens"
  assert str(info.value).startswith("request 1: max_new_tokens:") and "\n" not in str(info.value)
  assert eng.stats["steps"] == steps


def test_stream_yields_the_generated_tokens(hf_tiny):
  """`stream` yields the first token alone, then chunks of `interval`: the tokens of generate."""
  _, config, params = hf_tiny
  prompt = list(range(3, 12))
  eng = Engine(config, params, eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8,
               page_size=4)
  sp = SamplingParams(max_new_tokens=10)
  chunks = list(eng.stream(prompt, sp, interval=3))
  assert [len(c) for c in chunks] == [1, 3, 3, 3]
  assert list(itertools.chain(*chunks)) == eng.generate([prompt], sp)[0].output_ids
  assert eng.last_finish_reason == "length"


@pytest.mark.parametrize("mesh_text,rules", [("data=2,fsdp=2,tensor=2", "fsdp_tp"),
                                             ("fsdp=4,tensor=2", "fsdp_tp")])
def test_sharded_engine_matches_one_device(hf_tiny, mesh_text, rules):
  """On 8 CPU devices (weights FSDP + tensor parallel, pools split over KV heads; with data=2
  two replicas of 4 devices each) the tokens equal the unsharded engine's."""
  from qwen2_jax import sharding  # pylint: disable=import-outside-toplevel
  _, config, params = hf_tiny
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string(mesh_text))
  prompts, news = _stream(config.vocab_size, 5, 6)
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  kw = dict(eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8, page_size=4)
  sharded = Engine(config, params, mesh=mesh, rules=rules, **kw)
  replicas = mesh.shape["data"]
  assert sharded.num_replicas == replicas
  got = sharded.generate(prompts, sps)
  devices = set()
  for replica in sharded._replicas:  # pylint: disable=protected-access
    k_pool = replica.pools[0]
    assert len(k_pool.sharding.device_set) == 8 // replicas
    assert k_pool.sharding.spec[2] is not None  # KV heads split
    devices |= k_pool.sharding.device_set
  assert len(devices) == 8
  assert [r.output_ids for r in got] == \
      [r.output_ids for r in Engine(config, params, **kw).generate(prompts, sps)]


def test_decode_compile_options_keep_results():
  """The CPU compiler options of [in, out] kernels (oneDNN matmuls for decode programs, no
  YNNPACK fusions) give the default compile's results (f32, 1e-5) on a 16-row projection +
  softmax."""
  # pylint: disable-next=import-outside-toplevel
  from qwen2_jax.infer.static_engine import compile_lowered
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 96), np.float32))
  w = jnp.asarray(rng.standard_normal((96, 160), np.float32) * 0.1)
  lowered = jax.jit(lambda x, w: jax.nn.softmax(x @ w, axis=-1)).lower(x, w)
  want = np.asarray(lowered.compile()(x, w))
  for decode in (True, False):
    got = compile_lowered(lowered, decode=decode, default_dots=False)(x, w)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_input_minor_layout_round_trips(tmp_path, tied):
  """`decode_layout(input_minor=True)` stores the MLP and head kernels transposed under marked
  names (a tied head is the embedding array itself, not a copy) and `from_input_minor` gives
  back exactly the [in, out] layout; MoE expert stacks keep theirs."""
  from qwen2_jax.infer import static_engine as se  # pylint: disable=import-outside-toplevel
  make_hf_qwen2(tmp_path, seed=3, tie_word_embeddings=tied)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  plain_cfg, plain = se.decode_layout(config, params, input_minor=False)
  minor_cfg, minor = se.decode_layout(config, params, input_minor=True)
  assert plain_cfg == minor_cfg
  mlp = minor["layers_0"]["mlp"]
  assert sorted(mlp) == ["down_proj@input_minor", "gate_proj@input_minor", "up_proj@input_minor"]
  h, f = config.hidden_size, config.intermediate_size
  assert mlp["gate_proj@input_minor"].shape == (f, h)
  assert mlp["down_proj@input_minor"].shape == (h, f)
  assert "q_proj" in minor["layers_0"]["self_attn"]  # attention projections as they were
  head = minor["lm_head@input_minor"]
  assert head.shape == (config.vocab_size, h)
  if tied:
    assert head is minor["embed_tokens"]["embedding"]
  back = se.from_input_minor(minor)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  experts = {"experts": {"gate_proj": jnp.zeros((2, 3, 4))}, "shared_expert": {
      "gate_proj": jnp.zeros((3, 5))}}
  moved = se.to_input_minor({"mlp": experts})["mlp"]
  assert list(moved["experts"]) == ["gate_proj"]
  assert moved["shared_expert"]["gate_proj@input_minor"].shape == (5, 3)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_layout_round_trips(tmp_path, tied):
  """`decode_layout(packed=nr)` stores each float32 MLP kernel, attention projection and the
  head whose width is a multiple of nr as [N / nr, K, nr] panels of its [in, out] matrix under
  marked names (a tied head from the embedding's transpose), q/k/v and gate/up side by side
  under one name each; `model_layout` gives back exactly the model's layout; a width that is not
  a multiple stays plain, and a group fuses only where each of its kernels is packed alike (not
  in MoE expert stacks)."""
  from qwen2_jax.infer import static_engine as se  # pylint: disable=import-outside-toplevel
  from qwen2_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  make_hf_qwen2(tmp_path, seed=3, tie_word_embeddings=tied, vocab_size=256, intermediate_size=48)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  plain_cfg, plain = se.decode_layout(config, params)
  packed_cfg, packed = se.decode_layout(config, params, packed=16)
  assert plain_cfg == packed_cfg
  h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  mlp = packed["layers_0"]["mlp"]
  assert sorted(mlp) == ["down_proj@packed", "gate_up_proj@packed"]
  mlp_plain = plain["layers_0"]["mlp"]
  np.testing.assert_array_equal(  # gate's columns, then up's
      np.asarray(mlp["gate_up_proj@packed"]),
      np.asarray(cpu_matmul.pack(jnp.concatenate([mlp_plain["gate_proj"],
                                                  mlp_plain["up_proj"]], axis=1), 16)))
  assert mlp["down_proj@packed"].shape == (h // 16, f, 16)
  assert packed["lm_head@packed"].shape == (v // 16, h, 16)
  attn = packed["layers_0"]["self_attn"]
  n, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_size
  attn_plain = plain["layers_0"]["self_attn"]
  np.testing.assert_array_equal(  # q's columns, then k's, then v's
      np.asarray(attn["qkv_proj@packed"]),
      np.asarray(cpu_matmul.pack(jnp.concatenate(
          [attn_plain[name].reshape(h, -1) for name in ("q_proj", "k_proj", "v_proj")],
          axis=1), 16)))
  assert attn["o_proj@packed"].shape == (h // 16, n * d, 16)
  assert sorted(attn) == ["k_bias", "o_proj@packed", "q_bias", "qkv_proj@packed", "v_bias"]
  back = se.model_layout(packed, config)
  assert jax.tree.structure(back) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "lm_head@packed" in se.from_input_minor(packed)  # leaves packed names alone
  _, partly = se.decode_layout(config, params, packed=32)  # 48 is not a multiple of 32
  assert sorted(partly["layers_0"]["mlp"]) == ["down_proj@packed", "gate_proj", "up_proj"]
  assert n * d % 32 == 0 and kv * d % 32  # so q packs alone, and k and v stay plain
  assert sorted(partly["layers_0"]["self_attn"]) == [
      "k_bias", "k_proj", "o_proj@packed", "q_bias", "q_proj@packed", "v_bias", "v_proj"]
  moe = {"experts": {"gate_proj": jnp.zeros((2, 16, 32)), "up_proj": jnp.zeros((2, 16, 32))},
         "shared_expert": {"gate_proj": jnp.zeros((16, 32)), "up_proj": jnp.ones((16, 32))}}
  moved = se.to_packed({"mlp": moe}, 16)["mlp"]
  assert list(moved["experts"]) == ["gate_proj", "up_proj"]
  assert list(moved["shared_expert"]) == ["gate_up_proj@packed"]
  assert moved["shared_expert"]["gate_up_proj@packed"].shape == (4, 16, 16)
  mixed = {"gate_proj": jnp.zeros((16, 32)), "up_proj": jnp.zeros((16, 32), jnp.bfloat16),
           "down_proj": jnp.zeros((32, 16))}  # up is not float32: nothing fuses
  assert sorted(se.to_packed({"mlp": mixed}, 16)["mlp"]) == ["down_proj@packed",
                                                              "gate_proj@packed", "up_proj"]


def test_cpu_attention_kernel_generates_the_same(hf_tiny, monkeypatch):
  """The Engine's paged attention through the C++ kernel (attention_impl "auto" on the CPU,
  where the extension is built) and through the jnp blocked path ("xla") give the same greedy
  tokens, and logprobs within 1e-5, over a stream with prompt chunks (longer than the kernel's
  16-query items), decodes and sliding-window layers; the kernel is what "auto" traced, and
  "xla" never traces it."""
  # pylint: disable-next=import-outside-toplevel
  from qwen2_jax.kernels import ragged_paged_attention as rpa
  if not rpa.cpu_extension.available():
    pytest.skip("qwen2_jax._cpu_kernels is not built here (test_cpu_matmul checks it on x86-64)")
  _, config, params = hf_tiny
  config = config.replace(use_sliding_window=True, sliding_window=6, max_window_layers=1)
  prompts, news = _stream(config.vocab_size, 7, 12, max_prompt=60, max_new=12)
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  traced = []
  kernel = rpa.ragged_paged_attention_cpu
  monkeypatch.setattr(rpa, "ragged_paged_attention_cpu",
                      lambda *a, **k: traced.append(1) or kernel(*a, **k))
  out = {}
  for impl in ("xla", "auto"):
    traced.clear()
    eng = Engine(config.replace(attention_impl=impl), params, eos_token_ids=(),
                 max_batch_size=4, max_num_batched_tokens=48, page_size=4)
    out[impl] = eng.generate(prompts, sps)
    assert bool(traced) == (impl == "auto"), impl
  assert [r.output_ids for r in out["auto"]] == [r.output_ids for r in out["xla"]]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in out["auto"]]),
                             np.concatenate([r.logprobs for r in out["xla"]]), atol=1e-5)


def test_cpu_layouts_generate_the_same(tmp_path, monkeypatch):
  """The Engine's CPU layouts ([in, out], input-minor, packed with panels of 8, 16 and this
  CPU's width; each with its compiler options) give the same greedy tokens, and logprobs
  within 1e-5; params stored packed are accepted by a new engine and by update_params. An
  Engine of max_num_seqs < 4 stays [in, out] under input-minor; the StaticEngine packs but is
  never input-minor."""
  from qwen2_jax.infer import static_engine  # pylint: disable=import-outside-toplevel
  from qwen2_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  make_hf_qwen2(tmp_path, seed=5, vocab_size=256, intermediate_size=64, head_dim=16)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  prompts, news = _stream(config.vocab_size, 5, 11)
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  kw = dict(eos_token_ids=(), max_batch_size=4, max_num_batched_tokens=8, page_size=4)
  def marked(tree, mark):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
            if mark in jax.tree_util.keystr(p)]
  def patch(minor, nr):
    for mod in (engine_lib, static_engine):
      monkeypatch.setattr(mod, "cpu_input_minor", lambda: minor)
      monkeypatch.setattr(mod, "cpu_packed_width", lambda *a, **k: nr)
  layouts = [("plain", False, 0), ("input_minor", True, 0)]
  if cpu_matmul.available():  # built on x86-64 (tests/test_cpu_matmul.py checks that)
    layouts += [("packed8", False, 8), ("packed16", False, 16)]
  if cpu_matmul.panel_width() not in (0, 16):
    layouts.append(("packed_cpu", False, cpu_matmul.panel_width()))
  out, stored = {}, {}
  for name, minor, nr in layouts:
    patch(minor, nr)
    eng = Engine(config, params, **kw)
    stored[name] = eng._replicas[0].params  # pylint: disable=protected-access
    layers = config.num_hidden_layers
    assert len(marked(stored[name], "@input_minor")) == (3 * layers + 1 if minor else 0)
    # q/k/v, o, gate/up and down, fused where each part is packed (every width here is a
    # multiple of 8, 16 and 32), and the head
    assert len(marked(stored[name], "@packed")) == (4 * layers + 1 if nr else 0)
    assert not marked(eng.params, "@")  # the model's layout
    out[name] = eng.generate(prompts, sps)
  for name, *_ in layouts[1:]:
    assert [r.output_ids for r in out[name]] == [r.output_ids for r in out["plain"]], name
    np.testing.assert_allclose(np.concatenate([r.logprobs for r in out[name]]),
                               np.concatenate([r.logprobs for r in out["plain"]]), atol=1e-5)
  # Stored (marked) params are accepted as weights: by a new engine and by update_params.
  packing = 16 if cpu_matmul.available() else 0
  patch(False, packing)
  again = Engine(eng.config, stored["input_minor"], **kw)
  again.update_params(stored[layouts[-1][0]])
  assert [r.output_ids for r in again.generate(prompts, sps)] == \
      [r.output_ids for r in out["plain"]]
  # Under input-minor: small engines and the static engine stay [in, out]; the static engine
  # packs where packing is on, and generates the same.
  patch(True, 0)
  small = Engine(config, params, **dict(kw, max_batch_size=1))
  assert not marked(small._replicas[0].params, "@")  # pylint: disable=protected-access
  static = StaticEngine(config, params, eos_token_ids=(), max_batch_size=8)
  assert not marked(static._params, "@")  # pylint: disable=protected-access
  patch(False, packing)
  static = StaticEngine(config, params, eos_token_ids=(), max_batch_size=8)
  # pylint: disable-next=protected-access
  assert len(marked(static._params, "@packed")) == (4 * layers + 1 if packing else 0)
  assert [r.output_ids for r in static.generate(prompts, sps)] == \
      [r.output_ids for r in out["plain"]]


def test_bf16x3_matmuls_generate_the_same(tmp_path, monkeypatch):
  """matmul_precision "high" where `cpu_matmul.amx()` stores every packed kernel as bf16x3 tiles
  (K multiple of 32, N of 16; here all of them) and gives the fp32 engine's greedy tokens, and
  logprobs within 1e-4, on a stream with prompt chunks and decodes; `params` gives the weights
  back to 2^-16 of each; update_params keeps the tiles. Where AMX is missing it keeps fp32
  panels. (`amx()` is patched to True off AMX CPUs: the kernel then runs the same products in
  its portable loop.) Each MLP then runs as one kernel call (`packed_mlp`, SwiGLU inside).
  Another precision name is a named error."""
  from qwen2_jax.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  if not cpu_matmul.available():
    pytest.skip("qwen2_jax._cpu_kernels is not built here (test_cpu_matmul checks it on x86-64)")
  make_hf_qwen2(tmp_path, seed=5, vocab_size=256, intermediate_size=64, head_dim=16)
  config, params = q.load_hf_checkpoint(tmp_path, show_progress=False)
  prompts, news = _stream(config.vocab_size, 6, 13, max_prompt=40, max_new=12)
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  monkeypatch.setattr(engine_lib, "cpu_packed_width", lambda *a, **k: 16)
  kw = dict(eos_token_ids=(), max_batch_size=4, max_num_batched_tokens=24, page_size=4)
  def packed(eng):
    # pylint: disable-next=protected-access
    leaves = jax.tree_util.tree_flatten_with_path(eng._replicas[0].params)[0]
    return [leaf.dtype for p, leaf in leaves if "@packed" in jax.tree_util.keystr(p)]
  layers = config.num_hidden_layers
  monkeypatch.setattr(cpu_matmul, "amx", lambda: False)
  assert packed(Engine(config, params, matmul_precision="high", **kw)) == \
      [jnp.float32] * (4 * layers + 1)
  monkeypatch.setattr(cpu_matmul, "amx", lambda: True)
  fp32 = Engine(config, params, **kw)
  x3 = Engine(config, params, matmul_precision="high", **kw)
  assert packed(fp32) == [jnp.float32] * (4 * layers + 1)
  assert packed(x3) == [jnp.bfloat16] * (4 * layers + 1)
  fused = []  # the bf16x3 tiles run each MLP as one call, SwiGLU inside (F = 64)
  mlp = cpu_matmul.packed_mlp
  monkeypatch.setattr(cpu_matmul, "packed_mlp",
                      lambda *a: fused.append((a[3], a[4])) or mlp(*a))
  want, got = fp32.generate(prompts, sps), x3.generate(prompts, sps)
  assert fused and set(fused) == {(config.intermediate_size, config.hidden_size)}
  assert [r.output_ids for r in got] == [r.output_ids for r in want]
  np.testing.assert_allclose(np.concatenate([r.logprobs for r in got]),
                             np.concatenate([r.logprobs for r in want]), atol=1e-4)
  assert jax.tree.structure(x3.params) == jax.tree.structure(fp32.params)
  for a, b in zip(jax.tree.leaves(x3.params), jax.tree.leaves(fp32.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.all(np.abs(a - b) <= 2.0 ** -16 * np.abs(b)), a.shape
  x3.update_params(params)
  assert packed(x3) == [jnp.bfloat16] * (4 * layers + 1)
  assert [r.output_ids for r in x3.generate(prompts, sps)] == [r.output_ids for r in want]
  with pytest.raises(validation.InvalidParameterError, match="matmul_precision"):
    Engine(config, params, matmul_precision="bf16", **kw)


def test_split_requests_balances_work_and_keeps_equal_prompts_together():
  """Pieces of equal prompts (at most ceil(n / replicas) requests) go largest first to the least
  loaded replica; each replica's indices are in the given order and every request is placed
  once."""
  sp = lambda n: SamplingParams(max_new_tokens=n)
  reqs = [([1, 2, 3], sp(10))] * 4 + [([4], sp(30)), ([5, 6], sp(5)), ([7], sp(5))]
  parts = engine_lib.split_requests(reqs, 2)
  assert sorted(itertools.chain(*parts)) == list(range(7))
  assert all(p == sorted(p) for p in parts)
  assert [0, 1, 2, 3] in parts  # the 4 equal prompts (4 <= ceil(7 / 2)) share a replica
  work = [sum(len(reqs[i][0]) + reqs[i][1].max_new_tokens for i in p) for p in parts]
  assert sorted(work) == [44, 52]
  parts = engine_lib.split_requests([([1], sp(4))] * 6, 3)  # one prompt: split in thirds
  assert parts == [[0, 1], [2, 3], [4, 5]]
  assert engine_lib.split_requests([([1], sp(4))], 2) == [[0], []]


def test_data_parallel_replicas(hf_tiny):
  """Two replicas (data=2 x tensor=4 on 8 CPU devices): sampled tokens equal the one-device
  engine's for the same seeds; both replicas step; a failing check stops both and returns every
  page; update_params reaches both replicas."""
  from qwen2_jax import sharding  # pylint: disable=import-outside-toplevel
  _, config, params = hf_tiny
  mesh = sharding.make_mesh(sharding.MeshConfig.from_string("data=2,tensor=4"))
  prompts, news = _stream(config.vocab_size, 8, 21)
  sps = [SamplingParams(max_new_tokens=n, temperature=0.9, top_k=20, seed=100 + i)
         for i, n in enumerate(news)]
  kw = dict(eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=8, page_size=4)
  dp = Engine(config, params, mesh=mesh, rules="fsdp_tp", **kw)
  one = Engine(config, params, **kw)
  assert [r.output_ids for r in dp.generate(prompts, sps)] == \
      [r.output_ids for r in one.generate(prompts, sps)]
  stats = dp.stats
  assert stats["replicas"] == 2 and min(stats["replica_steps"]) > 0
  assert stats["steps"] == sum(stats["replica_steps"])
  assert sum(v["steps"] for v in stats["step_time"].values()) == stats["steps"]

  calls = []
  def check():
    calls.append(1)
    if len(calls) > 2:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    dp.run_batch(dp.validate(prompts, sps), check=check, check_interval=1)
  for replica in dp._replicas:  # pylint: disable=protected-access
    sched = replica.scheduler
    assert not sched.has_work
    sched.check()
    assert sched.pool.num_available == sched.pool.num_pages

  new = jax.tree.map(lambda a: a * 0.5, params)
  dp.update_params(new)
  greedy = [SamplingParams(max_new_tokens=n) for n in news]
  assert [r.output_ids for r in dp.generate(prompts, greedy)] == \
      [r.output_ids for r in Engine(config, new, **kw).generate(prompts, greedy)]


def test_longest_first_admission_shortens_the_tail_without_changing_outputs(hf_tiny):
  """admission="longest_first" queues the most max_new_tokens first (ties: longer prompt, then
  as given): a batch with one long request then ends in fewer steps than "fifo", where the long
  request runs alone after the short ones; the outputs are identical and in the order given."""
  _, config, params = hf_tiny
  prompts, _ = _stream(config.vocab_size, 6, 3, max_prompt=10)
  news = [2, 2, 2, 2, 2, 14]
  sps = [SamplingParams(max_new_tokens=n) for n in news]
  assert engine_lib.admission_order(list(zip(prompts, sps)), "longest_first")[0] == 5
  assert engine_lib.admission_order(list(zip(prompts, sps)), "fifo") == list(range(6))
  runs = {}
  for admission in ("fifo", "longest_first"):
    eng = Engine(config, params, eos_token_ids=(), max_num_seqs=2, max_num_batched_tokens=16,
                 page_size=4, admission=admission)
    runs[admission] = ([r.output_ids for r in eng.generate(prompts, sps)], eng.stats["steps"])
  assert runs["fifo"][0] == runs["longest_first"][0]
  assert [len(o) for o in runs["fifo"][0]] == news
  assert runs["longest_first"][1] < runs["fifo"][1]
  with pytest.raises(validation.InvalidParameterError, match="admission"):
    Engine(config, params, admission="shortest")
