"""The tools the benchmark needs: found, or installed with apt-get; their versions; the build."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

from .processes import BenchError, log

# command -> Debian package that provides it.
PACKAGES = {"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server", "redis-cli": "redis-tools",
            "taskset": "util-linux"}


def _find(command: str) -> str:
    """The path of `command` on PATH or in /usr/sbin, or '' when there is none."""
    found = shutil.which(command)
    if found:
        return found
    sbin = f"/usr/sbin/{command}"
    return sbin if os.access(sbin, os.X_OK) else ""


def _as_root() -> List[str]:
    """The prefix that runs a command as root: nothing when we are root, else sudo."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo"]
    raise BenchError("installing missing tools needs root or sudo")


def apt_install(packages: Sequence[str]) -> None:
    """apt-get update, then apt-get install `packages` (non-interactive, no recommends)."""
    if not shutil.which("apt-get"):
        raise BenchError(f"missing {' '.join(packages)}, and there is no apt-get: install it by hand")
    root = _as_root()
    log("apt-get update")
    if subprocess.run(root + ["apt-get", "update", "-qq"]).returncode != 0:
        raise BenchError("apt-get update failed")
    log(f"apt-get install {' '.join(packages)}")
    install = root + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq",
                      "--no-install-recommends", *packages]
    if subprocess.run(install).returncode != 0:
        raise BenchError(f"apt-get install {' '.join(packages)} failed")


def ensure_tools() -> Dict[str, str]:
    """command -> path of every tool, installing the missing ones; cargo must be there."""
    if not shutil.which("cargo"):
        raise BenchError("cargo not found: install a Rust toolchain (https://rustup.rs)")
    missing = [cmd for cmd in PACKAGES if not _find(cmd)]
    if missing:
        apt_install(sorted({PACKAGES[cmd] for cmd in missing}))
    paths = {cmd: _find(cmd) for cmd in PACKAGES}
    for cmd, path in paths.items():
        if not path:
            raise BenchError(f"{cmd} is still missing after installing {PACKAGES[cmd]}")
    return paths


def check_pin(cpus: str) -> None:
    """Fails unless processes can be pinned to `cpus` with taskset."""
    if subprocess.run(["taskset", "-c", cpus, "true"], stderr=subprocess.DEVNULL).returncode != 0:
        raise BenchError(f"cannot pin to cores {cpus} (taskset -c {cpus} failed)")


def _output(argv: Sequence[str], root: Path, stderr: bool = True) -> str:
    """What `argv` prints (stdout, and stderr unless told not), run in `root`; '' when it
    cannot run."""
    try:
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout + (done.stderr if stderr else "")


def versions(tools: Dict[str, str], root: Path) -> Dict[str, str]:
    """Versions of nginx, redis, wrk and rustc, and the commit measured (for the report)."""
    nginx = re.search(r"nginx/(\S+)", _output([tools["nginx"], "-v"], root))
    redis = re.search(r"v=(\S+)", _output([tools["redis-server"], "--version"], root))
    wrk = _output([tools["wrk"], "-v"], root).split()
    rustc = _output(["rustc", "--version"], root).split()
    commit = _output(["git", "rev-parse", "--short", "HEAD"], root, stderr=False).strip()
    dirty = _output(["git", "status", "--porcelain"], root, stderr=False).splitlines()
    return {
        "nginx": nginx.group(1) if nginx else "?",
        "redis": redis.group(1) if redis else "?",
        "wrk": wrk[1] if len(wrk) > 1 else "?",
        "rustc": rustc[1] if len(rustc) > 1 else "?",
        "commit": commit if re.fullmatch(r"[0-9a-f]+", commit) else "unknown",
        "dirty": str(len(dirty)),
    }


def build(root: Path, tmp: Path, examples: Sequence[str]) -> Dict[str, Path]:
    """cargo build --release of idemproxy and `examples`, copied into `tmp` (so a rebuild in a
    shared target dir during the run cannot change what is measured): name -> path."""
    log("building idemproxy (release)")
    argv = ["cargo", "build", "--release", "--bin", "idemproxy"]
    for example in examples:
        argv += ["--example", example]
    if subprocess.run(argv, cwd=root).returncode != 0:
        raise BenchError("cargo build failed")
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=root,
                          capture_output=True, text=True, check=True)
    release = Path(json.loads(meta.stdout)["target_directory"]) / "release"
    sources = {"idemproxy": release / "idemproxy", **{e: release / "examples" / e for e in examples}}
    copies = {}
    for name, source in sources.items():
        copies[name] = tmp / name
        shutil.copy2(source, copies[name])
    return copies
