"""Settings of the load benchmark, read from the environment (listed in benches/load.sh)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Tuple

GROUPS = ("get", "post", "new", "replay", "storm")
# Groups run only when ONLY names them: the keyed-upload scenario (issue 16, benches/load/upload.py).
EXTRA_GROUPS = ("upload",)


class ConfigError(Exception):
    """A setting has an unusable value."""


@dataclass(frozen=True)
class Settings:
    """Every knob of a run; `load_cpus`/`server_cpus` are None when nothing is pinned."""

    root: Path
    out_dir: Path
    quick: bool
    duration: int
    warmup: int
    rounds: int
    conns: int
    wrk_threads: int
    storm_wave: int
    proxy_log: str
    upstream_kind: str
    only: Tuple[str, ...]
    calibration_requests: int
    memory_max_entries: int
    keep_tmp: bool
    load_cpus: Optional[str]
    server_cpus: Optional[str]
    baseline: Optional[str]

    @property
    def pinned(self) -> bool:
        """True when wrk and the servers run on separate cores (taskset)."""
        return self.load_cpus is not None


def _whole(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """The integer setting `name`, at least `minimum`."""
    raw = env.get(name, "") or str(default)
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum} (got {raw})")
    return int(raw)


def _groups(raw: str) -> Tuple[str, ...]:
    """The scenario groups of ONLY, in the given order, each once."""
    groups = []
    for group in raw.split():
        if group not in GROUPS + EXTRA_GROUPS:
            raise ConfigError(f"unknown group in ONLY: {group} (known: {' '.join(GROUPS + EXTRA_GROUPS)})")
        if group not in groups:
            groups.append(group)
    if not groups:
        raise ConfigError("ONLY names no scenario group")
    return tuple(groups)


def _cpus(env: Mapping[str, str], name: str, default: str) -> str:
    """A taskset core list such as `1`, `0,2` or `2-3`."""
    raw = env.get(name, "") or default
    if not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", raw):
        raise ConfigError(f"{name} must be a core list such as 1, 0,2 or 2-3 (got {raw})")
    return raw


def _revision(env: Mapping[str, str]) -> Optional[str]:
    """BASELINE: a git revision (`f6430ef`, `main~3`, `v0.1.0`), or None when unset."""
    raw = env.get("BASELINE", "").strip()
    if not raw:
        return None
    if raw.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._/~^@{}:+-]+", raw):
        raise ConfigError(f"BASELINE must be a git revision such as f6430ef or main~3 (got {raw!r})")
    return raw


def from_env(env: Mapping[str, str], root: Path, ncpu: int) -> Settings:
    """Settings from environment variables; `ncpu` decides whether cores are pinned."""
    quick = env.get("QUICK", "0") == "1"
    upstream_kind = env.get("UPSTREAM_KIND", "") or "nginx"
    if upstream_kind not in ("nginx", "hyper"):
        raise ConfigError(f"UPSTREAM_KIND must be nginx or hyper (got {upstream_kind})")
    pinned = ncpu >= 2
    return Settings(
        root=root,
        out_dir=Path(env.get("OUT_DIR", "") or root / "benches" / "results"),
        quick=quick,
        duration=_whole(env, "DURATION", 2 if quick else 10, 1),
        warmup=_whole(env, "WARMUP", 1 if quick else 3, 0),
        rounds=_whole(env, "ROUNDS", 3, 1),
        conns=_whole(env, "CONNS", 32, 1),
        wrk_threads=_whole(env, "WRK_THREADS", 1, 1),
        storm_wave=_whole(env, "STORM_WAVE", 320, 1),
        proxy_log=env.get("PROXY_LOG", "") or "warn",
        upstream_kind=upstream_kind,
        only=_groups(env.get("ONLY", "") or " ".join(GROUPS)),
        calibration_requests=_whole(env, "CALIBRATION_REQUESTS", 100, 1),
        memory_max_entries=_whole(env, "MEMORY_MAX_ENTRIES", 10_000_000, 1),
        keep_tmp=env.get("KEEP_TMP", "0") == "1",
        load_cpus=_cpus(env, "LOAD_CPUS", "0") if pinned else None,
        server_cpus=_cpus(env, "SERVER_CPUS", "1") if pinned else None,
        baseline=_revision(env),
    )
