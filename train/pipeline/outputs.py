"""What the pipeline writes: ArrayRecord shards (the records `data prepare` writes: int32 token
ids with EOS appended, one document a record, group_size 1), the manifest, the summary and the
JSONL side outputs, each under a temporary name renamed into place only when complete.

Paths may be local or on any filesystem Beam knows (gs://, s3://, hdfs://): ArrayRecord files
are written locally first and copied, the others through `apache_beam.io.filesystems`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import uuid
from typing import Any, Iterable, Mapping

import numpy as np

SHARD_PATTERN = re.compile(r"-(\d{5})-of-(\d{5})\.arrayrecord$")


def shard_path(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.arrayrecord"


def side_path(prefix: str, name: str) -> str:
  """`{prefix}.manifest.json`, `.summary.json`, `.dead_letter.jsonl`, `.decontaminated.jsonl`."""
  return f"{prefix}.{name}"


def _is_local(path: str) -> bool:
  return "://" not in path


_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _remote_tokenizer_files(path: str) -> dict[str, str]:
  """`tokenizer_files` for a path on a Beam filesystem (gs://...): a file, or a directory
  holding tokenizer.json (+ tokenizer_config.json) or tokenizer.model."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  if path.endswith((".json", ".model")):
    return {"tokenizer.json" if path.endswith(".json") else "tokenizer.model": path}
  found = {n: f"{path.rstrip('/')}/{n}" for n in _TOKENIZER_NAMES
           if FileSystems.exists(f"{path.rstrip('/')}/{n}")}
  if "tokenizer.json" in found:
    found.pop("tokenizer.model", None)
    return found
  if "tokenizer.model" in found:
    return {"tokenizer.model": found["tokenizer.model"]}
  raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")


def _tokenizer_files(path: str) -> dict[str, str]:
  if not _is_local(path):
    return _remote_tokenizer_files(path)
  from qwen2_jax.tokenizer import tokenizer_files  # pylint: disable=import-outside-toplevel
  return {name: str(p) for name, p in tokenizer_files(path).items()}


def _read(path: str) -> bytes:
  if _is_local(path):
    with open(path, "rb") as f:
      return f.read()
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  with FileSystems.open(path) as f:
    return f.read()


class TokenizerRef:
  """A tokenizer by path (local, or on a filesystem every worker reads) and the SHA-256 of its
  files. Only the path travels with the pipeline: Beam pickles (and compresses) every DoFn, and
  a 7 MB tokenizer.json inside one made each bundle seconds slower."""

  def __init__(self, path: str):
    self.path = path
    digest = hashlib.sha256()
    for name, file in sorted(_tokenizer_files(path).items()):
      data = _read(file)
      digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    self.sha256 = digest.hexdigest()

  def load(self):
    """The tokenizer (`qwen2_jax.tokenizer.load_tokenizer`), copied locally first if remote."""
    from qwen2_jax.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
    if _is_local(self.path):
      return load_tokenizer(self.path)
    with tempfile.TemporaryDirectory(prefix="qwen2-jax-tokenizer-") as folder:
      for name, file in _tokenizer_files(self.path).items():
        with open(os.path.join(folder, name), "wb") as f:
          f.write(_read(file))
      return load_tokenizer(folder)  # reads the files now, keeps nothing open


def write_bytes(path: str, data: bytes) -> None:
  """`data` at `path`, written under a temporary name and renamed when complete."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  if _is_local(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  with FileSystems.create(tmp) as f:
    f.write(data)
  FileSystems.rename([tmp], [path])


def write_json(path: str, value: Any) -> None:
  write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  write_bytes(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                            for r in rows).encode())


def _open_writer(path: str):
  # pylint: disable-next=import-outside-toplevel
  from array_record.python.array_record_module import ArrayRecordWriter
  return ArrayRecordWriter(path, "group_size:1")


def write_shard(path: str, documents: Iterable[np.ndarray]) -> dict[str, Any]:
  """Writes one shard (the documents in order) and returns its manifest entry: file name,
  documents, tokens and the SHA-256 of the file."""
  local = path if _is_local(path) else os.path.join(tempfile.mkdtemp(), os.path.basename(path))
  tmp = f"{local}.tmp-{uuid.uuid4().hex}"
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  docs = tokens = 0
  try:
    writer = _open_writer(tmp)
    for ids in documents:
      writer.write(np.asarray(ids, np.int32).tobytes())
      docs += 1
      tokens += len(ids)
    writer.close()
    with open(tmp, "rb") as f:
      digest = hashlib.file_digest(f, "sha256").hexdigest()
    if _is_local(path):
      os.replace(tmp, path)
    else:
      with open(tmp, "rb") as f:
        write_bytes(path, f.read())
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"file": os.path.basename(path), "documents": docs, "tokens": tokens, "sha256": digest}


def remove_stale(prefix: str, keep: Iterable[str] = ()) -> list[str]:
  """Deletes (local) leftovers of earlier runs at `prefix`: temporary files of an interrupted
  run and shards of another shard count; returns what was removed."""
  if not _is_local(prefix):
    return []
  keep = {os.path.abspath(p) for p in keep}
  removed = []
  for path in glob.glob(glob.escape(prefix) + "*"):
    name = path[len(prefix):]
    stale_tmp = ".tmp-" in name and (name.startswith("-") or name.startswith("."))
    stale_shard = SHARD_PATTERN.fullmatch(name) is not None and os.path.abspath(path) not in keep
    if (stale_tmp or (stale_shard and keep)) and os.path.isfile(path):
      os.remove(path)
      removed.append(path)
  return removed
