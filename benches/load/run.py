"""The benchmark from start to end: tools, build, servers, scenarios, calibration, report."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import chart, parse, report
from .config import Settings
from .measure import Sampler, Wrk, calibrate, log_calibration, progress_line
from .processes import BenchError, Servers, log
from .scenarios import (IDEM_REDIS, Variant, groups, idemproxy_label, idemproxy_roles, needs_disk,
                        needs_json_fingerprint, needs_replicated)
from .servers import Ports, body_1k, keyed_post, pick_ports, preflight, redis_cli, redis_clis, start_all
from .tools import Baseline, build, build_baseline, versions
from . import upload


class Bench:
    """One benchmark run: its settings, servers and the runs measured so far."""

    def __init__(self, settings: Settings, tools: Dict[str, str], servers: Servers, ports: Ports):
        self.settings = settings
        self.servers = servers
        self.ports = ports
        self.redis_cli = redis_cli(tools, ports)
        self.sampler = Sampler(servers, redis_clis(tools, ports))
        pin = ["taskset", "-c", settings.load_cpus] if settings.pinned else []
        self.wrk = Wrk(tools["wrk"], settings.root / "benches" / "wrk", pin, settings.wrk_threads, settings.conns)
        self.seed = f"{int(time.time())}{random.randrange(0x10000):04x}"
        self.clk_tck = os.sysconf("SC_CLK_TCK")
        self.cores = parse.cpu_ids(settings.server_cpus)
        self.runs_dir = servers.tmp / "runs"
        self.runs_dir.mkdir()
        self.run_n = 0
        self.runs: List[dict] = []

    def _args(self, variant: Variant) -> List[str]:
        """The wrk script arguments of the next run (a new seed per run)."""
        self.run_n += 1
        subst = {"@SEED": f"k{self.seed}-{self.run_n}", "@KEY": f"replay-{self.seed}"}
        return [subst.get(a, a) for a in variant.args]

    def _wrk(self, out: Path, variant: Variant, seconds: int) -> str:
        """One wrk run of `variant`; on failure, names a server that died, if one did."""
        try:
            return self.wrk.run(out, self.ports.url(variant.endpoint), variant.script, seconds, self._args(variant))
        except BenchError:
            self.servers.check_alive()
            raise

    def measure(self, group: str, round_: int, variant: Variant) -> None:
        """One measured run: samples before and after wrk, peak RSS, the run's figures."""
        self.servers.check_alive()
        self.sampler.reset_peaks()
        counted = self.sampler.redis_for(variant.role_kinds())
        pre = self.sampler.sample(counted)
        name = f"{len(self.runs) + 1:03d}-{group}-{variant.name}"
        out = self._wrk(self.runs_dir / f"{name}.wrk.out", variant, self.settings.duration)
        time.sleep(0.2)  # let executions that outlived their client finish
        self.servers.check_alive()
        post, peaks = self.sampler.sample(counted), self.sampler.peaks()
        bench = parse.wrk_output(out)
        if not bench["requests"]:
            raise BenchError(f"wrk completed no request on {variant.endpoint} ({variant.script})")
        log(progress_line(bench, group, variant.name, round_))
        meta = {"group": group, "variant": variant.name, "round": round_, "roles": variant.role_kinds()}
        (self.runs_dir / f"{name}.samples.json").write_text(
            json.dumps({"meta": meta, "redis_counted": counted, "pre": pre, "post": post, "peaks": peaks}))
        self.runs.append(report.build_run(meta, bench, pre, post, peaks, self.clk_tck, self.cores))

    def run_group(self, group: str, variants: List[Variant]) -> None:
        """Warm-up of every variant, then ROUNDS rounds interleaving the variants."""
        log(f"group {group}: warm-up {self.settings.warmup}s per variant")
        if self.settings.warmup:
            for variant in variants:
                self._wrk(self.runs_dir / f"warmup-{group}-{variant.name}.wrk.out", variant, self.settings.warmup)
        for round_ in range(1, self.settings.rounds + 1):
            for variant in variants:
                self.measure(group, round_, variant)

    def create_replay_key(self) -> None:
        """The key that the replay scenario repeats, executed once on every idemproxy."""
        for endpoint in self.ports.idemproxies:
            result = keyed_post(self.ports.url(endpoint), f"replay-{self.seed}", body_1k())
            if result != (200, False):
                raise BenchError(f"creating the replay key on {endpoint} answered {result}")

    def calibration(self) -> Dict[str, Dict[str, str]]:
        """MONITOR counts of a first execution and of a replay, when their groups ran."""
        out = {}
        n, url = self.settings.calibration_requests, self.ports.url(IDEM_REDIS)
        tmp = self.servers.tmp
        if "new" in self.settings.only:
            keys = [f"calibrate-new-{self.seed}-{i}" for i in range(1, n + 1)]
            out["first-execution"] = calibrate(self.redis_cli, url, keys, body_1k(), tmp / "monitor-new.txt")
        if "replay" in self.settings.only:
            key = f"calibrate-replay-{self.seed}"
            status, _ = keyed_post(url, key, body_1k())
            if status != 200:
                raise BenchError(f"calibration: creating the replay key answered {status}")
            out["replay"] = calibrate(self.redis_cli, url, [key] * n, body_1k(), tmp / "monitor-replay.txt")
        for name, figures in out.items():
            log_calibration(name, figures)
        return out


def environment(settings: Settings, probed: Dict[str, str]) -> Dict[str, str]:
    """The run's settings, machine and versions (latest.json `env`), all strings."""
    cpu_model = next((line.split(": ", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "?")
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": "1" if settings.quick else "0", "duration": str(settings.duration),
        "warmup": str(settings.warmup), "rounds": str(settings.rounds), "conns": str(settings.conns),
        "wrk_threads": str(settings.wrk_threads), "storm_wave": str(settings.storm_wave),
        "proxy_log": settings.proxy_log, "upstream_kind": settings.upstream_kind,
        "load_cpus": settings.load_cpus or "all", "server_cpus": settings.server_cpus or "all",
        "clk_tck": str(os.sysconf("SC_CLK_TCK")), "ncpu": str(len(os.sched_getaffinity(0))),
        "cpu_model": cpu_model, "kernel": platform.release(),
        **{k: probed[k] for k in ("nginx", "redis", "wrk", "rustc", "commit", "dirty")},
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proxy_logs(tmp: Path, roles: List[str]) -> Dict[str, dict]:
    """Warn/error counts of the log of each idemproxy `roles`, by label."""
    return {idemproxy_label(role): report.log_summary((tmp / f"{role}.err").read_text(errors="replace").splitlines())
            for role in roles}


def write_report(out_dir: Path, env: Dict[str, str], calibration: dict, runs: List[dict],
                 logs: Dict[str, dict]) -> str:
    """latest.md, latest.json and latest.svg in `out_dir`; returns the markdown."""
    agg = report.aggregate(runs)
    target_rows = report.targets(agg, calibration)
    md = report.markdown(env, agg, runs, target_rows, logs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.md").write_text(md)
    (out_dir / "latest.json").write_text(report.to_json(env, calibration, runs, agg, target_rows))
    (out_dir / "latest.svg").write_text(chart.svg(env, agg))
    return md


def build_all(settings: Settings, tmp: Path) -> Tuple[Dict[str, Path], Optional[Baseline]]:
    """This build's binaries (name -> path) with the baseline's as `idemproxy-baseline`, and the
    baseline (None without BASELINE)."""
    hyper_upstream = settings.upstream_kind == "hyper" or upload.GROUP in settings.only
    examples = ["bench_floor"] + (["bench_upstream"] if hyper_upstream else [])
    bins = build(settings.root, tmp, examples)
    if not settings.baseline:
        return bins, None
    baseline = build_baseline(settings.root, settings.baseline, tmp, examples)
    return {**bins, "idemproxy-baseline": baseline.binary}, baseline


def upload_only(settings: Settings, bins: Dict[str, Path], tmp: Path) -> str:
    """The keyed-upload scenario (ONLY=upload) on its own servers; returns its markdown."""
    upload_settings = upload.upload_settings(os.environ, settings.rounds)
    commit = versions_commit(settings.root)
    pin = ["taskset", "-c", settings.server_cpus] if settings.pinned else []
    if settings.pinned:
        os.sched_setaffinity(0, parse.cpu_ids(settings.load_cpus) or os.sched_getaffinity(0))
    with Servers(tmp, pin) as servers:
        return upload.run_upload(upload.upload_env(commit), upload_settings, bins, servers, settings.out_dir,
                                 parse.cpu_ids(settings.server_cpus) if settings.pinned else None)


def versions_commit(root: Path) -> str:
    """The short commit measured, `+dirty` when the tree has changes."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    return commit + ("+dirty" if dirty.strip() else "")


def benchmark(settings: Settings, tools: Dict[str, str], tmp: Path) -> str:
    """Builds, starts the servers, measures every group, writes the report; returns the markdown.
    The keyed-upload group runs on its own servers after the others (its own report)."""
    bins, baseline = build_all(settings, tmp)
    upload_md = upload_only(settings, bins, tmp) if upload.GROUP in settings.only else ""
    settings = replace(settings, only=tuple(g for g in settings.only if g != upload.GROUP))
    if not settings.only:
        return upload_md
    ports = pick_ports(idemproxy_roles(baseline is not None, needs_replicated(settings.only),
                                       needs_json_fingerprint(settings.only), needs_disk(settings.only)))
    pin = ["taskset", "-c", settings.server_cpus] if settings.pinned else []
    with Servers(tmp, pin) as servers:
        start_all(servers, settings, tools, bins, ports)
        bench = Bench(settings, tools, servers, ports)
        preflight(ports, bench.seed)
        env = environment(settings, versions(tools, settings.root))
        if baseline:
            env.update(baseline=baseline.commit, baseline_revision=baseline.revision)
        all_groups = groups(settings.storm_wave, baseline is not None)
        for group in settings.only:
            if group == "replay":
                bench.create_replay_key()
            bench.run_group(group, all_groups[group])
        calibration = bench.calibration()
        env["loadavg_end"] = loadavg()
        servers.check_alive()
    return upload_md + write_report(settings.out_dir, env, calibration, bench.runs,
                                    proxy_logs(tmp, list(ports.idemproxies)))


def main_run(settings: Settings, tools: Dict[str, str]) -> None:
    """Runs the benchmark in a fresh temp dir (removed unless KEEP_TMP=1); prints the report."""
    tmp = Path(tempfile.mkdtemp(prefix="idemproxy-load.", dir=os.environ.get("TMPDIR") or None))
    try:
        md = benchmark(settings, tools, tmp)
    finally:
        if settings.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(md, end="")
    written = (["upload.md", "upload.json"] if upload.GROUP in settings.only else []) + (
        ["latest.md", "latest.svg", "latest.json"] if set(settings.only) - {upload.GROUP} else [])
    log(f"wrote {settings.out_dir}/{', '.join(written)}")
