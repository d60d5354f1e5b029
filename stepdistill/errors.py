"""The command line's error boundary: every exception becomes an exit code and one line for the user.

Exit codes: 2 the input cannot work (ConfigError and the other ValueErrors the package raises for bad values,
missing or unusable paths); 128 + signal when interrupted (130 Ctrl-C, 143 SIGTERM); 1 a failure while running
(a full disk, a diverged run, anything unexpected: `--debug` prints the traceback). Failures while training say
what is saved (the last checkpoint)."""
from __future__ import annotations

import errno
import signal
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# OS errors about a path the user gave (missing, not a folder, no permission, read-only)
INPUT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST)


class RunFailed(RuntimeError):
    """A failure while running whose message is written for the user (a diverged run, a failed export)."""


class Stopped(KeyboardInterrupt):
    """A signal stopped the command (a KeyboardInterrupt, so `except Exception` in library code lets it pass and
    cleanups run); `message` says where it stopped."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message


def note_saved(error: BaseException, output_dir: str | Path) -> None:
    """Record on `error` what a failed or interrupted training left to continue from."""
    from stepdistill.training.checkpoint import list_checkpoints

    try:
        found = list_checkpoints(Path(output_dir))
    except OSError:
        return
    error.stepdistill_saved = (f"the last checkpoint is {found[-1]} (continue with train.resume=latest)" if found
                               else "no checkpoint was written; temporary files were removed")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    text = str(error)  # safetensors reports I/O errors in its own exception type
    return "No space left on device" in text or "StorageFull" in text or "File too large" in text


def describe(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of an exception that ended a command."""
    saved = getattr(error, "stepdistill_saved", "")
    if isinstance(error, Stopped):
        return 128 + error.signum, f"{error.message}{'; ' + saved if saved else ''}"
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT, f"interrupted (Ctrl-C){'; ' + saved if saved else ''}"
    line = _first_line(error)
    if _disk_full(error):
        where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
        return EXIT_FAILED, (f"no space left on the device{where} ({line}): free space or choose a folder on another "
                             f"disk{'; ' + saved if saved else ''}")
    if isinstance(error, OSError) and error.errno in INPUT_ERRNOS:
        return EXIT_BAD_INPUT, f"{error.filename}: {error.strerror}" if error.filename else line
    if isinstance(error, ValueError) or (isinstance(error, OSError) and error.errno is None):
        return EXIT_BAD_INPUT, line  # ConfigError and the package's other messages about values and files
    if isinstance(error, RunFailed):
        return EXIT_FAILED, f"{line}{'; ' + saved if saved else ''}"
    return EXIT_FAILED, (f"internal error ({type(error).__name__}: {line}){'; ' + saved if saved else ''}; rerun "
                         "with --debug for the traceback, and report it")
