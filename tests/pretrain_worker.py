"""Runs `pretrain` from a JSON config in its own process, for the resume / crash tests.

  python pretrain_worker.py CONFIG.json DEVICES [--kill-after-save-start STEP]

DEVICES: number of (fake) CPU devices, to match the test process for bitwise comparisons.

--kill-after-save-start STEP: SIGKILL this process right after the async save of STEP has
started (its files are being written in the background, not yet committed).
"""

import json
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))

from qwen2_jax.train import checkpointing  # noqa: E402
from qwen2_jax.train.pretrain import PretrainConfig, pretrain  # noqa: E402


def main():
  with open(sys.argv[1]) as f:
    config = PretrainConfig.from_dict(json.load(f))
  if "--kill-after-save-start" in sys.argv:
    kill_step = int(sys.argv[sys.argv.index("--kill-after-save-start") + 1])
    original = checkpointing.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
      started = original(self, step, *args, **kwargs)
      if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
      return started

    checkpointing.Checkpointer.save = save_then_die
  summary = pretrain(config)
  print("SUMMARY " + json.dumps(summary, default=str), flush=True)


if __name__ == "__main__":
  main()
