"""Reading the raw corpus: documents in the order and with the splits of `data prepare`'s
sources (`qwen2_jax.train.data`), plus a dead-letter record for each bad one.

A document is (key, source, text): key = (file index, ordinal in the file) orders the corpus,
source = "path:line" says where it starts. A record that cannot be a document (bytes that are
not UTF-8, a JSONL line that is not JSON, a missing or non-string field) becomes a dead letter
{"source", "reason", "detail"} instead, and the pipeline goes on.
"""

from __future__ import annotations

import json
from typing import Iterator, NamedTuple, Sequence

from qwen2_jax.train.data import DataConfigError, glob_files
from qwen2_jax.train.pipeline.recipe import InputConfig, expand


class Document(NamedTuple):
  key: tuple[int, int]     # (file index, ordinal in the file)
  source: str              # "path:line"
  text: str


class DeadLetter(NamedTuple):
  key: tuple[int, int]
  source: str
  reason: str              # "invalid_utf8" | "malformed_json" | "missing_field" | "not_a_string"
  detail: str

  def to_json(self) -> dict:
    return {"source": self.source, "reason": self.reason, "detail": self.detail}


def list_files(config: InputConfig) -> list[str]:
  """The input files in corpus order: each pattern's matches sorted, patterns in order."""
  local = [p for p in config.paths if "://" not in p]
  if len(local) == len(config.paths):
    return glob_files([expand(p) for p in config.paths], DataConfigError, "input.paths")
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  files = []
  for pattern in config.paths:
    found = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
    if not found:
      raise DataConfigError(f"input.paths: {pattern!r} matches no file")
    files.extend(found)
  return files


def open_file(path: str):
  """A binary file object for a local path or one on a Beam filesystem (no decompression)."""
  if "://" not in path:
    return open(path, "rb")
  # pylint: disable-next=import-outside-toplevel
  from apache_beam.io.filesystems import CompressionTypes, FileSystems
  return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _decode(raw: bytes, key, path: str, line: int):
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad_line = line + raw[:e.start].count(b"\n")
    return DeadLetter(key, f"{path}:{bad_line}", "invalid_utf8", f"byte {e.start}: {e.reason}")


def read_text(file_index: int, path: str, split: str) -> Iterator[Document | DeadLetter]:
  """Documents of a text file: the whole file, its paragraphs ("\\n\\n") or its lines; blank
  pieces are skipped, as `data.TextDocuments` does."""
  with open_file(path) as f:
    data = f.read()
  if split == "file":
    spans = [(0, len(data))] if data else []
  else:
    sep = b"\n\n" if split == "paragraph" else b"\n"
    spans, start = [], 0
    while start < len(data):
      end = data.find(sep, start)
      end = len(data) if end < 0 else end
      if data[start:end].strip():
        spans.append((start, end))
      start = end + len(sep)
  line, done = 1, 0
  for ordinal, (begin, end) in enumerate(spans):
    line += data.count(b"\n", done, begin)
    done = begin
    key = (file_index, ordinal)
    text = _decode(data[begin:end], key, path, line)
    yield text if isinstance(text, DeadLetter) else Document(key, f"{path}:{line}", text)


def read_jsonl(file_index: int, path: str, field: str) -> Iterator[Document | DeadLetter]:
  """One document per non-blank line: the string under `field`."""
  with open_file(path) as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      key, where = (file_index, number), f"{path}:{number}"
      line = _decode(raw, key, path, number)
      if isinstance(line, DeadLetter):
        yield line
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield DeadLetter(key, where, "malformed_json", e.msg)
        continue
      if not isinstance(record, dict) or field not in record:
        yield DeadLetter(key, where, "missing_field", f"no field {field!r}")
      elif not isinstance(record[field], str):
        yield DeadLetter(key, where, "not_a_string",
                         f"{field!r} is {type(record[field]).__name__}")
      else:
        yield Document(key, where, record[field])


def read_parquet(file_index: int, path: str, field: str) -> Iterator[Document | DeadLetter]:
  """One document per row of column `field` (source "path:row", rows counted from 1)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with open_file(path) as f:
    table = pq.ParquetFile(f)
    if field not in table.schema_arrow.names:
      raise DataConfigError(f"{path}: no column {field!r} (columns: {table.schema_arrow.names})")
    row = 0
    for group in range(table.num_row_groups):
      for value in table.read_row_group(group, columns=[field]).column(0).to_pylist():
        row += 1
        key, where = (file_index, row), f"{path}:{row}"
        if value is None:
          yield DeadLetter(key, where, "missing_field", f"{field!r} is null")
        elif not isinstance(value, str):
          yield DeadLetter(key, where, "not_a_string", f"{field!r} is {type(value).__name__}")
        else:
          yield Document(key, where, value)


def read_file(config: InputConfig, file_index: int, path: str
              ) -> Iterator[Document | DeadLetter]:
  """Every document and dead letter of one input file, in file order."""
  if config.kind == "text":
    return read_text(file_index, path, config.split)
  if config.kind == "jsonl":
    return read_jsonl(file_index, path, config.field)
  return read_parquet(file_index, path, config.field)


def documents(config: InputConfig, files: Sequence[str] | None = None) -> Iterator[Document]:
  """All good documents of the corpus in order (single process; for tests and benchmarks)."""
  for i, path in enumerate(list_files(config) if files is None else files):
    yield from (d for d in read_file(config, i, path) if isinstance(d, Document))
