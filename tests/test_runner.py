"""The job runner (`train.runner`): every recipe in configs/ loads through the real loader, one
fingerprint rule for every job, run errors name the setting to fix, recipe settings reach the
step, and a failing checkpoint ends the loop with the logs closed."""

from __future__ import annotations

import glob
import json
import os
import signal

import jax
import numpy as np
import optax
import pytest

from qwen2_jax import sharding
from qwen2_jax.errors import UserError
from qwen2_jax.train import checkpointing, loop, step as step_lib
from qwen2_jax.train.dpo import DPOConfig, DPOJob
from qwen2_jax.train.pretrain import PretrainConfig, PretrainJob
from qwen2_jax.train.runner import run
from qwen2_jax.train.sft import SFTConfig, SFTJob
from qwen2_jax.typed_config import ConfigError
from run_helpers import WORDS, write_jsonl

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _job_for(recipe: str):
  name = os.path.basename(recipe)
  if name.startswith("rm_"):
    from qwen2_jax.train.rm import RMJob  # pylint: disable=import-outside-toplevel
    return RMJob
  if name.startswith("grpo_"):
    from qwen2_jax.train.grpo import GRPOJob  # pylint: disable=import-outside-toplevel
    return GRPOJob
  return SFTJob if name.startswith("sft_") else DPOJob if name.startswith("dpo_") else PretrainJob


def test_every_recipe_in_configs_loads():
  """Each configs/*.yaml builds its job's typed config through the loader `qwen2-jax
  pretrain|sft|dpo --config` uses (strict: an unknown key would fail); the SFT report recipe
  carries Qwen2's settings."""
  recipes = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
  loaded = {os.path.basename(p): _job_for(p).config.load(p) for p in recipes}
  assert len(loaded) == len(recipes) >= 10
  kinds = {type(c).__name__ for c in loaded.values()}
  assert kinds == {"PretrainConfig", "SFTConfig", "DPOConfig", "RMConfig", "GRPOConfig"}
  assert all(c.data.seq_len > 0 and c.data.batch_size > 0 for c in loaded.values())
  assert loaded["qwen2-57b-a14b_v5p-64.yaml"].model.is_moe
  assert loaded["qwen2-57b-a14b_v5p-64.yaml"].mesh.expert == 8
  report = loaded["sft_qwen2-report.yaml"]
  o = report.optim
  assert (o.learning_rate, o.min_learning_rate, o.weight_decay, o.clip_norm) == \
      (7e-6, 7e-7, 0.1, 1.0)
  assert report.data.num_epochs == 2 and report.data.seq_len == 32768 and report.auto_decay
  assert loaded["dpo_qwen2-report.yaml"].beta == 0.1
  assert loaded["dpo_online_cpu_demo.yaml"].online.rewards[0].type == "reward_model"
  assert loaded["grpo_qwen2-7b_v5p-8.yaml"].updates_per_round == 8


def _dicts(tmp_path) -> dict[type, dict]:
  """Minimal recipes of each job (no file is read before `run`)."""
  chat = {"paths": [str(tmp_path / "c.jsonl")], "seq_len": 64, "batch_size": 8}
  common = {"model": {"preset": "qwen2-tiny"}, "tokenizer": str(tmp_path / "sp.model"),
            "output_dir": str(tmp_path / "run"), "progress": False, "export_hf": False}
  return {
      PretrainConfig: {**common, "steps": 4, "data": {
          "sources": [{"kind": "text", "paths": [str(tmp_path / "*.txt")]}], "seq_len": 32,
          "batch_size": 8}},
      SFTConfig: {**common, "data": chat},
      DPOConfig: {**common, "data": chat},
  }


@pytest.mark.parametrize("cls", [PretrainConfig, SFTConfig, DPOConfig])
def test_one_fingerprint_rule_for_every_job(cls, tmp_path):
  """Every job fingerprints its name, model, applied optimizer, seed, init_from, accum_steps and
  its own settings: a changed seed or starting point refuses a resume, a changed log_every,
  eval_every or mesh does not."""
  d = _dicts(tmp_path)[cls]
  base = cls.from_dict(d).fingerprint(8)
  assert {"job", "model", "optim", "seed", "init_from", "accum_steps", "data"} <= set(base)
  assert base["job"] == cls.job_name and "remat_policy" not in base["model"]
  for changed in ({"seed": 1}, {"init_from": str(tmp_path)}, {"accum_steps": 2},
                  {"optim": {"learning_rate": 1e-3}}, {"data": {**d["data"], "seed": 5}}):
    assert cls.from_dict({**d, **changed}).fingerprint(8) != base, changed
  for same in ({"log_every": 1}, {"eval_batches": 2}, {"mesh": {"data": 2, "fsdp": -1}},
               {"checkpoint_every": 7},
               {"model": {"preset": "qwen2-tiny", "remat_policy": "full"}}):
    assert cls.from_dict({**d, **same}).fingerprint(8) == base, same


def test_auto_decay_ties_the_schedule_to_the_run_length(tmp_path):
  """auto_decay (the post-training default) decays over exactly the run, so the run length is
  in the fingerprint; pretraining's explicit decay_steps is not."""
  d = _dicts(tmp_path)
  sft = SFTConfig.from_dict(d[SFTConfig])
  assert sft.run_optim(120).decay_steps == 120 - sft.optim.warmup_steps
  assert sft.fingerprint(120) != sft.fingerprint(130)
  pre = PretrainConfig.from_dict(d[PretrainConfig])
  assert pre.run_optim(120) == pre.optim and pre.fingerprint(120) == pre.fingerprint(130)


@pytest.fixture
def files(tmp_path, sp_model_path):
  """A tokenizer (400 ids), a small text corpus and 6 chats in tmp_path."""
  os.symlink(sp_model_path, tmp_path / "sp.model")
  for i in range(4):
    (tmp_path / f"d{i}.txt").write_text(" ".join(WORDS * 20) + "\n")
  chats = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w}]}
           for w in WORDS[:6]]
  write_jsonl(tmp_path / "c.jsonl", chats)
  return tmp_path


@pytest.mark.parametrize("cls, job, overrides, error, message", [
    (PretrainConfig, PretrainJob, {"data.batch_size": 4}, ConfigError,
     r"^data.batch_size: 4 .* 8 batch shards"),
    (SFTConfig, SFTJob, {"accum_steps": 2}, ConfigError,
     r"^data.batch_size: 8 \(/ accum_steps=2: 4 rows per micro-batch\)"),
    (PretrainConfig, PretrainJob, {"model.vocab_size": 256}, ConfigError,
     r"^model.vocab_size: 256 is smaller than the 400 ids"),
    (PretrainConfig, PretrainJob, {"tokenizer": "/no/such/sp.model"}, UserError,
     r"^tokenizer: /no/such/sp.model does not exist"),
    (SFTConfig, SFTJob, {"init_from": "/no/such/model"}, UserError,
     r"^init_from: /no/such/model does not exist"),
    (SFTConfig, SFTJob, {"steps": 100}, ConfigError,
     r"^steps: 100 exceeds the data: 1 batches in data.num_epochs=1"),
    (PretrainConfig, PretrainJob, {"eval_every": 2}, ConfigError,
     r"^eval_every: 2 needs held-out data: set data.eval_every_nth_document > 0"),
])
def test_run_errors_name_the_setting(files, cls, job, overrides, error, message):
  """Settings that only the run can check (against the mesh, the tokenizer, the data, the
  filesystem) stop it before anything is written, naming the setting to fix."""
  d = _dicts(files)[cls]
  for key, value in overrides.items():
    node = d
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  with pytest.raises(error, match=message):
    run(job(cls.from_dict(d)))
  assert not os.path.exists(files / "run")


def test_model_from_init_from_needs_the_path(tmp_path):
  """A model taken from init_from (absent, or implementation settings only) needs init_from to
  exist; without init_from the message says what to give."""
  d = _dicts(tmp_path)[SFTConfig]
  with pytest.raises(UserError, match="^init_from: /no/such/model does not exist"):
    SFTConfig.from_dict({**d, "model": {"dtype": "bfloat16"}, "init_from": "/no/such/model"})
  with pytest.raises(ConfigError, match="^model: give a preset or every field, or set init_from"):
    SFTConfig.from_dict({k: v for k, v in d.items() if k != "model"})


@pytest.mark.slow
def test_router_z_loss_reaches_the_step(tmp_path):
  """The recipe's router_z_loss (MoE only) is in the update: the same batch and state give the
  same cross entropy but other params than with router_z_loss 0."""
  d = _dicts(tmp_path)[PretrainConfig]
  with pytest.raises(ConfigError, match="^router_z_loss: 0.5 needs an MoE model"):
    PretrainConfig.from_dict({**d, "router_z_loss": 0.5})
  d["model"] = {"preset": "qwen2-moe-tiny", "moe_impl": "ragged_dot"}
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=1), devices=jax.devices()[:1])
  rules = sharding.get_rules("fsdp")
  optimizer = optax.sgd(1.0)
  ids = np.random.RandomState(0).randint(0, 512, (2, 9)).astype(np.int32)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": np.ones((2, 8), np.float32), "positions": np.tile(np.arange(8), (2, 1)),
           "segment_ids": np.ones((2, 8), np.int32)}
  out = {}
  for coef in (0.0, 0.5):
    cfg = PretrainConfig.from_dict({**d, "router_z_loss": coef})
    state = step_lib.init_train_state_sharded(cfg.model, optimizer, jax.random.key(0), mesh, rules)
    out[coef] = jax.device_get(PretrainJob(cfg).make_step(optimizer, mesh, rules)(state, batch))
  (a, ma), (b, mb) = out[0.0], out[0.5]
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  assert mb["moe_router_z_loss"] > 0
  router = lambda s: s.params["layers"]["mlp"]["router"]
  assert np.abs(router(a) - router(b)).max() > 1e-4


class _FailingCheckpointer:
  """Stands in for `checkpointing.Checkpointer`: its background save fails after step 2."""

  def __init__(self):
    self.closed, self.saved = False, []

  def raise_if_failed(self):
    if self.saved:
      raise checkpointing.CheckpointWriteError("saving checkpoint step 2 failed: disk full")

  def save(self, step, *args, **kwargs):
    self.saved.append(step)

  def wait(self):
    self.raise_if_failed()

  def close(self):
    self.closed = True
    self.raise_if_failed()


def test_failed_checkpoint_ends_the_loop_and_closes_the_logs(tmp_path):
  """A failed asynchronous save raises out of the loop at the next step (the run ends), and
  closing the run still closes metrics.jsonl and restores the signal handlers, though the
  checkpointer's own close raises again."""
  cfg = PretrainConfig.from_dict({**_dicts(tmp_path)[PretrainConfig], "checkpoint_every": 2,
                                  "log_every": 1, "peak_flops": 1e12})
  previous = signal.getsignal(signal.SIGTERM)
  ckpt = _FailingCheckpointer()
  run_log = loop.RunLog(cfg, ckpt, steps=4, start=0)
  steps = []

  def train_step(state, batch):
    steps.append(len(steps) + 1)
    return state, {"loss": 1.0, "grad_norm": 1.0, "finite": True}

  state = step_lib.TrainState(np.int32(0), {}, {}, np.int32(0))
  with pytest.raises(checkpointing.CheckpointWriteError, match="disk full"):
    try:
      loop.train_loop(cfg, run_log, state=state, start=0, steps=4, next_batch=lambda: {},
                      train_step=train_step, data_state=dict, schedule=lambda n: 0.1,
                      fingerprint={}, tokens_per_step=1, flops_per_token=1.0)
    finally:
      with pytest.raises(checkpointing.CheckpointWriteError):
        run_log.close()
  assert steps == [1, 2, 3] and ckpt.saved == [2] and ckpt.closed
  with pytest.raises(ValueError, match="closed file"):
    run_log.jsonl.write({"step": 4})
  assert signal.getsignal(signal.SIGTERM) == previous
  records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]  # step 3 ran; the failure is raised first
