"""Checkpoint formats: HF safetensors (`hf`), Orbax (`orbax_io`), and the key map between them."""
