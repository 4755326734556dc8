"""`qwen2-jax convert`: HF safetensors <-> Orbax param checkpoints.

  qwen2-jax convert hf-to-orbax --hf DIR --out DIR [--dtype float32|bfloat16|keep]
  qwen2-jax convert orbax-to-hf --orbax DIR --out DIR [--dtype ...] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert", help="convert checkpoints between HF safetensors and Orbax",
      description="Convert model checkpoints between the HF format (config.json + safetensors) "
                  "and Orbax. Output is written to a temporary path and renamed when complete.")
  sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

  p = sub.add_parser("hf-to-orbax", help="HF directory -> Orbax params checkpoint")
  p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                 help="params dtype to store (default: keep the checkpoint's dtype)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  p.set_defaults(func=_hf_to_orbax)

  p = sub.add_parser("orbax-to-hf", help="Orbax params checkpoint -> HF directory")
  p.add_argument("--orbax", required=True, help="Orbax checkpoint directory (from hf-to-orbax "
                 "or a training export)")
  p.add_argument("--out", required=True, help="output HF directory")
  p.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                 help="tensor dtype to write (default: keep the params' dtype)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  p.set_defaults(func=_orbax_to_hf)


def _dtype(arg: str) -> str | None:
  return None if arg == "keep" else arg


def _hf_to_orbax(args: argparse.Namespace) -> int:
  from qwen2_jax.checkpoint.hf import load_hf_checkpoint
  from qwen2_jax.checkpoint.orbax_io import save_orbax

  start = time.time()
  config, params = load_hf_checkpoint(args.hf, dtype=_dtype(args.dtype))
  print(f"saving Orbax checkpoint to {args.out} ...", file=sys.stderr)
  save_orbax(args.out, config, params, overwrite=args.overwrite)
  print(f"done in {time.time() - start:.1f}s: {args.out}", file=sys.stderr)
  return 0


def _orbax_to_hf(args: argparse.Namespace) -> int:
  from qwen2_jax.checkpoint.hf import save_hf_checkpoint
  from qwen2_jax.checkpoint.orbax_io import restore_orbax

  start = time.time()
  print(f"restoring Orbax checkpoint {args.orbax} ...", file=sys.stderr)
  config, params = restore_orbax(args.orbax)
  save_hf_checkpoint(args.out, config, params, max_shard_size=args.max_shard_size,
                     dtype=_dtype(args.dtype), overwrite=args.overwrite)
  print(f"done in {time.time() - start:.1f}s: {args.out}", file=sys.stderr)
  return 0
