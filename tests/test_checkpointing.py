"""Training checkpoints: a failed save ends the run with one line (never a hang), a failed HF
export leaves nothing half-written, a refused resume names exactly the settings that changed."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

import qwen2_jax as q
from qwen2_jax.errors import UserError
from qwen2_jax.train import checkpointing, loop
from qwen2_jax.train.checkpointing import (Checkpointer, CheckpointMismatchError,
                                           CheckpointWriteError, fingerprint_of,
                                           settings_changes)

STATE = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}


def _fingerprint(**changes):
  parts = {"model": {f"field_{i}": i for i in range(40)},
           "optim": {"learning_rate": 3e-4, "warmup_steps": 10},
           "data": {"seq_len": 256, "seed": 0, "paths": ["a.jsonl"]}, "seed": 0}
  for key, value in changes.items():
    section, name = key.split(".")
    parts[section] = dict(parts[section], **{name: value})
  return fingerprint_of(**parts)


def _new_threads(before: set[int], timeout_s: float = 10.0) -> list[str]:
  """Non-daemon threads started since `before` that are still alive after `timeout_s` (a
  non-daemon thread left waiting keeps the process from exiting)."""
  deadline = time.monotonic() + timeout_s
  while True:
    alive = [t for t in threading.enumerate() if t.ident not in before and not t.daemon
             and t.is_alive()]
    if not alive or time.monotonic() > deadline:
      return [t.name for t in alive]
    time.sleep(0.1)


# ----------------------------------------------------------------------------- refused resumes

def test_refused_resume_names_only_the_changed_settings(tmp_path):
  """Restoring with changed settings raises a one-line UserError listing exactly the changed
  dotted keys with old -> new values, not the whole sections; equal settings restore."""
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(100, STATE, {"epoch": 1}, fingerprint=_fingerprint())
  ckpt.wait()
  changed = _fingerprint(**{"optim.learning_rate": 1e-3, "data.seq_len": 512})
  with pytest.raises(CheckpointMismatchError) as refused:
    ckpt.restore(100, STATE, fingerprint=changed)
  assert isinstance(refused.value, UserError)
  assert str(refused.value) == (
      f"{tmp_path / 'checkpoints'} step 100 was written with different settings: "
      "data.seq_len 256 -> 512, optim.learning_rate 0.0003 -> 0.001; use a new output_dir or "
      "restore the settings")
  state, data, _ = ckpt.restore(100, STATE, fingerprint=_fingerprint())
  np.testing.assert_array_equal(state["w"], STATE["w"])
  assert data == {"epoch": 1}
  ckpt.close()


def test_settings_changes_shows_added_removed_and_caps_the_list():
  """Keys only on one side show as (absent); values print as JSON; past 12 changes the rest
  is counted, so the message stays one short line."""
  saved = {"a": {"b": 1, "gone": "x"}, "c": [1, 2]}
  now = {"a": {"b": 2, "new": None}, "c": [1, 2]}
  assert settings_changes(saved, now) == \
      'a.b 1 -> 2, a.gone "x" -> (absent), a.new (absent) -> null'
  assert settings_changes(saved, saved) == ""
  many = settings_changes({"m": {f"k{i:02d}": 0 for i in range(20)}},
                          {"m": {f"k{i:02d}": 1 for i in range(20)}})
  assert many.count(" -> ") == 12 and many.endswith(", and 8 more")


# ----------------------------------------------------------------------------- failed saves

def test_failed_background_save_is_raised_without_blocking(tmp_path, monkeypatch):
  """A save that fails in the background (disk full) is raised by `raise_if_failed`, which
  never waits for a save in flight; later saves and `wait` raise it again; `close` returns
  and leaves no thread behind."""
  original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full_at_step_2(self, item, directory):
    if "2.orbax-checkpoint-tmp" in str(directory):
      await asyncio.sleep(2.0)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, item, directory)

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn",
                      disk_full_at_step_2)
  before = {t.ident for t in threading.enumerate()}
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory)
  ckpt.save(1, STATE, {}, fingerprint={})
  ckpt.save(2, STATE, {}, fingerprint={})
  start = time.monotonic()
  ckpt.raise_if_failed()  # in flight: returns at once
  assert time.monotonic() - start < 1.0
  with pytest.raises(CheckpointWriteError) as failed:
    while time.monotonic() - start < 60:
      ckpt.raise_if_failed()
      time.sleep(0.05)
  message = str(failed.value)
  assert message.startswith(f"saving checkpoint step 2 to {directory} failed: No space left on "
                            "device: ") and "\n" not in message
  assert time.monotonic() - start < 30
  with pytest.raises(CheckpointWriteError, match="step 2"):
    ckpt.save(3, STATE, {}, fingerprint={})
  with pytest.raises(CheckpointWriteError, match="step 2"):
    ckpt.wait()
  start = time.monotonic()
  ckpt.close()
  assert time.monotonic() - start < 30
  assert ckpt.all_steps() == [1]
  assert _new_threads(before) == []


def test_checkpoint_directory_replaced_by_a_file_fails_the_save_at_once(tmp_path):
  """The step directory is created by `save` itself, so an unwritable checkpoint directory
  raises there (Orbax's asynchronous creation would leave writer threads waiting 300 s)."""
  before = {t.ident for t in threading.enumerate()}
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory)
  ckpt.save(1, STATE, {}, fingerprint={})
  ckpt.wait()
  shutil.rmtree(directory)
  with open(directory, "w") as f:
    f.write("not a directory")
  with pytest.raises(CheckpointWriteError,
                     match=rf"^saving checkpoint step 2 to {directory} failed: Not a directory: "):
    ckpt.save(2, STATE, {}, fingerprint={})
  ckpt.close()
  assert _new_threads(before) == []


_RUN_WITH_FAILING_CHECKPOINT = textwrap.dedent("""
    import asyncio, errno, os, shutil, sys, time
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
    from qwen2_jax import cli
    from qwen2_jax.train import checkpointing

    mode, config = sys.argv[1], sys.argv[2]
    save, write = checkpointing.Checkpointer.save, handler.JsonCheckpointHandler._save_fn

    def break_directory(self, step, *args, **kwargs):
      if step == 3 and mode == "directory_replaced_by_file":
        self.wait()
        shutil.rmtree(self.directory)
        open(self.directory, "w").close()
        print(f"BROKEN {time.time()}", flush=True)
      return save(self, step, *args, **kwargs)

    async def fill_disk(self, item, directory):
      if "3.orbax-checkpoint-tmp" in str(directory) and mode == "disk_full":
        print(f"BROKEN {time.time()}", flush=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
      return await write(self, item, directory)

    checkpointing.Checkpointer.save = break_directory
    handler.JsonCheckpointHandler._save_fn = fill_disk
    sys.exit(cli.main(["pretrain", "--config", config]))
""")


@pytest.mark.parametrize("mode", ["directory_replaced_by_file", "disk_full"])
def test_cli_run_whose_checkpoint_write_fails_ends_with_one_line(mode, sp_model_path, tmp_path):
  """`qwen2-jax pretrain` whose step-3 checkpoint cannot be written (the directory became a
  file; the disk filled during the background write) exits 2 within 60 s of the failure with
  one line naming the checkpoint path, the step and the OS error, and no traceback."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"d{i}.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
  out = tmp_path / "run"
  config = {"model": {"preset": "qwen2-tiny", "vocab_size": 416, "num_hidden_layers": 1},
            "tokenizer": str(sp_model_path), "output_dir": str(out), "steps": 8,
            "data": {"sources": [{"kind": "text", "paths": [str(corpus / "*.txt")]}],
                     "seq_len": 32, "batch_size": 4},
            "optim": {"warmup_steps": 0, "decay_steps": 8}, "mesh": {"fsdp": -1},
            "checkpoint_every": 1, "log_every": 1, "progress": False, "export_hf": False,
            "peak_flops": 1e12}
  (tmp_path / "run.json").write_text(json.dumps(config))
  (tmp_path / "driver.py").write_text(_RUN_WITH_FAILING_CHECKPOINT)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  env.pop("QWEN2_JAX_DEBUG", None)
  result = subprocess.run([sys.executable, str(tmp_path / "driver.py"), mode,
                           str(tmp_path / "run.json")], capture_output=True, text=True,
                          timeout=240, env=env)  # a hang fails here instead of hanging CI
  ended = time.time()
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  broken = float(re.search(r"BROKEN (\d+\.\d+)", result.stdout).group(1))
  assert ended - broken < 60
  line = result.stderr.strip().splitlines()[-1]
  reason = "Not a directory" if mode == "directory_replaced_by_file" else "No space left"
  assert line.startswith(f"qwen2-jax pretrain: error: saving checkpoint step 3 to "
                         f"{out / 'checkpoints'} failed: {reason}"), result.stderr[-3000:]


# ----------------------------------------------------------------------------- failed export

def _finished_run(tmp_path):
  model = q.get_preset("qwen2-tiny", num_hidden_layers=1)
  state = types.SimpleNamespace(step=jnp.int32(4), params=q.init_params(model,
                                                                         jax.random.key(0)))
  cfg = types.SimpleNamespace(export_hf=True, output_dir=str(tmp_path), model=model,
                              progress=False)
  run = types.SimpleNamespace(is_main=True, write=lambda record: None)
  result = types.SimpleNamespace(state=state, stopped=None)
  return cfg, run, result


@pytest.mark.parametrize("failing", ["save_hf_checkpoint", "copy_tokenizer_files"])
def test_failed_hf_export_raises_one_line_and_leaves_nothing_half_written(failing, tmp_path,
                                                                          monkeypatch):
  """A disk error while exporting `output_dir/hf` (the weights, or the tokenizer files copied
  after them) raises a CheckpointWriteError naming the path; no half-written file is left:
  no `hf` directory when the weights failed, the complete weights alone when the tokenizer
  copy failed (nothing is deleted after the fact)."""
  def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "hf" / "x"))

  monkeypatch.setattr(loop, failing, disk_full)
  cfg, run, result = _finished_run(tmp_path)
  with pytest.raises(CheckpointWriteError,
                     match=rf"^exporting the HF model to {tmp_path / 'hf'} failed: No space left"):
    loop.finish(cfg, run, result, 4, {}, tokenizer="tokenizer.model")
  if failing == "save_hf_checkpoint":
    assert sorted(os.listdir(tmp_path)) == []
  else:
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


def test_write_error_keeps_internal_errors_as_they_are():
  """Only the disk's and the permissions' errors become user errors."""
  assert checkpointing.write_error("x", TypeError("bug")) is None
  assert checkpointing.write_error("x", OSError(errno.EBADF, "bad fd")) is None
  assert isinstance(checkpointing.write_error("x", PermissionError(errno.EACCES, "denied")),
                    CheckpointWriteError)
  assert isinstance(checkpointing.write_error(
      "x", ValueError("UNKNOWN: writing ... [OS error 28: No space left on device]")),
                    CheckpointWriteError)
