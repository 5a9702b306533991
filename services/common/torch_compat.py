"""Make torch's companion libraries importable on a CPU-only install, offline.

PyPI's torchvision wheel is a CUDA build. Next to the CPU torch wheel its C++ extension
(`torchvision/_C.so`) cannot load, and `import torchvision` then fails with "operator
torchvision::nms does not exist" while registering fake kernels for those ops. transformers,
diffusers, open_clip and lpips all import torchvision, so they fail with it.

`prepare_torch()` defines the two operator schemas torchvision expects (`torchvision::nms`
and `torchvision::qnms`, exactly as its C++ code declares them) when, and only when, the
extension cannot load. The detection ops such as `torchvision.ops.nms` still raise when called
there; nothing in this project calls them. Where the extension loads (a CUDA machine with a
matching torch) nothing is changed.

It also switches the Hugging Face libraries to offline mode (no model file may be downloaded at
run time) and turns their download/load progress bars off: services log, they have no terminal.
Call it before importing torchvision, transformers, diffusers, open_clip or lpips.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_lock = threading.Lock()
_prepared = False
# Registrations last only as long as the Library object lives, so it is kept here.
_fallback_library: torch.library.Library | None = None


def prepare_torch() -> None:
    """Set offline mode and, if torchvision's C++ ops cannot load, register their schemas.

    Idempotent and thread-safe; cheap after the first call.
    """
    global _prepared, _fallback_library
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with _lock:
        if _prepared:
            return
        _prepared = True
        if "torchvision" in sys.modules or _torchvision_ops_exist():
            return
        if importlib.util.find_spec("torchvision") is None:
            return
        if _load_torchvision_extension():
            return
        library = torch.library.Library("torchvision", "FRAGMENT")  # type: ignore[no-untyped-call]
        for schema in _TORCHVISION_SCHEMAS:
            library.define(schema)  # type: ignore[no-untyped-call]
        _fallback_library = library


def torchvision_ops_are_stubs() -> bool:
    """True when prepare_torch() had to register torchvision's op schemas without kernels."""
    return _fallback_library is not None


def _torchvision_ops_exist() -> bool:
    return hasattr(torch.ops.torchvision, "nms")


def _load_torchvision_extension() -> bool:
    """Load torchvision's `_C` library the way torchvision itself does; False if it cannot."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    package_dir = Path(spec.origin).parent
    finder = importlib.machinery.FileFinder(
        str(package_dir),
        (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    )
    extension = finder.find_spec("_C")
    if extension is None or extension.origin is None:
        return False
    try:
        torch.ops.load_library(extension.origin)  # type: ignore[no-untyped-call]
    except OSError:
        return False
    return _torchvision_ops_exist()


def set_torch_threads(threads: int, processes: int = 2) -> int:
    """Caps torch's threads in this process (0: the cores divided among the host's `processes`
    model processes, at least 1): several model processes on one host would otherwise each take
    every core and fight over them."""
    count = threads or max(1, (os.cpu_count() or 2) // processes)
    torch.set_num_threads(count)
    return count
