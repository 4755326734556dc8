"""`qwen2-jax eval needle`: needle-in-a-haystack / passkey retrieval over lengths and depths.

  qwen2-jax eval needle MODEL --lengths 4096,16384,32768 --depths 0,0.25,0.5,0.75,1 --trials 3
  qwen2-jax eval needle MODEL --lengths 131072 --dca --dtype bfloat16 --attention-impl pallas \\
      --haystack essays.txt --chat --json --output needle.jsonl

MODEL is an HF directory (config.json + safetensors) or an Orbax directory; the tokenizer
defaults to MODEL's own files. Prompts are exactly --lengths tokens (`qwen2_jax.infer.needle`);
answers are greedy, over the tokenizer's ids only. Prints the exact-retrieval table (rows
depths, columns lengths); --output writes one JSON record per case. Exit codes: 0 ok, 2 bad
arguments or files (one line naming the flag or file), 1 other failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qwen2_jax import cli
from qwen2_jax.errors import UserError


def _numbers(kind):
  def parse(text: str):
    try:
      return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
  return parse


def register(subparsers) -> None:
  """Adds `eval` (with its `needle` task) to `subparsers`."""
  p = subparsers.add_parser("eval", help="evaluations: needle-in-a-haystack retrieval")
  tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
  n = tasks.add_parser("needle", help="needle-in-a-haystack / passkey retrieval table",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  n.add_argument("model", metavar="MODEL", help="HF checkpoint directory or Orbax directory")
  n.add_argument("--tokenizer", metavar="PATH", help="tokenizer dir/file (default: MODEL's)")
  n.add_argument("--haystack", metavar="FILE",
                 help="text file for the haystack (repeated as needed; default: passkey filler)")
  n.add_argument("--lengths", type=_numbers(int), default=[4096],
                 help="prompt lengths in tokens, comma-separated (default 4096)")
  n.add_argument("--depths", type=_numbers(float), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                 help="needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)")
  n.add_argument("--trials", type=int, default=1, help="keys per (length, depth) (default 1)")
  n.add_argument("--seed", type=int, default=0, help="seed of the keys")
  n.add_argument("--key-digits", type=int, default=5, help="digits of the pass key (default 5)")
  n.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
  n.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
  m = n.add_argument_group("model")
  m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="param dtype")
  m.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                 help="activation dtype (default: as saved)")
  m.add_argument("--attention-impl", choices=("xla", "pallas"), default=None,
                 help="attention kernel (pallas needs a TPU); default: the config's")
  m.add_argument("--dca", action="store_true",
                 help="Dual Chunk Attention (ChunkLlama defaults from the pretraining length, or "
                      "the checkpoint's own dual_chunk_attention_config)")
  m.add_argument("--dca-chunk-size", type=int, default=None, help="DCA chunk_size (implies --dca)")
  m.add_argument("--dca-local-size", type=int, default=None, help="DCA local_size (implies --dca)")
  m.add_argument("--dca-original-length", type=int, default=None,
                 help="DCA original_max_position_embeddings (pretraining length L0)")
  m.add_argument("--batch-size", type=int, default=4, help="rows per compiled batch (default 4)")
  out = n.add_argument_group("output")
  out.add_argument("--output", metavar="OUT.jsonl", help="write one JSON record per case")
  out.add_argument("--json", action="store_true", help="print the table as JSON")
  n.set_defaults(func=_run_needle)


# The flag of each parameter named by `qwen2_jax.infer` validation errors.
FLAGS = {"max_new_tokens": "--max-new-tokens", "max_batch_size": "--batch-size",
         "lengths": "--lengths", "depths": "--depths", "haystack": "--haystack"}


def _check_flags(args: argparse.Namespace) -> None:
  """Validates the flags that need no model; errors name the flag."""
  # pylint: disable-next=import-outside-toplevel  # jax-heavy: keeps `qwen2-jax --help` fast
  from qwen2_jax.infer import validation
  bad = validation.InvalidParameterError
  if not args.lengths or any(n < 1 for n in args.lengths):
    raise bad("--lengths", f"needs at least one length, each >= 1, got {args.lengths}")
  if not args.depths or any(not 0.0 <= d <= 1.0 for d in args.depths):
    raise bad("--depths", f"needs at least one depth, each in [0, 1], got {args.depths}")
  if args.trials < 1:
    raise bad("--trials", f"must be >= 1, got {args.trials}")
  if not 1 <= args.key_digits <= 18:
    raise bad("--key-digits", f"must be in [1, 18], got {args.key_digits}")
  if args.seed < 0:
    raise bad("--seed", f"must be >= 0, got {args.seed}")
  try:
    validation.check_engine_settings(max_batch_size=args.batch_size)
    if args.max_new_tokens < 1:
      raise bad("max_new_tokens", f"must be a positive integer, got {args.max_new_tokens}")
  except validation.GenerationInputError as e:
    raise e.renamed(FLAGS.get(e.param, e.param)) from None


def _run_needle(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel  # jax-heavy: keeps `qwen2-jax --help` fast
  from qwen2_jax.config import enable_dual_chunk_attention
  from qwen2_jax.infer import needle as needle_lib
  from qwen2_jax.infer.api import load_model
  from qwen2_jax.infer.engine import Engine
  from qwen2_jax.infer.validation import GenerationInputError
  from qwen2_jax.tokenizer import load_tokenizer

  _check_flags(args)
  try:
    tokenizer = load_tokenizer(args.tokenizer or args.model)
  except ValueError as e:  # a malformed tokenizer file (its message names it)
    raise UserError(f"--tokenizer: {e}") from None
  text = needle_lib.FILLER
  if args.haystack:
    with open(args.haystack, encoding="utf-8") as f:
      text = f.read()
  try:
    haystack = needle_lib.Haystack(tokenizer, text)
    task = needle_lib.NeedleTask(key_digits=args.key_digits, chat=args.chat)
    cases = needle_lib.make_cases(tokenizer, haystack, task, args.lengths, args.depths,
                                  args.trials, args.seed)
  except GenerationInputError as e:
    raise e.renamed(FLAGS.get(e.param, e.param)) from None
  config, params = load_model(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype)
  if args.attention_impl:
    config = config.replace(attention_impl=args.attention_impl)
  if (args.dca or args.dca_chunk_size or args.dca_local_size is not None
      or args.dca_original_length):
    config = enable_dual_chunk_attention(
        config, chunk_size=args.dca_chunk_size, local_size=args.dca_local_size,
        original_max_position_embeddings=args.dca_original_length)
  eos = config.eos_token_id
  stops = {*(() if eos is None else (eos,) if isinstance(eos, int) else eos),
           tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")} - {None}
  engine = Engine(config, params, max_batch_size=args.batch_size,
                  max_context=max(args.lengths) + args.max_new_tokens,
                  eos_token_ids=sorted(stops), vocab_limit=tokenizer.vocab_size)
  del params
  print(f"needle: {len(cases)} prompts, lengths {args.lengths}, depths {args.depths}, "
        f"{args.trials} trial(s); attention {config.attention_impl}"
        + (f", DCA {dict(config.dual_chunk_attention_config)}"
           if config.dual_chunk_attention_config else ""), file=sys.stderr, flush=True)
  report = needle_lib.run_needle(engine, tokenizer, cases, max_new_tokens=args.max_new_tokens)
  if args.output:
    _write_records(args.output, report["records"])
  if args.json:
    print(json.dumps({**report["table"], "model": os.fspath(args.model),
                      "dual_chunk_attention": None if config.dual_chunk_attention_config is None
                      else dict(config.dual_chunk_attention_config)}, indent=2))
  else:
    print(needle_lib.format_table(report["table"]))
  return 0


def _write_records(path: str, records) -> None:
  """One JSON line per case, written beside `path` and renamed: never a half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "x", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  """Runs `qwen2-jax eval ARGV...` (for tests): errors are reported as the CLI reports them."""
  return cli.main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
