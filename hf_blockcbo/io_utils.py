"""Atomic writes (outputs appear complete under their final name or not at all) and the names of inputs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BlockCBOError


def _check_parent_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BlockCBOError(f"cannot create the folder {str(parent)!r} for {str(path)!r}: {err.strerror}") from err
    if not os.access(parent, os.W_OK):
        raise BlockCBOError(f"the folder {str(parent)!r} is not writable; choose another output path")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    _check_parent_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; an output gets the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty folder unless ``overwrite``; return the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BlockCBOError(f"the output {str(path)!r} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BlockCBOError(f"the output folder {str(path)!r} exists and is not empty; pass --overwrite to replace it")
    _check_parent_writable(path)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (which must be empty or ``overwrite``)."""
    path = check_output_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a folder, or an existing file unless ``overwrite``; the parent must be writable. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise BlockCBOError(f"the output {str(path)!r} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise BlockCBOError(f"the output {str(path)!r} exists; pass --overwrite to replace it")
    _check_parent_writable(path)
    return path


def split_sources(text: str | None) -> list[str]:
    """The data sources one setting names, separated by commas (``"a.txt, b.txt"``); none for an empty setting."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def check_not_an_input(output: str | os.PathLike, inputs: list[str | os.PathLike | None]) -> None:
    """An output may never be, contain, or sit inside an input (a model folder, a data file, an artifact); a data
    setting that names several sources (separated by commas) is checked source by source."""
    out = Path(output).resolve()
    named = []
    for given in inputs:
        named += split_sources(given) if isinstance(given, str) and "," in given else [given]
    for given in named:
        if not given:
            continue
        source = Path(given)
        if not source.exists():
            continue
        source = source.resolve()
        if out == source or out in source.parents or source in out.parents:
            raise BlockCBOError(
                f"the output {str(output)!r} would overwrite or sit inside the input {str(given)!r}; "
                "choose an output path outside every input"
            )
