"""The FIBO structured-prompt schema, and the check that names every misfit by its JSON path.

FIBO reads a JSON object describing the image: `short_description`, `objects[]` (each with
`description`, `location`, `relationship`, `relative_size`, `shape_and_color`, `texture`,
`appearance_details`, `orientation`, ...), `background_setting`, `lighting`, `aesthetics`,
`photographic_characteristics`, `style_medium`, `artistic_style`, `context` and
`text_render[]`. `FIBO_SCHEMA` writes that shape down; `fibo_schema_violations` compares a
prompt with it. The gateway imports this module: no torch here.

The policy, chosen for what a client wants:

- A known field of the wrong type is refused, with its path (`fibo_json.lighting.direction:
  must be a string`, `fibo_json.objects[2]: must be an object`): that is never what the client
  meant, and the model would read it as something else than intended.
- Unknown keys are allowed, at any level, and reach the model as they are. FIBO reads the whole
  JSON as text, so they are input, not noise; Bria's prompt VLM writes fields beyond the ones
  listed here (`aesthetics.preference_score`, `aesthetics.aesthetic_score`) and new model
  versions add more, and a client passing that output through must not start failing then. A
  typo in a key is the price: it is not caught here. Unknown values still pass the generic
  checks of `services.common.spec.fibo_violations` (depth, size, text).
- Every field is optional and null is allowed anywhere (nulls are dropped before hashing and
  rendering): a minimal prompt is `{"short_description": "..."}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from services.common.errors import FieldViolation
from services.common.spec import MAX_REPORTED, json_path

# A schema node: `str` (text), `int` (a whole number), a mapping (an object with those known
# fields) or a one-item list (an array of that).
Node: TypeAlias = type | Mapping[str, "Node"] | list["Node"]

FIBO_OBJECT: Mapping[str, Node] = {
    "description": str,
    "location": str,
    "relationship": str,
    "relative_size": str,
    "shape_and_color": str,
    "texture": str,
    "appearance_details": str,
    "orientation": str,
    "number_of_objects": int,
    "pose": str,
    "expression": str,
    "clothing": str,
    "action": str,
    "gender": str,
    "skin_tone_and_texture": str,
}
FIBO_TEXT_RENDER: Mapping[str, Node] = {
    "text": str,
    "location": str,
    "size": str,
    "color": str,
    "font": str,
    "appearance_details": str,
}
FIBO_SCHEMA: Mapping[str, Node] = {
    "short_description": str,
    "objects": [FIBO_OBJECT],
    "background_setting": str,
    "lighting": {"conditions": str, "direction": str, "shadows": str},
    "aesthetics": {"composition": str, "color_scheme": str, "mood_atmosphere": str},
    "photographic_characteristics": {
        "depth_of_field": str,
        "focus": str,
        "camera_angle": str,
        "lens_focal_length": str,
    },
    "style_medium": str,
    "artistic_style": str,
    "context": str,
    "text_render": [FIBO_TEXT_RENDER],
}


def fibo_schema_violations(value: Any, field: str = "fibo_json") -> list[FieldViolation]:
    """Where `value` (a FIBO prompt as plain JSON values) does not fit FIBO_SCHEMA, in document
    order, each named by its path under `field`; at most MAX_REPORTED of them."""
    bad: list[FieldViolation] = []
    _check(value, FIBO_SCHEMA, field, bad)
    return bad


def _check(value: Any, node: Node, path: str, bad: list[FieldViolation]) -> None:
    if value is None or len(bad) >= MAX_REPORTED:
        return
    problem = _type_problem(value, node)
    if problem is not None:
        bad.append(FieldViolation(path, problem))
    elif isinstance(node, Mapping):
        for key, item in value.items():
            if key in node:
                _check(item, node[key], json_path(path, key), bad)
    elif isinstance(node, list):
        for index, item in enumerate(value):
            _check(item, node[0], json_path(path, index), bad)


def _type_problem(value: Any, node: Node) -> str | None:
    if isinstance(node, Mapping):
        return None if isinstance(value, dict) else "must be an object"
    if isinstance(node, list):
        return None if isinstance(value, list) else "must be an array"
    if node is int:
        # A protobuf Struct carries every number as a double: 3.0 is the whole number 3.
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return None if whole and not isinstance(value, bool) else "must be a whole number"
    return None if isinstance(value, str) else "must be a string"
