"""The content policy: one TOML file an operator edits, read by the gateway (prompt moderation)
and the evaluator (image safety).

    [prompt]                      allow: phrases that are innocent uses of listed words
    [prompt.terms.<category>]     words (whole words, after normalization) and regex patterns
    [prompt.classifier]           an offline profanity classifier with a threshold
    [prompt.semantic]             optional: similarity to example prompts, a local embedding model
    [image]                       enabled; enforce_uncalibrated
    [image.concepts.<category>]   CLIP concept prompts and the similarity that flags an image
    [image.nudenet]               optional detector backend (AGPL-3.0 extra), off by default

Every key is checked when the file is loaded: a mistake stops the service at start-up with the
file and the key in the message, rather than running with less moderation than the operator
wrote down. deploy/safety/policy.toml is the default, on in `make run`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PolicyError(ValueError):
    """The policy file is missing or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class TermCategory:
    """Words matched as whole words of the normalized text, and regexes searched in it."""

    category: str
    words: tuple[str, ...]
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class ClassifierLayer:
    """alt-profanity-check's probability, refused at `threshold` and above, as `category`."""

    enabled: bool = False
    category: str = "profanity"
    threshold: float = 0.9


@dataclass(frozen=True)
class SemanticExample:
    category: str
    text: str


@dataclass(frozen=True)
class SemanticLayer:
    """Cosine similarity of the prompt's sentence embedding to example prompts; refused at
    `threshold` and above, as the closest example's category."""

    enabled: bool = False
    model_path: Path | None = None
    threshold: float = 0.8
    examples: tuple[SemanticExample, ...] = ()


@dataclass(frozen=True)
class PromptPolicy:
    # Phrases taken out of a text before any layer reads it ("naked mole rat", "Gore-Tex"): the
    # innocent uses of a listed word, or of a word the classifier scores high.
    allow: tuple[str, ...] = ()
    terms: tuple[TermCategory, ...] = ()
    classifier: ClassifierLayer = ClassifierLayer()
    semantic: SemanticLayer = SemanticLayer()


@dataclass(frozen=True)
class ImageConcept:
    """An image whose CLIP cosine similarity to any of `prompts` reaches `threshold` is flagged
    as `category`."""

    category: str
    prompts: tuple[str, ...]
    threshold: float


@dataclass(frozen=True)
class NudeNetLayer:
    """NudeNet's detector: a detection of one of `labels` at `threshold` or more flags the image
    as `category`."""

    enabled: bool = False
    threshold: float = 0.6
    labels: tuple[str, ...] = ()
    category: str = "sexual"


@dataclass(frozen=True)
class ImagePolicy:
    enabled: bool = False
    # Concept thresholds are similarities of a trained CLIP: with an uncalibrated (tiny,
    # seeded-random) model the scores are computed and reported but flag nothing, unless this
    # is set (tests do, with thresholds they measured on the tiny model).
    enforce_uncalibrated: bool = False
    concepts: tuple[ImageConcept, ...] = ()
    nudenet: NudeNetLayer = NudeNetLayer()


@dataclass(frozen=True)
class SafetyPolicy:
    prompt: PromptPolicy = PromptPolicy()
    image: ImagePolicy = ImagePolicy()


def load_policy(path: Path) -> SafetyPolicy:
    """Reads and checks the policy file; PolicyError names the file and the bad key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file (SAFETY_POLICY)") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise PolicyError(f"{path}: {error}") from None
    return parse_policy(raw, str(path), path.parent)


def parse_policy(raw: dict[str, Any], source: str = "policy", base: Path = Path()) -> SafetyPolicy:
    """The policy from parsed TOML; relative model paths are taken from `base`."""
    table = _Table(raw, source, "")
    policy = SafetyPolicy(_prompt(table.table("prompt"), base), _image(table.table("image")))
    table.done()
    return policy


def _prompt(table: _Table, base: Path) -> PromptPolicy:
    terms = []
    term_tables = table.table("terms")
    for category in term_tables.names():
        entry = term_tables.table(category)
        words = entry.strings("words")
        patterns = entry.strings("patterns")
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as error:
                raise entry.error(f"patterns[{i}]", f"not a regular expression: {error}") from None
        entry.done()
        terms.append(TermCategory(category, words, patterns))
    term_tables.done()
    classifier_table = table.table("classifier")
    classifier = ClassifierLayer(
        enabled=classifier_table.bool("enabled", False),
        category=classifier_table.string("category", "profanity"),
        threshold=classifier_table.fraction("threshold", 0.9),
    )
    classifier_table.done()
    semantic_table = table.table("semantic")
    model = semantic_table.string("model_path", "")
    examples = []
    for i, example in enumerate(semantic_table.list("examples")):
        entry = _Table(example, semantic_table.source, semantic_table.key(f"examples[{i}]"))
        examples.append(SemanticExample(entry.string("category", ""), entry.string("text", "")))
        if not examples[-1].category or not examples[-1].text:
            raise entry.error("", "needs a category and a text")
        entry.done()
    semantic = SemanticLayer(
        enabled=semantic_table.bool("enabled", False),
        model_path=(base / model) if model else None,
        threshold=semantic_table.fraction("threshold", 0.8),
        examples=tuple(examples),
    )
    if semantic.enabled and (semantic.model_path is None or not semantic.examples):
        raise semantic_table.error("model_path", "the semantic layer needs a model and examples")
    semantic_table.done()
    allow = table.strings("allow")
    table.done()
    return PromptPolicy(allow, tuple(terms), classifier, semantic)


def _image(table: _Table) -> ImagePolicy:
    concepts = []
    concept_tables = table.table("concepts")
    for category in concept_tables.names():
        entry = concept_tables.table(category)
        prompts = entry.strings("prompts")
        if not prompts:
            raise entry.error("prompts", "give at least one concept prompt")
        threshold = entry.number("threshold", None)
        if threshold is None or not -1.0 <= threshold <= 1.0:
            raise entry.error("threshold", "a cosine similarity in -1..1")
        entry.done()
        concepts.append(ImageConcept(category, prompts, threshold))
    concept_tables.done()
    nudenet_table = table.table("nudenet")
    nudenet = NudeNetLayer(
        enabled=nudenet_table.bool("enabled", False),
        threshold=nudenet_table.fraction("threshold", 0.6),
        labels=nudenet_table.strings("labels"),
        category=nudenet_table.string("category", "sexual"),
    )
    if nudenet.enabled and not nudenet.labels:
        raise nudenet_table.error("labels", "name the NudeNet labels that flag an image")
    nudenet_table.done()
    policy = ImagePolicy(
        enabled=table.bool("enabled", False),
        enforce_uncalibrated=table.bool("enforce_uncalibrated", False),
        concepts=tuple(concepts),
        nudenet=nudenet,
    )
    table.done()
    return policy


class _Table:
    """A TOML table read key by key; done() refuses keys nobody read (a typo is an error)."""

    def __init__(self, raw: Any, source: str, path: str) -> None:
        self.source, self.path = source, path
        if not isinstance(raw, dict):
            raise self.error("", "must be a table")
        self._raw: dict[str, Any] = raw
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> PolicyError:
        where = self.key(name) if name else self.path or "(top level)"
        return PolicyError(f"{self.source}: {where}: {message}")

    def names(self) -> list[str]:
        return list(self._raw)

    def _get(self, name: str) -> Any:
        self._read.add(name)
        return self._raw.get(name)

    def table(self, name: str) -> _Table:
        value = self._get(name)
        return _Table({} if value is None else value, self.source, self.key(name))

    def list(self, name: str) -> list[Any]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(name, "must be a list")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        values = self.list(name)
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise self.error(f"{name}[{i}]", "must be a non-empty string")
        return tuple(values)

    def string(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, "must be a string")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def number(self, name: str, default: float | None) -> float | None:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, "must be a number")
        return float(value)

    def fraction(self, name: str, default: float) -> float:
        value = self.number(name, default)
        assert value is not None
        if not 0.0 <= value <= 1.0:
            raise self.error(name, "must be in 0..1")
        return value

    def done(self) -> None:
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown key")
