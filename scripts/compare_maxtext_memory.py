"""Training-step memory of qwen2-jax next to MaxText's, both compiled by libtpu for the same TPU.

A benchmark, not a test. Each configuration (model, topology, global batch, stack, attention,
settings) is compiled ahead of time on this host, in a fresh process: qwen2-jax through
`qwen2-jax compile --json` (this virtualenv), MaxText through `maxtext_aot_worker.py` in MaxText's
own virtualenv (made by `compare_maxtext_memory.sh`, which also runs this file). Both stacks get
the same settings: pure FSDP over every chip, bf16 compute, fp32 weights and Adam moments, full
remat, scanned layers, one step on synthetic data. Printed as Markdown, per device:
`memory_analysis()` arguments / outputs / temporaries and their total (arguments + outputs -
aliases + temporaries + generated code), fitting when the total is <= 95% of the chip's HBM,
and the host memory of buffers offloaded off the chip (`host GiB`, not in the total); a batch
the TPU compiler itself cannot place in HBM is recorded as "compiler OOM" (does not fit).

  scripts/compare_maxtext_memory.sh --model qwen2-7b --topology v5p-8 --batch 44 \\
      --stack qwen2-jax --stack maxtext --attention kernel --attention xla
  scripts/compare_maxtext_memory.sh --model qwen2-7b --topology v5p-8 --stack qwen2-jax \\
      --attention kernel --set model.loss_chunk_size=512 --search-batch 40 64
  scripts/compare_maxtext_memory.sh --table runs/memory.jsonl   # re-print, compile nothing

`--attention kernel` is qwen2-jax's Pallas flash kernel and MaxText's splash kernel
(`attention=flash`); `--attention xla` is the plain XLA path of each (`attention=dot_product`).
`--set` goes to qwen2-jax (`qwen2-jax compile --set`), `--maxtext-set` to MaxText. `--cost` adds
XLA's FLOPs and bytes per step (from 1- and 2-layer unrolled compiles, extrapolated to every
layer, as `qwen2-jax compile` does) and a roofline step-time ESTIMATE (`qwen2_jax.aot.roofline`,
peak chip numbers; nothing here is a TPU measurement). `--dump-dir` keeps XLA's dumps
(buffer assignment, memory-usage report) per configuration for `hlo_memory_report.py`.
Every result is appended to `--results` (JSON lines); the table is printed from that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIB = float(1 << 30)

# MaxText's names for the models (its qwen2.5-7b has Qwen2-7B's shapes; it has no 72B Qwen2
# config, so the 72B starts from its qwen2.5-14b with the 72B dimensions).
MAXTEXT_MODELS = {
    "qwen2-7b": ["model_name=qwen2.5-7b"],
    "qwen2-72b": ["model_name=qwen2.5-14b", "override_model_config=true", "base_emb_dim=8192",
                  "base_num_query_heads=64", "base_num_kv_heads=8", "base_mlp_dim=29568",
                  "base_num_decoder_layers=80", "head_dim=128", "vocab_size=152064"],
}
# qwen2-jax presets MaxText has no config for (Qwen2-MoE): compiled with `--stack qwen2-jax` only.
QWEN2_JAX_ONLY = ("qwen2-57b-a14b",)
ATTENTION = {"kernel": {"qwen2-jax": "pallas", "maxtext": "flash"},
             "xla": {"qwen2-jax": "xla", "maxtext": "dot_product"}}


@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration to compile."""
  model: str          # qwen2-jax preset: qwen2-7b, qwen2-72b, qwen2-57b-a14b (no MaxText)
  topology: str       # e.g. v5p-8, v5p-128
  batch: int          # global batch (sequences per step)
  stack: str          # qwen2-jax | maxtext
  attention: str      # kernel | xla
  settings: tuple[str, ...] = ()   # --set (qwen2-jax) or --maxtext-set (MaxText) key=value
  seq_len: int = 4096
  mesh: str = "fsdp=-1"   # qwen2-jax only (MaxText: always pure FSDP)
  rules: str = "fsdp"     # qwen2-jax only: a rule set's name or a JSON file


def _topology(name: str):
  from qwen2_jax import aot  # pylint: disable=import-outside-toplevel  (imports jax)
  return aot.parse_topology(name)


def _env(dump_dir: str | None, module_re: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if dump_dir:
    os.makedirs(dump_dir, exist_ok=True)
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} "
                        f"--xla_dump_hlo_as_text --xla_dump_hlo_module_re={module_re}").strip()
  return env


def _run(cmd: list[str], env: dict, timeout: int) -> dict:
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
  if proc.returncode == 2 and cmd[1] == "compile":  # `qwen2-jax compile`: a bad setting, one line
    raise SystemExit((proc.stderr.strip().splitlines() or ["bad setting"])[-1])
  if proc.returncode not in (0, 3) or not lines:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n" + "\n".join(tail))
  return json.loads(proc.stdout[proc.stdout.index("{"):]) if cmd[-1] == "--json" \
      else json.loads(lines[-1])


def compile_qwen2_jax(case: Case, *, cost: bool, dump_dir: str | None, timeout: int) -> dict:
  """One `qwen2-jax compile --json` run: its memory report (and XLA cost / estimate)."""
  cmd = [os.path.join(os.path.dirname(sys.executable), "qwen2-jax"), "compile",
         "--preset", case.model, "--topology", case.topology, "--batch", str(case.batch),
         "--seq-len", str(case.seq_len), "--mesh", case.mesh, "--rules", case.rules,
         "--remat", "full", "--dtype", "bfloat16", "--param-dtype", "float32",
         "--attention-impl", ATTENTION[case.attention]["qwen2-jax"]]
  for s in case.settings:
    cmd += ["--set", s]
  cmd += [] if cost else ["--no-cost"]
  r = _run(cmd + ["--json"], _env(dump_dir, ".*jit_step.*"), timeout)
  out = {"memory_per_device": r["memory_per_device"], "compile_seconds": r["compile_seconds"]}
  if r["memory_per_device"] is None:  # the TPU compiler ran out of HBM: no figures
    out["error"] = r.get("error")
  elif "xla" in r.get("flops_per_device", {}):
    out["xla"] = {"flops": r["flops_per_device"]["xla"],
                  "bytes_accessed": r["bytes_accessed_per_device"]["xla"]}
    if not _pure_fsdp(case.mesh, case.rules):  # the compile's own estimate, made on its mesh and rules
      out["estimate"] = {k: v for k, v in r["estimate"].items() if k != "note"}
  return out


def _pure_fsdp(mesh: str, rules: str) -> bool:
  """The layout MaxText is compiled with (and qwen2-jax's default here)."""
  return (mesh, rules) == ("fsdp=-1", "fsdp")


def _maxtext_settings(case: Case, chips: int, run_dir: str, layers: int | None = None) -> list:
  if case.batch % chips:
    raise ValueError(f"batch {case.batch}: MaxText needs a multiple of the {chips} chips")
  topo = case.topology if "-" in case.topology else None
  if topo is None:
    raise ValueError(f"topology {case.topology!r}: give MaxText's name, e.g. v5p-128")
  if case.model not in MAXTEXT_MODELS:
    raise ValueError(f"{case.model}: MaxText has no config for it; use --stack qwen2-jax")
  model = list(MAXTEXT_MODELS[case.model])
  if layers is not None:  # an unrolled few-layer copy, for the XLA cost extrapolation
    if "override_model_config=true" not in model:
      model.append("override_model_config=true")
    model = [s for s in model if not s.startswith("base_num_decoder_layers=")]
    model += [f"base_num_decoder_layers={layers}", "scan_layers=false"]
  return [f"compile_topology={topo}", "compile_topology_num_slices=1", *model,
          f"per_device_batch_size={case.batch // chips}", f"max_target_length={case.seq_len}",
          "dtype=bfloat16", "weight_dtype=float32", "ici_fsdp_parallelism=-1",
          "remat_policy=full", *([] if layers else ["scan_layers=true"]),
          "dataset_type=synthetic", "enable_checkpointing=false",
          f"attention={ATTENTION[case.attention]['maxtext']}",
          f"base_output_directory={run_dir}", "run_name=aot", *case.settings]


def compile_maxtext(case: Case, *, python: str, cost: bool, dump_dir: str | None,
                    timeout: int) -> dict:
  """One MaxText compile in its virtualenv; with `cost`, two more unrolled 1/2-layer ones."""
  chips = _topology(case.topology).num_chips
  worker = [python, os.path.join(ROOT, "scripts", "maxtext_aot_worker.py")]
  run_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "maxtext_aot")
  r = _run(worker + _maxtext_settings(case, chips, run_dir),
           _env(dump_dir, ".*jit_train_step.*"), timeout)
  out = {"memory_per_device": r["memory_per_device"], "compile_seconds": r["compile_seconds"],
         "versions": r["versions"]}
  if r["memory_per_device"] is None:  # the TPU compiler ran out of HBM: no figures
    return {**out, "error": r.get("error")}
  if cost:
    from qwen2_jax import presets  # pylint: disable=import-outside-toplevel
    costs = [_run(worker + _maxtext_settings(case, chips, run_dir, layers), _env(None, ""),
                  timeout)["xla_scanned_program"] for layers in (1, 2)]
    num_layers = presets.get_preset(case.model).num_hidden_layers
    out["xla"] = {k: costs[0][k] + (num_layers - 1) * (costs[1][k] - costs[0][k])
                  for k in ("flops", "bytes_accessed")}
  return out


def measure(case: Case, args) -> dict:
  """Compiles `case`; the result record (also appended to `args.results`)."""
  topology = _topology(case.topology)
  dump = os.path.join(args.dump_dir, _slug(case)) if args.dump_dir else None
  start = time.perf_counter()
  if case.stack == "qwen2-jax":
    r = compile_qwen2_jax(case, cost=args.cost, dump_dir=dump, timeout=args.timeout)
  else:
    r = compile_maxtext(case, python=args.maxtext_python, cost=args.cost, dump_dir=dump,
                        timeout=args.timeout)
  hbm = topology.chip.hbm_bytes
  record = {**dataclasses.asdict(case), **r, "chips": topology.num_chips, "hbm_bytes": hbm,
            "fits": r["memory_per_device"] is not None and
                    r["memory_per_device"]["total_bytes"] <= (1 - args.hbm_margin) * hbm,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
  if case.stack == "qwen2-jax":
    record["versions"] = _local_versions()
  if "xla" in r and "estimate" not in r:
    record["estimate"] = _estimate(case, r["xla"])
  if args.results:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  return record


def _local_versions() -> dict:
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  return {p: md.version(p) for p in ("jax", "jaxlib", "libtpu")}


def _estimate(case: Case, xla: dict) -> dict:
  """The roofline step-time ESTIMATE of `qwen2_jax.aot.roofline`, the same for both stacks."""
  # pylint: disable=import-outside-toplevel  (jax)
  from qwen2_jax import aot, flops, presets, sharding
  config = presets.get_preset(case.model)
  topology = _topology(case.topology)
  mesh_shape = {"fsdp": topology.num_chips}
  tokens = case.batch * case.seq_len
  return aot.roofline(config, topology, mesh_shape, sharding.get_rules("fsdp"), tokens, xla,
                      flops.train_flops_per_token(config, case.seq_len))


def _shown_settings(r: dict) -> str:
  """The settings column: the --set values, and the mesh and rules where not pure FSDP."""
  shown = list(r["settings"])
  if not _pure_fsdp(r.get("mesh", "fsdp=-1"), r.get("rules", "fsdp")):
    shown = [f"mesh {r['mesh']}", f"rules {os.path.basename(r['rules'])}", *shown]
  return ", ".join(shown) or "-"


def _slug(case: Case) -> str:
  shown = _shown_settings(dataclasses.asdict(case))
  extra = "_".join(s.replace("=", "-").replace(".", "-").replace(" ", "-").replace(",", "")
                   for s in ([] if shown == "-" else shown.split(", ")))
  return "_".join(p for p in (case.model, case.topology, f"b{case.batch}", case.stack,
                              case.attention, extra) if p)


def search_batch(template: Case, lo: int, hi: int, args) -> list[dict]:
  """Largest fitting global batch in [lo, hi] (multiples of the chip count): memory is close to
  linear in the batch, so after two probes each next one is the line's prediction, kept strictly
  inside the bracket; ends when the largest fit and smallest non-fit are one step apart."""
  unit = _topology(template.topology).num_chips
  budget = (1 - args.hbm_margin) * _topology(template.topology).chip.hbm_bytes
  good, bad = 0, hi // unit + 1   # multiples of the unit: largest known fit, smallest non-fit
  probes: list[dict] = []
  candidate = max(1, lo // unit)
  while bad - good > 1:
    r = measure(dataclasses.replace(template, batch=candidate * unit), args)
    probes.append(r)
    print(_row(r), flush=True)
    if r["fits"]:
      good = candidate
    else:
      bad = candidate
    if len(probes) >= 2 and all(p["memory_per_device"] for p in probes[-2:]):
      (b0, m0), (b1, m1) = [(p["batch"] // unit, p["memory_per_device"]["total_bytes"])
                            for p in probes[-2:]]
      slope = max((m1 - m0) / (b1 - b0), 1.0)
      candidate = int((budget - m1) / slope) + b1
    else:
      candidate = hi // unit if r["fits"] else (good + bad) // 2
    candidate = min(max(candidate, good + 1), bad - 1)
  return probes


_HEADER = ("| model | topology | stack | attention | settings | batch | arguments | outputs "
           "| aliased | temporaries | total GiB | fits 95% | host GiB | compile s |\n"
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")


def _row(r: dict) -> str:
  m = r["memory_per_device"]
  gib = lambda k: f"{m[k] / _GIB:.2f}" if m else "-"
  attention = ATTENTION[r["attention"]][r["stack"]]
  if not m:  # the compiler ran out of HBM
    return (f"| {r['model']} | {r['topology']} | {r['stack']} | {attention} | "
            f"{_shown_settings(r)} | {r['batch']} | - | - | - | - | "
            f"compiler OOM | no | - | {r['compile_seconds']:.0f} |")
  return (f"| {r['model']} | {r['topology']} | {r['stack']} | {attention} | "
          f"{_shown_settings(r)} | {r['batch']} | {gib('argument_bytes')} | "
          f"{gib('output_bytes')} | {gib('alias_bytes')} | {gib('temp_bytes')} | "
          f"**{gib('total_bytes')}** | {'yes' if r['fits'] else 'no'} | "
          f"{m.get('host_temp_bytes', 0) / _GIB:.2f} | {r['compile_seconds']:.0f} |")


def format_tables(records: list[dict]) -> str:
  """Memory table, then (for records with XLA cost) FLOPs, bytes and the roofline ESTIMATE."""
  lines = [_HEADER, *(_row(r) for r in records)]
  costed = [r for r in records if "estimate" in r]
  if costed:
    lines += ["", "| model | topology | stack | attention | settings | batch | XLA TFLOPs / device "
              "| XLA GB accessed / device | ESTIMATED step s (roofline) | bound | ESTIMATED MFU |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in costed:
      e = r["estimate"]
      lines.append(f"| {r['model']} | {r['topology']} | {r['stack']} | "
                   f"{ATTENTION[r['attention']][r['stack']]} | {_shown_settings(r)} "
                   f"| {r['batch']} | {r['xla']['flops'] / 1e12:.1f} | "
                   f"{r['xla']['bytes_accessed'] / 1e9:.0f} | {e['step_s']:.2f} | {e['bound']} | "
                   f"{e['mfu']:.0%} |")
  versions = sorted({(r["stack"], json.dumps(r.get("versions", {}), sort_keys=True))
                     for r in records})
  lines += ["", *(f"- {stack}: {', '.join(f'{k} {v}' for k, v in json.loads(v).items() if v)}"
                  for stack, v in versions)]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--model", default="qwen2-7b",
                 choices=sorted([*MAXTEXT_MODELS, *QWEN2_JAX_ONLY]))
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--batch", type=int, action="append", default=[], help="global batch (repeat)")
  p.add_argument("--search-batch", type=int, nargs=2, metavar=("LO", "HI"),
                 help="find the largest fitting global batch between LO and HI")
  p.add_argument("--seq-len", type=int, default=4096)
  p.add_argument("--stack", action="append", choices=("qwen2-jax", "maxtext"), default=[])
  p.add_argument("--attention", action="append", choices=sorted(ATTENTION), default=[])
  p.add_argument("--set", dest="sets", action="append", default=[],
                 help="qwen2-jax setting, as `qwen2-jax compile --set` takes it (repeat)")
  p.add_argument("--mesh", default="fsdp=-1",
                 help="qwen2-jax's mesh as `qwen2-jax compile --mesh` takes it (MaxText: FSDP)")
  p.add_argument("--rules", default="fsdp",
                 help="qwen2-jax's sharding rules: a rule set's name or a JSON file")
  p.add_argument("--maxtext-set", dest="maxtext_sets", action="append", default=[],
                 help="MaxText setting key=value (repeat)")
  p.add_argument("--cost", action="store_true", help="XLA FLOPs/bytes and a roofline ESTIMATE")
  p.add_argument("--dump-dir", help="keep XLA dumps here, one folder per configuration")
  p.add_argument("--results", default=os.path.join(ROOT, "runs", "memory.jsonl"),
                 help="JSON-lines file every result is appended to")
  p.add_argument("--table", metavar="RESULTS", help="only print the tables of a results file")
  p.add_argument("--maxtext-python", default=os.environ.get(
      "MAXTEXT_PYTHON", os.path.join(ROOT, ".venv-maxtext", "bin", "python")))
  p.add_argument("--hbm-margin", type=float, default=0.05)
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  args = p.parse_args(argv)
  if args.table:
    with open(args.table, encoding="utf-8") as f:
      print(format_tables([json.loads(l) for l in f if l.strip()]))
    return 0
  if not args.batch and not args.search_batch:
    p.error("give --batch N (repeatable) or --search-batch LO HI")
  records = []
  print(_HEADER, flush=True)
  for stack in args.stack or ["qwen2-jax", "maxtext"]:
    for attention in args.attention or ["kernel"]:
      settings = tuple(args.sets if stack == "qwen2-jax" else args.maxtext_sets)
      case = Case(args.model, args.topology, 0, stack, attention, settings, args.seq_len,
                  *((args.mesh, args.rules) if stack == "qwen2-jax" else ()))
      if args.search_batch:
        records += search_batch(case, *args.search_batch, args)
        continue
      for batch in args.batch:
        records.append(measure(dataclasses.replace(case, batch=batch), args))
        print(_row(records[-1]), flush=True)
  print("\n" + format_tables(records))
  return 0


if __name__ == "__main__":
  sys.exit(main())
