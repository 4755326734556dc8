"""Writing a checkpoint directory like a careful Unix tool: complete-then-rename, and never
removing a file the writer did not produce.

A save writes into a fresh staging directory beside the target (`.<name>.tmp-<token>`, made with
`os.mkdir`, so it gets the user's umask, not `mkdtemp`'s 0700) and renames it onto the target only
when complete; a failed save removes only its staging directory. Overwriting an existing target
is allowed only when every entry in it is a name the writer owns (`owned`); anything else (a
README, a notes file, another format's weights) makes the save refuse up front, naming that file,
before anything is written. Owned files that the writer does not produce itself but that belong
with the checkpoint (`keep`, e.g. tokenizer files) are hard-linked into the new directory, the old
directory is swapped out, and its entries are then removed by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from typing import Callable

from qwen2_jax.checkpoint.checks import OutputExistsError


def check_target(target: str, *, overwrite: bool, owned: Callable[[str], bool],
                 writer: str) -> list[str]:
  """The entries of an existing `target` (none when absent); raises `OutputExistsError` when
  the save must not proceed: `target` is not a directory, holds entries and `overwrite` is off,
  or holds an entry `owned` rejects."""
  if not os.path.lexists(target):
    return []
  if not os.path.isdir(target):
    raise OutputExistsError(f"{target}: exists and is not a directory")
  names = sorted(os.listdir(target))
  if names and not overwrite:
    raise OutputExistsError(f"{target}: exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace it")
  foreign = [n for n in names if not owned(n)]
  if foreign:
    raise OutputExistsError(
        f"{os.path.join(target, foreign[0])}: not a file {writer} writes"
        f"{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}; refusing to overwrite "
        f"{target} (move it away, or save elsewhere)")
  return names


def new_token() -> str:
  return secrets.token_hex(4)


def staging_path(target: str, token: str) -> str:
  return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{token}")


def make_staging(target: str, token: str) -> str:
  """Creates the staging directory of `target` (and its parent): mode 0777 less the umask."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  path = staging_path(target, token)
  os.mkdir(path)
  return path


def discard(staging: str) -> None:
  """Removes a staging directory (everything in it was written by this save)."""
  shutil.rmtree(staging, ignore_errors=True)


def commit(staging: str, target: str, *, owned: Callable[[str], bool],
           keep: Callable[[str], bool], writer: str) -> None:
  """Moves the complete `staging` directory to `target` (see the module docstring)."""
  parent = os.path.dirname(target)
  if not os.path.lexists(target):
    os.rename(staging, target)
    _fsync_dir(parent)
    return
  # Checked again: a file may have appeared since the save started.
  names = check_target(target, overwrite=True, owned=owned, writer=writer)
  for name in names:
    if keep(name) and not os.path.lexists(os.path.join(staging, name)):
      try:
        os.link(os.path.join(target, name), os.path.join(staging, name))
      except OSError:  # a filesystem without hard links
        shutil.copy2(os.path.join(target, name), os.path.join(staging, name))
  shutil.copymode(target, staging)  # the directory keeps the permissions the user gave it
  old = os.path.join(parent, f".{os.path.basename(target)}.old-{new_token()}")
  os.rename(target, old)
  os.rename(staging, target)
  _fsync_dir(parent)
  for name in os.listdir(old):
    path = os.path.join(old, name)
    if not owned(name):  # appeared after the check above: leave it for the user
      continue
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.unlink(path)
  try:
    os.rmdir(old)
  except OSError:
    print(f"{writer}: {old} holds files that appeared while {target} was replaced; they are "
          "left there", file=sys.stderr)


def _fsync_dir(path: str) -> None:
  """Makes a rename in `path` durable (best effort: not every platform can open a directory)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
