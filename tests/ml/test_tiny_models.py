"""The tiny model builds: reproducible, the real CLIP tokenizer, loadable, about 1M weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from services.evaluator.tiny_models import build_tiny_clip
from services.generator import tiny_models as generator_models
from services.generator.tiny_models import build_tiny_sd


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _parameter_count(folder: Path) -> int:
    count = 0
    for weights in folder.rglob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = tensors.get_slice(name).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                count += size
    return count


def test_tiny_sd_build_is_deterministic(tmp_path: Path, tiny_sd_dir: Path) -> None:
    again = build_tiny_sd(tmp_path)
    assert _file_bytes(again) == _file_bytes(tiny_sd_dir)


def test_tiny_sd_weights_depend_on_seed(tmp_path: Path, tiny_sd_dir: Path) -> None:
    other = build_tiny_sd(tmp_path, seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (tiny_sd_dir / weights).read_bytes()


def test_tiny_sd_has_about_a_million_parameters(tiny_sd_dir: Path) -> None:
    assert 500_000 < _parameter_count(tiny_sd_dir) < 2_000_000


def test_tiny_sd_text_encoder_matches_tokenizer_vocabulary(tiny_sd_dir: Path) -> None:
    config = json.loads((tiny_sd_dir / "text_encoder" / "config.json").read_text())
    vocab = json.loads((tiny_sd_dir / "tokenizer" / "vocab.json").read_text())
    assert config["vocab_size"] == len(vocab) == 49408


def test_tokenizer_is_real_clip_bpe(tiny_sd_dir: Path) -> None:
    import open_clip
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd_dir / "tokenizer"))
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["An astronaut riding a horse, 4k!", "naïve café: 3 cats & 12 dogs", "x-ray"]:
        assert tokenizer(text).input_ids[1:-1] == reference.encode(text)


def test_tiny_clip_build_is_deterministic(tmp_path: Path, tiny_clip_dir: Path) -> None:
    again = build_tiny_clip(tmp_path)
    assert _file_bytes(again) == _file_bytes(tiny_clip_dir)


def test_tiny_models_cli_keeps_an_existing_model_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generator_models.main(["--out", str(tmp_path)])
    weights = tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors"
    first_build = weights.stat().st_mtime_ns
    generator_models.main(["--out", str(tmp_path)])
    assert weights.stat().st_mtime_ns == first_build
    assert "exists" in capsys.readouterr().out
    generator_models.main(["--out", str(tmp_path), "--force"])
    assert weights.stat().st_mtime_ns != first_build
