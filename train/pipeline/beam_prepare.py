"""The Beam pipeline behind `qwen2-jax data prepare --recipe`: read, clean, deduplicate,
decontaminate, tokenise, write ArrayRecord shards; runs on any Beam runner.

  files -> read (+ dead letters) -> normalise + heuristics + repetition (per document)
        -> exact dedup (content hash groups) + near dedup (MinHash LSH bands -> verified pairs
           -> clusters) -> decontaminate (benchmark index) -> tokenise
        -> global order (file index, ordinal) -> shard = rank // docs_per_shard -> write

Determinism: which document of a duplicate group survives, the order of documents and their
shard depend only on the documents' keys (file index, ordinal), never on bundles or workers;
so the same input and recipe give byte-identical shards on 1 or 100 workers. Each shard is
written under a temporary name and renamed when complete; the manifest is written last.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from qwen2_jax.train.data import _Tokenize
from qwen2_jax.train.pipeline import dedup, outputs, rules, sources
from qwen2_jax.train.pipeline.decontam import BenchmarkIndex
from qwen2_jax.train.pipeline.recipe import CleanRecipe, normalize_text

_FATE, _DEAD, _AUDIT = "fate", "dead", "audit"


@dataclasses.dataclass(frozen=True)
class Fate:
  """What became of one record: kept, or dropped by `stage` for `reason` (stage "read": bad)."""
  stage: str
  reason: str
  chars: int = 0
  tokens: int = 0


class _Read(beam.DoFn):
  def __init__(self, config):
    self.config = config

  def process(self, item):
    file_index, path = item
    for record in sources.read_file(self.config, file_index, path):
      if isinstance(record, sources.DeadLetter):
        yield beam.pvalue.TaggedOutput(_DEAD, record)
        yield beam.pvalue.TaggedOutput(_FATE, Fate("read", record.reason))
      else:
        yield record


class _Clean(beam.DoFn):
  """Normalisation, then the per-document rules; a dropped document yields only its fate."""

  def __init__(self, recipe: CleanRecipe):
    self.recipe = recipe

  def process(self, doc: sources.Document):
    text = normalize_text(doc.text, self.recipe.normalize)
    for stage, rule in (("heuristics", rules.heuristics_reason),
                        ("repetition", rules.repetition_reason)):
      config = getattr(self.recipe, stage)
      reason = rule(text, config) if config is not None else None
      if reason is not None:
        yield beam.pvalue.TaggedOutput(_FATE, Fate(stage, reason, len(text)))
        return
    yield doc._replace(text=text)


class _Signature(beam.DoFn):
  """(band bucket, (key, MinHash signature)) for each LSH band of a document."""

  def __init__(self, config):
    self.config = config
    self.bands = dedup.lsh_bands(config.threshold, config.num_perm)

  def setup(self):
    self.hasher = dedup.MinHasher(self.config.num_perm, self.config.ngram, self.config.seed)

  def process(self, doc: sources.Document):
    signature = self.hasher.signature(doc.text)
    for bucket in dedup.band_keys(signature, *self.bands):
      yield bucket, (doc.key, signature)


class _Filter(beam.DoFn):
  """Exact and near duplicates (side inputs: dropped key -> kept key), then decontamination
  (side input: the benchmark index, or None)."""

  def process(self, doc: sources.Document, exact, near, index):
    for stage, drops in (("exact_dedup", exact), ("near_dedup", near)):
      if doc.key in drops:
        yield beam.pvalue.TaggedOutput(_FATE, Fate(stage, "duplicate", len(doc.text)))
        return
    if index is not None:
      match = index.match(doc.text)
      if match is not None:
        rule, item = match
        yield beam.pvalue.TaggedOutput(_FATE, Fate("decontaminate", rule, len(doc.text)))
        yield beam.pvalue.TaggedOutput(_AUDIT, (doc.key, {
            "doc_id": f"{doc.key[0]}:{doc.key[1]}", "source": doc.source, "rule": rule,
            "benchmark_item": item}))
        return
    yield doc


class _Tokenise(beam.DoFn):
  """(file index, (ordinal, int32 ids + EOS)); the fate "kept" carries chars and tokens."""

  def __init__(self, tokenizer: outputs.TokenizerRef):
    self.tokenizer = tokenizer

  def setup(self):
    tokenizer = self.tokenizer.load()
    self.tokenize = _Tokenize(tokenizer, tokenizer.eos_id)

  def process(self, doc: sources.Document):
    ids = self.tokenize(doc.text)
    yield beam.pvalue.TaggedOutput(_FATE, Fate("output", "kept", len(doc.text), len(ids)))
    yield doc.key[0], (doc.key[1], ids)


def _exact_drops(item):
  """Documents with one content hash: all but the smallest key -> the smallest key."""
  keys = sorted(item[1])
  return [(k, keys[0]) for k in keys[1:]]


def _place(item, offsets, docs_per_shard: int):
  """Global rank of each document of one file -> (shard, (rank, ids))."""
  file_index, docs = item
  start = offsets[file_index]
  for rank, (_, ids) in enumerate(sorted(docs, key=lambda d: d[0]), start):
    yield rank // docs_per_shard, (rank, ids)


def _offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
  out, total = {}, 0
  for file_index, n in sorted(counts):
    out[file_index] = total
    total += n
  out[-1] = total
  return out


class _WriteShard(beam.DoFn):
  def __init__(self, prefix: str, docs_per_shard: int):
    self.prefix, self.docs_per_shard = prefix, docs_per_shard

  def process(self, item, offsets):
    shard, grouped = item
    count = max(1, -(-offsets[-1] // self.docs_per_shard))
    docs = sorted(grouped["docs"], key=lambda d: d[0])
    entry = outputs.write_shard(outputs.shard_path(self.prefix, shard, count),
                                (ids for _, ids in docs))
    yield shard, entry


class _Tally(beam.CombineFn):
  """Fates -> {(stage, reason): [records, chars, tokens]}."""

  def create_accumulator(self):
    return {}

  def add_input(self, acc, fate: Fate):
    row = acc.setdefault((fate.stage, fate.reason), [0, 0, 0])
    row[0] += 1
    row[1] += fate.chars
    row[2] += fate.tokens
    return acc

  def merge_accumulators(self, accs):
    out: dict = {}
    for acc in accs:
      for key, row in acc.items():
        total = out.setdefault(key, [0, 0, 0])
        for i, v in enumerate(row):
          total[i] += v
    return out

  def extract_output(self, acc):
    return acc


def summarize(tally: dict, stages: Sequence[str]) -> dict[str, Any]:
  """The summary: records in, bad records by reason, then per stage documents and characters
  in, kept and dropped by reason, and the output's documents, characters and tokens."""
  by_stage: dict[str, dict[str, list[int]]] = collections.defaultdict(dict)
  for (stage, reason), row in tally.items():
    by_stage[stage][reason] = row
  kept = by_stage.get("output", {}).get("kept", [0, 0, 0])
  bad = by_stage.get("read", {})
  dropped = {s: by_stage.get(s, {}) for s in stages}
  docs_in = kept[0] + sum(r[0] for d in dropped.values() for r in d.values())
  chars_in = kept[1] + sum(r[1] for d in dropped.values() for r in d.values())
  summary: dict[str, Any] = {
      "records_in": docs_in + sum(r[0] for r in bad.values()),
      "bad_records": {"total": sum(r[0] for r in bad.values()),
                      **{k: r[0] for k, r in sorted(bad.items())}},
      "documents_read": docs_in, "stages": []}
  for stage in stages:
    lost_docs = sum(r[0] for r in dropped[stage].values())
    lost_chars = sum(r[1] for r in dropped[stage].values())
    summary["stages"].append({
        "stage": stage, "documents_in": docs_in, "chars_in": chars_in,
        "documents_kept": docs_in - lost_docs, "chars_kept": chars_in - lost_chars,
        "dropped": {k: {"documents": r[0], "chars": r[1]}
                    for k, r in sorted(dropped[stage].items())}})
    docs_in, chars_in = docs_in - lost_docs, chars_in - lost_chars
  summary["output"] = {"documents": kept[0], "chars": kept[1], "tokens": kept[2]}
  return summary


class _Finish(beam.DoFn):
  """Writes the side outputs, the summary and, last, the manifest; removes stale shards."""

  def __init__(self, recipe: CleanRecipe, tokenizer_sha256: str, files: Sequence[str]):
    self.recipe, self.sha, self.files = recipe, tokenizer_sha256, list(files)

  def process(self, _, entries, tally, dead, audit):
    prefix = self.recipe.output.prefix
    outputs.write_jsonl(outputs.side_path(prefix, "dead_letter.jsonl"),
                        [d.to_json() for d in sorted(dead, key=lambda d: d.key)])
    outputs.write_jsonl(outputs.side_path(prefix, "decontaminated.jsonl"),
                        [row for _, row in sorted(audit, key=lambda a: a[0])])
    summary = summarize(tally, self.recipe.stage_names())
    outputs.write_json(outputs.side_path(prefix, "summary.json"), summary)
    shards = [entry for _, entry in sorted(entries)]
    manifest = {
        "format": "arrayrecord: one document per record, int32 token ids with EOS appended",
        "shards": shards, "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards), "tokenizer_sha256": self.sha,
        "input_files": self.files, "recipe": self.recipe.to_dict(),
        "stages": self.recipe.stage_names()}
    outputs.write_json(outputs.side_path(prefix, "manifest.json"), manifest)
    outputs.remove_stale(prefix, [outputs.shard_path(prefix, i, len(shards))
                                  for i in range(len(shards))])
    yield manifest


def build(p: beam.Pipeline, recipe: CleanRecipe) -> None:
  """Adds the whole preparation to pipeline `p`."""
  files = sources.list_files(recipe.input)
  outputs.remove_stale(recipe.output.prefix)
  tokenizer = outputs.TokenizerRef(recipe.output.tokenizer)
  if recipe.decontaminate is not None:
    BenchmarkIndex(recipe.decontaminate)  # a bad benchmark file fails here, before any work
  # Fail on the launching machine, not on a worker, when the tokenizer cannot be loaded.
  if tokenizer.load().eos_id is None:
    from qwen2_jax.train.data import DataConfigError  # pylint: disable=import-outside-toplevel
    raise DataConfigError("output.tokenizer: the tokenizer has no eos id; documents need one")

  read = (p | "Files" >> beam.Create(list(enumerate(files)))
          | "SpreadFiles" >> beam.Reshuffle()
          | "Read" >> beam.ParDo(_Read(recipe.input)).with_outputs(_FATE, _DEAD, main="docs"))
  clean = read.docs | "Clean" >> beam.ParDo(_Clean(recipe)).with_outputs(_FATE, main="docs")
  docs = clean.docs
  exact = near = None
  if recipe.dedup is not None and recipe.dedup.exact:
    exact = beam.pvalue.AsDict(
        docs | "Hash" >> beam.Map(lambda d: (dedup.content_hash(d.text), d.key))
        | "SameHash" >> beam.GroupByKey()
        | "ExactDrops" >> beam.FlatMap(_exact_drops))
  if recipe.dedup is not None and recipe.dedup.near:
    threshold = recipe.dedup.threshold
    near = beam.pvalue.AsDict(
        docs | "MinHash" >> beam.ParDo(_Signature(recipe.dedup))
        | "SameBucket" >> beam.GroupByKey()
        | "Verify" >> beam.FlatMap(lambda kv: dedup.similar_pairs(list(kv[1]), threshold))
        | "Edges" >> beam.Distinct()
        | "AllEdges" >> beam.combiners.ToList()
        | "Clusters" >> beam.FlatMap(lambda edges: sorted(dedup.cluster_drops(edges).items())))
  # The index is built where the pipeline runs and reaches workers as a side input: a large
  # benchmark set inside the DoFn would be pickled into the pipeline graph itself.
  index = beam.pvalue.AsSingleton(
      p | "Benchmarks" >> beam.Create([recipe.decontaminate])
      | "Index" >> beam.Map(lambda c: BenchmarkIndex(c) if c is not None else None))
  none = beam.pvalue.AsDict(p | "NoDrops" >> beam.Create([]))
  kept = docs | "Filter" >> beam.ParDo(
      _Filter(), exact=none if exact is None else exact,
      near=none if near is None else near, index=index).with_outputs(_FATE, _AUDIT, main="docs")
  tokens = kept.docs | "Tokenise" >> beam.ParDo(_Tokenise(tokenizer)).with_outputs(
      _FATE, main="ids")

  offsets = beam.pvalue.AsSingleton(
      tokens.ids | "PerFile" >> beam.combiners.Count.PerKey()
      | "FileCounts" >> beam.combiners.ToList()
      | "Offsets" >> beam.Map(_offsets))
  per_shard = (tokens.ids | "ByFile" >> beam.GroupByKey()
               | "Place" >> beam.FlatMap(_place, offsets, recipe.output.docs_per_shard))
  per = recipe.output.docs_per_shard
  shard_ids = (p | "One" >> beam.Create([None])
               | "ShardIds" >> beam.FlatMap(lambda _, o: [(s, None) for s in range(
                   max(1, -(-o[-1] // per)))], offsets))
  entries = ({"docs": per_shard, "ids": shard_ids} | "ShardDocs" >> beam.CoGroupByKey()
             | "WriteShards" >> beam.ParDo(_WriteShard(recipe.output.prefix, per), offsets))
  fates = ((read[_FATE], clean[_FATE], kept[_FATE], tokens[_FATE]) | "Fates" >> beam.Flatten()
           | "Tally" >> beam.CombineGlobally(_Tally()))
  _ = (p | "Finish" >> beam.Create([None])
       | "Write" >> beam.ParDo(
           _Finish(recipe, tokenizer.sha256, files),
           entries=beam.pvalue.AsList(entries), tally=beam.pvalue.AsSingleton(fates),
           dead=beam.pvalue.AsList(read[_DEAD]), audit=beam.pvalue.AsList(kept[_AUDIT])))


def run(recipe: CleanRecipe, beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Runs the preparation with Beam pipeline options `beam_args` (e.g. `--runner dataflow
  --project ...`; default: the local DirectRunner) and returns the manifest."""
  options = PipelineOptions(list(beam_args))
  with beam.Pipeline(options=options) as p:
    build(p, recipe)
  path = outputs.side_path(recipe.output.prefix, "manifest.json")
  with FileSystems.open(path) as f:
    return json.loads(f.read())
