"""The generation engines' compile targets for the AOT planner (`qwen2_jax.aot`,
`qwen2-jax compile --target prefill|decode|serve`).

  prefill  the static engine: a [B, T] prompt batch into a cache of T + new_tokens slots
  decode   the static engine's decode loop against that cache: one token per row per step (XLA's
           cost analysis counts the loop body, i.e. one step)
  serve    the continuous-batching `Engine`'s step: `max_num_batched_tokens` tokens of up to B
           sequences (prefill chunks and decodes mixed) against paged KV pools of `num_pages`
           pages, on TPU the Pallas ragged paged-attention kernel; the pools are donated

All run with the params as given (layers scanned) and no remat.
"""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np

from qwen2_jax import aot, flops
from qwen2_jax.layers import dtype_of
from qwen2_jax.infer import engine as paged_engine
from qwen2_jax.infer import paged
from qwen2_jax.infer import static_engine as engine


def generation_target(program: str, new_tokens: int = 128) -> aot.Target:
  """The `prefill` or `decode` target with `new_tokens` cache slots beyond the prompt."""
  def lower(config, mesh, rules, batch_size, seq_len):
    config = config.replace(remat_policy="none")
    fn = engine.jit_program(config, program, batch_size, seq_len + new_tokens, new_tokens,
                            mesh, rules)
    return fn.lower(*engine.abstract_program_args(config, program, batch_size, seq_len,
                                                  new_tokens, mesh, rules))
  if program == "prefill":
    return aot.Target("prefill", lower, flops.prefill_flops_per_token, training=False)
  if program == "decode":
    return aot.Target("decode", lower,
                      lambda config, seq_len: flops.decode_flops_per_token(
                          config, seq_len + new_tokens),
                      tokens_per_step=lambda batch, seq_len: batch, training=False)
  raise ValueError(f"unknown generation program {program!r}; known: {engine.PROGRAMS}")


def serve_target(max_num_seqs: int, new_tokens: int, num_tokens: int, page_size: int,
                 num_pages: int, matmul_precision: str | None = None) -> aot.Target:
  """The engine step of T = num_tokens tokens for S = max_num_seqs (--batch) sequences of
  --seq-len prompt tokens + `new_tokens`, against pools of `num_pages` pages of `page_size`
  tokens; the block table as wide as the engine makes it for such requests. The step's float32
  matmuls are traced under `matmul_precision` as `Engine(matmul_precision=...)` does it (None:
  the precision in force)."""
  if matmul_precision not in (None, *paged_engine.MATMUL_PRECISIONS):
    raise ValueError(f"matmul_precision: must be None or one of "
                     f"{paged_engine.MATMUL_PRECISIONS}, got {matmul_precision!r}")

  def lower(config, mesh, rules, batch_size, seq_len):
    config = config.replace(remat_policy="none")
    width = paged_engine.table_width(paged.tokens_to_cache(seq_len, new_tokens), page_size,
                                     config.max_position_embeddings)
    args = paged_engine.abstract_step_args(
        config, mesh, rules, num_tokens=num_tokens, max_num_seqs=batch_size,
        pages_per_seq=width, num_pages=num_pages, page_size=page_size)
    with (contextlib.nullcontext() if matmul_precision is None
          else jax.default_matmul_precision(matmul_precision)):
      return paged_engine.jit_step(config, mesh, rules, args[1].sharding).lower(*args)

  return aot.Target(
      "serve", lower,
      lambda config, seq_len: flops.serve_flops_per_token(config, num_tokens, max_num_seqs,
                                                          seq_len + new_tokens),
      tokens_per_step=lambda batch, seq_len: num_tokens, training=False,
      matmul_precision=matmul_precision)


def pool_bytes_per_page(config, mesh, rules, page_size: int) -> int:
  """Bytes of one page of both pools (all layers) on one device, as `pool_sharding` splits them."""
  shape = paged_engine.pool_shape(config, 1, page_size)
  local = paged_engine.pool_sharding(mesh, rules, shape).shard_shape(shape)
  return 2 * math.prod(local) * np.dtype(dtype_of(config.dtype)).itemsize

def plan_serve(config, topology, mesh_config, rules, *, max_num_seqs: int, prompt_len: int,
               new_tokens: int, num_tokens: int, page_size: int,
               kv_cache_bytes: int | None = None, hbm_margin: float = 0.05,
               with_cost: bool = True, rules_name: str = "custom",
               on_compile=None, matmul_precision: str | None = None) -> dict:
  """`qwen2-jax compile --target serve`: the engine step on a TPU topology with the largest page
  pool that fits beside the weights and the step's temporaries (or `kv_cache_bytes` per device).

  Sizing: the first compile has a pool for every slot (max_num_seqs requests of prompt_len +
  new_tokens); then the line through the two largest fitting probes predicts the pages at the
  budget (HBM x (1 - hbm_margin)), and a miss is bisected against the largest fit until the two
  are within 1% (at most 10 compiles). The report is that of the largest fitting pool.
  `matmul_precision` is the engine's (`Engine(matmul_precision=...)`): it changes what a float32
  compute dtype's step costs (`aot.MXU_PASSES`) and can change its temporaries.
  Returns `aot.plan`'s report plus "serve": the pool (pages, tokens, bytes per device), how many
  such requests it holds, and the engine settings to use.
  """
  from qwen2_jax import sharding  # pylint: disable=import-outside-toplevel
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh(mesh_config, devices)
  config = config.replace(remat_policy="none")
  per_page = pool_bytes_per_page(config, mesh, rules, page_size)
  request_pages = paged.pages_for(paged.tokens_to_cache(prompt_len, new_tokens), page_size)
  budget = (1 - hbm_margin) * topology.chip.hbm_bytes

  def compile_with(pages):
    c = aot.compile_step(config, topology, mesh_config, rules, max_num_seqs, prompt_len,
                         target=serve_target(max_num_seqs, new_tokens, num_tokens, page_size,
                                             pages, matmul_precision),
                         hbm_margin=hbm_margin, devices=devices)
    if on_compile is not None:
      on_compile(pages, c)
    return c

  probes: list[tuple[int, aot.Compiled]] = []

  def probe(pages):
    c = compile_with(pages)
    probes.append((pages, c))
    return c.fits

  if kv_cache_bytes is not None:
    probe(max(1, int(kv_cache_bytes) // per_page))
  else:
    # Per-device memory is close to linear in the pages (the pools, and on TPU also temporaries
    # that grow with them): from two fitting probes, predict the pages at the budget, then
    # bisect between the largest fit and the smallest miss until they are within 1%.
    good, bad = 0, None
    candidate = max_num_seqs * request_pages
    for _ in range(10):
      if probe(candidate):
        good = max(good, candidate)
      else:
        bad = candidate if bad is None else min(bad, candidate)
      fits = sorted((p, c.memory["total_bytes"]) for p, c in probes if c.fits)[-2:]
      if bad is not None and bad - good <= max(1, good // 100):
        break
      if len(fits) == 2:
        (p0, m0), (p1, m1) = fits
        slope = max((m1 - m0) / (p1 - p0), float(per_page))
        candidate = p1 + int((budget - m1) // slope)
      elif fits:  # one fit: assume only the pool grows
        (p1, m1), = fits
        candidate = p1 + int((budget - m1) // per_page)
      else:
        candidate = bad // 2
      if bad is not None and not good < candidate < bad:
        candidate = (good + bad) // 2
      if candidate < 1 or candidate == good or candidate == bad:
        break
  fitting = [(p, c) for p, c in probes if c.fits]
  pages, final = max(fitting, key=lambda pc: pc[0]) if fitting else probes[-1]
  target = serve_target(max_num_seqs, new_tokens, num_tokens, page_size, pages, matmul_precision)
  # XLA's cost analysis charges bytes that grow with the whole pool (about 20 per pool byte on a
  # 0.5B step, 1.7 on 7B), where the kernel reads only the running sequences' pages: the
  # estimate's FLOPs and bytes come from the same step over a pool of max_num_seqs requests.
  cost_pages = min(pages, max_num_seqs * request_pages)
  report = aot.plan(config, topology, mesh_config, rules, max_num_seqs, prompt_len, target=target,
                    rules_name=rules_name, hbm_margin=hbm_margin,
                    with_cost=with_cost and final.fits, compiled=final,
                    cost_target=serve_target(max_num_seqs, new_tokens, num_tokens, page_size,
                                             cost_pages, matmul_precision))
  held = pages // request_pages
  report["serve"] = {
      "page_size": page_size, "num_pages": pages, "pool_bytes_per_device": pages * per_page,
      "pool_tokens": pages * page_size, "bytes_per_page_per_device": per_page,
      "prompt_len": prompt_len, "new_tokens": new_tokens, "pages_per_request": request_pages,
      "requests_in_pool": held, "concurrent_requests": min(held, max_num_seqs),
      "max_num_seqs": max_num_seqs, "max_num_batched_tokens": num_tokens,
      "matmul_precision": matmul_precision,
      "cost_pool_pages": cost_pages,
      "table_width_pages": paged_engine.table_width(
          paged.tokens_to_cache(prompt_len, new_tokens), page_size,
          config.max_position_embeddings),
      "sizing": [{"num_pages": p, "fits": c.fits,
                  "total_bytes": c.memory["total_bytes"] if c.memory else None,
                  "compile_seconds": round(c.compile_seconds, 2), "error": c.error}
                 for p, c in probes]}
  return report
