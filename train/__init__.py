"""`qwen2_jax.train`: pretraining, post-training (SFT, DPO) and upcycling (later issues)."""
