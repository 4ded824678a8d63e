"""Text for the voices: what to read and where to cut it so the first audio leaves early.

Shared by every TTS engine (:func:`pieces` is the one entry). Sentences are cut
conservatively (a full stop after a known abbreviation does not end one), then into
clauses, and the very first clause after a few words when it is long, because the first
chunk's synthesis time is the viewer's wait.
"""
from __future__ import annotations

import re
import unicodedata

from giris.workers.engine import EngineError

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+(?=\S)")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|\s+[—–-]{1,2}\s+")
#: abbreviations whose full stop does not end a sentence
_ABBREV = re.compile(r"(?:^|\s)(?:mr|mrs|ms|dr|prof|st|sr|jr|vs|etc|e\.g|i\.e|approx|fig)\.$",
                     re.IGNORECASE)
#: Unicode categories we drop before phonemizing: emoji and other symbols (espeak would
#: read "🙂" out as "slightly smiling face"), controls, private use, surrogates, unassigned
_DROP = {"So", "Sk", "Co", "Cs", "Cn", "Cc", "Cf"}


def clean_text(text: str) -> str:
    """What the voice should read: NFC, symbols and controls dropped, spaces collapsed."""
    text = unicodedata.normalize("NFC", text)
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r":
            kept.append(" ")
        elif cat not in _DROP:
            kept.append(ch)
    return re.sub(r"\s+", " ", "".join(kept)).strip()


def speakable(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def split_sentences(text: str) -> list[str]:
    """Sentences, conservatively: a full stop after a known abbreviation does not split."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        head = text[start:m.start()]
        if _ABBREV.search(head):
            continue
        out.append(head.strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def split_clauses(sentence: str, first_words: int) -> list[str]:
    """A sentence in clauses, its first clause cut after ``first_words`` words when at least
    three more follow (0: never): the first audio is what the viewer waits for."""
    clauses = [c.strip() for c in _CLAUSE_END.split(sentence) if c and c.strip()]
    if first_words > 0 and clauses:
        words = clauses[0].split()
        if len(words) > first_words + 2:
            clauses[0:1] = [" ".join(words[:first_words]), " ".join(words[first_words:])]
    return clauses


def pieces(text: str, first_words: int) -> list[tuple[str, bool]]:
    """What a voice reads, as the pieces to synthesize one by one, each with whether it
    ends a sentence (where a pause goes). Every sentence is cut at its clauses (a voice
    pauses there anyway): a chunk is the unit a ``cancel`` waits for, so chunks stay short;
    only the very first clause is also cut after ``first_words`` words. Text with nothing
    readable left once symbols are dropped is the caller's error (``bad_input``)."""
    clean = clean_text(text)
    if not speakable(clean):
        raise EngineError("nothing to say: the text has no letters or digits a voice can "
                          "read (emoji and symbols are skipped)", code="bad_input")
    out: list[tuple[str, bool]] = []
    for i, sentence in enumerate(split_sentences(clean)):
        parts = split_clauses(sentence, first_words if i == 0 else 0)
        out.extend((part, j == len(parts) - 1) for j, part in enumerate(parts))
    return out
