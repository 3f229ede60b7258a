"""Child processes that are always cleaned up: the launcher's and the tests' one tool.

A vLLM instance is a tree of processes (API server, EngineCore, workers). Each child started
here leads a new session, so stopping it signals the whole tree at once; a child also gets
SIGTERM if its parent dies (Linux ``PR_SET_PDEATHSIG``), so a killed launcher leaves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from pdserve.protocol.net import free_port, port_in_use

__all__ = [
    "ManagedProcess",
    "free_port",
    "http_ok",
    "managed",
    "pdserve_argv",
    "port_in_use",
    "wait_until",
]

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: ask the kernel for SIGTERM when the parent exits."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A child process tree with a name, a log file and a guaranteed stop."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The log's last ``lines``, preceded by its first traceback when that is earlier.

        vLLM's engine core logs its root cause first and a chain of "see root cause above"
        wrappers after it, so the tail alone rarely says why a start failed.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        all_lines = text.splitlines()
        tail = all_lines[-lines:]
        first = next((i for i, line in enumerate(all_lines) if "Traceback" in line), None)
        if first is None or first >= len(all_lines) - lines:
            return "\n".join(tail)
        cause = all_lines[first : first + lines]
        return "\n".join([*cause, "[...]", *tail])

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the whole tree, SIGKILL after ``grace_s``; returns the exit code."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # Grandchildren may outlive the leader; the group is killed in any case.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def restarted(self) -> ManagedProcess:
        """The same command started again (after this one exited), logging to the same file."""
        self.stop(grace_s=0)
        return ManagedProcess(self.name, self.argv, self.log_path, self.env, self.cwd)

    def kill(self) -> None:
        """SIGKILL to the whole tree at once (failure injection)."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def http_ok(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> bool:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    watched: Sequence[ManagedProcess] = (),
    interval_s: float = 0.5,
) -> None:
    """Polls ``ready`` until it holds; fails fast if a watched process dies meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        for proc in watched:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with code {proc.proc.returncode} while waiting for "
                    f"{what}; last lines of {proc.log_path}:\n{proc.log_tail()}"
                )
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def pdserve_argv(*args: str) -> list[str]:
    """Runs the ``pdserve`` command of this interpreter, whatever is on PATH."""
    return [sys.executable, "-m", "pdserve.cli", *args]


@contextlib.contextmanager
def managed(*procs: ManagedProcess) -> Iterator[tuple[ManagedProcess, ...]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
