"""`qwen2-jax convert`: HF safetensors <-> Orbax param checkpoints.

  qwen2-jax convert hf-to-orbax --hf DIR --out DIR [--dtype float32|bfloat16|keep]
  qwen2-jax convert orbax-to-hf --orbax DIR --out DIR [--dtype ...] [--max-shard-size 5GB]

Weights holding NaN or Inf are refused (naming the tensor) unless --allow-nonfinite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qwen2_jax.errors import UserError


def register(subparsers) -> None:
  parser = subparsers.add_parser(
      "convert", help="convert checkpoints between HF safetensors and Orbax",
      description="Convert model checkpoints between the HF format (config.json + safetensors) "
                  "and Orbax. Output is written beside --out and renamed when complete; "
                  "--overwrite replaces only the files a checkpoint consists of and refuses a "
                  "directory holding anything else.")
  sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

  p = sub.add_parser("hf-to-orbax", help="HF directory -> Orbax params checkpoint")
  p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
  p.add_argument("--out", required=True, help="output Orbax checkpoint directory")
  p.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                 help="params dtype to store (default: keep the checkpoint's dtype)")
  _common_flags(p)
  p.set_defaults(func=_hf_to_orbax)

  p = sub.add_parser("orbax-to-hf", help="Orbax params checkpoint -> HF directory")
  p.add_argument("--orbax", required=True, help="Orbax checkpoint directory (from hf-to-orbax "
                 "or a training export)")
  p.add_argument("--out", required=True, help="output HF directory")
  p.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                 help="tensor dtype to write (default: keep the params' dtype)")
  p.add_argument("--max-shard-size", default="5GB",
                 help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
  _common_flags(p)
  p.set_defaults(func=_orbax_to_hf)


def _common_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--overwrite", action="store_true",
                 help="replace the checkpoint in an existing output directory")
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="convert weights holding NaN or Inf (reported as warnings)")


def _dtype(arg: str) -> str | None:
  return None if arg == "keep" else arg


def _existing_dir(flag: str, path: str) -> str:
  if not os.path.isdir(path):
    what = "not a directory" if os.path.exists(path) else "no such directory"
    raise UserError(f"{flag} {path}: {what}")
  return path


def _hf_to_orbax(args: argparse.Namespace) -> int:
  # Imported here, not at module top, so `qwen2-jax --help` does not load orbax.
  # pylint: disable-next=import-outside-toplevel
  from qwen2_jax.checkpoint import load_hf_checkpoint, save_orbax

  start = time.time()
  config, params = load_hf_checkpoint(_existing_dir("--hf", args.hf), dtype=_dtype(args.dtype),
                                      allow_nonfinite=args.allow_nonfinite)
  print(f"saving Orbax checkpoint to {args.out} ...", file=sys.stderr)
  save_orbax(args.out, config, params, overwrite=args.overwrite)
  print(f"done in {time.time() - start:.1f}s: {args.out}", file=sys.stderr)
  return 0


def _orbax_to_hf(args: argparse.Namespace) -> int:
  # Imported here, not at module top, so `qwen2-jax --help` does not load orbax.
  # pylint: disable-next=import-outside-toplevel
  from qwen2_jax.checkpoint import restore_orbax, save_hf_checkpoint

  start = time.time()
  print(f"restoring Orbax checkpoint {args.orbax} ...", file=sys.stderr)
  config, params = restore_orbax(_existing_dir("--orbax", args.orbax),
                                 allow_nonfinite=args.allow_nonfinite)
  save_hf_checkpoint(args.out, config, params, max_shard_size=args.max_shard_size,
                     dtype=_dtype(args.dtype), overwrite=args.overwrite)
  print(f"done in {time.time() - start:.1f}s: {args.out}", file=sys.stderr)
  return 0
