"""`qwen2-jax bench`: benchmarks, one sub-subcommand per benchmark.

To add one (e.g. `bench train`), add an entry to BENCHES: a module exposing
`add_arguments(parser)` and `run(args) -> exit code`. Modules are imported only when their
benchmark runs or its arguments are parsed, so `--help` stays light.
"""

from __future__ import annotations

import argparse
import functools
import importlib

# name: (module, help)
BENCHES = {
    "generate": ("qwen2_jax.infer.bench",
                 "prefill / decode tokens/s of qwen2-jax vs transformers generate"),
    "serve": ("qwen2_jax.infer.bench_serve",
              "offline batch tokens/s + TTFT: qwen2-jax engines vs vLLM CPU"),
    "train": ("qwen2_jax.train.bench",
              "training tokens/s of qwen2-jax vs transformers + PyTorch AdamW"),
    "data": ("qwen2_jax.train.pipeline.bench",
             "data prepare documents/s and tokens/s: single process vs the Beam pipeline"),
}


def register(subparsers) -> None:
  """Adds the `bench` parser and one sub-parser per benchmark to `subparsers`.

  A benchmark module imports jax and its peers (torch, transformers), so it is imported only
  when its benchmark runs or its `--help` is asked for: the sub-parser registered here passes
  its arguments (`args.extra_args`, see `qwen2_jax.cli.main`) on to the module's own parser.
  """
  parser = subparsers.add_parser("bench", help="benchmarks (generate, ...)",
                                 description="Benchmarks. Run `qwen2-jax bench NAME --help`.")
  sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
  for name, (module, help_text) in BENCHES.items():
    p = sub.add_parser(name, help=help_text, add_help=False,
                       description=f"{help_text} (`qwen2-jax bench {name} --help` for options)")
    p.set_defaults(func=functools.partial(_run, name, module), passes_extra_args=True)


def _run(name: str, module: str, args: argparse.Namespace) -> int:
  bench = importlib.import_module(module)
  parser = argparse.ArgumentParser(prog=f"qwen2-jax bench {name}", description=bench.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  bench.add_arguments(parser)
  parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
  return bench.run(parser.parse_args(args.extra_args))
