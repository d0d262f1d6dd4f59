"""The errors a program turns into one line and an exit status (see ``cli.common.run_program``),
by type, never by message text:

- :class:`UserError` (exit 2, as argparse): the user asked for something the program cannot do.
  :class:`ConfigError` names a config key, :class:`UsageError` a command-line option, a file or a
  value given to a program. Both are ``ValueError``\\ s, so code that caught those still does.
- :class:`Failure` (exit 1): the run failed for a reason the message states fully (a truncated
  checkpoint, a full disk, a non-finite loss); no traceback would add to it.

Anything else is a bug: its traceback is logged (into ``train.log`` too) and the exit status is 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's, not of the program: exit status 2, one line."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the key."""


class UsageError(UserError, ValueError):
    """A command-line option, a file argument or a value given to a program that it cannot use; the
    message names it."""


class Failure(RuntimeError):
    """A run that failed for a reason its one-line message states (exit status 1, no traceback)."""


class CheckpointError(Failure):
    """A checkpoint that cannot be read (truncated, or not a checkpoint); the message names the file."""


class DiskFullError(Failure, OSError):
    """A write that ran out of space; the message names the file and says 'No space left on device'."""
