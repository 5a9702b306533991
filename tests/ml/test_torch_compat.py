"""prepare_torch: the ML libraries import offline on this machine's torch/torchvision pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def test_prepare_torch_makes_ml_libraries_importable_offline() -> None:
    script = (
        "import json, os, sys\n"
        "from services.common.torch_compat import prepare_torch\n"
        "prepare_torch()\n"
        "prepare_torch()\n"
        "import torchvision, transformers, diffusers, open_clip, lpips\n"
        "print(json.dumps({name: os.environ.get(name) for name in sys.argv[1:]}))\n"
    )
    env = {name: value for name, value in os.environ.items() if name not in OFFLINE_SWITCHES}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, *OFFLINE_SWITCHES],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == dict.fromkeys(OFFLINE_SWITCHES, "1")


def test_torch_threads_are_the_cores_shared_among_the_model_processes_unless_given() -> None:
    import torch

    from services.common.torch_compat import set_torch_threads

    before = torch.get_num_threads()
    try:
        cores = os.cpu_count() or 2
        assert set_torch_threads(0, processes=cores) == 1 == torch.get_num_threads()
        assert set_torch_threads(0, processes=1) == cores == torch.get_num_threads()
        assert set_torch_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
