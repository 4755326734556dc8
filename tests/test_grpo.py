"""GRPO and online DPO: the objective vs a hand-written one, advantages and weights, rollout
log-probs vs the training forward, a rising reward on a verifiable task, online DPO raising a
reward model's score, bit-exact resume, recipe errors."""

from __future__ import annotations

import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qwen2_jax as q
from qwen2_jax import reward_model
from qwen2_jax.infer import Engine, SamplingParams
from qwen2_jax.train import dpo, grpo, online
from qwen2_jax.train import step as step_lib
from qwen2_jax.typed_config import ConfigError
from run_helpers import assert_bitwise_equal, final_state, logged, run_cli, with_overrides


# ----------------------------------------------------------------------------- the objective

def _random_rows(config, rng, R=4, T=10):
  """Rows of random ids with a random response span each (prompt then response)."""
  ids = rng.integers(0, config.vocab_size, (R, T + 1)).astype(np.int32)
  mask = np.zeros((R, T), np.float32)
  for r in range(R):
    start = rng.integers(1, T // 2)
    end = rng.integers(start + 1, T + 1)
    mask[r, start:end] = 1.0
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
          "positions": np.tile(np.arange(T, dtype=np.int32), (R, 1)),
          "segment_ids": np.ones((R, T), np.int32)}


def _hand_written_grpo(config, params, rows, adv, old, ref, *, eps_low, eps_high, beta,
                       aggregation):
  """GRPO's loss from its definition, token by token, independent of train/grpo.py."""
  logits = q.forward(config, params, rows["input_ids"], positions=rows["positions"],
                     segment_ids=rows["segment_ids"]).astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  R, T = rows["targets"].shape
  per_row, total, count = [], 0.0, 0.0
  for i in range(R):
    row_sum, n = 0.0, 0.0
    for t in range(T):
      if rows["loss_mask"][i, t] == 0:
        continue
      lp = logprobs[i, t, rows["targets"][i, t]]
      ratio = jnp.exp(lp - old[i, t])
      surrogate = jnp.minimum(ratio * adv[i], jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
      kl = ref[i, t] / jnp.exp(lp) - jnp.log(ref[i, t]) + lp - 1.0  # pi_ref/pi - log(pi_ref/pi) - 1
      token_loss = -surrogate + beta * kl
      row_sum, n = row_sum + token_loss, n + 1
    per_row.append(row_sum / n)
    total, count = total + row_sum, count + n
  if aggregation == "token":
    return total / count
  return sum(per_row) / len(per_row)


@pytest.mark.parametrize("aggregation", [pytest.param("sequence", marks=pytest.mark.slow),
                                         "token"])
def test_objective_and_gradient_match_the_definition(aggregation):
  """Tiny model, clipping active on some tokens (old log-probs perturbed by +-0.5) and the k3
  KL on: loss and gradient (via SGD lr 1) equal the definition written token by token, with the
  reference given as probabilities; (token) two micro-batches give the same update."""
  config = q.get_preset("qwen2-tiny", initializer_range=0.1)
  params = q.init_params(config, jax.random.key(0))
  ref_params = q.init_params(config, jax.random.key(1))
  rng = np.random.default_rng(0)
  rows = _random_rows(config, rng)
  logp = np.asarray(grpo.token_logps(config, params, rows))
  old = (logp + rng.uniform(-0.5, 0.5, logp.shape) * rows["loss_mask"]).astype(np.float32)
  ref_logp = np.asarray(grpo.token_logps(config, ref_params, rows))
  adv = rng.normal(size=len(rows["input_ids"])).astype(np.float32)
  eps_low, eps_high, beta = 0.2, 0.28, 0.1
  expected, expected_grads = jax.jit(jax.value_and_grad(
      lambda p: _hand_written_grpo(config, p, rows, adv, old, np.exp(ref_logp), eps_low=eps_low,
                                   eps_high=eps_high, beta=beta, aggregation=aggregation)))(params)

  batch = dict(rows, old_logps=old, ref_logps=ref_logp, advantages=adv[:, None],
               weights=grpo.token_weights(rows["loss_mask"], aggregation))
  opt = optax.sgd(1.0)
  state = step_lib.init_train_state(params, opt)
  step = jax.jit(lambda s, b: grpo.grpo_train_step(
      config, opt, s, b, clip_epsilon=eps_low, clip_epsilon_high=eps_high, kl_coef=beta,
      kl_estimator="k3"))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5, atol=1e-7)
  assert 0.05 < float(metrics["clip_fraction"]) < 0.95  # clipping active on some tokens only
  assert float(metrics["kl"]) > 0
  grads = jax.tree.map(lambda a, b: a - b, params, new_state.params)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=2e-6, rtol=1e-4), grads,
               expected_grads)
  assert float(optax.global_norm(expected_grads)) > 1e-3  # not vacuous

  if aggregation == "sequence":
    return
  # Two micro-batches give the same update (the weights are normalised over the mini-batch).
  acc = jax.jit(lambda s, b: grpo.grpo_train_step(
      config, opt, s, b, accum_steps=2, clip_epsilon=eps_low, clip_epsilon_high=eps_high,
      kl_coef=beta, kl_estimator="k3"))
  acc_state, acc_metrics = acc(state, batch)
  np.testing.assert_allclose(float(acc_metrics["loss"]), float(expected), rtol=1e-5, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), acc_state.params,
               new_state.params)


def test_advantages_weights_and_kl_estimators():
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
  adv = grpo.group_advantages(rewards, 4)
  np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-3)  # mean 0.5, std 0.5
  np.testing.assert_array_equal(adv[4:], 0.0)                       # no signal in a tie
  np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "none")[:4], [.5, -.5, -.5, .5])

  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  tok = grpo.token_weights(mask, "token")
  np.testing.assert_allclose(tok, mask / 4)
  seq = grpo.token_weights(mask, "sequence")
  np.testing.assert_allclose(seq.sum(axis=1), [0.5, 0.5, 0.0])  # two responses, equal shares
  np.testing.assert_allclose(seq[0, :3], 1 / 6)

  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k2"), [0.125, 0.5])
  np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k3"),
                             [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1], rtol=1e-6)


def test_best_and_worst_make_pairs_and_ties_make_none():
  from qwen2_jax.train import online_dpo  # pylint: disable=import-outside-toplevel
  best, worst, has = online_dpo.best_and_worst(np.array([0.1, 0.9, 0.5, 2.0, 2.0, 2.0,
                                                         1.0, 3.0, 3.0]), 3)
  np.testing.assert_array_equal(best, [1, 3, 7])    # the first of equal maxima
  np.testing.assert_array_equal(worst, [0, 3, 6])
  np.testing.assert_array_equal(has, [True, False, True])


def test_rows_hold_prompt_then_response_with_old_logps():
  prompts = [np.array([5, 6, 7], np.int32)]
  rows = online.rows_of(prompts, [[8, 9], [10]], [[-0.5, -0.25], [-1.0]], seq_len=6,
                        group_size=2)
  np.testing.assert_array_equal(rows["input_ids"][0], [5, 6, 7, 8, 0, 0])
  np.testing.assert_array_equal(rows["targets"][0], [6, 7, 8, 9, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][0], [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows["old_logps"][0], [0, 0, -0.5, -0.25, 0, 0])
  np.testing.assert_array_equal(rows["targets"][1], [6, 7, 10, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][1], [0, 0, 1, 0, 0, 0])
  with pytest.raises(ValueError, match="seq_len"):
    online.rows_of(prompts, [[1] * 5], [[0.0] * 5], seq_len=6, group_size=1)


# ----------------------------------------------------------------------------- rollouts

@pytest.mark.parametrize("preset", ["qwen2-tiny",
                                    pytest.param("qwen2-moe-tiny", marks=pytest.mark.slow)])
def test_rollout_logprobs_equal_the_training_forward(preset):
  """Responses sampled by the engine (temperature 1, prefix caching on, more requests than
  slots) carry per-token log-probs equal to the training forward's over prompt + response."""
  config = q.get_preset(preset, initializer_range=0.1)
  params = q.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in (5, 17, 9)]
  engine = Engine(config, params, max_num_seqs=4, max_num_batched_tokens=32, page_size=4)
  G = 3
  results = engine.generate([p.tolist() for p in prompts for _ in range(G)],
                            [SamplingParams(max_new_tokens=6, temperature=1.0, seed=s)
                             for s in range(len(prompts) * G)])
  rows = online.rows_of(prompts, [r.output_ids for r in results],
                        [r.logprobs for r in results], seq_len=24, group_size=G)
  logp = np.asarray(grpo.token_logps(config, params, rows))
  mask = rows["loss_mask"] > 0
  assert mask.sum() == len(results) * 6
  np.testing.assert_allclose(logp[mask], rows["old_logps"][mask], atol=2e-5)
  # New weights reach the engine without rebuilding it, and the prefix cache (the prompts'
  # pages hold keys of the old weights) is dropped: the same as a fresh engine on the new weights.
  new_params = jax.tree.map(lambda x: x * 1.5, params)
  compilations = engine.stats["num_compilations"]
  engine.update_params(new_params)
  sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
  again = engine.generate([prompts[1].tolist()], sp)[0]
  fresh = Engine(config, new_params, max_num_seqs=4, max_num_batched_tokens=32,
                 page_size=4).generate([prompts[1].tolist()], sp)[0]
  assert again.output_ids == fresh.output_ids
  np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-5)
  assert again.logprobs != results[G].logprobs
  assert engine.stats["num_compilations"] == compilations  # nothing recompiled


# ----------------------------------------------------------------------------- runs

def _sum_prompts(n, seed=0):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    out.append({"prompt": f"{a}+{b}=", "answer": a + b})
  return out


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def digits_share(prompt, response, metadata):
  """Share of the response's non-space characters that are digits (a format reward)."""
  chars = [c for c in response if not c.isspace()]
  return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def _mean_reward(out, first: int, last: int) -> float:
  """Mean of the logged reward_mean over rounds first..last."""
  reward = logged(out, "reward_mean")
  return float(np.mean([reward[s] for s in range(first, last + 1)]))


def grpo_config(sp_model_path, data, out, **overrides):
  d = {"model": {"preset": "qwen2-tiny"}, "tokenizer": str(sp_model_path),
       "output_dir": str(out),
       "data": {"paths": [data], "seq_len": 40, "batch_size": 4, "num_epochs": 8,
                "default_system": None},
       "rollout": {"num_generations": 4, "max_new_tokens": 6, "max_num_seqs": 16,
                   "max_num_batched_tokens": 64, "page_size": 8},
       "rewards": [{"type": "math"}, {"type": "function", "function": "test_grpo:digits_share",
                                      "name": "digits"}],
       "optim": {"learning_rate": 1e-2, "warmup_steps": 0, "clip_norm": 1.0},
       "kl_coef": 0.0, "mesh": {"fsdp": -1}, "log_every": 1, "checkpoint_every": 100,
       "progress": False, "export_hf": False, "steps": 4}
  return with_overrides(d, overrides)


@pytest.mark.slow
def test_grpo_raises_a_rule_based_reward(sp_model_path, tmp_path):
  """From random init on the sums task (rewards: 1 for the exact sum + the digit share of the
  response), 24 rounds of GRPO: the mean reward of the last 6 rounds clearly exceeds the first
  6 rounds' (0.07 -> 0.63 when written, nearly all of it the digit share: exact sums stay rare
  for a random 2-layer model), and the per-term, KL and timing metrics are logged."""
  data = _write(tmp_path / "p.jsonl", _sum_prompts(64))
  cfg = grpo_config(sp_model_path, data, tmp_path / "run", steps=24, kl_coef=0.02,
                    num_minibatches=2)
  summary = grpo.grpo(grpo.GRPOConfig.from_dict(cfg))
  assert summary["final_step"] == 24
  first, last = _mean_reward(tmp_path / "run", 1, 6), _mean_reward(tmp_path / "run", 19, 24)
  assert last > first + 0.15, (first, last)
  for key in ("reward/math", "reward/digits", "kl", "clip_fraction", "generation_share",
              "rollout_tokens_per_s", "train_tokens_per_s", "response_length"):
    assert len(logged(tmp_path / "run", key)) == 24, key


@pytest.mark.slow
def test_resume_in_new_process_is_bit_exact(sp_model_path, tmp_path, monkeypatch):
  """Rounds 1-2 in this process and 3-4 in a new `qwen2-jax grpo` process give the straight
  run's rewards, losses, params and optimizer state bit for bit (rollouts are re-sampled from
  the same seeds and weights)."""
  data = _write(tmp_path / "p.jsonl", _sum_prompts(32))
  fixed = {"auto_decay": False, "optim.decay_steps": 8, "checkpoint_every": 2, "kl_coef": 0.05}
  straight = grpo_config(sp_model_path, data, tmp_path / "straight", **fixed)
  grpo.grpo(grpo.GRPOConfig.from_dict(straight))
  resumed = grpo_config(sp_model_path, data, tmp_path / "resumed", **dict(fixed, steps=2))
  grpo.grpo(grpo.GRPOConfig.from_dict(resumed))
  # The new process imports this file's digits_share reward.
  monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
  second = run_cli("grpo", dict(resumed, steps=4), tmp_path / "b.json")
  assert second.returncode == 0, second.stderr[-3000:]
  for key in ("loss", "reward_mean", "kl", "response_length", "grad_norm"):
    a, b = logged(tmp_path / "straight", key), logged(tmp_path / "resumed", key)
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)], key
  # The policy gradient is exercised: rewards differ within groups in rounds after the resume.
  assert max(logged(tmp_path / "resumed", "reward_std")[s] for s in (3, 4)) > 0
  step_a, state_a = final_state(straight["output_dir"], grpo.GRPOConfig.from_dict(straight))
  step_b, state_b = final_state(resumed["output_dir"],
                                grpo.GRPOConfig.from_dict(dict(resumed, steps=4)))
  assert step_a == step_b == 4
  assert_bitwise_equal(state_a, state_b)


@pytest.mark.slow
def test_online_dpo_raises_the_reward_models_score(sp_model_path, tmp_path):
  """A random reward model (score head std 1) scores the policy's samples; 16 rounds of
  online DPO (pairs: best and worst of 4 samples, 2 updates per round) raise the mean score of
  the samples (rounds 1-4: -13.2, rounds 13-16: -9.2 when written; scores spread ~5)."""
  config = q.get_preset("qwen2-tiny", initializer_range=0.1)
  rm_params = reward_model.init_params(config, jax.random.key(7), score_std=1.0)
  rm_dir = tmp_path / "rm"
  reward_model.save(rm_dir, config, rm_params)
  data = _write(tmp_path / "p.jsonl", _sum_prompts(64, seed=1))
  cfg = grpo_config(sp_model_path, data, tmp_path / "run", steps=16)
  for key in ("rollout", "rewards", "kl_coef"):
    cfg.pop(key)
  cfg.update(beta=0.1, online={
      "rollout": {"num_generations": 4, "max_new_tokens": 6, "max_num_seqs": 16,
                  "max_num_batched_tokens": 64, "page_size": 8},
      "rewards": [{"type": "reward_model", "path": str(rm_dir)}], "num_iterations": 2})
  cfg["optim"]["learning_rate"] = 1e-2
  summary = dpo.dpo(dpo.DPOConfig.from_dict(cfg))
  assert summary["final_step"] == 16
  first, last = _mean_reward(tmp_path / "run", 1, 4), _mean_reward(tmp_path / "run", 13, 16)
  assert last > first + 1.5, (first, last)
  assert min(logged(tmp_path / "run", "score_margin").values()) > 0
  assert len(logged(tmp_path / "run", "rewards_margin")) == 16


# ----------------------------------------------------------------------------- recipe errors

@pytest.mark.parametrize("overrides, message", [
    ({"rewards": []}, "rewards: give at least one reward term"),
    ({"rewards": [{"type": "mathh"}]}, "type: 'mathh' is not one of"),
    ({"rewards": [{"type": "math", "path": "x"}]}, "path: not a setting of a math reward"),
    ({"rewards": [{"type": "function"}]}, "function: required"),
    ({"num_minibatches": 3}, "num_minibatches: must divide the round's 16 rows"),
    ({"rollout.max_new_tokens": 40}, "leaves no room for a prompt"),
    ({"rollout.temperature": 0.0}, "temperature: must be > 0"),
    ({"kl_estimator": "k4"}, "kl_estimator: must be one of"),
    ({"rollout.num_generations": 1}, "num_generations: must be >= 2"),
    ({"rewards": [{"type": "math", "fallback": "first"}]}, "fallback: 'first' is not one of"),
    ({"rollout.num_pages": 2}, "num_pages: 2 pages of 8 tokens cannot hold"),
])
def test_bad_recipes_are_one_line_errors(sp_model_path, tmp_path, overrides, message):
  cfg = grpo_config(sp_model_path, str(tmp_path / "p.jsonl"), tmp_path / "run")
  for key, value in overrides.items():
    with_overrides(cfg, {key: value})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
    grpo.GRPOConfig.from_dict(cfg)
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_moe_grpo_with_expert_parallelism_exports_hf(sp_model_path, tmp_path):
  """Qwen2-MoE on a mesh of fsdp 4 x expert 2 with the expert-parallel rules: two GRPO rounds
  (engine rollouts on the same mesh), rollout log-probs equal to the trainer's (ratio 1 in the
  first update), an HF export at the end."""
  data = _write(tmp_path / "p.jsonl", _sum_prompts(16))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = grpo_config(sp_model_path, data, tmp_path / "run", steps=2, kl_coef=0.04,
                    rewards=[{"type": "math"}], export_hf=True,
                    rules=os.path.join(root, "configs", "rules_moe_ep.json"),
                    mesh={"fsdp": 4, "expert": 2})
  cfg["model"] = {"preset": "qwen2-moe-tiny"}
  summary = grpo.grpo(grpo.GRPOConfig.from_dict(cfg))
  assert summary["final_step"] == 2
  assert abs(logged(tmp_path / "run", "ratio")[1] - 1.0) < 1e-4
  assert os.path.isfile(os.path.join(summary["hf_export"], "model.safetensors"))
