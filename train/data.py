"""The pretraining input pipeline on grain: sources, mixtures, tokenisation, packing, sharding.

Documents come from local text files, JSONL (a named field), Parquet (a named column) or
ArrayRecord files of pre-tokenised documents (`qwen2-jax data prepare`). Each source is a
random-access `grain.MapDataset`; the pipeline per source is

  documents[process_index::process_count] -> shuffle(seed, per epoch) -> repeat -> tokenise + EOS

then the sources are mixed by weight, each document becomes (inputs = d[:-1], targets = d[1:]),
and grain's concat-then-split packer fills fixed-length rows: every token of every document
lands in exactly one row, with `segment_ids` (1, 2, ... per piece; 0 = padding) and `positions`
restarting at 0 for each piece, so attention never crosses documents. A document longer than a
row continues in the next row as a new piece (positions restart; nothing is dropped). Rows are
batched per process; the iterator's state (`get_state` / `set_state`) is a small JSON dict saved
with every training checkpoint, and restoring it reproduces the remaining stream exactly.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

import grain
import grain.experimental as grain_exp
import numpy as np

from qwen2_jax.errors import UserError
from qwen2_jax.typed_config import ConfigError, Float, Int

SOURCE_KINDS = ("text", "jsonl", "parquet", "arrayrecord")
TEXT_SPLITS = ("file", "paragraph", "line")


class DataConfigError(UserError, ValueError):
  """A data configuration value is invalid; the message names the field or file."""


def glob_files(patterns: Sequence[str], error: type[Exception], field: str) -> list[str]:
  """The files matching each pattern (`~`, `$VARS`, `**` expanded), sorted per pattern; a
  pattern matching nothing raises `error` naming `field`."""
  out = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expandvars(os.path.expanduser(pattern)), recursive=True))
    if not matches:
      raise error(f"{field}: {pattern!r} matches no file")
    out.extend(m for m in matches if os.path.isfile(m))
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
  """One corpus. `paths` are files or glob patterns (`~` and `$VARS` expanded; sorted)."""
  kind: str                       # "text" | "jsonl" | "parquet" | "arrayrecord"
  paths: tuple[str, ...]
  weight: Float = 1.0             # mixture weight (relative)
  field: str = "text"             # JSONL key / Parquet column holding the document text
  split: str = "file"             # text files: one document per "file", "paragraph" or "line"

  def __post_init__(self):
    if self.kind not in SOURCE_KINDS:
      raise ConfigError(f"SourceConfig.kind: {self.kind!r} is not one of {SOURCE_KINDS}")
    if self.split not in TEXT_SPLITS:
      raise ConfigError(f"SourceConfig.split: {self.split!r} is not one of {TEXT_SPLITS}")
    if not self.weight > 0:
      raise ConfigError(f"SourceConfig.weight: must be > 0, got {self.weight}")
    object.__setattr__(self, "paths", tuple([self.paths] if isinstance(self.paths, str)
                                            else self.paths))

  def files(self) -> list[str]:
    return glob_files(self.paths, DataConfigError, "SourceConfig.paths")


# ----------------------------------------------------------------------------- document sources

class TextDocuments:
  """Random access to documents of local text files: whole files, paragraphs or lines.

  The index holds (file, begin, end) byte ranges, built once by scanning the files.
  """

  def __init__(self, files: Sequence[str], split: str = "file"):
    self._spans: list[tuple[str, int, int]] = []
    for path in files:
      size = os.path.getsize(path)
      if split == "file":
        if size:
          self._spans.append((path, 0, size))
        continue
      with open(path, "rb") as f:
        data = f.read()
      sep = b"\n\n" if split == "paragraph" else b"\n"
      start = 0
      while start < len(data):
        end = data.find(sep, start)
        end = len(data) if end < 0 else end
        if data[start:end].strip():
          self._spans.append((path, start, end))
        start = end + len(sep)

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, i: int) -> str:
    path, begin, end = self._spans[i]
    with open(path, "rb") as f:
      f.seek(begin)
      return f.read(end - begin).decode("utf-8", errors="replace")


class JsonlDocuments:
  """Random access to one string field of JSONL lines (line offsets indexed once)."""

  def __init__(self, files: Sequence[str], field: str):
    self._field = field
    self._lines: list[tuple[str, int, int, int]] = []
    for path in files:
      with open(path, "rb") as f:
        offset, number = 0, 0
        for line in f:
          number += 1
          if line.strip():
            self._lines.append((path, offset, len(line), number))
          offset += len(line)

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, i: int) -> str:
    path, offset, length, number = self._lines[i]
    with open(path, "rb") as f:
      f.seek(offset)
      line = f.read(length)
    try:
      value = json.loads(line)[self._field]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataConfigError(f"{path}:{number}: no string field {self._field!r} ({e})") from None
    if not isinstance(value, str):
      raise DataConfigError(f"{path}:{number}: field {self._field!r} is not a string")
    return value


class ParquetDocuments:
  """Random access to one string column of Parquet files (row groups read on demand)."""

  def __init__(self, files: Sequence[str], field: str):
    import pyarrow.parquet as pq  # optional dependency, only for Parquet sources

    self._field = field
    self._index: list[tuple[str, int, int]] = []
    for path in files:
      meta = pq.ParquetFile(path)
      if field not in meta.schema_arrow.names:
        raise DataConfigError(f"{path}: no column {field!r} (columns: {meta.schema_arrow.names})")
      for g in range(meta.num_row_groups):
        self._index.extend((path, g, r) for r in range(meta.metadata.row_group(g).num_rows))
    self._cache: tuple[tuple[str, int], list[str]] | None = None

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> str:
    import pyarrow.parquet as pq

    path, group, row = self._index[i]
    if self._cache is None or self._cache[0] != (path, group):
      table = pq.ParquetFile(path).read_row_group(group, columns=[self._field])
      self._cache = ((path, group), table.column(0).to_pylist())
    return self._cache[1][row]


def array_record_documents(files: Sequence[str]):
  """Pre-tokenised documents (int32 token arrays, EOS included) from ArrayRecord files."""
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(files))).map(
      lambda raw: np.frombuffer(raw, dtype=np.int32))


def document_source(source: SourceConfig) -> grain.MapDataset:
  files = source.files()
  if source.kind == "text":
    return grain.MapDataset.source(TextDocuments(files, source.split))
  if source.kind == "jsonl":
    return grain.MapDataset.source(JsonlDocuments(files, source.field))
  if source.kind == "parquet":
    return grain.MapDataset.source(ParquetDocuments(files, source.field))
  return array_record_documents(files)


# ----------------------------------------------------------------------------- the pipeline

@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Everything that determines the token stream (and so must match on resume). Built from a
  recipe by `qwen2_jax.typed_config.structure`."""
  sources: tuple[SourceConfig, ...]
  seq_len: Int                    # tokens per packed row
  batch_size: Int                 # global rows per step (split evenly over processes)
  seed: Int = 0
  num_epochs: Int | None = None   # None: repeat forever (pretraining); an int for eval / SFT
  eval_every_nth_document: Int = 0  # >0: hold out every n-th document of each source for eval
  worker_count: Int = 0           # grain multiprocessing workers (0: in-process)
  read_threads: Int = 2           # threads reading/tokenising ahead
  prefetch: Int = 8               # elements buffered per read thread

  def __post_init__(self):
    if not self.sources:
      raise ConfigError("DataConfig.sources: at least one source is required")
    object.__setattr__(self, "sources", tuple(
        s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources))
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"DataConfig.{name}: must be positive, got {getattr(self, name)}")
    for name in ("eval_every_nth_document", "worker_count", "read_threads", "prefetch"):
      if getattr(self, name) < 0:
        raise ConfigError(f"DataConfig.{name}: must be >= 0, got {getattr(self, name)}")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ConfigError(f"DataConfig.num_epochs: must be positive or null, got {self.num_epochs}")


class _Tokenize:
  """Text -> int32 ids + EOS (a class, not a closure, so grain workers can pickle it)."""

  def __init__(self, tokenizer, eos_id: int):
    self.tokenizer, self.eos_id = tokenizer, eos_id

  def __call__(self, doc) -> np.ndarray:
    if isinstance(doc, np.ndarray):  # pre-tokenised (ArrayRecord): EOS already appended
      return doc.astype(np.int32)
    ids = self.tokenizer.encode(doc, parse_special=False)
    return np.asarray(list(ids) + [self.eos_id], dtype=np.int32)


class _Take:
  """Document `indices[i]` of `docs`: a fixed subset as a MapDataset."""

  def __init__(self, docs: grain.MapDataset, indices: np.ndarray):
    self.docs, self.indices = docs, indices

  def __call__(self, i: int):
    return self.docs[int(self.indices[i])]


def _shift(doc: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": doc[:-1], "targets": doc[1:]}


def _to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = rows["inputs_segment_ids"]
  return {"input_ids": rows["inputs"], "targets": rows["targets"],
          "positions": rows["inputs_positions"], "segment_ids": segment_ids,
          "loss_mask": (segment_ids > 0).astype(np.float32)}


def split_documents(ds: grain.MapDataset, every_nth: int, eval_split: bool) -> grain.MapDataset:
  """Every n-th document (by index) is held out for evaluation; n = 0 holds out nothing."""
  if every_nth <= 0:
    if eval_split:
      raise DataConfigError("DataConfig.eval_every_nth_document: must be > 0 for an eval split")
    return ds
  keep = np.array([i for i in range(len(ds)) if (i % every_nth == every_nth - 1) == eval_split],
                  dtype=np.int64)
  return grain.MapDataset.range(len(keep)).map(_Take(ds, keep))


def build_dataset(config: DataConfig, tokenizer, *, process_index: int = 0,
                  process_count: int = 1, eval_split: bool = False) -> grain.IterDataset:
  """The packed, batched stream for this process: dicts of [batch_size / process_count, seq_len].

  Batch keys: input_ids, targets (int32), positions, segment_ids (int32), loss_mask (f32).
  """
  if config.batch_size % process_count:
    raise DataConfigError(f"DataConfig.batch_size: {config.batch_size} is not divisible by the "
                          f"{process_count} processes")
  eos = tokenizer.eos_id
  if eos is None:
    raise DataConfigError("the tokenizer has no eos id; documents need an EOS separator")
  per_source = []
  for k, source in enumerate(config.sources):
    docs = split_documents(document_source(source), config.eval_every_nth_document, eval_split)
    docs = docs[process_index::process_count]  # disjoint per process, together covering all
    if len(docs) == 0:
      raise DataConfigError(f"source {k} ({source.kind}: {list(source.paths)}) has no documents "
                            f"for process {process_index} of {process_count}")
    if not eval_split:
      docs = docs.shuffle(seed=config.seed + 1000 * k)
    docs = docs.repeat(config.num_epochs if not eval_split else 1)
    per_source.append(docs.map(_Tokenize(tokenizer, eos)))
  if len(per_source) == 1:
    mixed = per_source[0]
  else:
    mixed = grain.MapDataset.mix(per_source, [s.weight for s in config.sources])
  stream = mixed.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.prefetch))
  stream = stream.map(_shift).filter(lambda d: len(d["inputs"]) > 0)
  stream = grain_exp.ConcatThenSplitIterDataset(
      stream, length_struct={"inputs": config.seq_len, "targets": config.seq_len})
  stream = stream.batch(config.batch_size // process_count, drop_remainder=not eval_split)
  stream = stream.map(_to_batch)
  if config.worker_count > 0:
    from absl import flags  # grain's workers read absl flags; outside absl.app nobody parses them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
  return stream


def iterator_state_to_json(state: dict[str, Any]) -> str:
  """The iterator state as JSON text (saved with every training checkpoint)."""
  return json.dumps(state, sort_keys=True)


def iterator_state_from_json(text: str) -> dict[str, Any]:
  """Inverse of `iterator_state_to_json`. JSON turns tuples into lists, and grain's packer
  compares its `remainder_slices` with tuples (e.g. the `(-1, -1)` sentinel), so restore them."""
  def fix(node):
    if isinstance(node, dict):
      return {k: ({kk: tuple(vv) for kk, vv in v.items()} if k == "remainder_slices" else fix(v))
              for k, v in node.items()}
    return node
  return fix(json.loads(text))


class ResumableIterator:
  """Iterates a grain dataset; `get_state()` is its position as training checkpoints store it,
  {"iterator": JSON text} (`iterator_state_to_json`), which `set_state` restores exactly."""

  def __init__(self, dataset: grain.IterDataset):
    self._iterator = iter(dataset)

  def __iter__(self) -> "ResumableIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, str]:
    return {"iterator": iterator_state_to_json(self._iterator.get_state())}

  def set_state(self, state: dict[str, str]) -> None:
    self._iterator.set_state(iterator_state_from_json(state["iterator"]))


# ----------------------------------------------------------------------------- offline prepare

def prepare_arrayrecord(source: SourceConfig, tokenizer, output_prefix: str, *,
                        docs_per_shard: int = 100_000, show_progress: bool = True) -> list[str]:
  """Tokenises every document of `source` once into ArrayRecord shards (int32 ids + EOS).

  Shards are named `{output_prefix}-00000-of-0000N.arrayrecord`, written under temporary names
  and renamed when complete. Returns the shard paths (use them as an "arrayrecord" source).
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm.auto import tqdm

  if source.kind == "arrayrecord":
    raise DataConfigError("prepare: the source is already ArrayRecord")
  docs = document_source(source)
  tokenize = _Tokenize(tokenizer, tokenizer.eos_id)
  n = len(docs)
  num_shards = max(1, -(-n // docs_per_shard))
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  final = [f"{output_prefix}-{s:05d}-of-{num_shards:05d}.arrayrecord" for s in range(num_shards)]
  tokens = 0
  bar = tqdm(total=n, unit="doc", desc="tokenising", disable=not show_progress)
  try:
    for s, path in enumerate(final):
      writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
      for i in range(s * docs_per_shard, min(n, (s + 1) * docs_per_shard)):
        ids = tokenize(docs[i])
        tokens += len(ids)
        writer.write(ids.tobytes())
        bar.update(1)
        bar.set_postfix(tokens=tokens, refresh=False)
      writer.close()
    for path in final:
      os.replace(path + ".tmp", path)
  finally:
    bar.close()
    for path in final:
      if os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")
  return final
