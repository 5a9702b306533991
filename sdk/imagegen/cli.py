"""`imagegen` (also `python -m imagegen`): the command line, on the SDK's AsyncClient.

    imagegen generate "a red fox" --seed 7 -n 4 --out DIR
    imagegen estimate "a red fox" --width 1024 --height 1024
    imagegen status ID [--follow]
    imagegen cancel ID
    imagegen models

Progress goes to stderr, results to stdout (one JSON object with --json); the exit status says
what happened (EXIT_CODES).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen.errors import (
    Conflict,
    ImagegenError,
    InvalidArgument,
    JobFailed,
    NotFound,
    PermissionDenied,
    PolicyRefused,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from imagegen.progress import ProgressView
from imagegen.retry import RetryPolicy
from imagegen.types import (
    CacheMode,
    ControlNet,
    Estimate,
    Final,
    GuidanceImage,
    Job,
    JobStatus,
    Model,
    Priority,
    Spec,
    to_json,
)

if TYPE_CHECKING:  # imported when a command runs: `--help` and usage errors stay quick
    from imagegen.client import AsyncClient

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_UNAVAILABLE = 5
EXIT_QUOTA = 6
EXIT_INTERRUPTED = 130

EPILOG = """\
environment:
  IMAGEGEN_URL       the server (default http://127.0.0.1:8080; grpc://HOST:PORT for gRPC)
  IMAGEGEN_API_KEY   the API key (or --api-key)
  IMAGEGEN_HTTP_URL  with gRPC: the HTTP facade, for uploads and `models`

exit status:
  0    success
  1    the job failed or was cancelled (or the server failed)
  2    usage error or invalid argument (the bad fields are named)
  3    unauthenticated or permission denied
  4    not found
  5    unavailable: network error, server away, or timeout
  6    quota exceeded
  130  interrupted (Ctrl-C; the job goes on unless --cancel-on-interrupt)
"""


def _common() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name (SUPPRESS: given or absent)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    s = argparse.SUPPRESS
    group.add_argument("--url", default=s, help="server URL (default: $IMAGEGEN_URL)")
    group.add_argument("--api-key", default=s, help="API key (default: $IMAGEGEN_API_KEY)")
    group.add_argument("--transport", choices=("http", "grpc"), default=s)
    group.add_argument("--http-url", default=s, help="with gRPC: the HTTP facade (uploads, models)")
    group.add_argument("--timeout", type=float, default=s, help="seconds per request (30)")
    group.add_argument(
        "--retries", type=int, default=s, help="retries of a call that may succeed later (5)"
    )
    group.add_argument("--json", action="store_true", default=s, help="one JSON object on stdout")
    return common


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="", help="the text prompt")
    parser.add_argument(
        "--fibo", metavar="FILE", help="a FIBO structured prompt (JSON; - reads stdin)"
    )
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--model", default="", help="model id (see `imagegen models`)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("-n", "--num-variants", type=int, default=0, metavar="N")
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--height", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--strength", type=float, help="img2img strength with a reference image")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH[:ROLE]",
        help="upload a guidance image (role reference, style or texture; default reference)",
    )
    parser.add_argument("--controlnet", metavar="NAME[:WEIGHT]", help="e.g. canny:0.8")


def _follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job too"
    )
    parser.add_argument("--wait-timeout", type=float, metavar="SECONDS", help="give up waiting")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="imagegen",
        description="Generate images with an imagegen server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    generate = command("generate", "generate images, show progress, write the PNGs")
    _spec_options(generate)
    generate.add_argument("--out", default=".", metavar="DIR", help="where to write the PNGs")
    generate.add_argument("--cache", choices=[m.value for m in CacheMode])
    generate.add_argument("--seed-agnostic-cache", action="store_true")
    generate.add_argument("--priority", choices=[p.value for p in Priority])
    generate.add_argument("--max-cost-cents", type=int)
    generate.add_argument("--webhook-url")
    generate.add_argument("--idempotency-key")
    _follow_options(generate)

    estimate = command("estimate", "price a request without running it")
    _spec_options(estimate)

    status = command("status", "show a job; --follow it to its end")
    status.add_argument("job_id", metavar="ID")
    status.add_argument("--follow", action="store_true", help="follow the job to its end")
    status.add_argument("--out", metavar="DIR", help="write the PNGs of a completed job")
    _follow_options(status)

    cancel = command("cancel", "cancel a job")
    cancel.add_argument("job_id", metavar="ID")

    command("models", "list the served models")
    return parser


@dataclass
class Run:
    """One invocation: its arguments, where output goes, and the job it is following."""

    args: argparse.Namespace
    json: bool
    job_id: str = ""
    files: list[str] = field(default_factory=list)

    def option(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default)


class UsageError(Exception):
    pass


def _read_fibo(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        value = json.loads(text)
    except (OSError, ValueError) as error:
        raise UsageError(f"--fibo {path}: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--fibo {path}: not a JSON object")
    return value


async def _spec(client: AsyncClient, run: Run) -> Spec:
    a = run.args
    fibo = _read_fibo(a.fibo) if a.fibo else None
    if not a.prompt and fibo is None:
        raise UsageError("give a prompt or --fibo FILE")
    controlnet = None
    if a.controlnet:
        name, _, weight = a.controlnet.partition(":")
        try:
            controlnet = ControlNet(name, float(weight) if weight else 1.0)
        except ValueError:
            raise UsageError(f"--controlnet {a.controlnet}: the weight is not a number") from None
    images = []
    for item in a.image:
        path, _, role = item.rpartition(":")
        if not path or role not in ("reference", "style", "texture"):
            path, role = item, "reference"
        if not await asyncio.to_thread(Path(path).is_file):
            raise UsageError(f"--image {item}: no such file")
        images.append(GuidanceImage(await client.upload(path), role))
    return Spec(
        prompt=a.prompt,
        fibo_json=fibo,
        negative_prompt=a.negative,
        model=a.model,
        seed=a.seed,
        width=a.width,
        height=a.height,
        num_variants=a.num_variants,
        steps=a.steps,
        guidance_scale=a.guidance_scale,
        guidance_images=tuple(images),
        controlnet=controlnet,
        strength=a.strength,
    )


def _print_json(value: Any) -> None:
    print(json.dumps(to_json(value), indent=2))


async def _follow(client: AsyncClient, run: Run, job: Job) -> Job:
    """Follows a job to its end with the progress view; Ctrl-C cancels it when asked to."""
    a = run.args
    view = ProgressView(sys.stderr, job.spec.num_variants, enabled=not a.no_progress)
    run.job_id = job.id
    try:
        async with asyncio.timeout(a.wait_timeout):
            if job.done:
                view.finish(job.status.value + (" (cache hit)" if job.cache_hit else ""))
                return job
            async for event in client.stream(job.id):
                view(event)
                if isinstance(event, Final):
                    return event.job
            return await client.get(job.id)
    except TimeoutError:
        raise Unavailable(f"job {job.id} did not end within {a.wait_timeout}s") from None
    except asyncio.CancelledError:
        if a.cancel_on_interrupt:
            await client.cancel(job.id)
            print(f"\ncancelled job {job.id}", file=sys.stderr)
        raise


async def _save_all(client: AsyncClient, run: Run, job: Job, out: str) -> None:
    folder = Path(out)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    for variant in sorted(job.variants, key=lambda v: v.index):
        path = await client.save(variant, folder / f"{job.id}-{variant.index}.png")
        run.files.append(str(path))


def _summary(job: Job) -> str:
    cost = "cache hit, 0 cents" if job.cache_hit else f"{job.cost_cents} cents"
    seed = f", seed {job.seed}" if job.seed is not None else ""
    return f"job {job.id} {job.status.value}: {len(job.variants)} variant(s){seed}, {cost}"


async def cmd_generate(client: AsyncClient, run: Run) -> int:
    a = run.args
    spec = await _spec(client, run)
    job = await client.submit(
        spec,
        cache=a.cache,
        seed_agnostic_cache=a.seed_agnostic_cache,
        priority=a.priority,
        max_cost_cents=a.max_cost_cents,
        webhook=a.webhook_url,
        idempotency_key=a.idempotency_key,
    )
    if not a.no_progress:
        print(f"job {job.id} submitted ({job.status.value})", file=sys.stderr)
    job = await _follow(client, run, job)
    return await _finish(client, run, job, a.out)


async def _finish(client: AsyncClient, run: Run, job: Job, out: str | None) -> int:
    if job.status == JobStatus.COMPLETED and out:
        await _save_all(client, run, job, out)
    if run.json:
        _print_json({"job": job, "files": run.files})
    else:
        print(_summary(job), file=sys.stderr)
        for path in run.files:
            print(path)
    if job.status != JobStatus.COMPLETED:
        if not run.json:
            print(f"imagegen: {JobFailed(job)}", file=sys.stderr)
        return EXIT_JOB_FAILED
    return EXIT_OK


async def cmd_estimate(client: AsyncClient, run: Run) -> int:
    estimate: Estimate = await client.estimate(await _spec(client, run))
    if run.json:
        _print_json(estimate)
        return EXIT_OK
    print(
        f"{estimate.total_cents} cents  (base {estimate.base_cents:g} x steps "
        f"{estimate.steps_factor:g} + controlnet {estimate.controlnet_cents:g} + guidance "
        f"{estimate.guidance_cents:g}) x model {estimate.model_multiplier:g}"
    )
    return EXIT_OK


async def cmd_status(client: AsyncClient, run: Run) -> int:
    a = run.args
    job = await client.get(a.job_id)
    if a.follow:
        job = await _follow(client, run, job)
        return await _finish(client, run, job, a.out)
    if job.status == JobStatus.COMPLETED and a.out:
        await _save_all(client, run, job, a.out)
    if run.json:
        _print_json({"job": job, "files": run.files})
        return EXIT_OK
    print(f"{job.id}  {job.status.value}  {job.stage or '-'}  {job.progress_percent:.0f}%")
    if job.error:
        print(f"  error: {job.error}")
    for variant in job.variants:
        primary = "  (primary)" if variant.is_primary else ""
        size = f"{variant.width}x{variant.height}"
        print(f"  variant {variant.index}: {size} seed {variant.seed}{primary}")
    for path in run.files:
        print(path)
    return EXIT_OK


async def cmd_cancel(client: AsyncClient, run: Run) -> int:
    job = await client.cancel(run.args.job_id)
    if run.json:
        _print_json(job)
    else:
        print(f"{job.id}  {job.status.value}")
    return EXIT_OK


async def cmd_models(client: AsyncClient, run: Run) -> int:
    models: list[Model] = await client.models()
    if run.json:
        _print_json({"models": models})
        return EXIT_OK
    for m in models:
        default = "  (default)" if m.is_default else ""
        print(
            f"{m.id}  {m.family}  {m.default_width}x{m.default_height}  {m.default_steps} steps"
            f"  sizes {m.min_size}..{m.max_size}  x{m.price_multiplier:g}{default}"
        )
    return EXIT_OK


COMMANDS = {
    "generate": cmd_generate,
    "estimate": cmd_estimate,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "models": cmd_models,
}


def exit_code(error: ImagegenError) -> int:
    if isinstance(error, InvalidArgument | Conflict | Unsupported):
        return EXIT_USAGE
    if isinstance(error, Unauthenticated | PermissionDenied):
        return EXIT_AUTH
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(error, QuotaExceeded):
        return EXIT_QUOTA
    return EXIT_JOB_FAILED


def report(error: ImagegenError, as_json: bool) -> None:
    print(f"imagegen: {error}", file=sys.stderr)
    violations = error.violations if isinstance(error, InvalidArgument) else []
    for v in violations:
        print(f"  {v.field}: {v.description}", file=sys.stderr)
    if as_json:
        body: dict[str, Any] = {
            "code": error.code,
            "message": error.message,
            "request_id": error.request_id,
        }
        if violations:
            body["field_violations"] = [
                {"field": v.field, "description": v.description} for v in violations
            ]
        if isinstance(error, PolicyRefused):
            body["policy_violation"] = {"category": error.category, "field": error.field}
        if isinstance(error, QuotaExceeded | Unavailable) and error.retry_after is not None:
            body["retry_after"] = error.retry_after
        print(json.dumps({"error": body}, indent=2))


async def _main(run: Run) -> int:
    from imagegen.client import AsyncClient

    a = run.args
    client = AsyncClient(
        run.option("url"),
        api_key=run.option("api_key"),
        transport=run.option("transport"),
        http_url=run.option("http_url"),
        timeout=run.option("timeout", 30.0),
        retry=RetryPolicy(attempts=1 + max(0, run.option("retries", 5))),
    )
    async with client:
        return await COMMANDS[a.command](client, run)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = Run(args, json=bool(getattr(args, "json", False)))
    if not (getattr(args, "api_key", None) or os.environ.get("IMAGEGEN_API_KEY")):
        print("imagegen: no API key: set IMAGEGEN_API_KEY or pass --api-key", file=sys.stderr)
        return EXIT_AUTH
    try:
        return asyncio.run(_main(run))
    except ImagegenError as error:
        report(error, run.json)
        return exit_code(error)
    except (UsageError, ValueError) as error:
        print(f"imagegen: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if run.job_id and not getattr(args, "cancel_on_interrupt", False):
            print(
                f"\ninterrupted; job {run.job_id} goes on (imagegen cancel {run.job_id})",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
