"""Sampling: per-request `SamplingParams` and the vectorised sampler that runs inside the loop.

Vocabulary mask: ids >= a row's `vocab_limit` get logit -inf before anything else, so they are
never drawn and the reported logprobs are over the ids below it. `Generator` sets the limit to the
tokenizer's size: Qwen2 checkpoints have more embedding rows (151,936) than their tokenizer has
ids (151,646 to 151,669); the extra rows are untrained padding with no text, yet their logits
can win a draw. Serving stacks mask ids >= len(tokenizer) for the same reason.

Every setting is per row of the batch and travels as an array, so a batch may mix greedy,
temperature, top-k and top-p requests, and changing them never recompiles. Order of the logit
processors, as in `transformers`: temperature, then top-k, then top-p. `temperature == 0` is
greedy (argmax). Randomness is reproducible per request: the key of a row's t-th generated token
is `fold_in(key(seed), t)`, so a request's samples depend on neither its batch neighbours nor the
batch size. A sampled token is drawn by inverse transform from one uniform of that key
(`draw_inverse_cdf`; before 2026-12-06 by `jax.random.categorical`, so the same seed then gave
other tokens). Reported logprobs are those of the raw model distribution (log-softmax of the logits,
before temperature / top-k / top-p, after the vocabulary mask), as vLLM reports them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen2_jax.infer import validation
from qwen2_jax.kernels import cpu_logits

Array = jax.Array

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How to generate for one request; validated on construction (typed errors naming the field)."""
  max_new_tokens: int = 128           # tokens to generate at most (the stop token included)
  temperature: float = 0.0            # 0: greedy; > 0: sample from softmax(logits / temperature)
  top_k: int = 0                      # keep the k most likely tokens; 0: off
  top_p: float = 1.0                  # keep the smallest set with probability >= top_p; 1: off
  seed: int = 0                       # per-request RNG seed, in [0, 2**32)
  stop_token_ids: tuple[int, ...] = ()  # extra ids that end the request (EOS is added unless ...)
  ignore_eos: bool = False            # ... this is set

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", validation.stop_id_tuple(self.stop_token_ids))
    validation.check_sampling(self)


class RowParams(NamedTuple):
  """SamplingParams of a batch as arrays, one entry per row (leaves are [B] or [B, W])."""
  temperature: Array   # [B] f32
  top_k: Array         # [B] i32 (0: off)
  top_p: Array         # [B] f32 (1: off)
  seed: Array          # [B] u32
  max_new_tokens: Array  # [B] i32
  stop_ids: Array      # [B, W] i32, padded with -1
  vocab_limit: Array   # [B] i32: ids >= this are never sampled (the vocabulary size: no mask)


def row_params(params: list[SamplingParams], stop_ids: list[tuple[int, ...]],
               stop_width: int, vocab_limit: int) -> RowParams:
  """Packs per-request params into arrays; `stop_ids[i]` already includes EOS where wanted;
  `vocab_limit` is the number of ids that may be sampled (every row)."""
  stops = [list(s) + [-1] * (stop_width - len(s)) for s in stop_ids]
  return RowParams(
      temperature=jnp.asarray([p.temperature for p in params], jnp.float32),
      top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
      top_p=jnp.asarray([p.top_p for p in params], jnp.float32),
      seed=jnp.asarray([p.seed % 2**32 for p in params], jnp.uint32),
      max_new_tokens=jnp.asarray([p.max_new_tokens for p in params], jnp.int32),
      stop_ids=jnp.asarray(stops, jnp.int32).reshape(len(params), stop_width),
      vocab_limit=jnp.full((len(params),), vocab_limit, jnp.int32))


def mask_vocab(logits: Array, limit: Array) -> Array:
  """Sets logits [B, V] of ids >= limit [B] to -inf."""
  ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)  # [V]
  return jnp.where(ids[None, :] < limit[:, None], logits, _NEG_INF)


def mask_top_k(logits: Array, k: Array) -> Array:
  """Sets all but each row's k largest logits to -inf; k [B] (0 keeps all). Ties at the k-th are kept."""
  V = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)  # [B, V]
  kth = jnp.take_along_axis(desc, (jnp.clip(k, 1, V) - 1)[:, None], axis=-1)  # [B, 1]
  keep = (logits >= kth) | (k[:, None] <= 0)
  return jnp.where(keep, logits, _NEG_INF)


def mask_top_p(logits: Array, p: Array) -> Array:
  """Keeps each row's nucleus: the most likely tokens whose probability reaches p [B] (1 keeps all).

  A token is kept iff the probability of the tokens strictly more likely than it is < p; the most
  likely token is always kept. Ties with the last kept token are kept too.
  """
  desc = -jnp.sort(-logits, axis=-1)  # [B, V]
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
  kept = (before < p[:, None]).at[:, 0].set(True)
  threshold = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  keep = (logits >= threshold) | (p[:, None] >= 1.0)
  return jnp.where(keep, logits, _NEG_INF)


def processed_logits(logits: Array, rp: RowParams) -> Array:
  """Temperature, then top-k, then top-p, per row; the distribution sampled from, as logits."""
  t = jnp.where(rp.temperature > 0, rp.temperature, 1.0)
  x = logits.astype(jnp.float32) / t[:, None]
  needs_filter = jnp.any(rp.top_k > 0) | jnp.any(rp.top_p < 1.0)
  # The sorts cost a few ms per step at Qwen2's vocab: skip them when no row filters.
  return jax.lax.cond(needs_filter, lambda x: mask_top_p(mask_top_k(x, rp.top_k), rp.top_p),
                      lambda x: x, x)


def draw_inverse_cdf(keys: Array, logits: Array) -> Array:
  """One id [B] per row of logits [B, V] drawn from softmax(logits) by inverse transform: one
  uniform u per row (from its key), then the first id of positive weight whose cumulative
  unnormalised probability exceeds u times the row's total. Ids of probability 0 (logit -inf) are
  never drawn. A row whose max is not finite (every logit -inf, a +inf, a NaN) gives -1 (`sample`
  takes its greedy id). One uniform per row, where `jax.random.categorical` draws a Gumbel
  variate per id: for Qwen2's 151,936 ids and 16 rows the draw took 52-57 ms per call on a
  2-core Xeon against 14 ms this way (2026-12-06). The uniform's 2^-23 grain means ids below
  about 1e-7 of a row's mass are drawn at the right rate together, not one by one."""
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)  # [B] in [0, 1)
  return inverse_cdf(u, logits)


def inverse_cdf(u: Array, logits: Array) -> Array:
  """The id [B] of `draw_inverse_cdf` for uniforms u [B] in [0, 1); -1 for a row whose max is
  not finite."""
  x = logits.astype(jnp.float32)
  top = jnp.max(x, axis=-1, keepdims=True)  # NaN where the row has one
  weight = jnp.exp(x - jnp.where(jnp.isfinite(top), top, 0.0))  # -inf -> 0
  cdf = jnp.cumsum(weight, axis=-1)
  live = weight > 0
  # The test also asks for positive weight: a cumulative sum summed in blocks need not stay
  # exactly flat across ids of weight 0.
  above = (cdf > u[:, None] * cdf[:, -1:]) & live
  # Plain min / max reductions (XLA:CPU's argmax is a slower variadic reduce).
  ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
  first = jnp.min(jnp.where(above, ids, x.shape[-1]), axis=-1)
  last = jnp.max(jnp.where(live, ids, -1), axis=-1)
  # Rounding may put u * total at the total: then the last live id.
  picked = jnp.where(first < x.shape[-1], first, last)
  return jnp.where(jnp.isfinite(top[:, 0]), picked, -1).astype(jnp.int32)


def sample(logits: Array, rp: RowParams, step: Array) -> tuple[Array, Array]:
  """Next token [B] and its raw logprob [B] from logits [B, V]; `step` (a scalar, or [B] per
  row) is the index of the token being generated within its request."""
  logits = logits.astype(jnp.float32)
  stats = cpu_logits.row_stats if cpu_logits.applies(logits) else cpu_logits.row_stats_reference
  greedy, top, sumexp = stats(logits, rp.vocab_limit)

  def draw(_):
    x = processed_logits(mask_vocab(logits, rp.vocab_limit), rp)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), rp.seed.shape)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(rp.seed, steps)
    drawn = draw_inverse_cdf(keys, x)
    return jnp.where(drawn < 0, greedy, drawn)  # a row without a finite max: greedy

  sampling = (rp.temperature > 0) & (rp.top_k != 1)
  drawn = jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)
  token = jnp.where(sampling, drawn, greedy)
  # log_softmax at one id per row: logit - logsumexp (no [B, V] log-softmax array). The token
  # is below the row's vocab_limit, so its logit is the unmasked one.
  picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
  lse = jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(sumexp)
  return token, picked - lse
