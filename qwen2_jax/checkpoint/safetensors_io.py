"""Safetensors files: reading through the `safetensors` library, plus a streaming writer.

Reading uses `safetensors.safe_open(path, framework="numpy")`, which memory-maps the file, returns
bfloat16 tensors as `ml_dtypes` arrays (imported here: numpy knows "bfloat16" only once
`ml_dtypes` is loaded) and reads slices with `get_slice`. On top of it: every error names the
file (and the key), and a truncated file names the first tensor past its end, which the library's
message ("incomplete metadata, file not fully covered") does not.

Format: 8-byte little-endian header length n, n bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data
section, exactly covered by the tensors.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
import safetensors

from qwen2_jax.errors import UserError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(UserError, ValueError):
  """A malformed or truncated safetensors file; the message names the file (and key)."""


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise SafetensorsError(f"dtype {dtype} has no safetensors name")
  return _NAMES[dtype]


def numpy_dtype(name: str) -> np.dtype:
  return _DTYPES[name]


def _diagnose(path: str) -> str | None:
  """A precise reason why the library rejected `path`, when its header says which tensor."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        return f"truncated (file has {size} bytes, no header)"
      (n,) = struct.unpack("<Q", head)
      if 8 + n > size:
        return (f"header length {n} is impossible for a file of {size} bytes (truncated or not "
                "a safetensors file)")
      header = json.loads(f.read(n))
    data_size = size - 8 - n
    header.pop("__metadata__", None)
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
      if info["data_offsets"][1] > data_size:
        return (f"truncated: tensor {key!r} ends at byte {info['data_offsets'][1]} of the data "
                f"section but only {data_size} bytes are present")
  except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
    return None
  return None


class SafetensorsFile:
  """One open file: its tensors' shapes and dtypes, and reads of whole tensors or slices."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      self._file = safetensors.safe_open(self.path, framework="numpy")
      self._keys = list(self._file.offset_keys())  # in data order: reads go front to back
      self.metadata = self._file.metadata() or {}
      self._info = {}
      for key in self._keys:
        s = self._file.get_slice(key)
        self._info[key] = (s.get_dtype(), tuple(s.get_shape()))
    except safetensors.SafetensorError as e:
      reason = _diagnose(self.path) or f"not a valid safetensors file ({e})"
      raise SafetensorsError(f"{self.path}: {reason}") from None
    except OSError as e:
      raise SafetensorsError(f"{self.path}: cannot read: {e}") from None
    for key, (dtype, _) in self._info.items():
      if dtype not in _DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype}")

  def keys(self) -> list[str]:
    """Tensor names in the order their data lies in the file."""
    return list(self._keys)

  def __contains__(self, key: str) -> bool:
    return key in self._info

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info[key][1]

  def dtype(self, key: str) -> str:
    """The safetensors dtype name ("F32", "BF16", ...)."""
    return self._info[key][0]

  def read(self, key: str) -> np.ndarray:
    try:
      return self._file.get_tensor(key)
    except safetensors.SafetensorError as e:
      raise SafetensorsError(f"{self.path}: cannot read tensor {key!r}: {e}") from None

  def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """`read(key)[index]`, reading only what the slice covers (basic slices, one per axis)."""
    dtype, shape = self._info[key]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out_shape = tuple(len(range(*ix.indices(n))) for ix, n in zip(index, shape))
    if not shape or 0 in out_shape:  # the library cannot slice scalars or empty ranges
      return self.read(key)[index] if not shape else np.empty(out_shape, _DTYPES[dtype])
    try:
      return self._file.get_slice(key)[index]
    except safetensors.SafetensorError as e:
      raise SafetensorsError(f"{self.path}: cannot read {index} of tensor {key!r}: {e}") from None


def write_file(path: str | os.PathLike, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
               produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None,
               on_tensor: Callable[[str, int], None] | None = None) -> None:
  """Writes tensors named in `specs` (name, dtype, shape), fetching each with `produce(name)`.

  Hand-written because `safetensors`' `save_file` needs every tensor of a file in host memory
  at once (a whole 5 GB shard gathered from device); this holds one tensor at a time (measured
  peak: 64 MB here vs 512 MB for a file of eight 64 MB tensors).
  `produce` must return exactly the declared dtype and shape (checked). `on_tensor(name,
  nbytes)` reports progress. The library reads the result (tested).
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
        raise ValueError(f"{path}: tensor {name!r} produced as {array.dtype}{list(array.shape)}, "
                         f"declared {np.dtype(dtype)}{list(shape)}")  # a bug, not bad input
      f.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy of the tensor
      nbytes = array.nbytes
      del array  # freed before the next tensor is produced
      if on_tensor is not None:
        on_tensor(name, nbytes)
    f.flush()
    os.fsync(f.fileno())
