"""`make bench`: runs every benchmark against one mesh and writes bench/RESULTS.md and
bench/results.json. Every figure is a median of repeated runs, next to a baseline measured in
the same run. `python -m bench --quick` runs smaller versions (a smoke check, not figures)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import admission, mesh_overhead, sse_fanout, throughput
from bench.client import running_mesh
from bench.report import render
from bench.stats import machine

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the mesh and its stores are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    quick = args.quick
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": quick,
    }
    started = time.perf_counter()
    with running_mesh() as mesh:
        print("mesh overhead …", flush=True)
        results["mesh_overhead"] = asyncio.run(mesh_overhead.run(mesh, runs=3 if quick else 9))
        print("throughput …", flush=True)
        results["throughput"] = asyncio.run(throughput.run(mesh, repeats=1 if quick else 3))
        print("SSE fan-out …", flush=True)
        results["sse_fanout"] = asyncio.run(
            sse_fanout.run(mesh, watchers=100 if quick else 1000, jobs=4)
        )
        print("admission …", flush=True)
        results["admission"] = asyncio.run(
            admission.run(mesh, count=200 if quick else 1000, repeats=1 if quick else 3)
        )
    results["wall_s"] = time.perf_counter() - started
    name = "results.quick.json" if quick else "results.json"
    (HERE / name).write_text(json.dumps(results, indent=2) + "\n")
    if not quick:
        (HERE / "RESULTS.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
