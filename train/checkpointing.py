"""Training checkpoints on Orbax: train state + data-iterator state + settings, async, keep-last-n.

One step directory holds three items: `state` (the `TrainState` pytree, restored straight into
its shardings), `data` (the grain iterator state as JSON) and `meta` (the settings
fingerprint). Orbax writes each step into a temporary directory and renames it only
when complete, so a step that was being written when the process died is never listed or
restored (`cleanup_tmp_directories` removes the leftovers on the next start). Async saves copy
device arrays to host before returning, so the next (donating) train step is safe.

Failures end the run, never hang it. The step directory is created in `save` itself (Orbax's
asynchronous directory creation leaves its writer threads waiting 300 s for a directory that
never comes when creating it fails, and the process cannot exit until they time out), so an
unwritable checkpoint directory raises there; a write that fails in the background (disk full)
is raised by `raise_if_failed` (a non-blocking check the loop makes every step), the next
`save`, `wait` or `close`. An error of the user's disk or permissions (full, read-only, not
writable, not a directory) is a one-line `CheckpointWriteError` naming the checkpoint path, the
step and the OS error; any other error is raised as it is.

`PreemptionGuard` turns SIGTERM (and SIGINT) into a flag the loop polls after each step: the
loop then saves that step, waits for it to commit, and exits cleanly. Orbax's own preemption
hook needs the JAX distributed client, which a single-process run does not have.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import time
from typing import Any

import orbax.checkpoint as ocp

from qwen2_jax.errors import UserError

# OS errors that come from the user's disk or permissions, which the user fixes.
_DISK_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                          errno.ENOTDIR, errno.EISDIR, errno.ENOENT})
# Orbax writes arrays with tensorstore, which reports an OS error as a status line, e.g.
# "PERMISSION_DENIED: ..." or "...: [OS error 28: No space left on device]".
_TENSORSTORE_OS_ERROR = re.compile(r"\[OS error (\d+)|^(PERMISSION_DENIED|RESOURCE_EXHAUSTED|"
                                   r"NOT_FOUND):")
# At most this many changed settings are listed when a resume is refused.
_MAX_LISTED_CHANGES = 12


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint was written by a run with a different model/data/optimizer configuration."""


class CheckpointWriteError(UserError):
  """A checkpoint or export could not be written because of the disk or its permissions."""


def write_error(what: str, error: BaseException) -> CheckpointWriteError | None:
  """`error`, raised while writing `what`, as a one-line `CheckpointWriteError` when the disk
  or its permissions caused it (full, read-only, not writable, not a directory); None when it
  is some other (internal) error."""
  if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
    reason = error.strerror or str(error)
    if error.filename is not None:
      reason += f": {error.filename}"
    return CheckpointWriteError(f"{what} failed: {reason}")
  text = str(error).strip()
  match = _TENSORSTORE_OS_ERROR.search(text)
  if isinstance(error, ValueError) and match and (
      match.group(1) is None or int(match.group(1)) in _DISK_ERRNOS):
    return CheckpointWriteError(f"{what} failed: {text.splitlines()[0]}")
  return None


class _QuietDiskErrors(logging.Filter):
  """Drops Orbax's log records (each with a traceback, from its writer threads) of a disk or
  permission error: the `Checkpointer` raises that error itself, as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or write_error("", error) is None


_QUIET_DISK_ERRORS = _QuietDiskErrors()


class Checkpointer:
  """Saves and restores training checkpoints under `directory/<step>/`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))
    self._saving: int | None = None          # the step of an async save not yet checked
    self._error: Exception | None = None     # the failure already raised (raised again)
    absl_logger = logging.getLogger("absl")  # Orbax logs through absl
    if _QUIET_DISK_ERRORS not in absl_logger.filters:
      absl_logger.addFilter(_QUIET_DISK_ERRORS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def raise_if_failed(self) -> None:
    """Raises the failure of the last asynchronous save, if it has failed; never blocks (the
    training loop calls it every step)."""
    if self._error is not None:
      raise self._error
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self._finish()

  def _finish(self) -> None:
    """Waits for the save in flight (if any); raises its failure."""
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._failed(step, e)

  def _failed(self, step: int | None, error: Exception) -> Exception:
    """`error` of saving `step` as the exception to raise (now and at every later call)."""
    what = f"saving checkpoint step {step} to {self.directory}" if step is not None else \
        f"saving a checkpoint to {self.directory}"
    wrapped = write_error(what, error)
    if wrapped is not None:
      wrapped.__cause__ = error
    self._error = wrapped or error
    return self._error

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None, *,
           fingerprint: dict[str, Any], force: bool = False) -> bool:
    """Starts saving `step` (async); returns whether a save was started."""
    meta = {"fingerprint": fingerprint}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta))
    self.wait()  # a failure of the previous save is reported as that step's
    try:
      started = self._manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._failed(step, e)
    if started:
      self._saving = step
    return started

  def restore(self, step: int, abstract_state: Any, *, fingerprint: dict[str, Any]
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(state, data_state, meta) of `step`; the state lands in `abstract_state`'s
    shardings.

    Raises CheckpointMismatchError if the checkpoint's fingerprint differs from `fingerprint`.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    changes = settings_changes(meta.get("fingerprint", {}), fingerprint)
    if changes:
      raise CheckpointMismatchError(
          f"{self.directory} step {step} was written with different settings: {changes}; use a "
          f"new output_dir or restore the settings")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], meta

  def wait(self) -> None:
    """Blocks until the save in flight has committed; raises its failure."""
    if self._error is not None:
      raise self._error
    self._finish()

  def close(self) -> None:
    """Waits for the save in flight and releases Orbax's threads; raises a failure not raised
    before. Returns promptly after a failure (nothing is left waiting on it)."""
    try:
      if self._error is None:
        self._finish()
    finally:
      if self._error is not None:
        self._settle()
      self._manager.close()

  def _settle(self, timeout_s: float = 30.0) -> None:
    """Waits (a bounded time) for the other writes of a failed save: Orbax stops waiting for
    them at the first failure, and one still running at interpreter exit fails there with an
    error (and traceback) of its own. Orbax has no public handle on them: without its private
    `_commit_futures` (another Orbax version) this does nothing."""
    checkpointer = getattr(self._manager, "_checkpointer", None)
    futures = getattr(getattr(checkpointer, "_async_manager", None), "_commit_futures", None)
    deadline = time.monotonic() + timeout_s
    for f in futures or ():
      try:
        f.result(timeout=max(deadline - time.monotonic(), 0.0))
      except Exception:  # pylint: disable=broad-exception-caught  # its error is already raised
        pass


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf} of nested dicts (a non-dict, or an empty dict, is a leaf)."""
  if not isinstance(tree, dict) or (prefix and not tree):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def settings_changes(saved: dict[str, Any], now: dict[str, Any]) -> str:
  """The settings that differ between two fingerprints, one line: `a.b old -> new, ...`
  (at most `_MAX_LISTED_CHANGES`, then how many more); "" when they are equal."""
  old, new = _flatten(saved), _flatten(now)
  absent = object()
  show = lambda v: "(absent)" if v is absent else json.dumps(v)
  changed = [f"{k} {show(old.get(k, absent))} -> {show(new.get(k, absent))}"
             for k in sorted(set(old) | set(new)) if old.get(k, absent) != new.get(k, absent)]
  if len(changed) > _MAX_LISTED_CHANGES:
    changed[_MAX_LISTED_CHANGES:] = [f"and {len(changed) - _MAX_LISTED_CHANGES} more"]
  return ", ".join(changed)


def fingerprint_of(**parts: Any) -> dict[str, Any]:
  """A JSON-able summary of what must match between the saving and the resuming run."""
  return json.loads(json.dumps(parts, sort_keys=True, default=str))


class PreemptionGuard:
  """Records SIGTERM/SIGINT instead of dying; the training loop polls `.requested`."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested: str | None = None
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass

  def _handle(self, signum, frame):
    self.requested = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
