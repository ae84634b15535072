"""A replicated Redis for the keyed scenarios: a primary and one replica on loopback, and two
idemproxies in front of the primary, `--redis-min-replicas 0` and `--redis-min-replicas 1`, so
one run shows what waiting for a replica's acknowledgement (Redis `WAIT`, docs/behaviour.md §4.4)
costs a first execution, and that a replay does not pay it. Apart from the benchmark's own
Redis, so the other variants' figures do not change."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Dict, List

from .config import Settings
from .processes import BenchError, Servers, free_ports, log
from .scenarios import IDEM_REPL0, IDEM_REPL1
from .servers import Ports, _start_idemproxy, _wait_ready

PRIMARY, REPLICA = "redis_primary", "redis_replica"


def _redis(servers: Servers, tools: Dict[str, str], role: str, port: int, *extra: str) -> None:
    """A redis-server without persistence for `role`, answering PING."""
    data = servers.tmp / role
    data.mkdir()
    servers.start(role, [tools["redis-server"], "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", str(data), "--daemonize", "no", "--logfile", "", *extra])
    servers.wait_port(role, port)


def cli(tools: Dict[str, str], ports: Ports) -> List[str]:
    """The redis-cli command line of the replicated primary."""
    return [tools["redis-cli"], "-h", "127.0.0.1", "-p", str(ports.extra[PRIMARY])]


def _wait_synced(tools: Dict[str, str], port: int) -> None:
    """Waits until the replica on `port` has synchronised with its primary."""
    for _ in range(200):
        info = subprocess.run([tools["redis-cli"], "-p", str(port), "info", "replication"],
                              capture_output=True, text=True)
        if "master_link_status:up" in info.stdout:
            return
        time.sleep(0.05)
    raise BenchError(f"the replica on 127.0.0.1:{port} never synchronised")


def start_replicated(servers: Servers, settings: Settings, tools: Dict[str, str], bins: Dict[str, Path],
                     ports: Ports) -> None:
    """The primary, its replica, and the two idemproxies (ready: the second sees the replica)."""
    primary, replica, repl0, admin0, repl1, admin1 = free_ports(6)
    ports.extra.update({PRIMARY: primary, REPLICA: replica, IDEM_REPL0: repl0, IDEM_REPL1: repl1})
    log(f"replicated redis-server on 127.0.0.1:{primary}, its replica on 127.0.0.1:{replica}")
    _redis(servers, tools, PRIMARY, primary)
    _redis(servers, tools, REPLICA, replica, "--replicaof", "127.0.0.1", str(primary))
    _wait_synced(tools, replica)
    for role, port, admin, n in ((IDEM_REPL0, repl0, admin0, "0"), (IDEM_REPL1, repl1, admin1, "1")):
        log(f"idemproxy (replicated Redis, --redis-min-replicas {n}) on 127.0.0.1:{port}")
        store = ["--redis", f"redis://127.0.0.1:{primary}", "--redis-min-replicas", n]
        _start_idemproxy(servers, role, port, admin, store, settings, bins["idemproxy"], ports.upstream)
    for role, port, admin in ((IDEM_REPL0, repl0, admin0), (IDEM_REPL1, repl1, admin1)):
        servers.wait_port(role, port)
        _wait_ready(admin)
