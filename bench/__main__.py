"""`make bench`: runs every benchmark against one mesh (the engine benchmark without one) and
writes bench/RESULTS.md and bench/results.json. Every figure is a median of repeated runs, next
to a baseline measured in the same run. `python -m bench --quick` runs smaller versions (a smoke
check, not figures)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    admission,
    engine,
    evaluator,
    mesh_overhead,
    moderation,
    observability,
    polling,
    sse_fanout,
    throughput,
)
from bench.client import running_mesh
from bench.report import render
from bench.stats import machine
from services.mesh import Mesh

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only", help="run just this benchmark (e.g. polling); no files written but with --merge"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: put its result into bench/results.json (the others kept) and "
        "render RESULTS.md again",
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so the mesh and its stores are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    quick = args.quick
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": quick,
    }
    runs: dict[str, Callable[[Mesh], Any]] = {
        "mesh_overhead": lambda m: mesh_overhead.run(m, runs=3 if quick else 9),
        "throughput": lambda m: throughput.run(m, repeats=1 if quick else 3),
        "polling": lambda m: polling.run(
            m, reads=300 if quick else 2000, jobs=32 if quick else 96, repeats=1 if quick else 3
        ),
        "sse_fanout": lambda m: sse_fanout.run(m, watchers=100 if quick else 1000, jobs=4),
        # Last: it stops the generator.
        "admission": lambda m: admission.run(
            m, count=200 if quick else 1000, repeats=1 if quick else 3
        ),
    }
    # Without the mesh, after it has stopped: its idle processes would share the cores.
    standalone: dict[str, Callable[[], Any]] = {
        "engine": lambda: engine.run(quick),
        "evaluator": lambda: evaluator.run(quick),
        "moderation": lambda: asyncio.to_thread(moderation.run, 100 if quick else 300),
        # Its own meshes: a fresh one per run, metrics and tracing off or on.
        "observability": lambda: observability.run(quick),
    }
    if args.only and args.only not in {*runs, *standalone}:
        parser.error(f"--only: one of {sorted({*runs, *standalone})}")
    if args.merge and (quick or not args.only):
        parser.error("--merge: with --only, and not with --quick")
    started = time.perf_counter()
    if args.only in (None, *runs):
        with running_mesh() as mesh:
            for name, bench in runs.items():
                if args.only in (None, name):
                    print(f"{name} …", flush=True)
                    results[name] = asyncio.run(bench(mesh))
    for name, run in standalone.items():
        if args.only in (None, name):
            print(f"{name} …", flush=True)
            results[name] = asyncio.run(run())
    if args.only:
        print(json.dumps(results[args.only], indent=2))
        if args.merge:
            merged = json.loads((HERE / "results.json").read_text())
            merged[args.only] = {"date": results["date"], **results[args.only]}
            (HERE / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
            (HERE / "RESULTS.md").write_text(render(merged))
        return
    results["wall_s"] = time.perf_counter() - started
    name = "results.quick.json" if quick else "results.json"
    (HERE / name).write_text(json.dumps(results, indent=2) + "\n")
    if not quick:
        (HERE / "RESULTS.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
