"""The cost of watching: admission (CreateJob/s over gRPC and over HTTP, the generator stopped,
bench/admission.py's drivers) and one job's latency through the mesh (bench/mesh_overhead.py's
job, HTTP to the SSE `final` event) with metrics and tracing off, on for every request, and on
as deploy/ ships it (head sampling).

- off: METRICS_PORT=-1 (no metric interceptors or middleware, no /metrics server) and no OTEL_*
  variable (no tracing interceptors or middleware).
- on: METRICS_PORT=0 (a metrics server per service) and OTLP/gRPC trace export to a real
  receiver in this process (bench/trace_sink.py), which counts the spans; every request traced
  (the SDK's default sampler).
- sampled: as on, with deploy/'s sampler: `parentbased_traceidratio` at 0.1 (a tenth of the
  requests that come without a trace start one; a caller's sampled `traceparent` is followed).

The machine is shared and noisy (2 cores; other engineers' tests come and go), so runs minutes
apart differ by more than what is measured here. Each round starts three fresh meshes (fresh
embedded stores), one per mode, side by side, and takes them in turn, one latency job at a time,
then one admission burst at a time (the order of the three changes from one set to the next,
through all six: a drift over the run weighs on every mode alike), so that the runs of a set are
seconds apart. Before each run the trace receiver must have been idle for a while: a watched
mesh's span export is done before the next run starts; a burst's CPU is counted until then (its
last spans' export included). The figures are medians; the ratios to off are the medians of each
set's ratio (and, beside them, the ratio of the medians). Beside the rates, the CPU a job takes,
summed over the mesh's processes: on 2 cores shared by all of it the rate follows it.

Rates measured one after another swing by 10-20% from one burst to the next on this machine
(the same mesh, seconds apart), which is more than what is measured. So each round also drives
the three meshes together, the same calls at once (`together`): over the same seconds, a slower
or faster machine weighs on all alike, and the CPU each mesh's processes spent per admitted job
(the driver left out: it is this one process for all) gives a steady ratio, the rate a mesh
bound by its CPU would keep. The acceptance is read there.

Each round also proves its modes: every watched burst's spans (those that started during it)
must reach the receiver, and the watched caches' own /metrics (found by their listening port)
must have counted the gateway's lookups; from the `off` mesh no span may arrive, none of its
services may listen on a metrics port and its gateway's /metrics must count no request. A
failed proof fails the benchmark.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    ExitStack,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import psutil  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from bench import admission, mesh_overhead
from bench.client import MODEL_DIR
from bench.polling import cpu_seconds, postgres_processes
from bench.stats import median
from bench.trace_sink import Span, TraceSink
from services.mesh import Mesh, Ports, prepare_mesh, start_services

MODES = ("off", "on", "sampled")
WATCHED = ("on", "sampled")
# deploy/'s sampler (deploy/k8s/configmap.yaml, deploy/compose.yaml).
SAMPLED_ENV = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
# Each set of runs takes the modes in one of these orders, in turn (each mode first, second and
# third alike, and after each of the others alike).
ORDERS = (
    ("off", "on", "sampled"),
    ("sampled", "on", "off"),
    ("on", "off", "sampled"),
    ("sampled", "off", "on"),
    ("off", "sampled", "on"),
    ("on", "sampled", "off"),
)
PROTOCOLS = ("grpc", "http")
T = TypeVar("T")
# How often the services' span processors export (ms; the SDK's default is 5000): spans also
# go out whenever 512 are waiting, and a stopping service flushes what is left.
BSP_SCHEDULE_DELAY_MS = 1000
# A run starts once no span has arrived for this long: the `on` mesh has exported the last.
SETTLE_S = BSP_SCHEDULE_DELAY_MS / 1e3 + 0.5
ACCEPTANCE = 0.95  # admission rate watched / off: watching may cost at most 5%
# A set is "clean" (for a watched mode) when, during its run and the off run, processes outside
# this benchmark used less CPU than this (in cores).
OTHER_CPU_LIMIT = 0.2
PARTS = ("gateway", "cache", "postgres", "redis", "bench")  # CPU per job, by process
MESH_PARTS = PARTS[:-1]  # the mesh's own processes (not the driver)


def _mode_env(mode: str, sink: TraceSink) -> dict[str, str]:
    if mode == "off":
        return {"METRICS_PORT": "-1"}
    # More for the `on` mesh, to see what a setting buys, e.g. BENCH_ON_ENV="OTEL_BSP_SCHEDULE_
    # DELAY=5000" (`make bench` sets none).
    extra = dict(item.split("=", 1) for item in os.environ.get("BENCH_ON_ENV", "").split())
    if mode == "sampled":
        extra = SAMPLED_ENV
    return {
        "METRICS_PORT": "0",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": str(BSP_SCHEDULE_DELAY_MS),
        **extra,
    }


@asynccontextmanager
async def _mesh(folder: Path, env: dict[str, str]) -> AsyncIterator[Mesh]:
    """The four services on fresh embedded stores in `folder`, with `env` and no other OTEL_*
    variable (whatever this process's environment holds)."""
    extra = {"MODEL_DIR": str(MODEL_DIR), "LOG_LEVEL": "WARNING", **env}
    mesh = await asyncio.to_thread(prepare_mesh, folder, Ports.free(), extra)
    await _commit_without_waiting_for_disk(mesh.env["DATABASE_URL"])
    for name in [n for n in mesh.env if n.startswith("OTEL_") and n not in env]:
        del mesh.env[name]
    await start_services(mesh, folder / "logs")
    try:
        yield mesh
    finally:
        await asyncio.to_thread(mesh.stop)  # SIGTERM: each service flushes its spans


async def _commit_without_waiting_for_disk(database_url: str) -> None:
    """Both meshes' Postgres answer a commit before its WAL reaches the disk. Admission commits
    a transaction per job; on this shared machine the disk's flush latency swings by tens of
    percent from one second to the next (seen: the same mesh at 140 and 230 jobs/s in
    neighbouring bursts), which is noise to what is measured here, and without it admission is
    bound by CPU alone: the case where watching weighs the most."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("ALTER SYSTEM SET synchronous_commit = off")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


# CPU accounting


def _busy_s() -> float:
    """CPU seconds the whole machine has spent since boot (all cores)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


def _ours(meshes: dict[str, Mesh]) -> float:
    """CPU seconds of this process, its children (services, Redis) and the meshes' Postgres."""
    me = psutil.Process()
    postgres = [p for m in meshes.values() for p in postgres_processes(m.data_dir / "postgres")]
    return cpu_seconds([me, *me.children(recursive=True), *postgres])


def _parts(mesh: Mesh) -> dict[str, list[psutil.Process]]:
    me = psutil.Process()
    return {
        "gateway": [psutil.Process(mesh.processes["gateway"].pid)],
        "cache": [psutil.Process(mesh.processes["cache"].pid)],
        "postgres": postgres_processes(mesh.data_dir / "postgres"),
        "redis": [p for p in me.children() if mesh.data_dir.name in " ".join(p.cmdline())],
        "bench": [me],  # the load driver (and the trace receiver's thread)
    }


@contextmanager
def _cpu(mesh: Mesh, meshes: dict[str, Mesh], into: dict[str, float]) -> Iterator[None]:
    """CPU seconds spent over the block by each part of `mesh` (PARTS), and the cores busy on
    average outside this benchmark ("other_cores": another engineer's tests)."""
    parts = {name: cpu_seconds(ps) for name, ps in _parts(mesh).items()}
    ours, busy, started = _ours(meshes), _busy_s(), time.perf_counter()
    yield
    wall = time.perf_counter() - started
    # Processes listed again: Postgres backends opened meanwhile count too.
    for name, ps in _parts(mesh).items():
        into[name] = cpu_seconds(ps) - parts[name]
    into["other_cores"] = (_busy_s() - busy - (_ours(meshes) - ours)) / wall


# Runs


async def _latency(meshes: dict[str, Mesh], sink: TraceSink, jobs: int) -> list[dict[str, Any]]:
    """bench/mesh_overhead.py's job, two warm-ups on each mesh, then one job on each in turn."""
    async with AsyncExitStack() as stack:
        clients = {
            mode: await stack.enter_async_context(
                httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=120)
            )
            for mode, mesh in meshes.items()
        }
        for mode in MODES:
            for _ in range(2):
                await mesh_overhead.one_job(meshes[mode], clients[mode])
        sets = []
        for index in range(jobs):
            runs = {}
            for mode in _order(index):
                job, cpu, window = await _alone(
                    meshes, mode, sink, mesh_overhead.one_job(meshes[mode], clients[mode])
                )
                runs[mode] = {
                    "window_ns": window,
                    "total_ms": job["total"],
                    # What the mesh adds around the render and encode (what watching can change).
                    "mesh_ms": job["total"] - job["generation"] - job["encode"],
                    "admission_ms": job["admission"],
                    "other_cores": cpu["other_cores"],
                }
            sets.append(runs)
    return sets


Caller = Callable[[Mesh], AbstractAsyncContextManager[admission.Call]]


async def _warm_calls(
    stack: AsyncExitStack, meshes: dict[str, Mesh], caller: Caller
) -> dict[str, admission.Call]:
    """A caller per mesh (open for the stack's life), each warmed up as bench/admission.py
    does."""
    calls = {m: await stack.enter_async_context(caller(meshes[m])) for m in MODES}
    for mode in MODES:
        await admission.drive(admission.WARMUP, calls[mode])
    return calls


async def _exported(sink: TraceSink) -> None:
    """Returns once the spans of the burst just run have been exported (they leave after it,
    when the span processor's timer fires), and SETTLE_S after the burst at the least: a CPU
    window that ends here counts that export, and every mode's window settles as long, so the
    meshes' idle CPU weighs alike."""
    settled = time.monotonic() + SETTLE_S
    await sink.idle(SETTLE_S, within_s=15)
    await asyncio.sleep(max(settled - time.monotonic(), 0.0))


async def _alone(
    meshes: dict[str, Mesh],
    mode: str,
    sink: TraceSink,
    work: Awaitable[T],
    exported: bool = False,
) -> tuple[T, dict[str, float], list[int]]:
    """`work` on the `mode` mesh alone, once the trace receiver is idle: its result, the CPU by
    part over it (and, if `exported`, over the export of its last spans) and its window (unix
    ns)."""
    await sink.idle(SETTLE_S, within_s=15)
    cpu: dict[str, float] = {}
    with _cpu(meshes[mode], meshes, cpu):
        started = time.time_ns()
        result = await work
        ended = time.time_ns()
        if exported:
            await _exported(sink)
    return result, cpu, [started, ended]


def _order(index: int) -> tuple[str, ...]:
    """The modes' order for the index-th set of runs: a drift over the run (the jobs table and
    the queue grow with every burst) weighs on every mode alike."""
    return ORDERS[index % len(ORDERS)]


async def _admissions(
    meshes: dict[str, Mesh], caller: Caller, sink: TraceSink, count: int, sets: int
) -> list[dict[str, Any]]:
    """bench/admission.py's warm-up on each mesh, then `count` calls on each in turn, `sets`
    times: each burst's rate, window (unix ns) and CPU per admitted job by part."""
    out = []
    async with AsyncExitStack() as stack:
        calls = await _warm_calls(stack, meshes, caller)
        for index in range(sets):
            runs = {}
            for mode in _order(index):
                result, cpu, window = await _alone(
                    meshes, mode, sink, admission.drive(count, calls[mode]), exported=True
                )
                jobs = max(result["admitted"], 1)
                runs[mode] = {
                    **result,
                    "window_ns": window,
                    "cpu_ms_per_job": {p: cpu[p] * 1e3 / jobs for p in PARTS},
                    "other_cores": cpu["other_cores"],
                }
            out.append(runs)
    return out


async def _together(
    meshes: dict[str, Mesh], caller: Caller, sink: TraceSink, count: int, sets: int
) -> list[dict[str, Any]]:
    """The meshes driven at once, `count` calls each, `sets` times: each one's rate and the CPU
    its own processes spent per admitted job over the same seconds (its last spans' export
    included)."""
    out = []
    async with AsyncExitStack() as stack:
        calls = await _warm_calls(stack, meshes, caller)
        for _ in range(sets):
            await sink.idle(SETTLE_S, within_s=15)
            cpu: dict[str, dict[str, float]] = {m: {} for m in MODES}
            with ExitStack() as windows:
                for mode in MODES:
                    windows.enter_context(_cpu(meshes[mode], meshes, cpu[mode]))
                results = await asyncio.gather(*(admission.drive(count, calls[m]) for m in MODES))
                await _exported(sink)
            runs = {}
            for mode, result in zip(MODES, results, strict=True):
                jobs = max(result["admitted"], 1)
                spent = sum(cpu[mode][part] for part in MESH_PARTS)
                runs[mode] = {
                    "per_s": result["per_s"],
                    "admitted": result["admitted"],
                    "errors": result["errors"],
                    "mesh_cpu_ms_per_job": spent * 1e3 / jobs,
                }
            out.append(runs)
    return out


def _samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def _metrics(mesh: Mesh) -> dict[str, Any]:
    """What the metrics say: the cache's own metrics port (the one it listens on besides its
    gRPC port), the lookups its /metrics counted, and what the gateway's /metrics counted."""
    cache = psutil.Process(mesh.processes["cache"].pid)
    listening = {
        c.laddr.port for c in cache.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
    }
    ports = sorted(listening - {mesh.ports.cache})
    out: dict[str, Any] = {"cache_metrics_port": ports[0] if ports else None}
    async with httpx.AsyncClient(timeout=10) as client:
        if ports:
            text = (await client.get(f"http://127.0.0.1:{ports[0]}/metrics")).raise_for_status()
            out["cache_lookups_counted"] = _samples(
                text.text, "imagegen_grpc_server_handled_total", grpc_method="Lookup"
            )
        gateway = (await client.get(f"{mesh.http_url}/metrics")).raise_for_status().text
    out["gateway_create_job_counted"] = _samples(
        gateway, "imagegen_grpc_server_handled_total", grpc_method="CreateJob"
    )
    out["gateway_http_requests_counted"] = _samples(gateway, "imagegen_http_requests_total")
    return out


def _spans_per_job(burst: dict[str, Any], spans: list[Span]) -> tuple[float, Counter[str]]:
    """Spans that started during the burst, per admitted job; and by service and name."""
    low, high = burst["window_ns"]
    mine = [s for s in spans if low <= s[0] <= high]
    return len(mine) / max(burst["admitted"], 1), Counter(f"{s[1]} {s[2]}" for s in mine)


def _check(round_: dict[str, Any], admitted: dict[str, int]) -> list[str]:
    """What shows that a round's meshes were not in the modes they claim."""
    off = round_["metrics"]["off"]
    problems = []
    for mode in WATCHED:
        watched = round_["metrics"][mode]
        if any(p[mode]["spans_per_job"] <= 0 for key in PROTOCOLS for p in round_[key]):
            problems.append(f"a `{mode}` burst got no span")
        if watched["cache_metrics_port"] is None:
            problems.append(f"the `{mode}` cache served no /metrics")
        if watched.get("cache_lookups_counted", 0) < admitted[mode]:
            problems.append(f"the `{mode}` cache's /metrics counted fewer lookups than jobs")
    if off["cache_metrics_port"] is not None:
        problems.append("the `off` cache serves /metrics")
    if off["gateway_create_job_counted"] or off["gateway_http_requests_counted"]:
        problems.append("the `off` gateway's metric interceptors counted")
    if any(p["off"]["spans_per_job"] for key in PROTOCOLS for p in round_[key]):
        problems.append("spans started during `off` bursts")
    return problems


async def _round(
    index: int, sink: TraceSink, count: int, sets: int, latency_jobs: int
) -> dict[str, Any]:
    mark = sink.received()
    round_: dict[str, Any] = {"index": index}
    async with AsyncExitStack() as stack:
        meshes = {}
        for mode in MODES:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagegen-")))
            meshes[mode] = await stack.enter_async_context(_mesh(folder, _mode_env(mode, sink)))
        round_["latency"] = await _latency(meshes, sink, latency_jobs)
        for mesh in meshes.values():  # queueing only from here
            await asyncio.to_thread(mesh.stop_service, "generator")
        for key, caller in (
            ("grpc", admission.grpc_create_job),
            ("http", admission.http_create_job),
        ):
            round_[key] = await _admissions(meshes, caller, sink, count, sets)
            round_[f"{key}_together"] = await _together(meshes, caller, sink, count, sets)
        round_["metrics"] = {mode: await _metrics(mesh) for mode, mesh in meshes.items()}
        stopping = time.time_ns()
    # The meshes stopped: every span has been flushed.
    spans, exports = sink.since(mark)
    for key in PROTOCOLS:
        for runs in round_[key]:
            for mode in MODES:
                runs[mode]["spans_per_job"] = _spans_per_job(runs[mode], spans)[0]
        last = round_[key][-1]["on"]
        names = _spans_per_job(last, spans)[1]
        round_[f"{key}_span_names_per_job"] = {
            n: c / max(last["admitted"], 1) for n, c in sorted(names.items())
        }
    for runs in round_["latency"]:
        for mode in MODES:
            low, high = runs[mode]["window_ns"]
            runs[mode]["spans"] = sum(low <= s[0] <= high for s in spans)
    round_["spans"] = {
        "total": len(spans),
        "by_service": dict(sorted(Counter(s[1] for s in spans).items())),
        "exports": len(exports),
        "arrived_before_stop": sum(n for at, n in exports if at < stopping),
    }
    admitted = {m: sum(p[m]["admitted"] for key in PROTOCOLS for p in round_[key]) for m in WATCHED}
    problems = _check(round_, admitted)
    if problems:
        raise RuntimeError(f"observability round {index}: " + "; ".join(problems))
    return round_


# The whole benchmark


def _compare(
    sets: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]
) -> dict[str, Any]:
    """Medians of `value` by mode and, for each watched mode, its ratio to off: the median of
    each set's ratio (overall and over the clean sets only) and the ratio of the medians."""
    values = {mode: [value(p[mode]) for p in sets] for mode in MODES}
    out: dict[str, Any] = {
        **{mode: median(values[mode]) for mode in MODES},
        **{f"{mode}_runs": values[mode] for mode in MODES},
        "other_cores_runs": [[p[m]["other_cores"] for m in MODES] for p in sets],
    }
    for mode in WATCHED:
        ratios = [value(p[mode]) / value(p["off"]) for p in sets]
        clean = [
            r
            for r, p in zip(ratios, sets, strict=True)
            if max(p["off"]["other_cores"], p[mode]["other_cores"]) <= OTHER_CPU_LIMIT
        ]
        out[mode + "/off"] = {
            "ratio": median(ratios),
            "ratio_of_medians": median(values[mode]) / median(values["off"]),
            "set_ratios": ratios,
            "clean_sets": len(clean),
            "clean_ratio": median(clean) if clean else None,
        }
    return out


def _cpu_ratio(runs: dict[str, Any], mode: str) -> float:
    return float(runs["off"]["mesh_cpu_ms_per_job"] / runs[mode]["mesh_cpu_ms_per_job"])


def _field(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda run: float(run[key])


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in PROTOCOLS:
        sets = [p for r in rounds for p in r[key]]
        totals = [{m: sum(p[m]["cpu_ms_per_job"].values()) for m in MODES} for p in sets]
        out[key] = {
            **_compare(sets, _field("per_s")),
            "p50_ms": {m: median([p[m]["p50_ms"] for p in sets]) for m in MODES},
            "errors": sum(p[m]["errors"] for p in sets for m in MODES),
            "cpu_ms_per_job": {
                m: {part: median([p[m]["cpu_ms_per_job"][part] for p in sets]) for part in PARTS}
                for m in MODES
            },
            "spans_per_job": {m: median([p[m]["spans_per_job"] for p in sets]) for m in WATCHED},
            "cpu_ms_per_job_runs": [[round(cpu[m], 3) for m in MODES] for cpu in totals],
            # CPU-bound (2 cores shared by all of it), the rate follows the CPU a job takes.
            "cpu_implied": {
                m + "/off": median([cpu["off"] / cpu[m] for cpu in totals]) for m in WATCHED
            },
            "span_names_per_job": rounds[-1][f"{key}_span_names_per_job"],
        }
    jobs = [p for r in rounds for p in r["latency"]]
    for key in ("total_ms", "mesh_ms", "admission_ms"):
        out[f"latency_{key}"] = _compare(jobs, _field(key))
    out["spans_per_rendered_job"] = median([j["on"]["spans"] for j in jobs])
    for key in PROTOCOLS:
        together = [p for r in rounds for p in r[f"{key}_together"]]
        out[key]["together"] = {
            "mesh_cpu_ms_per_job": {
                m: median([p[m]["mesh_cpu_ms_per_job"] for p in together]) for m in MODES
            },
            "errors": sum(p[m]["errors"] for p in together for m in MODES),
            **{
                m + "/off": {
                    # off's CPU per job over the mode's: the rate a CPU-bound mesh keeps.
                    "cpu_ratio": median([_cpu_ratio(p, m) for p in together]),
                    "set_cpu_ratios": [round(_cpu_ratio(p, m), 4) for p in together],
                    "rate_ratio": median([p[m]["per_s"] / p["off"]["per_s"] for p in together]),
                }
                for m in WATCHED
            },
        }
    out["meets_acceptance"] = {
        m: all(out[k]["together"][m + "/off"]["cpu_ratio"] >= ACCEPTANCE for k in PROTOCOLS)
        for m in WATCHED
    }
    return out


async def run(quick: bool) -> dict[str, Any]:
    rounds_, sets, count, latency_jobs = (1, 2, 200, 3) if quick else (2, 8, 500, 4)
    rounds = []
    with TraceSink() as sink:
        for index in range(rounds_):
            round_ = await _round(index, sink, count, sets, latency_jobs)
            for key in PROTOCOLS:
                for p in round_[key]:
                    rates = "  ".join(f"{m} {p[m]['per_s']:6.1f}/s" for m in MODES)
                    other = max(p[m]["other_cores"] for m in MODES)
                    print(f"  {key:4}  {rates}  other load {other:.2f} cores", flush=True)
                for p in round_[f"{key}_together"]:
                    cpu = "  ".join(f"{m} {p[m]['mesh_cpu_ms_per_job']:5.2f}" for m in MODES)
                    print(f"  {key:4}  together, mesh CPU ms/job: {cpu}", flush=True)
            rounds.append(round_)
    return {
        "rounds": rounds_,
        "sets_per_round": sets,
        "requests": count,
        "concurrency": admission.CONCURRENCY,
        "latency_jobs_per_round": latency_jobs,
        "latency_params": mesh_overhead.PARAMS,
        "bsp_schedule_delay_ms": BSP_SCHEDULE_DELAY_MS,
        "other_cpu_limit": OTHER_CPU_LIMIT,
        "acceptance": ACCEPTANCE,
        "on_env": os.environ.get("BENCH_ON_ENV", ""),
        "sampled_env": SAMPLED_ENV,
        **_summary(rounds),
        # What proved each round's modes (the runs' own figures are in the lists above).
        "round_details": [
            {
                k: r[k]
                for k in (
                    "metrics",
                    "spans",
                    *(f"{p}_span_names_per_job" for p in PROTOCOLS),
                    *(f"{p}_together" for p in PROTOCOLS),
                )
            }
            for r in rounds
        ],
    }
