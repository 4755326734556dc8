"""`qwen2-jax data prepare`: tokenise a corpus once into ArrayRecord shards for pretraining."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
  parser = subparsers.add_parser("data", help="prepare training data",
                                 description="Data preparation for pretraining.")
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  p = sub.add_parser("prepare", help="tokenise text/JSONL/Parquet into ArrayRecord shards",
                     description="Tokenise every document once (EOS appended) into ArrayRecord "
                                 "shards of int32 ids, usable as an 'arrayrecord' source.")
  p.add_argument("--tokenizer", required=True,
                 help="tokenizer.json, an HF tokenizer directory or a SentencePiece .model")
  p.add_argument("--kind", required=True, choices=("text", "jsonl", "parquet"))
  p.add_argument("--input", required=True, nargs="+", help="files or glob patterns")
  p.add_argument("--field", default="text", help="JSONL key / Parquet column (default: text)")
  p.add_argument("--split", default="file", choices=("file", "paragraph", "line"),
                 help="text files: one document per file, paragraph or line (default: file)")
  p.add_argument("--output-prefix", required=True, help="e.g. data/corpus -> data/corpus-00000-of-00001.arrayrecord")
  p.add_argument("--docs-per-shard", type=int, default=100_000)
  p.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
  from qwen2_jax.tokenizer import load_tokenizer
  from qwen2_jax.train.data import SourceConfig, prepare_arrayrecord

  source = SourceConfig(kind=args.kind, paths=tuple(args.input), field=args.field,
                        split=args.split)
  paths = prepare_arrayrecord(source, load_tokenizer(args.tokenizer), args.output_prefix,
                              docs_per_shard=args.docs_per_shard)
  for path in paths:
    print(path)
  print(f"wrote {len(paths)} shard(s)", file=sys.stderr)
  return 0
