"""Pure parsers of what the tools print: wrk, /proc files, Redis INFO and MONITOR."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Set, Tuple

# wrk prints durations as a number and one of these units (src/units.c).
_TIME_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)")
# Its summary prints 2 decimals, in a unit where the number is at least 0.85 (or in us): a
# latency is off by at most 0.6 % (plus the µs the BENCH line drops), req/s by 0.005.
_LATENCY_ROUNDING = 0.006
_RPS_ROUNDING = 0.005


class ParseError(Exception):
    """A tool printed something the benchmark cannot read."""


def duration_us(text: str) -> float:
    """`575.00us`, `1.20ms`, `2.00s`, `1.50m` → microseconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_US[match.group(2)]


def bench_line(text: str) -> Dict[str, int]:
    """The `BENCH key=value ...` line that benches/wrk/common.lua prints, as integers."""
    for line in text.splitlines():
        if line.startswith("BENCH "):
            try:
                return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
            except ValueError as err:
                raise ParseError(f"malformed BENCH line: {line!r}") from err
    raise ParseError("wrk printed no BENCH result line")


def wrk_summary(text: str) -> Dict[str, float]:
    """wrk's own summary: `requests`, `rps` and the latency percentiles `p50_us` … `p99_us`."""
    out: Dict[str, float] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and re.fullmatch(r"[0-9]+%", fields[0]):
            out[f"p{fields[0][:-1]}_us"] = duration_us(fields[1])
        elif line.startswith("Requests/sec:"):
            out["rps"] = float(fields[1])
        elif len(fields) > 2 and fields[1] == "requests" and fields[2] == "in":
            out["requests"] = int(fields[0])
    missing = {"requests", "rps", "p50_us", "p99_us"} - set(out)
    if missing:
        raise ParseError(f"wrk summary lacks {', '.join(sorted(missing))} (was it run with --latency?)")
    return out


def wrk_output(text: str) -> Dict[str, int]:
    """The figures of one wrk run: the BENCH line, checked against wrk's own summary."""
    bench = bench_line(text)
    summary = wrk_summary(text)
    if summary["requests"] != bench["requests"]:
        raise ParseError(f"wrk counted {summary['requests']} requests, BENCH {bench['requests']}")
    rps = bench["requests"] / (bench["duration_us"] / 1e6)
    if abs(summary["rps"] - rps) > 2 * _RPS_ROUNDING:
        raise ParseError(f"wrk printed {summary['rps']} req/s, BENCH gives {rps:.2f}")
    for p in ("50", "99"):
        printed, exact = summary[f"p{p}_us"], bench[f"p{p}_us"]
        if abs(printed - exact) > 1 + _LATENCY_ROUNDING * exact:
            raise ParseError(f"wrk printed p{p} {printed:.0f} us, BENCH {exact} us")
    return bench


def proc_stat_fields(text: str) -> List[str]:
    """The fields of /proc/PID/stat after `pid (comm)` (comm may hold spaces and parentheses):
    [0] state, [1] ppid, … [11] utime, [12] stime (clock ticks)."""
    return text[text.rindex(")") + 2 :].split()


def proc_ticks(text: str) -> int:
    """utime + stime of one /proc/PID/stat, in clock ticks."""
    fields = proc_stat_fields(text)
    return int(fields[11]) + int(fields[12])


def proc_user_ticks(text: str) -> int:
    """utime of one /proc/PID/stat, in clock ticks."""
    return int(proc_stat_fields(text)[11])


def cpu_times(text: str) -> Dict[int, Tuple[int, int]]:
    """Per core of /proc/stat: (busy, busy + idle + iowait) jiffies."""
    out = {}
    for line in text.splitlines():
        name, *vals = line.split()
        if re.fullmatch(r"cpu[0-9]+", name):
            # user nice system idle iowait irq softirq steal
            v = [int(x) for x in vals]
            busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            out[int(name[3:])] = (busy, busy + v[3] + v[4])
    return out


def vm_hwm_kib(text: str) -> int:
    """Peak resident set size (VmHWM) of one /proc/PID/status, in KiB."""
    match = re.search(r"^VmHWM:\s+([0-9]+) kB", text, re.M)
    if not match:
        raise ParseError("no VmHWM line in /proc/PID/status")
    return int(match.group(1))


def commandstats(text: str) -> Dict[str, int]:
    """`INFO commandstats` → calls per command (lower case, as Redis names them)."""
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^cmdstat_([^:]+):calls=([0-9]+)", text.replace("\r", ""), re.M)
    }


def monitor(lines: Iterable[str]) -> Dict[str, object]:
    """`redis-cli monitor` lines → commands sent by clients (`top`), run inside Lua scripts
    (`nested`), and the clients' commands by name (`commands`: `EVALSHA=100,SET=100`). `PING`s
    are the proxy's periodic store health check (every 10 s, whatever the load), not a
    request's work: counted apart (`background`)."""
    top, nested, background, names = 0, 0, 0, {}  # type: int, int, int, Dict[str, int]
    for line in lines:
        if not re.match(r"[0-9]+\.[0-9]+ \[", line):
            continue
        if " lua]" in line:
            nested += 1
            continue
        if '] "PING"' in line.upper():
            background += 1
            continue
        top += 1
        fields = line.split()
        name = fields[3].strip('"').upper() if len(fields) > 3 else "?"
        names[name] = names.get(name, 0) + 1
    commands = ",".join(f"{name}={n}" for name, n in sorted(names.items()))
    return {"top": top, "nested": nested, "background": background, "commands": commands}


def cpu_ids(spec: Optional[str]) -> Optional[Set[int]]:
    """A taskset core list (`1`, `0,2-3`) → core numbers; None (no pinning) → None."""
    if spec is None:
        return None
    ids: Set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids
