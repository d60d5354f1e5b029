"""Running the real command line in a subprocess (`python -m stepdistill`, the tree under test first on the path)
and checking that a failure is one line naming its culprit, with the documented exit code."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "stepdistill" / "assets"
DIGITS_TEACHER = ASSETS / "digits_teacher"
DIGITS_PROMPTS = ASSETS / "configs" / "digits_prompts.txt"
DMD2_DIGITS_CONFIG = ASSETS / "configs" / "dmd2_digits.yaml"


def cli_env(**extra: str) -> dict:
    """One thread, offline, no GPU (the CPU-only checks hold on any machine), no progress bars unless asked."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "stepdistill", *map(str, args)]


# Execs the command it is given with SIGINT at its default: a caller that ignores SIGINT (a shell's background job
# starts so) passes that on, and Python turns only a default SIGINT into KeyboardInterrupt. (A preexec_fn would do
# the same between fork and exec, which is unsafe in a process with threads.)
DEFAULT_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


@contextlib.contextmanager
def started(cmd: list[str], **popen) -> Iterator[subprocess.Popen]:
    """A process for a test to signal: SIGINT at its default, in a session of its own, and killed with everything
    it started when the block ends while it still runs (a failed test leaves nothing behind)."""
    with subprocess.Popen([sys.executable, "-c", DEFAULT_SIGINT, *cmd], start_new_session=True, **popen) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def run_cli(*args: object, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(**env), capture_output=True, text=True,
                          check=False, timeout=timeout)


def assert_fails(proc: subprocess.CompletedProcess, code: int, *culprits: str) -> str:
    """The command failed with `code`, printed no traceback and nothing on stdout, and its last stderr line is one
    `stepdistill:` line holding every culprit; returns that line."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stepdistill: error: " if code == 2 else "stepdistill: "), last
    for culprit in culprits:
        assert culprit in last, f"{culprit!r} not in {last!r}"
    return last
