"""`qwen2-jax upcycle`: build a Qwen2-MoE checkpoint from a dense Qwen2 one (`train.upcycle`).

  qwen2-jax upcycle --src DENSE_DIR --out MOE_DIR --preset qwen2-57b-a14b
  qwen2-jax upcycle --src DENSE_DIR --out MOE_DIR --num-experts 8 --experts-per-tok 2 \\
      --expert-size 1024 --shared-expert-size 4096 [--reinit-fraction 0.5] [--seed 0]

The source is an HF directory (config.json + safetensors) or an Orbax params directory; the
output is HF (default) or Orbax (--format orbax). The MoE fields come from --preset (its MoE
fields only; the model shapes come from the dense checkpoint) and/or the explicit flags, which
win. Same inputs and --seed give bit-identical output files.
"""

from __future__ import annotations

import argparse
import sys
import time

from qwen2_jax import cli, presets
from qwen2_jax.errors import UserError

_MOE_FLAGS = {  # flag dest -> moe_config keyword
    "num_experts": "num_experts", "experts_per_tok": "num_experts_per_tok",
    "expert_size": "moe_intermediate_size", "shared_expert_size": "shared_expert_intermediate_size",
    "decoder_sparse_step": "decoder_sparse_step", "router_aux_loss_coef": "router_aux_loss_coef",
}
_PRESET_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                  "mlp_only_layers", "router_aux_loss_coef")


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "upcycle", help="dense Qwen2 checkpoint -> Qwen2-MoE checkpoint (Qwen2 report recipe)",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--src", required=True, help="dense checkpoint: HF directory or Orbax directory")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--format", default="hf", choices=("hf", "orbax"), help="output format")
  p.add_argument("--preset", help="take the MoE fields from this preset (e.g. qwen2-57b-a14b)")
  p.add_argument("--num-experts", type=int, help="routed experts per sparse layer")
  p.add_argument("--experts-per-tok", type=int, help="experts each token is routed to (top-k)")
  p.add_argument("--expert-size", type=int,
                 help="width of one routed expert (moe_intermediate_size)")
  p.add_argument("--shared-expert-size", type=int,
                 help="width of the shared expert (0: none)")
  p.add_argument("--norm-topk-prob", action=argparse.BooleanOptionalAction, default=None,
                 help="renormalise the top-k router weights")
  p.add_argument("--decoder-sparse-step", type=int, help="every step-th layer is sparse")
  p.add_argument("--mlp-only-layers", help="comma-separated layers that stay dense")
  p.add_argument("--router-aux-loss-coef", type=float, help="load-balancing loss weight")
  p.add_argument("--reinit-fraction", type=float, default=0.5,
                 help="share of each expert's parameters redrawn at random (default 0.5)")
  p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
  p.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16", "float16"),
                 help="output dtype (default: the source checkpoint's)")
  p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (HF output)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the checkpoint in an existing output directory")
  p.add_argument("--allow-nonfinite", action="store_true",
                 help="accept a source whose weights hold NaN or Inf (reported as warnings)")
  p.set_defaults(func=run)


def moe_fields(args: argparse.Namespace) -> dict:
  """The `train.upcycle.moe_config` keywords from --preset and the explicit flags."""
  fields: dict = {}
  if args.preset:
    preset = presets.get_preset(args.preset)
    if not preset.is_moe:
      raise UserError(f"--preset {args.preset}: not an MoE model")
    fields = {f: getattr(preset, f) for f in _PRESET_FIELDS}
  for dest, key in _MOE_FLAGS.items():
    if getattr(args, dest) is not None:
      fields[key] = getattr(args, dest)
  if args.norm_topk_prob is not None:
    fields["norm_topk_prob"] = args.norm_topk_prob
  if args.mlp_only_layers is not None:
    fields["mlp_only_layers"] = tuple(int(x) for x in args.mlp_only_layers.split(",") if x.strip())
  missing = [f for f in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                         "shared_expert_intermediate_size") if f not in fields]
  if missing:
    raise UserError(f"missing MoE field(s) {missing}: pass --preset or the matching flags")
  return fields


def run(args: argparse.Namespace) -> int:
  # Imported here, not at module top, so `qwen2-jax --help` does not load orbax.
  from qwen2_jax.train import upcycle  # pylint: disable=import-outside-toplevel

  start = time.time()
  fields = moe_fields(args)
  if not 0 <= args.reinit_fraction <= 1:
    raise UserError(f"--reinit-fraction: must be in [0, 1], got {args.reinit_fraction}")
  config = upcycle.upcycle_checkpoint(
      args.src, args.out, out_format=args.format, seed=args.seed,
      reinit_fraction=args.reinit_fraction, dtype=None if args.dtype == "keep" else args.dtype,
      overwrite=args.overwrite, max_shard_size=args.max_shard_size,
      allow_nonfinite=args.allow_nonfinite, **fields)
  copies = upcycle.num_copies(config.num_experts, config.moe_intermediate_size,
                              config.intermediate_size)
  print(f"upcycled in {time.time() - start:.1f}s: {config.num_experts} experts of width "
        f"{config.moe_intermediate_size} cut from {copies} shuffled copies of the dense FFN "
        f"(seed {args.seed}, re-initialised fraction {args.reinit_fraction}) -> {args.out}",
        file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  """`qwen2-jax upcycle ARGS` (errors reported and exit codes as `qwen2_jax.cli.main` does)."""
  return cli.main(["upcycle", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
