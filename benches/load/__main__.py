"""Entry point: `python3 -m load` with benches/ on the path (what benches/load.sh runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import ConfigError, from_env
from .parse import ParseError
from .processes import BenchError, log
from .run import main_run
from .tools import check_pin, ensure_tools
from .wait import main_wait

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    """Runs the benchmark; 1 with a one-line error on failure, 130 on Ctrl-C."""
    try:
        if os.environ.get("ONLY", "").split() == ["wait"]:
            main_wait(ROOT, ensure_tools(), os.environ)
            return 0
        settings = from_env(os.environ, ROOT, len(os.sched_getaffinity(0)))
        if settings.rounds < 3:
            log(f"warning: ROUNDS={settings.rounds}; the benchmark wants at least 3 interleaved rounds")
        tools = ensure_tools()
        if settings.pinned:
            check_pin(settings.load_cpus)
            check_pin(settings.server_cpus)
        else:
            log("warning: only 1 core available: wrk and the servers share it (no pinning)")
        main_run(settings, tools)
    except (ConfigError, BenchError, ParseError) as e:
        log(f"ERROR: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
