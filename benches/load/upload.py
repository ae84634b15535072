"""The keyed-upload scenario (issue 16; `ONLY=upload`, not in the default groups): large request
bodies through idemproxy, keyed (guarded: streamed upstream while hashed, docs/behaviour.md §15)
against keyless (pass-through, streamed), the same body size and concurrency. Measured per run:
throughput (MiB/s of request body, wall clock from the first byte sent to the last answer) and
the proxy's peak RSS (VmHWM, reset before each run). The upstream is examples/bench_upstream
(hyper, drains each body); the client is this process (threads on plain sockets, a 1 MiB block
sent again and again, so it holds no body either). Variants are interleaved for ROUNDS rounds.
Also per run: the proxy's and the upstream's CPU time (utime + stime) per byte of body, less
noisy than throughput on a shared machine (the difference is what guarding costs per byte).

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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import parse
from .processes import BenchError, Servers, free_ports, log

GROUP = "upload"
KEYED, KEYLESS = "keyed", "keyless"
BLOCK = 1024 * 1024
RSS_TARGET_KIB = 64 * 1024
THROUGHPUT_TARGET = 0.8


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


def one_upload(port: int, length: int, key: Optional[str], block: bytes, out: List[int]) -> None:
    """Sends one upload of `length` bytes (a repeated block) and appends the answer's status."""
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


def run_uploads(port: int, length: int, keys: Sequence[Optional[str]], block: bytes) -> Tuple[float, List[int]]:
    """Concurrent uploads, one per key (None: keyless): seconds taken and the statuses."""
    statuses: List[int] = []
    threads = [threading.Thread(target=one_upload, args=(port, length, key, block, statuses)) for key in keys]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started, statuses


def reset_peak(pid: int) -> None:
    """Resets the process's VmHWM (clear_refs 5), so the peak is per run."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # not permitted: the peak is then since start-up


def build_run(variant: str, round_: int, mib: int, conns: int, seconds: float, peak_kib: int,
              cpu_s: Optional[Mapping[str, float]] = None) -> dict:
    """One measured run; `cpu_s`: CPU seconds per role ("proxy", "upstream")."""
    body_bytes = mib * conns * 1024 * 1024
    return {"variant": variant, "round": round_, "mib": mib, "conns": conns, "seconds": seconds,
            "mib_per_s": mib * conns / seconds if seconds > 0 else 0.0, "peak_rss_kib": peak_kib,
            **{f"{role}_cpu_ns_per_byte": cpu * 1e9 / body_bytes for role, cpu in (cpu_s or {}).items()}}


def aggregate(runs: Sequence[dict]) -> Dict[str, dict]:
    """Per variant: median throughput, each round's, and the highest peak RSS."""
    out: Dict[str, dict] = {}
    for variant in (KEYED, KEYLESS):
        rs = [r for r in runs if r["variant"] == variant]
        if rs:
            out[variant] = {"mib_per_s": statistics.median(r["mib_per_s"] for r in rs),
                            "rounds": [round(r["mib_per_s"], 1) for r in rs],
                            "peak_rss_kib": max(r["peak_rss_kib"] for r in rs)}
            for role in ("proxy", "upstream"):
                key = f"{role}_cpu_ns_per_byte"
                if all(key in r for r in rs):
                    out[variant][key] = statistics.median(r[key] for r in rs)
    return out


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
             "| variant | MiB/s (median) | per round | proxy peak RSS | proxy CPU ns/byte | upstream CPU ns/byte |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant in (KEYED, KEYLESS):
        a = agg.get(variant)
        if a:
            cpu = [f"{a[k]:.2f}" if k in a else "?" for k in ("proxy_cpu_ns_per_byte", "upstream_cpu_ns_per_byte")]
            lines.append(f"| {variant} | {a['mib_per_s']:.1f} | {', '.join(map(str, a['rounds']))} | "
                         f"{a['peak_rss_kib'] / 1024:.1f} MiB | {cpu[0]} | {cpu[1]} |")
    lines += ["", "| target | measured | result |", "| --- | --- | --- |"]
    for target, measured, met in rows:
        result = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"| {target} | {measured} | {result} |")
    return "\n".join(lines) + "\n"


def run_upload(env: Dict[str, str], upload: UploadSettings, bins: Mapping[str, Path], servers: Servers,
               out_dir: Path) -> str:
    """Starts an upstream and an idemproxy (memory store), measures, writes upload.md and
    upload.json in `out_dir`; returns the markdown."""
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
            before = ticks()
            seconds, statuses = run_uploads(proxy_port, length, keys, block)
            after = ticks()
            servers.check_alive()
            if any(s != 200 for s in statuses):
                raise BenchError(f"upload {variant}: answers {statuses}, expected 200 each")
            peak = parse.vm_hwm_kib(Path(f"/proc/{pid}/status").read_text())
            cpu_s = {role: (after[role] - before[role]) / clk_tck for role in pids}
            run = build_run(variant, round_, upload.mib, upload.conns, seconds, peak, cpu_s)
            log(f"upload {variant} round {round_}: {run['mib_per_s']:.1f} MiB/s, peak RSS {peak / 1024:.1f} MiB, "
                f"proxy CPU {run['proxy_cpu_ns_per_byte']:.2f} ns/byte")
            runs.append(run)
    agg = aggregate(runs)
    rows = targets(agg)
    env = {**env, "mib": str(upload.mib), "conns": str(upload.conns), "rounds": str(upload.rounds),
           "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    md = markdown(env, agg, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upload.md").write_text(md)
    (out_dir / "upload.json").write_text(json.dumps({"env": env, "runs": runs, "aggregate": agg,
                                                     "targets": rows}, indent=1))
    return md


def upload_env(commit: str) -> Dict[str, str]:
    """The report header's facts known before the run."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "ncpu": str(len(os.sched_getaffinity(0)))}
