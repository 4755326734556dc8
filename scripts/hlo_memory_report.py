"""Where a compiled TPU step's memory goes, from XLA's buffer-assignment dump.

Reads the `*after_optimizations-buffer-assignment.txt` and `*-live-range.txt` of a program dumped
with `XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"` (`compare_maxtext_memory.py
--dump-dir` does this per configuration) and prints, per device: the argument buffers grouped by
shape, the preallocated temporary buffer's size, and the values live at the schedule's peak
(the step with the most bytes live: arguments and temporaries), largest first, with their HLO
instruction names and shapes.

The buffer assignment is dumped before TPU code generation; the executable's
`memory_analysis()` temporaries can be larger than this dump's (code generation adds buffers),
so quote totals from `memory_analysis()` and use this for where the bytes go.

  python scripts/hlo_memory_report.py runs/dumps/qwen2-7b_v5p-8_b44_qwen2-jax_kernel --top 25
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

_ALLOC = re.compile(r"^allocation (\d+): size (\d+), (.*):$")
_VALUE = re.compile(r"^ value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
_RANGE = re.compile(r"^    (\S+):(\d+)-(\d+)$")
_GIB = float(1 << 30)


def _strip_layout(shape: str) -> str:
  return re.sub(r"\{[^{}]*\}", "", shape).strip()


def parse(path: str) -> list[dict]:
  """The allocations of a buffer-assignment dump: index, size, kind text, and values
  (name, size, offset, shape)."""
  allocations: list[dict] = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      m = _ALLOC.match(line)
      if m:
        allocations.append({"index": int(m.group(1)), "size": int(m.group(2)),
                            "kind": m.group(3), "values": []})
        continue
      m = _VALUE.match(line)
      if m and allocations:
        allocations[-1]["values"].append({"name": m.group(1).removesuffix("{}"),
                                          "size": int(m.group(2)), "offset": int(m.group(3)),
                                          "shape": _strip_layout(m.group(4))})
  return allocations


def live_ranges(path: str) -> list[tuple[str, int, int]]:
  """(value name, first, last schedule position) from a `*-live-range.txt` dump."""
  ranges, inside = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("  BufferLiveRange:"):
        inside = True
      elif inside:
        m = _RANGE.match(line)
        if m:
          ranges.append((m.group(1).removesuffix("{}"), int(m.group(2)), int(m.group(3))))
        elif not line.startswith("    "):
          break
  return ranges


def _dump_file(folder: str, suffix: str) -> str:
  files = glob.glob(os.path.join(folder, f"*after_optimizations{suffix}"))
  if not files:
    raise FileNotFoundError(f"no *after_optimizations{suffix} under {folder}")
  return max(files, key=os.path.getsize)  # the step, not a small helper program


def peak(folder: str) -> tuple[int, list[dict]]:
  """(bytes live at the schedule's peak, the values live there, largest first) over the default
  memory space: argument and temporary values, each with `kind` 'argument' or 'temporary'."""
  values = {}
  for a in parse(_dump_file(folder, "-buffer-assignment.txt")):
    if "color" in a["kind"]:  # other memory spaces (on-chip scratch, host, ...)
      continue
    kind = "argument" if "parameter" in a["kind"] else "temporary"
    for v in a["values"]:
      values[v["name"]] = {**v, "kind": kind}
  ranges = [r for r in live_ranges(_dump_file(folder, "-live-range.txt")) if r[0] in values]
  end = max(last for _, _, last in ranges) + 1
  delta = [0] * (end + 1)
  for name, first, last in ranges:
    delta[first] += values[name]["size"]
    delta[last + 1] -= values[name]["size"]
  live, best, at = 0, -1, 0
  for t in range(end):
    live += delta[t]
    if live > best:
      best, at = live, t
  alive = [values[n] for n, first, last in ranges if first <= at <= last]
  return best, sorted(alive, key=lambda v: -v["size"])


def report(folder: str, top: int = 25) -> str:
  allocations = parse(_dump_file(folder, "-buffer-assignment.txt"))
  params = [a for a in allocations if "parameter" in a["kind"] and "color" not in a["kind"]]
  temps = [a for a in allocations if "preallocated-temp" in a["kind"] and "color" not in a["kind"]]
  by_shape = collections.Counter()
  for a in params:
    shape = re.search(r"shape \|([^|]*)\|", a["kind"])
    by_shape[shape.group(1) if shape else "?"] += a["size"]
  total, alive = peak(folder)
  lines = [folder,
           f"arguments: {sum(a['size'] for a in params) / _GIB:.2f} GiB in {len(params)} buffers",
           *(f"  {n / _GIB:8.2f} GiB  {s}" for s, n in by_shape.most_common(8)),
           f"preallocated temporaries (buffer assignment): "
           f"{sum(a['size'] for a in temps) / _GIB:.2f} GiB",
           f"live at the schedule's peak: {total / _GIB:.2f} GiB "
           f"(arguments {sum(v['size'] for v in alive if v['kind'] == 'argument') / _GIB:.2f}, "
           f"temporaries {sum(v['size'] for v in alive if v['kind'] == 'temporary') / _GIB:.2f});"
           f" its {top} largest temporaries:"]
  for v in [v for v in alive if v["kind"] == "temporary"][:top]:
    lines.append(f"  {v['size'] / _GIB:7.2f} GiB  {v['shape']:<40} {v['name']}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("dump", help="a dump folder of one program (XLA_FLAGS=--xla_dump_to=...)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  print(report(args.dump, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
