"""Reward model: rewards equal transformers' Qwen2ForSequenceClassification, HF round trips are
bit-exact, the Bradley-Terry loss and metrics on crafted rewards, and `qwen2-jax rm` learns a
marker preference, exports a model transformers loads, and resumes bit-exactly."""

from __future__ import annotations

import json
import os
import pathlib
import random

import jax
import numpy as np
import optax
import pytest

from qwen2_jax import checkpoint, get_preset, reward_model, sharding
from qwen2_jax.checkpoint import CheckpointError
from qwen2_jax.checkpoint.safetensors_io import SafetensorsFile
from qwen2_jax.tokenizer import IM_END, load_tokenizer
from qwen2_jax.train import checkpointing, chat_data, rm
from qwen2_jax.train import step as step_lib
from qwen2_jax.train.optim import make_optimizer
from qwen2_jax.typed_config import ConfigError
from hf_reference import make_hf_qwen2
from run_helpers import WORDS, assert_bitwise_equal, logged, run_cli, with_overrides, write_jsonl

PAD = 0  # the pad id of the tiny HF models (never inside a test sequence)
# Right-padded rows: lengths 4, 7, 1 (a row of one token) in T = 7.
IDS = np.array([[5, 6, 7, 8, PAD, PAD, PAD],
                [9, 10, 11, 12, 13, 14, 15],
                [3, PAD, PAD, PAD, PAD, PAD, PAD]], np.int32)
LENGTHS = np.array([4, 7, 1], np.int32)


def make_hf_reward_model(directory, *, seed=0, num_labels=1, **kwargs):
  """A tiny random transformers Qwen2ForSequenceClassification (score drawn at std 0.3)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  lm_dir = os.path.join(os.fspath(directory), "lm")
  make_hf_qwen2(lm_dir, seed=seed, pad_token_id=PAD, **kwargs)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      lm_dir, num_labels=num_labels).eval()
  with torch.no_grad():
    model.score.weight.normal_(0.0, 0.3)
  out = os.path.join(os.fspath(directory), "rm")
  model.save_pretrained(out)
  return model, out


def hf_rewards(model, ids, attention_mask=None) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  kwargs = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long), **kwargs).logits[:, 0].float().numpy()


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("tied", [False, True])
def test_rewards_match_transformers_on_a_right_padded_batch(tmp_path, tied):
  """float32, a right-padded batch (lengths 4, 7, 1): our rewards with explicit lengths and
  with transformers' pad-id rule both equal Qwen2ForSequenceClassification's logits within
  1e-4 (rewards are O(1)); the backbone is not tied to a particular layer layout."""
  model, path = make_hf_reward_model(tmp_path, tie_word_embeddings=tied)
  mask = (np.arange(IDS.shape[1])[None] < LENGTHS[:, None]).astype(np.int64)
  expected = hf_rewards(model, IDS, mask)
  assert np.abs(expected).max() > 0.1  # not vacuous
  for scan in (True, False):
    config, params = reward_model.load(path, progress=False, scan_layers=scan)
    assert config.pad_token_id == PAD and "lm_head" not in params
    np.testing.assert_allclose(reward_model.rewards(config, params, IDS, lengths=LENGTHS),
                               expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(reward_model.rewards(config, params, IDS), expected,
                               rtol=1e-4, atol=1e-4)


def test_moe_reward_model_matches_transformers_and_round_trips(tmp_path):
  """Qwen2-MoE backbone: rewards equal Qwen2MoeForSequenceClassification's on the right-padded
  batch within 1e-4 (float32), and HF -> ours -> HF keeps every tensor byte and the
  architecture name."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from test_moe import make_hf_qwen2_moe  # pylint: disable=import-outside-toplevel

  make_hf_qwen2_moe(tmp_path / "lm", pad_token_id=PAD, vocab_size=97)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "lm", num_labels=1).eval()
  assert type(model).__name__ == "Qwen2MoeForSequenceClassification"
  with torch.no_grad():
    model.score.weight.normal_(0.0, 0.3)
  model.save_pretrained(tmp_path / "rm")
  mask = (np.arange(IDS.shape[1])[None] < LENGTHS[:, None]).astype(np.int64)
  expected = hf_rewards(model, IDS, mask)
  config, params = reward_model.load(tmp_path / "rm", progress=False)
  assert config.is_moe
  np.testing.assert_allclose(reward_model.rewards(config, params, IDS, lengths=LENGTHS),
                             expected, rtol=1e-4, atol=1e-4)
  reward_model.save(tmp_path / "ours", config, params, show_progress=False)
  assert _tensors(tmp_path / "rm") == _tensors(tmp_path / "ours")
  ours = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert ours["architectures"] == ["Qwen2MoeForSequenceClassification"]


def test_last_token_index_follows_transformers_rule():
  """The rightmost non-pad token, 0 for an all-pad row, the last position without a pad id."""
  ids = np.array([[4, 5, 0, 0], [0, 0, 0, 0], [0, 7, 0, 8]])
  np.testing.assert_array_equal(reward_model.last_token_index(ids, 0), [1, 0, 3])
  np.testing.assert_array_equal(reward_model.last_token_index(ids, None), [3, 3, 3])


def _tensors(path) -> dict[str, bytes]:
  f = SafetensorsFile(os.path.join(path, "model.safetensors"))
  return {k: (f.dtype(k), f.shape(k), f.read(k).tobytes()) for k in f.keys()}


def test_hf_round_trip_is_bit_exact(tmp_path):
  """HF -> ours -> HF: the same tensors (names, dtypes, shapes, bytes), no lm_head, the
  classifier's config fields kept; transformers loads our directory as a one-label
  Qwen2ForSequenceClassification giving the same rewards; ours -> HF -> ours: equal params,
  also when loaded onto a 4 x 2 mesh (in the reward model's shardings)."""
  import transformers  # pylint: disable=import-outside-toplevel

  model, path = make_hf_reward_model(tmp_path)
  config, params = reward_model.load(path, progress=False)
  out = tmp_path / "ours"
  reward_model.save(out, config, params, show_progress=False)
  assert _tensors(path) == _tensors(out)
  assert "score.weight" in _tensors(out) and "lm_head.weight" not in _tensors(out)
  assert not os.path.exists(out / "generation_config.json")
  theirs, ours = (json.loads((p / "config.json").read_text()) for p in (pathlib.Path(path), out))
  for key in ("architectures", "id2label", "label2id", "pad_token_id", "hidden_size",
              "num_hidden_layers", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
    assert ours[key] == theirs[key], key
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(reloaded).__name__ == "Qwen2ForSequenceClassification"
  assert reloaded.config.num_labels == 1
  np.testing.assert_array_equal(hf_rewards(reloaded, IDS), hf_rewards(model, IDS))
  config2, params2 = reward_model.load(out, progress=False)
  assert config2 == config
  assert_bitwise_equal(params, params2)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2))
  _, placed = reward_model.load(out, progress=False, mesh=mesh, rules="fsdp")
  assert_bitwise_equal(params, jax.device_get(placed))
  expected = reward_model.param_shardings(config, mesh, sharding.get_rules("fsdp"))
  assert jax.tree.map(lambda x: x.sharding, placed) == expected


def test_start_from_a_causal_lm_drops_lm_head(tmp_path):
  """A causal-LM directory gives its backbone unchanged, no lm_head and a new score head:
  zeros at score_std 0 (every reward exactly 0), N(0, std^2) draws otherwise; loading onto a
  mesh gives the same values in the reward model's shardings."""
  make_hf_qwen2(tmp_path / "lm", pad_token_id=PAD)
  config, lm_params = checkpoint.load(tmp_path / "lm", progress=False)
  _, params = reward_model.load(tmp_path / "lm", progress=False)
  assert "lm_head" in lm_params and "lm_head" not in params
  assert_bitwise_equal({k: v for k, v in lm_params.items() if k != "lm_head"},
                       {k: v for k, v in params.items() if k != "score"})
  assert params["score"].shape == (config.hidden_size, 1) and not np.any(params["score"])
  np.testing.assert_array_equal(reward_model.rewards(config, params, IDS, lengths=LENGTHS), 0.0)
  _, drawn = reward_model.load(tmp_path / "lm", progress=False, score_std=0.5,
                               rng=jax.random.key(3))
  std = float(np.std(drawn["score"]))
  assert 0.3 < std < 0.7, std
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
  _, placed = reward_model.load(tmp_path / "lm", progress=False, mesh=mesh, score_std=0.5,
                                rng=jax.random.key(3))
  assert_bitwise_equal(drawn, jax.device_get(placed))
  expected = reward_model.param_shardings(config, mesh, sharding.get_rules("fsdp"))
  assert jax.tree.map(lambda x: x.sharding, placed) == expected


def test_bad_reward_model_directories_are_refused(tmp_path):
  """A two-label classifier is refused naming the labels; an RM directory read as a causal LM
  names the unexpected score.weight; an RM missing score.weight names it."""
  _, two = make_hf_reward_model(tmp_path / "two", num_labels=2)
  with pytest.raises(CheckpointError, match="2 labels"):
    reward_model.load(two, progress=False)
  _, path = make_hf_reward_model(tmp_path / "one")
  with pytest.raises(CheckpointError, match="unexpected tensor 'score.weight'"):
    checkpoint.load(path, progress=False)
  config, params = reward_model.load(path, progress=False)
  del params["score"]
  with pytest.raises(CheckpointError, match="param score is missing"):
    reward_model.save(tmp_path / "bad", config, params, show_progress=False)
  assert not os.path.exists(tmp_path / "bad")


# ----------------------------------------------------------------------------- the loss

def test_bradley_terry_sums_on_crafted_rewards():
  """Pairs (2, 1), (0, 3), (5, 5), (9, -9) with the last one padding: loss = mean of
  -log sigmoid(1), -log sigmoid(-3), -log sigmoid(0); accuracy 1/3 (a tie is wrong); margin
  (1 - 3 + 0) / 3; padding leaves every sum untouched."""
  rewards = np.array([2, 1, 0, 3, 5, 5, 9, -9], np.float32)
  sums = jax.device_get(rm.bt_sums(rewards, np.array([True, True, True, False])))
  log_sigmoid = lambda x: -np.log1p(np.exp(-x))
  assert sums["pairs"] == 3
  np.testing.assert_allclose(sums["loss"] / 3,
                             -(log_sigmoid(1.0) + log_sigmoid(-3.0) + log_sigmoid(0.0)) / 3,
                             rtol=1e-6)
  assert sums["accuracy"] == 1.0
  np.testing.assert_allclose(sums["margin"], -2.0)
  np.testing.assert_allclose([sums["rewards_chosen"], sums["rewards_rejected"]], [7.0, 9.0])


@pytest.mark.slow
def test_step_loss_matches_definition_and_accumulation_splits_pairs_exactly():
  """A batch of 4 pairs (one padding pair): the step's loss equals -log sigmoid(r_c - r_r) of
  `reward_model.rewards` averaged over the 3 real pairs; with SGD lr 1, two micro-batches give
  the same params and metrics as one batch (float32 rounding)."""
  config = get_preset("qwen2-tiny")
  params = reward_model.init_params(config, jax.random.key(0), score_std=0.5)
  rng = np.random.default_rng(0)
  lengths = np.array([5, 9, 12, 3, 7, 7, 0, 0], np.int32)  # [2P]: pair 3 is padding
  T = 12
  real = np.arange(T)[None] < lengths[:, None]
  batch = {"input_ids": np.where(real, rng.integers(1, 500, (8, T)), 0).astype(np.int32),
           "positions": np.where(real, np.arange(T)[None], 0).astype(np.int32),
           "segment_ids": real.astype(np.int32)}
  r = np.asarray(reward_model.rewards(config, params, batch["input_ids"], lengths=lengths))
  expected = np.mean([np.logaddexp(0.0, -(r[2 * i] - r[2 * i + 1])) for i in range(3)])
  optimizer = optax.sgd(1.0)
  out = {}
  for accum in (1, 2):
    state = step_lib.init_train_state(params, optimizer)
    out[accum] = jax.device_get(rm.rm_train_step(config, optimizer, state, batch,
                                                 accum_steps=accum))
  np.testing.assert_allclose(out[1][1]["loss"], expected, rtol=1e-5)
  assert out[1][1]["pairs"] == 3 and out[2][1]["pairs"] == 3
  for k in ("loss", "accuracy", "margin", "grad_norm"):
    np.testing.assert_allclose(out[1][1][k], out[2][1][k], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(out[1][0].params), jax.tree.leaves(out[2][0].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  moved = np.abs(out[1][0].params["score"] - np.asarray(params["score"])).max()
  assert moved > 1e-4  # not vacuous


# ----------------------------------------------------------------------------- the data

@pytest.fixture(scope="module")
def tok(sp_model_path):
  return load_tokenizer(sp_model_path)


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
  """Learnable preferences: the chosen response holds the marker word "fish", the rejected one
  the same words with "fish" replaced by "no"; word counts vary so length is no cue."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice([w for w in WORDS if w != "fish"]) for _ in range(rng.randint(2, 5))]
    k = rng.randrange(len(words) + 1)
    chosen = " ".join(words[:k] + ["fish"] + words[k:])
    rejected = " ".join(words[:k] + ["no"] + words[k:])
    out.append({"prompt": f"say: {' '.join(words)}", "chosen": chosen, "rejected": rejected})
  return out


def test_rows_end_at_the_responses_im_end(tok, tmp_path):
  """Each row holds the prompt and response through the response's <|im_end|> (the ChatML
  newline after it dropped), right-padded, positions 0.., segment 1; chosen at even rows."""
  data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(3))
  cfg = chat_data.ChatDataConfig(paths=(data,), seq_len=64, batch_size=3, default_system=None)
  ds = rm.RewardPairs(cfg, tok)
  batch = ds.batch(0, 0)
  im_end = tok.token_to_id(IM_END)
  for r in range(6):
    n = int(batch["segment_ids"][r].sum())
    i = int(batch["example_index"][r, 0])
    record = json.loads(open(data).read().splitlines()[i])
    response = record["chosen" if r % 2 == 0 else "rejected"]
    ids = batch["input_ids"][r, :n].tolist()
    assert ids[-1] == im_end and ids.count(im_end) == 2  # the prompt's turn and the response's
    assert tok.decode(ids).endswith(response + IM_END)
    assert not batch["input_ids"][r, n:].any() and not batch["segment_ids"][r, n:].any()
    np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))


# ----------------------------------------------------------------------------- training runs

def rm_recipe(sp_model_path, data_path, out, **overrides) -> dict:
  d = {"model": {"preset": "qwen2-tiny"}, "tokenizer": str(sp_model_path),
       "output_dir": str(out),
       "data": {"paths": [data_path], "seq_len": 96, "batch_size": 8, "num_epochs": 6,
                "default_system": None, "eval_every_nth_example": 4},
       "optim": {"learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 0,
                 "weight_decay": 0.0},
       "mesh": {"fsdp": -1}, "log_every": 1, "checkpoint_every": 4, "progress": False,
       "export_hf": False, "eval_every": 15, "pad_token_id": 0}
  return with_overrides(d, overrides)


def rm_state(output_dir, cfg, steps):
  """(step, host TrainState) of the latest checkpoint of an rm run."""
  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.get_rules(cfg.rules)
  optimizer = make_optimizer(cfg.run_optim(steps))
  abstract = rm.abstract_train_state(cfg.model, optimizer, mesh, rules)
  ckpt = checkpointing.Checkpointer(os.path.join(output_dir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    state, _, _ = ckpt.restore(step, abstract, fingerprint=cfg.fingerprint(steps))
    return step, jax.device_get(state)
  finally:
    ckpt.close()


@pytest.mark.slow
def test_rm_learns_a_marker_preference_and_exports_for_transformers(sp_model_path, tmp_path):
  """Random tiny model, 48 pairs (12 held out), 6 epochs of 36 in 30 steps: the first loss is
  log 2 (zero head), the last five are below 0.1, held-out loss is below 0.1 and held-out
  accuracy at least 0.9 (chance: 0.5); the HF export loads
  with AutoModelForSequenceClassification and its rewards equal ours on held-out rows."""
  import transformers  # pylint: disable=import-outside-toplevel

  data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(48))
  cfg = rm.RMConfig.from_dict(rm_recipe(sp_model_path, data, tmp_path / "run", export_hf=True))
  summary = rm.rm(cfg)
  assert summary["data"]["dropped_too_long"] == 0
  assert summary["final_step"] == 30 and summary["skipped"] == 0, summary
  loss, accuracy = logged(tmp_path / "run"), logged(tmp_path / "run", "eval/accuracy")
  np.testing.assert_allclose(loss[1], np.log(2.0), rtol=1e-6)
  assert np.mean([loss[s] for s in range(26, 31)]) < 0.1, loss
  assert logged(tmp_path / "run", "eval/loss")[30] < 0.1
  assert accuracy[30] >= 0.9, (accuracy, logged(tmp_path / "run", "eval/loss"))

  hf_dir = summary["hf_export"]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  assert type(model).__name__ == "Qwen2ForSequenceClassification"
  config, params = reward_model.load(hf_dir, progress=False)
  ds = rm.RewardPairs(cfg.data, load_tokenizer(cfg.tokenizer))
  batch = ds.held_out.batch(0, 0)
  lengths = batch["segment_ids"].sum(-1)
  ours = reward_model.rewards(config, params, batch["input_ids"], lengths=lengths)
  theirs = hf_rewards(model, batch["input_ids"], (batch["segment_ids"] > 0).astype(np.int64))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert (ours[0::2] > ours[1::2]).mean() >= 0.9


@pytest.mark.slow
def test_rm_resume_in_new_process_is_bit_exact(sp_model_path, tmp_path):
  """Steps 1-4 in one `qwen2-jax rm` process and 5-6 in another give the straight run's
  losses, accuracies, params and optimizer state bit for bit."""
  data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(32))
  fixed = {"auto_decay": False, "optim.decay_steps": 6, "eval_every": 0,
           "data.eval_every_nth_example": 0}
  straight = rm_recipe(sp_model_path, data, tmp_path / "straight", steps=6, **fixed)
  rm.rm(rm.RMConfig.from_dict(straight))
  resumed = rm_recipe(sp_model_path, data, tmp_path / "resumed", steps=4, **fixed)
  first = run_cli("rm", resumed, tmp_path / "a.json")
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_cli("rm", dict(resumed, steps=6), tmp_path / "b.json")
  assert second.returncode == 0, second.stderr[-3000:]
  for key in ("loss", "accuracy", "margin"):
    a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
  step_a, state_a = rm_state(straight["output_dir"], rm.RMConfig.from_dict(straight), 6)
  step_b, state_b = rm_state(resumed["output_dir"],
                             rm.RMConfig.from_dict(dict(resumed, steps=6)), 6)
  assert step_a == step_b == 6
  assert "score" in state_a.params and "lm_head" not in state_a.params
  assert_bitwise_equal(state_a, state_b)


@pytest.mark.slow
def test_rm_starts_from_an_hf_causal_lm_and_continues_from_its_export(sp_model_path, tmp_path):
  """init_from an HF causal LM: the model config is read from it, the lm_head dropped, the
  zero head gives a first loss of exactly log 2; a second run from that run's export (a
  reward model) starts from the trained rewards: its first loss is the first run's export
  scored, below log 2."""
  data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(16))
  make_hf_qwen2(tmp_path / "lm", vocab_size=512, pad_token_id=0)
  first = rm_recipe(sp_model_path, data, tmp_path / "first", steps=6, export_hf=True,
                    init_from=str(tmp_path / "lm"), eval_every=0,
                    **{"data.eval_every_nth_example": 0})
  first["model"] = {"dtype": "float32"}
  summary = rm.rm(rm.RMConfig.from_dict(first))
  assert summary["final_step"] == 6 and summary["skipped"] == 0, summary
  losses = logged(tmp_path / "first")
  np.testing.assert_allclose(losses[1], np.log(2.0), rtol=1e-6)
  second = dict(first, output_dir=str(tmp_path / "second"), steps=1,
                init_from=summary["hf_export"])
  rm.rm(rm.RMConfig.from_dict(second))
  assert logged(tmp_path / "second")[1] < np.log(2.0) - 0.01


def test_rm_recipe_fields_are_checked(sp_model_path, tmp_path):
  """score_init_std < 0 and a pad id outside the vocabulary are one-line errors naming the
  field; an unknown field is refused by name."""
  base = rm_recipe(sp_model_path, str(tmp_path / "p.jsonl"), tmp_path / "run")
  for key, value, fragment in (("score_init_std", -1.0, "score_init_std: must be >= 0"),
                               ("pad_token_id", 512, "pad_token_id: must be in"),
                               ("score_std", 0.1, "score_std")):
    with pytest.raises(ConfigError, match=fragment):
      rm.RMConfig.from_dict(dict(base, **{key: value}))
