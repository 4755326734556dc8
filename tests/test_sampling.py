"""Sampling: seeded reproducibility, top-k / top-p support on crafted distributions, the
greedy limits (temperature 0, top-k 1) and the vocabulary mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax.infer import Engine, SamplingParams
from qwen2_jax.infer import sampling as S

# A crafted distribution over 8 tokens (sorted order 0..7).
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
LOGITS = np.log(PROBS).astype(np.float32)


def _rows(n, *, temperature=1.0, top_k=0, top_p=1.0, seeds=None, vocab_limit=8):
  seeds = np.arange(n) if seeds is None else np.asarray(seeds)
  return S.RowParams(jnp.full((n,), temperature, jnp.float32), jnp.full((n,), top_k, jnp.int32),
                     jnp.full((n,), top_p, jnp.float32), jnp.asarray(seeds, jnp.uint32),
                     jnp.full((n,), 8, jnp.int32), jnp.full((n, 4), -1, jnp.int32),
                     jnp.full((n,), vocab_limit, jnp.int32))


def _sample(n, perm=None, **kw):
  logits = LOGITS if perm is None else LOGITS[perm]
  tokens, logprobs = jax.jit(S.sample)(jnp.broadcast_to(jnp.asarray(logits), (n, 8)),
                                       _rows(n, **kw), jnp.int32(0))
  return np.asarray(tokens), np.asarray(logprobs)


def _draw(n, perm=None, **kw):
  return _sample(n, perm, **kw)[0]


@pytest.mark.parametrize("top_p,nucleus", [(0.3, {0}), (0.6, {0, 1}), (0.7, {0, 1, 2}),
                                           (0.85, {0, 1, 2, 3})])
def test_top_p_never_samples_outside_the_nucleus(top_p, nucleus):
  """4000 top-p draws from a crafted distribution all fall in the nucleus, and cover it."""
  rank_of = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # token i has the rank_of[i]-th largest prob
  tokens = _draw(4000, perm=rank_of, top_p=top_p, temperature=1.0)
  ranks = set(rank_of[tokens].tolist())
  assert ranks == nucleus


def test_top_k_never_samples_outside_the_k_most_likely():
  """top-k draws stay within the k most likely tokens and cover them."""
  assert set(_draw(3000, top_k=3).tolist()) == {0, 1, 2}


def test_temperature_sampling_follows_the_distribution():
  """At temperature 1 draw frequencies match softmax(logits); at 0.5 they match p^2 renormalised."""
  n = 20000
  for t, expected in ((1.0, PROBS), (0.5, PROBS ** 2 / (PROBS ** 2).sum())):
    freq = np.bincount(_draw(n, temperature=t), minlength=8) / n
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3  # ~4 standard errors
    assert np.all(np.abs(freq - expected) <= tolerance), (t, freq, expected)


def _inverse_cdf_reference(u, x):
  """searchsorted over the float64 cumulative weights of each row's ids of positive weight."""
  out = []
  for ui, row in zip(u, x):
    w = np.exp(row.astype(np.float64) - row.max())
    live = np.nonzero(w > 0)[0]
    c = np.cumsum(w[live])
    out.append(int(live[min(np.searchsorted(c, ui * c[-1], side="right"), len(live) - 1)]))
  return np.array(out)


def test_inverse_cdf_edges_against_the_cumulative_reference():
  """`inverse_cdf` picks, for each u, the first live id whose cumulative weight exceeds u times
  the total (a float64 searchsorted reference on random rows with -inf ids at the start, middle
  and end); u = 0 gives the first live id, u just below 1 the last; a row whose max is not
  finite (+inf, all -inf, a NaN) gives -1, which `sample` turns into the greedy id."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((6, 50)).astype(np.float32) * 2
  x[:, :3] = -np.inf
  x[:, 20:25] = -np.inf
  x[:, -4:] = -np.inf
  u = np.array([0.0, 0.25, 0.5, 0.9, np.nextafter(np.float32(1), np.float32(0)), 0.999],
               np.float32)
  got = np.asarray(S.inverse_cdf(jnp.asarray(u), jnp.asarray(x)))
  np.testing.assert_array_equal(got, _inverse_cdf_reference(u, x))
  assert got[0] == 3 and got[4] == 45
  odd = np.zeros((4, 8), np.float32)
  odd[:2, 5] = np.inf
  odd[2] = -np.inf
  odd[3, 6] = np.nan
  assert np.asarray(S.inverse_cdf(jnp.asarray([0.0, 0.99, 0.5, 0.5], jnp.float32),
                                  jnp.asarray(odd))).tolist() == [-1, -1, -1, -1]
  rp = _rows(3, temperature=1.0)
  tokens, _ = jax.jit(S.sample)(jnp.asarray(odd[1:]), rp, jnp.int32(0))
  # Greedy: the +inf id, id 0 of a -inf row, the first NaN.
  assert np.asarray(tokens).tolist() == [5, 0, 6]


def test_inverse_cdf_never_picks_masked_ids_at_qwen2_vocab_size():
  """At Qwen2's 151,936 ids with all but 50 masked (top-k), 1,000 uniforms (the cumulative sum is
  summed in blocks there) all give one of the 50, and each of them is drawn."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((1, 151936)).astype(np.float32))
  x = S.mask_top_k(x, jnp.asarray([50]))
  keep = set(np.nonzero(np.isfinite(np.asarray(x[0])))[0].tolist())
  pick = jax.jit(lambda u: S.inverse_cdf(u, jnp.broadcast_to(x, (u.shape[0], x.shape[1]))))
  got = np.concatenate([np.asarray(pick(jnp.asarray(rng.random(100, dtype=np.float32))))
                        for _ in range(10)])
  assert set(got.tolist()) == keep


def test_masks_keep_exactly_the_intended_tokens():
  """mask_top_k / mask_top_p keep the k largest / the nucleus; 0 and 1 disable them per row."""
  logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
  kept = np.isfinite(np.asarray(S.mask_top_k(logits, jnp.asarray([2, 0]))))
  assert kept[0].tolist() == [True, True] + [False] * 6 and kept[1].all()
  kept = np.isfinite(np.asarray(S.mask_top_p(logits, jnp.asarray([0.6, 1.0]))))
  assert kept[0].tolist() == [True, True] + [False] * 6 and kept[1].all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_vocab_mask_never_yields_masked_ids(temperature):
  """With vocab_limit 5, neither greedy nor 4000 draws give ids >= 5, even where they are the most
  likely; logprobs are those of the distribution over the ids below the limit."""
  perm = np.array([7, 6, 5, 4, 3, 2, 1, 0])  # the most likely tokens are the masked ones
  tokens, logprobs = _sample(4000, perm, temperature=temperature, vocab_limit=5)
  allowed = LOGITS[perm][:5]
  assert tokens.max() < 5 and (temperature > 0 or set(tokens.tolist()) == {4})
  if temperature > 0:
    assert set(tokens.tolist()) == set(range(5))
  expected = allowed - np.log(np.exp(allowed).sum())
  np.testing.assert_allclose(logprobs, expected[tokens], rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_engine():
  config = q.get_preset("qwen2-tiny", initializer_range=0.05)  # flat-ish logits: varied samples
  return Engine(config, q.init_params(config, jax.random.key(0)), eos_token_ids=())


PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


def test_same_seed_same_samples_and_seeds_differ(tiny_engine):
  """Sampling is reproducible per seed and differs across seeds."""
  sp = lambda seed: SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
  a = tiny_engine.generate(PROMPTS, [sp(1), sp(2), sp(3)])
  b = tiny_engine.generate(PROMPTS, [sp(1), sp(2), sp(3)])
  c = tiny_engine.generate(PROMPTS, [sp(4), sp(5), sp(6)])
  assert [r.output_ids for r in a] == [r.output_ids for r in b]
  assert [r.output_ids for r in a] != [r.output_ids for r in c]


def test_top_k_one_and_temperature_zero_equal_greedy(tiny_engine):
  """top_k=1 at any temperature, and temperature 0 with top-p, give the greedy tokens."""
  greedy = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10))
  top1 = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.5,
                                                      top_k=1, seed=9))
  t0 = tiny_engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, top_p=0.5, seed=9))
  assert [r.output_ids for r in top1] == [r.output_ids for r in greedy]
  assert [r.output_ids for r in t0] == [r.output_ids for r in greedy]


def test_engine_vocab_limit_masks_without_recompiling(tiny_engine):
  """An engine's vocab_limit keeps every generated id (greedy and sampled) below it, changes
  nothing when it is the vocabulary size, and never recompiles."""
  greedy = SamplingParams(max_new_tokens=12)
  sampled = SamplingParams(max_new_tokens=12, temperature=1.5, seed=3)
  base = tiny_engine.generate(PROMPTS, [greedy, sampled, greedy])
  compiled = tiny_engine.stats["num_compilations"]
  seen = sorted({t for r in base for t in r.output_ids})
  limit = seen[len(seen) // 2]  # about half of the ids generated so far become masked
  try:
    tiny_engine.vocab_limit = limit
    masked = tiny_engine.generate(PROMPTS, [greedy, sampled, greedy])
    tiny_engine.vocab_limit = tiny_engine.config.vocab_size
    unmasked = tiny_engine.generate(PROMPTS, [greedy, sampled, greedy])
  finally:
    tiny_engine.vocab_limit = None
  assert all(t < limit for r in masked for t in r.output_ids)
  assert [r.output_ids for r in unmasked] == [r.output_ids for r in base]
  assert tiny_engine.stats["num_compilations"] == compiled
