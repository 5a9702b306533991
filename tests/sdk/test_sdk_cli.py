"""The `imagegen` command line, run as a subprocess (`python -m imagegen`) against the real mesh
(tests/sdk/conftest.py), configured by IMAGEGEN_URL and IMAGEGEN_API_KEY as a user's shell
would: the files it writes, its JSON, its progress output and its exit statuses."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from imagegen import AsyncClient, JobStatus
from imagegen.cli import build_parser
from imagegen.progress import ProgressView
from imagegen.types import Progress, Status
from PIL import Image

from services.mesh import free_port
from tests.conftest import Mesh

SMALL = ["--width", "64", "--height", "64", "--steps", "4"]
WAIT = 60.0


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def imagegen(mesh: Mesh, *args: str, **env: str) -> Ran:
    environment = {
        **os.environ,
        "IMAGEGEN_URL": mesh.http_url,
        "IMAGEGEN_API_KEY": mesh.key,
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagegen",
        *args,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def prompt(subject: str) -> str:
    return f"{subject} {uuid.uuid4().hex}"


def check_png(path: Path, sha256: str | None = None) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    if sha256 is not None:
        assert hashlib.sha256(data).hexdigest() == sha256


async def test_generate_writes_the_pngs_prints_their_paths_and_shows_progress(
    mesh: Mesh, tmp_path: Path
) -> None:
    ran = await imagegen(
        mesh,
        "generate",
        prompt("a red fox"),
        "--seed",
        "7",
        "-n",
        "2",
        *SMALL,
        "--out",
        str(tmp_path),
    )
    assert ran.code == 0, ran.err
    paths = [Path(line) for line in ran.out.splitlines()]
    assert len(paths) == 2 and all(p.parent == tmp_path for p in paths)
    for path in paths:
        check_png(path)
    assert "step 4/4" in ran.err and "100.0%" in ran.err
    assert "status: running" in ran.err and "completed in" in ran.err


async def test_generate_json_is_one_object_with_the_job_and_its_files(
    mesh: Mesh, tmp_path: Path
) -> None:
    ran = await imagegen(
        mesh, "generate", prompt("a heron"), "--seed", "3", *SMALL, "--out", str(tmp_path), "--json"
    )
    assert ran.code == 0, ran.err
    result = ran.json()
    job, files = result["job"], result["files"]
    assert job["status"] == "completed" and job["spec"]["seed"] == 3
    assert files == [str(tmp_path / f"{job['id']}-0.png")]
    check_png(Path(files[0]), job["variants"][0]["sha256"])


async def test_generate_over_grpc_writes_the_pngs(mesh: Mesh, tmp_path: Path) -> None:
    grpc_url = f"grpc://{mesh.addr('gateway')}"
    ran = await imagegen(
        mesh, "generate", prompt("a gull"), *SMALL, "--out", str(tmp_path), "--url", grpc_url
    )
    assert ran.code == 0, ran.err
    check_png(Path(ran.out.strip()))


async def test_an_invalid_field_exits_2_naming_its_path(mesh: Mesh) -> None:
    ran = await imagegen(mesh, "generate", "a kite", "--width", "7", "--no-progress")
    assert ran.code == 2
    assert "  width: " in ran.err
    as_json = await imagegen(mesh, "estimate", "a kite", "--width", "7", "--json")
    assert as_json.code == 2
    fields = [v["field"] for v in as_json.json()["error"]["field_violations"]]
    assert "width" in fields


async def test_usage_errors_exit_2(mesh: Mesh) -> None:
    assert (await imagegen(mesh, "generate")).code == 2  # no prompt
    assert (await imagegen(mesh, "generate", "x", "--no-such-flag")).code == 2


async def test_a_wrong_key_exits_3(mesh: Mesh) -> None:
    ran = await imagegen(mesh, "models", IMAGEGEN_API_KEY="igk_" + "0" * 40)
    assert ran.code == 3
    no_key = await imagegen(mesh, "models", IMAGEGEN_API_KEY="")
    assert no_key.code == 3 and "IMAGEGEN_API_KEY" in no_key.err


async def test_an_unknown_job_exits_4(mesh: Mesh) -> None:
    assert (await imagegen(mesh, "status", str(uuid.uuid4()))).code == 4


async def test_an_unreachable_server_exits_5(mesh: Mesh) -> None:
    ran = await imagegen(
        mesh, "models", "--retries", "0", IMAGEGEN_URL=f"http://127.0.0.1:{free_port()}"
    )
    assert ran.code == 5


async def test_status_follows_a_job_and_cancel_ends_it(mesh: Mesh) -> None:
    async with AsyncClient(mesh.http_url, api_key=mesh.key) as client:
        done = await client.submit(prompt("a pier"), width=64, height=64, steps=4)
        slow = await client.submit(prompt("a slow pier"), width=256, height=256, steps=100)
    followed = await imagegen(mesh, "status", done.id, "--follow", "--json")
    assert followed.code == 0, followed.err
    assert followed.json()["job"]["status"] == "completed"
    cancelled = await imagegen(mesh, "cancel", slow.id)
    assert cancelled.code == 0 and cancelled.out.split() == [slow.id, "cancelled"]
    after = await imagegen(mesh, "status", slow.id, "--follow")
    assert after.code == 1  # the job was cancelled
    shown = await imagegen(mesh, "status", slow.id)
    assert shown.code == 0 and JobStatus.CANCELLED.value in shown.out


async def test_models_and_estimate_print_what_the_server_says(mesh: Mesh) -> None:
    models = await imagegen(mesh, "models", "--json")
    assert models.code == 0
    assert "tiny-sd" in [m["id"] for m in models.json()["models"]]
    estimate = await imagegen(
        mesh,
        "estimate",
        "a meadow",
        "--width",
        "512",
        "--height",
        "512",
        "--steps",
        "30",
        "-n",
        "2",
    )
    assert estimate.code == 0 and estimate.out.startswith("3 cents")


def test_help_documents_the_exit_statuses() -> None:
    text = build_parser().format_help()
    for line in ("0    success", "2    usage error", "5    unavailable", "130  interrupted"):
        assert line in text


class Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_one_line_on_a_terminal() -> None:
    screen = Terminal()
    view = ProgressView(screen, variants=2)
    view(Status("1-0", "j", JobStatus.RUNNING, "denoising"))
    for step in (1, 2):
        view(Progress(f"2-{step}", "j", 0, step, 2, 50.0 * step, 1500))
    view.finish("completed")
    text = screen.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 2  # one line, redrawn
    last = text.split("\r")[-1]
    assert "100.0%  step 2/2  variant 1/2 (0 stored)  ETA 2s  running (denoising)" in last
    assert text.endswith("\x1b[K\ncompleted in 0s\n")


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IMAGEGEN_HTTP_URL", "IMAGEGEN_GRPC_URL"):
        monkeypatch.delenv(name, raising=False)
