"""Training run outputs: the JSONL metrics log, TensorBoard scalars, the progress bar.

Model FLOPs per token and peak FLOP/s (for MFU) live in `qwen2_jax.flops`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class JsonlLog:
  """Appends one JSON object per line; flushed per record so a crash loses nothing written."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._f = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record, sort_keys=True) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


class TensorBoardWriter:
  """Scalar summaries in a TensorBoard event file under `logdir` (tensorboardX), flushed per
  call so a crash loses nothing written."""

  def __init__(self, logdir: str):
    self._writer = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    for tag, value in values.items():
      self._writer.add_scalar(tag, float(value), global_step=step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class Progress:
  """A tqdm bar over training steps showing loss, tokens/s and MFU; `note` prints above it."""

  def __init__(self, total: int, start: int, *, enabled: bool = True):
    self._bar = tqdm(total=total, initial=start, unit="step", disable=not enabled,
                     dynamic_ncols=True)
    self._last = start

  def update(self, step: int, record: dict[str, Any]) -> None:
    self._bar.update(step - self._last)
    self._last = step
    post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
    if record.get("mfu") is not None:
      post["MFU"] = f"{record['mfu']:.1%}"
    self._bar.set_postfix(post, refresh=True)

  def note(self, text: str) -> None:
    if not self._bar.disable:
      self._bar.write(text)

  def close(self) -> None:
    self._bar.close()
