"""Renders benchmark results as the Markdown tables of bench/RESULTS.md."""

from __future__ import annotations

from typing import Any


def _row(*cells: Any) -> str:
    return "| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def _polling(p: dict[str, Any]) -> list[str]:
    c = p["read_cost"]
    lines = [
        "## Clients that poll",
        "",
        f"CPU per read, one client reading one completed two-variant job {c['reads']} times in a "
        f"row (median of {c['repeats']} repeats): the gateway process and every Postgres process "
        "(psutil CPU times). `GET /healthz` is the bare HTTP floor of the same server.",
        "",
        "| read | gateway CPU ms | Postgres CPU ms | total CPU ms | wall ms |",
        "|---|---|---|---|---|",
    ]
    for name, label in (
        ("http_status", "HTTP GET /api/status/{id}"),
        ("grpc_get_job", "gRPC GetJob"),
        ("http_healthz", "HTTP GET /healthz (floor)"),
    ):
        s = c[name]
        lines.append(
            f"| {label} | {s['gateway_cpu_ms']:.2f} | {s['postgres_cpu_ms']:.2f} "
            f"| {s['total_cpu_ms']:.2f} | {s['wall_ms']:.2f} |"
        )
    lines += [
        "",
        f"{p['clients']} clients submitting tiny jobs back to back, each job watched to the end "
        f"over SSE or by polling `GET /api/status/{{id}}` every {p['poll_interval_s'] * 1e3:.0f} "
        "ms; runs interleaved, medians.",
        "",
        "| clients watch by | images/s | p50 ms | errors | jobs |",
        "|---|---|---|---|---|",
    ]
    for name in ("sse", "polling"):
        s = p[name]
        lines.append(_row(name, s["images_per_s"], s["p50_ms"], s["errors"], s["jobs"]))
    lines += ["", f"Polling clients get {p['polling_vs_sse']:.2f}x the images/s of SSE clients."]
    return lines


def _engine(e: dict[str, Any]) -> list[str]:
    p, o, ray = e["params"], e["overhead"], e["ray_serve"]
    levels = list(e["per_client"])
    systems = (("engine", "engine"), ("ray_serve", f"Ray Serve {ray['version']}"))
    lines = [
        "## Engine batching, and Ray Serve",
        "",
        f"The generator's engine alone, with no mesh: {', '.join(levels)} "
        f"concurrent single-image requests ({e['model']}, {p['width']}x{p['height']}, "
        f"{p['steps']} steps, a different seed each), each client submitting "
        f"{', '.join(map(str, e['per_client'].values()))} requests back to back. The engine's "
        "max batch comes from the model registry (1: batching off); the peer is Ray Serve around "
        "the same pipeline folder with `@serve.batch(max_batch_size=...)`, the same "
        f"{e['batch_window_s'] * 1e3:.0f} ms batch window, called through its DeploymentHandle "
        f"(no HTTP on either side). torch at {e['threads']} threads in both; runs interleaved, "
        f"median of {e['repeats']} repeats; each system in a process of its own. Images/s, "
        f"the range of the repeats at {levels[-1]}, and at {levels[-1]} the p50 latency and the "
        "rows of the batch each image came from (mean):",
        "",
        "| system | max batch | "
        + " | ".join(f"images/s at {n}" for n in levels)
        + f" | range at {levels[-1]} | p50 ms at {levels[-1]} | rows per batch at {levels[-1]} |",
        "|---|---|" + "---|" * (len(levels) + 3),
    ]
    for system, label in systems:
        for batch, by_level in e["systems"][system].items():
            top = by_level[levels[-1]]
            spread = top["images_per_s_runs"]
            lines.append(
                _row(
                    label,
                    batch,
                    *[by_level[n]["images_per_s"] for n in levels],
                    f"{min(spread):.1f}-{max(spread):.1f}",
                    top["p50_ms"],
                    top["rows_per_batch"],
                )
            )
    r = e["ratios"]
    lines += [
        "",
        "Ratios of those medians:",
        "",
        "| ratio | " + " | ".join(f"at {n}" for n in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for system, label in systems:
        for batch, by_level in r["batching"][system].items():
            lines.append(
                _row(f"{label}: batch {batch} / batch 1", *[f"{by_level[n]:.2f}x" for n in levels])
            )
    for batch, by_level in r["engine_vs_ray_serve"].items():
        lines.append(
            _row(f"engine / Ray Serve, batch {batch}", *[f"{by_level[n]:.2f}x" for n in levels])
        )
    lines += [
        _row("engine best / Ray Serve best", *[f"{r['best_vs_best'][n]:.2f}x" for n in levels]),
        "",
        f"One request alone, engine at max batch 1 against the bare `pipe(prompt, "
        f"num_inference_steps={p['steps']}, generator=...)` call on the same pipeline folder, "
        f"alternated, median of {o['runs']} runs:",
        "",
        "| path | ms per image | ms per step |",
        "|---|---|---|",
        _row("engine (render to Rendered)", o["engine_ms"], o["engine_ms_per_step"]),
        _row("bare diffusers pipe()", o["bare_ms"], o["bare_ms_per_step"]),
        _row("overhead", o["engine_ms"] - o["bare_ms"], o["overhead_ms_per_step"]),
        _row("ratio engine / bare", f"{o['ratio']:.2f}x", ""),
        "",
        f"Inside the engine's figure: the runner's render {o['engine_render_ms']:.1f} ms and the "
        f"PNG encode {o['engine_encode_ms']:.1f} ms. Ray Serve started (Ray, Serve, "
        f"{len(e['systems']['ray_serve'])} replicas) in {ray['start_s']:.0f} s. The machine is "
        f"shared: {e['runs_redone']} of {e['runs']} runs were run again because processes "
        f"outside the benchmark used more than {e['other_cpu_limit']:.1f} of a core during "
        f"them, and {e['runs_disturbed']} still were after two more tries (load average "
        f"{e['load_average'][0]:.2f} before the run, {e['load_average'][1]:.2f} after).",
    ]
    return lines


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Run {r['date']} by `make bench` in {r['wall_s']:.0f} s on {m['cores']} cores "
        f"({m['cpu']}), GPU: {m['gpu']}, Python {m['python']}, {m['system']}. "
        "Figures are medians of repeated runs; each baseline ran in the same run.",
        "",
    ]
    o = r["mesh_overhead"]
    p = o["params"]
    lines += [
        "## Mesh overhead",
        "",
        f"One job ({p['width']}x{p['height']}, {p['steps']} steps, 1 variant, tiny-sd) from the "
        "HTTP request to the SSE `final` event, against the same render and PNG encode called "
        f"directly in one process; median of {o['runs']} runs.",
        "",
        "| path | median ms |",
        "|---|---|",
        _row("mesh (HTTP -> SSE final)", o["mesh_total_ms"]),
        _row("direct (pipeline + encode)", o["direct_total_ms"]),
        _row("ratio mesh / direct", f"{o['ratio']:.2f}x"),
        "",
        "| stage | median ms |",
        "|---|---|",
        *[_row(stage, ms) for stage, ms in o["stages_ms"].items()],
        "",
        "`generation` is the pipeline call inside the worker (denoising and VAE decode); "
        "`other` is what no stage accounts for (per-step event appends and row updates, worker "
        "bookkeeping, the cache store, the final event).",
        "",
    ]
    t = r["throughput"]
    lines += [
        "## Throughput under load",
        "",
        f"Tiny-model jobs ({t['params']['width']}x{t['params']['height']}, "
        f"{t['params']['steps']} steps), clients each submitting jobs back to back; the mesh is "
        "measured to the SSE `final` event, the baseline (the diffusers documentation's server "
        "pattern: one ASGI app, pipeline call in a thread per request) to its HTTP response; "
        f"median of {t['repeats']} repeats.",
        "",
        "| clients | system | images/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in t["mesh"]:
        for system in ("mesh", "baseline"):
            s = t[system][clients]
            lines.append(
                _row(
                    clients,
                    system,
                    s["images_per_s"],
                    s["p50_ms"],
                    s["p95_ms"],
                    s["p99_ms"],
                    s["errors"],
                )
            )
    if "engine" in r:
        lines += ["", *_engine(r["engine"])]
    lines += ["", *_polling(r["polling"])]
    f = r["sse_fanout"]
    lines += [
        "",
        "## SSE fan-out",
        "",
        f"{f['watchers']} concurrent SSE watchers spread over {f['jobs']} running jobs "
        f"({f['params']['steps']} steps each) against one gateway process.",
        "",
        "| measure | value |",
        "|---|---|",
        _row(
            "watchers that received every event",
            f"{f['watchers_with_every_event']} / {f['watchers']}",
        ),
        _row("streams that ended early", f["streams_cut_short"]),
        _row("events per job", ", ".join(map(str, f["events_per_job"]))),
        _row("live (watcher, event) pairs measured", f["live_events_measured"]),
        _row("lag append -> receipt p50 ms", f["lag_p50_ms"]),
        _row("lag append -> receipt p99 ms", f["lag_p99_ms"]),
        _row(
            "gateway RSS before / peak MiB",
            f"{f['gateway_rss_before_mb']:.0f} / {f['gateway_rss_peak_mb']:.0f}",
        ),
        "",
    ]
    a = r["admission"]
    lines += [
        "## Admission",
        "",
        f"CreateJob with the generator stopped (queueing only), {a['requests']} requests at "
        f"concurrency {a['concurrency']}, median of {a['repeats']} repeats; the floor is the same "
        "store writes (job row, queue entry, first event) made directly, with no RPC, "
        "validation or cache lookup.",
        "",
        "| path | jobs/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
    ]
    for name, key in (
        ("gRPC CreateJob", "grpc"),
        ("HTTP POST", "http"),
        ("direct store writes (floor)", "direct_store_writes"),
    ):
        s = a[key]
        lines.append(_row(name, s["per_s"], s["p50_ms"], s["p99_ms"], s["errors"]))
    lines += [
        "",
        f"gRPC reaches {a['grpc_vs_direct']:.2f}x and HTTP {a['http_vs_direct']:.2f}x "
        "of the floor's rate.",
        "",
    ]
    if "observability" in r:
        lines += _observability(r["observability"])
    if "evaluator" in r:
        lines += _evaluator(r["evaluator"])
    if "moderation" in r:
        lines += _moderation(r["moderation"])
    return "\n".join(lines)


def _evaluator(e: dict[str, Any]) -> list[str]:
    return [
        "## Evaluator batching",
        "",
        f"{e['calls']} concurrent Evaluate calls of {e['images_per_call']} images "
        f"({e['image_side_px']}px, plus a reference each) against an evaluator with the tiny "
        f"CLIP, {e['torch_threads']} torch thread(s); scoring rounds that gather concurrent "
        "calls against one call per round; median of "
        f"{e['runs']} runs.",
        "",
        "| mode | images/s |",
        "|---|---|",
        _row("batched rounds", e["batched_images_per_s"]),
        _row("one call per round", e["one_by_one_images_per_s"]),
        _row("ratio", f"{e['ratio']:.2f}x"),
        "",
    ]


def _moderation(m: dict[str, Any]) -> list[str]:
    lines = [
        "## Prompt moderation",
        "",
        f"`PromptModerator.check` per request with the shipped policy, over "
        f"{m['requests']['text']} text and {m['requests']['fibo']} FIBO requests (a FIBO "
        f"request checks every string: median {m['fibo_texts_per_request']['median']}), "
        f"{m['refused']} refused; microseconds, after a warm-up.",
        "",
        "| what | p50 µs | p99 µs |",
        "|---|---|---|",
    ]
    for name, key in (
        ("whole check, all requests", "full"),
        ("whole check, text prompts", "full_text_prompts"),
        ("whole check, FIBO prompts", "full_fibo_prompts"),
        ("term lists only", "terms_only"),
        ("classifier only", "classifier_only"),
        ("alt-profanity-check predict_prob (baseline)", "library_predict_prob"),
    ):
        lines.append(_row(name, m[key]["p50_us"], m[key]["p99_us"]))
    return [*lines, ""]


def _observability(o: dict[str, Any]) -> list[str]:
    p = o["latency_params"]
    sets = o["rounds"] * o["sets_per_round"]
    when = f", run {o['date']}" if "date" in o else ""
    sampler = " ".join(f"{k}={v}" for k, v in o["sampled_env"].items())
    lines = [
        "## The cost of watching: metrics and tracing",
        "",
        "Metrics and tracing off (`METRICS_PORT=-1`, no `OTEL_*`) against on (`METRICS_PORT=0`, "
        "OTLP/gRPC span export to a trace receiver in the benchmark's process, batch span "
        f"processor every {o['bsp_schedule_delay_ms']} ms) with every request traced (`on`) "
        f"and with deploy/'s sampler (`sampled`: `{sampler}`; a caller's sampled `traceparent` "
        f"is always followed){when}. {o['rounds']} rounds, each with three fresh meshes side by "
        f"side (one per mode; Postgres commits do not wait for the disk), used in turn: "
        f"{o['latency_jobs_per_round']} mesh-overhead jobs each ({p['width']}x{p['height']}, "
        f"{p['steps']} steps), then {o['sets_per_round']} admission bursts each per protocol "
        f"({o['requests']} CreateJob at concurrency {o['concurrency']}, generator stopped), the "
        "modes' order changing from set to set, the trace receiver idle before every run. "
        f"Ratios to off are medians of the {sets} sets' ratios. `python -m bench --only "
        "observability --merge` reruns it."
        + (f" The `on` meshes also had `{o['on_env']}`." if o.get("on_env") else ""),
        "",
        "| measure | off | on | sampled | on/off (sets) | on/off (medians) "
        "| sampled/off (sets) | sampled/off (medians) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (
        ("gRPC CreateJob/s", "grpc"),
        ("HTTP POST jobs/s", "http"),
        ("job ms (HTTP -> SSE final)", "latency_total_ms"),
        ("its mesh part ms (minus render, encode)", "latency_mesh_ms"),
        ("its admission ms (the POST)", "latency_admission_ms"),
    ):
        m = o[key]
        ratios = [
            f"{m[w + '/off'][r]:.3f}"
            for w in ("on", "sampled")
            for r in ("ratio", "ratio_of_medians")
        ]
        lines.append(_row(label, m["off"], m["on"], m["sampled"], *ratios))
    together = {k: o[k]["together"] for k in ("grpc", "http")}
    lines += [
        "",
        f"Driven together (each round, {o['sets_per_round']} sets per protocol: the three meshes "
        "take the same burst at once): CPU milliseconds per admitted job spent by each mesh's "
        "own processes (gateway, cache, Postgres, Redis) over the same seconds, and off's over "
        "the mode's, the rate a mesh bound by its CPU keeps (median over the sets, range in "
        "brackets).",
        "",
        "| protocol | off | on | sampled | on: off/on | sampled: off/sampled |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("grpc", "gRPC CreateJob"), ("http", "HTTP POST jobs")):
        t = together[key]
        spent = [f"{t['mesh_cpu_ms_per_job'][m]:.2f}" for m in ("off", "on", "sampled")]
        for mode in ("on", "sampled"):
            r = t[mode + "/off"]
            low, high = min(r["set_cpu_ratios"]), max(r["set_cpu_ratios"])
            spent.append(f"{r['cpu_ratio']:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(_row(label, *spent))
    lines += [
        "",
        "Each admission set, jobs/s (the most other processes took during its runs, in cores):",
        "",
        "| set | gRPC off | on | sampled | HTTP off | on | sampled | other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in range(sets):
        cells: list[Any] = [i]
        for key in ("grpc", "http"):
            cells += [o[key][f"{mode}_runs"][i] for mode in ("off", "on", "sampled")]
        other = max(max(o[key]["other_cores_runs"][i]) for key in ("grpc", "http"))
        lines.append(_row(*cells, f"{other:.2f}"))
    implied = {k: o[k]["cpu_implied"] for k in ("grpc", "http")}
    lines += [
        "",
        "CPU milliseconds per admitted job by process (medians; `bench` is the load driver and "
        "the trace receiver; a burst's CPU is counted until its last spans are exported). On 2 "
        "shared cores the rate follows the CPU a job takes: off/on of the total is "
        f"{implied['grpc']['on/off']:.3f} (gRPC) and {implied['http']['on/off']:.3f} (HTTP); "
        f"off/sampled {implied['grpc']['sampled/off']:.3f} and "
        f"{implied['http']['sampled/off']:.3f}.",
        "",
        "| process | gRPC off | gRPC on | gRPC sampled | HTTP off | HTTP on | HTTP sampled |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in o["grpc"]["cpu_ms_per_job"]["off"]:
        cells = [
            o[k]["cpu_ms_per_job"][m][part]
            for k in ("grpc", "http")
            for m in ("off", "on", "sampled")
        ]
        lines.append("| " + part + " | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    last = o["round_details"][-1]
    names = ", ".join(f"{n} ({c:.1f})" for n, c in last["grpc_span_names_per_job"].items())
    spans = {k: o[k]["spans_per_job"] for k in ("grpc", "http")}
    verdict = {m: "met" if ok else "NOT met" for m, ok in o["meets_acceptance"].items()}
    lines += [
        "",
        f"Spans per admitted job, `on`: {spans['grpc']['on']:.1f} over gRPC ({names}), "
        f"{spans['http']['on']:.1f} over HTTP; `sampled`: {spans['grpc']['sampled']:.2f} and "
        f"{spans['http']['sampled']:.2f}; per rendered job (`on`) "
        f"{o['spans_per_rendered_job']:.0f}. In the last round the `on` cache's own `/metrics` "
        f"counted {last['metrics']['on']['cache_lookups_counted']:.0f} lookups, and "
        f"{last['spans']['arrived_before_stop']} of {last['spans']['total']} spans arrived "
        "before the meshes were stopped. Acceptance, watching keeps at least "
        f"{o['acceptance']:.2f} of the admission rate (driven together, off's CPU per job over "
        f"the mode's) for both protocols: `on` {verdict['on']} (gRPC "
        f"{together['grpc']['on/off']['cpu_ratio']:.3f}, HTTP "
        f"{together['http']['on/off']['cpu_ratio']:.3f}), `sampled` {verdict['sampled']} (gRPC "
        f"{together['grpc']['sampled/off']['cpu_ratio']:.3f}, HTTP "
        f"{together['http']['sampled/off']['cpu_ratio']:.3f}).",
        "",
    ]
    return lines
