"""The generation engine's compile targets for the AOT planner (`qwen2_jax.aot`,
`qwen2-jax compile --target prefill|decode`): those of the static engine.

  prefill  a [B, T] prompt batch into a cache of T + new_tokens slots
  decode   the decode loop against that cache: one token per row per step (XLA's cost analysis
           counts the loop body, i.e. one step)

Both are the programs `infer.static_engine.StaticEngine` runs, with the params as given (layers
scanned) and no remat.
"""

from __future__ import annotations

from qwen2_jax import aot, flops
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
