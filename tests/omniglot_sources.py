"""Small Omniglot sources cut from the real archives, for tests that need real images fast."""

from __future__ import annotations

import zipfile
from pathlib import Path

from workflows import download

OFFICIAL_ALPHABETS: dict[str, dict[str, int]] = {
    "images_background": {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46, "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14,
        "Braille": 26, "Burmese_(Myanmar)": 34, "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
        "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
        "Malay_(Jawi_-_Arabic)": 40, "Mkhedruli_(Georgian)": 41, "N_Ko": 33,
        "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42, "Syriac_(Estrangelo)": 23, "Tagalog": 17,
        "Tifinagh": 55},
    "images_evaluation": {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
        "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40,
        "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Syriac_(Serto)": 23, "Sylheti": 28,
        "Tengwar": 25, "Tibetan": 42, "ULOG": 26},
}
"""Characters per alphabet in the official archives (Lake et al.'s omniglot repository; 20 drawers
each): the tests' own ground truth, independent of the project's code and of where the archives came from."""


def make_source(omniglot_dir: Path, dest: Path, alphabets: set[str] | None = None,
                replace: dict[str, bytes] | None = None, drop: set[str] = frozenset()) -> Path:
    """A copy of (part of) the real archives, optionally with replaced or dropped entries."""
    dest.mkdir(parents=True, exist_ok=True)
    replace = replace or {}
    for name in download.ARCHIVE_FILES:
        with zipfile.ZipFile(omniglot_dir / name) as src, \
                zipfile.ZipFile(dest / name, "w", zipfile.ZIP_STORED) as out:
            for info in src.infolist():
                parts = info.filename.split("/")
                if alphabets is not None and len(parts) > 1 and parts[1] and parts[1] not in alphabets:
                    continue
                if info.filename in drop:
                    continue
                out.writestr(info, replace.get(info.filename, src.read(info)))
    return dest
