"""The SDK tests' mesh: cache, evaluator, generator and gateway in this process, on stores of
their own, started once for the SDK and CLI modules together (package scope)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import Mesh, StoreUrls, fresh_env, start_in_process


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def mesh(
    stores: StoreUrls, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with fresh_env(stores, model_dir, tmp_path_factory) as env:
        started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
        yield started
        await started.stop()
