"""The evaluator's networks: where their weights come from, whether they are calibrated, loading.

CLIP comes from one of two places:
- a folder in open_clip's hub layout (`open_clip_config.json` beside its weights), CLIP_DIR; the
  tiny seeded-random build (services/evaluator/tiny_models.py) is such a folder, marked by its
  provenance file, and is uncalibrated; any other folder is taken as trained weights;
- an open_clip model config, a built-in name ("ViT-B-32") or a JSON file in open_clip's
  model-config format, with a checkpoint file (.safetensors, .pt, .pth or .bin): CLIP_MODEL and
  CLIP_CHECKPOINT. A checkpoint is taken as trained weights.

LPIPS uses AlexNet features. The lpips package ships its calibrated linear heads; the AlexNet
backbone comes from a local weights file (torchvision's `alexnet` state dict), LPIPS_BACKBONE,
or, without one, is drawn from a fixed seed: reproducible distances, but uncalibrated.

`plan_models` checks the settings and that every file is there before the service listens;
`load_clip` and `load_lpips` load them (seconds; run them off the event loop).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from services.common.server import StartupRefused
from services.common.settings import EvaluatorSettings
from services.common.torch_compat import prepare_torch
from services.evaluator.client import ScoringModel

prepare_torch()

import lpips  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from services.evaluator.tiny_models import CONFIG_FILE, is_tiny_build  # noqa: E402

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# Seed for the AlexNet backbone when no weights file is given.
_RANDOM_BACKBONE_SEED = 0


@dataclass(frozen=True)
class ClipSource:
    """Where CLIP's config and weights are: a folder, or a config (name or JSON file) and a
    checkpoint file."""

    folder: Path | None = None
    config: str = ""
    checkpoint: Path | None = None


@dataclass(frozen=True)
class ModelPlan:
    """What the evaluator will load, every file checked to be there."""

    clip: ClipSource
    lpips_backbone: Path | None


@dataclass(frozen=True)
class ClipNetwork:
    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    info: ScoringModel


@dataclass(frozen=True)
class LpipsNetwork:
    model: Any
    info: ScoringModel


def plan_models(settings: EvaluatorSettings) -> ModelPlan:
    """The models the settings name; StartupRefused, naming the setting and the path, when the
    settings contradict each other or a file is missing."""
    backbone = settings.lpips_backbone
    if backbone is not None and not backbone.is_file():
        raise StartupRefused(f"LPIPS_BACKBONE {backbone}: no such file")
    return ModelPlan(_clip_source(settings), backbone)


def _clip_source(settings: EvaluatorSettings) -> ClipSource:
    checkpoint = settings.clip_checkpoint
    if not settings.clip_model:
        if checkpoint is not None:
            raise StartupRefused("CLIP_CHECKPOINT is set without CLIP_MODEL (the model config)")
        folder = settings.clip_path()
        setting = "CLIP_DIR" if settings.clip_dir else "CLIP_DIR (default MODEL_DIR/tiny-clip)"
        if not (folder / CONFIG_FILE).is_file():
            hint = "" if settings.clip_dir else " (`make models` builds it)"
            raise StartupRefused(f"{setting} {folder}: no {CONFIG_FILE}{hint}")
        if not any(p.suffix in CHECKPOINT_SUFFIXES for p in folder.iterdir() if p.is_file()):
            raise StartupRefused(f"{setting} {folder}: no weights file")
        return ClipSource(folder=folder)
    if settings.clip_dir is not None:
        raise StartupRefused("set CLIP_DIR or CLIP_MODEL, not both")
    if checkpoint is None:
        raise StartupRefused(
            f"CLIP_MODEL {settings.clip_model} needs CLIP_CHECKPOINT, a weights file"
        )
    if not checkpoint.is_file():
        raise StartupRefused(f"CLIP_CHECKPOINT {checkpoint}: no such file")
    if checkpoint.suffix not in CHECKPOINT_SUFFIXES:
        raise StartupRefused(
            f"CLIP_CHECKPOINT {checkpoint}: not one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    config = settings.clip_model
    if config.endswith(".json") or "/" in config:
        _check_config_file(Path(config))
    elif config not in open_clip.list_models():
        raise StartupRefused(
            f"CLIP_MODEL {config}: not a built-in open_clip model config nor a .json file"
        )
    return ClipSource(config=config, checkpoint=checkpoint)


def _check_config_file(path: Path) -> None:
    if not path.is_file():
        raise StartupRefused(f"CLIP_MODEL {path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StartupRefused(f"CLIP_MODEL {path}: {error}") from None
    if not isinstance(raw, dict) or not all(key in raw for key in _MODEL_CONFIG_KEYS):
        hint = (
            " (a hub-layout config: put it beside its weights and set CLIP_DIR)"
            if isinstance(raw, dict) and "model_cfg" in raw
            else ""
        )
        raise StartupRefused(
            f"CLIP_MODEL {path}: not an open_clip model config, needs "
            f"{', '.join(_MODEL_CONFIG_KEYS)}{hint}"
        )


def load_clip(source: ClipSource) -> ClipNetwork:
    """The CLIP model, its image preprocessing and tokenizer, in eval mode; StartupRefused
    naming the files when they do not load."""
    try:
        return _load_clip(source)
    except Exception as error:
        if source.folder is not None:
            where = f"CLIP_DIR {source.folder}"
        else:
            where = f"CLIP_CHECKPOINT {source.checkpoint} (CLIP_MODEL {source.config})"
        raise StartupRefused(f"{where}: cannot load: {one_line(error)}") from error


def _load_clip(source: ClipSource) -> ClipNetwork:
    if source.folder is not None:
        name = f"local-dir:{source.folder}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
        calibrated = not is_tiny_build(source.folder)
        info = ScoringModel(f"open_clip:{source.folder.name}", "clip", calibrated)
    else:
        assert source.checkpoint is not None
        name = source.config
        if name.endswith(".json") or "/" in name:
            # open_clip finds configs by name: register the file under its stem.
            open_clip.add_model_config(Path(name))
            name = Path(name).stem
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(source.checkpoint)
        )
        tokenizer = open_clip.get_tokenizer(name)
        info = ScoringModel(f"open_clip:{name}({source.checkpoint.name})", "clip", True)
    return ClipNetwork(model.eval(), preprocess, tokenizer, info)


def load_lpips(backbone_file: Path | None) -> LpipsNetwork:
    """LPIPS (AlexNet): the package's linear heads, the backbone from `backbone_file` or, without
    one, from a fixed seed."""
    with warnings.catch_warnings():
        # lpips builds AlexNet with torchvision's `pretrained=` argument, deprecated since 0.13.
        warnings.filterwarnings(
            "ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="Arguments other than a weight enum", category=UserWarning
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_BACKBONE_SEED)
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone_file is None:
        return LpipsNetwork(
            model.eval(), ScoringModel("lpips:alex(random-backbone)", "lpips", False)
        )
    try:
        _load_alexnet_features(model.net, backbone_file)
    except Exception as error:
        raise StartupRefused(
            f"LPIPS_BACKBONE {backbone_file}: cannot load: {one_line(error)}"
        ) from error
    return LpipsNetwork(
        model.eval(), ScoringModel(f"lpips:alex({backbone_file.name})", "lpips", True)
    )


def _load_alexnet_features(net: torch.nn.Module, weights_file: Path) -> None:
    """Copy torchvision AlexNet weights (`features.<i>.*` keys) into lpips' sliced AlexNet.

    lpips keeps torchvision's layer numbering inside its slices (`slice2.3.weight` is
    `features.3.weight`), so the name after the slice is the torchvision index.
    """
    if weights_file.suffix == ".safetensors":
        state = load_file(str(weights_file))
    else:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    features = {
        name.removeprefix("features."): tensor
        for name, tensor in state.items()
        if name.startswith("features.")
    }
    own = {name.split(".", 1)[1]: name for name, _ in net.named_parameters()}
    missing = sorted(set(own) - set(features))
    if missing:
        raise ValueError(f"{weights_file}: no AlexNet weights for features.{missing[0]}")
    net.load_state_dict({own[key]: features[key] for key in own})


def one_line(error: BaseException, limit: int = 400) -> str:
    """An error's message on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
