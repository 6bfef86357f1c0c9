"""Starting and stopping the processes a test needs, with bounded waits.

A process announces readiness by printing a line on stdout (``listening on
ws://HOST:PORT`` for wsgate and the Node servers); tests never sleep to
synchronise. Every process is started in its own session so that stop()
can signal it (and only it) and is always killed at the end.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

LISTENING_RE = re.compile(r"^listening on (wss?)://(\S+):(\d+)$")


class ProcessError(AssertionError):
    pass


class Proc:
    """A child process whose stdout lines are collected by a reader thread and
    whose stderr goes to a log file (shown when something goes wrong)."""

    def __init__(self, argv: Sequence[str], name: str, log_dir: Path, env=None, cwd=None):
        self.argv = [str(a) for a in argv]
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.stdout_lines: list[str] = []
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self):
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.stdout_lines.append(line)
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stderr_text(self, limit: int = 8000) -> str:
        try:
            if not self._log.closed:
                self._log.flush()
            data = self.log_path.read_bytes()
        except (OSError, ValueError):
            return ""
        text = data.decode("utf-8", "replace")
        return text[-limit:]

    def describe(self) -> str:
        return (
            f"{self.name}: {' '.join(self.argv)}\n  returncode={self.popen.poll()}\n"
            f"  stdout: {self.stdout_lines[-20:]}\n  stderr (tail):\n{self.stderr_text()}"
        )

    def wait_lines(self, pattern: re.Pattern, count: int = 1, timeout: float = 15.0) -> list[re.Match]:
        """Wait for `count` stdout lines matching `pattern`; fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        found: list[re.Match] = []
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessError(f"timed out after {timeout}s waiting for {pattern.pattern!r}\n{self.describe()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=5)
                raise ProcessError(f"exited before printing {pattern.pattern!r}\n{self.describe()}")
            m = pattern.match(line)
            if m:
                found.append(m)
        return found

    def send_signal(self, sig: int):
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal the process (then SIGKILL its process group after `timeout`)."""
        if self.popen.poll() is None:
            self.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=5)
        else:
            # The leader has gone; make sure nothing it left behind survives.
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._reader.join(timeout=2)
        self._log.close()
        return self.popen.returncode


class ProcessGroup:
    """Owns the processes of one test; stop_all() runs in a fixture finalizer."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._n = 0

    def start(self, argv: Sequence[str], name: str, **kw) -> Proc:
        self._n += 1
        p = Proc(argv, f"{self._n:02d}-{name}", self.log_dir, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            try:
                p.stop(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass

    def describe_all(self) -> str:
        return "\n".join(p.describe() for p in self.procs)


class Listener:
    def __init__(self, scheme: str, host: str, port: int):
        self.scheme, self.host, self.port = scheme, host, port

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Listener({self.url})"


def wait_listeners(proc: Proc, count: int = 1, timeout: float = 15.0) -> list[Listener]:
    matches = proc.wait_lines(LISTENING_RE, count=count, timeout=timeout)
    return [Listener(m.group(1), m.group(2), int(m.group(3))) for m in matches]


def run_json(argv: Iterable[str], timeout: float, cwd=None) -> tuple[dict, str]:
    """Run a helper that prints a JSON result as its last stdout line."""
    import json

    argv = [str(a) for a in argv]
    # Own session, so that a timeout kills the helper and everything it started
    # (Chromium under playwright-core).
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = p.communicate(timeout=10)
        raise ProcessError(f"{' '.join(argv)} did not finish in {timeout}s; stdout={stdout[-2000:]!r} stderr={stderr[-2000:]!r}")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    cp = subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)
    out = cp.stdout.decode("utf-8", "replace")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if not lines:
        raise ProcessError(f"{' '.join(argv)} printed nothing (rc={cp.returncode}); stderr={cp.stderr.decode(errors='replace')}")
    try:
        return json.loads(lines[-1]), out + cp.stderr.decode("utf-8", "replace")
    except ValueError:
        raise ProcessError(f"{' '.join(argv)}: last line is not JSON (rc={cp.returncode}): {out[-2000:]} {cp.stderr[-2000:]!r}")
