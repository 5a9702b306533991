"""The evaluator's model files: real-weights checkpoints load and embed exactly as the model they
came from; calibration is reported as the weights warrant; missing files, a bad policy and a
missing optional backend stop start-up with one line naming the file, before the port is served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from services.common.server import StartupRefused
from services.common.settings import EvaluatorSettings
from services.evaluator.models import ClipSource, load_clip, load_lpips, plan_models
from services.evaluator.service import start
from services.evaluator.tiny_models import PROVENANCE_FILE, TINY_CLIP_CONFIG, WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[2]


def _trained_like_model(seed: int) -> open_clip.CLIP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"]).eval()


@pytest.fixture(scope="module")
def model_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An open_clip model config file (the tiny architecture) under a name of its own."""
    path = tmp_path_factory.mktemp("configs") / "test-clip-arch.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG["model_cfg"]), encoding="utf-8")
    return path


def _settings(tmp_path: Path, **values: object) -> EvaluatorSettings:
    return EvaluatorSettings(
        listen_addr="127.0.0.1:0", data_dir=tmp_path, torch_threads=1, **values
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_loads_with_its_config_and_embeds_as_its_model(
    suffix: str, model_config: Path, tmp_path: Path
) -> None:
    model = _trained_like_model(seed=7)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    checkpoint = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(checkpoint))
    else:
        torch.save(state, checkpoint)

    plan = plan_models(
        _settings(tmp_path, clip_model=str(model_config), clip_checkpoint=checkpoint)
    )
    assert plan.clip == ClipSource(config=str(model_config), checkpoint=checkpoint)
    loaded = load_clip(plan.clip)

    assert loaded.info.name == f"open_clip:test-clip-arch(weights{suffix})"
    assert loaded.info.role == "clip" and loaded.info.calibrated is True
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = loaded.tokenizer(["a red circle", "a photo of a dog"])
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(tokens), model.encode_text(tokens))
        other = _trained_like_model(seed=8)
        assert not torch.equal(other.encode_image(pixels), model.encode_image(pixels))


def test_a_built_in_config_name_is_accepted_with_a_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "vit-b-32.safetensors"
    checkpoint.write_bytes(b"")  # only checked to be there: not loaded here
    plan = plan_models(_settings(tmp_path, clip_model="ViT-B-32", clip_checkpoint=checkpoint))
    assert plan.clip == ClipSource(config="ViT-B-32", checkpoint=checkpoint)
    with pytest.raises(StartupRefused, match="CLIP_MODEL No-Such-Model"):
        plan_models(_settings(tmp_path, clip_model="No-Such-Model", clip_checkpoint=checkpoint))


def test_the_tiny_build_is_uncalibrated_and_a_plain_folder_is_not(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    assert load_clip(ClipSource(folder=tiny_clip_dir)).info.calibrated is False
    copied = tmp_path / "copied-clip"
    shutil.copytree(tiny_clip_dir, copied)
    (copied / PROVENANCE_FILE).unlink()
    info = load_clip(ClipSource(folder=copied)).info
    assert (info.name, info.calibrated) == ("open_clip:copied-clip", True)


def test_lpips_is_calibrated_only_with_a_backbone_file(tmp_path: Path) -> None:
    assert load_lpips(None).info.calibrated is False
    import torchvision

    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    info = load_lpips(path).info
    assert (info.name, info.role, info.calibrated) == ("lpips:alex(alexnet.pth)", "lpips", True)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"clip_model": "ViT-B-32", "clip_checkpoint": "/no/such/clip.safetensors"},
         "CLIP_CHECKPOINT /no/such/clip.safetensors: no such file"),
        ({"clip_model": "/no/such/config.json", "clip_checkpoint": "<tiny weights>"},
         "CLIP_MODEL /no/such/config.json: no such file"),
        ({"clip_model": "ViT-B-32"}, "CLIP_MODEL ViT-B-32 needs CLIP_CHECKPOINT"),
        ({"clip_dir": "/no/such/folder"}, "CLIP_DIR /no/such/folder: no open_clip_config.json"),
        ({"lpips_backbone": "/no/such/alexnet.pth"},
         "LPIPS_BACKBONE /no/such/alexnet.pth: no such file"),
    ],
)  # fmt: skip
async def test_missing_model_files_stop_start_up_naming_the_path(
    values: dict[str, str], named: str, tmp_path: Path, tiny_clip_dir: Path
) -> None:
    if "clip_model" not in values and "clip_dir" not in values:
        values = {**values, "clip_dir": str(tiny_clip_dir)}
    if values.get("clip_checkpoint") == "<tiny weights>":
        values = {**values, "clip_checkpoint": str(tiny_clip_dir / WEIGHTS_FILE)}
    with pytest.raises(StartupRefused) as caught:
        await start(_settings(tmp_path, **values))
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_bad_policy_stops_start_up_with_the_policy_error(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[image]\nenabled = true\nenforce = true\n", encoding="utf-8")
    with pytest.raises(StartupRefused) as caught:
        await start(_settings(tmp_path, clip_dir=tiny_clip_dir, safety_policy=policy))
    assert str(caught.value) == f"{policy}: image.enforce: unknown key"


@pytest.mark.skipif(
    importlib.util.find_spec("nudenet") is not None, reason="nudenet is installed here"
)
async def test_nudenet_enabled_but_not_installed_stops_start_up(
    tmp_path: Path, tiny_clip_dir: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[image]\nenabled = true\n[image.nudenet]\nenabled = true\nlabels = ["ANUS_EXPOSED"]\n',
        encoding="utf-8",
    )
    with pytest.raises(StartupRefused) as caught:
        await start(_settings(tmp_path, clip_dir=tiny_clip_dir, safety_policy=policy))
    assert "image.nudenet is enabled but not installed (missing nudenet" in str(caught.value)
    assert "requirements/nudenet.txt" in str(caught.value)


def test_the_process_exits_2_with_one_line_before_serving(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "clip.safetensors"
    env = {
        **os.environ,
        "CLIP_MODEL": "ViT-B-32",
        "CLIP_CHECKPOINT": str(missing),
        "LISTEN_ADDR": "127.0.0.1:0",
        "DATA_DIR": str(tmp_path),
        "TORCH_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.evaluator"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1]["message"] == f"CLIP_CHECKPOINT {missing}: no such file"
    assert lines[-1]["level"] == "ERROR" and lines[-1]["service"] == "evaluator"
    assert "listening" not in done.stderr
