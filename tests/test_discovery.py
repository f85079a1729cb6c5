"""The folder walk, natural order and stimulus lists shared by the image and audio sources."""

import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from featx.sources import (
    BadFile,
    Stimulus,
    StimulusListError,
    discover_files,
    file_sha256,
    make_stimuli,
    natural_key,
    read_stimulus_list,
)

EXTS = {"jpg", "png"}


def touch(root: Path, *names: str, data: bytes = b"x") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def rel(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


# --- natural order ----------------------------------------------------------------


def test_natural_key_compares_numbers_as_integers():
    names = ["img10.jpg", "img2.jpg", "img1.jpg", "img100.jpg", "img20.jpg"]
    assert sorted(names, key=natural_key) == [
        "img1.jpg", "img2.jpg", "img10.jpg", "img20.jpg", "img100.jpg"
    ]


def test_natural_key_ignores_case_with_a_deterministic_tie_break():
    names = ["b.jpg", "a.jpg", "B.jpg", "A.jpg", "img02.jpg", "img2.jpg"]
    once = sorted(names, key=natural_key)
    assert once[:2] == ["A.jpg", "a.jpg"] and once[2:4] == ["B.jpg", "b.jpg"]
    assert once[4:] == ["img02.jpg", "img2.jpg"]
    # The order is total: the input order never matters.
    assert sorted(reversed(names), key=natural_key) == once


def test_natural_key_compares_folders_component_by_component():
    names = ["a10/x.jpg", "a2/z.jpg", "a/img10.jpg", "a/img2.jpg", "a b.jpg", "a.b/c.jpg"]
    # "a/..." sorts as the folder "a", before any longer name that starts with "a";
    # a plain string sort would put "a b.jpg" and "a.b/" first ("/" is above both).
    assert sorted(names, key=natural_key) == [
        "a/img2.jpg", "a/img10.jpg", "a2/z.jpg", "a10/x.jpg", "a b.jpg", "a.b/c.jpg"
    ]


def test_natural_key_treats_unicode_spellings_alike():
    # macOS file systems hand back decomposed (NFD) names.
    nfc, nfd = "caf\u00e9.jpg", "cafe\u0301.jpg"
    assert natural_key(nfc)[0] == natural_key(nfd)[0]


# --- discover_files ---------------------------------------------------------------


def test_discover_files_natural_order_and_nesting(tmp_path):
    touch(tmp_path, "img10.jpg", "img2.jpg", "img1.png", "sub/img10.png", "sub/img2.png",
          "sub10/a.jpg", "sub2/a.jpg")
    found = discover_files(tmp_path, EXTS)
    assert rel(found, tmp_path) == [
        "img1.png", "img2.jpg", "img10.jpg", "sub/img2.png", "sub/img10.png",
        "sub2/a.jpg", "sub10/a.jpg",
    ]
    assert all(p.is_absolute() for p in found)
    # A plain string sort would differ: this is what the test is about.
    assert sorted(rel(found, tmp_path)) != rel(found, tmp_path)


def test_discover_files_skips_hidden_and_other_extensions(tmp_path, caplog):
    touch(tmp_path, "keep.jpg", "UPPER.JPG", "Mixed.Png", ".DS_Store", "._keep.jpg",
          ".git/objects/a.jpg", ".hidden/b.jpg", "__MACOSX/c.jpg", "notes.txt",
          "noext", "archive.jpg.bak", "sub/.d.png", "sub/e.png")
    with caplog.at_level(logging.DEBUG, logger="featx.sources.common"):
        found = discover_files(tmp_path, EXTS)
    assert rel(found, tmp_path) == ["keep.jpg", "Mixed.Png", "sub/e.png", "UPPER.JPG"]
    logged = caplog.text
    for skipped in (".DS_Store", "._keep.jpg", ".git", ".hidden", "__MACOSX", "notes.txt",
                    "noext", "archive.jpg.bak", ".d.png"):
        assert skipped in logged, skipped
    assert all(r.levelno == logging.DEBUG for r in caplog.records)


def test_discover_files_accepts_extensions_with_dots_and_any_case(tmp_path):
    touch(tmp_path, "a.jpg", "b.png")
    assert rel(discover_files(tmp_path, {".JPG"}), tmp_path) == ["a.jpg"]
    with pytest.raises(TypeError, match="set of strings"):
        discover_files(tmp_path, "jpg")


def test_discover_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_files(tmp_path / "nope", EXTS)
    touch(tmp_path, "a.jpg")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        discover_files(tmp_path / "a.jpg", EXTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    touch(empty, ".DS_Store", "readme.txt")
    assert discover_files(empty, EXTS) == []


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need privileges")
def test_discover_files_follows_links_without_looping(tmp_path):
    touch(tmp_path, "real/a.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path, tmp_path / "real" / "loop")  # a cycle
    assert rel(discover_files(tmp_path, EXTS), tmp_path) == ["link/a.jpg", "real/a.jpg"]


# --- stimulus lists ---------------------------------------------------------------


def test_plain_list_gives_order_and_ids(tmp_path):
    touch(tmp_path, "imgs/b.jpg", "imgs/a.jpg", "imgs/c.jpg")
    listing = tmp_path / "order.txt"
    listing.write_text("# my order\n\nimgs/c.jpg\n  imgs/a.jpg  \n# skipped\nimgs/b.jpg\n")
    pairs = read_stimulus_list(listing)
    assert [i for i, _ in pairs] == ["imgs/c.jpg", "imgs/a.jpg", "imgs/b.jpg"]
    assert [p for _, p in pairs] == [tmp_path / "imgs" / n for n in ("c.jpg", "a.jpg", "b.jpg")]


def test_list_paths_relative_to_root_and_absolute(tmp_path):
    touch(tmp_path, "data/x.jpg", "elsewhere/y.jpg")
    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text(f"x.jpg\n{tmp_path / 'elsewhere' / 'y.jpg'}\n")
    pairs = read_stimulus_list(listing, root=tmp_path / "data")
    assert pairs[0] == ("x.jpg", tmp_path / "data" / "x.jpg")
    assert pairs[1][1] == tmp_path / "elsewhere" / "y.jpg"


def test_csv_list_with_header(tmp_path):
    touch(tmp_path, "a.jpg", "b c.jpg")
    listing = tmp_path / "l.csv"
    listing.write_text("\ufeffpath,id,notes\nb c.jpg,second,x\n# comment\na.jpg,first,\n",
                       encoding="utf-8")
    assert read_stimulus_list(listing) == [
        ("second", tmp_path / "b c.jpg"), ("first", tmp_path / "a.jpg")
    ]


def test_list_reports_every_missing_file_and_duplicate_id(tmp_path):
    touch(tmp_path, "a.jpg", "b.jpg")
    listing = tmp_path / "l.csv"
    listing.write_text("id,path\none,a.jpg\ntwo,gone1.jpg\none,b.jpg\nthree,gone2.jpg\n")
    with pytest.raises(StimulusListError) as info:
        read_stimulus_list(listing)
    message = str(info.value)
    assert "gone1.jpg" in message and "gone2.jpg" in message
    assert "duplicate id 'one'" in message and "line 2" in message
    assert len(info.value.problems) == 3
    assert isinstance(info.value, ValueError)


def test_plain_list_duplicate_lines_are_duplicate_ids(tmp_path):
    touch(tmp_path, "a.jpg")
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg\na.jpg\n")
    with pytest.raises(StimulusListError, match="duplicate id 'a.jpg'"):
        read_stimulus_list(listing)


def test_list_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_stimulus_list(tmp_path / "missing.txt")
    touch(tmp_path, "a.jpg")
    (tmp_path / "no_header.csv").write_text("a.jpg,x\n")
    with pytest.raises(StimulusListError, match="id,path"):
        read_stimulus_list(tmp_path / "no_header.csv")
    (tmp_path / "short.csv").write_text("id,path\nonly-an-id\n")
    with pytest.raises(StimulusListError, match="line 2"):
        read_stimulus_list(tmp_path / "short.csv")
    (tmp_path / "folder.txt").write_text(".\n")
    with pytest.raises(StimulusListError, match="not a file"):
        read_stimulus_list(tmp_path / "folder.txt")


def test_empty_list_is_empty(tmp_path):
    (tmp_path / "l.txt").write_text("# nothing\n\n")
    assert read_stimulus_list(tmp_path / "l.txt") == []


# --- records ----------------------------------------------------------------------


def test_file_sha256_streams_large_files(tmp_path):
    data = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)
    (tmp_path / "big.bin").write_bytes(data)
    assert file_sha256(tmp_path / "big.bin") == hashlib.sha256(data).hexdigest()


def test_make_stimuli_records(tmp_path):
    touch(tmp_path, "img10.jpg", "img2.jpg", "sub/x.png", data=b"abc")
    stimuli = make_stimuli(root=tmp_path, extensions=EXTS)
    assert [s.id for s in stimuli] == ["img2.jpg", "img10.jpg", "sub/x.png"]
    first = stimuli[0]
    assert isinstance(first, Stimulus)
    assert first.path == str(tmp_path / "img2.jpg") and os.path.isabs(first.path)
    assert first.size_bytes == 3
    assert first.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert first.onset == 0.0
    with pytest.raises(Exception):
        first.id = "changed"  # frozen


def test_make_stimuli_from_files_keeps_order(tmp_path):
    touch(tmp_path, "a/z.jpg", "b/y.jpg")
    stimuli = make_stimuli([tmp_path / "b/y.jpg", tmp_path / "a/z.jpg"])
    assert [s.id for s in stimuli] == ["b/y.jpg", "a/z.jpg"]
    with pytest.raises(FileNotFoundError, match="gone"):
        make_stimuli([tmp_path / "gone.jpg"])


def test_bad_file_record():
    bad = BadFile("/x/a.jpg", "empty file (0 bytes)")
    assert bad.path == "/x/a.jpg" and bad.reason.startswith("empty")
    assert tuple(bad) == ("/x/a.jpg", "empty file (0 bytes)")
