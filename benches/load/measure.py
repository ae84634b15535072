"""Measuring: wrk runs, /proc and Redis samples around them, peak RSS, the MONITOR calibration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from . import parse
from .processes import BenchError, Servers, log
from .scenarios import (IDEM_DISK, IDEM_JSON, IDEM_MEM, IDEM_MEM_BASE, IDEM_REDIS, IDEM_REDIS_BASE, IDEM_REPL0,
                        IDEM_REPL1, NGINX)
from .servers import keyed_post

# Roles whose peak RSS is recorded per run (reset before, read after), those of the run that exist.
PEAK_ROLES = (IDEM_REDIS, IDEM_MEM, NGINX, IDEM_REDIS_BASE, IDEM_MEM_BASE, IDEM_REPL0, IDEM_REPL1, IDEM_JSON,
              IDEM_DISK)
# The Redis whose commands a variant that uses none counts (its figures are not shown).
DEFAULT_REDIS = "redis"


def counted_redis(role_kinds: Mapping[str, str], primaries: Sequence[str]) -> List[str]:
    """The Redis primaries (roles of `primaries`) that serve a variant (`role_kinds`: role ->
    kind), whose commandstats its run counts: the benchmark's own Redis, or the replicated
    primary (not its replica: it only repeats the primary's writes); the benchmark's own when the
    variant uses no Redis."""
    return [role for role, kind in role_kinds.items() if kind == "redis" and role in primaries] or [DEFAULT_REDIS]


class Sampler:
    """Samples of the servers' CPU ticks, the cores' /proc/stat and Redis' commandstats."""

    def __init__(self, servers: Servers, redis_clis: Mapping[str, List[str]]):
        self.servers = servers
        self.redis_clis = dict(redis_clis)
        self.peak_roles = [role for role in PEAK_ROLES if role in servers.role_pids]

    def ticks(self, role: str) -> Tuple[int, int]:
        """(utime + stime, utime) of every process of `role`, in clock ticks."""
        total = user = 0
        for pid in self.servers.role_pids[role]:
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError as e:
                raise BenchError(f"{role} (pid {pid}) died during the benchmark") from e
            total += parse.proc_ticks(text)
            user += parse.proc_user_ticks(text)
        return total, user

    def redis_for(self, role_kinds: Mapping[str, str]) -> List[str]:
        """The Redis roles whose commands a variant's run counts (counted_redis)."""
        return counted_redis(role_kinds, list(self.redis_clis))

    def sample(self, redis_roles: Sequence[str] = (DEFAULT_REDIS,)) -> dict:
        """{"ticks": role -> utime + stime ticks, "uticks": role -> utime ticks, "stat": core ->
        (busy, total), "redis": command -> calls}, the calls summed over the Redis `redis_roles`."""
        calls: Dict[str, int] = {}
        for role in redis_roles:
            info = subprocess.run(self.redis_clis[role] + ["info", "commandstats"], capture_output=True, text=True)
            if info.returncode != 0:
                raise BenchError(f"redis-cli info commandstats ({role}) failed: {info.stderr.strip()}")
            for command, n in parse.commandstats(info.stdout).items():
                calls[command] = calls.get(command, 0) + n
        ticks = {role: self.ticks(role) for role in self.servers.role_pids}
        return {
            "ticks": {role: both for role, (both, _) in ticks.items()},
            "uticks": {role: user for role, (_, user) in ticks.items()},
            "stat": parse.cpu_times(Path("/proc/stat").read_text()),
            "redis": calls,
        }

    def reset_peaks(self) -> None:
        """Resets VmHWM of the recorded roles (clear_refs 5), so a peak is per run."""
        for role in self.peak_roles:
            for pid in self.servers.role_pids[role]:
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                except OSError:
                    pass  # not permitted: the peak is then since start-up

    def peaks(self) -> Dict[str, int]:
        """role -> VmHWM (KiB) summed over the role's processes."""
        return {role: sum(parse.vm_hwm_kib(Path(f"/proc/{pid}/status").read_text())
                          for pid in self.servers.role_pids[role]) for role in self.peak_roles}


class Wrk:
    """wrk with the benchmark's scripts, on the load cores."""

    def __init__(self, wrk: str, scripts: Path, pin: Sequence[str], threads: int, conns: int):
        self.argv = list(pin) + [wrk, f"-t{threads}", f"-c{conns}"]
        self.scripts = scripts
        self.env = dict(os.environ, WRK_LIB=str(scripts / "common.lua"))

    def run(self, out: Path, url: str, script: str, seconds: int, args: Sequence[str]) -> str:
        """Runs wrk for `seconds`, keeps its output in `out`; fails loudly, returns the output."""
        argv = self.argv + [f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(self.scripts / script),
                            url, "--", *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env)
        out.write_text(done.stdout + done.stderr)
        if done.returncode != 0 or "BENCH " not in done.stdout:
            sys.stderr.write(done.stdout + done.stderr)
            raise BenchError(f"wrk failed on {url} ({script}): exit {done.returncode}, "
                             f"{'no' if 'BENCH ' not in done.stdout else 'a'} BENCH result line")
        return done.stdout


def progress_line(bench: Dict[str, int], group: str, variant: str, round_: int) -> str:
    """One run's figures, for the progress log."""
    rps = bench["requests"] / (bench["duration_us"] / 1e6)
    extra = ""
    if bench["status_counted"]:
        extra = f"  2xx {bench['s2xx']} 409 {bench['s409']} 4xx {bench['s4xx']} 5xx {bench['s5xx']}"
    return (f"  {group:6} {variant:27} round {round_}: {rps:9.0f} req/s  p50 {bench['p50_us'] / 1000:.2f} ms"
            f"  p99 {bench['p99_us'] / 1000:.2f} ms  non-2xx {bench['non2xx3xx']}{extra}")


def calibrate(redis_cli: List[str], url: str, keys: List[str], body: bytes, out: Path) -> Dict[str, str]:
    """The exact top-level Redis commands of sequential keyed POSTs (one per key), counted with
    MONITOR (not under load: MONITOR is expensive); commands run inside scripts are apart.
    Returns the calibration figures as strings, as latest.json has them."""
    with open(out, "w") as sink:
        monitor = subprocess.Popen(redis_cli + ["monitor"], stdout=sink, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if out.stat().st_size:
                break
            time.sleep(0.02)
        answers = [keyed_post(url, key, body) for key in keys]
        time.sleep(0.3)
    finally:
        monitor.terminate()
        monitor.wait()
    counts = parse.monitor(out.read_text(errors="replace").splitlines())
    return {
        "requests": str(len(keys)),
        "ok": str(sum(status == 200 for status, _ in answers)),
        "replayed": str(sum(replayed for _, replayed in answers)),
        "top": str(counts["top"]), "nested": str(counts["nested"]), "commands": str(counts["commands"]),
        "background": str(counts["background"]),
    }


def log_calibration(name: str, c: Dict[str, str]) -> None:
    """The calibration's result on the progress log."""
    log(f"calibration {name}: {c['top']} top-level Redis commands over {c['requests']} requests "
        f"({c['commands']}), {c['nested']} in scripts")
