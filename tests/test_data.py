"""The grain data pipelines: pretraining's packing exactness, checkpointable iteration and
process sharding; chat data's batches, exact resume and process split on grain; clear errors for
bad bytes and bad JSON in chat files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax.cli import main as cli_main
from qwen2_jax.errors import UserError
from qwen2_jax.tokenizer import load_tokenizer
from qwen2_jax.train import chat_data as C
from qwen2_jax.train import data as D
from qwen2_jax.typed_config import ConfigError, structure

EOS = 0


class RangeTokenizer:
  """Maps the text "start:length" to ids start, start+1, ..., so every token is traceable."""
  eos_id = EOS

  def encode(self, text, *, parse_special=True):
    start, length = map(int, text.split(":"))
    return list(range(start, start + length))


def _jsonl(path, docs):
  path.write_text("".join(json.dumps({"body": f"{s}:{n}"}) + "\n" for s, n in docs))
  return str(path)


def _docs(n, seed, base=1):
  rng = np.random.RandomState(seed)
  lengths = rng.randint(1, 40, n)
  starts = base + 1000 * np.arange(n)
  return list(zip(starts.tolist(), lengths.tolist()))


def _collect(ds, limit=None):
  out = []
  for i, batch in enumerate(ds):
    if limit is not None and i >= limit:
      break
    out.append(batch)
  return out


def test_packing_places_every_token_once_with_right_segments_and_positions(tmp_path):
  """Every (input, target) of every document appears exactly once; segments/positions are right."""
  docs = _docs(30, seed=0)
  config = D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(_jsonl(tmp_path / "a.jsonl", docs),),
                                                field="body"),),
                        seq_len=16, batch_size=1, num_epochs=1, seed=5)
  rows = _collect(D.build_dataset(config, RangeTokenizer()))
  pairs = []
  for batch in rows:
    ids, tgt, seg, pos, mask = (batch[k][0] for k in ("input_ids", "targets", "segment_ids",
                                                        "positions", "loss_mask"))
    assert ids.shape == (16,)
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    real = seg > 0
    assert (np.diff(seg[real]) >= 0).all() and seg[real][0] == 1  # 1, 2, ... in order
    assert not real[np.argmin(real):].any() if not real.all() else True  # padding only at the end
    for s in np.unique(seg[real]):
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # restart per piece
      np.testing.assert_array_equal(np.diff(ids[where]), 1)  # consecutive tokens of one doc
    pairs += list(zip(ids[real].tolist(), tgt[real].tolist()))
  expected = []
  for start, n in docs:
    d = list(range(start, start + n)) + [EOS]
    expected += list(zip(d[:-1], d[1:]))
  assert sorted(pairs) == sorted(expected)  # each exactly once, EOS as the last target


def test_packed_loss_equals_per_document_loss(tmp_path):
  """The summed next-token loss of a packed row equals the sum of each document's own loss."""
  config = q.get_preset("qwen2-tiny", initializer_range=0.2)
  params = q.init_params(config, jax.random.key(0))
  docs = [(3, 9), (100, 5), (300, 12)]
  data = D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(_jsonl(tmp_path / "d.jsonl", docs),),
                                              field="body"),),
                      seq_len=32, batch_size=1, num_epochs=1)
  (batch,) = _collect(D.build_dataset(data, RangeTokenizer()))
  assert batch["segment_ids"].max() == 3  # all three documents share the row

  def nll_sum(ids, targets, mask, **kw):
    logits = q.forward(config, params, ids, **kw).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return float(-(logp * mask).sum())

  packed = nll_sum(batch["input_ids"], batch["targets"], batch["loss_mask"],
                   positions=batch["positions"], segment_ids=batch["segment_ids"])
  separate = 0.0
  for start, n in docs:
    d = np.array(list(range(start, start + n)) + [EOS])[None]
    separate += nll_sum(d[:, :-1], d[:, 1:], np.ones((1, n)))
  assert packed == pytest.approx(separate, rel=1e-5)


def _mixed_config(tmp_path, **kw):
  a = _jsonl(tmp_path / "a.jsonl", _docs(20, seed=1))
  b = _jsonl(tmp_path / "b.jsonl", _docs(7, seed=2, base=500_000))
  return D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(a,), field="body", weight=3),
                               D.SourceConfig(kind="jsonl", paths=(b,), field="body", weight=1)),
                      seq_len=12, batch_size=2, seed=11, **kw)


def test_restoring_any_state_reproduces_the_rest_of_the_stream(tmp_path):
  """For every step i, set_state(state_i) on a fresh pipeline reproduces outputs[i:] exactly."""
  config = _mixed_config(tmp_path)
  n = 25  # several epochs of the small source, packing carry-over included
  it = iter(D.build_dataset(config, RangeTokenizer()))
  states, outputs = [], []
  for _ in range(n):
    states.append(D.iterator_state_to_json(it.get_state()))  # as saved in checkpoints
    outputs.append(next(it))
  for i in range(0, n, 3):
    fresh = iter(D.build_dataset(config, RangeTokenizer()))
    fresh.set_state(D.iterator_state_from_json(states[i]))
    for j in range(i, n):
      got = next(fresh)
      for key in outputs[j]:
        np.testing.assert_array_equal(got[key], outputs[j][key], err_msg=f"state {i}, step {j}, {key}")


def test_identical_configs_give_identical_streams(tmp_path):
  """Determinism: the same config and seed give the same batches; another seed does not."""
  config = _mixed_config(tmp_path)
  a = _collect(D.build_dataset(config, RangeTokenizer()), 6)
  b = _collect(D.build_dataset(config, RangeTokenizer()), 6)
  c = _collect(D.build_dataset(_mixed_config(tmp_path).__class__(
      **{**config.__dict__, "seed": 12}), RangeTokenizer()), 6)
  assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_processes_read_disjoint_shards_that_cover_the_data(tmp_path):
  """Two processes see disjoint documents whose union is the whole corpus (one epoch)."""
  docs = _docs(23, seed=3)
  path = _jsonl(tmp_path / "c.jsonl", docs)
  config = D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(path,), field="body"),),
                        seq_len=8, batch_size=2, num_epochs=1)
  seen = []
  for p in range(2):
    starts = set()
    for batch in _one_epoch(config, p):
      ids = batch["input_ids"][batch["segment_ids"] > 0]
      starts |= {int(x) // 1000 for x in ids}
      assert batch["input_ids"].shape[0] == 1  # the global batch is split over processes
    seen.append(starts)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(len(docs)))


def _one_epoch(config, process_index):
  # batch 2 over 2 processes = 1 row each; one epoch, keeping the padded last row.
  finite = D.DataConfig(**{**config.__dict__, "num_epochs": 1})
  return _collect(D.build_dataset(finite, RangeTokenizer(), process_index=process_index,
                                  process_count=2))


def test_mixture_follows_weights(tmp_path):
  """With weights 3:1 about three quarters of the documents come from the first source."""
  config = _mixed_config(tmp_path, eval_every_nth_document=0)
  config = D.DataConfig(**{**config.__dict__, "seq_len": 64, "batch_size": 1})
  from_b = from_a = 0
  for batch in _collect(D.build_dataset(config, RangeTokenizer()), 60):
    ids = batch["input_ids"][0][batch["segment_ids"][0] > 0]
    firsts = {int(x) // 1000 for x in ids}
    from_b += sum(1 for f in firsts if f >= 500)
    from_a += sum(1 for f in firsts if f < 500)
  assert 0.6 < from_a / (from_a + from_b) < 0.9


def test_eval_split_is_held_out(tmp_path):
  """eval_every_nth_document holds out documents that training never sees."""
  path = _jsonl(tmp_path / "e.jsonl", _docs(20, seed=4))
  config = D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(path,), field="body"),),
                        seq_len=8, batch_size=1, num_epochs=1, eval_every_nth_document=5)
  docs_of = lambda rows: {int(x) // 1000 for r in rows for x in r["input_ids"][r["segment_ids"] > 0]}
  train = docs_of(_collect(D.build_dataset(config, RangeTokenizer())))
  held = docs_of(_collect(D.build_dataset(config, RangeTokenizer(), eval_split=True)))
  assert held == {4, 9, 14, 19} and not train & held and len(train) == 16


def test_text_sources_and_prepared_arrayrecord_agree(tmp_path, sp_model_path):
  """`data prepare` to ArrayRecord yields the same token stream as tokenising text on the fly."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(5):
    (corpus / f"f{i}.txt").write_text(f"Document {i}.\n\nSecond paragraph of {i}, 你好.\n")
  tok = load_tokenizer(sp_model_path)
  assert cli_main(["data", "prepare", "--tokenizer", str(sp_model_path), "--kind", "text",
                   "--input", str(corpus / "*.txt"), "--split", "paragraph",
                   "--output-prefix", str(tmp_path / "prep" / "c"), "--docs-per-shard", "4"]) == 0
  shards = sorted((tmp_path / "prep").glob("*.arrayrecord"))
  assert len(shards) == 3  # 10 paragraphs, 4 per shard
  text = D.SourceConfig(kind="text", paths=(str(corpus / "*.txt"),), split="paragraph")
  prepared = D.SourceConfig(kind="arrayrecord", paths=tuple(map(str, shards)))
  make = lambda s: D.DataConfig(sources=(s,), seq_len=16, batch_size=1, num_epochs=1)
  a = _collect(D.build_dataset(make(text), tok))
  b = _collect(D.build_dataset(make(prepared), tok))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_bad_configs_raise_naming_the_problem(tmp_path):
  """Unknown fields, globs matching nothing and bad values raise DataConfigError by name."""
  with pytest.raises(D.DataConfigError, match="matches no file"):
    D.build_dataset(D.DataConfig(sources=(D.SourceConfig(kind="text", paths=(str(tmp_path / "none*"),)),),
                                 seq_len=4, batch_size=1), RangeTokenizer())
  with pytest.raises(ConfigError, match="^data.seqlen: unknown setting; did you mean seq_len"):
    structure(D.DataConfig, {"sources": [], "seq_len": 3, "batch_size": 1, "seqlen": 3},
              path="data")
  with pytest.raises(ConfigError, match="SourceConfig.kind"):
    D.SourceConfig(kind="csv", paths=("x",))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"other": 1}\n')
  ds = D.build_dataset(D.DataConfig(sources=(D.SourceConfig(kind="jsonl", paths=(str(bad),)),),
                                    seq_len=4, batch_size=1, num_epochs=1, read_threads=0),
                       type("T", (), {"eos_id": 0, "encode": lambda self, t, parse_special=True: [1, 2]})())
  with pytest.raises(D.DataConfigError, match=r"bad\.jsonl:2: no string field 'text'"):
    _collect(ds)


def test_parquet_and_text_sources_give_the_same_documents(tmp_path):
  """A Parquet column (several row groups) yields the same packed stream as the same JSONL."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = _docs(12, seed=6)
  texts = [f"{s}:{n}" for s, n in docs]
  pq.write_table(pa.table({"body": texts, "id": list(range(12))}), tmp_path / "d.parquet",
                 row_group_size=5)
  make = lambda source: D.DataConfig(sources=(source,), seq_len=16, batch_size=1, num_epochs=1)
  a = _collect(D.build_dataset(make(D.SourceConfig(kind="parquet", paths=(str(tmp_path / "d.parquet"),),
                                                   field="body")), RangeTokenizer()))
  b = _collect(D.build_dataset(make(D.SourceConfig(kind="jsonl", paths=(_jsonl(tmp_path / "d.jsonl", docs),),
                                                   field="body")), RangeTokenizer()))
  assert len(a) == len(b) > 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  with pytest.raises(D.DataConfigError, match="no column 'text'"):
    D.build_dataset(make(D.SourceConfig(kind="parquet", paths=(str(tmp_path / "d.parquet"),))),
                    RangeTokenizer())


# ----------------------------------------------------------------------------- chat data

WORDS = ["red", "blue", "green", "cat", "dog", "fish", "bird", "tree"]


@pytest.fixture(scope="module")
def tok(sp_model_path):
  return load_tokenizer(sp_model_path)


def _chat_file(path, n: int) -> str:
  rng = np.random.RandomState(0)
  lines = []
  for _ in range(n):
    words = " ".join(rng.choice(WORDS, rng.randint(1, 12)))
    lines.append(json.dumps({"messages": [{"role": "user", "content": f"repeat: {words}"},
                                          {"role": "assistant", "content": words}]}))
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def _same(a, b, what=""):
  assert sorted(a) == sorted(b), what
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what} {key}")


@pytest.mark.parametrize("pack", [True, False])
def test_chat_iterator_yields_the_plan_and_resumes_from_every_state(tok, tmp_path, pack):
  """The grain iterator yields exactly the planned batches of every epoch (each epoch's last
  batch completed with padding rows that weigh 0), and restoring any state it gave (through
  JSON, as checkpoints hold it) reproduces the rest bit for bit; a state of the earlier
  {epoch, batch} form resumes at the same batch."""
  data = C.ChatDataConfig(paths=(_chat_file(tmp_path / "c.jsonl", 30),), seq_len=128,
                          batch_size=4, num_epochs=2, seed=3, default_system=None, pack=pack)
  ds = C.SFTDataset(data, tok)
  assert len(ds.examples) == 30 and ds.num_dropped == 0
  planned = [(e, b) for e in range(2) for b in range(ds.batches_in_epoch(e))]
  it = ds.iterator()
  states, outputs = [], []
  for _ in planned:
    states.append(json.dumps(it.get_state()))
    outputs.append(next(it))
  with pytest.raises(StopIteration):
    next(it)
  for (e, b), got in zip(planned, outputs):
    _same(got, ds.batch(e, b), f"epoch {e} batch {b}")
  last = outputs[ds.batches_in_epoch(0) - 1]
  if not pack:  # 30 rows in batches of 4: two padding rows end each epoch
    assert last["example_index"][2:, 0].tolist() == [-1, -1]
    assert last["loss_mask"][2:].sum() == 0 and last["segment_ids"][2:].sum() == 0
  trained = [int(i) for o in outputs[:ds.batches_in_epoch(0)]
             for i in np.unique(o["example_index"]) if i >= 0]
  for i in range(len(planned)):
    fresh = ds.iterator()
    fresh.set_state(json.loads(states[i]))
    for j in range(i, len(planned)):
      _same(next(fresh), outputs[j], f"state {i}, batch {j}")
    e, b = planned[i]
    earlier = ds.iterator()
    earlier.set_state({"epoch": e, "batch": b})
    _same(next(earlier), outputs[i], f"{{epoch: {e}, batch: {b}}}")
  if not pack:
    assert sorted(trained) == list(range(30))  # each example once per epoch


def test_chat_batches_split_over_processes(tok, tmp_path):
  """Process p of P gets rows [p B/P, (p+1) B/P) of every global batch: the processes' shares
  side by side are the one-process batches (SFT rows and DPO chosen/rejected rows alike)."""
  sft = C.SFTDataset(C.ChatDataConfig(paths=(_chat_file(tmp_path / "c.jsonl", 25),),
                                      seq_len=128, batch_size=4, num_epochs=2,
                                      default_system=None), tok)
  pairs = tmp_path / "p.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": w, "rejected": w + " no"})
                           + "\n" for w in WORDS * 2))
  dpo = C.PreferenceDataset(C.ChatDataConfig(paths=(str(pairs),), seq_len=64, batch_size=4,
                                             seed=1, default_system=None), tok)
  assert sft.num_dropped == dpo.num_dropped == 0
  for ds in (sft, dpo):
    whole = list(ds.iterator())
    shares = [list(ds.iterator(p, 2)) for p in range(2)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == ds.total_batches
    for full, a, b in zip(whole, *shares):
      _same({k: np.concatenate([a[k], b[k]]) for k in a}, full)


def test_bad_bytes_and_bad_json_in_chat_files_name_file_and_line(tok, tmp_path):
  """Invalid UTF-8 and malformed JSON in an SFT file stop the build with a one-line UserError
  naming the file and line (and the byte or column)."""
  good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "red"}]}).encode()
  path = tmp_path / "bad.jsonl"
  path.write_bytes(good + b"\n\n" + good[:30] + b"\xff" + good[31:] + b"\n")
  config = C.ChatDataConfig(paths=(str(path),), seq_len=64, batch_size=2)
  with pytest.raises(UserError) as bad_bytes:
    C.SFTDataset(config, tok)
  assert str(bad_bytes.value) == f"{path}:3: invalid UTF-8 (byte 0xff at byte 31 of the line)"
  path.write_bytes(good + b"\n" + b'{"messages": [}\n')
  with pytest.raises(UserError) as bad_json:
    C.SFTDataset(config, tok)
  assert str(bad_json.value) == f"{path}:2: invalid JSON (Expecting value at column 15)"
