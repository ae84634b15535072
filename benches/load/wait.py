"""The wait scenario (issue 16, docs/behaviour.md §15): how soon waiting retries are answered after
the first request completes, and what each costs the store.

`ONLY=wait benches/load.sh` runs it instead of the throughput groups. It starts a delaying
upstream (asyncio, in this process), a fresh redis-server, and three release idemproxies with
`--on-conflict wait`: A and B on that Redis, C on the embedded memory store. For each of ROUNDS x
KEYS keys it sends the first request (the upstream holds it for FIRST_MS) and, once it is in
flight, WAITERS retries of it on their own connections, each answered when woken: to A itself
(`redis-same-proxy`), to B (`redis-across-proxies`), and to C (`memory-same-proxy`). The delay of a
waiter is the instant its answer arrived minus the instant the first's answer arrived (both read
by this client, one monotonic clock): p50/p99 per mode. Store commands per waiter come from the
redis-server's INFO commandstats (its SETs are the `begin`s; the completion script's own GET and
SET are taken out), counted with the waiter's arrival and without it. Targets: p99 <= 10 ms,
<= 2 store commands per waiter besides its arrival. Output: benches/results/wait.md and wait.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from .parse import commandstats
from .processes import BenchError, Servers, free_ports, log
from .tools import build

TARGET_P99_MS = 10.0
TARGET_COMMANDS = 2.0


def percentile(values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def commands_per_waiter(calls: Mapping[str, int], firsts: int, waiters: int) -> Tuple[float, float]:
    """(with the arrival, without it): the `begin`s (`SET … NX GET`) the waiters made, per waiter.
    Every completion or renewal script runs one GET and one SET; every other SET is a begin, one
    per first request and the rest the waiters'."""
    begins = calls.get("set", 0) - calls.get("get", 0)
    per_waiter = (begins - firsts) / waiters
    return per_waiter, per_waiter - 1


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers one request per connection: 201 after `x-delay-ms` (if given), then closes."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length:
            await reader.readexactly(length)
        delay = int(headers.get("x-delay-ms", "0") or 0)
        if delay:
            await asyncio.sleep(delay / 1000)
        body = b'{"id":"task"}'
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: "
                     + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def post(port: int, key: str, delay_ms: int = 0) -> Tuple[int, bool, float]:
    """A keyed POST on a connection of its own: (status, replayed, monotonic instant answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"x-delay-ms: {delay_ms}\r\n" if delay_ms else ""
    writer.write((f"POST /tasks HTTP/1.1\r\nhost: bench\r\nidempotency-key: {key}\r\n{extra}"
                  "content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").encode())
    await writer.drain()
    answer = await reader.read()
    at = time.monotonic()
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    status = int(head.split(" ", 2)[1]) if head.startswith("http/") else 0
    return status, "idempotent-replayed: true" in head, at


async def one_key(first_port: int, waiter_port: int, key: str, waiters: int, first_ms: int,
                  lead_ms: int) -> List[float]:
    """The first request to `first_port`, then `waiters` retries to `waiter_port` `lead_ms` later:
    each waiter's delay after the first's answer, in ms. Every answer must be the first's."""
    first = asyncio.ensure_future(post(first_port, key, first_ms))
    await asyncio.sleep(lead_ms / 1000)
    answers = await asyncio.gather(*(post(waiter_port, key) for _ in range(waiters)))
    status, _, first_at = await first
    if status != 201:
        raise BenchError(f"the first request of {key} got {status}")
    delays = []
    for status, replayed, at in answers:
        if status != 201 or not replayed:
            raise BenchError(f"a waiter of {key} got {status} (replayed: {replayed})")
        delays.append((at - first_at) * 1000)
    return delays


def redis_calls(redis_cli: str, port: int) -> Dict[str, int]:
    """INFO commandstats of the benchmark's redis-server."""
    out = subprocess.run([redis_cli, "-p", str(port), "INFO", "commandstats"], capture_output=True,
                         text=True, check=True).stdout
    return commandstats(out)


async def measure(ports: Mapping[str, int], redis_cli: str, redis_port: int, keys: int, waiters: int,
                  first_ms: int, lead_ms: int) -> Dict[str, dict]:
    """Every mode: its waiters' delays (p50, p99, max) and, on Redis, store commands per waiter."""
    server = await asyncio.start_server(_upstream, "127.0.0.1", ports["upstream"])
    modes = {
        "redis-same-proxy": (ports["a"], ports["a"], True),
        "redis-across-proxies": (ports["a"], ports["b"], True),
        "memory-same-proxy": (ports["c"], ports["c"], False),
    }
    results = {}
    try:
        for mode, (first_port, waiter_port, redis) in modes.items():
            before = redis_calls(redis_cli, redis_port)
            delays: List[float] = []
            for k in range(keys):
                delays += await one_key(first_port, waiter_port, f"{mode}-{os.getpid()}-{k}", waiters,
                                        first_ms, lead_ms)
            after = redis_calls(redis_cli, redis_port)
            calls = {c: after.get(c, 0) - before.get(c, 0) for c in after}
            result = {"waiters": len(delays), "p50_ms": percentile(delays, 0.5),
                      "p99_ms": percentile(delays, 0.99), "max_ms": max(delays)}
            if redis:
                with_arrival, waiting = commands_per_waiter(calls, keys, keys * waiters)
                result.update(commands_with_arrival=with_arrival, commands_waiting=waiting,
                              calls={c: n for c, n in calls.items() if n})
            results[mode] = result
            log(f"{mode}: {fmt_result(result)}")
    finally:
        server.close()
        await server.wait_closed()
    return results


def fmt_result(r: Mapping) -> str:
    """One mode's figures on one line."""
    text = f"{r['waiters']} waiters, delay p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms"
    if "commands_waiting" in r:
        text += (f", store commands per waiter {r['commands_waiting']:.2f} besides its arrival "
                 f"({r['commands_with_arrival']:.2f} with it)")
    return text


def report(results: Mapping[str, dict], setup: Mapping[str, object]) -> str:
    """The Markdown report: the setup, one row per mode, the targets."""
    lines = ["# Waiting retries (on_conflict = wait)", "",
             f"{setup['keys']} keys x {setup['waiters']} waiters per mode; the first request held "
             f"{setup['first_ms']} ms by the upstream, the waiters sent {setup['lead_ms']} ms after it. "
             "Delay: waiter's answer minus the first's answer, as this client read them.", "",
             "| mode | waiters | p50 ms | p99 ms | max ms | store commands per waiter (besides arrival / with it) |",
             "|---|---|---|---|---|---|"]
    for mode, r in results.items():
        commands = (f"{r['commands_waiting']:.2f} / {r['commands_with_arrival']:.2f}"
                    if "commands_waiting" in r else "in-process")
        lines.append(f"| {mode} | {r['waiters']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {commands} |")
    lines += ["", "Targets:"]
    for mode, r in results.items():
        ok = r["p99_ms"] <= TARGET_P99_MS
        lines.append(f"- {mode}: p99 {r['p99_ms']:.2f} ms <= {TARGET_P99_MS:.0f} ms: {'met' if ok else 'MISSED'}")
        if "commands_waiting" in r:
            ok = r["commands_waiting"] <= TARGET_COMMANDS
            lines.append(f"- {mode}: {r['commands_waiting']:.2f} store commands per waiter <= "
                         f"{TARGET_COMMANDS:.0f}: {'met' if ok else 'MISSED'}")
    return "\n".join(lines) + "\n"


def _start(servers: Servers, tools: Mapping[str, str], binary: Path, ports: Mapping[str, int], tmp: Path) -> None:
    """redis-server and the three idemproxies, ready."""
    servers.start("redis", [tools["redis-server"], "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(tmp), "--daemonize", "no"])
    servers.wait_port("redis", ports["redis"])
    stores = {"a": ["--redis", f"redis://127.0.0.1:{ports['redis']}"],
              "b": ["--redis", f"redis://127.0.0.1:{ports['redis']}"],
              "c": ["--embedded-store", "memory"]}
    for role, store in stores.items():
        servers.start(role, [str(binary), "--listen", f"127.0.0.1:{ports[role]}",
                             "--upstream", f"http://127.0.0.1:{ports['upstream']}", "--on-conflict", "wait",
                             "--wait-timeout", "10s", "--log-filter", "warn", *store])
    for role in stores:
        servers.wait_port(role, ports[role])


def main_wait(root: Path, tools: Mapping[str, str], env: Mapping[str, str]) -> None:
    """Builds, starts, measures and writes benches/results/wait.md and wait.json."""
    keys = int(env.get("WAIT_KEYS", "") or 40)
    waiters = int(env.get("WAIT_WAITERS", "") or 8)
    first_ms = int(env.get("WAIT_FIRST_MS", "") or 100)
    lead_ms = int(env.get("WAIT_LEAD_MS", "") or 40)
    out_dir = Path(env.get("OUT_DIR", "") or root / "benches" / "results")
    with tempfile.TemporaryDirectory(prefix="idem-wait-") as tmp_name:
        tmp = Path(tmp_name)
        binary = build(root, tmp, [])["idemproxy"]
        names = ["upstream", "redis", "a", "b", "c"]
        ports = dict(zip(names, free_ports(len(names))))
        with Servers(tmp, []) as servers:
            _start(servers, tools, binary, ports, tmp)
            results = asyncio.run(measure(ports, tools["redis-cli"], ports["redis"], keys, waiters,
                                          first_ms, lead_ms))
            servers.check_alive()
    setup = {"keys": keys, "waiters": waiters, "first_ms": first_ms, "lead_ms": lead_ms,
             "loadavg": os.getloadavg()}
    text = report(results, setup)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wait.md").write_text(text)
    (out_dir / "wait.json").write_text(json.dumps({"setup": setup, "results": results}, indent=1))
    print(text)
