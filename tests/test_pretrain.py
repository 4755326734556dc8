"""Pretraining reliability: falling loss, bit-exact resume in a new process, kill -9 during an
async save, SIGTERM, non-finite skip/abort, determinism, accumulation, retention."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qwen2_jax as q
from qwen2_jax.checkpoint.hf import load_hf_checkpoint
from qwen2_jax.tokenizer import load_tokenizer, train_sentencepiece
from qwen2_jax.train import checkpointing
from qwen2_jax.train import step as step_lib
from qwen2_jax.train.loop import NonFiniteError
from qwen2_jax.train.optim import OptimConfig, make_optimizer
from qwen2_jax.train.pretrain import PretrainConfig, pretrain
from run_helpers import assert_bitwise_equal, final_state, logged, with_overrides

WORKER = os.path.join(os.path.dirname(__file__), "pretrain_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small synthetic text corpus (learnable word patterns) and a SentencePiece tokenizer."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  phrases = ["the quick brown fox", "jumps over the lazy dog", "and the cat", "runs away fast",
             "red blue green", "one two three four"]
  for i in range(40):
    (root / f"d{i}.txt").write_text(" ".join(rng.choice(phrases) for _ in range(60)) + "\n")
  model = train_sentencepiece([str(root / "d0.txt"), str(root / "d1.txt")], str(root / "sp"),
                              vocab_size=300, verbose=False)
  return root, str(model)


def _config(corpus, out, **overrides):
  root, tokenizer = corpus
  d = {
      "model": {"preset": "qwen2-tiny", "vocab_size": 320, "num_hidden_layers": 2},
      "tokenizer": tokenizer, "output_dir": str(out), "steps": 8, "seed": 3,
      "data": {"sources": [{"kind": "text", "paths": [str(root / "*.txt")]}], "seq_len": 32,
               "batch_size": 8},
      "optim": {"learning_rate": 3e-3, "min_learning_rate": 3e-4, "warmup_steps": 2,
                "decay_steps": 20},
      "mesh": {"fsdp": -1}, "checkpoint_every": 4, "log_every": 1, "progress": False,
      "export_hf": False,
  }
  return with_overrides(d, overrides)


def _run_worker(config: dict, path, *extra, timeout=300):
  with open(path, "w") as f:
    json.dump(config, f)
  return subprocess.run([sys.executable, WORKER, str(path), str(jax.device_count()), *extra],
                        capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _final_state(out, config_dict):
  """(step, TrainState) of the latest checkpoint of a run directory."""
  return final_state(out, PretrainConfig.from_dict(config_dict))


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
  """An uninterrupted 8-step run in a separate process: (config, out dir, losses)."""
  out = tmp_path_factory.mktemp("straight")
  config = _config(corpus, out / "run")
  result = _run_worker(config, out / "cfg.json")
  assert result.returncode == 0, result.stderr[-3000:]
  return config, str(out / "run"), logged(out / "run")


def test_loss_falls_well_below_its_start(corpus, tmp_path):
  """A tiny model's loss drops far below its initial value (~ln(vocab)) within 40 steps; the
  HF export at the end holds the final params and the tokenizer."""
  config_dict = _config(corpus, tmp_path, steps=40, checkpoint_every=40, export_hf=True,
                        **{"optim.decay_steps": 40})
  summary = pretrain(PretrainConfig.from_dict(config_dict))
  losses = logged(tmp_path)
  assert summary["final_step"] == 40 and summary["skipped"] == 0
  assert losses[1] > 5.0  # ~ln(320) at init
  assert losses[40] < 0.5 * losses[1]
  hf = tmp_path / "hf"
  assert summary["hf_export"] == str(hf) and (hf / "tokenizer.model").is_file()
  text = "the quick brown fox"
  assert load_tokenizer(hf).encode(text) == load_tokenizer(corpus[1]).encode(text)
  _, params = load_hf_checkpoint(hf)
  _, state = _final_state(str(tmp_path), config_dict)
  assert_bitwise_equal(params, jax.device_get(state.params))


def test_resume_in_new_process_is_bit_exact(corpus, straight, tmp_path):
  """Save at step 4, restart in a new process, resume to 8: params, optimizer state and losses
  of steps 5-8 are identical to the uninterrupted run."""
  config, straight_out, straight_losses = straight
  out = tmp_path / "run"
  first = _run_worker(_config(corpus, out, steps=4), tmp_path / "a.json")
  assert first.returncode == 0, first.stderr[-3000:]
  second = _run_worker(_config(corpus, out), tmp_path / "b.json")
  assert second.returncode == 0, second.stderr[-3000:]
  losses = logged(out)
  assert [losses[s] for s in range(1, 9)] == [straight_losses[s] for s in range(1, 9)]
  step_a, state_a = _final_state(straight_out, config)
  step_b, state_b = _final_state(str(out), config)
  assert step_a == step_b == 8
  assert_bitwise_equal(state_a, state_b)


def test_kill_9_during_async_save_resumes_from_last_committed_step(corpus, straight, tmp_path):
  """SIGKILL while step 8's checkpoint is being written: step 8 is never listed; the restart
  resumes from step 4 and reproduces the uninterrupted run."""
  _, _, straight_losses = straight
  out = tmp_path / "run"
  killed = _run_worker(_config(corpus, out), tmp_path / "a.json", "--kill-after-save-start", "8")
  assert killed.returncode == -signal.SIGKILL
  ckpt = checkpointing.Checkpointer(str(out / "checkpoints"))
  try:
    assert ckpt.all_steps() == [4]  # the partial step 8 is not a checkpoint
  finally:
    ckpt.close()
  resumed = _run_worker(_config(corpus, out), tmp_path / "b.json")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout.split("SUMMARY ", 1)[1])
  assert summary["final_step"] == 8 and summary["checkpoints"][-1] == 8
  assert logged(out)[8] == straight_losses[8]


def test_sigterm_commits_current_step_and_exits_cleanly(corpus, straight, tmp_path):
  """SIGTERM mid-run: the current step is saved and committed, the process exits 0, and a
  restart continues to the end with the uninterrupted run's losses."""
  _, _, straight_losses = straight
  out = tmp_path / "run"
  config = _config(corpus, out, steps=8, checkpoint_every=100)
  (tmp_path / "a.json").write_text(json.dumps(config))
  proc = subprocess.Popen([sys.executable, WORKER, str(tmp_path / "a.json"), str(jax.device_count())],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  metrics = out / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and "\"step\": 2" in metrics.read_text()):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 0, stderr[-3000:]
  summary = json.loads(stdout.split("SUMMARY ", 1)[1])
  stopped_at = summary["final_step"]
  assert summary["stopped_by"] == "SIGTERM" and 2 <= stopped_at < 8
  assert summary["checkpoints"] == [stopped_at]  # committed, though checkpoint_every is 100
  resumed = _run_worker(config, tmp_path / "b.json")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  losses = logged(out)
  assert [losses[s] for s in range(1, 9)] == [straight_losses[s] for s in range(1, 9)]


def test_identical_runs_give_bitwise_equallogged(corpus, straight, tmp_path):
  """Determinism: the same config in this process reproduces the worker's losses exactly."""
  _, _, straight_losses = straight
  pretrain(PretrainConfig.from_dict(_config(corpus, tmp_path)))
  assert logged(tmp_path) == straight_losses


def test_resume_with_changed_settings_is_refused(corpus, straight, tmp_path):
  """A checkpoint written with another learning rate is not silently resumed."""
  _, straight_out, _ = straight
  shutil.copytree(straight_out, tmp_path / "run")
  changed = PretrainConfig.from_dict(_config(corpus, tmp_path / "run", steps=10,
                                            **{"optim.learning_rate": 1e-3}))
  with pytest.raises(checkpointing.CheckpointMismatchError, match="optim"):
    pretrain(changed)


def test_nonfinite_update_is_skipped_bitwise():
  """A NaN loss leaves params and optimizer state bit-for-bit unchanged and counts a skip."""
  config = q.get_preset("qwen2-tiny")
  optimizer = make_optimizer(OptimConfig(warmup_steps=0))
  state = step_lib.init_train_state(q.init_params(config, jax.random.key(0)), optimizer)
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 8)).astype(np.int32)
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "positions": np.tile(np.arange(8), (2, 1)),
           "loss_mask": np.ones((2, 8), np.float32), "segment_ids": None}
  step = jax.jit(lambda s, b: step_lib.train_step(config, optimizer, s, b))
  good, metrics = step(state, batch)
  assert bool(metrics["finite"]) and int(good.skipped) == 0
  poisoned = dict(batch, loss_mask=batch["loss_mask"].copy())
  poisoned["loss_mask"][0, 3] = np.nan
  after, metrics = step(good, poisoned)
  assert not bool(metrics["finite"])
  assert int(after.step) == 2 and int(after.skipped) == 1
  assert_bitwise_equal((good.params, good.opt_state), (after.params, after.opt_state))


def test_nonfinite_abort_mode_stops_with_clear_error(corpus, tmp_path):
  """nonfinite: abort raises NonFiniteError naming the step instead of training on."""
  config = PretrainConfig.from_dict(_config(corpus, tmp_path, nonfinite="abort",
                                            z_loss=float("inf")))
  with pytest.raises(NonFiniteError, match="step 1: .*nonfinite: abort"):
    pretrain(config)


def test_gradient_accumulation_equals_the_full_batch():
  """accum_steps=2 gives the same update as one full batch (same tokens, same mean).

  SGD, because Adam's first step divides by |g| and so amplifies 1e-9 differences where g ~ 0.
  """
  config = q.get_preset("qwen2-tiny", initializer_range=0.2)
  optimizer = optax.sgd(1.0)
  state = step_lib.init_train_state(q.init_params(config, jax.random.key(1)), optimizer)
  rng = np.random.RandomState(2)
  ids = rng.randint(0, config.vocab_size, (4, 8)).astype(np.int32)
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "positions": np.tile(np.arange(8), (4, 1)),
           "loss_mask": (rng.rand(4, 8) > 0.3).astype(np.float32), "segment_ids": None}
  step = jax.jit(lambda s, b, n: step_lib.train_step(config, optimizer, s, b, accum_steps=n),
                 static_argnums=2)
  full, m1 = step(state, batch, 1)
  accum, m2 = step(state, batch, 2)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), full.params, accum.params)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(full.params),
                                                          jax.tree.leaves(state.params)))
  assert moved > 1e-3  # the update is not vacuous


def test_retention_keeps_last_n(corpus, tmp_path):
  """keep_checkpoints=2 with a checkpoint every 2 steps leaves exactly the last two steps."""
  pretrain(PretrainConfig.from_dict(_config(corpus, tmp_path, checkpoint_every=2, keep_checkpoints=2)))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  try:
    assert ckpt.all_steps() == [6, 8]
  finally:
    ckpt.close()
