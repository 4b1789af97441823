"""The SHA-256 of a step's large buffers, computed once (buffer_hashes.py): the payload
writer hands each hash on, and the value digests take it instead of hashing the memory again,
so a digest is the same whether or not a writer hashed the buffer first."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from durable_nb.buffer_hashes import LARGE_BUFFER_BYTES, BufferHashes
from durable_nb.state.fingerprint import sized_digest, value_digest
from durable_nb.state.references import LiveObjects
from durable_nb.state.codec import encode_state
from durable_nb.store.payloads import PayloadFiles

LARGE_FLOATS = LARGE_BUFFER_BYTES // 8 + 3


def _crc(data: memoryview) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def test_a_provided_hash_is_taken_not_computed_again() -> None:
    data = bytearray(os.urandom(LARGE_BUFFER_BYTES))
    hashes = BufferHashes()
    hashes.expect(data)
    hashes.provide(data, "given by the writer")
    assert hashes.sha256(memoryview(data)) == "given by the writer"  # another view, same memory


def test_the_digest_waits_for_an_expected_hash() -> None:
    data = bytearray(os.urandom(LARGE_BUFFER_BYTES))
    hashes = BufferHashes()
    hashes.expect(data)
    provider = threading.Timer(0.2, hashes.provide, (data, "late"))
    provider.start()
    started = time.perf_counter()
    assert hashes.sha256(data) == "late"
    assert time.perf_counter() - started >= 0.15
    provider.join()


def test_a_hash_not_provided_or_not_expected_is_computed() -> None:
    expected, other = bytearray(os.urandom(1000)), bytearray(os.urandom(1000))
    hashes = BufferHashes()
    hashes.expect(expected)
    hashes.provide(expected, None)  # the writer gave up
    assert hashes.sha256(expected) == hashlib.sha256(expected).hexdigest()
    assert hashes.sha256(other) == hashlib.sha256(other).hexdigest()


def test_two_slices_of_one_buffer_are_not_taken_for_each_other() -> None:
    whole = os.urandom(2 * LARGE_BUFFER_BYTES)
    first, second = memoryview(whole)[:LARGE_BUFFER_BYTES], memoryview(whole)[LARGE_BUFFER_BYTES:]
    hashes = BufferHashes()
    hashes.expect(first)
    hashes.provide(first, "first")
    assert hashes.sha256(second) == hashlib.sha256(second).hexdigest()


def test_a_large_array_counts_by_its_sha256_small_ones_by_their_bytes() -> None:
    large = np.random.default_rng(1).random(LARGE_FLOATS)
    copy = large.copy()
    assert value_digest(large) == value_digest(copy)
    copy[-1] += 1
    assert value_digest(large) != value_digest(copy)
    assert sized_digest(large)[1] >= large.nbytes  # its cost still counts every byte
    small = np.arange(10.0)
    assert value_digest(small) != value_digest(small + 1)


def test_a_step_s_large_values_are_hashed_once_with_the_same_digests(tmp_path: Path) -> None:
    """What encode does: the writer hashes the chunks while it writes them, and the digests
    of the values take those hashes; the digests equal the ones taken without a writer."""
    rng = np.random.default_rng(2)
    values = {"arr": rng.random(LARGE_FLOATS),
              "df": pd.DataFrame({"a": rng.random(LARGE_FLOATS), "b": rng.random(LARGE_FLOATS)})}
    encoded = encode_state(LiveObjects({}), values, [], {})
    files = PayloadFiles(str(tmp_path / "blobs"))
    hashes = BufferHashes()
    wait = files.write_ahead(encoded.chunks, "s", _crc, hashes)
    digests = {name: value_digest(value, hashes) for name, value in values.items()}
    wait()
    assert digests == {name: value_digest(value) for name, value in values.items()}
    # The array's file is named by the hash its digest took.
    [array_chunk] = [chunk for chunk in encoded.chunks
                     if memoryview(chunk).obj is values["arr"]]
    sha256 = hashlib.sha256(memoryview(array_chunk).cast("B")).hexdigest()
    assert Path(files.path(sha256)).read_bytes() == values["arr"].tobytes()
