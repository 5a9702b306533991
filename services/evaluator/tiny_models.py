"""Build a tiny open_clip model with seeded random weights, for tests, demos and embedded mode.

The evaluator scores images with an open_clip model loaded from a local folder. This module
writes such a folder without any download: a small ViT image tower and a transformer text tower
(CLIP's 49408-token vocabulary, 77-token context), about 1.8M parameters, as
`open_clip_config.json` + `open_clip_model.safetensors`. That is the layout open_clip uses for
models on the Hugging Face hub, so a real model copied into a folder loads the same way
(`open_clip.create_model_and_transforms("local-dir:<folder>")`). The tokenizer is open_clip's
own, which ships its BPE vocabulary.

The folder also holds `provenance.json`, which says the weights are seeded-random: the evaluator
reports scores from such a folder as uncalibrated (a folder without it is taken as real weights).

The same seed gives the same weight file, byte for byte.

    python -m services.evaluator.tiny_models --out .data/models [--seed 0] [--force]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.common.model_build import build_command, staged_folder
from services.common.torch_compat import prepare_torch

prepare_torch()

import open_clip  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TINY_CLIP_NAME = "tiny-clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# Written last: its presence marks a complete tiny build, and tells the loader the weights are
# seeded-random, not trained.
PROVENANCE_FILE = "provenance.json"

TINY_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 16,
            "width": 64,
            "head_width": 16,
            "layers": 2,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 4,
            "layers": 2,
        },
    },
    "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def build_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model to `out_dir/tiny-clip`, replacing what is there; return that folder.

    The folder is assembled next to its final place and moved in when complete, so a reader
    never sees half a model.
    """
    with staged_folder(out_dir, TINY_CLIP_NAME) as staging:
        config_text = json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True) + "\n"
        (staging / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        # Constructors draw initial weights from the global CPU generator; fork it so the build
        # is reproducible and leaves the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"])
        weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        save_file(weights, str(staging / WEIGHTS_FILE))
        provenance = {
            "builder": "services.evaluator.tiny_models",
            "calibrated": False,
            "seed": seed,
        }
        provenance_text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        (staging / PROVENANCE_FILE).write_text(provenance_text, encoding="utf-8")
    return out_dir / TINY_CLIP_NAME


def is_tiny_build(folder: Path) -> bool:
    """True when `folder` holds a build of this module (seeded-random, uncalibrated weights)."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return False
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # a damaged marker still marks a tiny build: never claim calibration
    return not (isinstance(provenance, dict) and provenance.get("calibrated") is True)


def main(argv: list[str] | None = None) -> None:
    build_command(
        argv,
        "tiny open_clip model",
        TINY_CLIP_NAME,
        PROVENANCE_FILE,
        build_tiny_clip,
    )


if __name__ == "__main__":
    main()
