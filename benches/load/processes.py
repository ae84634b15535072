"""The servers of the benchmark: started pinned on free loopback ports, watched, and always
stopped (on success, error, Ctrl-C or SIGTERM) by the `Servers` context manager."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .parse import proc_stat_fields


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[load] {message}", file=sys.stderr, flush=True)


def free_ports(count: int) -> List[int]:
    """`count` distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def children(pid: int) -> List[int]:
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(proc_stat_fields((entry / "stat").read_text())[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return proc_stat_fields(Path(f"/proc/{pid}/stat").read_text())[0] != "Z"
    except OSError:
        return False


def _raise_exit(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP handler: unwind like Ctrl-C does, so every guard runs."""
    log(f"stopping on signal {signal.Signals(signum).name}")
    raise SystemExit(128 + signum)


class Servers:
    """Starts servers, knows every pid of each role, and stops them all on exit."""

    def __init__(self, tmp: Path, pin: Sequence[str]):
        self.tmp = tmp
        self.pin = list(pin)
        self.main: Dict[str, subprocess.Popen] = {}
        self.role_pids: Dict[str, List[int]] = {}
        self._extra: List[int] = []  # pids we did not spawn ourselves (nginx workers)

    def __enter__(self) -> "Servers":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_exit)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop_all()
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.show_logs()

    def start(self, role: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> None:
        """Starts `argv` pinned to the server cores, output in tmp/ROLE.out and tmp/ROLE.err;
        its own session, so Ctrl-C reaches the benchmark, which stops it in order."""
        with open(self.tmp / f"{role}.out", "wb") as out, open(self.tmp / f"{role}.err", "wb") as err:
            try:
                proc = subprocess.Popen(self.pin + list(argv), stdout=out, stderr=err, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                raise BenchError(f"cannot start {role} ({argv[0]}): {e}") from e
        self.main[role] = proc
        self.role_pids[role] = [proc.pid]

    def add_children(self, role: str) -> None:
        """Counts the children of the role's process (nginx's worker) as part of the role."""
        for _ in range(100):
            workers = children(self.main[role].pid)
            if workers:
                self.role_pids[role] += workers
                self._extra += workers
                return
            time.sleep(0.05)
        raise BenchError(f"{role} has no worker process")

    def wait_port(self, role: str, port: int, timeout: float = 20.0) -> None:
        """Waits until 127.0.0.1:`port` accepts connections; fails if the role's process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.main[role].poll() is not None:
                raise BenchError(f"{role} exited at start-up (its log is above)")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{role} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")

    def check_alive(self) -> None:
        """Every server still runs: a crash is an error, never skipped."""
        for role, pids in self.role_pids.items():
            for pid in pids:
                if not alive(pid):
                    raise BenchError(f"{role} (pid {pid}) died during the benchmark")

    def stop_all(self) -> None:
        """SIGTERM to every process, newest first; SIGKILL to any still there after 5 s."""
        pids = [p.pid for p in self.main.values()] + self._extra
        for pid in reversed(pids):
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.main.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self._extra:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                self._signal(pid, signal.SIGKILL)
        self.main.clear()
        self._extra.clear()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        """Sends `sig` to `pid` if it still exists."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def show_logs(self) -> None:
        """After a failure: the last lines of every server's stderr and nginx error log."""
        for path in sorted(self.tmp.glob("*.err")) + sorted(self.tmp.glob("*/error.log")):
            text = path.read_text(errors="replace").splitlines()
            if text:
                print(f"[load] --- last lines of {path.relative_to(self.tmp)} ---", file=sys.stderr)
                print("\n".join(text[-15:]), file=sys.stderr)
