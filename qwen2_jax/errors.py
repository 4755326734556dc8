"""The base class of errors in what a user gave: a setting, a file, a path, a request.

The command line prints such an error as one line, `qwen2-jax <command>: error: <message>`, and
exits with status 2; any other exception is an internal error and keeps its traceback. So every
error a user can cause and fix derives from `UserError`, and its message names what to fix: the
parameter (as its dotted path), the file and, where known, the line.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input from the user; the message alone (no traceback) tells them what to fix."""
