"""The scenario groups and their variants: which endpoint, wrk script and processes each uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

# Endpoints (the server a variant's wrk talks to), by role.
DIRECT, NGINX, FLOOR, IDEM_REDIS, IDEM_MEM = "upstream", "nginx", "floor", "idem_redis", "idem_mem"
# With BASELINE=<revision>: the baseline build's idemproxy next to each of this build's, and the
# suffix of the variants it serves.
IDEM_REDIS_BASE, IDEM_MEM_BASE = "idem_redis_base", "idem_mem_base"
BASELINE_OF = {IDEM_REDIS: IDEM_REDIS_BASE, IDEM_MEM: IDEM_MEM_BASE}
BASELINE_SUFFIX = "-baseline"
# In the keyed scenarios (new, replay): this build's idemproxy on a replicated Redis (a primary and
# one replica on loopback, apart from the benchmark's own Redis), with --redis-min-replicas 0 and 1
# (issue 14), each in its own database of the primary. No baseline twin: an older build may lack
# the flag.
IDEM_REPL0, IDEM_REPL1 = "idem_repl0", "idem_repl1"
MIN_REPLICAS = {IDEM_REPL0: 0, IDEM_REPL1: 1}
REPLICATED_GROUPS = ("new", "replay")
REDIS_PRIMARY, REDIS_REPLICA = "redis_primary", "redis_replica"
# In the keyed new-key group: this build's idemproxy on the embedded store (like IDEM_MEM) with
# `--fingerprint-body json` (issue 15), against the embedded one's byte fingerprint on the same
# 1 KiB JSON body. No baseline twin: an older build may lack the flag.
IDEM_JSON = "idem_json"
JSON_FINGERPRINT_GROUPS = ("new",)
# In the keyed scenarios (new, replay, storm): this build's idemproxy on the disk store (issue 13),
# on a fresh directory in the temp dir, against the memory store of IDEM_MEM. No baseline twin:
# an older build may lack its flags (--embedded-store, --data-dir).
IDEM_DISK = "idem_disk"
DISK_GROUPS = ("new", "replay", "storm")

# What serves a variant: role -> kind (proxy, redis or upstream), for CPU per process.
_UP = (("upstream", "upstream"),)
_REDIS = (("redis", "redis"),)
_REPLICATED = ((REDIS_PRIMARY, "redis"), (REDIS_REPLICA, "redis"))


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


def idemproxy_roles(baseline: bool, replicated: bool = False, json_fingerprint: bool = False,
                    disk: bool = False) -> Tuple[str, ...]:
    """The idemproxy roles of a run: this build's two, its JSON-fingerprint one if
    `json_fingerprint`, its two on the replicated Redis if `replicated`, its disk-store one if
    `disk`, then the baseline's two if there is one."""
    return (tuple(BASELINE_OF) + ((IDEM_JSON,) if json_fingerprint else ())
            + (tuple(MIN_REPLICAS) if replicated else ())
            + ((IDEM_DISK,) if disk else ())
            + (tuple(BASELINE_OF.values()) if baseline else ()))


def needs_replicated(only: Sequence[str]) -> bool:
    """True when the groups `only` include one with the replicated-Redis variants."""
    return any(group in REPLICATED_GROUPS for group in only)


def needs_json_fingerprint(only: Sequence[str]) -> bool:
    """True when the groups `only` include one with the JSON-fingerprint variant."""
    return any(group in JSON_FINGERPRINT_GROUPS for group in only)


def needs_disk(only: Sequence[str]) -> bool:
    """True when the groups `only` include one with the disk-store variant."""
    return any(group in DISK_GROUPS for group in only)


def is_baseline(role: str) -> bool:
    """True for an idemproxy of the baseline build."""
    return role in BASELINE_OF.values()


def has_redis_store(role: str) -> bool:
    """True for an idemproxy with the Redis store (this build's or the baseline's)."""
    return role in (IDEM_REDIS, IDEM_REDIS_BASE)


def idemproxy_label(role: str) -> str:
    """`idemproxy (Redis store)`, `baseline idemproxy (embedded store)`,
    `idemproxy (replicated Redis, --redis-min-replicas 1)`,
    `idemproxy (embedded store, --fingerprint-body json)`, `idemproxy (disk store)`, …"""
    if role == IDEM_DISK:
        return "idemproxy (disk store)"
    if role == IDEM_JSON:
        return "idemproxy (embedded store, --fingerprint-body json)"
    if role in MIN_REPLICAS:
        return f"idemproxy (replicated Redis, --redis-min-replicas {MIN_REPLICAS[role]})"
    store = "Redis" if has_redis_store(role) else "embedded"
    return f"{'baseline ' if is_baseline(role) else ''}idemproxy ({store} store)"


def _proxy(role: str, *extra: Tuple[Tuple[str, str], ...]) -> Tuple[Tuple[str, str], ...]:
    """The roles of a variant served by the proxy `role`, then `extra` and the upstream."""
    return ((role, "proxy"),) + sum(extra, ()) + _UP


def baseline_variant(variant: Variant) -> Variant:
    """The same variant served by the baseline idemproxy instead of this build's."""
    base = BASELINE_OF[variant.endpoint]
    roles = tuple((base if role == variant.endpoint else role, kind) for role, kind in variant.roles)
    return Variant(variant.name + BASELINE_SUFFIX, base, variant.script, variant.args, roles)


def with_baseline(variants: List[Variant]) -> List[Variant]:
    """`variants`, each idemproxy variant followed by its baseline variant (interleaved A/B)."""
    out = []
    for variant in variants:
        out.append(variant)
        if variant.endpoint in BASELINE_OF:
            out.append(baseline_variant(variant))
    return out


def groups(storm_wave: int, baseline: bool) -> Dict[str, List[Variant]]:
    """Every scenario group, its variants in the interleaving order; with `baseline`, each
    idemproxy variant is followed by the baseline build's (the replicated-Redis, the
    JSON-fingerprint and the disk-store variants have none)."""
    all_groups = _groups(str(storm_wave))
    if not baseline:
        return all_groups
    return {name: with_baseline(variants) for name, variants in all_groups.items()}


def _groups(wave: str) -> Dict[str, List[Variant]]:
    """Every scenario group of this build alone; `wave`: storm requests per key."""
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
            Variant("embedded-json-fingerprint", IDEM_JSON, "keyed_new.lua", ("@SEED",), _proxy(IDEM_JSON)),
            Variant("idemproxy-disk", IDEM_DISK, "keyed_new.lua", ("@SEED",), _proxy(IDEM_DISK)),
            Variant("replicated-min0", IDEM_REPL0, "keyed_new.lua", ("@SEED",), _proxy(IDEM_REPL0, _REPLICATED)),
            Variant("replicated-min1", IDEM_REPL1, "keyed_new.lua", ("@SEED",), _proxy(IDEM_REPL1, _REPLICATED)),
        ],
        "replay": [
            Variant("idemproxy-redis", IDEM_REDIS, "keyed_same.lua", ("@KEY",), _proxy(IDEM_REDIS, _REDIS)),
            Variant("idemproxy-embedded", IDEM_MEM, "keyed_same.lua", ("@KEY",), _proxy(IDEM_MEM)),
            Variant("idemproxy-disk", IDEM_DISK, "keyed_same.lua", ("@KEY",), _proxy(IDEM_DISK)),
            Variant("replicated-min0", IDEM_REPL0, "keyed_same.lua", ("@KEY",), _proxy(IDEM_REPL0, _REPLICATED)),
            Variant("replicated-min1", IDEM_REPL1, "keyed_same.lua", ("@KEY",), _proxy(IDEM_REPL1, _REPLICATED)),
        ],
        "storm": [
            Variant("idemproxy-redis", IDEM_REDIS, "storm.lua", ("@SEED", wave), _proxy(IDEM_REDIS, _REDIS)),
            Variant("idemproxy-embedded", IDEM_MEM, "storm.lua", ("@SEED", wave), _proxy(IDEM_MEM)),
            Variant("idemproxy-disk", IDEM_DISK, "storm.lua", ("@SEED", wave), _proxy(IDEM_DISK)),
        ],
    }
