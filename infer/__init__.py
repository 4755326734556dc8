"""`qwen2_jax.infer`: JIT-compiled batch generation with a KV cache (generation issue)."""
