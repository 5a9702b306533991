"""Fixtures for the machine-learning tests: the tiny models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.evaluator.scoring import Scorer
from services.evaluator.tiny_models import build_tiny_clip
from services.generator.pipeline import SdRunner
from services.generator.tiny_models import build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def runner(tiny_sd_dir: Path) -> SdRunner:
    return SdRunner(tiny_sd_dir)


@pytest.fixture(scope="session")
def scorer(tiny_clip_dir: Path) -> Scorer:
    return Scorer(tiny_clip_dir)
