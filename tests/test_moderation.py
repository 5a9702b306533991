"""Prompt moderation with the shipped policy (deploy/safety/policy.toml) and the real classifier:
evasions of a blocked word are refused, innocent words that merely contain one pass, FIBO JSON
is checked string by string and named by path, and nothing returned or logged echoes the text.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import ROOT
from services.safety.policy import PolicyError, load_policy, parse_policy
from services.safety.prompts import PromptModerator, Refusal, fibo_texts

SHIPPED_POLICY = ROOT / "deploy" / "safety" / "policy.toml"

# "nude" (category sexual) written so that a plain word match would miss it.
EVASIONS = [
    "nude",
    "NUDE",
    "Nude portrait",
    "a photo, NuDe, on a beach",
    "nudes",
    "n.u.d.e",
    "N.U.D.E.",
    "n u d e",
    "n . u . d . e",
    "n-u-d-e",
    "n_u_d_e",
    "n*u*d*e",
    "n/u/d/e",
    "n\U0001f642u\U0001f642d\U0001f642e",  # emoji between the letters
    "a n u d e woman",  # spelled out, run into the article
    "nu.de",  # punctuation inside the word
    "nuuuude",
    "nnuuddee",
    "nudeeeee beach",
    "nud3",
    "n00de",
    "n u d 3",
    "n-0-0-d-e",
    "|\\|ude",
    "n|_|de",
    "nud\u0435",  # Cyrillic ie
    "\u043fude",  # Cyrillic pe
    "n\u03c5de",  # Greek upsilon
    "\u03bdude",  # Greek small nu
    "\u039dUDE",  # Greek capital nu
    "\u0578\u057dde",  # Armenian vo, se
    "nu\u0501e",  # Cyrillic komi de
    "\uff4e\uff55\uff44\uff45",  # fullwidth
    "\uff2e\uff35\uff24\uff25",
    "\U0001d427\U0001d42e\U0001d41d\U0001d41e",  # mathematical bold
    "\u24dd\u24e4\u24d3\u24d4",  # circled
    "\U0001f1f3\U0001f1fa\U0001f1e9\U0001f1ea",  # regional indicators
    "\u0274\u1d1c\u1d05\u1d07",  # small capitals
    "n\u200bude",  # zero-width space
    "n\u200cu\u200dd\u2060e\ufeff",  # non-joiner, joiner, word joiner, BOM
    "nu\u00adde",  # soft hyphen
    "n\u0308u\u0308d\u0303e",  # combining marks
    "\u00f1\u00fad\u00e8",  # precomposed accents
    "n\u00fc\u00fc\u00fcde",
    "#nude",
    "(nude)!!!",
]

# Innocent prompts holding a blocked or profane word inside another word, or look-alikes that
# the normalization must not turn into one.
INNOCENT = [
    "Scunthorpe United's football ground in the rain",
    "the Essex coastline at low tide",
    "Middlesex county cricket ground",
    "the Sussex downs at dawn",
    "an assassin in a hooded cloak, digital art",
    "a denuded hillside after a forest fire",
    "a nudibranch sea slug on a coral reef",
    "a class of students in a chemistry lab",
    "a cocktail glass with a lime wedge",
    "a cockatoo on a perch",
    "a shuttlecock on a badminton court",
    "a therapist's office with a green sofa",
    "a bunch of grapes on a wooden table",
    "a rapeseed field in bloom",
    "a sexton beetle on moss, macro photo",
    "a sextant on a ship's chart table",
    "a gorge with a river, aerial view",
    "the harbour at Gorey, Jersey",
    "a cocoon hanging from a twig",
    "the Dickensian streets of London at night",
    "a shiitake mushroom risotto",
    "a passionate flamenco dancer",
    "a titmouse on a branch",
    "a sunset over Lake Titicaca",
    "an Arsenal football shirt",
    "Penistone railway station in the snow",
    "a cumulus cloud over a wheat field",
    "a classic analysis of a cello",
    "a bassoon player on stage",
    "Massachusetts state house in autumn",
    "a box of xxl t-shirts",
    "a 1990s car in the rain",
    "4 cats on a sofa",
    "a 4x4 truck on a muddy road",
    "U.S.A. flag waving",
    "A B C blocks for toddlers",
    "\u041c\u043e\u0441\u043a\u0432\u0430 at night",  # Moscow in Cyrillic
    "caf\u00e9 au lait, na\u00efve art style",
    "x-ray of a hand",
    # hexadecimal identifiers are not leetspeak ("a55", "fa99", "b00b" inside them)
    "a lighthouse, ticket 16494be6-e284-43ab-8077-34793d0c14ae",
    "a lighthouse a55284dff47c4144afe09676f37badf8",
    "a lighthouse 99a59e9c-fa99-4a55-b00b-1e5d0c14aeb6",
]

ORDINARY = [
    "a lighthouse on a cliff at sunset",
    "a bowl of ramen, studio lighting",
    "a watercolor of a fox in the snow",
    "portrait of an astronaut, 85mm lens, shallow depth of field",
    "a cozy cabin in the woods at night, warm light in the windows",
    "isometric pixel art of a tiny city",
]


@pytest.fixture(scope="module")
def moderator() -> PromptModerator:
    return PromptModerator(load_policy(SHIPPED_POLICY).prompt)


def prompt_policy(raw: dict[str, Any], base: Path = Path()) -> PromptModerator:
    return PromptModerator(parse_policy({"prompt": raw}, "test.toml", base).prompt)


@pytest.mark.parametrize("text", EVASIONS)
def test_evasions_of_a_blocked_word_are_refused_by_the_term_lists(
    moderator: PromptModerator, text: str
) -> None:
    assert moderator.check([("prompt", text)]) == Refusal("sexual", "prompt")


@pytest.mark.parametrize("text", INNOCENT)
def test_innocent_words_containing_a_term_pass_with_the_classifier_on(
    moderator: PromptModerator, text: str
) -> None:
    assert moderator.check([("prompt", text)]) is None


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_prompts_pass(moderator: PromptModerator, text: str) -> None:
    assert moderator.check([("prompt", text), ("negative_prompt", "blurry, low quality")]) is None


def test_there_are_enough_evasions_and_innocent_prompts() -> None:
    assert len(EVASIONS) >= 30 and len(INNOCENT) >= 30


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("a child, nude", "minors"),
        ("kiiids in lingerie", "minors"),
        ("g0re everywhere", "violence"),
        ("g o r e", "violence"),
        ("beheadinggg", "violence"),
        ("self-harm", "self_harm"),
        ("s e l f h a r m", "self_harm"),
        ("selfharm", "self_harm"),
        ("slit wr1sts", "self_harm"),
        ("a sex   scene", "sexual"),
        ("x x x", "sexual"),
    ],
)
def test_each_category_and_phrases_are_matched_through_evasions(
    moderator: PromptModerator, text: str, category: str
) -> None:
    assert moderator.check([("prompt", text)]) == Refusal(category, "prompt")


def test_the_first_category_in_the_policy_names_the_refusal(moderator: PromptModerator) -> None:
    # "nude" is also a sexual word; minors comes first in the shipped file
    assert moderator.check([("prompt", "a nude child")]) == Refusal("minors", "prompt")


@pytest.mark.parametrize(
    "text",
    ["fuuuuck this", "f u c k", "sh1t", "sh!t", "a55hole", "what the f.u.c.k", "you stupid idiot"],
)
def test_the_classifier_refuses_profanity_and_its_evasions(
    moderator: PromptModerator, text: str
) -> None:
    assert moderator.check([("prompt", text)]) == Refusal("profanity", "prompt")


def test_the_classifier_category_and_threshold_come_from_the_policy() -> None:
    # "damn it" scores about 0.98
    strict = prompt_policy({"classifier": {"enabled": True, "category": "insult"}})
    assert strict.check([("prompt", "damn it")]) == Refusal("insult", "prompt")
    lenient = prompt_policy({"classifier": {"enabled": True, "threshold": 0.99}})
    assert lenient.check([("prompt", "damn it")]) is None
    off = prompt_policy({"terms": {"sexual": {"words": ["nude"]}}})
    assert off.check([("prompt", "what the fuck")]) is None
    assert off.check([("prompt", "n.u.d.e")]) == Refusal("sexual", "prompt")


def test_the_numpy_classifier_gives_the_probabilities_of_predict_prob() -> None:
    from profanity_check import predict_prob

    from services.safety.prompts import _Classifier

    texts = [*EVASIONS, *INNOCENT, *ORDINARY, "fuck fuck shit", "you idiot", "hell", ""]
    fast = _Classifier().probabilities(texts)
    assert fast == pytest.approx([float(p) for p in predict_prob(texts)], abs=1e-9)


def test_the_term_lists_are_checked_on_every_field_before_the_classifier(
    moderator: PromptModerator,
) -> None:
    texts = [("prompt", "what the fuck"), ("negative_prompt", "no g0re please")]
    assert moderator.check(texts) == Refusal("violence", "negative_prompt")
    texts = [("prompt", "a quiet harbour"), ("negative_prompt", "shit")]
    assert moderator.check(texts) == Refusal("profanity", "negative_prompt")


def test_a_blocked_word_deep_in_fibo_json_is_named_by_its_path(
    moderator: PromptModerator,
) -> None:
    fibo = {
        "short_description": "a garden",
        "objects": [
            {"description": "a statue", "number_of_objects": 2},
            {"description": "a fountain", "extra": {"notes": ["fine", "n u d e"], "ok": True}},
        ],
        "lighting": {"conditions": "soft morning light"},
    }
    refusal = moderator.check([("prompt", ""), *fibo_texts(fibo)])
    assert refusal == Refusal("sexual", "fibo_json.objects[1].extra.notes[1]")


def test_fibo_texts_lists_every_string_and_key_in_document_order() -> None:
    fibo = {"short_description": "a", "objects": [{"description": "b"}], "odd key": ["c", 1]}
    assert fibo_texts(fibo, "spec.fibo_json") == [
        ("spec.fibo_json", "short_description"),
        ("spec.fibo_json", "objects"),
        ("spec.fibo_json", "odd key"),
        ("spec.fibo_json.short_description", "a"),
        ("spec.fibo_json.objects[0]", "description"),
        ("spec.fibo_json.objects[0].description", "b"),
        ('spec.fibo_json["odd key"][0]', "c"),
    ]


def test_a_blocked_fibo_key_is_refused_without_its_name_in_the_field(
    moderator: PromptModerator,
) -> None:
    refusal = moderator.check(fibo_texts({"objects": [{"nude": True}]}))
    assert refusal == Refusal("sexual", "fibo_json.objects[0]")


def test_neither_the_refusal_nor_the_log_holds_the_matched_text(
    moderator: PromptModerator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    refusal = moderator.check([("prompt", "a n.u.d.e figure by a lake")])
    assert [f.name for f in dataclasses.fields(Refusal)] == ["category", "field"]
    assert refusal == Refusal("sexual", "prompt")
    for secret in ("nude", "n.u.d.e"):
        assert secret not in repr(refusal) and secret not in caplog.text


def test_a_term_without_letters_is_a_policy_error_naming_it() -> None:
    with pytest.raises(PolicyError, match=r"prompt\.terms\.odd\.words\[1\]"):
        prompt_policy({"terms": {"odd": {"words": ["fine", "$$$"]}}})


def test_a_bad_pattern_or_an_unknown_key_is_a_policy_error_naming_it() -> None:
    with pytest.raises(PolicyError, match=r"test\.toml: prompt\.terms\.x\.patterns\[0\]"):
        parse_policy({"prompt": {"terms": {"x": {"patterns": ["(unclosed"]}}}}, "test.toml")
    with pytest.raises(PolicyError, match=r"prompt\.terms\.x\.wrods: unknown key"):
        parse_policy({"prompt": {"terms": {"x": {"wrods": ["nude"]}}}}, "test.toml")
    with pytest.raises(PolicyError, match=r"prompt\.classifier\.threshold"):
        parse_policy({"prompt": {"classifier": {"threshold": 2}}}, "test.toml")


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "policy.toml")


def test_a_semantic_layer_without_its_model_folder_is_a_policy_error_naming_it(
    tmp_path: Path,
) -> None:
    semantic = {
        "enabled": True,
        "model_path": "models/missing",
        "examples": [{"category": "sexual", "text": "an explicit photo"}],
    }
    with pytest.raises(PolicyError) as raised:
        prompt_policy({"semantic": semantic}, base=tmp_path)
    assert str(tmp_path / "models" / "missing") in str(raised.value)


# The semantic layer, with a tiny sentence-transformers model built here (seeded random BERT,
# mean pooling): its similarities mean nothing semantically, but identical texts are at 1.0 and
# different ones well below, which is enough to pin loading, thresholds, categories and fields.
SEMANTIC_WORDS = "a an of on at the photo explicit naked person bloody body lighthouse cliff sunset"


@pytest.fixture(scope="module")
def tiny_sentence_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.common.torch_compat import prepare_torch

    prepare_torch()  # before anything imports torchvision
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-sentence-model")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SEMANTIC_WORDS.split()]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    bert = BertModel(config)
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
    bert.save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    model = SentenceTransformer(
        modules=[modules.Transformer(str(folder / "bert")), modules.Pooling(32, "mean")]
    )
    model.save(str(folder / "model"))
    return folder / "model"


def test_the_semantic_layer_refuses_a_text_close_to_an_example_as_its_category(
    tiny_sentence_model: Path,
) -> None:
    semantic = {
        "enabled": True,
        "model_path": str(tiny_sentence_model),
        "threshold": 0.99,
        "examples": [
            {"category": "sexual", "text": "an explicit photo of a naked person"},
            {"category": "violence", "text": "a bloody body"},
        ],
    }
    moderator = prompt_policy({"semantic": semantic})
    texts = [("prompt", "a lighthouse on a cliff"), ("negative_prompt", "a bloody body")]
    assert moderator.check(texts) == Refusal("violence", "negative_prompt")
    assert moderator.check([("prompt", "An explicit photo of a naked person")]) == Refusal(
        "sexual", "prompt"
    )
    assert moderator.check([("prompt", "a lighthouse on a cliff at sunset")]) is None


@pytest.mark.parametrize(
    "text",
    [
        "a naked mole rat in its burrow",
        "Al Gore at a podium",
        "a Gore-Tex jacket in the rain",
        "a pussy willow branch",
        "seen with the NAKED   EYE",
    ],
)
def test_the_policy_allow_list_lets_innocent_uses_of_listed_words_pass(
    moderator: PromptModerator, text: str
) -> None:
    assert moderator.check([("prompt", text)]) is None


def test_an_allowed_phrase_does_not_shield_the_rest_of_the_text(
    moderator: PromptModerator,
) -> None:
    refusal = moderator.check([("prompt", "a naked mole rat next to a n u d e figure")])
    assert refusal == Refusal("sexual", "prompt")


@pytest.mark.parametrize("text", ["kill 0", "a vacuum that sucks", "hell fire", "a crap photo"])
def test_everyday_words_the_classifier_scores_high_pass_at_the_shipped_threshold(
    moderator: PromptModerator, text: str
) -> None:
    assert moderator.check([("prompt", text)]) is None
