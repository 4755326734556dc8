"""Helpers shared by the training-run tests (test_pretrain, test_sft, test_dpo): recipe dicts
with dotted overrides, reading metrics.jsonl and checkpoints, running a `qwen2-jax` job in a
new process, and synthetic chat data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from qwen2_jax import sharding
from qwen2_jax.train import checkpointing, step as step_lib
from qwen2_jax.train.optim import make_optimizer

# Words of the synthetic chats and preference pairs (test_sft, test_dpo).
WORDS = ["red", "blue", "green", "cat", "dog", "fish", "bird", "tree"]


def with_overrides(d: dict, overrides: dict[str, Any]) -> dict:
  """Sets `a.b.c` keys of a nested recipe dict in place; returns it."""
  for key, value in overrides.items():
    node = d
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return d


def write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def logged(out, key="loss") -> dict[int, float]:
  """{step: value} of `key` in a run's metrics.jsonl (train or eval records)."""
  values = {}
  with open(os.path.join(out, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "step" in record and key in record:
        values[record["step"]] = record[key]
  return values


def run_cli(job: str, config: dict, path) -> subprocess.CompletedProcess:
  """`python -m qwen2_jax JOB --config path` with as many fake CPU devices as this process."""
  path.write_text(json.dumps(config))  # JSON is YAML
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(jax.device_count())}
  return subprocess.run([sys.executable, "-m", "qwen2_jax", job, "--config", str(path)],
                        capture_output=True, text=True, timeout=600, env=env)


def final_state(output_dir, cfg, steps: int | None = None) -> tuple[int, Any]:
  """(step, host TrainState) of the latest checkpoint under `output_dir`, written by a run of
  `cfg` that was `steps` long (default: cfg.steps)."""
  steps = steps or cfg.steps
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.get_rules(cfg.rules)
  optimizer = make_optimizer(cfg.run_optim(steps))
  abstract = step_lib.abstract_train_state(cfg.model, optimizer, mesh, rules)
  ckpt = checkpointing.Checkpointer(os.path.join(output_dir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    state, _, _ = ckpt.restore(step, abstract, fingerprint=cfg.fingerprint(steps))
    return step, jax.device_get(state)
  finally:
    ckpt.close()


def assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
