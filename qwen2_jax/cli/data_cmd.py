"""`qwen2-jax data prepare`: tokenise a corpus once into ArrayRecord shards for pretraining.

Two engines, one output format (the shards an "arrayrecord" source reads):
- without `--recipe` / `--runner`: one process tokenises every document, no cleaning;
- with `--recipe R.yaml` (and/or `--runner`): the Apache Beam pipeline of
  `qwen2_jax.train.pipeline` (cleaning, deduplication, decontamination stages from the recipe)
  on the local DirectRunner or any Beam runner; every option the command does not know is
  passed to Beam (`--direct_num_workers 4`, `--project ...`, `--temp_location ...`).
  `--tokenizer`, `--kind`, `--input`, `--field`, `--split`, `--output-prefix` and
  `--docs-per-shard` then set the recipe's `output.tokenizer`, `input.kind`, ... keys.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen2_jax.errors import UserError

# flag -> recipe key, for the Beam pipeline
_RECIPE_KEYS = {"tokenizer": "output.tokenizer", "kind": "input.kind", "input": "input.paths",
                "field": "input.field", "split": "input.split", "output_prefix": "output.prefix",
                "docs_per_shard": "output.docs_per_shard"}


def register(subparsers) -> None:
  parser = subparsers.add_parser("data", help="prepare training data",
                                 description="Data preparation for pretraining.")
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  p = sub.add_parser("prepare", help="tokenise text/JSONL/Parquet into ArrayRecord shards",
                     description="Tokenise every document once (EOS appended) into ArrayRecord "
                                 "shards of int32 ids, usable as an 'arrayrecord' source. With "
                                 "--recipe or --runner: the Beam pipeline with cleaning stages "
                                 "(docs/data.md); unknown options go to Beam.")
  p.add_argument("--tokenizer",
                 help="tokenizer.json, an HF tokenizer directory or a SentencePiece .model")
  p.add_argument("--kind", choices=("text", "jsonl", "parquet"))
  p.add_argument("--input", nargs="+", help="files or glob patterns")
  p.add_argument("--field", help="JSONL key / Parquet column (default: text)")
  p.add_argument("--split", choices=("file", "paragraph", "line"),
                 help="text files: one document per file, paragraph or line (default: file)")
  p.add_argument("--output-prefix",
                 help="e.g. data/corpus -> data/corpus-00000-of-00001.arrayrecord")
  p.add_argument("--docs-per-shard", type=int, help="(default: 100000)")
  p.add_argument("--recipe", help="YAML cleaning recipe (configs/data/clean.yaml): run the Beam "
                                  "pipeline with its stages")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a recipe value, e.g. dedup.threshold=0.9")
  p.add_argument("--runner", help="Beam runner (DirectRunner, DataflowRunner, FlinkRunner, "
                                  "SparkRunner, ...); default DirectRunner")
  p.set_defaults(func=_prepare, passes_extra_args=True)


def _prepare(args: argparse.Namespace) -> int:
  if args.recipe or args.runner or args.set:
    return _prepare_beam(args)
  if args.extra_args:
    raise UserError(f"unrecognized arguments: {' '.join(args.extra_args)} (Beam options need "
                    "--recipe or --runner)")
  for name in ("tokenizer", "kind", "input", "output_prefix"):
    if getattr(args, name) is None:
      raise UserError(f"--{name.replace('_', '-')} is required (or give --recipe)")
  # pylint: disable=import-outside-toplevel
  from qwen2_jax.tokenizer import load_tokenizer
  from qwen2_jax.train.data import SourceConfig, prepare_arrayrecord

  source = SourceConfig(kind=args.kind, paths=tuple(args.input), field=args.field or "text",
                        split=args.split or "file")
  paths = prepare_arrayrecord(source, load_tokenizer(args.tokenizer), args.output_prefix,
                              docs_per_shard=args.docs_per_shard or 100_000)
  for path in paths:
    print(path)
  print(f"wrote {len(paths)} shard(s)", file=sys.stderr)
  return 0


def _prepare_beam(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import importlib.util
  if importlib.util.find_spec("apache_beam") is None:
    raise UserError("the cleaning pipeline (--recipe / --runner) needs apache-beam and datasketch: "
                    "pip install 'qwen2-jax[data]'")
  from qwen2_jax.train.pipeline import beam_prepare, outputs
  from qwen2_jax.train.pipeline.recipe import CleanRecipe
  from qwen2_jax.typed_config import Recipe, apply_overrides, read_recipe

  recipe = read_recipe(args.recipe) if args.recipe else Recipe({})
  flags = [f"{key}={json.dumps(getattr(args, name))}" for name, key in _RECIPE_KEYS.items()
           if getattr(args, name) is not None]
  recipe = apply_overrides(recipe, flags + list(args.set))
  config = CleanRecipe.from_dict(recipe.data, recipe=recipe)
  beam_args = list(args.extra_args) + ([f"--runner={args.runner}"] if args.runner else [])
  manifest = beam_prepare.run(config, beam_args)
  prefix = config.output.prefix
  folder = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
  for shard in manifest["shards"]:
    print(folder + shard["file"])
  print(f"wrote {len(manifest['shards'])} shard(s), {manifest['documents']} documents, "
        f"{manifest['tokens']} tokens; summary: {outputs.side_path(prefix, 'summary.json')}",
        file=sys.stderr)
  return 0
