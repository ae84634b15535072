"""The benchmark's servers: the upstream, Redis, the nginx peer, idemproxy with each store (and
the baseline build's, with BASELINE), for the keyed scenarios a replicated Redis (primary + one
replica) with two idemproxies on it (--redis-min-replicas 0 and 1), for the new-key scenario an
embedded-store idemproxy with --fingerprint-body json, for the keyed scenarios an idemproxy
with the disk store, and the hyper floor, each on a free loopback port; and the HTTP checks that
they answer."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .config import Settings
from .processes import BenchError, Servers, free_ports, log
from .scenarios import (DIRECT, FLOOR, IDEM_DISK, IDEM_JSON, IDEM_MEM, MIN_REPLICAS, NGINX, REDIS_PRIMARY,
                        REDIS_REPLICA, has_redis_store, idemproxy_label, is_baseline)

UPSTREAM_BODY = '{"id":"ord_1","status":"created"}'


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one run; `idemproxies`: role -> (listen, admin) of each idemproxy;
    `replicated`: (primary, replica) of the replicated Redis, when its idemproxies run."""

    upstream: int
    nginx: int
    redis: int
    floor: int
    idemproxies: Dict[str, Tuple[int, int]]
    replicated: Optional[Tuple[int, int]] = None

    def endpoints(self) -> List[str]:
        """Every endpoint of the run (roles of scenarios.py)."""
        return [DIRECT, NGINX, FLOOR, *self.idemproxies]

    def url(self, endpoint: str) -> str:
        """The benchmarked URL of an endpoint."""
        fixed = {DIRECT: self.upstream, NGINX: self.nginx, FLOOR: self.floor}
        port = fixed[endpoint] if endpoint in fixed else self.idemproxies[endpoint][0]
        return f"http://127.0.0.1:{port}/orders"


def pick_ports(idemproxies: Sequence[str]) -> Ports:
    """Distinct free ports: upstream, nginx, Redis, floor, two per idemproxy role, and the
    replicated Redis' primary and replica when a role of MIN_REPLICAS is among `idemproxies`."""
    replicated = any(role in MIN_REPLICAS for role in idemproxies)
    ports = free_ports(4 + 2 * len(idemproxies) + (2 if replicated else 0))
    pairs = ports[4:4 + 2 * len(idemproxies)]
    primary_replica = (ports[-2], ports[-1]) if replicated else None
    return Ports(*ports[:4], dict(zip(idemproxies, zip(pairs[0::2], pairs[1::2]))), primary_replica)


# --- HTTP checks ----------------------------------------------------------------------------


def request(url: str, method: str = "GET", body: Optional[bytes] = None,
            headers: Optional[Dict[str, str]] = None) -> Tuple[int, bool]:
    """One request on a new connection: (status, whether `Idempotent-Replayed: true`)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    conn = http.client.HTTPConnection(hostport, timeout=10)
    try:
        conn.request(method, "/" + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        replayed = (resp.getheader("Idempotent-Replayed") or "").strip().lower().startswith("true")
        return resp.status, replayed
    except OSError as e:
        raise BenchError(f"{method} {url} failed: {e}") from e
    finally:
        conn.close()


def keyed_post(url: str, key: str, body: bytes) -> Tuple[int, bool]:
    """A keyed JSON POST: (status, replayed)."""
    return request(url, "POST", body, {"Content-Type": "application/json", "Idempotency-Key": key})


def body_1k() -> bytes:
    """The 1 KiB JSON body of the POST scenarios (the same as benches/wrk/common.lua's)."""
    head, tail = '{"sku":"bench","qty":1,"pad":"', '"}'
    return (head + "x" * (1024 - len(head) - len(tail)) + tail).encode()


def reordered(body: bytes) -> bytes:
    """The same JSON document as `body` in another form: its members in reverse order, with
    whitespace. The same canonical JSON, other bytes."""
    doc = json.loads(body)
    return json.dumps(dict(reversed(list(doc.items()))), indent=1).encode()


def _check_json_fingerprint(ports: Ports, seed: str, body: bytes) -> None:
    """The JSON-fingerprint idemproxy really fingerprints the canonical form: a retry of the
    1 KiB body with its members reordered replays there, while the byte fingerprint of the
    embedded-store idemproxy answers it 422 (another request)."""
    other = reordered(body)
    for role, expected in ((IDEM_JSON, (200, True)), (IDEM_MEM, (422, False))):
        url, key = ports.url(role), f"preflight-reordered-{seed}"
        first, again = keyed_post(url, key, body), keyed_post(url, key, other)
        if first != (200, False) or again != expected:
            raise BenchError(f"keyed POST to {url} ({idemproxy_label(role)}): first {first}, retry with its JSON "
                             f"members reordered {again}; expected (200, False) then {expected}")


def preflight(ports: Ports, seed: str) -> None:
    """Every endpoint answers GET and keyless POST with 200; every idemproxy executes a keyed
    POST once and replays its retry."""
    body = body_1k()
    for endpoint in ports.endpoints():
        url = ports.url(endpoint)
        for method, payload in (("GET", None), ("POST", body)):
            status, _ = request(url, method, payload, {"Content-Type": "application/json"} if payload else {})
            if status != 200:
                raise BenchError(f"{'keyless ' if payload else ''}{method} {url} answered {status}, expected 200")
    for endpoint in ports.idemproxies:
        url = ports.url(endpoint)
        first, again = keyed_post(url, f"preflight-{seed}", body), keyed_post(url, f"preflight-{seed}", body)
        if first != (200, False) or again != (200, True):
            raise BenchError(f"keyed POST to {url}: first {first}, retry {again}; expected (200, False) "
                             f"then (200, True) (replayed)")
    checked = ""
    if IDEM_JSON in ports.idemproxies:
        _check_json_fingerprint(ports, seed, body)
        checked = "; reordered JSON replays with --fingerprint-body json, 422 with bytes"
    log(f"pre-flight OK (GET, keyless POST, keyed POST + replay on every endpoint{checked})")


# --- nginx ----------------------------------------------------------------------------------


def _nginx_temp_paths(nginx: str, prefix: Path) -> str:
    """Temp paths of the modules this nginx has, so nothing is written outside the temp dir."""
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    paths = [f"client_body_temp_path {prefix}/client_body;", f"proxy_temp_path {prefix}/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            paths.append(f"{module}_temp_path {prefix}/{module};")
    return " ".join(paths)


def nginx_conf(prefix: Path, server: str, temp_paths: str, as_root: bool) -> str:
    """One nginx: master + 1 worker in the foreground, its own prefix dir, no access log."""
    return f"""{"user root;" if as_root else ""}
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    {temp_paths}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    {server}
}}
"""


def start_nginx(servers: Servers, nginx: str, role: str, port: int, server: str) -> None:
    """Writes, tests and starts the nginx of `role`; waits for its port and its worker."""
    prefix = servers.tmp / role
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, server, _nginx_temp_paths(nginx, prefix), os.geteuid() == 0))
    help_text = subprocess.run([nginx, "-h"], capture_output=True, text=True).stderr
    stderr_flag = ["-e", "stderr"] if "-e filename" in help_text else []
    argv = [nginx, "-p", str(prefix), *stderr_flag, "-c", str(conf)]
    test = subprocess.run(argv[:1] + ["-t", "-q"] + argv[1:], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"nginx config of {role} is invalid: {test.stderr.strip()}")
    servers.start(role, argv)
    servers.wait_port(role, port)
    servers.add_children(role)


def _upstream_block(port: int) -> str:
    """nginx as the fast upstream: `return 200` with a small JSON body."""
    return f"""server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type application/json; return 200 '{UPSTREAM_BODY}\\n'; }}
    }}"""


def _peer_block(port: int, upstream: int) -> str:
    """nginx as the peer: proxy_pass with upstream keepalive, adding X-Forwarded-* like idemproxy."""
    return f"""upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}"""


# --- the stack ------------------------------------------------------------------------------


def _start_upstream(servers: Servers, settings: Settings, tools: Dict[str, str], bins: Dict[str, Path],
                    ports: Ports) -> None:
    """The fast upstream: nginx `return 200`, or examples/bench_upstream (hyper)."""
    if settings.upstream_kind == "nginx":
        log(f"upstream: nginx return 200 on 127.0.0.1:{ports.upstream}")
        start_nginx(servers, tools["nginx"], DIRECT, ports.upstream, _upstream_block(ports.upstream))
    else:
        log(f"upstream: examples/bench_upstream (hyper) on 127.0.0.1:{ports.upstream}")
        servers.start(DIRECT, [str(bins["bench_upstream"]), f"127.0.0.1:{ports.upstream}"])
        servers.wait_port(DIRECT, ports.upstream)


def redis_cli(tools: Dict[str, str], ports: Ports) -> List[str]:
    """The redis-cli command line of the benchmark's own redis-server."""
    return [tools["redis-cli"], "-h", "127.0.0.1", "-p", str(ports.redis)]


def redis_clis(tools: Dict[str, str], ports: Ports) -> Dict[str, List[str]]:
    """role -> redis-cli command line of every Redis primary of the run (the benchmark's own,
    and the replicated one when it runs): the Redis whose commands a variant counts."""
    clis = {"redis": redis_cli(tools, ports)}
    if ports.replicated:
        clis[REDIS_PRIMARY] = [tools["redis-cli"], "-h", "127.0.0.1", "-p", str(ports.replicated[0])]
    return clis


def _start_one_redis(servers: Servers, tools: Dict[str, str], role: str, port: int, *extra: str) -> None:
    """A fresh redis-server without persistence for `role`, answering PING."""
    data = servers.tmp / role
    data.mkdir()
    servers.start(role, [tools["redis-server"], "--port", str(port), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--dir", str(data), "--daemonize", "no",
                         "--logfile", "", *extra])
    servers.wait_port(role, port)
    for _ in range(100):
        ping = subprocess.run([tools["redis-cli"], "-h", "127.0.0.1", "-p", str(port), "ping"],
                              capture_output=True, text=True)
        if ping.stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise BenchError(f"redis-server ({role}) does not answer PING")


def _start_redis(servers: Servers, tools: Dict[str, str], ports: Ports) -> None:
    """The benchmark's own Redis."""
    log(f"redis-server on 127.0.0.1:{ports.redis}")
    _start_one_redis(servers, tools, "redis", ports.redis)


def _start_replicated(servers: Servers, tools: Dict[str, str], primary: int, replica: int) -> None:
    """The replicated Redis: a primary and one replica, waiting until the replica has synchronised
    and the primary counts it (so `--redis-min-replicas 1` is ready and WAIT can be answered)."""
    log(f"replicated redis-server: primary on 127.0.0.1:{primary}, its replica on 127.0.0.1:{replica}")
    _start_one_redis(servers, tools, REDIS_PRIMARY, primary)
    _start_one_redis(servers, tools, REDIS_REPLICA, replica, "--replicaof", "127.0.0.1", str(primary))
    for _ in range(200):
        info = [subprocess.run([tools["redis-cli"], "-h", "127.0.0.1", "-p", str(port), "info", "replication"],
                               capture_output=True, text=True).stdout for port in (replica, primary)]
        if "master_link_status:up" in info[0] and "connected_slaves:1" in info[1]:
            return
        time.sleep(0.05)
    raise BenchError(f"the replica on 127.0.0.1:{replica} never synchronised with its primary")


def _idemproxy_env(role: str) -> Dict[str, str]:
    """The environment without IDEMPROXY_* and RUST_LOG: only the flags count. A baseline on the
    embedded store also gets IDEMPROXY_EMBEDDED_STORE=memory: a build that has the disk store
    (and its default) keeps the memory store it is compared with, an older one ignores it."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("IDEMPROXY_") or k == "RUST_LOG")}
    if is_baseline(role) and not has_redis_store(role):
        env["IDEMPROXY_EMBEDDED_STORE"] = "memory"
    return env


def _store_flags(role: str, settings: Settings, ports: Ports, tmp: Optional[Path] = None) -> List[str]:
    """The store flags of an idemproxy: Redis (the baseline's records in database 1, apart from
    this build's in database 0), the replicated Redis with its --redis-min-replicas (min_replicas
    N in database N, so each has its own records), the disk store on a fresh directory in the temp
    dir, or the embedded memory store: asked for explicitly from this build (whose default without
    Redis is the disk store); the baseline's is its default (an older build lacks the flag)."""
    if role in MIN_REPLICAS:
        assert ports.replicated, "replicated idemproxies need the replicated Redis"
        n = MIN_REPLICAS[role]
        return ["--redis", f"redis://127.0.0.1:{ports.replicated[0]}/{n}", "--redis-min-replicas", str(n)]
    if has_redis_store(role):
        return ["--redis", f"redis://127.0.0.1:{ports.redis}{'/1' if is_baseline(role) else ''}"]
    if role == IDEM_DISK:
        assert tmp, "the disk-store idemproxy needs the temp dir for its data"
        return ["--embedded-store", "disk", "--data-dir", str(tmp / "disk-data")]
    memory = [] if is_baseline(role) else ["--embedded-store", "memory"]
    return memory + ["--memory-max-entries", str(settings.memory_max_entries)]


def _policy_flags(role: str) -> List[str]:
    """The idempotency flags of an idemproxy beyond the defaults: `--fingerprint-body json` for
    the JSON-fingerprint one (issue 15), none for the others."""
    return ["--fingerprint-body", "json"] if role == IDEM_JSON else []


def _start_idemproxy(servers: Servers, role: str, settings: Settings, binary: Path, ports: Ports) -> None:
    """One idemproxy in front of the upstream, on the ports of `role`."""
    port, admin = ports.idemproxies[role]
    log(f"{idemproxy_label(role)} on 127.0.0.1:{port}")
    servers.start(role, [str(binary), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                         "--upstream", f"http://127.0.0.1:{ports.upstream}",
                         *_store_flags(role, settings, ports, servers.tmp), *_policy_flags(role),
                         "--log-filter", settings.proxy_log],
                  env=_idemproxy_env(role))


def _wait_ready(admin_port: int) -> None:
    """Waits until an idemproxy's admin /readyz answers 200."""
    url = f"http://127.0.0.1:{admin_port}/readyz"
    for _ in range(100):
        try:
            if request(url)[0] == 200:
                return
        except BenchError:
            pass
        time.sleep(0.1)
    raise BenchError(f"idemproxy admin {url} is not ready")


def _wait_idemproxy(servers: Servers, role: str, ports: Ports, baseline: Optional[str]) -> None:
    """Waits for an idemproxy's port and readiness; a baseline that does not start is named."""
    port, admin = ports.idemproxies[role]
    try:
        servers.wait_port(role, port)
        _wait_ready(admin)
    except BenchError as e:
        if is_baseline(role):
            raise BenchError(f"the baseline idemproxy of BASELINE={baseline} does not start with this "
                             f"build's flags (a flag it lacks?): {e}") from e
        raise


def start_all(servers: Servers, settings: Settings, tools: Dict[str, str], bins: Dict[str, Path],
              ports: Ports) -> None:
    """Starts every server and waits until each one is ready; the baseline idemproxies run
    bins["idemproxy-baseline"]."""
    _start_upstream(servers, settings, tools, bins, ports)
    _start_redis(servers, tools, ports)
    if ports.replicated:
        _start_replicated(servers, tools, *ports.replicated)
    log(f"nginx proxy_pass peer on 127.0.0.1:{ports.nginx}")
    start_nginx(servers, tools["nginx"], NGINX, ports.nginx, _peer_block(ports.nginx, ports.upstream))
    for role in ports.idemproxies:
        binary = bins["idemproxy-baseline" if is_baseline(role) else "idemproxy"]
        _start_idemproxy(servers, role, settings, binary, ports)
    log(f"hyper floor (examples/bench_floor.rs) on 127.0.0.1:{ports.floor}")
    servers.start(FLOOR, [str(bins["bench_floor"]), f"127.0.0.1:{ports.floor}", f"127.0.0.1:{ports.upstream}"])
    servers.wait_port(FLOOR, ports.floor)
    for role in ports.idemproxies:
        _wait_idemproxy(servers, role, ports, settings.baseline)
