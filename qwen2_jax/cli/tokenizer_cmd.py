"""`qwen2-jax tokenizer`: train a SentencePiece tokenizer, encode and decode text.

Subcommands:
  train   train a SentencePiece model (byte fallback, ChatML symbols) on local text files
  encode  print the ids of a text, space separated
  decode  print the text of a list of ids
"""

from __future__ import annotations

import argparse
import glob
import sys


def register(subparsers) -> None:
  """Adds the `tokenizer` parser and its sub-subcommands to `subparsers`."""
  parser = subparsers.add_parser(
      "tokenizer", help="train a SentencePiece tokenizer; encode / decode text",
      description="Tokenizer tools. --tokenizer PATH may be a directory with tokenizer.json or "
                  "tokenizer.model, a tokenizer.json file, or a SentencePiece .model file.")
  sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

  train = sub.add_parser(
      "train", help="train a SentencePiece model on local text files",
      description="Train a lossless SentencePiece model (identity normalisation, byte fallback, "
                  "digits split) with <|endoftext|> (eos), <|im_start|>, <|im_end|> as "
                  "user-defined symbols. Writes PREFIX.model and PREFIX.vocab.")
  train.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                     help="text files (one sentence or document per line); globs are expanded")
  train.add_argument("--output-prefix", required=True, metavar="PREFIX",
                     help="output path without extension")
  train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                     help="number of pieces, including 5 special and 256 byte pieces")
  train.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
  train.add_argument("--character-coverage", type=float, default=0.9995,
                     help="fraction of characters given their own piece (default: %(default)s)")
  train.add_argument("--input-sentence-size", type=int, default=10_000_000,
                     help="lines sampled for training, 0 for all (default: %(default)s)")
  train.add_argument("--num-threads", type=int, default=None,
                     help="trainer threads (default: min(16, CPU count))")
  train.add_argument("--quiet", action="store_true", help="suppress SentencePiece's log")
  train.set_defaults(func=_train)

  encode = sub.add_parser("encode", help="print the token ids of a text",
                          description="Encode TEXT and print its ids, space separated.")
  encode.add_argument("--tokenizer", required=True, metavar="PATH")
  encode.add_argument("--text", required=True)
  encode.add_argument("--no-parse-special", action="store_true",
                      help="treat special-token strings in TEXT as plain text")
  encode.set_defaults(func=_encode)

  decode = sub.add_parser("decode", help="print the text of token ids",
                          description="Decode IDS and print the text.")
  decode.add_argument("--tokenizer", required=True, metavar="PATH")
  decode.add_argument("--ids", nargs="+", type=int, required=True, metavar="ID")
  decode.add_argument("--skip-special-tokens", action="store_true")
  decode.set_defaults(func=_decode)


def _expand_inputs(patterns: list[str]) -> list[str]:
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern))
    # An unmatched pattern is passed through so training fails naming it.
    files.extend(matches or [pattern])
  return files


def _fail(error: Exception) -> int:
  print(f"qwen2-jax tokenizer: error: {error}", file=sys.stderr)
  return 2


def _train(args: argparse.Namespace) -> int:
  from qwen2_jax.tokenizer import train_sentencepiece  # pylint: disable=import-outside-toplevel

  try:
    model = train_sentencepiece(
        _expand_inputs(args.input), args.output_prefix, vocab_size=args.vocab_size,
        model_type=args.model_type, character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size, num_threads=args.num_threads,
        verbose=not args.quiet)
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    return _fail(e)
  print(model)
  return 0


def _encode(args: argparse.Namespace) -> int:
  from qwen2_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  try:
    tok = load_tokenizer(args.tokenizer)
  except (FileNotFoundError, ValueError) as e:
    return _fail(e)
  print(" ".join(map(str, tok.encode(args.text, parse_special=not args.no_parse_special))))
  return 0


def _decode(args: argparse.Namespace) -> int:
  from qwen2_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  try:
    text = load_tokenizer(args.tokenizer).decode(
        args.ids, skip_special_tokens=args.skip_special_tokens)
  except (FileNotFoundError, ValueError) as e:
    return _fail(e)
  print(text)
  return 0
