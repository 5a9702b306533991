"""Prompt moderation: latency of one `PromptModerator.check` (one request: a prompt and a negative
prompt, or every string of a FIBO JSON prompt) over a mix of mostly innocent prompts, evasions of
blocked words and FIBO prompts, with the shipped policy; and the same with the term lists alone,
with the classifier alone (its input includes the normalized views, so normalization is in both),
and with alt-profanity-check's own `predict_prob` called once per request on the texts as sent
(what the classifier would cost without the numpy evaluation).

`python -m bench.moderation` prints the figures as JSON.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.stats import machine, median, percentile
from services.common.settings import ROOT
from services.safety.policy import PromptPolicy, load_policy
from services.safety.prompts import PromptModerator, fibo_texts

Request = list[tuple[str, str]]

SUBJECTS = [
    "a lighthouse on a cliff",
    "a bowl of ramen",
    "a red fox in the snow",
    "an astronaut on a horse",
    "a cozy cabin in the woods",
    "a cocktail on a bar counter",
    "a class of students in a lab",
    "a sexton beetle on moss",
    "an assassin in a hooded cloak",
    "a denuded hillside after a fire",
    "the Essex coastline",
    "Scunthorpe town hall",
    "a shuttlecock on a court",
    "a 1990s car in the rain",
    "4 cats on a sofa",
]
STYLES = [
    "at sunset",
    "studio lighting",
    "watercolor",
    "35mm photo, shallow depth of field",
    "isometric pixel art",
    "oil painting, dramatic clouds, highly detailed, trending on artstation",
]
EVASIONS = [
    "a n.u.d.e figure by a lake",
    "nuuuude portrait",
    "n00de on a beach",
    "\uff4e\uff55\uff44\uff45 statue",
    "nud\u0435 model",
    "n\u200bude",
    "g0re and blood",
    "s e l f h a r m",
    "what the f u c k",
    "sh1t painting",
]
NEGATIVES = ["", "blurry, low quality", "text, watermark, extra fingers"]


def requests(count: int = 300, seed: int = 0) -> list[Request]:
    """`count` requests: about 75% text prompts, 10% evasions, 15% FIBO JSON prompts."""
    rng = random.Random(seed)
    out: list[Request] = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.10:
            prompt = rng.choice(EVASIONS)
        elif kind < 0.85:
            prompt = f"{rng.choice(SUBJECTS)}, {rng.choice(STYLES)}"
        else:
            out.append(fibo_texts(_fibo(rng)))
            continue
        out.append([("prompt", prompt), ("negative_prompt", rng.choice(NEGATIVES))])
    return out


def _fibo(rng: random.Random) -> dict[str, Any]:
    objects = [
        {
            "description": rng.choice(SUBJECTS),
            "location": rng.choice(["center", "left", "right foreground"]),
            "relative_size": "medium",
            "shape_and_color": "round, warm orange",
            "texture": "smooth",
            "appearance_details": rng.choice([*STYLES, "n u d e", "plain"]),
        }
        for _ in range(rng.randint(1, 4))
    ]
    return {
        "short_description": f"{rng.choice(SUBJECTS)}, {rng.choice(STYLES)}",
        "objects": objects,
        "background_setting": "a quiet harbour at dawn",
        "lighting": {"conditions": "soft morning light", "direction": "left", "shadows": "soft"},
        "aesthetics": {"composition": "rule of thirds", "color_scheme": "teal and orange"},
        "style_medium": "photograph",
    }


def _latencies(check: Callable[[Request], object], batch: Sequence[Request]) -> list[float]:
    for request in batch:  # warm-up: caches, allocator, branch predictors
        check(request)
    latencies = []
    for _ in range(3):
        for request in batch:
            started = time.perf_counter()
            check(request)
            latencies.append((time.perf_counter() - started) * 1e6)
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "p50_us": round(median(latencies), 1),
        "p99_us": round(percentile(latencies, 99), 1),
    }


def run(count: int = 300) -> dict[str, Any]:
    """Latency figures (microseconds per request) for each layer and for the whole check."""
    shipped = load_policy(ROOT / "deploy" / "safety" / "policy.toml").prompt
    started = time.perf_counter()
    full = PromptModerator(shipped)
    start_s = time.perf_counter() - started
    terms_only = PromptModerator(PromptPolicy(terms=shipped.terms))
    classifier_only = PromptModerator(PromptPolicy(classifier=shipped.classifier))
    from profanity_check import predict_prob

    batch = requests(count)
    fibo = [r for r in batch if r[0][0].startswith("fibo_json")]
    text = [r for r in batch if not r[0][0].startswith("fibo_json")]
    return {
        "machine": machine(),
        "requests": {"text": len(text), "fibo": len(fibo)},
        "fibo_texts_per_request": {"median": median([len(r) for r in fibo])},
        "refused": sum(full.check(r) is not None for r in batch),
        "start_s": round(start_s, 3),
        "full": _summary(_latencies(full.check, batch)),
        "full_text_prompts": _summary(_latencies(full.check, text)),
        "full_fibo_prompts": _summary(_latencies(full.check, fibo)),
        "terms_only": _summary(_latencies(terms_only.check, batch)),
        "classifier_only": _summary(_latencies(classifier_only.check, batch)),
        "library_predict_prob": _summary(
            _latencies(lambda r: predict_prob([t for _, t in r]), batch)
        ),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
