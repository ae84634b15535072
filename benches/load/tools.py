"""The tools the benchmark needs: found, or installed with apt-get; their versions; the build,
and the baseline build (BASELINE=<revision>)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
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


def _target_dir(root: Path) -> Path:
    """Cargo's target directory of the workspace at `root`."""
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=root,
                          capture_output=True, text=True, check=True)
    return Path(json.loads(meta.stdout)["target_directory"])


def build(root: Path, tmp: Path, examples: Sequence[str]) -> Dict[str, Path]:
    """cargo build --release of idemproxy and `examples`, copied into `tmp` (so a rebuild in a
    shared target dir during the run cannot change what is measured): name -> path."""
    log("building idemproxy (release)")
    argv = ["cargo", "build", "--release", "--bin", "idemproxy"]
    for example in examples:
        argv += ["--example", example]
    if subprocess.run(argv, cwd=root).returncode != 0:
        raise BenchError("cargo build failed")
    release = _target_dir(root) / "release"
    sources = {"idemproxy": release / "idemproxy", **{e: release / "examples" / e for e in examples}}
    copies = {}
    for name, source in sources.items():
        copies[name] = tmp / name
        shutil.copy2(source, copies[name])
    return copies


@dataclass(frozen=True)
class Baseline:
    """The idemproxy of BASELINE=<revision>: the revision as given, its short commit, its binary."""

    revision: str
    commit: str
    binary: Path


def _git(root: Path, *args: str) -> str:
    """What `git args` prints, run in `root`; a BenchError with git's message if it fails."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def build_baseline(root: Path, revision: str, tmp: Path, examples: Sequence[str]) -> Baseline:
    """The release idemproxy of `revision`, built with the same command as this build (the
    `examples` it has, as `build` builds them: cargo unifies the features of the dependencies
    the examples add, so the binary built without them is not the same program): built once,
    then kept as target/bench-baseline/<sha>/idemproxy+<examples> and reused by the next runs."""
    try:
        sha = _git(root, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    except BenchError as e:
        raise BenchError(f"BASELINE={revision} is not a commit of {root}") from e
    short = _git(root, "rev-parse", "--short", sha)
    home = _target_dir(root) / "bench-baseline"
    # Named by the build command too: a binary built without the examples is another program.
    binary = home / sha / "+".join(["idemproxy", *examples])
    if binary.exists():
        log(f"baseline {revision} ({short}): reusing {binary}")
    else:
        _build_revision(root, sha, tmp / "baseline-src", home / "cargo", binary, examples)
    return Baseline(revision, short, binary)


def _build_revision(root: Path, sha: str, src: Path, target_dir: Path, binary: Path,
                    examples: Sequence[str]) -> None:
    """cargo build --release of idemproxy and those of `examples` commit `sha` has, in a detached
    git worktree `src` (removed afterwards) with its own CARGO_TARGET_DIR `target_dir`; the
    binary ends as `binary`."""
    log(f"building the baseline idemproxy {sha[:12]} (release) in {src}, CARGO_TARGET_DIR={target_dir}")
    _git(root, "worktree", "add", "--detach", "--quiet", str(src), sha)
    try:
        env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
        argv = ["cargo", "build", "--release", "--bin", "idemproxy"]
        for example in examples:
            if (src / "examples" / f"{example}.rs").exists():
                argv += ["--example", example]
        if subprocess.run(argv, cwd=src, env=env).returncode != 0:
            raise BenchError(f"cargo build of the baseline {sha[:12]} failed")
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(binary.name + ".partial")
        shutil.copy2(target_dir / "release" / "idemproxy", partial)
        os.replace(partial, binary)  # whole or absent: a later run reuses only a finished build
    finally:
        if subprocess.run(["git", "worktree", "remove", "--force", str(src)], cwd=root).returncode != 0:
            log(f"warning: the worktree {src} is still registered (`git worktree prune` drops it)")
