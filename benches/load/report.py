"""The report, as pure functions: raw runs → per-run figures → medians over the rounds →
targets (PASS/FAIL), floors and ratios, the A/B of this build against a baseline build →
latest.md and latest.json (the chart is chart.py)."""

from __future__ import annotations

import json
import statistics
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from .scenarios import BASELINE_SUFFIX

Key = Tuple[str, str]  # (group, variant)
Agg = Dict[Key, dict]
Target = Tuple[str, str, str]  # (target, measured, PASS | FAIL | n/a)

KINDS = ("proxy", "redis", "upstream")
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
_GET = "GET pass-through, small body"
_POST = "keyless POST 1 KiB"
_NEW = "keyed POST 1 KiB, every key new"
_SAME = "keyed POST 1 KiB, same key (replay)"
_STORM = "retry storm (32 conns, one key per wave)"
# (group, variant) -> (scenario number, scenario, variant label), in table order, before the
# baseline variants are added.
_LABELS: Dict[Key, Tuple[str, str, str]] = {
    ("get", "direct"): ("1", _GET, "direct to upstream"),
    ("get", "nginx"): ("1", _GET, "nginx"),
    ("get", "hyper-floor"): ("1", _GET, "hyper floor (bare forwarder)"),
    ("get", "idemproxy"): ("1", _GET, "idemproxy"),
    ("post", "nginx"): ("2", _POST, "nginx"),
    ("post", "hyper-floor"): ("2", _POST, "hyper floor (bare forwarder)"),
    ("post", "idemproxy"): ("2", _POST, "idemproxy"),
    ("new", "idemproxy-redis"): ("3", _NEW, "idemproxy, Redis"),
    ("replay", "idemproxy-redis"): ("4", _SAME, "idemproxy, Redis"),
    ("new", "idemproxy-embedded"): ("5", _NEW, "idemproxy, embedded"),
    ("new", "embedded-json-fingerprint"): ("5", _NEW, "idemproxy, embedded, --fingerprint-body json"),
    ("replay", "idemproxy-embedded"): ("5", _SAME, "idemproxy, embedded"),
    ("storm", "idemproxy-redis"): ("6", _STORM, "idemproxy, Redis"),
    ("storm", "idemproxy-embedded"): ("6", _STORM, "idemproxy, embedded"),
    ("new", "replicated-min0"): ("7", _NEW, "idemproxy, replicated Redis, min_replicas 0"),
    ("new", "replicated-min1"): ("7", _NEW, "idemproxy, replicated Redis, min_replicas 1"),
    ("replay", "replicated-min0"): ("8", _SAME, "idemproxy, replicated Redis, min_replicas 0"),
    ("replay", "replicated-min1"): ("8", _SAME, "idemproxy, replicated Redis, min_replicas 1"),
    ("new", "idemproxy-disk"): ("9", _NEW, "idemproxy, disk store"),
    ("replay", "idemproxy-disk"): ("9", _SAME, "idemproxy, disk store"),
    ("storm", "idemproxy-disk"): ("9", _STORM, "idemproxy, disk store"),
}
REPLICATED_KEYS = [key for key in _LABELS if key[1].startswith("replicated-")]
# The disk-store variants (issue 13): no baseline twin (an older build lacks their flags).
DISK_KEYS = [key for key in _LABELS if key[1] == "idemproxy-disk"]
JSON_FINGERPRINT_KEY: Key = ("new", "embedded-json-fingerprint")
BYTES_FINGERPRINT_KEY: Key = ("new", "idemproxy-embedded")


def baseline_key(key: Key) -> Key:
    """The variant of the baseline build (BASELINE=<revision>) that pairs with `key`."""
    return key[0], key[1] + BASELINE_SUFFIX


def _with_baselines(labels: Mapping[Key, Tuple[str, str, str]]) -> Dict[Key, Tuple[str, str, str]]:
    """`labels`, each idemproxy variant followed by its baseline variant (the disk store's have
    none)."""
    out = {}
    for key, (num, scenario, variant) in labels.items():
        out[key] = (num, scenario, variant)
        if key[1].startswith("idemproxy") and key not in DISK_KEYS:
            out[baseline_key(key)] = (num, scenario, variant + " · baseline")
    return out


LABELS = _with_baselines(_LABELS)
ORDER: List[Key] = list(LABELS)

# --- one run ------------------------------------------------------------------------------


def cpu_us_per_request(pre_ticks: int, post_ticks: int, clk_tck: int, requests: int) -> float:
    """CPU µs per completed request from two utime+stime samples (clock ticks)."""
    return (post_ticks - pre_ticks) * 1e6 / clk_tck / requests


def redis_calls(pre: Mapping[str, int], post: Mapping[str, int]) -> Dict[str, int]:
    """Commands Redis ran between two INFO commandstats samples, without the INFO calls."""
    delta = {c: n - pre.get(c, 0) for c, n in post.items() if c != "info"}
    return {c: n for c, n in delta.items() if n}


def core_shares(pre: Mapping[int, tuple], post: Mapping[int, tuple], cores: Optional[Set[int]],
                our_ticks: int) -> Tuple[Optional[float], Optional[float]]:
    """(busy, foreign) share of the server cores between two /proc/stat samples: foreign is
    the CPU time of processes that are not ours. (None, None) without pinned cores."""
    if cores is None:
        return None, None
    busy = sum(post[i][0] - pre[i][0] for i in cores if i in post)
    total = sum(post[i][1] - pre[i][1] for i in cores if i in post)
    if not total:
        return None, None
    return busy / total, max(0.0, (busy - our_ticks) / total)


def _latency(bench: Mapping[str, int]) -> dict:
    """The latency, status and error figures of a BENCH line."""
    return {
        "p50_ms": bench["p50_us"] / 1000, "p90_ms": bench["p90_us"] / 1000,
        "p99_ms": bench["p99_us"] / 1000, "max_ms": bench["max_us"] / 1000,
        "errors": {k: bench["err_" + k] for k in ("connect", "read", "write", "timeout")},
        "non2xx": bench["non2xx3xx"], "status_counted": bool(bench["status_counted"]),
        "status": {k: bench["s" + k] for k in ("2xx", "3xx", "409", "4xx", "5xx", "other")},
    }


def _redis_figures(calls: Mapping[str, int], requests: int) -> dict:
    """Redis commands per request, in total, by command and in scripts."""
    return {
        "redis_calls": dict(calls),
        "redis_scripts_per_req": sum(n for c, n in calls.items() if c in SCRIPT_COMMANDS) / requests,
        "redis_by_command": {c: n / requests for c, n in calls.items()},
        "redis_calls_per_req": sum(calls.values()) / requests,
    }


def build_run(meta: Mapping, bench: Mapping[str, int], pre: Mapping, post: Mapping,
              peaks: Mapping[str, int], clk_tck: int, cores: Optional[Set[int]]) -> dict:
    """The figures of one measured run (a latest.json `runs` entry).

    meta: group, variant, round, roles (role -> kind); bench: the BENCH line (requests > 0);
    pre/post: samples {"ticks": role -> ticks, "redis": commandstats, "stat": /proc/stat cores};
    peaks: role -> VmHWM KiB. The CPU of the roles of one kind is summed (the replicated Redis'
    primary and replica are both `redis`)."""
    requests = bench["requests"]
    roles = dict(meta["roles"])
    ticks = {r: post["ticks"][r] - pre["ticks"][r] for r in post["ticks"]}
    cpu = _cpu_per_kind(roles, pre["ticks"], post["ticks"], clk_tck, requests)
    # Runs recorded before the user ticks were sampled have none.
    user = (_cpu_per_kind(roles, pre["uticks"], post["uticks"], clk_tck, requests)
            if "uticks" in pre and "uticks" in post else {})
    busy, foreign = core_shares(pre["stat"], post["stat"], cores, sum(ticks.values()))
    proxy_role = next((r for r, k in roles.items() if k == "proxy"), None)
    seconds = bench["duration_us"] / 1e6
    return {
        "group": meta["group"], "variant": meta["variant"], "round": meta["round"],
        "requests": requests, "seconds": seconds, "rps": requests / seconds,
        **_latency(bench),
        "cpu_us_per_req": cpu, "cpu_us_per_req_total": sum(cpu.values()),
        **({"cpu_user_us_per_req": user} if user else {}),
        "ticks": ticks, "roles": roles,
        **_redis_figures(redis_calls(pre["redis"], post["redis"]), requests),
        "peak_rss_mib": peaks[proxy_role] / 1024 if proxy_role in peaks else None,
        "peaks_kib": dict(peaks), "server_core_busy": busy, "server_core_foreign": foreign,
    }


def _cpu_per_kind(roles: Mapping[str, str], pre: Mapping[str, int], post: Mapping[str, int], clk_tck: int,
                  requests: int) -> Dict[str, float]:
    """CPU µs per request from two samples of ticks (role -> ticks), summed per kind: a
    replicated Redis is a primary and a replica."""
    cpu: Dict[str, float] = {}
    for role, kind in roles.items():
        cpu[kind] = cpu.get(kind, 0.0) + cpu_us_per_request(pre[role], post[role], clk_tck, requests)
    return cpu


# --- medians over the rounds ----------------------------------------------------------------


def _summed(rs: List[dict]) -> dict:
    """The counts of a variant's runs, summed over its rounds."""
    return {
        "non2xx": sum(r["non2xx"] for r in rs),
        "status_counted": all(r["status_counted"] for r in rs),
        "status": {k: sum(r["status"][k] for r in rs) for k in rs[0]["status"]},
        "socket_errors": sum(sum(r["errors"].values()) for r in rs),
        "requests": sum(r["requests"] for r in rs),
    }


def aggregate_variant(rs: List[dict]) -> dict:
    """One variant's runs → medians (max for the peak RSS, sums for the counts)."""
    med = statistics.median
    kinds = sorted({k for r in rs for k in r["cpu_us_per_req"]}, key=KINDS.index)
    commands = sorted({c for r in rs for c in r["redis_by_command"]})
    rss = [r["peak_rss_mib"] for r in rs if r["peak_rss_mib"] is not None]
    foreign = [r["server_core_foreign"] for r in rs if r["server_core_foreign"] is not None]
    return {
        "rounds": len(rs),
        "rps": med(r["rps"] for r in rs), "rps_rounds": [r["rps"] for r in rs],
        "p50_ms": med(r["p50_ms"] for r in rs), "p99_ms": med(r["p99_ms"] for r in rs),
        "cpu": {k: med(r["cpu_us_per_req"][k] for r in rs) for k in kinds},
        "cpu_total": med(r["cpu_us_per_req_total"] for r in rs),
        "cpu_total_rounds": [r["cpu_us_per_req_total"] for r in rs],
        "redis_scripts_per_req": med(r["redis_scripts_per_req"] for r in rs),
        "redis_by_command": {c: med(r["redis_by_command"].get(c, 0) for r in rs) for c in commands},
        "redis_calls_per_req": med(r["redis_calls_per_req"] for r in rs),
        "uses_redis": "redis" in kinds,
        "peak_rss_mib": max(rss) if rss else None,
        **_summed(rs),
        "foreign": med(foreign) if foreign else None,
        **_proxy_user(rs),
    }


def _proxy_user(rs: List[dict]) -> dict:
    """{"proxy_user": the median user CPU µs of the proxy} when every round has it, else {}."""
    user = [r["cpu_user_us_per_req"]["proxy"] for r in rs if "proxy" in r.get("cpu_user_us_per_req", {})]
    return {"proxy_user": statistics.median(user)} if user and len(user) == len(rs) else {}


def aggregate(runs: List[dict]) -> Agg:
    """Every variant that ran, in table order → its medians."""
    agg = {}
    for key in ORDER:
        rs = [r for r in runs if (r["group"], r["variant"]) == key]
        if rs:
            agg[key] = aggregate_variant(rs)
    return agg


# --- targets ----------------------------------------------------------------------------------


def by_command(calls: Mapping[str, float]) -> str:
    """`SET 1.00 · EVALSHA 1.00 · GET 1.00`: Redis calls per request, most frequent first."""
    shown = sorted(((n, c) for c, n in calls.items() if n >= 0.005), reverse=True)
    return " · ".join(f"{c.upper()} {n:.2f}" for n, c in shown) or "none"


def _result(ok: Optional[bool]) -> str:
    """PASS, FAIL, or n/a when the target could not be measured."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def target_get(agg: Agg) -> Target:
    """GET pass-through: idemproxy's CPU per request at most nginx's."""
    name = "GET pass-through: idemproxy CPU µs/req ≤ nginx's"
    i, n = agg.get(("get", "idemproxy")), agg.get(("get", "nginx"))
    if not (i and n):
        return name, "not run", _result(None)
    ratio = i["cpu"]["proxy"] / n["cpu"]["proxy"]
    return name, (f"{i['cpu']['proxy']:.1f} vs {n['cpu']['proxy']:.1f} µs = **{ratio:.2f}×** "
                  f"(totals with upstream: {i['cpu_total']:.1f} vs {n['cpu_total']:.1f} µs)"), _result(ratio <= 1.0)


def target_vs(name: str, a: Optional[dict], b: Optional[dict], factor: float, label_b: str) -> Target:
    """Total CPU per request of `a` at most `factor` × that of `b`."""
    if not (a and b):
        return name, "not run", _result(None)
    limit = factor * b["cpu_total"]
    return name, (f"{a['cpu_total']:.1f} µs vs {factor} × {b['cpu_total']:.1f} = {limit:.1f} µs "
                  f"(**{a['cpu_total'] / b['cpu_total']:.2f}×** {label_b})"), _result(a["cpu_total"] <= limit)


def target_storm(storm: Optional[dict], replay: Optional[dict]) -> Target:
    """Retry storm: at least half the replay throughput, no 5xx and no socket errors."""
    name = "retry storm (Redis): ≥ 0.5 × replay throughput, no 5xx"
    if not (storm and replay):
        return name, "not run", _result(None)
    ratio = storm["rps"] / replay["rps"]
    s = storm["status"]
    fivexx = s["5xx"] + (0 if storm["status_counted"] else storm["non2xx"])
    ok = ratio >= 0.5 and fivexx == 0 and storm["socket_errors"] == 0
    return name, (f"{storm['rps']:,.0f} vs {replay['rps']:,.0f} req/s = **{ratio:.2f}×**; "
                  f"2xx {s['2xx']}, 409 {s['409']}, other 4xx {s['4xx']}, 5xx {s['5xx']}, "
                  f"socket errors {storm['socket_errors']}"), _result(ok)


def target_calibration(name: str, expected: int, calibration: Mapping[str, Mapping[str, str]],
                       load: Optional[dict]) -> Target:
    """Exactly `expected` top-level Redis commands per request in the MONITOR calibration."""
    label = f"Redis commands: exactly {expected} per {name.replace('-', ' ')}"
    c = calibration.get(name)
    if not c:
        return label, "not run", _result(None)
    n = int(c["requests"])
    per = int(c["top"]) / n
    under_load = (f"; under load (commandstats, script-internal calls included): "
                  f"{by_command(load['redis_by_command'])}" if load else "")
    ok = int(c["ok"]) == n and abs(per - expected) < 1e-9
    return label, (f"**{per:.2f}**/req top-level over {n} sequential requests ({c['commands'] or 'none'}; "
                   f"{int(c['nested']) / n:.2f}/req inside scripts; {c['ok']}/{n} answered 200, "
                   f"{c['replayed']} replayed)" + under_load), _result(ok)


REPLICAS_TARGET = ("replica acknowledgements (issue 14, replicated Redis): first executions with min_replicas=1 "
                   "≥ 0.7× the throughput with 0; replays unchanged (≥ 0.9×)")


def target_replicas(agg: Agg) -> Target:
    """`--redis-min-replicas 1` against 0 on the same replicated Redis, same run: first executions
    (which wait for the replica's WAIT) keep at least 0.7× the throughput; replays, which write
    nothing and so wait for no replica, are unchanged: at least 0.9× (the rest is noise). Each
    half is judged when both its variants ran."""
    new0, new1 = agg.get(("new", "replicated-min0")), agg.get(("new", "replicated-min1"))
    rep0, rep1 = agg.get(("replay", "replicated-min0")), agg.get(("replay", "replicated-min1"))
    measured, ok = [], []
    if new0 and new1:
        ratio = new1["rps"] / new0["rps"]
        measured.append(f"first executions {new1['rps']:,.0f} vs {new0['rps']:,.0f} req/s = **{ratio:.2f}×** "
                        f"(p99 {new1['p99_ms']:.2f} vs {new0['p99_ms']:.2f} ms)")
        ok.append(ratio >= 0.7)
    if rep0 and rep1:
        ratio = rep1["rps"] / rep0["rps"]
        measured.append(f"replays {rep1['rps']:,.0f} vs {rep0['rps']:,.0f} req/s = **{ratio:.2f}×** "
                        f"(p99 {rep1['p99_ms']:.2f} vs {rep0['p99_ms']:.2f} ms)")
        ok.append(ratio >= 0.9)
    if not ok:
        return REPLICAS_TARGET, "not run", _result(None)
    return REPLICAS_TARGET, "; ".join(measured), _result(all(ok))


JSON_FINGERPRINT_TARGET = ("JSON fingerprint (issue 15): proxy CPU µs/req with `--fingerprint-body json` ≤ 1.2× "
                           "the bytes fingerprint's (1 KiB bodies)")


def target_json_fingerprint(json_fp: dict, bytes_fp: dict) -> Target:
    """First executions on the embedded store with the canonical JSON fingerprint against the
    byte fingerprint, same 1 KiB JSON body, same run: the proxy's CPU per request at most 1.2×."""
    ratio = json_fp["cpu"]["proxy"] / bytes_fp["cpu"]["proxy"]
    return JSON_FINGERPRINT_TARGET, (
        f"{json_fp['cpu']['proxy']:.1f} vs {bytes_fp['cpu']['proxy']:.1f} µs = **{ratio:.2f}×** "
        f"(totals with upstream: {json_fp['cpu_total']:.1f} vs {bytes_fp['cpu_total']:.1f} µs; "
        f"{json_fp['rps']:,.0f} vs {bytes_fp['rps']:,.0f} req/s)"), _result(ratio <= 1.2)


def target_rss(agg: Agg) -> Target:
    """Peak RSS of the Redis-store idemproxy under 64 MiB."""
    name = "peak RSS < 64 MiB under load (idemproxy, Redis store)"
    peaks = [a["peak_rss_mib"] for k, a in agg.items() if k[1] in ("idemproxy", "idemproxy-redis")]
    if not peaks:
        return name, "not run", _result(None)
    return name, f"**{max(peaks):.1f} MiB**", _result(max(peaks) < 64)


def targets(agg: Agg, calibration: Mapping[str, Mapping[str, str]]) -> List[Target]:
    """Every target of the performance work, measured or `not run`; the replica target only when
    a replicated-Redis variant ran, the JSON-fingerprint target only when both fingerprints' variants
    ran (reports of runs without them stay as they were)."""
    new_r, rep_r = agg.get(("new", "idemproxy-redis")), agg.get(("replay", "idemproxy-redis"))
    replicas = [target_replicas(agg)] if any(key in agg for key in REPLICATED_KEYS) else []
    fingerprints = _all(agg, JSON_FINGERPRINT_KEY, BYTES_FINGERPRINT_KEY)
    json_fp = [target_json_fingerprint(*fingerprints)] if fingerprints else []
    return [
        target_get(agg),
        target_vs("keyed first execution (Redis): total CPU ≤ 1.5 × nginx keyless POST total",
                  new_r, agg.get(("post", "nginx")), 1.5, "nginx POST"),
        target_vs("replay (Redis): total CPU ≤ 0.6 × nginx GET total", rep_r, agg.get(("get", "nginx")),
                  0.6, "nginx GET"),
        target_storm(agg.get(("storm", "idemproxy-redis")), rep_r),
        target_calibration("first-execution", 2, calibration, new_r),
        target_calibration("replay", 1, calibration, rep_r),
        target_rss(agg),
        *replicas,
        *json_fp,
    ]


# --- floors and other ratios ------------------------------------------------------------------


def _floor_get(g_f: dict, g_n: dict, g_i: dict) -> str:
    """GET: the bare hyper forwarder against nginx and idemproxy."""
    return (f"GET: a bare hyper forwarder ([examples/bench_floor.rs](../../examples/bench_floor.rs): hyper's "
            f"HTTP/1.1 server and client, nothing else) costs {g_f['cpu']['proxy']:.1f} µs = "
            f"{g_f['cpu']['proxy'] / g_n['cpu']['proxy']:.2f}× nginx; idemproxy's own per-request work "
            f"(routing, RFC 9110 header rewriting, timeouts, pooling, metrics) adds "
            f"{g_i['cpu']['proxy'] - g_f['cpu']['proxy']:.1f} µs on top of it. The target leaves it "
            f"{g_n['cpu']['proxy'] - g_f['cpu']['proxy']:.1f} µs.{_user_work(g_f, g_i)}")


def _user_work(floor: dict, idemproxy: dict) -> str:
    """idemproxy's own work in user CPU time alone, when the runs sampled it: the kernel time,
    the larger part of both proxies' CPU, varies between runs by about as much as the own work."""
    if "proxy_user" not in floor or "proxy_user" not in idemproxy:
        return ""
    return (f" In user time alone: idemproxy {idemproxy['proxy_user']:.1f} µs, the floor {floor['proxy_user']:.1f} µs, "
            f"own work {idemproxy['proxy_user'] - floor['proxy_user']:.1f} µs.")


def _floor_post(p_f: dict, p_n: dict, p_i: dict) -> str:
    """Keyless POST: the bare hyper forwarder against nginx and idemproxy."""
    return (f"keyless POST: bare hyper forwarder {p_f['cpu']['proxy']:.1f} µs = "
            f"{p_f['cpu']['proxy'] / p_n['cpu']['proxy']:.2f}× nginx; idemproxy {p_i['cpu']['proxy']:.1f} µs, its own "
            f"per-request work {p_i['cpu']['proxy'] - p_f['cpu']['proxy']:.1f} µs above the floor.{_user_work(p_f, p_i)} "
            f"Instructions per request of both (deterministic, for comparing builds): benches/instructions.sh.")


def _floor_replay(rep_r: dict, rep_m: dict, g_n: dict) -> str:
    """The least a Redis replay can cost: the embedded replay plus Redis' CPU."""
    redis = rep_r["cpu"].get("redis", 0)
    least = rep_m["cpu_total"] + redis
    return (f"replay (Redis) cannot cost less than the embedded-store replay (the same HTTP and fingerprint "
            f"work, no round trip) plus Redis' own CPU for its one command: {rep_m['cpu_total']:.1f} + "
            f"{redis:.1f} = {least:.1f} µs = **{least / g_n['cpu_total']:.2f}×** nginx GET "
            f"(target ≤ 0.6× = {0.6 * g_n['cpu_total']:.1f} µs), before the proxy's side of the round trip.")


def _floor_new(new_r: dict, p_i: dict, p_n: dict) -> str:
    """The least a Redis first execution can cost: a keyless POST plus Redis' and the upstream's CPU."""
    redis, upstream = new_r["cpu"].get("redis", 0), new_r["cpu"].get("upstream", 0)
    least = p_i["cpu"]["proxy"] + redis + upstream
    return (f"first execution (Redis) cannot cost less than a keyless POST through idemproxy plus Redis' CPU "
            f"for its two commands plus the upstream's: {p_i['cpu']['proxy']:.1f} + {redis:.1f} + "
            f"{upstream:.1f} = {least:.1f} µs = **{least / p_n['cpu_total']:.2f}×** nginx "
            f"keyless POST (target ≤ 1.5× = {1.5 * p_n['cpu_total']:.1f} µs), before fingerprinting and the "
            f"proxy's side of two round trips.")


def _all(agg: Agg, *keys: Key) -> Optional[List[dict]]:
    """The aggregates of `keys`, or None when one of them did not run."""
    found = [agg.get(k) for k in keys]
    return found if all(found) else None


def floors(agg: Agg) -> List[str]:
    """What the HTTP stack and Redis cost before any idemproxy work, as far as measured."""
    wanted = [
        (_floor_get, (("get", "hyper-floor"), ("get", "nginx"), ("get", "idemproxy"))),
        (_floor_post, (("post", "hyper-floor"), ("post", "nginx"), ("post", "idemproxy"))),
        (_floor_replay, (("replay", "idemproxy-redis"), ("replay", "idemproxy-embedded"), ("get", "nginx"))),
        (_floor_new, (("new", "idemproxy-redis"), ("post", "idemproxy"), ("post", "nginx"))),
    ]
    return [line(*found) for line, keys in wanted for found in [_all(agg, *keys)] if found]


def embedded_growth_kib(runs: List[dict]) -> Optional[float]:
    """KiB the embedded store's peak RSS grew per stored record over its first-execution runs
    (its peak after each such run minus its peak in the run before, over the run's new keys)."""
    grown, keys = 0, 0
    for prev, run in zip(runs, runs[1:]):
        if (run["group"], run["variant"]) == ("new", "idemproxy-embedded"):
            grown += run["peaks_kib"]["idem_mem"] - prev["peaks_kib"]["idem_mem"]
            keys += run["status"]["2xx"]
    return grown / keys if keys else None


def _versus_nginx(label: str, i: dict, n: dict) -> str:
    """Throughput, p99 and CPU of idemproxy against nginx."""
    return (f"{label} vs nginx: {i['rps'] / n['rps']:.2f}× throughput, p99 {i['p99_ms']:.2f} vs "
            f"{n['p99_ms']:.2f} ms, proxy CPU {i['cpu']['proxy'] / n['cpu']['proxy']:.2f}×, "
            f"total CPU {i['cpu_total'] / n['cpu_total']:.2f}×")


def _embedded_ratios(agg: Agg) -> List[str]:
    """The embedded store against the targets' references (no target of its own)."""
    out = []
    new_m, rep_m = agg.get(("new", "idemproxy-embedded")), agg.get(("replay", "idemproxy-embedded"))
    storm_m, p_n, g_n = agg.get(("storm", "idemproxy-embedded")), agg.get(("post", "nginx")), agg.get(("get", "nginx"))
    if new_m and p_n:
        out.append(f"keyed first execution, embedded: {new_m['cpu_total']:.1f} µs total = "
                   f"{new_m['cpu_total'] / p_n['cpu_total']:.2f}× nginx keyless POST (target ≤ 1.5×)")
    if rep_m and g_n:
        out.append(f"replay, embedded: {rep_m['cpu_total']:.1f} µs total = "
                   f"{rep_m['cpu_total'] / g_n['cpu_total']:.2f}× nginx GET (target ≤ 0.6×)")
    if storm_m and rep_m:
        out.append(f"retry storm, embedded: {storm_m['rps'] / rep_m['rps']:.2f}× replay throughput, "
                   f"5xx {storm_m['status']['5xx']}, 409 {storm_m['status']['409']}")
    return out


def _disk_ratios(agg: Agg) -> List[str]:
    """The disk store against the memory store (issue 13's speed targets)."""
    out = []
    new_d, new_m = agg.get(("new", "idemproxy-disk")), agg.get(("new", "idemproxy-embedded"))
    rep_d, rep_m = agg.get(("replay", "idemproxy-disk")), agg.get(("replay", "idemproxy-embedded"))
    if new_d and new_m:
        ok = new_d["rps"] >= 0.5 * new_m["rps"]
        out.append(f"disk store first executions: {new_d['rps']:,.0f} vs memory {new_m['rps']:,.0f} req/s = "
                   f"**{new_d['rps'] / new_m['rps']:.2f}×** (issue 13 target ≥ 0.5×: {_result(ok)})")
    if rep_d and rep_m:
        ok = rep_d["cpu"]["proxy"] <= 1.2 * rep_m["cpu"]["proxy"]
        out.append(f"disk store replay: proxy CPU {rep_d['cpu']['proxy']:.1f} vs memory {rep_m['cpu']['proxy']:.1f} µs/req = "
                   f"**{rep_d['cpu']['proxy'] / rep_m['cpu']['proxy']:.2f}×** (issue 13 target ≤ 1.2×: {_result(ok)})")
    return out


def information(agg: Agg, runs: List[dict]) -> List[str]:
    """Ratios with no target: the embedded store, its memory, idemproxy against nginx."""
    out = _disk_ratios(agg) + _embedded_ratios(agg)
    mem_rss = [a["peak_rss_mib"] for k, a in agg.items() if k[1] == "idemproxy-embedded" and a["peak_rss_mib"]]
    if mem_rss:
        growth = embedded_growth_kib(runs)
        per_record = f"; it grew ≈ {growth:.1f} KiB per stored record in scenario 5" if growth is not None else ""
        out.append(f"peak RSS, embedded store: {max(mem_rss):.1f} MiB (it holds every record of the run in memory"
                   f"{per_record})")
    for group, label in (("get", "GET"), ("post", "keyless POST")):
        pair = _all(agg, (group, "idemproxy"), (group, "nginx"))
        if pair:
            out.append(_versus_nginx(label, *pair))
    return out


def noise(agg: Agg) -> Optional[str]:
    """How much CPU other processes took on the server cores (None without pinning)."""
    foreign = [a["foreign"] for a in agg.values() if a["foreign"] is not None]
    if not foreign:
        return None
    worst = max(foreign)
    return (f"Noise: CPU time of other processes on the server core(s) during the runs: median per variant "
            f"up to {worst * 100:.0f}%" + (" — the machine was busy; throughput and latency are unreliable, "
                                           "CPU µs/req less so." if worst > 0.05 else "."))


# --- A/B: this build against a baseline build (BASELINE=<revision>) ----------------------------


class Metric(NamedTuple):
    """One figure of the A/B: its name, its value in a run, its summary over the rounds (as in
    the table), whether higher is better, and its decimals in latest.md."""

    name: str
    value: Callable[[dict], float]
    summary: Callable[[Sequence[float]], float]
    higher_is_better: bool
    digits: int


AB_METRICS = (
    Metric("req/s", lambda r: r["rps"], statistics.median, True, 0),
    Metric("p99 ms", lambda r: r["p99_ms"], statistics.median, False, 2),
    Metric("proxy CPU µs/req", lambda r: r["cpu_us_per_req"]["proxy"], statistics.median, False, 1),
    Metric("total CPU µs/req", lambda r: r["cpu_us_per_req_total"], statistics.median, False, 1),
    Metric("peak RSS MiB", lambda r: r["peak_rss_mib"], max, False, 1),
)


def beyond_noise(this: Sequence[float], base: Sequence[float], higher_is_better: bool) -> str:
    """`better` or `worse` when every round of this build is above (or below) every round of the
    baseline, `within noise` when their ranges overlap, `n/a` with fewer than 2 rounds of each."""
    if min(len(this), len(base)) < 2:
        return "n/a"
    if min(this) > max(base):
        return "better" if higher_is_better else "worse"
    if max(this) < min(base):
        return "worse" if higher_is_better else "better"
    return "within noise"


def _rounds(runs: List[dict], key: Key) -> List[dict]:
    """The runs of the variant `key`, in round order."""
    return sorted((r for r in runs if (r["group"], r["variant"]) == key), key=lambda r: r["round"])


def ab_metric(key: Key, metric: Metric, this_runs: List[dict], base_runs: List[dict]) -> dict:
    """One metric of one variant: both builds' summaries, their ratio, the rounds, the verdict."""
    this, base = [metric.value(r) for r in this_runs], [metric.value(r) for r in base_runs]
    a, b = metric.summary(this), metric.summary(base)
    return {"group": key[0], "variant": key[1], "metric": metric.name, "this": a, "baseline": b,
            "ratio": a / b if b else None, "this_rounds": this, "baseline_rounds": base,
            "verdict": beyond_noise(this, base, metric.higher_is_better)}


def ab(runs: List[dict]) -> List[dict]:
    """This build against the baseline build, for every idemproxy variant that ran with its
    baseline variant, in table order: one row per metric of AB_METRICS (latest.json `ab`)."""
    out = []
    for key in _LABELS:
        this, base = _rounds(runs, key), _rounds(runs, baseline_key(key))
        if this and base:
            out += [ab_metric(key, metric, this, base) for metric in AB_METRICS]
    return out


def log_summary(lines: Iterable[str]) -> Dict[Tuple[str, str], int]:
    """(level, message) -> count of the WARN and ERROR lines of an idemproxy JSON log."""
    counts: Dict[Tuple[str, str], int] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        level = str(rec.get("level", "")).upper()
        if level in ("WARN", "ERROR"):
            msg = (rec.get("fields") or {}).get("message") or rec.get("message") or "?"
            counts[(level, msg)] = counts.get((level, msg), 0) + 1
    return counts


# --- markdown -------------------------------------------------------------------------------


def fmt(x: Optional[float], digits: int = 1) -> str:
    """A figure of the table: `—` when absent, thousands separated when large."""
    if x is None:
        return "—"
    if x >= 1000 and digits <= 1:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _commit(env: Mapping[str, str]) -> str:
    """The commit measured, with the number of uncommitted files if there are any."""
    return f"`{env['commit']}`" + (f" (+{env['dirty']} uncommitted files)" if env["dirty"] != "0" else "")


def _header(env: Mapping[str, str]) -> List[str]:
    """Title, machine, versions and settings of the run."""
    quick = " (QUICK smoke run: numbers are indicative only)" if env.get("quick") == "1" else ""
    upstream = "nginx `return 200`" if env["upstream_kind"] == "nginx" else "examples/bench_upstream (hyper)"
    return [
        "# idemproxy load benchmark" + quick, "",
        f"Run {env['date']} · commit {_commit(env)} · {env['ncpu']} × {env['cpu_model']} "
        f"· Linux {env['kernel']}",
        f"nginx {env['nginx']} · redis {env['redis']} · wrk {env['wrk']} · rustc {env['rustc']} · "
        f"upstream: {upstream}",
        f"wrk -t{env['wrk_threads']} -c{env['conns']} on core(s) {env['load_cpus']}; every server on core(s) "
        f"{env['server_cpus']}; {env['rounds']} interleaved rounds × {env['duration']} s per variant "
        f"(after {env['warmup']} s warm-up); idemproxy `--log-filter {env['proxy_log']}`, nginx `access_log off`; "
        f"load average {env['loadavg_start']} → {env.get('loadavg_end', '?')}.", "",
        "Medians over the rounds. CPU: server utime+stime per completed request, from /proc/PID/stat "
        "(proxy = idemproxy or nginx master+worker). Redis: calls per request by command, from INFO "
        "commandstats, which also counts the commands Lua scripts run inside Redis (no round trip): "
        "the exact round trips per request are the MONITOR calibration under the targets. "
        "RSS: proxy peak (VmHWM, reset before each run), max over rounds.", "",
    ]


TABLE_HEAD = [
    "| # | scenario | variant | req/s | p50 ms | p99 ms | CPU µs/req proxy | Redis | upstream | **total** "
    "| Redis calls/req by command | Redis cmds/req (all) | peak RSS MiB | non-2xx | req/s per round |",
    "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
]


def _non2xx(a: dict) -> str:
    """Non-2xx count, with 409 and 5xx when statuses were counted, and socket errors."""
    out = str(a["non2xx"])
    if a["status_counted"]:
        out += f" (409: {a['status']['409']}, 5xx: {a['status']['5xx']})"
    if a["socket_errors"]:
        out += f", socket errors: {a['socket_errors']}"
    return out


def table_row(key: Key, a: dict) -> str:
    """One variant's line of the results table."""
    num, scen, variant = LABELS[key]
    c = a["cpu"]
    redis = a["uses_redis"]
    return (f"| {num} | {scen} | {variant} | {a['rps']:,.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} "
            f"| {fmt(c.get('proxy'))} | {fmt(c.get('redis'))} | {fmt(c.get('upstream'))} | **{fmt(a['cpu_total'])}** "
            f"| {by_command(a['redis_by_command']) if redis else '—'} "
            f"| {fmt(a['redis_calls_per_req'], 2) if redis else '—'} "
            f"| {fmt(a['peak_rss_mib'])} | {_non2xx(a)} | {' / '.join(f'{x:,.0f}' for x in a['rps_rounds'])} |")


AB_HEAD = [
    "| # | scenario | variant | metric | this build | baseline | this/baseline | this build per round "
    "| baseline per round | beyond noise? |",
    "|---|---|---|---|--:|--:|--:|---|---|---|",
]
_DIGITS = {metric.name: metric.digits for metric in AB_METRICS}


def ab_row(row: Mapping, first: bool) -> str:
    """One metric of the A/B table; the scenario and variant only on a variant's `first` row."""
    num, scenario, variant = LABELS[(row["group"], row["variant"])] if first else ("", "", "")
    digits = _DIGITS[row["metric"]]
    ratio = "—" if row["ratio"] is None else f"**{row['ratio']:.3f}×**"
    verdict = row["verdict"] if row["verdict"] in ("within noise", "n/a") else f"**{row['verdict']}**"
    per_round = [" / ".join(fmt(x, digits) for x in row[side]) for side in ("this_rounds", "baseline_rounds")]
    return (f"| {num} | {scenario} | {variant} | {row['metric']} | {fmt(row['this'], digits)} "
            f"| {fmt(row['baseline'], digits)} | {ratio} | {per_round[0]} | {per_round[1]} | {verdict} |")


def ab_section(env: Mapping[str, str], rows: List[dict]) -> List[str]:
    """The A/B section of latest.md (`rows` from ab()); nothing without a baseline."""
    if not rows:
        return []
    keys = [(row["group"], row["variant"]) for row in rows]
    table = [ab_row(row, i == 0 or keys[i] != keys[i - 1]) for i, row in enumerate(rows)]
    return [
        f"## A/B: this build vs baseline `{env['baseline']}`", "",
        f"This build: commit {_commit(env)}; baseline: `BASELINE={env['baseline_revision']}`, commit "
        f"`{env['baseline']}`, built in release from a clean worktree and started with the same flags (its Redis "
        "store on database 1 of the same redis-server). Each baseline variant ran right after its idemproxy variant "
        "in every round. this/baseline: ratio of the medians (peak RSS: of the max over the rounds). Beyond noise: "
        "**better** or **worse** when every round of one build beats every round of the other; within noise when "
        "their ranges overlap.", "",
        *AB_HEAD, *table, "",
    ]


def _bullets(title: str, items: List[str]) -> List[str]:
    """`title`, then `items` as a list; nothing when there are none."""
    return [title, "", *(f"- {item}" for item in items), ""] if items else []


def _logs(logs: Mapping[str, Mapping[Tuple[str, str], int]]) -> List[str]:
    """The five most frequent warn/error lines of each proxy log (label -> counts)."""
    lines = []
    for label, counts in logs.items():
        if counts:
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
            lines.append(f"- {label}: " + "; ".join(f"{n} × {lvl} \"{msg}\"" for (lvl, msg), n in top))
    head = ["Proxy logs (warn and error lines): " + ("" if lines else "none."), ""]
    return head + lines + ([""] if lines else [])


def markdown(env: Mapping[str, str], agg: Agg, runs: List[dict], target_rows: List[Target],
             logs: Mapping[str, Mapping[Tuple[str, str], int]]) -> str:
    """latest.md: the table, the A/B against a baseline, the targets, floors, ratios, noise and
    proxy logs."""
    lines = _header(env) + TABLE_HEAD + [table_row(k, a) for k, a in agg.items()] + [""]
    lines += ab_section(env, ab(runs))
    lines += ["## Targets (issue 5)", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | **{result}** |" for name, measured, result in target_rows] + [""]
    lines += _bullets("Floors (information: what the HTTP stack and Redis cost before any idemproxy work):",
                      floors(agg))
    lines += _bullets("Also (information, no target):", information(agg, runs))
    noise_line = noise(agg)
    lines += [noise_line, ""] if noise_line else []
    lines += _logs(logs)
    lines.append("Chart: [latest.svg](latest.svg) · raw runs: [latest.json](latest.json) · re-run: "
                 "`benches/load.sh` (`QUICK=1` for a smoke run).")
    return "\n".join(lines) + "\n"


def to_json(env: Mapping[str, str], calibration: Mapping, runs: List[dict], agg: Agg,
            target_rows: List[Target]) -> str:
    """latest.json: the environment, the calibration, every run, the medians, the targets and,
    with a baseline, the A/B."""
    rows = ab(runs)
    return json.dumps({
        "env": env, "calibration": calibration, "runs": runs,
        "aggregate": [{"group": k[0], "variant": k[1], **v} for k, v in agg.items()],
        "targets": [{"target": t, "measured": m, "result": r} for t, m, r in target_rows],
        **({"ab": rows} if rows else {}),
    }, indent=1, ensure_ascii=True)
