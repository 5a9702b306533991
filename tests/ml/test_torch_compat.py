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
