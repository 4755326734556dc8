"""Pretraining data preparation at scale on Apache Beam: `qwen2-jax data prepare --recipe`.

`recipe` (the typed YAML recipe), `sources` (reading, dead letters), `rules` (script and Gopher
quality / repetition rules), `dedup` (exact hashes, MinHash LSH), `decontam` (benchmark n-gram
and LCS rules), `outputs` (shards, manifest, side files) and `beam_prepare` (the pipeline).
See docs/data.md.
"""
