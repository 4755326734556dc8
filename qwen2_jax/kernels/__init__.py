"""Pallas TPU kernels: each module holds a kernel, its `custom_vjp` and a pure-jnp `*_reference`.

flash_attention  blockwise online-softmax attention (causal / non-causal, GQA, packed segments,
                 optional logsumexp), forward and backward, plus a `shard_map` wrapper.
"""
