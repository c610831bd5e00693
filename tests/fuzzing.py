"""Shared pieces of the fuzz suite (tests/test_fuzz_*.py): budgets, base datasets, the oracle.

Every fuzz test asserts one thing: reading a mutated dataset ends in a ``StreamshardError`` or in
correct data, never in another exception, a hang or a memory blow-up. Budgets: ``SHORT``
examples per property in the normal run, ``LONG`` with ``pytest -m fuzz`` (the fuzz-marked tests
are the long duplicates of the short ones). Time: every example runs under an alarm of
``EXAMPLE_SECONDS``; memory: ``test_fuzz_format.py::test_fuzz_under_memory_limit`` reruns the short
format properties in a subprocess whose address space is capped with ``resource.setrlimit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
from typing import Any, Iterator

import numpy as np
import xxhash

from streamshard import ShardWriter
from streamshard.errors import StreamshardError
from streamshard.index import fingerprint_of
from streamshard.shardfile import TABLE_ENTRY, TRAILER

SHORT = int(os.environ.get("STREAMSHARD_FUZZ_SHORT", "25"))
LONG = int(os.environ.get("STREAMSHARD_FUZZ_LONG", "1500"))
EXAMPLE_SECONDS = 30  # a hang, not a slow example: examples take milliseconds

COLUMNS = {"tokens": "uint16[]", "text": "str", "meta": "json", "label": "int64",
           "pts": "float32[*,3]"}


def samples(n: int = 24) -> list[dict]:
    rng = np.random.default_rng(11)
    return [{"tokens": rng.integers(0, 2**16, int(rng.integers(1, 60)), dtype=np.uint16),
             "text": "w" * int(rng.integers(0, 30)) + str(i), "meta": {"i": i, "l": [i, None]},
             "label": i, "pts": rng.random((i % 4, 3), dtype=np.float32)} for i in range(n)]


_BASE: dict[str, str] = {}


def base_dataset(compression: str | None) -> str:
    """A small dataset of several shards and blocks (built once per process)."""
    key = str(compression)
    if key not in _BASE:
        root = tempfile.mkdtemp(prefix=f"fuzz-base-{key}-")
        with ShardWriter(root, columns=COLUMNS, compression=compression, shard_size="2KB",
                         block_size="512B") as w:
            for s in samples():
                w.write(s)
        _BASE[key] = root
    return _BASE[key]


@contextlib.contextmanager
def scratch_copy(compression: str | None) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="fuzz-")
    try:
        dest = os.path.join(d, "ds")
        shutil.copytree(base_dataset(compression), dest)
        yield dest
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def time_bound(seconds: int = EXAMPLE_SECONDS) -> Iterator[None]:
    """Fail (not hang) if the body runs longer than ``seconds`` (main thread only)."""
    def expire(signum, frame):
        raise TimeoutError(f"fuzz example ran longer than {seconds}s (a hang?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def load_doc(ds: str) -> dict:
    with open(os.path.join(ds, "index.json")) as f:
        return json.load(f)


def save_doc(ds: str, doc: dict, *, refingerprint: bool = True) -> None:
    if refingerprint:
        body = {k: v for k, v in doc.items() if k != "fingerprint"}
        try:
            doc = {**body, "fingerprint": fingerprint_of(body)}
        except (TypeError, ValueError, RecursionError):
            pass  # a value json cannot canonicalize: the index stays as mutated
    try:
        text = json.dumps(doc)
    except (ValueError, RecursionError):
        text = "{"  # unserializable mutation: an invalid file is a fine test input too
    with open(os.path.join(ds, "index.json"), "w") as f:
        f.write(text)


def fix_index_for(ds: str, shard: int) -> None:
    """Make the index agree with shard ``shard``'s current bytes (size, xxh64 and identity), so
    that only the checks inside the shard stand between a mutation and the reader."""
    doc = load_doc(ds)
    path = os.path.join(ds, doc["shards"]["files"][shard])
    data = open(path, "rb").read()
    doc["shards"]["bytes"][shard] = len(data)
    doc["shards"]["xxh64"][shard] = xxhash.xxh64_hexdigest(data)
    if len(data) >= TRAILER.size and "table_xxh64" in doc["shards"]:
        thash = struct.unpack_from("<Q", data, len(data) - 16)[0]
        doc["shards"]["table_xxh64"][shard] = f"{thash:016x}"
    save_doc(ds, doc)


def rehash_table(data: bytearray, *, blocks: bool) -> bytearray:
    """Recompute (``blocks``: each block's xxh64 and) the table xxh64 in the trailer, so that a
    mutation survives the checksums (as a deliberate forger's would)."""
    if len(data) < TRAILER.size + 32:
        return data
    off, nblocks = struct.unpack_from("<QI", data, len(data) - TRAILER.size)
    end = off + nblocks * TABLE_ENTRY.size
    if end + TRAILER.size != len(data):
        return data
    if blocks:
        for b in range(nblocks):
            e = list(TABLE_ENTRY.unpack_from(data, off + 40 * b))
            if e[0] + e[1] <= off:
                e[4] = xxhash.xxh64_intdigest(bytes(data[e[0]:e[0] + e[1]]))
                TABLE_ENTRY.pack_into(data, off + 40 * b, *e)
    struct.pack_into("<Q", data, len(data) - 16, xxhash.xxh64_intdigest(bytes(data[off:end])))
    return data


def equal_sample(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                    and x.dtype == y.dtype and x.shape == y.shape
                    and x.tobytes() == y.tobytes()):
                return False
        elif x != y:
            return False
    return True


def read_everything(ds: str, *, exact: bool) -> None:
    """The oracle. Open, read every sample, verify. Any non-streamshard exception propagates
    (the test fails). ``exact``: every sample served must equal the original one."""
    from streamshard import open_dataset, verify_dataset

    original = samples()
    with time_bound():
        try:
            d = open_dataset(ds)
        except StreamshardError:
            d = None
        if d is not None:
            for i in range(len(d)):
                try:
                    got = d[i]
                except StreamshardError:
                    continue
                if exact:
                    assert i < len(original) and equal_sample(got, original[i]), \
                        f"sample {i} served wrong data: {got!r}"
            d.close()
        try:
            report = verify_dataset(ds)
        except StreamshardError:
            return
        if report.ok and exact and d is not None:
            assert len(d) == len(original)


def jsonish() -> Any:
    """A hypothesis strategy of JSON-like values, including the hostile ones."""
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**11]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(["../x.sss", "/dev/zero", "/etc/passwd", "a//b", "%2e%2e/x", "zstd",
                         "uint16[]", "json", "shard-000000.sss", "0" * 16, "f" * 32]),
    )
    return st.recursive(scalars, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
        max_leaves=12)
