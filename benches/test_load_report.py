"""Tests of the load benchmark's parsers and report (benches/load/), on small synthetic runs and
a real wrk output. Run: python3 -m unittest discover -s benches -p 'test_*.py'"""

from __future__ import annotations

import json
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

from load import chart, measure, parse, report, scenarios, servers, upload, wait
from load.config import ConfigError, from_env

TESTDATA = Path(__file__).resolve().parent / "testdata"
CLK_TCK = 100
REQUESTS = 10_000  # with CLK_TCK = 100, one clock tick is 1 µs per request

ENV = {
    "date": "2026-01-02T03:04:05Z", "quick": "0", "duration": "10", "warmup": "3", "rounds": "3",
    "conns": "32", "wrk_threads": "1", "storm_wave": "320", "proxy_log": "warn", "upstream_kind": "nginx",
    "load_cpus": "0", "server_cpus": "1", "clk_tck": str(CLK_TCK), "ncpu": "2", "cpu_model": "Test CPU",
    "kernel": "6.1.0", "nginx": "1.22.1", "redis": "7.0.15", "wrk": "4.1.0", "rustc": "1.95.0",
    "commit": "abc1234", "dirty": "0", "loadavg_start": "0.10 0.20 0.30", "loadavg_end": "0.40 0.50 0.60",
}
ROLES = {
    ("get", "direct"): {"upstream": "upstream"},
    ("get", "nginx"): {"nginx": "proxy", "upstream": "upstream"},
    ("get", "hyper-floor"): {"floor": "proxy", "upstream": "upstream"},
    ("get", "idemproxy"): {"idem_redis": "proxy", "redis": "redis", "upstream": "upstream"},
    ("post", "nginx"): {"nginx": "proxy", "upstream": "upstream"},
    ("post", "hyper-floor"): {"floor": "proxy", "upstream": "upstream"},
    ("post", "idemproxy"): {"idem_redis": "proxy", "redis": "redis", "upstream": "upstream"},
    ("new", "idemproxy-redis"): {"idem_redis": "proxy", "redis": "redis", "upstream": "upstream"},
    ("new", "idemproxy-embedded"): {"idem_mem": "proxy", "upstream": "upstream"},
    ("replay", "idemproxy-redis"): {"idem_redis": "proxy", "redis": "redis", "upstream": "upstream"},
    ("replay", "idemproxy-embedded"): {"idem_mem": "proxy", "upstream": "upstream"},
    ("storm", "idemproxy-redis"): {"idem_redis": "proxy", "redis": "redis", "upstream": "upstream"},
    ("storm", "idemproxy-embedded"): {"idem_mem": "proxy", "upstream": "upstream"},
    ("get", "idemproxy-baseline"): {"idem_redis_base": "proxy", "redis": "redis", "upstream": "upstream"},
    ("new", "idemproxy-embedded-baseline"): {"idem_mem_base": "proxy", "upstream": "upstream"},
    ("new", "embedded-json-fingerprint"): {"idem_json": "proxy", "upstream": "upstream"},
    **{(group, f"replicated-min{n}"): {f"idem_repl{n}": "proxy", "redis_primary": "redis", "redis_replica": "redis",
                                       "upstream": "upstream"}
       for group in ("new", "replay") for n in (0, 1)},
}
ROLES.update({(g, "idemproxy-disk"): {"idem_disk": "proxy", "upstream": "upstream"} for g in ("new", "replay", "storm")})
ALL_ROLES = ("upstream", "nginx", "floor", "redis", "idem_redis", "idem_mem", "idem_redis_base", "idem_mem_base",
             "redis_primary", "redis_replica", "idem_repl0", "idem_repl1", "idem_json", "idem_disk")
REPLICAS_TARGET = report.REPLICAS_TARGET
JSON_TARGET = report.JSON_FINGERPRINT_TARGET


def bench(requests=REQUESTS, rps=10_000.0, p50_us=500, p99_us=1200, s2xx=None, s409=0, s5xx=0):
    """A BENCH line's fields, as benches/wrk/common.lua prints them."""
    s2xx = requests - s409 - s5xx if s2xx is None else s2xx
    return {
        "requests": requests, "duration_us": round(requests / rps * 1e6), "bytes": 100 * requests,
        "err_connect": 0, "err_read": 0, "err_write": 0, "err_timeout": 0, "non2xx3xx": s409 + s5xx,
        "p50_us": p50_us, "p90_us": p50_us + 100, "p99_us": p99_us, "max_us": 5000, "mean_us": p50_us,
        "status_counted": 1, "s2xx": s2xx, "s3xx": 0, "s409": s409, "s4xx": 0, "s5xx": s5xx, "sother": 0,
    }


def sample(ticks=None, redis=None, stat=None, uticks=None):
    """A /proc + Redis sample: every role at `ticks` (role -> ticks), cores from `stat`; with
    `uticks` (role -> user ticks), the user ticks too, as the benchmark samples them now."""
    taken = {"ticks": {r: (ticks or {}).get(r, 1000) for r in ALL_ROLES}, "redis": dict(redis or {}),
             "stat": stat or {0: (0, 0), 1: (0, 0)}}
    if uticks is not None:
        taken["uticks"] = {r: uticks.get(r, 500) for r in ALL_ROLES}
    return taken


def run(group, variant, round_=1, rps=10_000.0, cpu=None, redis_calls=None, peaks=None, user=None, **bench_kw):
    """A run built by report.build_run; `cpu`: kind -> µs/req; `redis_calls`: command -> calls;
    `user`: kind -> user µs/req (samples without user ticks when None)."""
    roles = ROLES[(group, variant)]
    by_kind = {kind: role for role, kind in roles.items()}
    post_ticks = {by_kind[k]: 1000 + round(us) for k, us in (cpu or {}).items()}
    user_ticks = None if user is None else {by_kind[k]: 500 + round(us) for k, us in user.items()}
    pre = sample(redis={"info": 5}, uticks=None if user is None else {})
    post = sample(post_ticks, redis={"info": 7, **(redis_calls or {})}, uticks=user_ticks)
    peaks = peaks or {"idem_redis": 18 * 1024, "idem_mem": 30 * 1024, "nginx": 14 * 1024}
    meta = {"group": group, "variant": variant, "round": round_, "roles": roles}
    return report.build_run(meta, bench(rps=rps, **bench_kw), pre, post, peaks, CLK_TCK, None)


def full_runs():
    """Every variant of the benchmark, one round each, with round numbers for the targets."""
    return [
        run("get", "direct", cpu={"upstream": 5}, rps=125_000),
        run("get", "nginx", cpu={"proxy": 12, "upstream": 6}, rps=55_000),
        run("get", "hyper-floor", cpu={"proxy": 12, "upstream": 5}, rps=57_000),
        run("get", "idemproxy", cpu={"proxy": 13, "redis": 0, "upstream": 5}, rps=52_000),
        run("post", "nginx", cpu={"proxy": 14, "upstream": 7}, rps=46_000),
        run("post", "hyper-floor", cpu={"proxy": 12, "upstream": 5}, rps=55_000),
        run("post", "idemproxy", cpu={"proxy": 15, "redis": 0, "upstream": 6}, rps=46_000),
        run("new", "idemproxy-redis", cpu={"proxy": 27, "redis": 12, "upstream": 7}, rps=21_000,
            redis_calls={"set": 2 * REQUESTS, "get": REQUESTS, "evalsha": REQUESTS}),
        run("new", "idemproxy-embedded", cpu={"proxy": 26, "upstream": 7}, rps=29_000,
            peaks={"idem_redis": 18 * 1024, "idem_mem": 40 * 1024, "nginx": 14 * 1024}),
        run("replay", "idemproxy-redis", cpu={"proxy": 12, "redis": 2}, rps=69_000,
            redis_calls={"set": REQUESTS}),
        run("replay", "idemproxy-embedded", cpu={"proxy": 10}, rps=100_000),
        run("storm", "idemproxy-redis", cpu={"proxy": 13, "redis": 2}, rps=66_000, s409=300,
            redis_calls={"set": REQUESTS}),
        run("storm", "idemproxy-embedded", cpu={"proxy": 11}, rps=88_000, s409=500),
    ]


def replicated_runs(new1=16_000, replay1=66_000):
    """The replicated-Redis variants (issue 14), one round each: min_replicas 0 and 1, first
    executions (`new1` req/s with 1 against 20,000 with 0) and replays (`replay1` against 68,000)."""
    peaks = {"idem_redis": 18 * 1024, "idem_mem": 30 * 1024, "nginx": 14 * 1024, "idem_repl0": 19 * 1024,
             "idem_repl1": 21 * 1024}
    return [
        run("new", "replicated-min0", cpu={"proxy": 27, "redis": 14, "upstream": 7}, rps=20_000, peaks=peaks,
            redis_calls={"set": 2 * REQUESTS, "get": REQUESTS, "evalsha": REQUESTS}),
        run("new", "replicated-min1", cpu={"proxy": 29, "redis": 16, "upstream": 7}, rps=new1, peaks=peaks,
            redis_calls={"set": 2 * REQUESTS, "get": REQUESTS, "evalsha": REQUESTS, "wait": REQUESTS // 4}),
        run("replay", "replicated-min0", cpu={"proxy": 12, "redis": 2}, rps=68_000, peaks=peaks,
            redis_calls={"set": REQUESTS}),
        run("replay", "replicated-min1", cpu={"proxy": 12, "redis": 2}, rps=replay1, peaks=peaks,
            redis_calls={"set": REQUESTS}),
    ]


def json_fingerprint_runs(json_proxy=30.0, bytes_proxy=25.0, rounds=1):
    """The new-key embedded variants of issue 15, `rounds` interleaved rounds: the byte fingerprint
    (`bytes_proxy` proxy µs/req) and --fingerprint-body json (`json_proxy`), upstream 7 µs each."""
    peaks = {"idem_redis": 18 * 1024, "idem_mem": 30 * 1024, "nginx": 14 * 1024, "idem_json": 31 * 1024}
    return [run("new", variant, round_, cpu={"proxy": proxy, "upstream": 7}, rps=rps, peaks=peaks)
            for round_ in range(1, rounds + 1)
            for variant, proxy, rps in (("idemproxy-embedded", bytes_proxy, 29_000),
                                        ("embedded-json-fingerprint", json_proxy, 27_000))]


CALIBRATION = {
    "first-execution": {"requests": "100", "ok": "100", "replayed": "0", "top": "200", "nested": "200",
                        "commands": "EVALSHA=100,SET=100"},
    "replay": {"requests": "100", "ok": "100", "replayed": "100", "top": "100", "nested": "0",
               "commands": "SET=100"},
}


def wrk_text(rps="1000.00", p50="575.00us", p99="1.20ms", bench_line=None):
    """wrk's output with --latency and the BENCH line of common.lua: 1000 requests in 1 s."""
    requests = 1000
    fields = bench(requests=requests, rps=1000.0, p50_us=575, p99_us=1203)
    line = bench_line or "BENCH " + " ".join(f"{k}={v}" for k, v in fields.items())
    return (f"Running 1s test @ http://127.0.0.1:1/orders\n  1 threads and 32 connections\n"
            f"  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
            f"    Latency   600.00us  100.00us   5.00ms   90.00%\n"
            f"    Req/Sec     1.00k   100.00     1.10k    80.00%\n"
            f"  Latency Distribution\n     50%  {p50}\n     75%  650.00us\n     90%  800.00us\n     99%  {p99}\n"
            f"  {requests} requests in 1.00s, 97.66KB read\nRequests/sec: {rps:>9}\nTransfer/sec:     97.66KB\n"
            f"{line}\n")


class WrkParsing(unittest.TestCase):
    def test_duration_units(self):
        self.assertEqual(parse.duration_us("575.00us"), 575)
        self.assertEqual(parse.duration_us("1.20ms"), 1200)
        self.assertEqual(parse.duration_us("2.50s"), 2_500_000)
        self.assertEqual(parse.duration_us("1.50m"), 90_000_000)
        with self.assertRaises(parse.ParseError):
            parse.duration_us("1.20 parsecs")

    def test_summary(self):
        s = parse.wrk_summary(wrk_text(p50="0.98ms", p99="1.05s"))
        self.assertEqual(s["requests"], 1000)
        self.assertEqual(s["rps"], 1000.0)
        self.assertAlmostEqual(s["p50_us"], 980)
        self.assertAlmostEqual(s["p99_us"], 1_050_000)

    def test_output_is_the_bench_line_checked_against_the_summary(self):
        out = parse.wrk_output(wrk_text())
        self.assertEqual((out["requests"], out["p50_us"], out["p99_us"], out["s2xx"]), (1000, 575, 1203, 1000))

    def test_disagreement_with_the_summary_is_an_error(self):
        for text in (wrk_text(rps="990.00"), wrk_text(p99="1.50ms"), wrk_text(p50="575.00ms"),
                     wrk_text().replace("1000 requests in", "999 requests in")):
            with self.assertRaises(parse.ParseError):
                parse.wrk_output(text)

    def test_missing_pieces_are_errors(self):
        with self.assertRaisesRegex(parse.ParseError, "no BENCH"):
            parse.wrk_output(wrk_text(bench_line="done"))
        with self.assertRaisesRegex(parse.ParseError, "malformed"):
            parse.wrk_output(wrk_text(bench_line="BENCH requests=x"))
        no_latency = "\n".join(line for line in wrk_text().splitlines() if "%  " not in line)
        with self.assertRaisesRegex(parse.ParseError, "--latency"):
            parse.wrk_output(no_latency)

    def test_real_wrk_output(self):
        # Captured from benches/load.sh runs (QUICK=1 ONLY=get DURATION=1): ms and us latencies.
        cases = {
            "wrk-get-idemproxy.out": (8777, 1_010_614, 8684.82, 3788, 3790, 28688, 28690),
            "wrk-get-direct.out": (24676, 1_015_068, 24309.70, 263, 263, 11637, 11640),
        }
        for name, (requests, duration_us, rps, p50, p50_printed, p99, p99_printed) in cases.items():
            with self.subTest(name):
                text = (TESTDATA / name).read_text()
                out, summary = parse.wrk_output(text), parse.wrk_summary(text)
                self.assertEqual((out["requests"], out["duration_us"], out["p50_us"], out["p99_us"]),
                                 (requests, duration_us, p50, p99))
                self.assertEqual((out["status_counted"], out["s2xx"], out["non2xx3xx"]), (1, requests, 0))
                self.assertEqual(summary["rps"], rps)
                self.assertAlmostEqual(summary["p50_us"], p50_printed)
                self.assertAlmostEqual(summary["p99_us"], p99_printed)


class ProcAndRedisParsing(unittest.TestCase):
    def test_proc_stat_with_an_awkward_command_name(self):
        fields = "S 1 2 3 4 5 6 7 8 9 10 {} {} 0 0 20 0 1 0".format(150, 25)
        self.assertEqual(parse.proc_ticks(f"4242 (we (ird) name) {fields}"), 175)
        self.assertEqual(parse.proc_user_ticks(f"4242 (we (ird) name) {fields}"), 150)
        self.assertEqual(parse.proc_stat_fields(f"4242 (a) b) {fields}")[1], "1")

    def test_cpu_us_per_request_from_two_samples(self):
        # 50 ticks at 100 Hz = 0.5 s of CPU over 10,000 requests = 50 µs each.
        self.assertAlmostEqual(report.cpu_us_per_request(100, 150, 100, 10_000), 50.0)
        self.assertAlmostEqual(report.cpu_us_per_request(7, 7, 100, 10_000), 0.0)

    def test_proc_stat_cores(self):
        text = "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 1 5 100 4 1 2 0 0 0\ncpu1 1 0 1 50 0 0 0 1 0 0\nintr 1\n"
        self.assertEqual(parse.cpu_times(text), {0: (19, 123), 1: (3, 53)})

    def test_vm_hwm(self):
        self.assertEqual(parse.vm_hwm_kib("Name:\tx\nVmPeak:\t 9 kB\nVmHWM:\t   18852 kB\n"), 18852)
        with self.assertRaises(parse.ParseError):
            parse.vm_hwm_kib("Name:\tx\n")

    def test_commandstats(self):
        text = ("# Commandstats\r\ncmdstat_set:calls=20,usec=5,usec_per_call=0.25\r\n"
                "cmdstat_evalsha:calls=10,usec=9\r\ncmdstat_info:calls=3,usec=1\r\n")
        self.assertEqual(parse.commandstats(text), {"set": 20, "evalsha": 10, "info": 3})

    def test_monitor(self):
        lines = ["OK", '1700000000.000001 [0 127.0.0.1:5000] "EVALSHA" "abc" "1" "k"',
                 '1700000000.000002 [0 lua] "get" "k"', '1700000000.000003 [0 lua] "set" "k" "v"',
                 '1700000000.000004 [0 127.0.0.1:5000] "set" "k2" "v"',
                 '1700000000.000005 [0 127.0.0.1:5001] "PING"']
        self.assertEqual(parse.monitor(lines),
                         {"top": 2, "nested": 2, "background": 1, "commands": "EVALSHA=1,SET=1"})

    def test_cpu_ids(self):
        self.assertEqual(parse.cpu_ids("0,2-4"), {0, 2, 3, 4})
        self.assertIsNone(parse.cpu_ids(None))


class Runs(unittest.TestCase):
    def test_build_run(self):
        r = run("new", "idemproxy-redis", cpu={"proxy": 27, "redis": 12, "upstream": 7},
                redis_calls={"set": 2 * REQUESTS, "get": REQUESTS, "evalsha": REQUESTS})
        self.assertEqual(r["cpu_us_per_req"], {"proxy": 27.0, "redis": 12.0, "upstream": 7.0})
        self.assertEqual(r["cpu_us_per_req_total"], 46.0)
        self.assertEqual(r["redis_calls"], {"set": 20_000, "get": 10_000, "evalsha": 10_000})  # no INFO
        self.assertEqual(r["redis_calls_per_req"], 4.0)
        self.assertEqual(r["redis_scripts_per_req"], 1.0)
        self.assertEqual(r["redis_by_command"], {"set": 2.0, "get": 1.0, "evalsha": 1.0})
        self.assertEqual(r["peak_rss_mib"], 18.0)
        self.assertAlmostEqual(r["rps"], 10_000.0)
        self.assertEqual((r["p50_ms"], r["p99_ms"]), (0.5, 1.2))

    def test_replicated_redis_cpu_is_primary_plus_replica(self):
        roles = ROLES[("new", "replicated-min1")]
        pre, post = sample(), sample({"idem_repl1": 1029, "redis_primary": 1015, "redis_replica": 1006, "redis": 1500})
        r = report.build_run({"group": "new", "variant": "replicated-min1", "round": 1, "roles": roles}, bench(),
                             pre, post, {"idem_repl1": 20 * 1024}, CLK_TCK, None)
        self.assertEqual(r["cpu_us_per_req"], {"proxy": 29.0, "redis": 21.0, "upstream": 0.0})
        self.assertEqual((r["cpu_us_per_req_total"], r["peak_rss_mib"]), (50.0, 20.0))

    def test_floor_has_no_peak_rss(self):
        self.assertIsNone(run("get", "hyper-floor", cpu={"proxy": 12})["peak_rss_mib"])

    def test_core_shares(self):
        pre = {0: (0, 0), 1: (100, 1000)}
        post = {0: (50, 100), 1: (190, 1100)}
        # core 1: 90 of 100 jiffies busy, 80 of them ours: 10 % foreign.
        busy, foreign = report.core_shares(pre, post, {1}, 80)
        self.assertAlmostEqual(busy, 0.9)
        self.assertAlmostEqual(foreign, 0.1)
        self.assertEqual(report.core_shares(pre, post, None, 80), (None, None))

    def test_median_across_interleaved_rounds(self):
        runs = []
        for round_, (a, b) in enumerate([(100, 10), (400, 40), (200, 20)], 1):
            runs.append(run("get", "nginx", round_, rps=a * 100, cpu={"proxy": a / 10, "upstream": 1}))
            runs.append(run("get", "idemproxy", round_, rps=b * 100, cpu={"proxy": b, "upstream": 1},
                            peaks={"idem_redis": 1024 * b, "idem_mem": 0, "nginx": 0}))
        agg = report.aggregate(runs)
        self.assertEqual(list(agg), [("get", "nginx"), ("get", "idemproxy")])
        nginx, idem = agg[("get", "nginx")], agg[("get", "idemproxy")]
        self.assertEqual(nginx["rounds"], 3)
        self.assertAlmostEqual(nginx["rps"], 20_000)
        self.assertEqual(nginx["rps_rounds"], [10_000, 40_000, 20_000])
        self.assertAlmostEqual(nginx["cpu"]["proxy"], 20.0)
        self.assertAlmostEqual(idem["cpu_total"], 21.0)
        self.assertEqual(list(idem["cpu"]), ["proxy", "redis", "upstream"])
        self.assertEqual(idem["peak_rss_mib"], 40.0)  # the max, not the median
        self.assertEqual(idem["requests"], 3 * REQUESTS)

    def test_redis_commands_per_request(self):
        runs = [run("replay", "idemproxy-redis", r, cpu={"proxy": 12, "redis": 2}, redis_calls={"set": n})
                for r, n in enumerate((REQUESTS, 3 * REQUESTS, REQUESTS // 2), 1)]
        a = report.aggregate(runs)[("replay", "idemproxy-redis")]
        self.assertEqual(a["redis_calls_per_req"], 1.0)
        self.assertEqual(a["redis_by_command"], {"set": 1.0})
        self.assertTrue(a["uses_redis"])
        self.assertEqual(report.by_command({"set": 2.0, "get": 1.0, "evalsha": 1.004}),
                         "SET 2.00 · EVALSHA 1.00 · GET 1.00")
        self.assertEqual(report.by_command({"get": 0.001}), "none")

    def test_embedded_growth(self):
        runs = [run("get", "nginx", cpu={"proxy": 1}, peaks={"idem_mem": 1000, "idem_redis": 0, "nginx": 0}),
                run("new", "idemproxy-embedded", cpu={"proxy": 1},
                    peaks={"idem_mem": 1000 + 2 * REQUESTS, "idem_redis": 0, "nginx": 0})]
        self.assertAlmostEqual(report.embedded_growth_kib(runs), 2.0)
        self.assertIsNone(report.embedded_growth_kib(runs[:1]))


class Targets(unittest.TestCase):
    def results(self, runs, calibration=CALIBRATION):
        return {name: (measured, result)
                for name, measured, result in report.targets(report.aggregate(runs), calibration)}

    def test_all_measured(self):
        results = self.results(full_runs())
        self.assertEqual([r for _, r in results.values()], ["FAIL", "FAIL", "FAIL", "PASS", "PASS", "PASS", "PASS"])
        get = results["GET pass-through: idemproxy CPU µs/req ≤ nginx's"][0]
        self.assertIn("13.0 vs 12.0 µs = **1.08×**", get)
        new = results["keyed first execution (Redis): total CPU ≤ 1.5 × nginx keyless POST total"][0]
        self.assertEqual(new, "46.0 µs vs 1.5 × 21.0 = 31.5 µs (**2.19×** nginx POST)")
        storm = results["retry storm (Redis): ≥ 0.5 × replay throughput, no 5xx"][0]
        self.assertIn("66,000 vs 69,000 req/s = **0.96×**; 2xx 9700, 409 300", storm)
        self.assertIn("SET 2.00 · GET 1.00 · EVALSHA 1.00", results["Redis commands: exactly 2 per first execution"][0])
        self.assertEqual(results["peak RSS < 64 MiB under load (idemproxy, Redis store)"][0], "**18.0 MiB**")

    def test_ratios_at_the_limit_pass(self):
        runs = [run("get", "nginx", cpu={"proxy": 12, "upstream": 6}),
                run("get", "idemproxy", cpu={"proxy": 12, "upstream": 6}),
                run("replay", "idemproxy-redis", cpu={"proxy": 9, "redis": 1}, redis_calls={"set": REQUESTS})]
        results = self.results(runs, {})
        self.assertEqual(results["GET pass-through: idemproxy CPU µs/req ≤ nginx's"][1], "PASS")
        # 10.0 ≤ 0.6 × 18.0 = 10.8
        self.assertEqual(results["replay (Redis): total CPU ≤ 0.6 × nginx GET total"][1], "PASS")

    def test_storm_with_5xx_fails(self):
        runs = [run("replay", "idemproxy-redis", cpu={"proxy": 12}, rps=60_000),
                run("storm", "idemproxy-redis", cpu={"proxy": 12}, rps=50_000, s5xx=1)]
        self.assertEqual(self.results(runs, {})["retry storm (Redis): ≥ 0.5 × replay throughput, no 5xx"][1], "FAIL")

    def test_calibration_needs_every_request_answered(self):
        cal = {"replay": dict(CALIBRATION["replay"], ok="99")}
        self.assertEqual(self.results([], cal)["Redis commands: exactly 1 per replay"][1], "FAIL")
        cal = {"replay": dict(CALIBRATION["replay"], top="101")}
        self.assertEqual(self.results([], cal)["Redis commands: exactly 1 per replay"][1], "FAIL")

    def test_nothing_run_is_not_applicable(self):
        results = self.results([], {})
        self.assertEqual(len(results), 7)
        self.assertEqual(set(results.values()), {("not run", "n/a")})

    def test_replica_target_only_with_replicated_runs(self):
        # Without the replicated variants (older reports, ONLY without new and replay) the
        # targets are the seven they were; with them, the replica target comes last.
        self.assertNotIn(REPLICAS_TARGET, self.results(full_runs()))
        results = self.results(full_runs() + replicated_runs())
        self.assertEqual(list(results)[-1], REPLICAS_TARGET)
        self.assertEqual([r for _, r in results.values()],
                         ["FAIL", "FAIL", "FAIL", "PASS", "PASS", "PASS", "PASS", "PASS"])
        self.assertEqual(results[REPLICAS_TARGET][0],
                         "first executions 16,000 vs 20,000 req/s = **0.80×** (p99 1.20 vs 1.20 ms); "
                         "replays 66,000 vs 68,000 req/s = **0.97×** (p99 1.20 vs 1.20 ms)")
        # The replicated idemproxies are not the Redis-store idemproxy of the RSS target.
        self.assertEqual(results["peak RSS < 64 MiB under load (idemproxy, Redis store)"][0], "**18.0 MiB**")

    def test_replica_target_limits(self):
        def agg(new0, new1, replay0, replay1):
            figures = {"new": (new0, new1), "replay": (replay0, replay1)}
            return {(g, f"replicated-min{n}"): {"rps": figures[g][n], "p99_ms": 1.0} for g in figures for n in (0, 1)}
        self.assertEqual(report.target_replicas(agg(20_000, 14_000, 10_000, 9_000))[2], "PASS")  # exactly 0.7×, 0.9×
        self.assertEqual(report.target_replicas(agg(20_000, 13_999, 10_000, 10_000))[2], "FAIL")
        self.assertEqual(report.target_replicas(agg(20_000, 14_000, 10_000, 8_999))[2], "FAIL")
        cases = [  # (new with 1 req/s against 20,000, replay with 1 against 68,000) -> result
            ((14_100, 61_300), "PASS"),  # just above 0.7× and 0.9×
            ((13_900, 68_000), "FAIL"),  # first executions below 0.7×
            ((20_000, 61_000), "FAIL"),  # replays below 0.9×
            ((30_000, 80_000), "PASS"),  # faster is fine
        ]
        for (new1, replay1), expected in cases:
            with self.subTest(new1=new1, replay1=replay1):
                self.assertEqual(self.results(replicated_runs(new1, replay1), {})[REPLICAS_TARGET][1], expected)

    def test_replica_target_judges_the_halves_that_ran(self):
        runs = replicated_runs(new1=13_000, replay1=67_000)
        only_new, only_replay = runs[:2], runs[2:]
        self.assertEqual(self.results(only_new, {})[REPLICAS_TARGET][1], "FAIL")
        measured, result = self.results(only_replay, {})[REPLICAS_TARGET]
        self.assertEqual((measured, result), ("replays 67,000 vs 68,000 req/s = **0.99×** (p99 1.20 vs 1.20 ms)", "PASS"))
        # One variant of a pair alone measures nothing.
        self.assertEqual(self.results(runs[:1], {})[REPLICAS_TARGET], ("not run", "n/a"))


class JsonFingerprintTarget(unittest.TestCase):
    def results(self, runs):
        return {name: (measured, result)
                for name, measured, result in report.targets(report.aggregate(runs), CALIBRATION)}

    def test_only_when_both_fingerprints_ran(self):
        # Older reports (no JSON-fingerprint variant) keep their seven targets; one variant of
        # the pair alone measures nothing and adds no line.
        self.assertNotIn(JSON_TARGET, self.results(full_runs()))
        json_run = json_fingerprint_runs()[1]
        self.assertNotIn(JSON_TARGET, self.results([json_run]))
        self.assertNotIn(JSON_TARGET, self.results(full_runs()[:8] + [json_run]))
        results = self.results(full_runs() + json_fingerprint_runs()[1:])
        self.assertEqual(list(results)[-1], JSON_TARGET)
        self.assertEqual(len(results), 8)
        # After the replica target when both ran.
        results = self.results(full_runs() + replicated_runs() + json_fingerprint_runs()[1:])
        self.assertEqual(list(results)[-2:], [REPLICAS_TARGET, JSON_TARGET])

    def test_measured(self):
        measured, result = self.results(json_fingerprint_runs(json_proxy=29, bytes_proxy=25))[JSON_TARGET]
        self.assertEqual(measured, "29.0 vs 25.0 µs = **1.16×** (totals with upstream: 36.0 vs 32.0 µs; "
                                   "27,000 vs 29,000 req/s)")
        self.assertEqual(result, "PASS")

    def test_limit_is_proxy_cpu(self):
        cases = [  # (json, bytes proxy µs/req) -> result
            ((30, 25), "PASS"),  # exactly 1.2×
            ((31, 25), "FAIL"),  # 1.24×
            ((24, 25), "PASS"),  # cheaper is fine
        ]
        for (json_proxy, bytes_proxy), expected in cases:
            with self.subTest(json_proxy=json_proxy, bytes_proxy=bytes_proxy):
                runs = json_fingerprint_runs(json_proxy, bytes_proxy)
                self.assertEqual(self.results(runs)[JSON_TARGET][1], expected)
        # The proxy's CPU is judged, not the total: 31 + 7 = 38 ≤ 1.2 × (25 + 7) = 38.4 still fails.
        self.assertEqual(self.results(json_fingerprint_runs(31, 25))[JSON_TARGET][1], "FAIL")

    def test_medians_over_the_rounds(self):
        runs = json_fingerprint_runs(json_proxy=30, bytes_proxy=25, rounds=3)
        runs[1] = run("new", "embedded-json-fingerprint", 1, cpu={"proxy": 90, "upstream": 7}, rps=9_000)
        self.assertIn("30.0 vs 25.0 µs = **1.20×**", self.results(runs)[JSON_TARGET][0])


class FloorsAndRatios(unittest.TestCase):
    def test_floors(self):
        floors = report.floors(report.aggregate(full_runs()))
        self.assertEqual(len(floors), 4)
        self.assertIn("costs 12.0 µs = 1.00× nginx; idemproxy's own per-request work", floors[0])
        self.assertIn("adds 1.0 µs on top of it. The target leaves it 0.0 µs.", floors[0])
        self.assertEqual(floors[1], "keyless POST: bare hyper forwarder 12.0 µs = 0.86× nginx; idemproxy 15.0 µs, its "
                                    "own per-request work 3.0 µs above the floor. Instructions per request of both "
                                    "(deterministic, for comparing builds): benches/instructions.sh.")
        self.assertIn("10.0 + 2.0 = 12.0 µs = **0.67×** nginx GET (target ≤ 0.6× = 10.8 µs)", floors[2])
        self.assertIn("15.0 + 12.0 + 7.0 = 34.0 µs = **1.62×** nginx keyless POST", floors[3])

    def test_floors_in_user_time_when_it_was_sampled(self):
        runs = [run("get", "nginx", cpu={"proxy": 12, "upstream": 6}, user={"proxy": 4}),
                run("get", "hyper-floor", cpu={"proxy": 12, "upstream": 5}, user={"proxy": 3}),
                run("get", "idemproxy", cpu={"proxy": 13, "redis": 0, "upstream": 5}, user={"proxy": 5}),
                run("post", "nginx", cpu={"proxy": 14, "upstream": 7}, user={"proxy": 5}),
                run("post", "hyper-floor", cpu={"proxy": 12, "upstream": 5}, user={"proxy": 4}),
                run("post", "idemproxy", cpu={"proxy": 15, "redis": 0, "upstream": 6}, user={"proxy": 7})]
        self.assertEqual(runs[2]["cpu_user_us_per_req"], {"proxy": 5.0, "redis": 0.0, "upstream": 0.0})
        floors = report.floors(report.aggregate(runs))
        self.assertTrue(floors[0].endswith("The target leaves it 0.0 µs. In user time alone: idemproxy 5.0 µs, "
                                           "the floor 3.0 µs, own work 2.0 µs."), floors[0])
        self.assertIn("own per-request work 3.0 µs above the floor. In user time alone: idemproxy 7.0 µs, the floor "
                      "4.0 µs, own work 3.0 µs. Instructions per request", floors[1])

    def test_no_user_time_when_a_round_lacks_it(self):
        runs = [run("get", "nginx", cpu={"proxy": 12}), run("get", "hyper-floor", cpu={"proxy": 12}),
                run("get", "idemproxy", cpu={"proxy": 13}, user={"proxy": 5}, round_=1),
                run("get", "idemproxy", cpu={"proxy": 13}, round_=2)]
        agg = report.aggregate(runs)
        self.assertNotIn("proxy_user", agg[("get", "idemproxy")])
        self.assertNotIn("user time", report.floors(agg)[0])

    def test_floors_need_their_variants(self):
        self.assertEqual(report.floors(report.aggregate(full_runs()[4:7])), [
            "keyless POST: bare hyper forwarder 12.0 µs = 0.86× nginx; idemproxy 15.0 µs, its own per-request "
            "work 3.0 µs above the floor. Instructions per request of both (deterministic, for comparing builds): "
            "benches/instructions.sh."])

    def test_information(self):
        runs = full_runs()
        info = report.information(report.aggregate(runs), runs)
        self.assertIn("replay, embedded: 10.0 µs total = 0.56× nginx GET (target ≤ 0.6×)", info)
        self.assertIn("peak RSS, embedded store: 40.0 MiB (it holds every record of the run in memory; "
                      "it grew ≈ 1.0 KiB per stored record in scenario 5)", info)
        self.assertTrue(any(line.startswith("GET vs nginx: 0.95× throughput") for line in info))


class DiskStore(unittest.TestCase):
    def test_disk_store_against_the_memory_store(self):
        runs = full_runs() + [
            run("new", "idemproxy-disk", cpu={"proxy": 40, "upstream": 7}, rps=14_500),
            run("replay", "idemproxy-disk", cpu={"proxy": 12}, rps=90_000),
        ]
        info = report.information(report.aggregate(runs), runs)
        self.assertIn("disk store first executions: 14,500 vs memory 29,000 req/s = **0.50×** "
                      "(issue 13 target ≥ 0.5×: PASS)", info)
        self.assertIn("disk store replay: proxy CPU 12.0 vs memory 10.0 µs/req = **1.20×** "
                      "(issue 13 target ≤ 1.2×: PASS)", info)
        self.assertFalse(any(line.startswith("disk store") for line in report.information(
            report.aggregate(full_runs()), full_runs())), "no disk runs, no disk lines")

    def test_disk_store_rows_have_no_baseline_label(self):
        runs = full_runs() + [run(g, "idemproxy-disk", cpu={"proxy": 12}) for g in ("new", "replay", "storm")]
        agg = report.aggregate(runs)
        md = report.markdown(ENV, agg, runs, report.targets(agg, CALIBRATION), {})
        self.assertIn("| 9 | keyed POST 1 KiB, every key new | idemproxy, disk store |", md)
        self.assertIn("| 9 | retry storm (32 conns, one key per wave) | idemproxy, disk store |", md)
        self.assertNotIn(("new", "idemproxy-disk-baseline"), report.LABELS)
        self.assertEqual([k for k in report.ORDER if k[1] == "idemproxy-disk"],
                         [("new", "idemproxy-disk"), ("replay", "idemproxy-disk"), ("storm", "idemproxy-disk")])
        self.assertEqual(report.ab(runs), [])

    def test_disk_store_idemproxy_roles_ports_and_flags(self):
        roles = scenarios.idemproxy_roles(True, True, True, True)
        self.assertEqual(roles, ("idem_redis", "idem_mem", "idem_json", "idem_repl0", "idem_repl1", "idem_disk",
                                 "idem_redis_base", "idem_mem_base"))
        self.assertEqual(scenarios.idemproxy_roles(False, disk=True), ("idem_redis", "idem_mem", "idem_disk"))
        self.assertTrue(all(scenarios.needs_disk((g,)) for g in ("new", "replay", "storm")))
        self.assertFalse(scenarios.needs_disk(("get", "post")))
        self.assertEqual(scenarios.idemproxy_label("idem_disk"), "idemproxy (disk store)")
        self.assertFalse(scenarios.is_baseline("idem_disk") or scenarios.has_redis_store("idem_disk"))
        self.assertIn("idem_disk", measure.PEAK_ROLES)
        ports = servers.pick_ports(roles)
        every = [ports.upstream, ports.nginx, ports.redis, ports.floor, *ports.replicated,
                 *(p for pair in ports.idemproxies.values() for p in pair)]
        self.assertEqual(len(set(every)), 22)
        self.assertIn(ports.url("idem_disk"), [ports.url(e) for e in ports.endpoints()])
        settings = from_env({}, Path("/r"), 2)
        self.assertEqual(servers._store_flags("idem_disk", settings, ports, Path("/tmp/x")),
                         ["--embedded-store", "disk", "--data-dir", "/tmp/x/disk-data"])
        self.assertEqual(servers._policy_flags("idem_disk"), [])
        # This build's memory store is asked for (its default is the disk store); the baseline's
        # flags stay those an older build knows, and its environment asks for the memory store.
        self.assertEqual(servers._store_flags("idem_mem", settings, ports),
                         ["--embedded-store", "memory", "--memory-max-entries", "10000000"])
        self.assertEqual(servers._store_flags("idem_mem_base", settings, ports), ["--memory-max-entries", "10000000"])
        self.assertEqual(servers._idemproxy_env("idem_mem_base").get("IDEMPROXY_EMBEDDED_STORE"), "memory")
        for role in ("idem_mem", "idem_disk", "idem_redis_base"):
            self.assertNotIn("IDEMPROXY_EMBEDDED_STORE", servers._idemproxy_env(role))

    def test_the_committed_report_re_renders_byte_identically(self):
        # benches/results/: runs measured before the disk store; rendering them again changes nothing.
        results = Path(__file__).resolve().parent / "results"
        data = json.loads((results / "latest.json").read_text())
        agg = report.aggregate(data["runs"])
        target_rows = report.targets(agg, data["calibration"])
        self.assertEqual(report.markdown(data["env"], agg, data["runs"], target_rows, {}),
                         (results / "latest.md").read_text())
        self.assertEqual(report.to_json(data["env"], data["calibration"], data["runs"], agg, target_rows),
                         (results / "latest.json").read_text())
        self.assertEqual(chart.svg(data["env"], agg), (results / "latest.svg").read_text())


class Outputs(unittest.TestCase):
    def outputs(self, env=ENV, runs=None):
        runs = full_runs() if runs is None else runs
        agg = report.aggregate(runs)
        rows = report.targets(agg, CALIBRATION)
        logs = {"idemproxy (Redis store)": {("WARN", "slow upstream"): 2}, "idemproxy (embedded store)": {}}
        md = report.markdown(env, agg, runs, rows, logs)
        return runs, agg, rows, md

    def test_markdown_table_shape(self):
        _, agg, _, md = self.outputs()
        lines = md.splitlines()
        start = lines.index(report.TABLE_HEAD[0])
        table = lines[start:start + 2 + len(agg)]
        self.assertEqual(table[1], report.TABLE_HEAD[1])
        self.assertEqual({line.count("|") for line in table}, {16})
        self.assertEqual(lines[start + 2 + len(agg)], "")
        numbers = [line.split("|")[1].strip() for line in table[2:]]
        self.assertEqual(numbers, ["1"] * 4 + ["2"] * 3 + ["3", "4", "5", "5", "6", "6"])
        self.assertIn("| 1 | GET pass-through, small body | direct to upstream | 125,000 | 0.50 | 1.20 | — | — "
                      "| 5.0 | **5.0** | — | — | — | 0 (409: 0, 5xx: 0) | 125,000 |", table)
        self.assertIn("| SET 2.00 · GET 1.00 · EVALSHA 1.00 | 4.00 |", table[9])

    def test_markdown_sections(self):
        _, _, rows, md = self.outputs()
        self.assertTrue(md.startswith("# idemproxy load benchmark\n"))
        for heading in ("## Targets (issue 5)", "Floors (information:", "Also (information, no target):",
                        'Proxy logs (warn and error lines): \n\n- idemproxy (Redis store): 2 × WARN "slow upstream"'):
            self.assertIn(heading, md)
        self.assertEqual(md.count("| **PASS** |") + md.count("| **FAIL** |"), len(rows))
        self.assertTrue(md.endswith("(`QUICK=1` for a smoke run).\n"))

    def test_quick_run_is_labelled(self):
        _, _, _, md = self.outputs(dict(ENV, quick="1", dirty="2"))
        self.assertIn("(QUICK smoke run: numbers are indicative only)", md.splitlines()[0])
        self.assertIn("commit `abc1234` (+2 uncommitted files)", md)

    def test_json_round_trip(self):
        runs, agg, rows, _ = self.outputs()
        data = json.loads(report.to_json(ENV, CALIBRATION, runs, agg, rows))
        self.assertEqual(data["env"], ENV)
        self.assertEqual(data["calibration"], CALIBRATION)
        self.assertEqual(data["runs"], runs)
        # The stored runs are enough to recompute the medians and targets.
        again = report.aggregate(data["runs"])
        self.assertEqual([{"group": k[0], "variant": k[1], **v} for k, v in again.items()], data["aggregate"])
        self.assertEqual([(t["target"], t["measured"], t["result"]) for t in data["targets"]],
                         report.targets(again, data["calibration"]))

    def test_replicated_rows_and_target_in_markdown(self):
        _, agg, rows, md = self.outputs(runs=full_runs() + replicated_runs())
        lines = md.splitlines()
        start = lines.index(report.TABLE_HEAD[0])
        table = lines[start + 2:start + 2 + len(agg)]
        self.assertEqual([line.split("|")[1].strip() for line in table],
                         ["1"] * 4 + ["2"] * 3 + ["3", "4", "5", "5", "6", "6", "7", "7", "8", "8"])
        self.assertTrue(table[-4].startswith("| 7 | keyed POST 1 KiB, every key new | idemproxy, replicated Redis, "
                                             "min_replicas 0 | 20,000 |"))
        self.assertIn("| SET 2.00 · GET 1.00 · EVALSHA 1.00 · WAIT 0.25 | 4.25 | 21.0 |", table[-3])
        self.assertIn("| 8 | keyed POST 1 KiB, same key (replay) | idemproxy, replicated Redis, min_replicas 1 |",
                      table[-1])
        self.assertEqual(rows[-1][0], REPLICAS_TARGET)
        self.assertIn(f"| {REPLICAS_TARGET} | first executions 16,000 vs 20,000 req/s = **0.80×**", md)
        self.assertEqual(md.count("| **PASS** |") + md.count("| **FAIL** |"), 8)

    def test_nothing_changes_without_replicated_runs(self):
        # What the committed latest.json holds: no replicated variant, so no row, target or label.
        _, agg, rows, md = self.outputs()
        self.assertEqual(len(rows), 7)
        self.assertNotIn("replicated", md)
        self.assertNotIn("min_replicas", md)
        self.assertNotIn("replicated", chart.svg(ENV, agg))

    def test_json_fingerprint_row_and_target_in_markdown(self):
        _, agg, rows, md = self.outputs(runs=full_runs() + json_fingerprint_runs()[1:])
        lines = md.splitlines()
        start = lines.index(report.TABLE_HEAD[0])
        table = lines[start + 2:start + 2 + len(agg)]
        # Right after the embedded first executions it is measured against, under scenario 5.
        self.assertEqual([line.split("|")[1].strip() for line in table],
                         ["1"] * 4 + ["2"] * 3 + ["3", "4", "5", "5", "5", "6", "6"])
        self.assertTrue(table[9].startswith("| 5 | keyed POST 1 KiB, every key new | idemproxy, embedded | "))
        self.assertTrue(table[10].startswith("| 5 | keyed POST 1 KiB, every key new | idemproxy, embedded, "
                                             "--fingerprint-body json | 27,000 |"), table[10])
        self.assertIn("| 30.0 | — | 7.0 | **37.0** | — | — | 31.0 |", table[10])
        self.assertEqual(rows[-1][0], JSON_TARGET)
        self.assertIn(f"| {JSON_TARGET} | 30.0 vs 26.0 µs = **1.15×**", md)
        self.assertEqual(md.count("| **PASS** |") + md.count("| **FAIL** |"), 8)
        self.assertIn("--fingerprint-body json", chart.svg(ENV, agg))
        # It has no baseline twin, so no A/B row either.
        self.assertEqual(report.ab(full_runs() + json_fingerprint_runs()[1:]), [])

    def test_nothing_changes_without_the_json_fingerprint_variant(self):
        # What the committed latest.json holds: no JSON-fingerprint variant, so no row or target.
        _, agg, rows, md = self.outputs()
        self.assertEqual(len(rows), 7)
        self.assertNotIn("fingerprint-body", md)
        self.assertNotIn("JSON fingerprint", md)
        self.assertNotIn("fingerprint-body", chart.svg(ENV, agg))

    def test_svg_is_well_formed(self):
        env = dict(ENV, commit="<a&b>")
        _, agg, _, _ = self.outputs(env)
        root = ET.fromstring(chart.svg(env, agg))
        self.assertEqual(root.tag, "{http://www.w3.org/2000/svg}svg")
        ns = {"s": "http://www.w3.org/2000/svg"}
        labels = [t.text for t in root.findall("s:text", ns) if t.get("text-anchor") == "end"]
        self.assertEqual(len(labels), len(agg))
        self.assertEqual(labels[0], "1. GET · direct to upstream")
        self.assertIn("<a&b>", root.find("s:text", ns).text)
        rps_bars = [r for r in root.findall("s:rect", ns) if r.get("fill") == "#59a14f"]
        self.assertEqual(max(float(r.get("width")) for r in rps_bars), chart.PANEL_W)

    def test_empty_run_gives_an_empty_chart(self):
        ET.fromstring(chart.svg(ENV, {}))

    def test_log_summary(self):
        lines = ['{"level":"WARN","fields":{"message":"slow"}}', "not json", "[1]",
                 '{"level":"info","fields":{"message":"up"}}', '{"level":"ERROR","message":"boom"}',
                 '{"level":"WARN","fields":{"message":"slow"}}']
        self.assertEqual(report.log_summary(lines), {("WARN", "slow"): 2, ("ERROR", "boom"): 1})


def ab_runs():
    """GET through this build and the baseline, interleaved over 3 rounds: this build has more
    req/s and less CPU in every round, a p99 within the baseline's range and a higher peak RSS."""
    this = [(52_000, 1200, 13, 18), (54_000, 1300, 14, 19), (53_000, 1100, 13, 18)]
    base = [(50_000, 1250, 15, 17), (51_000, 1150, 16, 17), (49_000, 1400, 15, 17)]
    runs = []
    for round_, (t, b) in enumerate(zip(this, base), 1):
        for variant, (rps, p99_us, proxy, rss), role in (("idemproxy", t, "idem_redis"),
                                                         ("idemproxy-baseline", b, "idem_redis_base")):
            runs.append(run("get", variant, round_, rps=rps, p99_us=p99_us, cpu={"proxy": proxy, "upstream": 5},
                            peaks={role: rss * 1024, "idem_mem": 30 * 1024, "nginx": 14 * 1024}))
    return runs


class Baseline(unittest.TestCase):
    def test_variants_with_a_baseline(self):
        plain, paired = scenarios.groups(320, False), scenarios.groups(320, True)
        self.assertEqual([v.name for v in paired["get"]],
                         ["direct", "nginx", "hyper-floor", "idemproxy", "idemproxy-baseline"])
        # The replicated-Redis variants have no baseline twin (an older build lacks
        # --redis-min-replicas).
        # Neither has the JSON-fingerprint variant (an older build lacks --fingerprint-body); it
        # runs in the new-key group only, right after the embedded variant it is compared with.
        # Nor the disk-store variant (an older build lacks --embedded-store and --data-dir), in the
        # three keyed groups.
        self.assertEqual([v.name for v in plain["new"]],
                         ["idemproxy-redis", "idemproxy-embedded", "embedded-json-fingerprint", "idemproxy-disk",
                          "replicated-min0", "replicated-min1"])
        self.assertEqual([v.name for v in paired["new"]],
                         ["idemproxy-redis", "idemproxy-redis-baseline", "idemproxy-embedded",
                          "idemproxy-embedded-baseline", "embedded-json-fingerprint", "idemproxy-disk",
                          "replicated-min0", "replicated-min1"])
        self.assertEqual([v.name for v in plain["replay"]],
                         ["idemproxy-redis", "idemproxy-embedded", "idemproxy-disk", "replicated-min0",
                          "replicated-min1"])
        self.assertEqual([v.name for v in paired["replay"]],
                         ["idemproxy-redis", "idemproxy-redis-baseline", "idemproxy-embedded",
                          "idemproxy-embedded-baseline", "idemproxy-disk", "replicated-min0", "replicated-min1"])
        self.assertEqual([v.name for v in paired["storm"]],
                         ["idemproxy-redis", "idemproxy-redis-baseline", "idemproxy-embedded",
                          "idemproxy-embedded-baseline", "idemproxy-disk"])
        for group in ("get", "post", "storm"):
            self.assertFalse(any(v.name.startswith("replicated") for v in paired[group]))
        for group in ("get", "post", "replay", "storm"):
            self.assertFalse(any(v.endpoint == "idem_json" for v in paired[group]))
        for group, variants in plain.items():
            with self.subTest(group):
                self.assertFalse(any(v.name.endswith("-baseline") for v in variants))
                self.assertEqual([v for v in paired[group] if not v.name.endswith("-baseline")], variants)
        redis, redis_base = paired["storm"][:2]
        self.assertEqual((redis_base.endpoint, redis_base.script, redis_base.args),
                         ("idem_redis_base", redis.script, redis.args))
        self.assertEqual(redis_base.role_kinds(), {"idem_redis_base": "proxy", "redis": "redis", "upstream": "upstream"})
        self.assertEqual(paired["replay"][3].role_kinds(), {"idem_mem_base": "proxy", "upstream": "upstream"})

    def test_replicated_variants(self):
        new, replay = scenarios.groups(320, False)["new"], scenarios.groups(320, False)["replay"]
        for variants, script, args in ((new, "keyed_new.lua", ("@SEED",)), (replay, "keyed_same.lua", ("@KEY",))):
            min0, min1 = variants[-2:]
            self.assertEqual((min0.endpoint, min1.endpoint), ("idem_repl0", "idem_repl1"))
            self.assertEqual((min0.script, min0.args, min1.script, min1.args), (script, args, script, args))
            self.assertEqual(min1.role_kinds(), {"idem_repl1": "proxy", "redis_primary": "redis",
                                                 "redis_replica": "redis", "upstream": "upstream"})
            self.assertIn(min0.name, [k[1] for k in report.LABELS])
        self.assertEqual(scenarios.MIN_REPLICAS, {"idem_repl0": 0, "idem_repl1": 1})
        self.assertTrue(scenarios.needs_replicated(("get", "replay")))
        self.assertFalse(scenarios.needs_replicated(("get", "post", "storm")))

    def test_json_fingerprint_variant(self):
        new = {v.name: v for v in scenarios.groups(320, False)["new"]}
        embedded, json_fp = new["idemproxy-embedded"], new["embedded-json-fingerprint"]
        # The same wrk script (its 1 KiB body) as the embedded variant, on its own idemproxy.
        self.assertEqual((json_fp.endpoint, json_fp.script, json_fp.args),
                         ("idem_json", embedded.script, embedded.args))
        self.assertEqual(json_fp.role_kinds(), {"idem_json": "proxy", "upstream": "upstream"})
        self.assertEqual(report.LABELS[("new", json_fp.name)],
                         ("5", "keyed POST 1 KiB, every key new", "idemproxy, embedded, --fingerprint-body json"))
        self.assertNotIn(("new", json_fp.name + "-baseline"), report.LABELS)
        self.assertEqual(measure.counted_redis(json_fp.role_kinds(), ["redis"]), ["redis"])
        self.assertIn("idem_json", measure.PEAK_ROLES)
        self.assertEqual([r["peak_rss_mib"] for r in json_fingerprint_runs()], [30.0, 31.0])
        self.assertTrue(scenarios.needs_json_fingerprint(("get", "new")))
        self.assertFalse(scenarios.needs_json_fingerprint(("get", "post", "replay", "storm")))

    def test_json_fingerprint_idemproxy(self):
        roles = scenarios.idemproxy_roles(True, True, True)
        self.assertEqual(roles, ("idem_redis", "idem_mem", "idem_json", "idem_repl0", "idem_repl1",
                                 "idem_redis_base", "idem_mem_base"))
        self.assertEqual(scenarios.idemproxy_roles(False, False, True), ("idem_redis", "idem_mem", "idem_json"))
        self.assertEqual(scenarios.idemproxy_label("idem_json"), "idemproxy (embedded store, --fingerprint-body json)")
        self.assertFalse(scenarios.is_baseline("idem_json") or scenarios.has_redis_store("idem_json"))
        ports = servers.pick_ports(roles)
        every = [ports.upstream, ports.nginx, ports.redis, ports.floor, *ports.replicated,
                 *(p for pair in ports.idemproxies.values() for p in pair)]
        self.assertEqual(len(set(every)), 20)
        # The embedded idemproxy's store, and the JSON fingerprint on top; the others keep bytes.
        settings = from_env({}, Path("/r"), 2)
        self.assertEqual(servers._store_flags("idem_json", settings, ports),
                         servers._store_flags("idem_mem", settings, ports))
        self.assertEqual(servers._store_flags("idem_json", settings, ports),
                         ["--embedded-store", "memory", "--memory-max-entries", "10000000"])
        self.assertEqual(servers._policy_flags("idem_json"), ["--fingerprint-body", "json"])
        for role in roles[:2] + roles[3:]:
            self.assertEqual(servers._policy_flags(role), [])

    def test_body_is_json_and_its_reordering_is_the_same_document(self):
        body = servers.body_1k()
        self.assertEqual(len(body), 1024)
        doc = json.loads(body)
        self.assertEqual(list(doc), ["sku", "qty", "pad"])
        # wrk's body (benches/wrk/common.lua) is the same JSON object.
        common = (Path(__file__).resolve().parent / "wrk" / "common.lua").read_text()
        self.assertIn("local head = '{\"sku\":\"bench\",\"qty\":1,\"pad\":\"'", common)
        other = servers.reordered(body)
        self.assertNotEqual(other, body)
        self.assertEqual(json.loads(other), doc)
        self.assertEqual(list(json.loads(other)), ["pad", "qty", "sku"])

    def test_redis_counted_per_variant(self):
        # The replicated variants count the replicated primary's commands (not its replica's:
        # it repeats the primary's writes); the others the benchmark's own Redis.
        primaries = ["redis", "redis_primary"]
        by_name = {v.name: v for v in scenarios.groups(320, True)["new"]}
        self.assertEqual(measure.counted_redis(by_name["replicated-min1"].role_kinds(), primaries), ["redis_primary"])
        self.assertEqual(measure.counted_redis(by_name["idemproxy-redis-baseline"].role_kinds(), primaries), ["redis"])
        self.assertEqual(measure.counted_redis(by_name["idemproxy-embedded"].role_kinds(), primaries), ["redis"])
        self.assertIn("idem_repl0", measure.PEAK_ROLES)
        self.assertIn("idem_repl1", measure.PEAK_ROLES)
        # Peak RSS of the replicated idemproxies is their own.
        self.assertEqual([r["peak_rss_mib"] for r in replicated_runs()], [19.0, 21.0, 19.0, 21.0])

    def test_idemproxy_roles_and_labels(self):
        self.assertEqual(scenarios.idemproxy_roles(False), ("idem_redis", "idem_mem"))
        self.assertEqual(scenarios.idemproxy_roles(False, True), ("idem_redis", "idem_mem", "idem_repl0", "idem_repl1"))
        self.assertEqual(scenarios.idemproxy_roles(True, True), ("idem_redis", "idem_mem", "idem_repl0", "idem_repl1",
                                                                 "idem_redis_base", "idem_mem_base"))
        self.assertEqual([scenarios.idemproxy_label(r) for r in ("idem_repl0", "idem_repl1")],
                         ["idemproxy (replicated Redis, --redis-min-replicas 0)",
                          "idemproxy (replicated Redis, --redis-min-replicas 1)"])
        self.assertFalse(any(scenarios.is_baseline(r) or scenarios.has_redis_store(r) for r in scenarios.MIN_REPLICAS))
        roles = scenarios.idemproxy_roles(True)
        self.assertEqual(roles, ("idem_redis", "idem_mem", "idem_redis_base", "idem_mem_base"))
        self.assertEqual([scenarios.idemproxy_label(r) for r in roles],
                         ["idemproxy (Redis store)", "idemproxy (embedded store)",
                          "baseline idemproxy (Redis store)", "baseline idemproxy (embedded store)"])

    def test_ports_of_every_idemproxy(self):
        ports = servers.pick_ports(scenarios.idemproxy_roles(True))
        self.assertEqual(ports.endpoints(), ["upstream", "nginx", "floor", "idem_redis", "idem_mem",
                                             "idem_redis_base", "idem_mem_base"])
        listen = {ports.url(e) for e in ports.endpoints()}
        admin = {f"http://127.0.0.1:{a}/orders" for _, a in ports.idemproxies.values()}
        self.assertEqual(len(listen | admin | {f"http://127.0.0.1:{ports.redis}/orders"}), 12)
        self.assertIsNone(ports.replicated)

    def test_ports_and_flags_of_the_replicated_idemproxies(self):
        ports = servers.pick_ports(scenarios.idemproxy_roles(True, True))
        self.assertEqual(list(ports.idemproxies), ["idem_redis", "idem_mem", "idem_repl0", "idem_repl1",
                                                   "idem_redis_base", "idem_mem_base"])
        every = [ports.upstream, ports.nginx, ports.redis, ports.floor, *ports.replicated,
                 *(p for pair in ports.idemproxies.values() for p in pair)]
        self.assertEqual(len(set(every)), 18)
        primary = ports.replicated[0]
        # Each on its own database of the replicated primary; the baseline's on database 1 of the
        # benchmark's own Redis, as before.
        self.assertEqual(servers._store_flags("idem_repl0", None, ports),
                         ["--redis", f"redis://127.0.0.1:{primary}/0", "--redis-min-replicas", "0"])
        self.assertEqual(servers._store_flags("idem_repl1", None, ports),
                         ["--redis", f"redis://127.0.0.1:{primary}/1", "--redis-min-replicas", "1"])
        self.assertEqual(servers._store_flags("idem_redis_base", None, ports),
                         ["--redis", f"redis://127.0.0.1:{ports.redis}/1"])
        self.assertEqual(ports.url("idem_repl1"), f"http://127.0.0.1:{ports.idemproxies['idem_repl1'][0]}/orders")

    def test_beyond_noise_needs_ranges_apart(self):
        self.assertEqual(report.beyond_noise([3, 4], [1, 2], True), "better")
        self.assertEqual(report.beyond_noise([3, 4], [1, 2], False), "worse")
        self.assertEqual(report.beyond_noise([1, 2], [3, 4], False), "better")
        self.assertEqual(report.beyond_noise([1, 3], [2, 4], True), "within noise")
        self.assertEqual(report.beyond_noise([2, 3], [3, 4], False), "within noise")  # touching ranges
        self.assertEqual(report.beyond_noise([5], [1, 2], True), "n/a")

    def test_ab_rows(self):
        rows = report.ab(list(reversed(ab_runs())))  # in round order whatever the order of the runs
        self.assertEqual([r["metric"] for r in rows], [m.name for m in report.AB_METRICS])
        self.assertEqual({(r["group"], r["variant"]) for r in rows}, {("get", "idemproxy")})
        by = {r["metric"]: r for r in rows}
        rps = by["req/s"]
        self.assertAlmostEqual(rps["this"], 53_000, delta=1)
        self.assertAlmostEqual(rps["baseline"], 50_000, delta=1)
        self.assertAlmostEqual(rps["ratio"], 1.06, places=4)
        self.assertEqual([round(x) for x in rps["this_rounds"]], [52_000, 54_000, 53_000])
        self.assertEqual([round(x) for x in rps["baseline_rounds"]], [50_000, 51_000, 49_000])
        self.assertEqual({m: r["verdict"] for m, r in by.items()},
                         {"req/s": "better", "p99 ms": "within noise", "proxy CPU µs/req": "better",
                          "total CPU µs/req": "better", "peak RSS MiB": "worse"})
        self.assertEqual((by["p99 ms"]["this"], by["p99 ms"]["baseline"]), (1.2, 1.25))
        self.assertEqual((by["total CPU µs/req"]["this"], by["total CPU µs/req"]["baseline"]), (18.0, 20.0))
        self.assertEqual(by["proxy CPU µs/req"]["this_rounds"], [13.0, 14.0, 13.0])
        self.assertEqual((by["peak RSS MiB"]["this"], by["peak RSS MiB"]["baseline"]), (19.0, 17.0))  # the max

    def test_ab_needs_both_builds(self):
        self.assertEqual(report.ab(full_runs()), [])
        self.assertEqual(report.ab(full_runs() + replicated_runs()), [])
        # The replicated variants stay out of the A/B, next to a baseline's.
        rows = report.ab(replicated_runs() + ab_runs())
        self.assertEqual({(r["group"], r["variant"]) for r in rows}, {("get", "idemproxy")})
        self.assertNotIn(("new", "replicated-min0-baseline"), report.LABELS)
        self.assertEqual(report.ab([r for r in ab_runs() if r["variant"] == "idemproxy-baseline"]), [])

    def test_baseline_rows_follow_their_variant(self):
        runs = full_runs() + ab_runs()[1:2] + [
            run("new", "idemproxy-embedded-baseline", cpu={"proxy": 25}, peaks={"idem_mem_base": 1024})]
        keys = list(report.aggregate(runs))
        self.assertEqual(keys[keys.index(("get", "idemproxy")) + 1], ("get", "idemproxy-baseline"))
        self.assertEqual(keys[keys.index(("new", "idemproxy-embedded")) + 1], ("new", "idemproxy-embedded-baseline"))
        self.assertEqual(report.LABELS[("get", "idemproxy-baseline")], ("1", report._GET, "idemproxy · baseline"))
        # The baseline is no part of the targets: the Redis-store peak RSS is this build's.
        self.assertEqual(report.target_rss(report.aggregate(runs))[1], "**18.0 MiB**")

    def test_ab_in_markdown_and_json(self):
        runs = full_runs()[:3] + ab_runs()
        env = dict(ENV, baseline="f6430ef", baseline_revision="main~3")
        agg = report.aggregate(runs)
        rows = report.targets(agg, {})
        md = report.markdown(env, agg, runs, rows, {})
        lines = md.splitlines()
        start = lines.index(report.AB_HEAD[0])
        self.assertIn("## A/B: this build vs baseline `f6430ef`", lines[start - 4])
        self.assertIn("baseline: `BASELINE=main~3`, commit `f6430ef`", lines[start - 2])
        self.assertLess(lines.index(report.TABLE_HEAD[0]), start)
        self.assertLess(start, lines.index("## Targets (issue 5)"))
        table = lines[start + 2:start + 2 + len(report.AB_METRICS)]
        self.assertEqual(lines[start + 2 + len(report.AB_METRICS)], "")
        self.assertEqual({line.count("|") for line in table}, {11})
        self.assertEqual(table[0], "| 1 | GET pass-through, small body | idemproxy | req/s | 53,000 | 50,000 | **1.060×** "
                                   "| 52,000 / 54,000 / 53,000 | 50,000 / 51,000 / 49,000 | **better** |")
        self.assertEqual(table[1], "|  |  |  | p99 ms | 1.20 | 1.25 | **0.960×** | 1.20 / 1.30 / 1.10 "
                                   "| 1.25 / 1.15 / 1.40 | within noise |")
        self.assertEqual(table[4], "|  |  |  | peak RSS MiB | 19.0 | 17.0 | **1.118×** | 18.0 / 19.0 / 18.0 "
                                   "| 17.0 / 17.0 / 17.0 | **worse** |")
        data = json.loads(report.to_json(env, {}, runs, agg, rows))
        self.assertEqual(data["ab"], report.ab(runs))
        self.assertEqual(data["env"]["baseline"], "f6430ef")

    def test_nothing_changes_without_a_baseline(self):
        runs = full_runs()
        agg = report.aggregate(runs)
        md = report.markdown(ENV, agg, runs, report.targets(agg, CALIBRATION), {})
        self.assertNotIn("A/B", md)
        self.assertNotIn("ab", json.loads(report.to_json(ENV, CALIBRATION, runs, agg, [])))


class Upload(unittest.TestCase):
    """The keyed-upload scenario (ONLY=upload): requests, answers, aggregate and targets."""

    def test_request_head(self):
        keyed = upload.request_head(8080, 1024, "k1").decode()
        self.assertTrue(keyed.startswith("POST /upload HTTP/1.1\r\n"))
        self.assertIn("Content-Length: 1024\r\n", keyed)
        self.assertIn("Idempotency-Key: k1\r\n", keyed)
        self.assertTrue(keyed.endswith("\r\n\r\n"))
        self.assertNotIn("Idempotency-Key", upload.request_head(8080, 1024, None).decode())

    def test_status_of(self):
        self.assertEqual(upload.status_of(b"HTTP/1.1 200 OK\r\n\r\n"), 200)
        self.assertEqual(upload.status_of(b"HTTP/1.1 413 Content Too Large\r\n"), 413)
        self.assertEqual(upload.status_of(b""), 0)
        self.assertEqual(upload.status_of(b"garbage"), 0)

    def test_aggregate_and_targets(self):
        runs = [upload.build_run(upload.KEYED, 1, 64, 4, 2.0, 30_000),
                upload.build_run(upload.KEYLESS, 1, 64, 4, 1.6, 20_000),
                upload.build_run(upload.KEYED, 2, 64, 4, 1.0, 40_000),
                upload.build_run(upload.KEYLESS, 2, 64, 4, 2.0, 21_000),
                upload.build_run(upload.KEYED, 3, 64, 4, 4.0, 35_000),
                upload.build_run(upload.KEYLESS, 3, 64, 4, 1.0, 22_000)]
        agg = upload.aggregate(runs)
        self.assertEqual(agg[upload.KEYED]["mib_per_s"], 128.0)
        self.assertEqual(agg[upload.KEYLESS]["mib_per_s"], 160.0)
        self.assertEqual(agg[upload.KEYED]["peak_rss_kib"], 40_000)
        rows = upload.targets(agg)
        self.assertEqual(rows[0], ("keyed upload peak RSS < 64 MiB", "39.1 MiB", True))
        self.assertEqual(rows[1], ("keyed throughput >= 0.8x keyless", "0.80x", True))
        md = upload.markdown({"mib": "64", "conns": "4", "rounds": "3"}, agg, rows)
        self.assertIn("| keyed | 128.0 | 128.0, 256.0, 64.0 | 39.1 MiB | ? | ? | ? | ? | ? |", md)
        self.assertIsNone(upload.server_cpu_ratio(agg))
        self.assertNotIn("Server CPU ratio", md)
        cpu_s = {"proxy": 0.512, "upstream": 0.256, "client": 0.128}
        with_cpu = upload.build_run(upload.KEYED, 1, 64, 4, 1.0, 1, cpu_s, 0.25)
        self.assertAlmostEqual(with_cpu["proxy_cpu_ns_per_byte"], 1.9073, places=3)
        self.assertAlmostEqual(with_cpu["client_cpu_ns_per_byte"], 0.4768, places=3)
        self.assertAlmostEqual(with_cpu["server_cores_busy"], 0.768)
        cpu_md = upload.markdown({}, upload.aggregate([with_cpu]), [])
        self.assertIn("| keyed | 256.0 | 256.0 | 0.0 MiB | 1.91 | 0.95 | 0.48 | 0.77 | 0.25 |", cpu_md)
        # Keyless at a third of keyed's server CPU per byte: a server-bound ratio of 0.33x.
        keyless_cpu = upload.build_run(upload.KEYLESS, 1, 64, 4, 0.5, 1, {"proxy": 0.128, "upstream": 0.128})
        both = upload.aggregate([with_cpu, keyless_cpu])
        self.assertAlmostEqual(upload.server_cpu_ratio(both), 1 / 3)
        self.assertIn("the servers' core bounds both): 0.33x.", upload.markdown({}, both, []))
        self.assertIn("| keyed throughput >= 0.8x keyless | 0.80x | met |", md)
        self.assertEqual(upload.targets({upload.KEYED: {**agg[upload.KEYED], "peak_rss_kib": 70_000}})[0][2], False)

    def test_idle_share(self):
        # Core 1 idle 30 of 100 jiffies, core 0 idle 10 of 100: (busy, total) per core.
        before = {0: (100, 200), 1: (100, 200)}
        after = {0: (190, 300), 1: (170, 300)}
        self.assertAlmostEqual(upload.idle_share(before, after, {1}), 0.3)
        self.assertAlmostEqual(upload.idle_share(before, after, None), 0.2)
        self.assertIsNone(upload.idle_share(before, before, {1}))
        self.assertIsNone(upload.idle_share(before, after, {5}))

    def test_settings(self):
        self.assertEqual(upload.upload_settings({}, 3), upload.UploadSettings(64, 4, 3))
        self.assertEqual(upload.upload_settings({"UPLOAD_MIB": "256", "UPLOAD_CONNS": "1"}, 2),
                         upload.UploadSettings(256, 1, 2))
        for env in ({"UPLOAD_MIB": "0"}, {"UPLOAD_CONNS": "x"}):
            with self.assertRaises(upload.BenchError):
                upload.upload_settings(env, 3)
        # Only when ONLY names it, alone or with others.
        self.assertNotIn("upload", from_env({}, Path("/r"), 2).only)
        self.assertEqual(from_env({"ONLY": "upload get"}, Path("/r"), 2).only, ("upload", "get"))


class Settings(unittest.TestCase):
    def test_defaults_and_quick(self):
        s = from_env({}, Path("/r"), 2)
        self.assertEqual((s.duration, s.warmup, s.rounds, s.conns, s.only[-1]), (10, 3, 3, 32, "storm"))
        self.assertEqual((s.load_cpus, s.server_cpus, s.out_dir), ("0", "1", Path("/r/benches/results")))
        q = from_env({"QUICK": "1", "ONLY": "get get new"}, Path("/r"), 1)
        self.assertEqual((q.duration, q.warmup, q.only, q.pinned), (2, 1, ("get", "new"), False))

    def test_baseline(self):
        self.assertIsNone(from_env({}, Path("/r"), 2).baseline)
        self.assertIsNone(from_env({"BASELINE": " "}, Path("/r"), 2).baseline)
        for rev in ("f6430ef", "main~3", "v0.1.0", "HEAD^", "origin/main@{1}"):
            self.assertEqual(from_env({"BASELINE": rev}, Path("/r"), 2).baseline, rev)

    def test_bad_values(self):
        for env in ({"DURATION": "0"}, {"ROUNDS": "x"}, {"ONLY": "get put"}, {"UPSTREAM_KIND": "apache"},
                    {"SERVER_CPUS": "one"}, {"BASELINE": "--upload-pack=x"}, {"BASELINE": "a b"},
                    {"BASELINE": "a;rm"}):
            with self.assertRaises(ConfigError):
                from_env(env, Path("/r"), 2)



class WaitScenarioTest(unittest.TestCase):
    """The wait scenario's figures (benches/load/wait.py)."""

    def test_percentiles_are_nearest_rank(self):
        values = [float(v) for v in range(1, 101)]
        self.assertEqual(wait.percentile(values, 0.5), 50.0)
        self.assertEqual(wait.percentile(values, 0.99), 99.0)
        self.assertEqual(wait.percentile([3.0], 0.99), 3.0)
        with self.assertRaises(ValueError):
            wait.percentile([], 0.5)

    def test_commands_per_waiter_leave_out_the_scripts_and_the_firsts(self):
        # 10 keys, 8 waiters each costing 3 begins; each completion script ran a GET and a SET.
        calls = {"set": 10 + 80 * 3 + 10, "get": 10, "evalsha": 10, "spublish": 10}
        self.assertEqual(wait.commands_per_waiter(calls, 10, 80), (3.0, 2.0))

    def test_the_report_names_each_mode_and_its_targets(self):
        results = {
            "redis-across-proxies": {"waiters": 80, "p50_ms": 0.8, "p99_ms": 2.5, "max_ms": 3.0,
                                     "commands_with_arrival": 3.0, "commands_waiting": 2.0},
            "memory-same-proxy": {"waiters": 80, "p50_ms": 0.3, "p99_ms": 12.0, "max_ms": 15.0},
        }
        text = wait.report(results, {"keys": 10, "waiters": 8, "first_ms": 100, "lead_ms": 40})
        self.assertIn("| redis-across-proxies | 80 | 0.80 | 2.50 | 3.00 | 2.00 / 3.00 |", text)
        self.assertIn("| memory-same-proxy | 80 | 0.30 | 12.00 | 15.00 | in-process |", text)
        self.assertIn("redis-across-proxies: p99 2.50 ms <= 10 ms: met", text)
        self.assertIn("memory-same-proxy: p99 12.00 ms <= 10 ms: MISSED", text)
        self.assertIn("redis-across-proxies: 2.00 store commands per waiter <= 2: met", text)

if __name__ == "__main__":
    unittest.main()
