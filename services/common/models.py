"""The model registry: a JSON file mapping model ids to pipeline folders, defaults and price.

Read by the gateway (defaults, limits, price; no torch) and by the generator (which loads the
pipelines). `${MODEL_DIR}` in a path (a pipeline's or a ControlNet's) is replaced by the
configured model folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: str
    path: str
    version: str
    dtype: str = "float32"
    default_steps: int = 20
    default_width: int = 512
    default_height: int = 512
    default_guidance: float = 7.5
    min_size: int = 256
    max_size: int = 4096
    size_multiple: int = 8
    max_steps: int = 100
    max_variants: int = 8
    price_multiplier: float = 1.0
    # Rows per denoiser call: every batch runs at a fixed shape (padded), so a request's bytes
    # do not depend on what it shares a batch with. 1: no batching. `batch_pixels` (0: none)
    # lowers the shape for large images, batch_pixels // (width x height) rows at least 1: on a
    # CPU a large image is compute-bound and padding it only costs. Part of the cache key.
    max_batch: int = 1
    batch_pixels: int = 0
    # What the model can honour: the guidance image roles it uses, and its ControlNets (name ->
    # ControlNetModel folder). Anything else a request asks for is refused.
    guidance_roles: tuple[str, ...] = ()
    controlnets: Mapping[str, str] = field(default_factory=dict, hash=False)

    def batch_shape(self, width: int, height: int) -> int:
        """The fixed number of rows a request of this size renders in (with its batch-mates,
        or padding)."""
        return batch_shape(self.max_batch, self.batch_pixels, width, height)


def batch_shape(max_batch: int, batch_pixels: int, width: int, height: int) -> int:
    if not batch_pixels:
        return max_batch
    return max(1, min(max_batch, batch_pixels // max(1, width * height)))


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    default: str

    def get(self, model_id: str, field_name: str = "model") -> ModelSpec:
        """The model named `model_id`, or the default one for an empty id."""
        spec = self.models.get(model_id or self.default)
        if spec is None:
            known = ", ".join(sorted(self.models))
            raise InvalidArgument.one(field_name, f"unknown model {model_id!r}; known: {known}")
        return spec


def load_registry(path: Path, model_dir: Path) -> Registry:
    raw = json.loads(path.read_text())
    models = {}
    for entry in raw["models"]:
        entry["path"] = entry["path"].replace("${MODEL_DIR}", str(model_dir))
        entry["guidance_roles"] = tuple(entry.get("guidance_roles", ()))
        entry["controlnets"] = {
            name: folder.replace("${MODEL_DIR}", str(model_dir))
            for name, folder in entry.get("controlnets", {}).items()
        }
        models[entry["id"]] = ModelSpec(**entry)
    if raw["default"] not in models:
        raise ValueError(f"{path}: default model {raw['default']!r} is not listed")
    return Registry(models=models, default=raw["default"])
