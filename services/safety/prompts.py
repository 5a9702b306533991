"""Prompt moderation: the gateway checks every text of a request (prompt, negative prompt, each
string of the FIBO JSON) against the [prompt] section of the content policy before anything is
looked up, queued or charged.

Three layers, in order: term lists and regex patterns per category (matched in the normalized
views of `services.safety.normalize`, whole words only), alt-profanity-check's classifier (on the
text as sent and on its normalized views), and an optional semantic layer (similarity to the
operator's example prompts). A refusal names the category and the field, never the text.

No torch here: the classifier is a linear model evaluated with numpy, and sentence-transformers
is imported only when the semantic layer is on.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.common.spec import json_nodes, path_of
from services.safety.normalize import Views, readings, squeeze, views
from services.safety.policy import PolicyError, PromptPolicy, SemanticLayer, TermCategory

log = logging.getLogger(__name__)

# Words the classifier weighs at least this much (of its mean linear weight) are also read
# through repeated letters ("fuuuck"), so that its input names them as it knows them.
_PROFANE_WEIGHT = 2.0
# Texts whose probabilities the fast evaluation must reproduce before it replaces the library's.
_PROBES = (
    "a lighthouse on a cliff at sunset",
    "you are a stupid idiot, shut up",
    "what the fuck is this shit shit shit",
    "",
    "12345 !!!",
)


@dataclass(frozen=True)
class Refusal:
    """A refused request: the policy category and the field that carried it."""

    category: str
    field: str


class PromptModerator:
    """The policy's prompt layers, built once; `check` is cheap enough for an event loop (the
    semantic layer, when on, runs a transformer and is not)."""

    def __init__(self, policy: PromptPolicy) -> None:
        self._semantic = _SemanticModel(policy.semantic) if policy.semantic.enabled else None
        self._classifier = _Classifier() if policy.classifier.enabled else None
        self._classifier_layer = policy.classifier
        profane = self._classifier.profane_words if self._classifier else ()
        self._terms = _TermLayer(policy.terms, profane)
        self._allowed = _allowed(policy.allow)

    @property
    def runs_a_model(self) -> bool:
        """True when `check` runs a transformer (the semantic layer): not for an event loop."""
        return self._semantic is not None

    def check(self, texts: Sequence[tuple[str, str]]) -> Refusal | None:
        """The first refusal for (field, text) pairs: every text against the term lists, then
        the classifier (one call for all), then the semantic layer; None when all pass. The
        policy's allowed phrases are taken out first."""
        if self._allowed is not None:
            allowed = self._allowed
            texts = [(field, allowed.sub(" ", text)) for field, text in texts]
        lines: dict[str, tuple[str, ...]] = {}
        for field, text in texts:
            if text not in lines:
                category, lines[text] = self._terms.check(text)
                if category is not None:
                    return Refusal(category, field)
        if self._classifier is not None:
            batch = [(field, line) for field, text in texts for line in (text, *lines[text])]
            unique = list(dict.fromkeys(line for _, line in batch))
            probability = dict(zip(unique, self._classifier.probabilities(unique), strict=True))
            layer = self._classifier_layer
            for field, line in batch:
                if probability[line] >= layer.threshold:
                    return Refusal(layer.category, field)
        if self._semantic is not None:
            return self._semantic.check(texts)
        return None


def _allowed(phrases: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for the allowed phrases: whole words, any case, any spacing between words."""
    if not phrases:
        return None
    spelled = sorted((r"\s+".join(map(re.escape, p.split())) for p in phrases), key=len)
    return re.compile(r"\b(?:" + "|".join(reversed(spelled)) + r")\b", re.IGNORECASE)


def fibo_texts(value: Any, field: str = "fibo_json") -> list[tuple[str, str]]:
    """Every string of a FIBO JSON value with its path (`fibo_json.objects[0].description`), in
    document order. Keys are texts too (FIBO reads unknown keys as input); a key is named by the
    path of its object, so that refusing it does not echo it."""
    texts: list[tuple[str, str]] = []
    for where, _depth, item in json_nodes(value, field, sys.maxsize):
        if isinstance(item, str):
            texts.append((path_of(where), item))
        elif isinstance(item, dict):
            path = path_of(where)
            texts.extend((path, key) for key in item if isinstance(key, str))
    return texts


class _TermLayer:
    """Term lists and patterns, matched in every view of a text after its words are read as
    the vocabulary's (term words, pattern words and the classifier's profane words) where only
    repeated letters differ. Categories rank in policy order: the first one matched wins."""

    def __init__(self, terms: Sequence[TermCategory], profane: Iterable[str]) -> None:
        self._names = [category.category for category in terms]
        self._word_rank: dict[str, int] = {}  # phrases written together ("selfharm") included
        self._phrases: list[tuple[str, int]] = []  # " self harm ", in a line padded with spaces
        self._patterns: list[tuple[int, re.Pattern[str]]] = []
        self._inside: list[tuple[int, re.Pattern[str]]] = []  # in runs of spelled-out letters
        vocabulary = list(profane)
        for rank, category in enumerate(terms):
            phrases = [_phrase(word, category.category, i) for i, word in enumerate(category.words)]
            words = {phrase.replace(" ", "") for phrase in phrases}
            vocabulary += [*words, *(w for phrase in phrases for w in phrase.split())]
            vocabulary += [w for p in category.patterns for w in _pattern_words(p)]
            for word in words:
                self._word_rank.setdefault(word, rank)
            self._phrases += [(f" {p} ", rank) for p in phrases if " " in p]
            self._patterns += [(rank, re.compile(p, re.IGNORECASE)) for p in category.patterns]
            inside = _alternation({w for w in map(squeeze, words) if len(w) >= 3})
            if inside is not None:
                self._inside.append((rank, inside))
        self._vocabulary = _Vocabulary(vocabulary)

    def check(self, text: str) -> tuple[str | None, tuple[str, ...]]:
        """The first category `text` matches (or None), and the text's read views."""
        seen = views(text)
        lines = tuple(dict.fromkeys(self._read_line(v) for v in _word_lists(seen)))
        rank = len(self._names)
        for line in lines:
            for word in self._word_rank.keys() & line.split():
                rank = min(rank, self._word_rank[word])
            padded = f" {line} "
            rank = min([rank, *(r for phrase, r in self._phrases if phrase in padded)])
        searched = (seen.folded.lower(), *lines)
        rank = _first(self._patterns, rank, searched)
        if seen.spelled:
            squeezed = [squeeze(r) for word in seen.spelled for r in readings(word)]
            rank = _first(self._inside, rank, squeezed)
        return (self._names[rank] if rank < len(self._names) else None), lines

    def _read_line(self, words: list[str]) -> str:
        return " ".join(map(self._vocabulary.read, words))


def _first(ranked: list[tuple[int, re.Pattern[str]]], rank: int, texts: Sequence[str]) -> int:
    """The rank of the first regex ranked below `rank` found in `texts`, or `rank`."""
    for candidate, regex in ranked:
        if candidate >= rank:
            break
        if any(regex.search(text) for text in texts):
            return candidate
    return rank


def _word_lists(seen: Views) -> list[list[str]]:
    return [w for w in (seen.words, seen.joined, seen.glued) if w is not None]


def _phrase(term: str, category: str, index: int) -> str:
    """A policy term as its normalized words, one space apart."""
    words = views(term).words
    if not words:
        raise PolicyError(f"prompt.terms.{category}.words[{index}]: has no letters to match")
    return " ".join(next(readings(w)) for w in words)


def _pattern_words(pattern: str) -> list[str]:
    """The literal words of a regex (`\\b(child|kids)\\b` -> child, kids): read through
    repeated letters like the term words."""
    return re.findall(r"[a-z]{2,}", re.sub(r"\\.", " ", pattern.lower()))


def _alternation(words: set[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile("|".join(map(re.escape, sorted(words, key=lambda w: (-len(w), w)))))


class _Vocabulary:
    """Reads a word as a vocabulary word when they differ only by repeated letters ("nuuude",
    "nnude" -> "nude"; "cocoon" stays), trying each reading of its open letters."""

    def __init__(self, words: Iterable[str]) -> None:
        self._by_squeezed: dict[str, list[tuple[str, list[int]]]] = {}
        for word in set(words):
            squeezed, runs = _runs(word)
            self._by_squeezed.setdefault(squeezed, []).append((word, runs))
        self.read = lru_cache(maxsize=1 << 16)(self._read)

    def _read(self, word: str) -> str:
        for reading in readings(word):
            squeezed, runs = _runs(reading)
            best = ""
            for candidate, candidate_runs in self._by_squeezed.get(squeezed, ()):
                fits = all(r >= c for r, c in zip(runs, candidate_runs, strict=True))
                if fits and len(candidate) > len(best):
                    best = candidate
            if best:
                return best
        return word.lower()


_RUN = re.compile(r"(.)\1*")


def _runs(word: str) -> tuple[str, list[int]]:
    """`word` squeezed, and how many times each of its letters is repeated."""
    runs = [m.group() for m in _RUN.finditer(word)]
    return "".join(r[0] for r in runs), [len(r) for r in runs]


class _Classifier:
    """alt-profanity-check's model (TF-IDF words, linear SVMs, sigmoid calibration, averaged)
    as numpy arithmetic: the library's predict_prob spends about 2 ms per call in scikit-learn's
    input checks. The arithmetic is checked against predict_prob on start-up; where they differ
    (another model version) predict_prob is used."""

    def __init__(self) -> None:
        try:
            library = importlib.import_module("profanity_check.profanity_check")
        except ImportError:
            raise PolicyError(
                "prompt.classifier.enabled: alt-profanity-check is not installed "
                "(pip install -r requirements/moderation.txt), or set enabled = false"
            ) from None
        self._library_probabilities = library.predict_prob
        vectorizer, model = library.vectorizer, library.model
        self._analyze = vectorizer.build_analyzer()
        self._index: dict[str, int] = vectorizer.vocabulary_
        self._idf: NDArray[np.float64] = vectorizer.idf_
        pairs = model.calibrated_classifiers_
        self._weights: NDArray[np.float64] = np.stack([p.estimator.coef_[0] for p in pairs], 1)
        self._intercepts = np.array([p.estimator.intercept_[0] for p in pairs])
        self._slopes = np.array([p.calibrators[0].a_ for p in pairs])
        self._offsets = np.array([p.calibrators[0].b_ for p in pairs])
        expected = np.asarray(self._library_probabilities(list(_PROBES)))
        self._fast = bool(np.allclose(self._evaluate(list(_PROBES)), expected, atol=1e-9))
        if not self._fast:
            log.warning("profanity classifier: numpy evaluation differs, using predict_prob")
        mean_weight = self._weights.mean(axis=1)
        self.profane_words = tuple(
            word
            for word, i in self._index.items()
            if mean_weight[i] >= _PROFANE_WEIGHT and word.isalpha() and len(word) >= 3
        )

    def probabilities(self, texts: list[str]) -> list[float]:
        """The probability that each text is profane, in one evaluation."""
        if not texts:
            return []
        if self._fast:
            return self._evaluate(texts)
        return [float(p) for p in self._library_probabilities(texts)]

    def _evaluate(self, texts: list[str]) -> list[float]:
        rows: list[int] = []
        columns: list[int] = []
        counts: list[int] = []
        for row, text in enumerate(texts):
            found: dict[int, int] = {}
            for token in self._analyze(text):
                column = self._index.get(token)
                if column is not None:
                    found[column] = found.get(column, 0) + 1
            rows += [row] * len(found)
            columns += found
            counts += found.values()
        scores = np.tile(self._intercepts, (len(texts), 1))
        if columns:
            row_of = np.array(rows, dtype=np.intp)
            column_of = np.array(columns, dtype=np.intp)
            tfidf = np.array(counts, dtype=np.float64) * self._idf[column_of]
            norms = np.sqrt(np.bincount(row_of, tfidf * tfidf, len(texts)))
            tfidf /= norms[row_of]
            np.add.at(scores, row_of, self._weights[column_of] * tfidf[:, None])
        calibrated = 1.0 / (1.0 + np.exp(self._slopes * scores + self._offsets))
        return [float(p) for p in calibrated.mean(axis=1)]


class _SemanticModel:
    """Cosine similarity of each text's sentence embedding to the policy's example prompts."""

    def __init__(self, layer: SemanticLayer) -> None:
        path = layer.model_path
        if path is None or not path.is_dir():
            raise PolicyError(f"prompt.semantic.model_path: {path}: no such model folder")
        if importlib.util.find_spec("sentence_transformers") is None:
            raise PolicyError(
                "prompt.semantic.enabled: sentence-transformers is not installed "
                "(pip install sentence-transformers), or set enabled = false"
            )
        # Imported here: torch comes with it, and only this layer needs it.
        from services.common.torch_compat import prepare_torch

        prepare_torch()
        sentence_transformers = importlib.import_module("sentence_transformers")
        self._model = sentence_transformers.SentenceTransformer(
            str(path), device="cpu", local_files_only=True
        )
        self._threshold = layer.threshold
        self._categories = [example.category for example in layer.examples]
        self._examples = self._embed([example.text for example in layer.examples])

    def _embed(self, texts: list[str]) -> NDArray[np.float32]:
        embedded = self._model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(embedded, dtype=np.float32)

    def check(self, texts: Sequence[tuple[str, str]]) -> Refusal | None:
        """The first text whose closest example reaches the threshold, as its category."""
        if not texts:
            return None
        similarity = self._embed([text for _, text in texts]) @ self._examples.T
        for (field, _), row in zip(texts, similarity, strict=True):
            closest = int(np.argmax(row))
            if row[closest] >= self._threshold:
                return Refusal(self._categories[closest], field)
        return None
