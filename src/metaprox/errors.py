"""The one error path of the ``metaprox`` command: which exceptions are the user's to fix, and the exit codes.

Exit codes (also in the README, "Command line"):

- ``0`` — done.
- ``2`` — a problem the user can fix before anything runs (or that stops a run cleanly): a config key, a data file
  (and row), a run directory (busy, not one, not writable), a checkpoint. One ``metaprox: error: ...`` line (or a
  first line and one indented line per problem, when the config validation finds several) saying what is wrong
  and what to do.
- ``3`` — training diverged (a NaN/inf loss, meta-gradient or parameter); the run directory keeps its last finite
  checkpoint and the message says which step and parameter went bad.
- ``1`` with a traceback — a bug in metaprox (please report it).
"""

from __future__ import annotations

import errno

__all__ = ["UserError", "EXIT_USER", "EXIT_DIVERGED", "user_error_message"]

EXIT_USER = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A problem the user fixes (its message names the key, file or value and what to do): exit code 2."""


def _os_message(e: OSError) -> str:
    where = f" {str(e.filename)!r}" if e.filename else ""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        return f"no space left on the device writing{where}; free some space (nothing half-written is kept)."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {what}; choose a writable --out (or fix its permissions)."
    return f"{what}:{where}." if where else f"{what}."


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback).

    User errors: :class:`UserError`, the config/checkpoint/data errors (``ConfigError``, ``CheckpointError``,
    ``DatasetLayoutError``, ``ChecksumError``), the ``ValueError``/``TypeError``/``KeyError`` raised on bad
    arguments, and the operating system's refusals (``OSError``: permissions, a full disk, a file where a folder
    should be) — which name their file.
    """
    from metaprox.checkpoint import CheckpointError

    if isinstance(e, (UserError, CheckpointError, ValueError, TypeError, KeyError)):
        return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError):
        from metaprox.data.labelled import DatasetLayoutError

        return str(e) if isinstance(e, DatasetLayoutError) else _os_message(e)
    return None
