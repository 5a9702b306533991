"""Prompt text as term lists see it: lowercase Latin letters, with the usual evasions undone.

`fold` maps look-alike letters (Cyrillic, Greek, fullwidth, mathematical, small capitals,
regional indicators), accents, invisible characters and leetspeak to plain letters. `views`
splits the folded text into words three ways: as written (`n.u.d.e` is four words), with runs of
single letters joined (`n u d e` is one word) and with punctuation inside a word removed
(`nu.de` is one word). Words are only ever matched whole, so "Scunthorpe" and "cocktail" stay
innocent.

Leetspeak digits are mapped only in words that also hold letters ("a 1990s car" and "4 cats"
keep their numbers as numbers). Two readings are ambiguous and kept open in the folded text as
capital letters, which nothing else produces: `O` is a `0` (read as o, or as u: "n00de"), `I`
is a `1`, `|` or `!` (read as i or l) and `V` is a Greek nu (read as v or n). `readings` spells
them out.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product

# Dropped: combining marks (accents, once NFKD has split them off), enclosing marks, and format
# characters (zero-width space, joiners, word joiner, BOM, soft hyphen, bidi controls, tags).
_DROPPED = frozenset({"Mn", "Me", "Cf"})

# Letters NFKD leaves alone that read as Latin ones: "<char><latin>" pairs, written as the
# letters themselves (hence the noqa: these strings are meant to look ambiguous).
_LOOK_ALIKES = (
    # Cyrillic
    "аa вb гr еe кk мm нh оo пn рp сc тt уy хx ьb ѕs іi јj ԁd ԛq ԝw һh ӏl үy "  # noqa: RUF001
    "Аa Вb Еe Кk Мm Нh Оo Рp Сc Тt Уy Хx Ѕs Іi Јj Ԁd Ԛq Ԝw Һh Ӏl Үy "  # noqa: RUF001
    # Greek (lowercase nu is open: it reads as v or n)
    "αa βb γy εe ηn ιi κk μu νV οo ρp τt υu χx ωw ςc ϳj "  # noqa: RUF001
    "Αa Βb Εe Ζz Ηh Ιi Κk Μm Νn Οo Ρp Τt Υy Χx "  # noqa: RUF001
    # Latin letters with a stroke, ligatures, small capitals
    "ıi ȷj łl Łl øo Øo đd Đd ħh Ħh ŧt Ŧt ƀb ƶz ɑa ɡg ɩi æae Æae œoe Œoe "  # noqa: RUF001
    "ᴀa ʙb ᴄc ᴅd ᴇe ꜰf ɢg ʜh ɪi ᴊj ᴋk ʟl ᴍm ɴn ᴏo ᴘp ʀr ꜱs ᴛt ᴜu ᴠv ᴡw ʏy ᴢz "  # noqa: RUF001
    # Armenian
    "ոn սu օo հh"  # noqa: RUF001
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CONFUSABLES: dict[int, str] = {ord(pair[0]): pair[1:] for pair in _LOOK_ALIKES.split()}
# Regional indicators and negative circled / squared capitals: no decomposition in Unicode.
for _start in (0x1F1E6, 0x1F150, 0x1F170):
    _CONFUSABLES.update({_start + i: letter for i, letter in enumerate(_LETTERS)})
# Capitals are mapped before casefolding (capital eta reads as H, small eta as n), the rest after
# (so that casefolding keeps the open `V`).
_CAPITALS = {k: v for k, v in _CONFUSABLES.items() if chr(k).isupper()}
_SMALL = {k: v for k, v in _CONFUSABLES.items() if k not in _CAPITALS}

# Letters drawn with several ASCII characters, longest first.
_DRAWN = {
    "|\\/|": "m",
    "/\\/\\": "m",
    "\\/\\/": "w",
    "|\\|": "n",
    "/\\/": "n",
    "|_|": "u",
    "(_)": "u",
    "\\/": "v",
}
_DRAWN_RE = re.compile("|".join(re.escape(k) for k in _DRAWN))

# Leetspeak inside a word (letters, digits, `@ $ €`) that has letters: `! | +` count as letters
# only between two of those ("sh!t"; "wow!" and "c++" keep them as punctuation).
_LEET = str.maketrans("0123456789@$€", "OIzeasbtbgase")
_INNER = str.maketrans("!|+", "IIt")
_LEET_CHUNK = re.compile(r"(?<!\S)(?=\S*[a-z])(?=\S*[0-9@$€!|+])\S+")
_LEET_WORD = re.compile(
    r"(?<![a-z0-9@$€])(?=[a-z0-9@$€!|+]*[a-z])[a-z0-9@$€]+(?:[!|+][a-z0-9@$€]+)*"
)
# Hexadecimal identifiers (hashes, UUIDs) are left as written: their digits are not leetspeak.
_HEX_ID = re.compile(r"[0-9a-f]+(?:-[0-9a-f]+)*")
MIN_HEX_ID = 8

_WORD = re.compile(r"(?<![a-z0-9@$€])(?=[a-z0-9@$€!|+]*[a-z])[a-z0-9@$€]+(?:[!|+][a-z0-9@$€]+)*")
# Hexadecimal identifiers (hashes, UUIDs) are left as written: their digits are not leetspeak.
_HEX_ID = re.compile(r"(?<!\S)(?=[-0-9a-f]*[0-9])[0-9a-f]{4,}(?:-[0-9a-f]{4,})*(?!\S)")

_WORD = re.compile(r"(?<!\S)(?=\S*[a-z])(?=\S*[0-9@$€!|+])\S+")

_WORD = re.compile(r"[a-zIOV]+")
_NOT_LETTER = re.compile(r"[^a-zIOV]+")
_SPLIT_WORD = re.compile(r"[a-zIOV][^a-zIOV\s]+[a-zIOV]")
# A run of three or more single characters split by spaces or punctuation: "n u d e", "n.u.d.e".
_ONE = r"[a-zIOV0-9@$]"
_SPELLED = re.compile(rf"(?<!{_ONE}){_ONE}(?:[^a-zIOV0-9@$]{{1,3}}{_ONE}(?!{_ONE})){{2,}}")
_OPEN = {"O": "ou", "I": "il", "V": "vn"}
_REPEATS = re.compile(r"(.)\1+")
MAX_READINGS = 16


def fold(text: str) -> str:
    """`text` lowercased, look-alikes and accents mapped to Latin letters, invisible characters
    removed and leetspeak read as letters (the open ones as `O`, `I` and `V`)."""
    if text.isascii():
        text = text.lower()
    else:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if unicodedata.category(c) not in _DROPPED)
        text = text.translate(_CAPITALS).casefold().translate(_SMALL)
    if "/" in text or "\\" in text or "|" in text or "(" in text:
        text = _DRAWN_RE.sub(lambda m: _DRAWN[m.group()], text)
    return _LEET_CHUNK.sub(_leet_chunk, text)


def _leet_chunk(match: re.Match[str]) -> str:
    chunk = match.group()
    if len(chunk) >= MIN_HEX_ID and _HEX_ID.fullmatch(chunk):
        return chunk
    return _LEET_WORD.sub(lambda m: m.group().translate(_INNER).translate(_LEET), chunk)


@dataclass(frozen=True)
class Views:
    """A folded text and its words, split three ways; `joined` and `glued` are None where they
    are the same as `words`."""

    folded: str
    words: list[str]
    joined: list[str] | None
    glued: list[str] | None
    spelled: list[str]  # the runs of single letters joined in `joined`


def views(text: str) -> Views:
    """The word views of `text` (see the module's docstring)."""
    folded = fold(text)
    words = _WORD.findall(folded)
    spelled: list[str] = []

    def join(match: re.Match[str]) -> str:
        run = match.group()
        if not _WORD.search(run):  # "1 2 3": numbers, not letters
            return run
        spelled.append(_NOT_LETTER.sub("", run.translate(_LEET)))
        return f" {spelled[-1]} "

    joined_text = _SPELLED.sub(join, folded)
    joined = _WORD.findall(joined_text) if spelled else None
    glued = None
    if _SPLIT_WORD.search(folded):
        glued = [g for g in (_NOT_LETTER.sub("", chunk) for chunk in folded.split()) if g]
    return Views(folded, words, joined, glued, spelled)


def readings(word: str) -> Iterator[str]:
    """The lowercase readings of a folded word (`O` as o or u, `I` as i or l, `V` as v or n), the
    usual one first; only that one where there would be more than MAX_READINGS."""
    open_letters = [i for i, c in enumerate(word) if c in _OPEN]
    if not open_letters:
        yield word
        return
    if 2 ** len(open_letters) > MAX_READINGS:
        yield word.lower()
        return
    letters = list(word)
    for choice in product((0, 1), repeat=len(open_letters)):
        for i, pick in zip(open_letters, choice, strict=True):
            letters[i] = _OPEN[word[i]][pick]
        yield "".join(letters)


def squeeze(word: str) -> str:
    """`word` with each run of a repeated letter cut to one: "nuuude" -> "nude"."""
    return _REPEATS.sub(r"\1", word)
