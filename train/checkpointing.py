"""Training checkpoints on Orbax: train state + data-iterator state + RNG, async, keep-last-n.

One step directory holds three items: `state` (the `TrainState` pytree, restored straight into
its shardings), `data` (the grain iterator state as JSON) and `meta` (RNG key data, the config
fingerprint, counters). Orbax writes each step into a temporary directory and renames it only
when complete, so a step that was being written when the process died is never listed or
restored (`cleanup_tmp_directories` removes the leftovers on the next start). Async saves copy
device arrays to host before returning, so the next (donating) train step is safe; a failure
in the background surfaces at the next save or at `wait`.

`PreemptionGuard` turns SIGTERM (and SIGINT) into a flag the loop polls after each step: the
loop then saves that step, waits for it to commit, and exits cleanly. Orbax's own preemption
hook needs the JAX distributed client, which a single-process run does not have.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by a run with a different model/data/optimizer configuration."""


class Checkpointer:
  """Saves and restores training checkpoints under `directory/<step>/`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any] | None, *,
           rng: jax.Array, fingerprint: dict[str, Any], extra: dict[str, Any] | None = None,
           force: bool = False) -> bool:
    """Starts saving `step` (async); returns whether a save was started."""
    meta = {"rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "rng_impl": str(jax.random.key_impl(rng)), "fingerprint": fingerprint,
            **(extra or {})}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any, *, fingerprint: dict[str, Any]
              ) -> tuple[Any, dict[str, Any], jax.Array, dict[str, Any]]:
    """(state, data_state, rng, meta) of `step`; the state lands in `abstract_state`'s shardings.

    Raises CheckpointMismatchError if the checkpoint's fingerprint differs from `fingerprint`.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("fingerprint", {})
    diffs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if diffs:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} was written with different settings: "
          + "; ".join(f"{k}: saved {saved.get(k)!r}, now {fingerprint.get(k)!r}" for k in diffs))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    key_data = np.asarray(meta["rng"], dtype=np.uint32)
    rng = jax.random.wrap_key_data(key_data, impl=meta.get("rng_impl", "threefry2x32"))
    return restored["state"], restored["data"], rng, meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
