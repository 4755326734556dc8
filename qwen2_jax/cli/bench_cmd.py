"""`qwen2-jax bench`: benchmarks, one sub-subcommand per benchmark.

To add one (e.g. `bench train`), add an entry to BENCHES: a module exposing
`add_arguments(parser)` and `run(args) -> exit code`. Modules are imported only when their
benchmark runs or its arguments are parsed, so `--help` stays light.
"""

from __future__ import annotations

import importlib

# name: (module, help)
BENCHES = {
    "generate": ("qwen2_jax.infer.bench",
                 "prefill / decode tokens/s of qwen2-jax vs transformers generate"),
    "train": ("qwen2_jax.train.bench",
              "training tokens/s of qwen2-jax vs transformers + PyTorch AdamW"),
}


def register(subparsers) -> None:
  """Adds the `bench` parser and one sub-parser per benchmark to `subparsers`."""
  parser = subparsers.add_parser("bench", help="benchmarks (generate, ...)",
                                 description="Benchmarks. Run `qwen2-jax bench NAME --help`.")
  sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
  for name, (module, help_text) in BENCHES.items():
    p = sub.add_parser(name, help=help_text, description=importlib.import_module(module).__doc__)
    importlib.import_module(module).add_arguments(p)
    p.set_defaults(func=lambda args, module=module: importlib.import_module(module).run(args))
