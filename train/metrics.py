"""Training metrics: model FLOPs and MFU, a JSONL log, TensorBoard event files, the progress line.

TensorBoard's event format is written here directly (a few records of a tiny protobuf), so
training needs neither TensorFlow nor tensorboard; the tests read our files back with
tensorboard's own reader.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

from qwen2_jax.config import Qwen2Config, num_params

# Peak dense bf16 FLOP/s per chip, by `jax.Device.device_kind` substring (public spec sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return PEAK_FLOPS[key]
  return None


def flops_per_token(config: Qwen2Config, seq_len: int) -> float:
  """Training FLOPs per token: 6 * (active non-embedding params + LM head) + causal attention.

  Attention: per layer, QK^T and PV are 2 * 2 * T * D * N multiply-adds per token for full
  attention; causal halves it; x3 for forward + backward.
  """
  H, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
  active = num_params(config) - V * H  # the embedding lookup is not a matmul
  if config.tie_word_embeddings:
    active += V * H  # ... but a tied head still is
  if config.is_moe:  # only top-k of the routed experts run
    E, k, F = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    sparse = sum(config.is_sparse_layer(i) for i in range(L))
    active -= sparse * (E - k) * 3 * H * F
  attention = 3 * 2 * 2 * L * seq_len * config.head_size * config.num_attention_heads / 2
  return 6.0 * active + attention


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


# ----------------------------------------------------------------------------- TensorBoard

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def _event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """An `Event` proto: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
  msg = _field(1, 1, struct.pack("<d", wall_time))
  if step is not None:
    msg += _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    # Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) +
                                   _field(2, 5, struct.pack("<f", float(v))))
                      for tag, v in scalars.items())
    msg += _bytes_field(5, values)
  return msg


class TensorBoardWriter:
  """Scalar summaries in a TensorBoard event file under `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc32c(header)) + data +
                  struct.pack("<I", _masked_crc32c(data)))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(_event(time.time(), step, scalars=values))

  def close(self) -> None:
    self._f.close()


def format_progress(step: int, total: int, metrics: dict[str, float]) -> str:
  parts = [f"step {step}/{total}"]
  for key, fmt in (("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                   ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}")):
    if key in metrics and metrics[key] is not None:
      parts.append(fmt.format(metrics[key]))
  return " | ".join(parts)


_MEASURED: dict[str, float] = {}


def measure_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
  """Measured dense f32 matmul FLOP/s of the default device (median of `repeats`)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / float(np.median(times))


def peak_flops_for_devices(devices) -> float | None:
  """Per-device peak FLOP/s: the spec sheet for known accelerators, a measured matmul on CPU."""
  kind = devices[0].device_kind
  peak = peak_flops_per_device(kind)
  if peak is None and devices[0].platform == "cpu":
    if "cpu" not in _MEASURED:
      _MEASURED["cpu"] = measure_matmul_flops()
    peak = _MEASURED["cpu"]
  return peak


class Progress:
  """A tqdm bar over training steps showing loss, tokens/s and MFU; `note` prints above it."""

  def __init__(self, total: int, start: int, *, enabled: bool = True):
    from tqdm.auto import tqdm

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
    self._bar.write(text) if not self._bar.disable else None

  def close(self) -> None:
    self._bar.close()
