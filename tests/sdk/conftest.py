"""The SDK tests' mesh: cache, evaluator, generator and gateway in this process, on stores of
their own, one per module. (Not package scope: tests/ has no packages, so a "package" fixture
would live to the end of the session, and its generator would take the queue entries of a later
module given the same Redis db.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import Mesh, StoreUrls, fresh_env, start_in_process


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(
    stores: StoreUrls, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    async with fresh_env(stores, model_dir, tmp_path_factory) as env:
        started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
        yield started
        await started.stop()
