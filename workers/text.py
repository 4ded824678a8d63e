"""Text for the voices: what to read and where to cut it so the first audio leaves early.

Shared by every TTS engine (:func:`pieces` is the one entry). Sentences are cut
conservatively (a full stop after a known abbreviation does not end one), then into
clauses, and the very first clause after a few words when it is long, because the first
chunk's synthesis time is the viewer's wait. A clause too long for one run of a voice
(whose cost grows faster than its length) is cut into even runs of words.

Punctuation is Unicode's: ASCII marks end a sentence or clause when a space follows (``3.14``
and ``10:30`` do not), the marks of scripts written without spaces (``。！？，、`` and
their kin, Arabic ``، ؛ ؟``, Devanagari ``। ॥``) wherever they are.
"""
from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass

from giris.workers.engine import EngineError
from giris.workers.markup import strip_markup

#: closing quotes and brackets that may follow a sentence's last mark
_CLOSE = "\"')\\]”’»›」』）】〕〗〙〛》〉］｝"
#: sentence ends that need a space after them (a "." inside "3.14" ends nothing)
_STOP_SPACED = ".!?…‼⁇⁈⁉"
#: sentence ends of scripts written without spaces: an end wherever they are
_STOP_WIDE = "。｡！？．؟۔।॥։።፧။"
_SENTENCE_END = re.compile(
    rf"(?<=[{_STOP_SPACED}])[{_CLOSE}]*\s+(?=\S)"
    rf"|(?<=[{_STOP_WIDE}])[{_CLOSE}]*\s*(?=[^\s{_STOP_SPACED}{_STOP_WIDE}{_CLOSE}])"
    rf"|(?<=[.!?])[{_CLOSE}]*(?=[¡¿])")  # Spanish: "¿Sí?¡No!" is two sentences
#: clause ends: ASCII ones with a space after them, the others wherever they are, and dashes
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+|(?<=[，、；：،؛﹐﹑﹔﹕՝፣፤၊])\s*(?=\S)"
                         r"|\s+[—–-]{1,2}\s+")
#: abbreviations whose full stop does not end a sentence
_ABBREV = re.compile(r"(?:^|\s)(?:mr|mrs|ms|dr|prof|st|sr|jr|vs|etc|e\.g|i\.e|approx|fig|"
                     r"(?:[^\W\d_]\.)+[^\W\d_])\.$",  # and dotted initials: a.m., U.S., J.R.R.
                     re.IGNORECASE)
#: Unicode categories we drop before phonemizing: emoji and other symbols (espeak would
#: read "🙂" out as "slightly smiling face"), format characters (zero-width joiners, soft
#: hyphens), private use, surrogates, unassigned
_DROP = {"So", "Sk", "Co", "Cs", "Cn", "Cf"}
#: categories read as a space: controls (tab, vertical tab, form feed, NEL, the separators
#: \x1c-\x1f, NUL; dropped, they glued words: "word\x0bword" was one) and line and
#: paragraph separators
_SPACE = {"Cc", "Zl", "Zp"}
#: a terminal escape sequence (CSI "\x1b[31m", OSC "\x1b]...\x07", or ESC and one
#: character): dropped whole, or "[31m" was read "thirty one m"
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
#: the longest clause one voice run takes: Piper's prior over 400 words took 12 s in one
#: ONNX call (and the worker was killed as hung), over 30 words ~0.1 s
MAX_CLAUSE_WORDS = 30
MAX_CLAUSE_CHARS = 200
#: the longest run without a space espeak-ng is given: it copies a word's parts into
#: fixed buffers unchecked (1.52, in Piper 1.8): ``"W." * 97`` overran its 80-byte buffer of
#: dotted initials and killed the worker (SIGSEGV), and ``"s'" * 220`` its 200-byte one of
#: suffixes. No dictionary word is longer; 40 characters of 4 bytes fill its 160-byte word
MAX_WORD_CHARS = 40
#: dotted initials read as one abbreviation ("U.S.A."): more are read in groups of this many
MAX_INITIALS = 8
_INITIALS = re.compile(rf"(?:[^\W\d_]\.){{{MAX_INITIALS + 1},}}")

#: script (as named here) → languages (espeak-ng voice names, before any "-") written in
#: it; Latin is read by every voice (espeak-ng reads a Latin word in any language, the
#: others switching to English for it), so it is not listed but for Latin languages
_LANGUAGES = {
    "Latin": "af an az bs ca cs cy da de en eo es et eu fi fr ga gd gn haw hr ht hu ia id io "
             "is it jbo kl ku la lb lfn lt lv mi ms mt nb nci nl no om pap pl pt py quc qu ro "
             "sk sl sq sv sw tn tr uz vi",
    "Cyrillic": "ba be bg cv kk ky mk mn ru sr tg tt uk",
    "Greek": "el grc",
    "Arabic": "ar fa ps sd ug ur",
    "Hebrew": "he yi",
    "Devanagari": "hi kok mai mr ne sa",
    "Bengali": "as bn bpy",
    "Gurmukhi": "pa",
    "Gujarati": "gu",
    "Oriya": "or",
    "Tamil": "ta",
    "Telugu": "te",
    "Kannada": "kn",
    "Malayalam": "ml",
    "Sinhala": "si",
    "Myanmar": "my",
    "Thai": "th",
    "Georgian": "ka",
    "Armenian": "hy hyw",
    "Ethiopic": "am",
    "Han": "cmn hak ja yue zh",
    "Bopomofo": "cmn zh",
    "Hiragana": "ja",
    "Katakana": "ja",
    "Hangul": "ko",
    # scripts no voice here reads, known so that their letters are judged too
    **dict.fromkeys(["Coptic", "Khmer", "Lao", "Mongolian", "Nko", "Syriac", "Thaana", "Tibetan",
                     "Tifinagh", "Yi"], ""),
}
#: the first word(s) of a letter's Unicode name → its script (a name not here: not judged)
_NAMES = {name.upper(): name for name in _LANGUAGES} | {"CJK": "Han", "IDEOGRAPHIC": "Han",
                                                         "KATAKANA-HIRAGANA": "Katakana"}
_SCRIPTS: dict[str, frozenset[str]] = {}
for _script, _langs in _LANGUAGES.items():
    for _lang in _langs.split():
        _SCRIPTS[_lang] = _SCRIPTS.get(_lang, frozenset({"Latin"})) | {_script}
for _lang in _LANGUAGES["Latin"].split():  # α, π, Ω in Latin-script text are symbols that
    _SCRIPTS[_lang] |= {"Greek"}           # espeak-ng reads by name ("alpha"), as meant


def language_scripts(language: str) -> frozenset[str] | None:
    """The scripts a voice of ``language`` (an espeak-ng voice: "en-us", "cmn", "fa-latn")
    reads; None for a language not in the table, whose text is then not filtered."""
    parts = language.lower().replace("_", "-").split("-")
    if "latn" in parts[1:]:  # a romanized voice ("cmn-latn-pinyin")
        return frozenset({"Latin"})
    return _SCRIPTS.get(parts[0])


@dataclass(frozen=True)
class Reader:
    """A voice as its text sees it: its name and language (for messages), the scripts it
    reads (None: any, its language is not in the table)."""

    name: str
    language: str
    scripts: frozenset[str] | None

    @classmethod
    def of(cls, name: str, language: str) -> Reader:
        """The reader of a voice of ``language`` (an espeak-ng voice name)."""
        return cls(name, language, language_scripts(language))


@functools.lru_cache(maxsize=4096)
def script_of(ch: str) -> str | None:
    """The script of a letter, from its Unicode name ("CJK UNIFIED IDEOGRAPH-4F60": Han);
    None for anything else (digits, punctuation, marks) or a script not in the table."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    words = unicodedata.name(ch, "").split()
    if words and words[0] in ("FULLWIDTH", "HALFWIDTH"):
        words = words[1:]
    return _NAMES.get(words[0]) if words else None


def drop_foreign(text: str, scripts: frozenset[str]) -> tuple[str, list[str]]:
    """``text`` without the letters of scripts not in ``scripts`` (and the marks on them),
    each such run a space; and those scripts, in order of appearance. espeak-ng reads a
    letter of a script its language lacks by name ("Chinese letter"), seconds of noise."""
    if text.isascii():
        return text, []  # the common case: Latin only, for every voice
    kept: list[str] = []
    dropped: list[str] = []
    dropping = False
    for ch in text:
        script = script_of(ch)
        if script is not None and script not in scripts:
            if script not in dropped:
                dropped.append(script)
            if not dropping:
                kept.append(" ")
            dropping = True
        elif not (dropping and unicodedata.category(ch).startswith("M")):
            kept.append(ch)
            dropping = False
    if not dropped:
        return text, []
    return re.sub(r"\s+", " ", "".join(kept)).strip(), dropped


def clean_text(text: str) -> str:
    """What the voice should read: NFC, terminal escapes and symbols dropped, controls
    and separators a space (they part words), spaces collapsed."""
    text = unicodedata.normalize("NFC", _ESCAPE.sub("", text))
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in _SPACE:
            kept.append(" ")
        elif cat not in _DROP:
            kept.append(ch)
    return re.sub(r"\s+", " ", "".join(kept)).strip()


#: a line of text without closing punctuation before a blank line
_PARAGRAPH_END = re.compile(r"(\w)[ \t]*\n[ \t]*\n")  # (strip_markup made \r\n a \n)
#: an amount of money as English text writes it: "$5", "€1.2 million", "£3.50"
_MONEY = re.compile(r"(?<![\w$€£])([$€£])\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?"
                    r"(\s+(?:thousand|million|billion|trillion)\b)?")
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}


def spell_money(text: str) -> str:
    """English amounts of money in the order they are said: espeak reads "$1.2 million" as
    "dollar one point two million" (and "$5" as "dollar five")."""
    def said(m: re.Match) -> str:
        one, many, sub_one, sub_many = _CURRENCY[m.group(1)]
        whole, frac, scale = m.group(2), m.group(3), m.group(4) or ""
        if scale or (frac is not None and len(frac) != 2):
            return f"{whole}{'.' + frac if frac else ''}{scale} {many}"
        units = int(whole.replace(",", ""))
        out = f"{whole} {one if units == 1 else many}"
        if frac is not None and int(frac):
            cents = f"{int(frac)} {sub_one if int(frac) == 1 else sub_many}"
            out = cents if units == 0 else f"{out} {cents}"
        return out

    return _MONEY.sub(said, text)


def speakable(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)


def split_sentences(text: str) -> list[str]:
    """Sentences, conservatively: a full stop after a known abbreviation does not split.
    Closing quotes and brackets stay with the sentence they close (for the captions)."""
    out: list[str] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        head = text[start:m.start()]
        # not after an abbreviation, nor a full stop the text goes on from in lower case
        # ("at 10:30 a.m. sharp", "the U.S. and U.K. teams": each was cut in three, with a
        # sentence's pause in the middle of the phrase)
        if _ABBREV.search(head) or head.endswith(".") and text[m.end():m.end() + 1].islower():
            continue
        out.append((head + m.group().strip()).strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def split_clauses(sentence: str, first_words: int) -> list[str]:
    """A sentence in clauses, its first clause cut after ``first_words`` words when at least
    three more follow (0: never): the first audio is what the viewer waits for. A clause
    longer than ``MAX_CLAUSE_WORDS`` or ``MAX_CLAUSE_CHARS`` is cut too (:func:`cut_long`)."""
    clauses = [c.strip() for c in _CLAUSE_END.split(sentence) if c and c.strip()]
    if first_words > 0 and clauses:
        words = clauses[0].split()
        if len(words) > first_words + 2:
            clauses[0:1] = [" ".join(words[:first_words]), " ".join(words[first_words:])]
    return [run for clause in clauses for run in cut_long(clause)]


def cut_long(clause: str) -> list[str]:
    """``clause`` in runs of at most ``MAX_CLAUSE_WORDS`` words and ``MAX_CLAUSE_CHARS``
    characters, as even as can be: a voice's run over one long clause costs more than
    linearly (and blocks its worker meanwhile). Its words are first made ones espeak can
    take (:func:`espeak_words`)."""
    words = espeak_words(clause)
    joined = " ".join(words)
    if len(words) <= MAX_CLAUSE_WORDS and len(joined) <= MAX_CLAUSE_CHARS:
        return [joined]
    return _even_runs(words)


def espeak_words(text: str) -> list[str]:
    """The words of ``text``, none that espeak-ng would overrun a buffer with: dotted
    initials in even groups of at most ``MAX_INITIALS`` (each but the last without its final dot:
    "W.W.W" is still spelled, and a dot before a space would end a sentence), then a "word"
    longer than ``MAX_WORD_CHARS`` (junk, a long address, a script written without spaces)
    cut into several (:func:`_cut_word`)."""
    def grouped(m: re.Match) -> str:
        letters = len(m.group()) // 2
        n = math.ceil(letters / MAX_INITIALS)
        groups = [m.group()[2 * (i * letters // n):2 * ((i + 1) * letters // n)] for i in range(n)]
        return " ".join([g[:-1] for g in groups[:-1]] + groups[-1:])

    return [part for word in _INITIALS.sub(grouped, text).split() for part in _cut_word(word)]


def _even_runs(words: list[str]) -> list[str]:
    """``words`` (none longer than ``MAX_CLAUSE_CHARS``) in the fewest runs of nearly equal
    word counts that keep within both limits."""
    if not words:
        return []
    n = max(math.ceil(len(words) / MAX_CLAUSE_WORDS), math.ceil(len(" ".join(words)) / MAX_CLAUSE_CHARS))
    while True:
        n = min(n, len(words))  # one word a run always fits
        runs = [" ".join(words[i * len(words) // n:(i + 1) * len(words) // n]) for i in range(n)]
        if n == len(words) or max(map(len, runs)) <= MAX_CLAUSE_CHARS:
            return runs
        n += 1


def _cut_word(word: str) -> list[str]:
    """``word`` in parts of at most ``MAX_WORD_CHARS`` characters: each cut after a mark
    or symbol in the part's second half where there is one ("example.com/" "path/to"),
    else at the limit; no part starts with a combining mark (it stays with its letter)
    but in a flood of them, which is cut like the rest."""
    parts: list[str] = []
    while len(word) > MAX_WORD_CHARS:
        cut = next((j for j in range(MAX_WORD_CHARS, MAX_WORD_CHARS // 2, -1)
                    if unicodedata.category(word[j - 1])[0] in "PS" and not _mark(word[j])), 0)
        if not cut:
            cut = MAX_WORD_CHARS
            while cut > 0 and _mark(word[cut]):
                cut -= 1
            cut = cut or MAX_WORD_CHARS
        parts.append(word[:cut])
        word = word[cut:]
    return parts + [word] if word else parts


def _mark(ch: str) -> bool:
    return unicodedata.category(ch).startswith("M")


def pieces(text: str, first_words: int, reader: Reader | None = None) -> list[tuple[str, bool]]:
    """What a voice reads, as the pieces to synthesize one by one, each with whether it
    ends a sentence (where a pause goes). Every sentence is cut at its clauses (a voice
    pauses there anyway): a chunk is the unit a ``cancel`` waits for, so chunks stay short;
    only the very first clause is also cut after ``first_words`` words. Letters of a script
    ``reader`` does not read are dropped like symbols; text with nothing readable left is
    the caller's error (``bad_input``), and so are pieces of punctuation alone skipped.
    Markup is read as its text (:mod:`giris.workers.markup`)."""
    # a paragraph that ends without punctuation (a heading, a list item) still ends there
    clean = clean_text(_PARAGRAPH_END.sub(r"\1.\n", strip_markup(text)))
    if reader is None or reader.language.lower().startswith("en"):
        clean = spell_money(clean)
    foreign: list[str] = []
    if reader is not None and reader.scripts is not None:
        clean, foreign = drop_foreign(clean, reader.scripts)
    if not speakable(clean):
        if foreign and reader is not None:
            raise EngineError(f"nothing to say: the voice {reader.name!r} ({reader.language}) "
                              f"cannot read {_either(foreign)} script", code="bad_input")
        raise EngineError("nothing to say: the text has no letters or digits a voice can "
                          "read (emoji and symbols are skipped)", code="bad_input")
    out: list[tuple[str, bool]] = []
    for sentence in split_sentences(clean):
        parts = [p for p in split_clauses(sentence, 0 if out else first_words) if speakable(p)]
        out.extend((part, j == len(parts) - 1) for j, part in enumerate(parts))
    return out


def _either(names: list[str]) -> str:
    """"Han", "Han or Arabic", "Han, Arabic or Greek"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
