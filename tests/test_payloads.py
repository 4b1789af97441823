"""Payload files (store/payloads.py): bytes named by their SHA-256, written and fsynced before
the commit that refers to them; large ones hashed on a second thread while they are written."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from durable_nb.store.payloads import HASH_WHILE_WRITING_FROM, PayloadFiles


def _files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def _crc(data: memoryview) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


@pytest.mark.parametrize("size", [1000, HASH_WHILE_WRITING_FROM + 17],
                         ids=["small: hashed first", "large: hashed while written"])
def test_put_names_the_file_by_its_sha256_and_computes_the_extra_check(tmp_path: Path,
                                                                       size: int) -> None:
    data = os.urandom(size)
    files = PayloadFiles(str(tmp_path / "blobs"))
    sha256, check = files.put(memoryview(data), "s", also=_crc)
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert check == _crc(memoryview(data))
    assert Path(files.path(sha256)).read_bytes() == data
    assert _files(tmp_path / "blobs") == [f"{sha256[:2]}/{sha256}"]  # no partial file left


@pytest.mark.parametrize("size", [1000, HASH_WHILE_WRITING_FROM + 17],
                         ids=["small", "large"])
def test_the_same_bytes_put_twice_are_one_file(tmp_path: Path, size: int) -> None:
    data = memoryview(os.urandom(size))
    files = PayloadFiles(str(tmp_path / "blobs"))
    first, _ = files.put(data)
    os.utime(files.path(first), (0, 0))  # an old file: the second put must touch it for gc
    second, _ = files.put(data)
    assert first == second
    assert _files(tmp_path / "blobs") == [f"{first[:2]}/{first}"]
    assert os.stat(files.path(first)).st_mtime > 0


def test_a_failing_check_on_the_hashing_thread_is_raised_and_leaves_no_file(
        tmp_path: Path) -> None:
    def broken(data: memoryview) -> str:
        raise ValueError("check failed")

    files = PayloadFiles(str(tmp_path / "blobs"))
    with pytest.raises(ValueError, match="check failed"):
        files.put(memoryview(os.urandom(HASH_WHILE_WRITING_FROM)), also=broken)
    assert _files(tmp_path / "blobs") == []


def test_chunks_written_ahead_are_found_by_the_commits_put_not_written_again(
        tmp_path: Path) -> None:
    files = PayloadFiles(str(tmp_path / "blobs"))
    large = os.urandom(HASH_WHILE_WRITING_FROM + 5)
    small = os.urandom(1000)
    files.write_ahead([small, large], "s", _crc)()
    [written] = _files(tmp_path / "blobs")  # only the large chunk went ahead
    before = os.stat(tmp_path / "blobs" / written)
    sha256, check = files.put(memoryview(large), "s", also=_crc, chunk=large)
    assert (sha256, check) == (hashlib.sha256(large).hexdigest(), _crc(memoryview(large)))
    after = os.stat(files.path(sha256))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    files.forget_written_ahead()
    assert files.put(memoryview(large), "s", chunk=large)[0] == sha256  # by content again


def test_two_chunks_over_one_buffer_are_told_apart_by_identity(tmp_path: Path) -> None:
    # Two halves of one bytes object: the same exporter and size, different bytes. Each
    # must get the file of its own bytes.
    whole = os.urandom(2 * HASH_WHILE_WRITING_FROM)
    first, second = memoryview(whole)[:HASH_WHILE_WRITING_FROM], memoryview(whole)[HASH_WHILE_WRITING_FROM:]
    files = PayloadFiles(str(tmp_path / "blobs"))
    files.write_ahead([first], "s", _crc)()
    assert files.put(second, "s", also=_crc, chunk=second)[0] == hashlib.sha256(second).hexdigest()
    assert files.put(first, "s", also=_crc, chunk=first)[0] == hashlib.sha256(first).hexdigest()
