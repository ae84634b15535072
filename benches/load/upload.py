"""The keyed-upload scenario (issue 16; `ONLY=upload`, not in the default groups): large request
bodies through idemproxy, keyed (guarded: streamed upstream while hashed, docs/behaviour.md §15)
against keyless (pass-through, streamed), the same body size and concurrency. Measured per run:
throughput (MiB/s of request body, wall clock from the first byte sent to the last answer) and
the proxy's peak RSS (VmHWM, reset before each run). The upstream is examples/bench_upstream
(hyper, drains each body); the client is this process (threads on plain sockets, a 1 MiB block
sent again and again, so it holds no body either). Variants are interleaved for ROUNDS rounds.
Also per run: the proxy's and the upstream's CPU time (utime + stime) per byte of body, less
noisy than throughput on a shared machine (the difference is what guarding costs per byte); the
client's (each upload thread's own CPU time, `time.thread_time`); and the servers' CPU over the
run's wall time (server cores busy: near 1 with SERVER_CPUS=1, the servers' core is what bounds
the run; well under 1, the client or other processes on the machine do). From the CPU figures,
the server CPU ratio (keyless over keyed proxy + upstream ns/byte): the throughput ratio of two
runs both bound by the servers' core, steadier than the throughput ratio on a shared machine. And
the share of the run the servers' cores sat idle (/proc/stat): servers' CPU under 1 core with
their core never idle means other processes had the rest of it (a busy machine), not that the
proxy stalled waiting for something.

Settings (environment): UPLOAD_MIB=64 (body size), UPLOAD_CONNS=4 (concurrent uploads per run,
each on its own connection, each with its own key), ROUNDS. Targets (issue 16): keyed peak RSS
< 64 MiB; keyed throughput >= 0.8x keyless.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from . import parse
from .processes import BenchError, Servers, free_ports, log

GROUP = "upload"
KEYED, KEYLESS = "keyed", "keyless"
BLOCK = 1024 * 1024
RSS_TARGET_KIB = 64 * 1024
THROUGHPUT_TARGET = 0.8
# Per-run figures reported as their median per variant.
CPU_COLUMNS = ("proxy_cpu_ns_per_byte", "upstream_cpu_ns_per_byte", "client_cpu_ns_per_byte", "server_cores_busy",
               "server_cores_idle")


@dataclass(frozen=True)
class UploadSettings:
    """Body size (MiB), concurrent uploads per run, rounds."""

    mib: int
    conns: int
    rounds: int


def upload_settings(env: Mapping[str, str], rounds: int) -> UploadSettings:
    """UPLOAD_MIB and UPLOAD_CONNS from `env` (whole numbers >= 1)."""
    values = {}
    for name, default in (("UPLOAD_MIB", 64), ("UPLOAD_CONNS", 4)):
        raw = env.get(name, "") or str(default)
        if not raw.isdigit() or int(raw) < 1:
            raise BenchError(f"{name} must be a whole number >= 1 (got {raw})")
        values[name] = int(raw)
    return UploadSettings(values["UPLOAD_MIB"], values["UPLOAD_CONNS"], rounds)


def request_head(port: int, length: int, key: Optional[str]) -> bytes:
    """An HTTP/1.1 POST head with `Content-Length: length` and, if given, an Idempotency-Key."""
    lines = [f"POST /upload HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/octet-stream",
             f"Content-Length: {length}", "Connection: close"]
    if key is not None:
        lines.append(f"Idempotency-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    """The status code of a response that starts with its status line (0 if it does not)."""
    parts = response.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return 0
    return int(parts[1])


def one_upload(port: int, length: int, key: Optional[str], block: bytes, out: List[int],
               cpu: List[float]) -> None:
    """Sends one upload of `length` bytes (a repeated block) and appends the answer's status, and
    to `cpu` the CPU seconds this thread took."""
    started = time.thread_time()
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request_head(port, length, key))
            view, left = memoryview(block), length
            while left:
                n = min(left, len(block))
                sock.sendall(view[:n])
                left -= n
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        out.append(status_of(answer))
    except OSError:
        out.append(0)
    cpu.append(time.thread_time() - started)


def run_uploads(port: int, length: int, keys: Sequence[Optional[str]],
                block: bytes) -> Tuple[float, List[int], float]:
    """Concurrent uploads, one per key (None: keyless): seconds taken, the statuses, and the
    client's CPU seconds (its upload threads')."""
    statuses: List[int] = []
    cpu: List[float] = []
    threads = [threading.Thread(target=one_upload, args=(port, length, key, block, statuses, cpu))
               for key in keys]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started, statuses, sum(cpu)


def reset_peak(pid: int) -> None:
    """Resets the process's VmHWM (clear_refs 5), so the peak is per run."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # not permitted: the peak is then since start-up


def build_run(variant: str, round_: int, mib: int, conns: int, seconds: float, peak_kib: int,
              cpu_s: Optional[Mapping[str, float]] = None, idle: Optional[float] = None) -> dict:
    """One measured run; `cpu_s`: CPU seconds per role ("proxy", "upstream", "client"). With
    both servers' CPU, also the server cores they kept busy (their CPU over the wall time);
    `idle`: the share of the run the servers' cores were idle."""
    body_bytes = mib * conns * 1024 * 1024
    cpu_s = cpu_s or {}
    run = {"variant": variant, "round": round_, "mib": mib, "conns": conns, "seconds": seconds,
           "mib_per_s": mib * conns / seconds if seconds > 0 else 0.0, "peak_rss_kib": peak_kib,
           **{f"{role}_cpu_ns_per_byte": cpu * 1e9 / body_bytes for role, cpu in cpu_s.items()}}
    if "proxy" in cpu_s and "upstream" in cpu_s and seconds > 0:
        run["server_cores_busy"] = (cpu_s["proxy"] + cpu_s["upstream"]) / seconds
    if idle is not None:
        run["server_cores_idle"] = idle
    return run


def idle_share(before: Mapping[int, Tuple[int, int]], after: Mapping[int, Tuple[int, int]],
               cores: Optional[Set[int]]) -> Optional[float]:
    """The share of the time between two parse.cpu_times readings that `cores` (None: every
    core) were idle; None when no time passed on them."""
    ids = [c for c in after if c in before and (cores is None or c in cores)]
    busy = sum(after[c][0] - before[c][0] for c in ids)
    total = sum(after[c][1] - before[c][1] for c in ids)
    return (total - busy) / total if total > 0 else None


def aggregate(runs: Sequence[dict]) -> Dict[str, dict]:
    """Per variant: median throughput, each round's, and the highest peak RSS."""
    out: Dict[str, dict] = {}
    for variant in (KEYED, KEYLESS):
        rs = [r for r in runs if r["variant"] == variant]
        if rs:
            out[variant] = {"mib_per_s": statistics.median(r["mib_per_s"] for r in rs),
                            "rounds": [round(r["mib_per_s"], 1) for r in rs],
                            "peak_rss_kib": max(r["peak_rss_kib"] for r in rs)}
            for key in CPU_COLUMNS:
                if all(key in r for r in rs):
                    out[variant][key] = statistics.median(r[key] for r in rs)
    return out


def server_cpu_ratio(agg: Mapping[str, dict]) -> Optional[float]:
    """Keyless over keyed server CPU per byte (proxy + upstream): the throughput ratio when the
    servers' core bounds both variants. None without both variants' CPU figures."""
    keyed, keyless = agg.get(KEYED), agg.get(KEYLESS)
    roles = ("proxy_cpu_ns_per_byte", "upstream_cpu_ns_per_byte")
    if not keyed or not keyless or not all(k in keyed and k in keyless for k in roles):
        return None
    keyed_cpu = sum(keyed[k] for k in roles)
    return sum(keyless[k] for k in roles) / keyed_cpu if keyed_cpu else None


def targets(agg: Mapping[str, dict]) -> List[Tuple[str, str, Optional[bool]]]:
    """(target, measured, met) rows; met is None when a variant is missing."""
    keyed, keyless = agg.get(KEYED), agg.get(KEYLESS)
    rows: List[Tuple[str, str, Optional[bool]]] = []
    if keyed:
        peak = keyed["peak_rss_kib"]
        rows.append((f"keyed upload peak RSS < {RSS_TARGET_KIB // 1024} MiB", f"{peak / 1024:.1f} MiB",
                     peak < RSS_TARGET_KIB))
    if keyed and keyless:
        ratio = keyed["mib_per_s"] / keyless["mib_per_s"] if keyless["mib_per_s"] else 0.0
        rows.append((f"keyed throughput >= {THROUGHPUT_TARGET}x keyless", f"{ratio:.2f}x",
                     ratio >= THROUGHPUT_TARGET))
    return rows


def markdown(env: Mapping[str, str], agg: Mapping[str, dict], rows: Sequence[Tuple[str, str, Optional[bool]]]) -> str:
    """The scenario's report."""
    lines = ["# idemproxy keyed-upload benchmark", "",
             f"{env.get('date', '?')}, commit {env.get('commit', '?')}; body {env.get('mib')} MiB, "
             f"{env.get('conns')} concurrent uploads per run, {env.get('rounds')} interleaved rounds; "
             f"load average {env.get('loadavg_start', '?')} -> {env.get('loadavg_end', '?')}.", "",
             "| variant | MiB/s (median) | per round | proxy peak RSS | proxy CPU ns/byte | upstream CPU ns/byte "
             "| client CPU ns/byte | server cores busy | server cores idle |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant in (KEYED, KEYLESS):
        a = agg.get(variant)
        if a:
            cpu = [f"{a[k]:.2f}" if k in a else "?" for k in CPU_COLUMNS]
            lines.append(f"| {variant} | {a['mib_per_s']:.1f} | {', '.join(map(str, a['rounds']))} | "
                         f"{a['peak_rss_kib'] / 1024:.1f} MiB | {' | '.join(cpu)} |")
    ratio = server_cpu_ratio(agg)
    if ratio is not None:
        lines += ["", f"Server CPU ratio (keyless over keyed proxy + upstream ns/byte, the throughput ratio "
                      f"when the servers' core bounds both): {ratio:.2f}x."]
    lines += ["", "| target | measured | result |", "| --- | --- | --- |"]
    for target, measured, met in rows:
        result = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"| {target} | {measured} | {result} |")
    return "\n".join(lines) + "\n"


def run_upload(env: Dict[str, str], upload: UploadSettings, bins: Mapping[str, Path], servers: Servers,
               out_dir: Path, server_cores: Optional[Set[int]] = None) -> str:
    """Starts an upstream and an idemproxy (memory store), measures, writes upload.md and
    upload.json in `out_dir`; returns the markdown. `server_cores`: the cores the servers are
    pinned to (None: not pinned), whose idle time is measured."""
    upstream_port, proxy_port = free_ports(2)
    servers.start("upload_upstream", [str(bins["bench_upstream"]), f"127.0.0.1:{upstream_port}"])
    servers.wait_port("upload_upstream", upstream_port)
    length = upload.mib * 1024 * 1024
    servers.start("upload_proxy", [str(bins["idemproxy"]), "--listen", f"127.0.0.1:{proxy_port}",
                                   "--upstream", f"http://127.0.0.1:{upstream_port}",
                                   "--embedded-store", "memory", "--max-body-bytes", str(length + 1),
                                   "--log-filter", "warn"])
    servers.wait_port("upload_proxy", proxy_port)
    pid = servers.role_pids["upload_proxy"][0]
    pids = {"proxy": pid, "upstream": servers.role_pids["upload_upstream"][0]}
    clk_tck = os.sysconf("SC_CLK_TCK")

    def ticks() -> Dict[str, int]:
        return {role: parse.proc_ticks(Path(f"/proc/{p}/stat").read_text()) for role, p in pids.items()}
    block = bytes((i * 31 + 7) % 256 for i in range(BLOCK))
    runs = []
    seed = f"{int(time.time())}"
    for round_ in range(1, upload.rounds + 1):
        for variant in (KEYED, KEYLESS):
            keys = [f"upload-{seed}-{round_}-{i}" if variant == KEYED else None for i in range(upload.conns)]
            reset_peak(pid)
            before, stat_before = ticks(), parse.cpu_times(Path("/proc/stat").read_text())
            seconds, statuses, client_s = run_uploads(proxy_port, length, keys, block)
            after, stat_after = ticks(), parse.cpu_times(Path("/proc/stat").read_text())
            servers.check_alive()
            if any(s != 200 for s in statuses):
                raise BenchError(f"upload {variant}: answers {statuses}, expected 200 each")
            peak = parse.vm_hwm_kib(Path(f"/proc/{pid}/status").read_text())
            cpu_s = {**{role: (after[role] - before[role]) / clk_tck for role in pids}, "client": client_s}
            idle = idle_share(stat_before, stat_after, server_cores)
            run = build_run(variant, round_, upload.mib, upload.conns, seconds, peak, cpu_s, idle)
            log(f"upload {variant} round {round_}: {run['mib_per_s']:.1f} MiB/s, peak RSS {peak / 1024:.1f} MiB, "
                f"proxy CPU {run['proxy_cpu_ns_per_byte']:.2f} ns/byte, "
                f"server cores busy {run['server_cores_busy']:.2f}, idle {run.get('server_cores_idle', float('nan')):.2f}")
            runs.append(run)
    agg = aggregate(runs)
    rows = targets(agg)
    env = {**env, "mib": str(upload.mib), "conns": str(upload.conns), "rounds": str(upload.rounds),
           "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    md = markdown(env, agg, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upload.md").write_text(md)
    (out_dir / "upload.json").write_text(json.dumps({"env": env, "runs": runs, "aggregate": agg, "targets": rows,
                                                     "server_cpu_ratio": server_cpu_ratio(agg)}, indent=1))
    return md


def upload_env(commit: str) -> Dict[str, str]:
    """The report header's facts known before the run."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "ncpu": str(len(os.sched_getaffinity(0)))}
