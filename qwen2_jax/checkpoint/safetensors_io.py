"""A strict, streaming reader and writer of the safetensors format, over numpy.

Format: 8-byte little-endian header length n, n bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data
section. Written here rather than through the `safetensors` package because (a) numpy has no
bfloat16 there while `ml_dtypes` gives us one, (b) every error must name the file and the key,
and (c) the writer streams one tensor at a time from device arrays. The files are read by
`transformers` / `safetensors` unchanged (tested).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A malformed or truncated safetensors file; the message names the file (and key)."""


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise SafetensorsError(f"dtype {dtype} has no safetensors name")
  return _NAMES[dtype]


def numpy_dtype(name: str) -> np.dtype:
  return _DTYPES[name]


class SafetensorsFile:
  """Header of one file, validated on open; tensors are read one at a time with `read`."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise SafetensorsError(f"{self.path}: truncated (file has {size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
          raise SafetensorsError(f"{self.path}: header length {n} is impossible for a file of "
                                 f"{size} bytes (truncated or not a safetensors file)")
        header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{self.path}: unreadable safetensors header: {e}") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_size = size - self._data_start
    self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans = []
    for key, info in header.items():
      try:
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
      except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{self.path}: malformed header entry for {key!r}") from None
      if dtype not in _DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {key!r} has unknown dtype {dtype!r}")
      nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
      if not 0 <= begin <= end or end - begin != nbytes:
        raise SafetensorsError(f"{self.path}: tensor {key!r} offsets {begin}..{end} do not hold "
                               f"{dtype}{list(shape)} ({nbytes} bytes)")
      if end > data_size:
        raise SafetensorsError(f"{self.path}: truncated: tensor {key!r} ends at byte {end} of the "
                               f"data section but only {data_size} bytes are present")
      self.entries[key] = (dtype, shape, begin, end)
      spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
      if b1 < e0:
        raise SafetensorsError(f"{self.path}: tensors {k0!r} and {k1!r} overlap")

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self.entries[key][1]

  def dtype(self, key: str) -> str:
    return self.entries[key][0]

  def read(self, key: str) -> np.ndarray:
    dtype, shape, begin, end = self.entries[key]
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      buf = f.read(end - begin)
    if len(buf) != end - begin:
      raise SafetensorsError(f"{self.path}: truncated while reading {key!r}")
    return np.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape)


def write_file(path: str | os.PathLike, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None,
               on_tensor: Callable[[str, int], None] | None = None) -> None:
  """Writes tensors named in `specs` (name, dtype, shape), fetching each with `produce(name)`.

  Only one tensor is in host memory at a time. `produce` must return exactly the declared
  dtype and shape (checked). `on_tensor(name, nbytes)` reports progress.
  """
  specs = list(specs)
  header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, dtype, shape in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, dtype, shape in specs:
      array = np.ascontiguousarray(produce(name))
      if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise SafetensorsError(f"{path}: tensor {name!r} produced as {array.dtype}{list(array.shape)}"
                               f", declared {np.dtype(dtype)}{list(shape)}")
      f.write(array.tobytes())
      if on_tensor is not None:
        on_tensor(name, array.nbytes)
    f.flush()
    os.fsync(f.fileno())
