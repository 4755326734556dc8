"""`qwen2-jax compile`: ahead-of-time compile a step for a TPU topology and report if it fits.

Runs the real TPU compiler (libtpu) on this machine for a named topology; no TPU is needed and
nothing is allocated. Examples:

  qwen2-jax compile --preset qwen2-7b --topology v5p-8 --batch 16 --seq-len 4096 --remat full
  qwen2-jax compile --preset qwen2-7b --topology v5p-8 --batch 64 --seq-len 4096 \\
      --set model.loss_chunk_size=512 --set optim.mu_dtype=bfloat16
  qwen2-jax compile --preset qwen2-72b --topology v6e-256 --mesh fsdp=-1,sequence=4 \\
      --search-batch --json
  qwen2-jax compile --preset qwen2-7b --topology v5p-8 --job dpo --batch 8 --seq-len 4096
  qwen2-jax compile --preset qwen2-7b --topology v5p:1x1x1 --target prefill --batch 1 \\
      --seq-len 131072 --param-dtype bfloat16 --attention-impl pallas --dca --no-cost
  qwen2-jax compile --preset qwen2-7b --topology v5e-8 --mesh tensor=4,data=2 --rules fsdp_tp \\
      --target serve --batch 64 --seq-len 1024 --new-tokens 1024 --param-dtype bfloat16

Exit status: 0 when the step fits (with --search-batch: when some batch fits), 3 when it does
not, 2 on a bad setting (one line naming it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from qwen2_jax.errors import UserError

# The planner, model and sharding modules import jax: they are imported when the command runs
# (`_run`), so that `qwen2-jax --help` stays fast.

_GIB = float(1 << 30)


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "compile", help="AOT-compile a training step for a TPU topology: memory, FLOPs, estimates",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  model = p.add_mutually_exclusive_group(required=True)
  model.add_argument("--preset", help="model preset name (e.g. qwen2-7b, qwen2-tiny)")
  model.add_argument("--config", help="HF config.json (or its directory) of the model")
  p.add_argument("--topology", required=True,
                 help="TPU topology: v5e-8, v5p-128, v6e-256, v4-32 or explicit v5p:4x4x4")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
  p.add_argument("--target", "--job", dest="target", default="train",
                 help="what to compile: train (forward, backward, optimizer update; default), "
                      "sft (the same step, SFT optimizer), dpo (policy + frozen reference "
                      "params on the mesh; --batch counts preference pairs, 2 sequences each), "
                      "dpo_precomputed (DPO with reference log-probs in the batch), grpo (a "
                      "GRPO update on --batch responses, with the frozen reference's params "
                      "and the rollout engine's KV-cache pools for --batch sequences of "
                      "--seq-len resident), "
                      "prefill (a [batch, seq-len] prompt batch into the KV cache), decode "
                      "(one generation step against a cache of seq-len + new-tokens slots) or "
                      "serve (the continuous-batching engine's step for --batch sequences at "
                      "once, with the largest paged KV pool that fits)")
  p.add_argument("--new-tokens", type=int, default=128,
                 help="prefill/decode/serve: tokens generated beyond the --seq-len prompt "
                      "(default 128)")
  p.add_argument("--max-num-batched-tokens", type=int, default=512,
                 help="serve: tokens per engine step (default 512; >= --batch)")
  p.add_argument("--page-size", type=int, default=16, help="serve: tokens per KV page (16)")
  p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                 help="serve: KV pool GiB per device (default: the most that fits)")
  p.add_argument("--matmul-precision", choices=("high", "highest"), default=None,
                 help="serve: the engine's matmul_precision for float32 compute (--dtype "
                      "float32): high (3 bf16 MXU passes per dot) or highest (6); default: one "
                      "bf16 pass, TPU's default")
  size = p.add_mutually_exclusive_group(required=True)
  size.add_argument("--batch", type=int, help="global batch size (sequences per step)")
  size.add_argument("--search-batch", action="store_true",
                    help="find the largest global batch that fits (doubling, then bisection)")
  p.add_argument("--max-batch", type=int, default=None, help="upper bound for --search-batch")
  p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
  p.add_argument("--mesh", default="",
                 help="mesh axis sizes, e.g. 'fsdp=-1' (default) or 'fsdp=16,tensor=4'; "
                      "axes: data, fsdp, sequence, expert, tensor")
  p.add_argument("--dcn-axis", default="data", help="mesh axis spanning slices (multi-slice)")
  p.add_argument("--rules", default="fsdp",
                 help="sharding rules: dp, fsdp, fsdp_tp, or a JSON file with a custom table")
  p.add_argument("--remat", default="full",
                 help="remat policy (default full): none, full, dots, minimal, save_qkv_proj, "
                      "offload_layer_input, ... (`qwen2_jax.remat`; docs/training.md)")
  p.add_argument("--attention-impl", default=None,
                 help="xla or pallas (flash attention kernel); default: the model config's")
  p.add_argument("--dca", action="store_true",
                 help="Dual Chunk Attention with ChunkLlama defaults (chunk 3/4, local 1/16 of "
                      "the pretraining length, 32768 for Qwen2); keeps a config's own DCA values")
  p.add_argument("--dca-chunk-size", type=int, default=None, help="DCA chunk_size (implies --dca)")
  p.add_argument("--dca-local-size", type=int, default=None, help="DCA local_size (implies --dca)")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
  p.add_argument("--param-dtype", default="float32", help="param / optimizer dtype (float32)")
  p.add_argument("--moe-impl", default=None, choices=("dense", "ragged_dot", "pallas"),
                 help="Qwen2-MoE expert dispatch (default: the config's; 'pallas' is the "
                      "grouped-matmul kernel, 'ragged_dot' XLA's)")
  p.add_argument("--capacity-factor", type=float, default=None,
                 help="Qwen2-MoE capacity factor (default: dropless)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="a model or optimizer setting as a recipe spells it, applied after the "
                      "other flags (repeatable): e.g. model.loss_chunk_size=512, "
                      "model.remat_policy=minimal_offloaded, optim.mu_dtype=bfloat16")
  p.add_argument("--hbm-margin", type=float, default=0.05,
                 help="fraction of HBM kept free when deciding 'fits' (default 0.05)")
  p.add_argument("--no-cost", action="store_true",
                 help="skip the FLOPs / roofline part (saves two small extra compiles)")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.set_defaults(func=run)


class CompileSettingError(UserError, ValueError):
  """A `qwen2-jax compile` flag is invalid; the message names it."""


def _model_config(args):
  from qwen2_jax import presets  # pylint: disable=import-outside-toplevel  (--help speed)
  from qwen2_jax.config import (  # pylint: disable=import-outside-toplevel
      Qwen2Config, enable_dual_chunk_attention)
  overrides = dict(dtype=args.dtype, param_dtype=args.param_dtype, remat_policy=args.remat)
  if args.attention_impl:
    overrides["attention_impl"] = args.attention_impl
  if args.moe_impl is not None:
    overrides["moe_impl"] = args.moe_impl
  if args.capacity_factor is not None:
    overrides["moe_capacity_factor"] = args.capacity_factor
  if args.preset:
    config = presets.get_preset(args.preset, **overrides)
  else:
    config = Qwen2Config.from_hf(args.config, **overrides)
  if args.dca or args.dca_chunk_size or args.dca_local_size is not None:
    config = enable_dual_chunk_attention(config, chunk_size=args.dca_chunk_size,
                                         local_size=args.dca_local_size)
  return config


def _apply_sets(config, overrides):
  """(config, OptimConfig or None) after the `--set model.X=V` / `optim.X=V` overrides, typed and
  checked as in a recipe."""
  # pylint: disable=import-outside-toplevel  (--help speed)
  from qwen2_jax.config import Qwen2Config
  from qwen2_jax.train.optim import OptimConfig
  from qwen2_jax.typed_config import Recipe, apply_overrides, structure
  recipe = apply_overrides(Recipe(data={}), overrides)
  for key, value in recipe.data.items():
    if key not in ("model", "optim") or not isinstance(value, dict):
      raise CompileSettingError(f"{recipe.where((key,))}: only model.* and optim.* settings "
                                f"apply to compile")
  if "model" in recipe.data:
    config = Qwen2Config.from_dict({**config.to_dict(), **recipe.data["model"]}, path="model",
                                   recipe=recipe)
  optim = None
  if "optim" in recipe.data:
    optim = structure(OptimConfig, recipe.data["optim"], path="optim", recipe=recipe)
  return config, optim


def compile_targets(new_tokens: int = 128, optim=None) -> dict:
  """Every `--target`, by name: the training jobs' (`qwen2_jax.train.targets`, with the
  `OptimConfig` `optim` when given) and the generation engine's (`qwen2_jax.infer.targets`,
  with `new_tokens` cache slots)."""
  # Imported when the command runs: the targets pull in the training and generation stacks,
  # which `qwen2-jax --help` does not need.
  from qwen2_jax.infer import targets as infer_targets  # pylint: disable=import-outside-toplevel
  from qwen2_jax.train import targets as train_targets  # pylint: disable=import-outside-toplevel
  return {**train_targets.targets(optim), **{p: infer_targets.generation_target(p, new_tokens)
                                      for p in ("prefill", "decode")}}


def run(args: argparse.Namespace) -> int:
  # Compile on the CPU host for a described TPU; the local backend never needs a TPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if importlib.util.find_spec("libtpu") is None:
    raise CompileSettingError("needs libtpu, the TPU compiler: pip install 'jax[tpu]' "
                              "(the same version as jax)")
  from qwen2_jax import aot, sharding  # pylint: disable=import-outside-toplevel  (--help speed)
  try:
    config, optim = _apply_sets(_model_config(args), args.overrides)
    topology = aot.parse_topology(args.topology, args.num_slices)
    mesh_config = sharding.MeshConfig.from_string(args.mesh)
    mesh_config = sharding.MeshConfig.from_dict(
        {**mesh_config.ici_dict(), "num_slices": args.num_slices, "dcn_axis": args.dcn_axis})
    rules = sharding.get_rules(args.rules)
    if args.target in ("prefill", "decode", "serve"):
      if args.new_tokens < 1:
        raise CompileSettingError(f"--new-tokens: must be >= 1, got {args.new_tokens}")
      config = config.replace(remat_policy="none")  # generation never rematerialises
    if args.target == "serve":
      _check_serve_args(args, config)
      target = None
    elif args.matmul_precision is not None:
      raise CompileSettingError("--matmul-precision: only with --target serve (the Engine's "
                                "matmul_precision)")
    else:
      targets = compile_targets(args.new_tokens, optim)
      if args.target not in targets:
        raise CompileSettingError(f"--target: unknown target {args.target!r}; known: "
                                  f"{sorted([*targets, 'serve'])}")
      target = targets[args.target]
  except UserError:
    raise
  except (ValueError, OSError) as e:  # e.g. a topology or mesh string the parser refuses
    raise CompileSettingError(str(e)) from None
  rules_name = os.path.basename(str(args.rules))
  common = dict(target=target, hbm_margin=args.hbm_margin)
  probes = []
  if args.target == "serve":
    from qwen2_jax.infer import targets as infer_targets  # pylint: disable=import-outside-toplevel
    log = sys.stderr if args.json else sys.stdout

    def sized(pages, c):
      total = f"{c.memory['total_bytes'] / _GIB:.2f} GiB" if c.memory else "compiler OOM"
      print(f"  pool of {pages:,} pages: {total}, {'fits' if c.fits else 'does not fit'} "
            f"({c.compile_seconds:.1f} s)", file=log, flush=True)

    print(f"sizing the KV pool for {args.preset or args.config} on {topology.name}", file=log,
          flush=True)
    kv = None if args.kv_cache_memory is None else int(args.kv_cache_memory * _GIB)
    report = infer_targets.plan_serve(
        config, topology, mesh_config, rules, max_num_seqs=args.batch, prompt_len=args.seq_len,
        new_tokens=args.new_tokens, num_tokens=args.max_num_batched_tokens,
        page_size=args.page_size, kv_cache_bytes=kv, hbm_margin=args.hbm_margin,
        with_cost=not args.no_cost, rules_name=rules_name, on_compile=sized,
        matmul_precision=args.matmul_precision)
  elif args.search_batch:
    log = sys.stderr if args.json else sys.stdout  # with --json, stdout is only the report

    def progress(c):
      state = "fits" if c.fits else "does not fit"
      total = f"{c.memory['total_bytes'] / _GIB:.2f} GiB" if c.memory else "compiler OOM"
      print(f"  batch {c.batch_size:>6}: {total}, {state} ({c.compile_seconds:.1f} s)",
            file=log, flush=True)

    print(f"searching the largest batch for {args.preset or args.config} on {topology.name}",
          file=log, flush=True)
    best, probes = aot.search_batch(config, topology, mesh_config, rules, args.seq_len,
                                    max_batch=args.max_batch, on_probe=progress, **common)
    if best is None:
      report = aot.plan(config, topology, mesh_config, rules, probes[0].batch_size, args.seq_len,
                        rules_name=rules_name, with_cost=False, compiled=probes[0], **common)
    else:
      report = aot.plan(config, topology, mesh_config, rules, best.batch_size, args.seq_len,
                        rules_name=rules_name, with_cost=not args.no_cost, compiled=best, **common)
    report["search"] = [{"batch_size": c.batch_size, "fits": c.fits,
                         "total_bytes": c.memory["total_bytes"] if c.memory else None,
                         "compile_seconds": round(c.compile_seconds, 2), "error": c.error}
                        for c in probes]
  else:
    report = aot.plan(config, topology, mesh_config, rules, args.batch, args.seq_len,
                      rules_name=rules_name, with_cost=not args.no_cost, **common)
  report["model"]["name"] = args.preset or args.config
  if args.target in ("prefill", "decode"):
    report["new_tokens"] = args.new_tokens
    report["cache_slots"] = args.seq_len + args.new_tokens
  if args.json:
    print(json.dumps(report, indent=2, sort_keys=True))
  else:
    print(format_report(report))
  return 0 if report["fits"] else 3


def _check_serve_args(args, config) -> None:
  if args.search_batch:
    raise CompileSettingError("--search-batch: not with --target serve; give --batch (sequences "
                              "at once): the KV pool is sized to fit instead")
  if args.batch < 1:
    raise CompileSettingError(f"--batch: must be >= 1, got {args.batch}")
  if args.max_num_batched_tokens < args.batch:
    raise CompileSettingError(f"--max-num-batched-tokens: {args.max_num_batched_tokens} is less "
                              f"than --batch ({args.batch})")
  if args.page_size < 1:
    raise CompileSettingError(f"--page-size: must be >= 1, got {args.page_size}")
  if args.kv_cache_memory is not None and args.kv_cache_memory <= 0:
    raise CompileSettingError(f"--kv-cache-memory: must be > 0 GiB, got {args.kv_cache_memory}")
  if args.matmul_precision is not None and config.dtype != "float32":
    raise CompileSettingError(f"--matmul-precision: only changes float32 dots; the compute dtype "
                              f"is {config.dtype} (give --dtype float32)")


def _dca_text(model: dict) -> str:
  dca = model.get("dual_chunk_attention")
  return "" if not dca else f" + DCA (chunk {dca['chunk_size']}, local {dca['local_size']})"


def format_report(r: dict) -> str:
  """The human-readable form of an `aot.plan` report."""
  from qwen2_jax.flops import dpo_flops_factor  # pylint: disable=import-outside-toplevel
  topo, mem, model = r["topology"], r["memory_per_device"], r["model"]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"{model.get('name', '')}: {r['target']} step on {topo['name']}, {topo['chips']} chips",
      f"  mesh {mesh} | rules {r['rules']} | remat {model['remat_policy']} | attention "
      f"{model['attention_impl']}{_dca_text(model)} | params "
      f"{model['param_dtype']}, compute {model['dtype']}",
      f"  batch {r['batch_size']} pairs (x2 sequences) x {r['seq_len']} = "
      f"{r['tokens_per_step']:,} tokens per step" if r["target"].startswith("dpo") else
      f"  batch {r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens per step"
      if r["target"] != "decode" else
      f"  batch {r['batch_size']}, one token per row per step, cache of {r['cache_slots']:,} "
      f"slots ({r['seq_len']:,} prompt + {r['new_tokens']:,} new)",
  ]
  if r["target"] == "serve":
    sv = r["serve"]
    lines[2] = (f"  engine step: {sv['max_num_batched_tokens']:,} tokens of up to "
                f"{sv['max_num_seqs']} sequences (prefill chunks and decodes), requests of "
                f"{sv['prompt_len']:,} prompt + {sv['new_tokens']:,} new tokens, block table "
                f"{sv['table_width_pages']} pages")
    lines.append(f"  KV pool: {sv['num_pages']:,} pages of {sv['page_size']} tokens = "
                 f"{sv['pool_tokens']:,} tokens, {sv['pool_bytes_per_device'] / _GIB:.2f} GiB "
                 f"per device; holds {sv['requests_in_pool']:,} such requests "
                 f"({sv['pages_per_request']} pages each), {sv['concurrent_requests']} at once "
                 f"with max_num_seqs {sv['max_num_seqs']}")
    precision = ("" if sv.get("matmul_precision") is None
                 else f", matmul_precision={sv['matmul_precision']!r}")
    lines.append(f"  engine settings: Engine(..., max_num_seqs={sv['max_num_seqs']}, "
                 f"max_num_batched_tokens={sv['max_num_batched_tokens']}, page_size="
                 f"{sv['page_size']}, num_pages={sv['num_pages']}{precision})")
  if r["target"] == "grpo":
    lines.append(f"  resident as inputs: the reference's params and the rollout engine's KV pools "
                 f"({r['batch_size']} sequences of {r['seq_len'] + 1:,} tokens)")
  hbm = topo["hbm_bytes_per_chip"] / _GIB
  if mem is None:
    lines.append(f"  memory per device: the compiler ran out of HBM ({r['error']})")
  else:
    lines.append(
        f"  memory per device: arguments {mem['argument_bytes'] / _GIB:.2f} GiB, outputs "
        f"{mem['output_bytes'] / _GIB:.2f} GiB (donated/aliased {mem['alias_bytes'] / _GIB:.2f}),"
        f" temporaries {mem['temp_bytes'] / _GIB:.2f} GiB")
    if mem.get("host_temp_bytes"):
      lines.append(f"  host memory per device (offloaded buffers, not in the total): "
                   f"{mem['host_temp_bytes'] / _GIB:.2f} GiB")
    lines.append(f"  total {mem['total_bytes'] / _GIB:.2f} GiB of {hbm:.1f} GiB HBM "
                 f"(keeping {r['hbm_margin']:.0%} free): "
                 f"{'FITS' if r['fits'] else 'DOES NOT FIT'}")
  lines.append(f"  compile time (this machine): {r['compile_seconds']:.1f} s")
  if r.get("replicated_params"):
    big = ", ".join(f"{p['param']} ({p['bytes'] / 2**20:.0f} MiB)" for p in r["replicated_params"])
    lines.append(f"  WARNING: large params replicated on every device: {big}")
  flops = r["flops_per_device"]
  if "xla" in flops:
    factor = 6 * dpo_flops_factor(r["target"] == "dpo_precomputed") \
        if r["target"].startswith("dpo") else 6 if r["target"] in ("train", "sft", "grpo") \
        else 2
    lines.append(f"  FLOPs per device per step: XLA {flops['xla']:.3e}, analytic {factor:g}*N*tokens"
                 f" + attention {flops['analytic_model']:.3e} (XLA/analytic "
                 f"{flops['xla'] / flops['analytic_model']:.2f})")
  if "estimate" in r:
    e = r["estimate"]
    if r.get("mxu_passes", 1) > 1:
      lines.append(f"  float32 matmuls at precision {r['matmul_precision']}: "
                   f"{r['mxu_passes']} bf16 MXU passes each (in the compute estimate)")
    lines.append(f"  ESTIMATE (roofline from peak chip numbers, not a measurement): step "
                 f"{e['step_s']:.3g} s ({e['bound']}-bound; compute {e['compute_s']:.3g} s, HBM "
                 f"{e['hbm_s']:.3g} s, collectives {e['collectives_s']:.3g} s), MFU "
                 f"{e['mfu']:.0%}, {e['tokens_per_s']:,.0f} tokens/s")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """Runs the subcommand alone (for tests and before it is listed in `qwen2_jax.cli`)."""
  parser = argparse.ArgumentParser(prog="qwen2-jax")
  register(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["compile", *(sys.argv[1:] if argv is None else argv)])
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
