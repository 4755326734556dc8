"""Optimizer recipe (schedule, decay mask, clipping) and the metrics writers (TensorBoard, JSONL)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax as q
from qwen2_jax.train import metrics as M
from qwen2_jax.train.optim import OptimConfig, decay_mask, learning_rate_schedule, make_optimizer
from qwen2_jax.typed_config import ConfigError, structure


def test_schedule_warms_up_then_decays_to_the_floor():
  """LR rises linearly to the peak over warmup, follows a cosine to the floor, then stays there."""
  cfg = OptimConfig(learning_rate=1e-3, min_learning_rate=1e-4, warmup_steps=10, decay_steps=100)
  lr = learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)
  assert float(lr(110)) == pytest.approx(1e-4)
  assert float(lr(10_000)) == pytest.approx(1e-4)
  values = [float(lr(s)) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_skips_norms_biases_and_embeddings():
  """The default mask decays matrices only: norms, q/k/v biases and the embedding are excluded."""
  params = q.init_params(q.get_preset("qwen2-tiny"), jax.random.key(0))
  mask = decay_mask(params, OptimConfig().no_decay)
  assert mask["layers"]["mlp"]["gate_proj"] and mask["layers"]["self_attn"]["q_proj"]
  assert mask["lm_head"]
  assert not mask["layers"]["self_attn"]["q_bias"]
  assert not mask["layers"]["input_layernorm"]["weight"] and not mask["norm"]["weight"]
  assert not mask["embed_tokens"]["embedding"]


def test_adamw_update_matches_hand_computation():
  """One AdamW step with clipping equals the textbook formula on a toy tree."""
  cfg = OptimConfig(learning_rate=0.1, min_learning_rate=0.1, warmup_steps=0, decay_steps=1,
                    b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5, no_decay=("bias",), clip_norm=1.0)
  # w is a matrix: only matrices get weight decay (`model.weight_decay_mask`).
  params = {"w": jnp.array([[1.0, -3.0]]), "bias": jnp.array([3.0])}
  grads = {"w": jnp.array([[3.0, 4.0]]), "bias": jnp.array([0.0])}  # norm 5 -> clipped to 1
  opt = make_optimizer(cfg)
  updates, _ = opt.update(grads, opt.init(params), params)
  g = np.array([[0.6, 0.8]])
  m, v = 0.1 * g / (1 - 0.9), 0.01 * g ** 2 / (1 - 0.99)
  expected_w = -0.1 * (m / (np.sqrt(v) + 1e-8) + 0.5 * np.array([[1.0, -3.0]]))
  np.testing.assert_allclose(updates["w"], expected_w, rtol=1e-5)
  np.testing.assert_allclose(updates["bias"], [0.0], atol=1e-7)  # no decay, zero gradient


def test_bad_optimizer_settings_raise_by_name():
  """Invalid values, wrong types and unknown keys are ConfigErrors naming the field (as the
  recipe spells it when read through `typed_config.structure`)."""
  with pytest.raises(ConfigError, match="OptimConfig.min_learning_rate: must be in"):
    OptimConfig(learning_rate=1e-4, min_learning_rate=1e-3)
  with pytest.raises(ConfigError, match="^optim.lr: unknown setting"):
    structure(OptimConfig, {"lr": 1.0}, path="optim")
  with pytest.raises(ConfigError, match="^optim.warmup_steps: .*got True"):
    structure(OptimConfig, {"warmup_steps": True}, path="optim")
  with pytest.raises(ConfigError, match=r"^optim.clip_norm: must be > 0 or null, got -1\.0"):
    structure(OptimConfig, {"clip_norm": "-1"}, path="optim")
  assert structure(OptimConfig, {"learning_rate": "1e-3", "warmup_steps": "8"}) == \
      OptimConfig(learning_rate=1e-3, warmup_steps=8)


def test_tensorboard_events_read_back_with_tensorboard(tmp_path):
  """Our event files (tensorboardX) are read by tensorboard's own EventAccumulator."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = M.TensorBoardWriter(str(tmp_path))
  for step in range(1, 6):
    writer.scalars(step, {"train/loss": 10.0 / step, "train/lr": 1e-3})
  writer.close()
  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr"}
  events = acc.Scalars("train/loss")
  assert [e.step for e in events] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([e.value for e in events], [10.0 / s for s in range(1, 6)], rtol=1e-6)


def test_jsonl_log_appends_records(tmp_path):
  """Each record is one JSON line, appended (a resumed run continues the same file)."""
  for run in range(2):
    log = M.JsonlLog(str(tmp_path / "m.jsonl"))
    log.write({"step": run, "loss": 1.5})
    log.close()
  lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
  assert lines == [{"loss": 1.5, "step": 0}, {"loss": 1.5, "step": 1}]
