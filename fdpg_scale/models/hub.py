"""Hugging Face Hub ids read from the local cache: ``model.path: Qwen/Qwen3-1.7B`` once it has been downloaded.

A run never downloads: the engines of every rank, the scorers and the prompts are read from disk, and a
download racing on N ranks (or blocked on a compute node without internet) is a failure mode, not a feature.
An id is resolved with ``huggingface_hub.snapshot_download(..., local_files_only=True)``: the snapshot folder
of the ``main`` revision under the cache directory (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), the same folder ``from_pretrained`` and ``hf download`` use. With no network
access attempted, ``HF_HUB_OFFLINE`` changes nothing here. An id that is not cached is one ConfigError naming
the id, the cache directory looked in, and the command that fills it.
"""

from __future__ import annotations

import re
from pathlib import Path

from fdpg_scale.errors import ConfigError

__all__ = ["looks_like_hub_id", "resolve_hub_snapshot", "hub_cache_dir", "local_dir"]

# owner/name as the Hub spells repository ids (no path separators beyond the one slash, no "..").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id, ``owner/name`` (a path that does not exist may)."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def hub_cache_dir() -> str:
    """The directory Hub snapshots are cached in (``huggingface_hub``'s resolution of the environment)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_hub_snapshot(repo_id: str, *, repo_type: str = "model", where: str) -> Path:
    """The local snapshot folder of Hub repository ``repo_id`` (``repo_type``: ``model`` or ``dataset``).

    where: the config key, for the one-line ConfigError when the id is not in the local cache.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
        raise ConfigError(f"{where} {repo_id!r} is not a local path, and the Hub {repo_type} {repo_id!r} is not in "
                          f"the local Hugging Face cache (looked in {hub_cache_dir()}); nothing is downloaded during "
                          f"a run: fetch it first with `hf download {repo_id}{flag}`") from None


def local_dir(path: str, *, where: str, repo_type: str = "model") -> Path:
    """Where ``path`` (a config value: a local directory or a Hub id) is on disk.

    ``path`` itself when it exists; else, when it has the form ``owner/name``, the cached snapshot of that Hub
    repository (``resolve_hub_snapshot``: a one-line ConfigError naming the id and the cache when it is not
    cached); else ``path`` unchanged, for the caller's own checks to name what is wrong with it.
    """
    if Path(path).exists() or not looks_like_hub_id(path):
        return Path(path)
    return resolve_hub_snapshot(path, repo_type=repo_type, where=where)
