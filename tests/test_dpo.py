"""DPO: loss and gradients vs a hand-written reference, response-only masks, clear data errors,
rising margin and reward accuracy, precomputed == on-the-fly reference, bit-exact resume."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qwen2_jax as q
from qwen2_jax import sharding
from qwen2_jax.tokenizer import IM_END, load_tokenizer
from qwen2_jax.train import chat_data, dpo
from qwen2_jax.train import step as step_lib
from run_helpers import (WORDS, assert_bitwise_equal, final_state, logged, run_cli,
                         with_overrides, write_jsonl)


def preferences(n: int, seed: int = 0) -> list[dict]:
  """Chosen repeats the prompt's words; rejected says "no" a few times."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
    rejected = " ".join(["no"] * rng.randint(1, 4))
    if i % 2:
      out.append({"prompt": f"repeat: {words}", "chosen": words, "rejected": rejected})
    else:
      out.append({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": f"repeat: {words}"}],
                  "chosen": {"role": "assistant", "content": words},
                  "rejected": [{"role": "assistant", "content": rejected}]})
  return out


@pytest.fixture(scope="module")
def tok(sp_model_path):
  return load_tokenizer(sp_model_path)


def dpo_config(sp_model_path, data_path, out, **overrides) -> dict:
  d = {"model": {"preset": "qwen2-tiny"}, "tokenizer": str(sp_model_path),
       "output_dir": str(out),
       "data": {"paths": [data_path], "seq_len": 96, "batch_size": 4, "num_epochs": 1,
                "default_system": None},
       "optim": {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 0},
       "mesh": {"fsdp": -1}, "log_every": 1, "checkpoint_every": 3, "progress": False,
       "export_hf": False, "beta": 0.1}
  return with_overrides(d, overrides)


# ----------------------------------------------------------------------------- the loss

def _hand_written_loss(config, params, ref_params, rows, beta, ls):
  """DPO from its definition, written independently of train/dpo.py."""
  def logp(p):
    logits = q.forward(config, p, rows["input_ids"], positions=rows["positions"],
                       segment_ids=rows["segment_ids"]).astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logprobs, rows["targets"][..., None], axis=-1)[..., 0]
    return (tok_lp * rows["loss_mask"]).sum(-1)
  pi, ref = logp(params), logp(ref_params)
  losses = []
  for i in range(pi.shape[0] // 2):
    margin = (pi[2 * i] - ref[2 * i]) - (pi[2 * i + 1] - ref[2 * i + 1])
    losses.append(-(1 - ls) * jnp.log(jax.nn.sigmoid(beta * margin))
                  - ls * jnp.log(jax.nn.sigmoid(-beta * margin)))
  return jnp.mean(jnp.stack(losses))


def test_loss_and_gradients_match_a_hand_written_reference(tok, tmp_path):
  """Tiny model, a policy and a different reference, label smoothing 0.1 (both loss terms):
  the DPO loss, its gradient (through `dpo_train_step` with SGD lr 1: params move by -grad) and
  the precomputed-reference path all equal the definition computed by hand."""
  label_smoothing = 0.1
  path = write_jsonl(tmp_path / "p.jsonl", preferences(3))
  ds = chat_data.PreferenceDataset(chat_data.ChatDataConfig(paths=(path,), seq_len=96,
                                                            batch_size=3, default_system=None),
                                   tok)
  rows = ds.rows_batch(ds.ordered_rows())
  rows.pop("example_index")
  config = q.get_preset("qwen2-tiny", initializer_range=0.1)
  params = q.init_params(config, jax.random.key(0))
  ref_params = q.init_params(config, jax.random.key(1))
  beta = 0.5
  expected_loss, expected_grads = jax.jit(jax.value_and_grad(
      lambda p: _hand_written_loss(config, p, ref_params, rows, beta, label_smoothing)))(params)

  opt = optax.sgd(1.0)
  state = step_lib.init_train_state(params, opt)
  step = jax.jit(lambda s, r, b: dpo.dpo_train_step(config, opt, s, b, r, beta=beta,
                                                    label_smoothing=label_smoothing))
  new_state, metrics = step(state, ref_params, rows)
  # f32, different summation orders: 1e-5 relative (a 2-core AVX2 machine differed by 1.02e-6).
  np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-5)
  grads = jax.tree.map(lambda a, b: a - b, params, new_state.params)
  # Params ~0.1, gradients ~1e-3: f32 summation order alone moves gradients by ~5e-7.
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-4), grads,
               expected_grads)
  assert float(optax.global_norm(expected_grads)) > 1e-3  # not vacuous

  ref_logps = dpo.sequence_logps(config, ref_params, rows)[:, None]
  pre = jax.jit(lambda s, b: dpo.dpo_train_step(config, opt, s, b, None, beta=beta,
                                                label_smoothing=label_smoothing))
  pre_state, pre_metrics = pre(state, dict(rows, ref_logps=ref_logps))
  np.testing.assert_allclose(float(pre_metrics["loss"]), float(expected_loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), pre_state.params,
               new_state.params)


def test_metrics_and_accumulation():
  """Rewards, accuracy and margins follow their definitions; 2 micro-batches give the same
  update as the whole batch; padding pairs (no response tokens) are ignored."""
  policy = jnp.array([-1.0, -3.0, -2.0, -1.0, 0.0, 0.0])  # pairs: (c, r) x 3, the last padding
  ref = jnp.array([-2.0, -2.0, -2.0, -2.0, 0.0, 0.0])
  sums = dpo.dpo_sums(policy, ref, jnp.array([True, True, False]), beta=0.5)
  assert float(sums["pairs"]) == 2
  np.testing.assert_allclose(float(sums["rewards_chosen"]), 0.5 * (1 + 0))
  np.testing.assert_allclose(float(sums["rewards_rejected"]), 0.5 * (-1 + 1))
  np.testing.assert_allclose(float(sums["rewards_margin"]), 0.5 * (2 + -1))
  assert float(sums["reward_accuracy"]) == 1.0
  np.testing.assert_allclose(float(sums["loss"]), -np.log(1 / (1 + np.exp(-1.0)))
                             - np.log(1 / (1 + np.exp(0.5))), rtol=1e-6)

  config = q.get_preset("qwen2-tiny")
  rng = np.random.RandomState(0)
  ids = rng.randint(0, config.vocab_size, (8, 16)).astype(np.int32)
  mask = np.zeros((8, 16), np.float32)
  mask[:6, 8:] = 1  # pair 3 (rows 6, 7) is padding
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask,
           "positions": np.tile(np.arange(16), (8, 1)), "segment_ids": np.ones((8, 16), np.int32)}
  params = q.init_params(config, jax.random.key(0))
  ref_params = q.init_params(config, jax.random.key(1))
  opt = optax.sgd(1.0)
  state = step_lib.init_train_state(params, opt)
  run = jax.jit(lambda s, b, a: dpo.dpo_train_step(config, opt, s, b, ref_params, beta=0.1,
                                                   accum_steps=a), static_argnums=2)
  full, m1 = run(state, batch, 1)
  accum, m2 = run(state, batch, 2)
  assert float(m1["pairs"]) == float(m2["pairs"]) == 3
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), full.params,
               accum.params)


# ----------------------------------------------------------------------------- data

def test_masks_cover_only_the_final_response(tok, tmp_path):
  """Chosen/rejected rows weigh exactly the response content + <|im_end|>; the prompt,
  an earlier assistant turn included, weighs 0; a batch is chosen/rejected interleaved."""
  records = preferences(4)
  ds = chat_data.PreferenceDataset(chat_data.ChatDataConfig(
      paths=(write_jsonl(tmp_path / "p.jsonl", records),), seq_len=192, batch_size=2), tok)
  im_end = tok.token_to_id(IM_END)
  for record, pair in zip(records, ds.examples, strict=True):
    for key, (_, targets, weights) in zip(("chosen", "rejected"), pair):
      response = record[key]
      response = response if isinstance(response, str) else (
          response["content"] if isinstance(response, dict) else response[0]["content"])
      assert targets[weights == 1].tolist() == tok.encode(response) + [im_end]
  batch = ds.batch(0, 0)
  order = ds.order(0)
  assert batch["example_index"][:, 0].tolist() == [order[0], order[0], order[1], order[1]]
  np.testing.assert_array_equal(batch["loss_mask"][1][:len(ds.examples[order[0]][1][2])],
                                ds.examples[order[0]][1][2])


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "rejected": "a"}, "missing 'chosen'"),
    ({"prompt": "x", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "x", "chosen": "a", "rejected": "a"}, "identical"),
    ({"chosen": "a", "rejected": "b"}, "exactly one of 'prompt'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "chosen": "a", "rejected": "b"}, "last message must be one of"),
    ({"messages": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"},
     "last message must be one of"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "user", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "role 'wizard' is not one of"),
    ({"prompt": "x", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
     "must be an assistant message"),
    ({"prompt": "x", "chosen": 5, "rejected": "b"}, "must be a string"),
])
def test_bad_pairs_raise_naming_file_and_line(tok, tmp_path, record, message):
  """Every malformed preference line stops the build with file:line and the reason."""
  path = write_jsonl(tmp_path / "p.jsonl", preferences(2) + [record])
  with pytest.raises(chat_data.ChatDataError, match=f"p.jsonl:3: .*{message}"):
    chat_data.PreferenceDataset(chat_data.ChatDataConfig(paths=(path,), seq_len=192,
                                                         batch_size=2), tok)


# ----------------------------------------------------------------------------- training runs

def test_few_dpo_steps_raise_margin_and_reward_accuracy(sp_model_path, tmp_path):
  """Starting from policy == reference (margin 0 up to the rounding of the precompute pass and
  the step, two programs), a few DPO steps give a positive chosen-minus-rejected margin and
  high reward accuracy on the whole data."""
  data = write_jsonl(tmp_path / "p.jsonl", preferences(32))
  cfg = dpo.DPOConfig.from_dict(dpo_config(sp_model_path, data, tmp_path / "run",
                                        reference="precomputed"))
  summary = dpo.dpo(cfg)
  assert summary["final_step"] == 8 and summary["skipped"] == 0
  margins, accuracy = logged(tmp_path / "run", "rewards_margin"), \
      logged(tmp_path / "run", "reward_accuracy")
  assert abs(margins[1]) < 1e-5
  assert margins[8] > 0.3 and accuracy[8] == 1.0, (margins, accuracy)

  mesh, rules = sharding.make_mesh(cfg.mesh), sharding.get_rules(cfg.rules)
  ds = chat_data.PreferenceDataset(cfg.data, load_tokenizer(cfg.tokenizer))
  ref = np.load(tmp_path / "run" / dpo.REFERENCE_FILE)
  _, state = final_state(cfg.output_dir, cfg, steps=8)
  policy = dpo.precompute_reference(cfg.model, state.params, ds, mesh, rules, progress=False)
  margin = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
  assert margin.mean() > 1.0 and (margin > 0).mean() > 0.9


@pytest.mark.slow
def test_precomputed_reference_equals_on_the_fly(sp_model_path, tmp_path):
  """The two reference modes give the same per-step losses and metrics, and the same held-out
  evaluation (every 4th pair held out, evaluated every 2 steps)."""
  data = write_jsonl(tmp_path / "p.jsonl", preferences(16))
  keys = ("loss", "rewards_margin", "eval/loss", "eval/rewards_margin", "eval/reward_accuracy")
  results = {}
  for mode in dpo.REFERENCE_MODES:
    dpo.dpo(dpo.DPOConfig.from_dict(dpo_config(sp_model_path, data, tmp_path / mode,
                                            reference=mode, eval_every=2,
                                            **{"data.eval_every_nth_example": 4})))
    results[mode] = [logged(tmp_path / mode, k) for k in keys]
  assert sorted(results["precomputed"][2]) == [2]  # 12 training pairs: 3 steps, eval at 2
  for a, b in zip(results["on_the_fly"], results["precomputed"]):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in b], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_held_out_pairs_are_evaluated_and_never_trained(sp_model_path, tmp_path):
  """eval_every_nth_example=3 holds out pairs 3, 6, ...: eval records (loss, reward accuracy,
  margin, pairs) are finite and cover exactly those pairs, whose reference log-probs are
  precomputed apart; replacing them by other pairs leaves every training loss unchanged."""
  records = preferences(24)
  other = [dict(r) for r in records]
  for k in range(2, 24, 3):
    other[k] = {"prompt": "say fish", "chosen": "fish fish", "rejected": "no fish"}
  losses = {}
  for name, data in (("a", records), ("b", other)):
    path = write_jsonl(tmp_path / f"{name}.jsonl", data)
    summary = dpo.dpo(dpo.DPOConfig.from_dict(dpo_config(
        sp_model_path, path, tmp_path / name, reference="precomputed", eval_every=2,
        **{"data.eval_every_nth_example": 3})))
    assert summary["data"]["examples"] == 16 and summary["data"]["held_out"] == 8
    assert summary["final_step"] == 4
    losses[name] = logged(tmp_path / name)
    evals = {k: logged(tmp_path / name, f"eval/{k}")
             for k in ("loss", "reward_accuracy", "rewards_margin", "pairs")}
    assert all(sorted(v) == [2, 4] for v in evals.values())
    assert all(np.isfinite(x) for v in evals.values() for x in v.values())
    assert evals["pairs"] == {2: 8, 4: 8}
    assert 0 <= evals["reward_accuracy"][4] <= 1
    losses[name + "_eval"] = evals["loss"]
  assert np.load(tmp_path / "a" / dpo.REFERENCE_FILE).shape == (16, 2)
  assert np.load(tmp_path / "a" / dpo.EVAL_REFERENCE_FILE).shape == (8, 2)
  assert losses["a"] == losses["b"]
  assert losses["a_eval"] != losses["b_eval"]


@pytest.mark.slow
def test_resume_in_new_process_is_bit_exact(sp_model_path, tmp_path):
  """Steps 1-3 in one `qwen2-jax dpo` process and 4-6 in another give the straight run's
  losses, params and optimizer state bit for bit (reference params rebuilt on resume)."""
  data = write_jsonl(tmp_path / "p.jsonl", preferences(24))
  fixed = {"auto_decay": False, "optim.decay_steps": 6}
  straight = dpo_config(sp_model_path, data, tmp_path / "straight", steps=6, **fixed)
  dpo.dpo(dpo.DPOConfig.from_dict(straight))
  resumed = dpo_config(sp_model_path, data, tmp_path / "resumed", steps=3, **fixed)
  first = run_cli("dpo", resumed, tmp_path / "a.json")
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_cli("dpo", dict(resumed, steps=6), tmp_path / "b.json")
  assert second.returncode == 0, second.stderr[-3000:]
  for key in ("loss", "rewards_margin", "reward_accuracy"):
    a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
  step_a, state_a = final_state(straight["output_dir"], dpo.DPOConfig.from_dict(straight))
  step_b, state_b = final_state(resumed["output_dir"],
                                dpo.DPOConfig.from_dict(dict(resumed, steps=6)))
  assert step_a == step_b == 6
  assert_bitwise_equal(state_a, state_b)
