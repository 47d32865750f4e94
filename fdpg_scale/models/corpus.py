"""The pretraining corpus: the Python standard library's own ``.py`` files, split by document.

Every machine that runs fdpg-scale has a Python standard library, so it is the one corpus that needs no
download. ``collect_documents(root)`` walks ``root`` (default: ``sysconfig.get_paths()["stdlib"]``),
keeps the ``.py`` files that decode as UTF-8 and hold some non-blank text, and returns them sorted by their
path relative to ``root``. Skipped, with the reason:

- ``site-packages`` / ``dist-packages``: third-party code that differs from machine to machine;
- ``test``, ``tests``: the test suites are a third of the library and highly repetitive (long tables of
  asserts); they would dominate the corpus;
- ``idlelib``, ``turtledemo``, ``tkinter``: GUI code, often not installed (Debian splits them off), so
  keeping them would make the corpus depend on the distribution's packaging;
- ``lib2to3``: deprecated, and mostly fixers written in a grammar-pattern mini-language;
- ``encodings``, ``pydoc_data``: generated data (character maps, one giant help-text string), not code;
- ``ensurepip``, ``lib-dynload``, ``config-*``, ``__pycache__``, ``_sysconfigdata_*.py``: bundled wheels,
  compiled extensions, build configuration and build-machine paths (the latter differ between installs).

The same rules apply to a ``--corpus`` directory (on its relative paths). The train / held-out split is
by document, decided by a hash of the relative path, so it does not depend on which other files exist: a
file is held out when the first 8 bytes of ``sha256(path)``, read as a fraction of 2**64, fall below
``heldout_fraction``. ``corpus_hash`` digests paths and texts so that a cached model built on another
standard library (another Python version) is recognised as stale.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "stdlib_dir", "collect_documents", "split_documents", "corpus_hash", "EXCLUDED_DIRS"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "tkinter",
                           "lib2to3", "encodings", "pydoc_data", "ensurepip", "lib-dynload", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One source file: ``path`` relative to the corpus root (POSIX separators) and its decoded text."""

    path: str
    text: str


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
        return True
    return rel.name.startswith("_sysconfigdata")


def collect_documents(root: str | Path | None = None) -> list[Document]:
    """The readable ``.py`` documents under ``root`` (default: the stdlib), sorted by relative path.

    Files that are not valid UTF-8, cannot be read, or hold only whitespace are skipped. Raises
    ``ValueError`` naming ``root`` when it is not a directory or holds no readable ``.py`` text.
    """
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"corpus directory {str(root)!r} does not exist or is not a directory")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _excluded(rel) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise ValueError(f"corpus directory {str(root)!r} holds no readable UTF-8 .py text "
                         f"(after excluding {sorted(EXCLUDED_DIRS)})")
    return docs


def _path_fraction(path: str) -> float:
    """A deterministic pseudo-uniform number in [0, 1) for a relative path."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, held-out) by a hash of each path; order within each part is kept.

    A corpus so small that the hash rule leaves one side empty still gets one held-out document (the one
    with the smallest hash) and at least one training document; fewer than 2 documents is an error.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError(f"the corpus needs at least 2 readable .py documents to hold one out, got {len(docs)}")
    frac = {d.path: _path_fraction(d.path) for d in docs}
    held = {d.path for d in docs if frac[d.path] < heldout_fraction}
    if not held:
        held = {min(frac, key=frac.get)}
    if len(held) == len(docs):
        held.discard(max(held, key=frac.get))
    return [d for d in docs if d.path not in held], [d for d in docs if d.path in held]


def corpus_hash(docs: list[Document]) -> str:
    """sha256 hex digest over the (path, text) pairs in order: changes when any file or its name changes."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.path, d.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()
