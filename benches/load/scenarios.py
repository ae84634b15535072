"""The scenario groups and their variants: which endpoint, wrk script and processes each uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

# Endpoints (the server a variant's wrk talks to), by role.
DIRECT, NGINX, FLOOR, IDEM_REDIS, IDEM_MEM = "upstream", "nginx", "floor", "idem_redis", "idem_mem"
IDEM_DISK = "idem_disk"  # idemproxy with the disk store (issue 13)

# What serves a variant: role -> kind (proxy, redis or upstream), for CPU per process.
_UP = (("upstream", "upstream"),)
_REDIS = (("redis", "redis"),)


@dataclass(frozen=True)
class Variant:
    """One measured variant; in `args`, `@SEED` becomes a seed unique to the run and `@KEY`
    the group's replay key."""

    name: str
    endpoint: str
    script: str
    args: Tuple[str, ...]
    roles: Tuple[Tuple[str, str], ...]

    def role_kinds(self) -> Dict[str, str]:
        """role -> kind of every process that serves this variant."""
        return dict(self.roles)


def _proxy(role: str, *extra: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[str, str], ...]:
    """The roles of a variant served by the proxy `role`, then `extra` and the upstream."""
    return ((role, "proxy"),) + sum(extra, ()) + _UP


def groups(storm_wave: int) -> Dict[str, List[Variant]]:
    """Every scenario group, its variants in the interleaving order."""
    wave = str(storm_wave)
    return {
        "get": [
            Variant("direct", DIRECT, "get.lua", (), _UP),
            Variant("nginx", NGINX, "get.lua", (), _proxy(NGINX)),
            Variant("hyper-floor", FLOOR, "get.lua", (), _proxy(FLOOR)),
            Variant("idemproxy", IDEM_REDIS, "get.lua", (), _proxy(IDEM_REDIS, _REDIS)),
        ],
        "post": [
            Variant("nginx", NGINX, "post.lua", (), _proxy(NGINX)),
            Variant("hyper-floor", FLOOR, "post.lua", (), _proxy(FLOOR)),
            Variant("idemproxy", IDEM_REDIS, "post.lua", (), _proxy(IDEM_REDIS, _REDIS)),
        ],
        "new": [
            Variant("idemproxy-redis", IDEM_REDIS, "keyed_new.lua", ("@SEED",), _proxy(IDEM_REDIS, _REDIS)),
            Variant("idemproxy-embedded", IDEM_MEM, "keyed_new.lua", ("@SEED",), _proxy(IDEM_MEM)),
            Variant("idemproxy-disk", IDEM_DISK, "keyed_new.lua", ("@SEED",), _proxy(IDEM_DISK)),
        ],
        "replay": [
            Variant("idemproxy-redis", IDEM_REDIS, "keyed_same.lua", ("@KEY",), _proxy(IDEM_REDIS, _REDIS)),
            Variant("idemproxy-embedded", IDEM_MEM, "keyed_same.lua", ("@KEY",), _proxy(IDEM_MEM)),
            Variant("idemproxy-disk", IDEM_DISK, "keyed_same.lua", ("@KEY",), _proxy(IDEM_DISK)),
        ],
        "storm": [
            Variant("idemproxy-redis", IDEM_REDIS, "storm.lua", ("@SEED", wave), _proxy(IDEM_REDIS, _REDIS)),
            Variant("idemproxy-embedded", IDEM_MEM, "storm.lua", ("@SEED", wave), _proxy(IDEM_MEM)),
            Variant("idemproxy-disk", IDEM_DISK, "storm.lua", ("@SEED", wave), _proxy(IDEM_DISK)),
        ],
    }
