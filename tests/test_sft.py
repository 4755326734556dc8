"""SFT: assistant-only loss weights, packed loss == per-conversation loss, clear data errors,
falling loss, bit-exact resume in a new process (through the `qwen2-jax sft` CLI)."""

from __future__ import annotations

import json
import random

import jax
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax.infer.api import Generator
from qwen2_jax.infer.sampling import SamplingParams
from qwen2_jax.tokenizer import IM_END, copy_tokenizer_files, load_tokenizer
from qwen2_jax.train import chat_data, sft
from qwen2_jax.train import step as step_lib
from run_helpers import (WORDS, assert_bitwise_equal, final_state, logged, run_cli,
                         with_overrides, write_jsonl)

def conversations(n: int, seed: int = 0) -> list[dict]:
  """Learnable chats: the assistant repeats the user's words; some are multi-turn."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    messages = [{"role": "user", "content": f"repeat: {words}"},
                {"role": "assistant", "content": words}]
    if i % 3 == 0:
      messages = [{"role": "system", "content": "Be brief."}] + messages + [
          {"role": "user", "content": "again"}, {"role": "assistant", "content": words}]
    out.append({"messages": messages})
  return out


@pytest.fixture(scope="module")
def tok(sp_model_path):
  return load_tokenizer(sp_model_path)


def run_config(sp_model_path, data_path, out, **overrides) -> dict:
  d = {"model": {"preset": "qwen2-tiny"}, "tokenizer": str(sp_model_path),
       "output_dir": str(out),
       "data": {"paths": [data_path], "seq_len": 192, "batch_size": 8, "num_epochs": 2,
                "default_system": None},
       "optim": {"learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 0},
       "mesh": {"fsdp": -1}, "log_every": 1, "checkpoint_every": 3, "progress": False,
       "export_hf": False}
  return with_overrides(d, overrides)


# ----------------------------------------------------------------------------- masking

def test_loss_weights_are_exactly_the_assistant_tokens(tok, tmp_path):
  """Weight 1 exactly on each assistant reply's content tokens and its <|im_end|>, in every
  packed row; everything else (system, user, headers, padding) 0."""
  records = conversations(12)
  data = chat_data.ChatDataConfig(paths=(write_jsonl(tmp_path / "c.jsonl", records),),
                                  seq_len=256, batch_size=4)
  ds = chat_data.SFTDataset(data, tok)
  assert ds.num_dropped == 0
  im_end = tok.token_to_id(IM_END)
  for record, (_, targets, weights) in zip(records, ds.examples, strict=True):
    expected = []
    for m in record["messages"]:
      if m["role"] == "assistant":
        expected += tok.encode(m["content"]) + [im_end]
    assert targets[weights == 1].tolist() == expected
    assert set(np.unique(weights)) <= {0.0, 1.0}
  batch = ds.batch(0, 0)
  assert batch["segment_ids"].max() > 1  # rows really pack several conversations
  for r in range(batch["input_ids"].shape[0]):
    for s in np.unique(batch["segment_ids"][r]):
      sel = batch["segment_ids"][r] == s
      if s == 0:
        assert batch["loss_mask"][r][sel].sum() == 0
        continue
      index = [i for i in ds.plan(0)[r]][s - 1]
      _, targets, weights = ds.examples[index]
      np.testing.assert_array_equal(batch["targets"][r][sel], targets)
      np.testing.assert_array_equal(batch["loss_mask"][r][sel], weights)
      np.testing.assert_array_equal(batch["positions"][r][sel], np.arange(sel.sum()))


def test_packed_batch_loss_equals_per_conversation_loss(tok, tmp_path):
  """The loss of a packed batch equals sum(per-conversation masked nll) / total assistant
  tokens, each conversation run alone and unpadded."""
  data = chat_data.ChatDataConfig(paths=(write_jsonl(tmp_path / "c.jsonl", conversations(10)),),
                                  seq_len=384, batch_size=2, default_system=None)
  ds = chat_data.SFTDataset(data, tok)
  config = q.get_preset("qwen2-tiny")
  params = q.init_params(config, jax.random.key(0))
  batch = ds.batch(0, 0)
  batch.pop("example_index")
  assert (batch["segment_ids"].max(axis=1) >= 3).all()
  packed, metrics = step_lib.loss_fn(config, params, batch)
  # Each conversation alone at the start of its own row (trailing zeros cannot affect it:
  # attention is causal), so one compilation serves all.
  alone = jax.jit(lambda ids: step_lib.token_losses(
      config, params, {"input_ids": ids, "targets": ids, "positions": np.arange(384)[None],
                       "segment_ids": None})[1])  # logsumexp [1, T]
  logits = jax.jit(lambda ids: q.forward(config, params, ids, positions=np.arange(384)[None]))
  nll_sum, tokens = 0.0, 0.0
  for row in ds.plan(0)[:2]:
    for i in row:
      inputs, targets, weights = ds.examples[i]
      n = len(inputs)
      ids = np.zeros((1, 384), np.int32)
      ids[0, :n] = inputs
      z = np.asarray(logits(ids), np.float64)[0, :n]  # [n, V]
      lse = np.asarray(alone(ids))[0, :n]
      nll = lse - z[np.arange(n), targets]
      nll_sum += float((nll * weights).sum())
      tokens += float(weights.sum())
  assert float(metrics["tokens"]) == tokens
  np.testing.assert_allclose(float(packed), nll_sum / tokens, rtol=2e-6)


def test_every_epoch_sees_every_conversation_once(tok, tmp_path):
  """Each epoch's packed rows hold each conversation exactly once; epochs are reshuffled;
  the last batch is completed with padding rows."""
  data = chat_data.ChatDataConfig(paths=(write_jsonl(tmp_path / "c.jsonl", conversations(21)),),
                                  seq_len=256, batch_size=4, num_epochs=2)
  ds = chat_data.SFTDataset(data, tok)
  plans = [ds.plan(0), ds.plan(1)]
  for plan in plans:
    assert sorted(i for row in plan for i in row) == list(range(21))
  assert plans[0] != plans[1]
  batches = list(ds.iterator())
  assert len(batches) == ds.total_batches == sum(-(-len(p) // 4) for p in plans)
  total = sum(float(b["loss_mask"].sum()) for b in batches)
  assert total == 2 * ds.num_trained_tokens


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "role 'robot' is not one of"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "content must be a string"),
    ('{"text": "hello"}', "'messages' must be a non-empty list"),
    ('{"messages": [}', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_raise_naming_file_and_line(tok, tmp_path, line, message):
  """A malformed line stops the dataset build with file:line and the reason."""
  good = json.dumps(conversations(1)[0])
  path = tmp_path / "bad.jsonl"
  path.write_text(f"{good}\n\n{line}\n")
  data = chat_data.ChatDataConfig(paths=(str(path),), seq_len=256, batch_size=2)
  with pytest.raises(chat_data.ChatDataError, match=f"{path}:3: .*{message}"):
    chat_data.SFTDataset(data, tok)


def test_too_long_conversations_are_dropped_and_counted_or_refused(tok, tmp_path):
  """No truncation: too_long=drop skips and counts; too_long=error names the line."""
  long = {"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": " ".join(WORDS * 20)}]}
  path = write_jsonl(tmp_path / "c.jsonl", conversations(3) + [long])
  ds = chat_data.SFTDataset(chat_data.ChatDataConfig(paths=(path,), seq_len=160, batch_size=2),
                            tok)
  assert ds.num_dropped == 1 and len(ds.examples) == 3
  with pytest.raises(chat_data.ChatDataError, match=f"{path}:4: .* do not fit seq_len=160"):
    chat_data.SFTDataset(chat_data.ChatDataConfig(paths=(path,), seq_len=160, batch_size=2,
                                                  too_long="error"), tok)


# ----------------------------------------------------------------------------- training runs

def test_few_sft_steps_lower_the_assistant_loss(sp_model_path, tmp_path):
  """A tiny model's assistant-token loss falls over 2 epochs of a small chat set."""
  data = write_jsonl(tmp_path / "c.jsonl", conversations(64))
  summary = sft.sft(sft.SFTConfig.from_dict(run_config(sp_model_path, data, tmp_path / "run")))
  losses = logged(tmp_path / "run")
  assert summary["final_step"] == summary["steps"] == len(losses) >= 8
  assert summary["skipped"] == 0 and summary["data"]["dropped_too_long"] == 0
  last = max(losses)
  assert losses[last] < losses[1] - 1.0, losses


@pytest.mark.slow
def test_resume_in_new_process_is_bit_exact(sp_model_path, tmp_path):
  """Steps 1-3 in one `qwen2-jax sft` process, 4-6 in another (resumed from the step-3
  checkpoint) give the losses and the final params and optimizer state of a straight run."""
  data = write_jsonl(tmp_path / "c.jsonl", conversations(64))
  fixed = {"auto_decay": False, "optim.decay_steps": 6}
  straight = run_config(sp_model_path, data, tmp_path / "straight", steps=6, **fixed)
  sft.sft(sft.SFTConfig.from_dict(straight))
  resumed = run_config(sp_model_path, data, tmp_path / "resumed", steps=3, **fixed)
  first = run_cli("sft", resumed, tmp_path / "a.json")
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_cli("sft", dict(resumed, steps=6), tmp_path / "b.json")
  assert second.returncode == 0, second.stderr[-3000:]
  a, b = logged(tmp_path / "straight"), logged(tmp_path / "resumed")
  assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
  step_a, state_a = final_state(straight["output_dir"], sft.SFTConfig.from_dict(straight))
  step_b, state_b = final_state(resumed["output_dir"],
                                sft.SFTConfig.from_dict(dict(resumed, steps=6)))
  assert step_a == step_b == 6
  assert_bitwise_equal(state_a, state_b)


def test_held_out_conversations_are_evaluated_and_never_trained(sp_model_path, tmp_path):
  """eval_every_nth_example=4 holds out conversations 4, 8, ...: eval records (assistant-token
  loss, perplexity, tokens) appear every eval_every steps with finite values over exactly those
  conversations, and replacing them by other chats changes the eval loss but not one bit of
  the training losses."""
  records = conversations(40)
  other = [dict(r) for r in records]
  for k in range(3, 40, 4):
    other[k] = {"messages": [{"role": "user", "content": "say fish"},
                             {"role": "assistant", "content": "fish fish fish fish"}]}
  losses = {}
  for name, data in (("a", records), ("b", other)):
    path = write_jsonl(tmp_path / f"{name}.jsonl", data)
    cfg = run_config(sp_model_path, path, tmp_path / name, steps=4, eval_every=2,
                     **{"data.eval_every_nth_example": 4})
    summary = sft.sft(sft.SFTConfig.from_dict(cfg))
    assert summary["data"]["examples"] == 30 and summary["data"]["held_out"] == 10
    losses[name] = logged(tmp_path / name)
    eval_loss = logged(tmp_path / name, "eval/loss")
    ppl = logged(tmp_path / name, "eval/perplexity")
    assert sorted(eval_loss) == sorted(ppl) == [2, 4]
    assert all(np.isfinite(v) and v > 0 for v in [*eval_loss.values(), *ppl.values()])
    losses[name + "_eval"] = eval_loss
  assert losses["a"] == losses["b"]
  assert losses["a_eval"] != losses["b_eval"]

  tok = load_tokenizer(sp_model_path)
  data = chat_data.ChatDataConfig(paths=(str(tmp_path / "a.jsonl"),), seq_len=192,
                                  batch_size=8, default_system=None, eval_every_nth_example=4)
  ds = chat_data.SFTDataset(data, tok)
  encode = lambda r: chat_data.encode_conversation(tok, r, "-", default_system=None)[0][1:]
  held = [records[k] for k in range(3, 40, 4)]
  assert [e[1].tolist() for e in ds.held_out.examples] == [encode(r).tolist() for r in held]
  assert [e[1].tolist() for e in ds.examples] == [
      encode(r).tolist() for k, r in enumerate(records) if k % 4 != 3]
  expected_tokens = sum(e[2].sum() for e in ds.held_out.examples)
  assert logged(tmp_path / "a", "eval/tokens")[2] == expected_tokens


def test_hf_export_carries_the_tokenizer(sp_model_path, hf_tokenizer_dir, tmp_path):
  """The HF export at the end of a run holds the run's SentencePiece model as tokenizer.model,
  so `Generator.from_pretrained(output_dir/hf)` (what `qwen2-jax generate` calls) finds it with
  no --tokenizer; an HF tokenizer.json (+ tokenizer_config.json) is copied the same way."""
  path = write_jsonl(tmp_path / "c.jsonl", conversations(16))
  summary = sft.sft(sft.SFTConfig.from_dict(run_config(sp_model_path, path, tmp_path / "run",
                                                       steps=1, export_hf=True)))
  hf_dir = tmp_path / "run" / "hf"
  assert summary["hf_export"] == str(hf_dir)
  assert (hf_dir / "tokenizer.model").read_bytes() == open(sp_model_path, "rb").read()
  gen = Generator.from_pretrained(hf_dir, max_batch_size=1, max_context=32)
  assert gen.tokenizer is not None
  completion, = gen.complete(["red blue"], SamplingParams(max_new_tokens=2, ignore_eos=True))
  assert completion.text is not None and len(completion.output_ids) == 2

  out = tmp_path / "hf_model"
  out.mkdir()
  assert copy_tokenizer_files(hf_tokenizer_dir, out) == ["tokenizer.json",
                                                         "tokenizer_config.json"]
  text = "Hello 世界 12345"
  assert load_tokenizer(out).encode(text) == load_tokenizer(hf_tokenizer_dir).encode(text)
