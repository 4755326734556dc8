"""Pallas TPU kernels: each module holds a kernel, its `custom_vjp` and a pure-jnp `*_reference`.
Three CPU kernels in C++ too, XLA FFI calls that the generation engines use on x86-64 CPUs
(forward only; one extension, `cpu_extension`): `cpu_matmul`, a prepacked float32 matmul (with
`packed_matmul_reference`), `ragged_paged_attention_cpu` in `ragged_paged_attention`, and
`cpu_logits`, the sampler's per-row greedy id / max / sum of exp (with `row_stats_reference`).

flash_attention  blockwise online-softmax attention (causal / non-causal, GQA, packed segments,
                 optional logsumexp), forward and backward, plus a `shard_map` wrapper.
gmm              grouped matmul (gmm, tgmm) for the MoE experts.
ragged_paged_attention
                 inference attention of one continuous-batching step (decodes and prefill
                 chunks together) over a paged KV cache, plus a `shard_map` wrapper; forward only.

All take `interpret`: False runs the Mosaic TPU kernel, True the Pallas interpreter (any
backend), None lets `on_platform` choose when the program is lowered, which is what the model
passes: Mosaic when lowering for TPU (also ahead of time, from a CPU host), the interpreter on any
other backend, so `attention_impl="pallas"` / `moe_impl="pallas"` give correct (slow) results on
CPU instead of failing inside Pallas.
"""

from __future__ import annotations

import functools

from jax import lax


def on_platform(call, *args, interpret):
  """`call(*args, interpret=interpret)`; interpret=None picks when lowering: the Mosaic kernel
  (interpret=False) for TPU, the Pallas interpreter (interpret=True) for any other platform."""
  if interpret is not None:
    return call(*args, interpret=interpret)
  return lax.platform_dependent(*args, tpu=functools.partial(call, interpret=False),
                                default=functools.partial(call, interpret=True))
