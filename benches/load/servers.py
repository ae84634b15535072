"""The benchmark's servers: the upstream, Redis, the nginx peer, idemproxy with each store and
the hyper floor, each on a free loopback port; and the HTTP checks that they answer."""

from __future__ import annotations

import http.client
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .config import Settings
from .processes import BenchError, Servers, free_ports, log
from .scenarios import DIRECT, FLOOR, IDEM_DISK, IDEM_MEM, IDEM_REDIS, NGINX

UPSTREAM_BODY = '{"id":"ord_1","status":"created"}'


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one run."""

    upstream: int
    nginx: int
    redis: int
    idem: int
    idem_admin: int
    mem: int
    mem_admin: int
    floor: int
    disk: int
    disk_admin: int

    def url(self, endpoint: str) -> str:
        """The benchmarked URL of an endpoint (a role of scenarios.py)."""
        port = {DIRECT: self.upstream, NGINX: self.nginx, FLOOR: self.floor, IDEM_REDIS: self.idem,
                IDEM_MEM: self.mem, IDEM_DISK: self.disk}[endpoint]
        return f"http://127.0.0.1:{port}/orders"


def pick_ports() -> Ports:
    """Ten distinct free ports."""
    return Ports(*free_ports(10))


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


def preflight(ports: Ports, seed: str) -> None:
    """Every endpoint answers GET and keyless POST with 200; both idemproxies execute a keyed
    POST once and replay its retry."""
    body = body_1k()
    for endpoint in (DIRECT, NGINX, FLOOR, IDEM_REDIS, IDEM_MEM, IDEM_DISK):
        url = ports.url(endpoint)
        for method, payload in (("GET", None), ("POST", body)):
            status, _ = request(url, method, payload, {"Content-Type": "application/json"} if payload else {})
            if status != 200:
                raise BenchError(f"{'keyless ' if payload else ''}{method} {url} answered {status}, expected 200")
    for endpoint in (IDEM_REDIS, IDEM_MEM, IDEM_DISK):
        url = ports.url(endpoint)
        first, again = keyed_post(url, f"preflight-{seed}", body), keyed_post(url, f"preflight-{seed}", body)
        if first != (200, False) or again != (200, True):
            raise BenchError(f"keyed POST to {url}: first {first}, retry {again}; expected (200, False) "
                             f"then (200, True) (replayed)")
    log("pre-flight OK (GET, keyless POST, keyed POST + replay on every endpoint)")


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


def _start_redis(servers: Servers, tools: Dict[str, str], ports: Ports) -> None:
    """A fresh redis-server without persistence, answering PING."""
    log(f"redis-server on 127.0.0.1:{ports.redis}")
    data = servers.tmp / "redis"
    data.mkdir()
    servers.start("redis", [tools["redis-server"], "--port", str(ports.redis), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(data), "--daemonize", "no",
                            "--logfile", ""])
    servers.wait_port("redis", ports.redis)
    for _ in range(100):
        ping = subprocess.run(redis_cli(tools, ports) + ["ping"], capture_output=True, text=True)
        if ping.stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise BenchError("redis-server does not answer PING")


def _idemproxy_env() -> Dict[str, str]:
    """The environment without IDEMPROXY_* and RUST_LOG: only the flags count."""
    return {k: v for k, v in os.environ.items() if not (k.startswith("IDEMPROXY_") or k == "RUST_LOG")}


def _start_idemproxy(servers: Servers, role: str, port: int, admin: int, store: List[str],
                     settings: Settings, idemproxy: Path, upstream: int) -> None:
    """One idemproxy in front of the upstream, with the store flags `store`."""
    servers.start(role, [str(idemproxy), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                         "--upstream", f"http://127.0.0.1:{upstream}", *store, "--log-filter", settings.proxy_log],
                  env=_idemproxy_env())


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


def _start_disk_idemproxy(servers: Servers, settings: Settings, bins: Dict[str, Path], ports: Ports) -> None:
    """idemproxy with the disk store (the default without Redis) on a fresh directory in the temp dir."""
    data = servers.tmp / "disk-data"
    log(f"idemproxy (disk store, {data}) on 127.0.0.1:{ports.disk}")
    _start_idemproxy(servers, IDEM_DISK, ports.disk, ports.disk_admin, ["--embedded-store", "disk", "--data-dir", str(data)],
                     settings, bins["idemproxy"], ports.upstream)
    servers.wait_port(IDEM_DISK, ports.disk)


def start_all(servers: Servers, settings: Settings, tools: Dict[str, str], bins: Dict[str, Path],
              ports: Ports) -> None:
    """Starts every server and waits until each one is ready."""
    _start_upstream(servers, settings, tools, bins, ports)
    _start_redis(servers, tools, ports)
    log(f"nginx proxy_pass peer on 127.0.0.1:{ports.nginx}")
    start_nginx(servers, tools["nginx"], NGINX, ports.nginx, _peer_block(ports.nginx, ports.upstream))
    log(f"idemproxy (Redis store) on 127.0.0.1:{ports.idem}")
    _start_idemproxy(servers, IDEM_REDIS, ports.idem, ports.idem_admin, ["--redis", f"redis://127.0.0.1:{ports.redis}"],
                     settings, bins["idemproxy"], ports.upstream)
    log(f"idemproxy (embedded store) on 127.0.0.1:{ports.mem}")
    _start_idemproxy(servers, IDEM_MEM, ports.mem, ports.mem_admin,
                     ["--embedded-store", "memory", "--memory-max-entries", str(settings.memory_max_entries)],
                     settings, bins["idemproxy"],
                     ports.upstream)
    _start_disk_idemproxy(servers, settings, bins, ports)
    log(f"hyper floor (examples/bench_floor.rs) on 127.0.0.1:{ports.floor}")
    servers.start(FLOOR, [str(bins["bench_floor"]), f"127.0.0.1:{ports.floor}", f"127.0.0.1:{ports.upstream}"])
    servers.wait_port(FLOOR, ports.floor)
    servers.wait_port(IDEM_REDIS, ports.idem)
    servers.wait_port(IDEM_MEM, ports.mem)
    _wait_ready(ports.idem_admin)
    _wait_ready(ports.mem_admin)
    _wait_ready(ports.disk_admin)
