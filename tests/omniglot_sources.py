"""Small Omniglot sources cut from the real archives, for tests that need real images fast."""

from __future__ import annotations

import zipfile
from pathlib import Path

from workflows import download


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
