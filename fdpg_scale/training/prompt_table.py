"""A prompt dataset read with the ``datasets`` library: what ``target.prompts`` names, as a table of columns.

``target.prompts`` is, checked in this order:

- a file: ``.json`` / ``.jsonl`` (JSON Lines or a JSON list of objects), ``.csv`` or ``.parquet``; it holds one
  split, ``train``;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a directory of such data
  files (``datasets`` names the splits from the file names: ``train.parquet``, ``data/test-*.jsonl``);
- a Hub dataset id (``owner/name``) already in the local Hugging Face cache: its cached snapshot is read as a
  directory of data files (``fdpg_scale.models.hub``); nothing is downloaded.

Whatever the source, ``target.split`` picks the split. Every error is one ConfigError naming the key and the
source (and the split, when it is the split that is wrong). The ``datasets`` library caches what it parses
under ``HF_DATASETS_CACHE``; its progress bars are off while a table is read (the run log says what was read).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fdpg_scale.errors import ConfigError
from fdpg_scale.models.hub import looks_like_hub_id, resolve_hub_snapshot

__all__ = ["read_table", "FILE_TYPES"]

#: File suffix -> the ``datasets`` builder that reads it.
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What Dataset.save_to_disk / DatasetDict.save_to_disk write beside the arrow files.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def read_table(source: str, split: str, *, where: str = "target.prompts") -> dict[str, list]:
    """column name -> the values of every row (in order) of split ``split`` of ``source`` (module docstring).

    where: the config key, for errors. Raises a one-line ConfigError when the source does not exist, is of an
    unknown type, does not parse, has no split ``split`` or has no rows.
    """
    import datasets

    path = Path(source)
    label = f"{where} {source!r}"
    with _quiet(datasets):
        if path.is_file():
            builder = FILE_TYPES.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(f"{label}: unknown file type {path.suffix!r} (expected "
                                  f"{', '.join(FILE_TYPES)}, a dataset directory or a Hub dataset id)")
            table = _load(lambda: datasets.load_dataset(builder, data_files={"train": str(path)}), label)
        elif path.is_dir() and any((path / m).is_file() for m in _SAVED_MARKERS):
            table = _load(lambda: datasets.load_from_disk(str(path)), label)
        elif path.is_dir():
            table = _load(lambda: datasets.load_dataset(str(path)), label)
        elif looks_like_hub_id(source):
            local = resolve_hub_snapshot(source, repo_type="dataset", where=where)
            table = _load(lambda: datasets.load_dataset(str(local)), label)
        else:
            raise ConfigError(f"{label}: no such file or directory, and not a Hub dataset id (owner/name)")
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ConfigError(f"{label} has no split {split!r} (target.split; its splits: {', '.join(table)})")
        table = table[split]
    elif split != "train":  # a saved Dataset (not a DatasetDict) is one split, as a single file is
        raise ConfigError(f"{label} holds one split, 'train'; target.split is {split!r}")
    if len(table) == 0:
        raise ConfigError(f"{label} split {split!r} holds no rows")
    return table.to_dict()


def _load(read, label: str):
    import datasets

    try:
        return read()
    except (ValueError, OSError, datasets.exceptions.DatasetsError) as err:
        # DatasetGenerationError wraps the parser's own error (a bad CSV row, a JSON syntax error): show that.
        cause = err.__cause__ if isinstance(err, datasets.exceptions.DatasetGenerationError) and err.__cause__ \
            else err
        text = " ".join(str(cause).split())[:300] or type(cause).__name__
        raise ConfigError(f"{label}: cannot be read as a dataset ({type(cause).__name__}: {text})") from None


@contextlib.contextmanager
def _quiet(datasets):
    """No progress bars or logs from ``datasets`` while a table is read (they would go to every rank's stderr);
    the previous settings are restored after. Its parsers log their ERROR before raising: that error is what
    ``_load``'s one line reports, so it is not said twice."""
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
