"""`qwen2_jax.train`: pretraining, post-training (SFT, DPO) and dense -> MoE upcycling."""
