"""The training loop of every job (`train.runner.run`: pretraining, SFT, DPO).

One loop serves every job: step; log (progress bar, `metrics.jsonl`, TensorBoard); evaluate every
`eval_every` steps; checkpoint every `checkpoint_every` steps and at the end; on SIGTERM/SIGINT
save the current step, wait for it to commit and stop; then export HF safetensors. A job
supplies its batches, its jitted step, the metric names it logs and, optionally, an evaluation
function; the loop reads its settings from the run config (`nonfinite`, `log_every`,
`checkpoint_every`, `eval_every`, `export_hf`, `output_dir`, `progress`, `peak_flops`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen2_jax import flops
from qwen2_jax.checkpoint.hf import save_hf_checkpoint
from qwen2_jax.tokenizer import copy_tokenizer_files
from qwen2_jax.train import checkpointing, metrics as metrics_lib, step as step_lib

NONFINITE_MODES = ("skip", "abort")


class NonFiniteError(FloatingPointError):
  """The loss or gradient was not finite and `nonfinite: abort` was set."""


def host_params(params):
  """Params as host numpy on process 0 (gathered across processes when needed)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)
  return params


def sum_eval_outputs(eval_fn: Callable[[dict[str, Any]], dict[str, jax.Array]],
                     batches: Iterable[dict[str, Any]], max_batches: int | None
                     ) -> dict[str, float]:
  """Sums each output of `eval_fn` (replicated scalars) over up to `max_batches` batches."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    for k, v in step_lib.metrics_to_host(eval_fn(batch)).items():
      totals[k] = totals.get(k, 0.0) + v
  return totals


def lm_eval_result(sums: dict[str, float]) -> dict[str, float]:
  """eval/loss (mean nll over the weighted tokens), eval/perplexity, eval/tokens."""
  tokens = sums.get("tokens", 0.0)
  loss = sums.get("loss_sum", 0.0) / max(tokens, 1.0)
  return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0))),
          "eval/tokens": tokens}


class RunLog:
  """The outputs of one run: `metrics.jsonl` and TensorBoard (process 0), the progress bar, the
  preemption guard and the checkpointer; `close()` releases them all."""

  def __init__(self, cfg, ckpt: checkpointing.Checkpointer, *, steps: int, start: int):
    self.ckpt = ckpt
    self.is_main = jax.process_index() == 0
    out = cfg.output_dir
    main = self.is_main
    self.jsonl = metrics_lib.JsonlLog(os.path.join(out, "metrics.jsonl")) if main else None
    self.tb = metrics_lib.TensorBoardWriter(os.path.join(out, "tensorboard")) if main else None
    self.guard = checkpointing.PreemptionGuard()
    self.bar = metrics_lib.Progress(steps, start, enabled=cfg.progress and self.is_main)

  def write(self, record: dict[str, Any]) -> None:
    if self.is_main:
      self.jsonl.write(record)

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if self.is_main:
      self.tb.scalars(step, values)

  def note(self, text: str) -> None:
    self.bar.note(text)

  def close(self) -> None:
    """Releases everything; the logs are closed even when closing the checkpointer raises
    (e.g. a failed asynchronous save), and that error then ends the run."""
    self.bar.close()
    self.guard.restore()
    try:
      self.ckpt.close()
    finally:
      if self.is_main:
        self.jsonl.close()
        self.tb.close()


@dataclasses.dataclass
class LoopResult:
  state: Any                           # the TrainState after the last step taken
  first: dict[str, Any] | None         # the first logged record of this process's run
  last: dict[str, Any]                 # the last logged record ({} if none)
  stopped: str | None                  # "SIGTERM" / "SIGINT" when preempted, else None


def _eval_note(step_number: int, result: dict[str, float]) -> str:
  if "eval/perplexity" in result:
    return (f"step {step_number}: eval loss {result['eval/loss']:.4f} "
            f"ppl {result['eval/perplexity']:.2f}")
  return f"step {step_number}: eval " + " ".join(f"{k[5:]} {v:.4g}" for k, v in result.items())


def train_loop(cfg, run: RunLog, *, state, start: int, steps: int,
               next_batch: Callable[[], dict[str, Any]],
               train_step: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, jax.Array]]],
               data_state: Callable[[], Any], schedule: Callable[[int], Any],
               fingerprint: dict[str, Any], tokens_per_step: int, flops_per_token: float,
               metric_names: tuple[str, ...] = (),
               evaluate: Callable[[Any], dict[str, float]] | None = None,
               updates_per_step: int = 1) -> LoopResult:
  """Steps `start + 1 .. steps`; returns once every checkpoint it started has committed.

  Args:
    next_batch: the next global batch, already placed on the mesh.
    train_step: (state, batch) -> (state, metrics with loss, grad_norm, finite, metric_names).
    data_state: the data position to store in a checkpoint (JSON-able).
    evaluate: state -> {"eval/...": value}, called every `cfg.eval_every` steps (0: never).
    updates_per_step: optimizer updates per step (an online job's round takes several); the
      logged lr is the last update's.
  """
  peak = cfg.peak_flops or flops.peak_flops_for_devices(jax.devices())
  window_start, window_tokens, first, last, stopped = time.perf_counter(), 0.0, None, {}, None
  eval_every = cfg.eval_every if evaluate is not None else 0

  def save(step_number, force=False):
    run.ckpt.save(step_number, state, data_state(), fingerprint=fingerprint, force=force)

  for step in range(start, steps):
    state, out = train_step(state, next_batch())
    run.ckpt.raise_if_failed()  # a failed background save ends the run now, not at the next save
    step_number = step + 1
    must_log = step_number % cfg.log_every == 0 or step_number == steps
    if cfg.nonfinite == "abort" or must_log:
      values = step_lib.metrics_to_host(out)
      if cfg.nonfinite == "abort" and not values["finite"]:
        raise NonFiniteError(f"step {step_number}: loss={values['loss']} grad_norm="
                             f"{values['grad_norm']} (nonfinite: abort; the update was not "
                             f"applied)")
    window_tokens += tokens_per_step
    if must_log:
      tokens_per_s = window_tokens / (time.perf_counter() - window_start)
      record = {"step": step_number, "loss": values["loss"], "grad_norm": values["grad_norm"],
                **{k: values[k] for k in metric_names},
                "lr": float(schedule(max(step_number * updates_per_step
                                         - int(state.skipped) - 1, 0))),
                "skipped": int(state.skipped), "tokens_per_s": tokens_per_s,
                "mfu": (flops_per_token * tokens_per_s / (peak * jax.device_count())
                        if peak else None)}
      first = record if first is None else first
      last = record
      window_start, window_tokens = time.perf_counter(), 0.0
      run.write(record)
      run.scalars(step_number, {f"train/{k}": v for k, v in record.items()
                                if k != "step" and v is not None})
      run.bar.update(step_number, record)
    if eval_every and step_number % eval_every == 0:
      result = evaluate(state)
      run.write({"step": step_number, **result})
      run.scalars(step_number, result)
      run.note(_eval_note(step_number, result))
    if run.guard.requested:
      save(step_number, force=True)
      run.ckpt.wait()
      stopped = run.guard.requested
      run.note(f"{stopped}: saved step {step_number}, exiting")
      break
    if step_number % cfg.checkpoint_every == 0 or step_number == steps:
      save(step_number)
  run.ckpt.wait()
  return LoopResult(state, first, last, stopped)


def finish(cfg, run: RunLog, result: LoopResult, steps: int, summary: dict[str, Any], *,
           tokenizer: str | None = None) -> dict[str, Any]:
  """Exports `output_dir/hf` when the run completed (with the tokenizer files of `tokenizer`,
  when given), writes the summary to `metrics.jsonl` and returns it."""
  state = result.state
  if cfg.export_hf and result.stopped is None and int(state.step) == steps:
    params = host_params(state.params)
    if run.is_main:
      path = os.path.join(cfg.output_dir, "hf")
      # save_hf_checkpoint is all-or-nothing, and each tokenizer file is copied whole then
      # renamed; a failure is reported (one line for disk errors) and nothing is deleted.
      try:
        save_hf_checkpoint(path, cfg.model, params, overwrite=True, show_progress=cfg.progress)
        if tokenizer is not None:
          copy_tokenizer_files(tokenizer, path)
      except BaseException as e:
        error = checkpointing.write_error(f"exporting the HF model to {path}", e)
        if error is None:
          raise
        raise error from e
      summary["hf_export"] = path
  run.write({"summary": summary})
  return summary
