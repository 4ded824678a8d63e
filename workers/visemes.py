"""IPA → viseme table and the blendshape pose of each viseme.

Why a table and not a model: the TTS already knows *what* is said and *when* (Piper's
phoneme alignments), so the mouth shape of each phoneme is a lookup; what makes it look
natural is the coarticulation applied on top (``coeffs_visemes``). The 15 visemes are the
Oculus/Meta OVRLipSync set (``sil PP FF TH DD kk CH SS nn RR aa E ih oh ou``), which many
avatar rigs already understand.

Piper (espeak-ng) hands phonemes one code point at a time (``"o"``, ``"ʊ"`` rather than
``"oʊ"``; ``"ˈ"`` and ``"ː"`` as tokens of their own), other TTS engines may group them;
:func:`parse` accepts both. Rules, in order:

* stress marks ``ˈ ˌ`` are not sounds: they mark the next vowel as stressed (emphasis) and
  their time is given to the next phoneme;
* length and other modifiers (``ː ˑ``, combining diacritics, ``ʰ ʲ ˞``, tone digits) extend
  the previous phoneme;
* pauses, word gaps, punctuation and Piper's specials (``^ $ _``) are ``sil`` — a word gap
  ``" "`` with a low dominance so fluent speech does not snap shut between words;
* a known multi-symbol entry (affricates ``tʃ dʒ``, diphthongs ``aɪ oʊ`` …) maps as a whole;
  otherwise the string is split into known symbols, its time shared out evenly;
* anything else maps to :data:`DEFAULT_VISEME` (``DD``: a slightly open, neutral mouth that
  never looks wrong for long).

:func:`table_markdown` renders the table for the README.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from giris.workers.coefficients import BLENDSHAPES, VISEMES

VISEME_INDEX: dict[str, int] = {v: i for i, v in enumerate(VISEMES)}
SIL = VISEME_INDEX["sil"]

#: viseme for a symbol the table does not know
DEFAULT_VISEME = "DD"

#: IPA symbol → viseme, grouped by viseme. Covers every symbol espeak-ng emits for English
#: (en-us, en-gb) and the rest of Piper's phoneme inventory, so other voices degrade gently.
IPA_TO_VISEME: dict[str, str] = {}
_GROUPS: dict[str, str] = {
    # silence: word gaps, punctuation, Piper's sentence/pad specials
    "sil": " , . ! ? ; : - – — … ( ) ' \" ^ $ _ # | ‖ ¡ ¿",
    "PP": "p b m ɓ ʙ ɸ β",                    # lips closed (bilabials)
    "FF": "f v ɱ ⱱ ʋ",                        # lower lip to upper teeth
    "TH": "θ ð",                              # tongue between the teeth
    "DD": "t d ɾ ɖ ʈ ɗ ɽ ɺ ʔ ǀ ǁ ǂ ǃ ʘ",      # tongue tip up, jaw slightly open
    "kk": "k ɡ g q ɢ c ɟ ʄ ɠ ʛ x ɣ χ ʁ ʀ ŋ ɴ ɰ ħ ʕ ʜ ʢ ʡ h ɦ ç ʝ",  # back of the tongue
    "CH": "ʃ ʒ ɕ ʑ ʂ ʐ ɧ tʃ dʒ ʧ ʤ tɕ dʑ",   # lips protruded, teeth close
    "SS": "s z ts dz ʦ ʣ",                    # teeth together, lips spread
    "nn": "n l ɫ ɬ ɮ ɭ ɲ ɳ ʎ ʟ",             # tongue tip up, mouth a little open
    "RR": "ɹ r ɻ ɚ ɝ",                        # rhotics, slight rounding
    "aa": "a ɑ æ ʌ ɶ ä",                      # open vowels
    "E": "e ɛ ə ɜ ɘ ɤ ɐ ε",                  # mid vowels
    "ih": "i ɪ ɨ ᵻ ɯ j",                     # close front/unrounded vowels
    "oh": "o ɔ ɒ ɵ ø œ ɞ",                    # mid rounded vowels
    "ou": "u ʊ ʉ y ʏ w ʍ ɥ",                  # close rounded vowels and w
}
for _vis, _symbols in _GROUPS.items():
    for _s in _symbols.split():
        IPA_TO_VISEME[_s] = _vis
IPA_TO_VISEME[" "] = "sil"

#: multi-symbol entries (TTS engines that group diphthongs), with each part's share of time
DIPHTHONGS: dict[str, tuple[tuple[str, float], ...]] = {
    "aɪ": (("aa", 0.6), ("ih", 0.4)), "aʊ": (("aa", 0.6), ("ou", 0.4)),
    "eɪ": (("E", 0.6), ("ih", 0.4)), "oʊ": (("oh", 0.6), ("ou", 0.4)),
    "əʊ": (("E", 0.5), ("ou", 0.5)), "ɔɪ": (("oh", 0.6), ("ih", 0.4)),
    "ɪə": (("ih", 0.5), ("E", 0.5)), "eə": (("E", 1.0),), "ɛə": (("E", 1.0),),
    "ʊə": (("ou", 0.5), ("E", 0.5)), "ju": (("ih", 0.3), ("ou", 0.7)),
}

STRESS = {"ˈ": 1.0, "ˌ": 0.5}
#: symbols that lengthen or colour the previous sound rather than being one
MODIFIERS = set("ːˑʰʲʷˤ˞↓↑ⁿˡ0123456789")

VOICELESS = set("p t k f θ s ʃ h x ç ɸ q ʈ c χ ħ ɕ ʂ ʍ ʔ ɬ ʜ ʡ".split()) | {"tʃ", "ts", "ʧ", "ʦ", "tɕ"}
VOWELS = set("a ɑ æ ʌ ɶ ä e ɛ ə ɜ ɘ ɤ ɐ ε i ɪ ɨ ᵻ ɯ o ɔ ɒ ɵ ø œ ɞ u ʊ ʉ y ʏ ɚ ɝ".split())
#: oral and glottal stops: their closure is silent, so before a pause the TTS's alignment
#: gives them time in which nothing is heard (``coeffs_visemes`` ends them with the sound)
STOPS = set("p b t d k ɡ g q ɢ c ɟ ʈ ɖ ʔ".split())

#: Cohen–Massaro dominance (how strongly a segment imposes its shape on its neighbours):
#: lip closures and lip-teeth contacts must be seen, so they dominate; reduced vowels,
#: /h/ and the glottal stop borrow their neighbours' shape.
DOMINANCE: dict[str, float] = {
    "sil": 1.2, "PP": 3.0, "FF": 2.2, "TH": 1.3, "DD": 0.8, "kk": 0.6, "CH": 1.6, "SS": 1.2,
    "nn": 0.7, "RR": 1.0, "aa": 1.0, "E": 1.0, "ih": 1.0, "oh": 1.1, "ou": 1.3,
}
DOMINANCE_BY_IPA: dict[str, float] = {" ": 0.25, "h": 0.3, "ɦ": 0.3, "ʔ": 0.3, "ə": 0.55, "ɐ": 0.6,
                                      "ᵻ": 0.55, "ɾ": 0.5, "j": 0.6}
#: how far (seconds, 1/e) a viseme reaches ahead of (anticipation) and after (carry-over) its
#: segment. Lip rounding is anticipated far ahead in real speech; closures are local.
REACH_AHEAD: dict[str, float] = {v: 0.05 for v in VISEMES} | {"ou": 0.09, "oh": 0.08, "CH": 0.08,
                                                             "RR": 0.07, "PP": 0.03, "FF": 0.03,
                                                             "sil": 0.04}
REACH_AFTER: dict[str, float] = {v: 0.04 for v in VISEMES} | {"ou": 0.06, "oh": 0.05,
                                                             "PP": 0.03, "FF": 0.03, "sil": 0.04}
#: visemes whose core is widened to a full frame period so no frame rate can skip them
MUST_SHOW = {"PP", "FF"}

#: target blendshape pose per viseme (ARKit names, 0..1). ``sil`` is the closed, relaxed
#: mouth. Smiles stay small: spreading, not smiling.
POSES: dict[str, dict[str, float]] = {
    "sil": {},
    "PP": {"jawOpen": 0.04, "mouthClose": 0.6, "mouthPressLeft": 0.45, "mouthPressRight": 0.45,
           "mouthRollLower": 0.25, "mouthRollUpper": 0.15},
    "FF": {"jawOpen": 0.08, "mouthRollLower": 0.55, "mouthUpperUpLeft": 0.25, "mouthUpperUpRight": 0.25,
           "mouthPressLeft": 0.1, "mouthPressRight": 0.1, "mouthFunnel": 0.05},
    "TH": {"jawOpen": 0.15, "tongueOut": 0.15, "mouthUpperUpLeft": 0.1, "mouthUpperUpRight": 0.1,
           "mouthLowerDownLeft": 0.1, "mouthLowerDownRight": 0.1},
    "DD": {"jawOpen": 0.18, "mouthLowerDownLeft": 0.1, "mouthLowerDownRight": 0.1,
           "mouthUpperUpLeft": 0.05, "mouthUpperUpRight": 0.05,
           "mouthStretchLeft": 0.1, "mouthStretchRight": 0.1},
    "kk": {"jawOpen": 0.22, "mouthStretchLeft": 0.12, "mouthStretchRight": 0.12,
           "mouthLowerDownLeft": 0.1, "mouthLowerDownRight": 0.1},
    "CH": {"jawOpen": 0.12, "mouthFunnel": 0.45, "mouthPucker": 0.25, "mouthUpperUpLeft": 0.2,
           "mouthUpperUpRight": 0.2, "mouthLowerDownLeft": 0.2, "mouthLowerDownRight": 0.2},
    "SS": {"jawOpen": 0.07, "mouthStretchLeft": 0.3, "mouthStretchRight": 0.3, "mouthSmileLeft": 0.1,
           "mouthSmileRight": 0.1, "mouthUpperUpLeft": 0.1, "mouthUpperUpRight": 0.1,
           "mouthLowerDownLeft": 0.1, "mouthLowerDownRight": 0.1},
    "nn": {"jawOpen": 0.15, "mouthStretchLeft": 0.08, "mouthStretchRight": 0.08,
           "mouthLowerDownLeft": 0.08, "mouthLowerDownRight": 0.08,
           "mouthUpperUpLeft": 0.05, "mouthUpperUpRight": 0.05},
    "RR": {"jawOpen": 0.15, "mouthFunnel": 0.25, "mouthPucker": 0.3},
    "aa": {"jawOpen": 0.65, "mouthLowerDownLeft": 0.35, "mouthLowerDownRight": 0.35,
           "mouthUpperUpLeft": 0.15, "mouthUpperUpRight": 0.15,
           "mouthStretchLeft": 0.1, "mouthStretchRight": 0.1, "mouthFunnel": 0.05},
    "E": {"jawOpen": 0.4, "mouthStretchLeft": 0.3, "mouthStretchRight": 0.3, "mouthSmileLeft": 0.12,
          "mouthSmileRight": 0.12, "mouthLowerDownLeft": 0.25, "mouthLowerDownRight": 0.25,
          "mouthUpperUpLeft": 0.15, "mouthUpperUpRight": 0.15},
    "ih": {"jawOpen": 0.25, "mouthStretchLeft": 0.35, "mouthStretchRight": 0.35, "mouthSmileLeft": 0.15,
           "mouthSmileRight": 0.15, "mouthLowerDownLeft": 0.15, "mouthLowerDownRight": 0.15,
           "mouthUpperUpLeft": 0.12, "mouthUpperUpRight": 0.12},
    "oh": {"jawOpen": 0.45, "mouthFunnel": 0.55, "mouthPucker": 0.2,
           "mouthLowerDownLeft": 0.2, "mouthLowerDownRight": 0.2},
    "ou": {"jawOpen": 0.18, "mouthPucker": 0.7, "mouthFunnel": 0.35},
}

_BS = {n: i for i, n in enumerate(BLENDSHAPES)}
#: (15, 52) matrix: viseme weights @ POSE_MATRIX = blendshapes
POSE_MATRIX: np.ndarray = np.zeros((len(VISEMES), len(BLENDSHAPES)), np.float32)
for _v, _pose in POSES.items():
    for _name, _val in _pose.items():
        POSE_MATRIX[VISEME_INDEX[_v], _BS[_name]] = _val

#: blendshapes that open the mouth: scaled by the audio envelope (closures are not, a
#: bilabial closure is silent yet must be seen)
OPENING: tuple[str, ...] = ("jawOpen", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
                            "mouthUpperUpRight", "mouthStretchLeft", "mouthStretchRight", "mouthFunnel",
                            "tongueOut")
OPENING_MASK: np.ndarray = np.zeros(len(BLENDSHAPES), bool)
OPENING_MASK[[_BS[n] for n in OPENING]] = True


@dataclass(frozen=True)
class Sound:
    """One viseme-bearing part of a phoneme token."""

    viseme: int
    share: float          # fraction of the token's duration
    dominance: float
    voiced: bool
    vowel: bool
    stop: bool = False    # an oral or glottal stop (:data:`STOPS`)
    pause: bool = False   # silence that is a pause (punctuation, Piper's ^ $ _), not a word gap


def _strip(s: str) -> tuple[str, float, bool]:
    """Remove stress, length marks and diacritics; return (core, stress, had_modifier)."""
    stress = 0.0
    core = []
    modified = False
    for ch in unicodedata.normalize("NFC", s):
        if ch in STRESS:
            stress = max(stress, STRESS[ch])
        elif ch in MODIFIERS or unicodedata.combining(ch):
            modified = True
        else:
            core.append(ch)
    return "".join(core), stress, modified


def _sound(symbol: str, viseme: str, share: float) -> Sound:
    dom = DOMINANCE_BY_IPA.get(symbol, DOMINANCE[viseme])
    return Sound(VISEME_INDEX[viseme], share, dom, symbol not in VOICELESS and viseme != "sil",
                 symbol in VOWELS, symbol in STOPS, viseme == "sil" and not symbol.isspace())


@lru_cache(maxsize=4096)
def parse(token: str) -> tuple[str, float, tuple[Sound, ...]]:
    """Classify one phoneme token.

    Returns ``(kind, stress, sounds)`` with kind ``"sound"`` (``sounds`` non-empty),
    ``"stress"`` (only stress marks: give the time to the next token) or ``"modifier"``
    (length marks/diacritics alone: extend the previous token).
    """
    if token in IPA_TO_VISEME:  # fast path, also catches " " before stripping
        return "sound", 0.0, (_sound(token, IPA_TO_VISEME[token], 1.0),)
    core, stress, _ = _strip(token)
    if not core:
        return ("stress" if stress else "modifier"), stress, ()
    if core in DIPHTHONGS:
        return "sound", stress, tuple(_sound(core[0] if i == 0 else core[-1], v, w)
                                      for i, (v, w) in enumerate(DIPHTHONGS[core]))
    if core in IPA_TO_VISEME:
        return "sound", stress, (_sound(core, IPA_TO_VISEME[core], 1.0),)
    if core.isspace():
        return "sound", stress, (_sound(" ", "sil", 1.0),)
    # greedy longest match over known symbols, unknown ones → the default viseme
    parts: list[tuple[str, str]] = []
    i = 0
    while i < len(core):
        for n in (3, 2, 1):
            piece = core[i:i + n]
            if len(piece) == n and (piece in IPA_TO_VISEME or (n > 1 and piece in DIPHTHONGS)):
                if piece in DIPHTHONGS:
                    parts.extend((piece, v) for v, _ in DIPHTHONGS[piece])
                else:
                    parts.append((piece, IPA_TO_VISEME[piece]))
                i += n
                break
        else:
            ch = core[i]
            parts.append((ch, "sil" if (ch.isspace() or unicodedata.category(ch).startswith("P"))
                          else DEFAULT_VISEME))
            i += 1
    share = 1.0 / len(parts)
    return "sound", stress, tuple(_sound(sym, vis, share) for sym, vis in parts)


def viseme_of(token: str) -> str:
    """The (first) viseme of a phoneme token; ``sil`` for marks alone. For docs and tests."""
    kind, _, sounds = parse(token)
    return VISEMES[sounds[0].viseme] if sounds else "sil"


def table_markdown() -> str:
    """The IPA → viseme table as Markdown, with each viseme's pose (for the README)."""
    rows = ["| viseme | IPA | pose (ARKit blendshapes) |", "|---|---|---|"]
    for vis in VISEMES:
        syms = " ".join(f"`{s}`" if s != " " else "`␣`" for s, v in IPA_TO_VISEME.items() if v == vis)
        syms = syms.replace("|", "\\|")  # a bare pipe would split the Markdown cell
        pose = ", ".join(f"{k} {val:g}" for k, val in POSES[vis].items()) or "closed, relaxed"
        rows.append(f"| `{vis}` | {syms} | {pose} |")
    rows.append("")
    rows.append("Diphthongs: " + ", ".join(
        f"`{d}` → " + "+".join(f"{v} ({w:.0%})" for v, w in parts) for d, parts in DIPHTHONGS.items()))
    rows.append(f"Unknown symbols → `{DEFAULT_VISEME}`; stress marks `ˈ ˌ` mark the next vowel; "
                "length marks and diacritics extend the previous sound.")
    return "\n".join(rows)
