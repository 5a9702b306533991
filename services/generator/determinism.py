"""`make determinism`: the same request gives the same PNG bytes, wherever and however it runs.

Compares SHA-256 of the PNGs of one request (tiny-sd unless --model says otherwise):
1. twice in one process;
2. in this process against a second process;
3. through a generator service, before and after the service is restarted (a real mesh with
   embedded stores, in a temporary folder), and against this process;
4. variant i of an N-variant request against a solo request with seed + i;
5. the request alone against the same request batched with 1, 3 and 7 others.
Prints every comparison and exits non-zero on any mismatch.

    python -m services.generator.determinism [--model ID] [--skip-mesh]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from services.common.models import Registry, load_registry
from services.common.settings import GeneratorSettings
from services.common.spec import Spec, resolve
from services.common.torch_compat import set_torch_threads
from services.generator.engine import Engine, Rendered

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1234
VARIANTS = 4
BATCH_MATES = (1, 3, 7)


def _spec(registry: Registry, model: str, **changes: object) -> Spec:
    base = Spec(prompt=PROMPT, model=model, seed=SEED, num_variants=1, width=64, height=64)
    return resolve(dataclasses.replace(base, **changes), registry)  # type: ignore[arg-type]


async def _rendered(engine: Engine, spec: Spec) -> list[Rendered]:
    images = [
        item async for item in engine.render(spec, threading.Event()) if isinstance(item, Rendered)
    ]
    return sorted(images, key=lambda i: i.variant_index)


async def _hashes(engine: Engine, spec: Spec) -> list[str]:
    return [image.sha256 for image in await _rendered(engine, spec)]


async def _in_process(registry: Registry, model: str) -> tuple[str, list[tuple[str, str, str]]]:
    engine = Engine(registry)
    await engine.start(warm_up=False)
    spec = _spec(registry, model)
    (alone,) = await _hashes(engine, spec)
    (again,) = await _hashes(engine, spec)
    checks = [("same request twice in one process", alone, again)]
    variants = await _hashes(engine, dataclasses.replace(spec, num_variants=VARIANTS))
    for i, variant in enumerate(variants):
        (solo,) = await _hashes(engine, dataclasses.replace(spec, seed=SEED + i))
        checks.append((f"variant {i} of {VARIANTS} vs solo seed+{i}", variant, solo))
    for mates in BATCH_MATES:
        others = [
            dataclasses.replace(spec, seed=SEED + 100 + k, prompt=f"{PROMPT}, variation {k}")
            for k in range(mates)
        ]
        position = mates // 2  # not first: the padding copies the first row
        batch = [*others[:position], spec, *others[position:]]
        results = await asyncio.gather(*(_rendered(engine, s) for s in batch))
        mine = results[position][0]
        name = f"alone vs batched with {mates} others (ran in a batch of {mine.batch_size})"
        checks.append((name, alone, mine.sha256))
        if mine.batch_size < 2:
            checks.append((f"{name}: shared a batch", "yes", "no"))
    engine.close()
    return alone, checks


def _other_process(model: str) -> str:
    code = (
        "import asyncio, sys\n"
        "from services.generator import determinism as d\n"
        "print(asyncio.run(d.solo_hash(sys.argv[1])))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, model], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


async def solo_hash(model: str) -> str:
    settings = GeneratorSettings()
    set_torch_threads(settings.torch_threads, settings.model_processes)
    registry = load_registry(settings.model_registry, settings.model_dir)
    engine = Engine(registry)
    await engine.start(warm_up=False)
    (sha,) = await _hashes(engine, _spec(registry, model))
    engine.close()
    return sha


async def _through_restart(registry: Registry, model: str, model_dir: Path) -> tuple[str, str]:
    """The request through a real generator service, before and after a restart."""
    import grpc
    from imagegen.v1 import generator_service_pb2, generator_service_pb2_grpc

    from services.common.convert import spec_to_pb
    from services.mesh import Ports, prepare_mesh, start_services

    spec = _spec(registry, model)

    async def generate(addr: str) -> str:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = generator_service_pb2_grpc.GeneratorServiceStub(channel)
            request = generator_service_pb2.GenerateRequest(spec=spec_to_pb(spec))
            async for response in stub.Generate(request, timeout=120):
                if response.HasField("artifact"):
                    return str(response.artifact.artifact.sha256)
        raise RuntimeError("Generate ended without an image")

    with tempfile.TemporaryDirectory(prefix="imagegen-determinism-") as folder:
        mesh = prepare_mesh(
            Path(folder), Ports.free(), {"WORKERS": "0", "MODEL_DIR": str(model_dir)}
        )
        try:
            await start_services(mesh, Path(folder) / "logs")
            before = await generate(mesh.addr("generator"))
            mesh.stop_service("generator")
            mesh.start_service("generator", Path(folder) / "logs")
            await _serving(mesh.addr("generator"))
            after = await generate(mesh.addr("generator"))
        finally:
            mesh.stop()
    return before, after


async def _serving(addr: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for _ in range(600):
        try:
            async with grpc.aio.insecure_channel(addr) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{addr} never became SERVING")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="", help="model id (default: the registry's default)")
    parser.add_argument("--skip-mesh", action="store_true", help="no generator-restart check")
    args = parser.parse_args()
    settings = GeneratorSettings()
    set_torch_threads(settings.torch_threads, settings.model_processes)
    registry = load_registry(settings.model_registry, settings.model_dir)
    model = registry.get(args.model).id
    alone, checks = asyncio.run(_in_process(registry, model))
    checks.append(("this process vs another process", alone, _other_process(model)))
    if not args.skip_mesh:
        before, after = asyncio.run(_through_restart(registry, model, settings.model_dir.resolve()))
        checks.append(("generator service vs this process", alone, before))
        checks.append(("generator service before vs after a restart", before, after))
    failed = 0
    for name, left, right in checks:
        same = left == right
        failed += not same
        print(f"{'same' if same else 'DIFFERENT':9}  {name}: {left[:16]} {right[:16]}")
    print(json.dumps({"model": model, "comparisons": len(checks), "mismatches": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
