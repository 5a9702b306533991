"""imagegen: the Python SDK of the imagegen mesh, and the home of its generated protobuf code
(`imagegen.v1`, which the services import too).

Importing this package is cheap: the services import `imagegen.v1` through it on every start, so
the client, its transports (grpc, httpx) and the CLI are imported only when one of the names
below is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from imagegen.client import AsyncClient, Client
    from imagegen.errors import (
        Conflict,
        FieldViolation,
        ImagegenError,
        IntegrityError,
        InvalidArgument,
        JobFailed,
        NotFound,
        PermissionDenied,
        PolicyRefused,
        QuotaExceeded,
        Unauthenticated,
        Unavailable,
        Unsupported,
        WaitTimeout,
    )
    from imagegen.retry import RetryPolicy
    from imagegen.types import (
        Artifact,
        CacheHit,
        CacheMode,
        ControlNet,
        Error,
        Estimate,
        Evaluation,
        Event,
        Final,
        GuidanceImage,
        Job,
        JobStatus,
        Model,
        Preview,
        Priority,
        Progress,
        Scores,
        Spec,
        Status,
        Variant,
        Webhook,
        Withheld,
    )

_MODULES = {
    "client": ("AsyncClient", "Client"),
    "errors": (
        "Conflict",
        "FieldViolation",
        "ImagegenError",
        "IntegrityError",
        "InvalidArgument",
        "JobFailed",
        "NotFound",
        "PermissionDenied",
        "PolicyRefused",
        "QuotaExceeded",
        "Unauthenticated",
        "Unavailable",
        "Unsupported",
        "WaitTimeout",
    ),
    "retry": ("RetryPolicy",),
    "types": (
        "Artifact",
        "CacheHit",
        "CacheMode",
        "ControlNet",
        "Error",
        "Estimate",
        "Evaluation",
        "Event",
        "Final",
        "GuidanceImage",
        "Job",
        "JobStatus",
        "Model",
        "Preview",
        "Priority",
        "Progress",
        "Scores",
        "Spec",
        "Status",
        "Variant",
        "Webhook",
        "Withheld",
    ),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'imagegen' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"imagegen.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
