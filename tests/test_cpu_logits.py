"""The sampler's logit row statistics on the CPU (`qwen2_jax.kernels.cpu_logits`): the C++ call
equals its jnp reference and float64 numpy (greedy id, max, sum of exp) under vocabulary limits,
ties, -inf and NaN logits, row lengths that are not multiples of 16 and the thread split; the
sampler gives the same tokens and logprobs through either."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.infer import sampling
from qwen2_jax.kernels import cpu_logits

needs_cpu_kernels = pytest.mark.skipif(
    not cpu_logits.cpu_extension.available(),
    reason="qwen2_jax._cpu_kernels is not built here (test_cpu_matmul checks it is on x86-64)")


def _numpy_stats(x, limit):
  """float64 oracle: (greedy id, max, sum of exp(x - shift)) per row."""
  out = []
  for row, n in zip(np.asarray(x, np.float64), limit):
    row = row[:n]
    if np.isnan(row).any():
      out.append((int(np.argmax(np.isnan(row))), np.nan, np.nan))
      continue
    top = row.max() if n else -np.inf
    shift = top if np.isfinite(top) else 0.0
    greedy = int(np.argmax(row)) if n else 0
    out.append((greedy, top, float(np.exp(row - shift).sum())))
  return out


@needs_cpu_kernels
@pytest.mark.parametrize("b,v", [(1, 16), (3, 37), (17, 1000), (2, 151936)])
def test_row_stats_match_reference_and_float64(b, v):
  """Greedy ids and maxima exactly, sums of exp within 1e-6 (relative; the jnp reference 1e-5),
  for rows with the full vocabulary, a limit cutting inside a 16-lane block, a limit of 1 and of
  0 (all masked: id 0, max -inf, sum 0), ties for the max (the first id wins: across lanes,
  within a lane, between the 16-lane part and the tail), -inf logits, a row of -inf, +inf, a NaN
  after the max and one in the tail (the first NaN's id; max and sum NaN)."""
  rng = np.random.default_rng(v)
  x = rng.standard_normal((b, v)).astype(np.float32) * 4
  limit = np.full(b, v, np.int32)
  x[0, v // 2] = x[0, v // 3] = x[0].max() + 1  # a tie: the lower id is the greedy one
  if b >= 3:
    limit[1], limit[2] = max(1, v - 5), 1
    x[2, 1:] = 100.0  # above the limit: never seen
  if b >= 17:
    limit[3] = 0
    x[4, ::3] = -np.inf
    x[5, 3], x[5, 900] = 50.0, np.nan  # a NaN after the max: the NaN's id
    x[6, :] = -np.inf
    x[7, 5] = x[7, 21] = 50.0          # a tie within one lane, across iterations
    x[8, 37] = x[8, 992] = 50.0        # a tie between the 16-lane part and the tail
    x[9, 995] = np.nan                 # a NaN only in the tail
    x[10, 400] = np.inf                # +inf: its id, max inf, sum inf
  got = jax.jit(cpu_logits.row_stats)(jnp.asarray(x), jnp.asarray(limit))
  ref = jax.jit(cpu_logits.row_stats_reference)(jnp.asarray(x), jnp.asarray(limit))
  want = _numpy_stats(x, limit)
  for name, g, r, w in zip(("greedy", "max", "sumexp"), got, ref, zip(*want)):
    g, r, w = np.asarray(g), np.asarray(r), np.asarray(w, np.float64)
    if name == "greedy":
      np.testing.assert_array_equal(g, w)
      np.testing.assert_array_equal(r, w)
    else:
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
      np.testing.assert_allclose(r, w, rtol=1e-5, atol=0)


@needs_cpu_kernels
def test_row_stats_refuses_bad_shapes():
  with pytest.raises(ValueError, match="limit"):
    cpu_logits.row_stats(jnp.zeros((2, 8)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="float32"):
    cpu_logits.row_stats(jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((2,), jnp.int32))


@needs_cpu_kernels
def test_sampler_is_the_same_through_either_path(monkeypatch):
  """`sampling.sample` on a batch mixing greedy, temperature, top-k and top-p rows and a
  vocabulary limit: the same tokens, and logprobs within 1e-5, with the C++ row statistics and
  with the jnp ones; which path a trace takes follows `cpu_logits.applies`."""
  b, v = 6, 5000
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((b, v)), jnp.float32) * 3
  params = [sampling.SamplingParams(), sampling.SamplingParams(temperature=0.7, seed=3),
            sampling.SamplingParams(temperature=1.0, top_k=20, seed=4),
            sampling.SamplingParams(temperature=0.9, top_p=0.8, seed=5),
            sampling.SamplingParams(temperature=0.0, top_k=1), sampling.SamplingParams()]
  rp = sampling.row_params(params, [()] * b, 1, v - 7)
  assert cpu_logits.applies(logits)
  fast = jax.jit(sampling.sample)(logits, rp, jnp.int32(2))
  monkeypatch.setattr(cpu_logits, "applies", lambda _: False)
  slow = jax.jit(sampling.sample)(logits, rp, jnp.int32(2))
  np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(slow[0]))
  np.testing.assert_allclose(np.asarray(fast[1]), np.asarray(slow[1]), atol=1e-5)
  assert np.all(np.asarray(fast[0]) < v - 7)
