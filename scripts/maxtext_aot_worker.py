"""Compile MaxText's training step for a TPU topology ahead of time; print its memory as JSON.

Runs inside MaxText's own virtualenv (made by `scripts/compare_maxtext_memory.sh`), never the
project's: `compare_maxtext_memory.py` starts it once per configuration. It calls MaxText's
`train_compile.main` with MaxText's own settings (`key=value` as MaxText's command line takes them)
and keeps the compiled executable it builds, so MaxText chooses everything about the step;
this file only reads the result:

  python scripts/maxtext_aot_worker.py compile_topology=v5p-8 model_name=qwen2.5-7b \\
      per_device_batch_size=11 max_target_length=4096 ...

The last stdout line is one JSON object: per-device `memory_analysis()` fields in bytes, the
total (arguments + outputs - aliases + temporaries + generated code), XLA's `cost_analysis()`
FLOPs and bytes of the compiled program, compile seconds, and the jax / libtpu / MaxText versions.
When the TPU compiler runs out of HBM, `memory_per_device` is null and `error` says why.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile on this host for the described TPU
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's host probing
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def main(settings: list[str]) -> int:
  from maxtext.configs import pyconfig  # pylint: disable=import-outside-toplevel
  from maxtext.trainers.pre_train import train_compile  # pylint: disable=import-outside-toplevel

  base_yml = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
  kept = {}
  compile_fn = train_compile.jit_and_compile

  def keep(*args, **kwargs):  # MaxText's own jit/lower/compile; we only hold on to the result
    start = time.perf_counter()
    kept["compiled"] = compile_fn(*args, **kwargs)
    kept["seconds"] = time.perf_counter() - start
    return kept["compiled"]

  train_compile.jit_and_compile = keep
  start = time.perf_counter()
  try:
    train_compile.main(["train_compile", base_yml, *settings])
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    print(json.dumps({  # the TPU compiler could not place the step in HBM: it does not fit
        "memory_per_device": None, "error": text.strip().splitlines()[0][:300],
        "compile_seconds": round(time.perf_counter() - start, 2),
        "versions": {p: _version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu")},
    }), flush=True)
    return 0
  compiled = kept["compiled"]
  m = compiled.memory_analysis()
  memory = {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "generated_code_bytes": int(m.generated_code_size_in_bytes),
            "host_temp_bytes": int(m.host_temp_size_in_bytes)}
  memory["total_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                           - memory["alias_bytes"] + memory["temp_bytes"]
                           + memory["generated_code_bytes"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  print(json.dumps({
      "memory_per_device": memory,
      "xla_scanned_program": {"flops": float(cost.get("flops", 0.0)),
                              "bytes_accessed": float(cost.get("bytes accessed", 0.0))},
      "compile_seconds": round(kept["seconds"], 2),
      "versions": {p: _version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu")},
  }), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
