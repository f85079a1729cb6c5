"""What the image and audio sources share: the stimulus record and the folder walk.

A *stimulus* is one input item: one image, or one window of an audio file. Sources
find their files with :func:`discover_files` (a recursive walk in natural order that
skips hidden files) or take an explicit order from :func:`read_stimulus_list`, and
describe each item with a :class:`Stimulus` record.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

from featx._files import sha256_file as file_sha256

__all__ = [
    "BadFile",
    "DecodeError",
    "FileSource",
    "Stimulus",
    "StimulusListError",
    "discover_files",
    "file_sha256",
    "make_stimuli",
    "make_stimulus",
    "natural_key",
    "read_stimulus_list",
    "relative_id",
]

logger = logging.getLogger(__name__)

# Folders that tools leave behind and that never hold stimuli.
_SKIPPED_FOLDERS = frozenset({"__MACOSX"})
_NUMBER = re.compile(r"([0-9]+)")


@dataclass(frozen=True)
class Stimulus:
    """One input item, as recorded in a store row.

    Attributes:
        id: The relative path with ``/`` separators (or the id given by a stimulus
            list).
        path: Absolute path of the source file.
        size_bytes: Size of the source file.
        sha256: Hex digest of the source file.
        onset: Audio only: window onset in seconds within the source file.
    """

    id: str
    path: str
    size_bytes: int
    sha256: str
    onset: float = 0.0


class BadFile(NamedTuple):
    """A file that a source cannot use, and why (from ``source.check()``)."""

    path: str
    reason: str


class DecodeError(OSError):
    """A stimulus file cannot be decoded; ``reason`` says why in plain words."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.path!r}: {reason}")


class StimulusListError(ValueError):
    """A stimulus list names missing files, repeats ids or has malformed lines.

    ``problems`` holds every problem found, one readable line each.
    """

    def __init__(self, list_path: str | os.PathLike, problems: list[str]):
        self.list_path = str(list_path)
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(
            f"stimulus list {self.list_path!r} has {len(self.problems)} "
            f"problem(s):\n{lines}"
        )


# --- ordering -------------------------------------------------------------------


def _component_key(name: str) -> tuple:
    # Digit runs compare as integers, text case-insensitively (NFC-normalised, so a
    # macOS NFD name sorts like its NFC spelling). Each chunk is tagged so that a
    # number is never compared with text: numbers sort before letters, as in ASCII.
    name = unicodedata.normalize("NFC", name)
    chunks = []
    for i, part in enumerate(_NUMBER.split(name)):
        if i % 2:
            chunks.append((0, int(part), ""))
        elif part:
            chunks.append((1, 0, part.casefold()))
    return tuple(chunks)


def natural_key(s: str | os.PathLike) -> tuple:
    """Sort key for paths in natural order.

    The path is compared component by component (``/`` or the platform's
    separator); within a component, digit runs compare as integers (``img2`` before
    ``img10``) and text compares case-insensitively. Names that are equal under
    those rules (``a.png`` and ``A.png``, ``img2`` and ``img02``) fall back to the
    exact string, so the order is total and the same on every filesystem.
    """
    text = os.fspath(s)
    posix = text.replace(os.sep, "/") if os.sep != "/" else text
    parts = [p for p in posix.split("/") if p]
    return tuple(_component_key(p) for p in parts), tuple(
        unicodedata.normalize("NFC", p) for p in parts
    ), posix


# --- discovery ------------------------------------------------------------------


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    if isinstance(extensions, str):
        raise TypeError(
            f"extensions must be a set of strings such as {{'jpg', 'png'}}, "
            f"not the string {extensions!r}"
        )
    return frozenset(e.lower().lstrip(".") for e in extensions)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def discover_files(root: str | os.PathLike, extensions: Iterable[str]) -> list[Path]:
    """Find the stimulus files under ``root``, recursively, in natural order.

    Hidden files and folders (names starting with ``.``: ``.DS_Store``, AppleDouble
    ``._photo.jpg`` files, ``.git/``), ``__MACOSX/`` folders and files whose
    extension is not in ``extensions`` (compared case-insensitively, with or
    without the dot) are skipped; each is logged at DEBUG level. Symbolic links to
    files and folders are followed, except a link back to a folder above it.

    Args:
        root: The folder to walk.
        extensions: Accepted extensions, e.g. ``{"jpg", "png"}``.

    Returns:
        Absolute paths, sorted by :func:`natural_key` of the path relative to
        ``root``. An empty list if nothing matched.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file, not a folder.
    """
    exts = _normalise_extensions(extensions)
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"stimulus folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"stimulus folder {str(root)!r} is a file, not a folder; pass the "
            f"folder that holds the stimuli, or a stimulus list (--stimuli)"
        )

    found: list[tuple[str, Path]] = []
    _walk(root, root, exts, frozenset({_inode(root)}), found)
    found.sort(key=lambda item: natural_key(item[0]))
    return [path for _, path in found]


def _inode(path: str | os.PathLike) -> tuple[int, int]:
    # os.stat, not DirEntry.stat: the latter has no inode numbers on Windows.
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(
    folder: Path,
    root: Path,
    exts: frozenset[str],
    ancestors: frozenset[tuple[int, int]],
    found: list[tuple[str, Path]],
) -> None:
    # Depth-first walk that follows links; ``ancestors`` (device, inode) pairs stop
    # a link that points back up the tree from looping forever.
    with os.scandir(folder) as it:
        entries = list(it)
    for entry in entries:
        path = folder / entry.name
        if _is_hidden(entry.name):
            logger.debug("skipping hidden %s", path)
        elif entry.is_dir():
            if entry.name in _SKIPPED_FOLDERS:
                logger.debug("skipping folder %s", path)
                continue
            inode = _inode(path)
            if inode in ancestors:
                logger.debug("skipping %s: links back to a folder above it", path)
                continue
            _walk(path, root, exts, ancestors | {inode}, found)
        elif entry.is_symlink() and not path.exists():
            if path.suffix.lower().lstrip(".") in exts:
                logger.warning("skipping %s: broken symbolic link (to %s)", path, os.readlink(path))
            else:
                logger.debug("skipping %s: broken symbolic link", path)
        elif not entry.is_file():  # socket, fifo ...
            logger.debug("skipping %s: not a regular file", path)
        elif path.suffix.lower().lstrip(".") not in exts:
            logger.debug("skipping %s: extension not in %s", path, sorted(exts))
        else:
            found.append((path.relative_to(root).as_posix(), path))


def relative_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The stimulus id of ``path``: its path relative to ``root``, with ``/``."""
    return Path(path).absolute().relative_to(Path(root).absolute()).as_posix()


# --- stimulus lists -------------------------------------------------------------


def _meaningful_lines(path: Path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append((number, stripped))
    return lines


def _csv_header(line: str) -> list[str] | None:
    fields = [f.strip().lower() for f in next(csv.reader([line]))]
    return fields if {"id", "path"} <= set(fields) else None


def read_stimulus_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[tuple[str, Path]]:
    """Read an explicit stimulus order (and ids) from a list file.

    Two formats are accepted (UTF-8; blank lines and lines starting with ``#`` are
    skipped in both):

    * plain text: one path per line (surrounding spaces ignored); the id is the
      path as written;
    * CSV whose first line is a header with columns ``id`` and ``path`` (other
      columns are ignored).

    Relative paths are taken relative to ``root`` if given, else to the folder
    that holds the list file.

    Returns:
        ``(id, absolute path)`` pairs in the list's order.

    Raises:
        FileNotFoundError: The list file itself does not exist.
        StimulusListError: Listed files are missing or not files, ids repeat, or
            lines are malformed; the message lists every problem at once.
    """
    list_path = Path(path).expanduser()
    if not list_path.is_file():
        raise FileNotFoundError(f"stimulus list {str(list_path)!r} does not exist")
    base = Path(root).expanduser() if root is not None else list_path.parent
    base = base.absolute()

    lines = _meaningful_lines(list_path)
    problems: list[str] = []
    rows: list[tuple[int, str, str]] = []  # (line number, id, path as written)
    header = _csv_header(lines[0][1]) if lines else None
    if header is not None:
        id_col, path_col = header.index("id"), header.index("path")
        for number, line in lines[1:]:
            fields = next(csv.reader([line]))
            if len(fields) <= max(id_col, path_col):
                problems.append(
                    f"line {number}: expected columns {header}, got {line!r}"
                )
                continue
            sid, spath = fields[id_col].strip(), fields[path_col].strip()
            if not sid or not spath:
                problems.append(f"line {number}: empty id or path in {line!r}")
                continue
            rows.append((number, sid, spath))
    elif list_path.suffix.lower() == ".csv":
        raise StimulusListError(
            list_path,
            ["a .csv stimulus list needs a first line 'id,path' (or write one "
             "path per line in a .txt file)"],
        )
    else:
        rows = [(number, line, line) for number, line in lines]

    first_line: dict[str, int] = {}
    result: list[tuple[str, Path]] = []
    for number, sid, spath in rows:
        if sid in first_line:
            problems.append(
                f"line {number}: duplicate id {sid!r} (first on line "
                f"{first_line[sid]})"
            )
        else:
            first_line[sid] = number
        file = Path(spath).expanduser()
        file = file if file.is_absolute() else base / file
        if not file.exists():
            problems.append(f"line {number}: file {str(file)!r} does not exist")
        elif not file.is_file():
            problems.append(f"line {number}: {str(file)!r} is not a file")
        result.append((sid, file))

    if problems:
        raise StimulusListError(list_path, problems)
    return result


# --- records --------------------------------------------------------------------


def make_stimulus(
    id: str, path: str | os.PathLike, onset: float = 0.0, sha256: str | None = None
) -> Stimulus:
    """Build the :class:`Stimulus` record of one file (hashing it unless given)."""
    path = Path(path).absolute()
    return Stimulus(
        id=id,
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256=sha256 if sha256 is not None else file_sha256(path),
        onset=float(onset),
    )


def make_stimuli(
    files: Iterable[str | os.PathLike] | None = None,
    *,
    root: str | os.PathLike | None = None,
    extensions: Iterable[str] = (),
    stimuli_list: str | os.PathLike | None = None,
) -> list[Stimulus]:
    """Stimulus records for a folder, an explicit file sequence or a list file.

    Exactly one route is used: ``stimuli_list`` (ids and order from the list,
    relative paths resolved against ``root`` when given), else ``root`` (walked
    with :func:`discover_files`; ids relative to it), else ``files`` (ids are the
    file names relative to their common folder).
    """
    if stimuli_list is not None:
        pairs = read_stimulus_list(stimuli_list, root)
    elif root is not None:
        root = Path(root).expanduser().absolute()
        pairs = [(relative_id(p, root), p) for p in discover_files(root, extensions)]
    else:
        paths = [Path(f).expanduser().absolute() for f in files or ()]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"stimulus files do not exist: {missing}")
        common = Path(os.path.commonpath([p.parent for p in paths])) if paths else None
        pairs = [(relative_id(p, common), p) for p in paths]

    hashes: dict[Path, str] = {}
    stimuli = []
    for sid, path in pairs:
        if path not in hashes:
            hashes[path] = file_sha256(path)
        stimuli.append(make_stimulus(sid, path, sha256=hashes[path]))
    return stimuli


def _paths_of(items: Iterable) -> set[str]:
    # Accept BadFile records, str or Path; compare absolute, normalised paths.
    out = set()
    for item in items:
        p = item.path if isinstance(item, BadFile) else item
        out.add(os.path.normpath(os.path.abspath(os.fspath(p))))
    return out


class FileSource:
    """Shared behaviour of the file-backed sources: stimuli, drop and columns.

    Subclasses set ``self.stimuli`` (a list of :class:`Stimulus`) and implement
    ``check()``, ``load(i)`` and ``settings()``; they may extend ``columns()`` and
    ``_on_drop()``.
    """

    stimuli: list[Stimulus]

    def __len__(self) -> int:
        return len(self.stimuli)

    def drop(self, paths: Iterable) -> list[Stimulus]:
        """Remove every stimulus whose file is in ``paths`` (e.g. from ``check()``).

        ``paths`` may hold :class:`BadFile` records, strings or paths. Returns the
        removed stimuli.
        """
        gone = _paths_of(paths)
        kept, dropped = [], []
        for s in self.stimuli:
            (dropped if os.path.normpath(s.path) in gone else kept).append(s)
        self.stimuli = kept
        self._on_drop(dropped)
        return dropped

    def _on_drop(self, dropped: list[Stimulus]) -> None:
        """Hook for subclasses that keep per-stimulus state."""

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row metadata for the store: source path, file hash and size.

        Strings are object arrays of ``str`` (``h5py.string_dtype()`` writes them).
        """
        return {
            "stimulus_path": np.array([s.path for s in self.stimuli], dtype=object),
            "stimulus_sha256": np.array([s.sha256 for s in self.stimuli], dtype=object),
            "stimulus_bytes": np.array(
                [s.size_bytes for s in self.stimuli], dtype=np.int64
            ),
        }
