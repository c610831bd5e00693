"""The new formats through the real command line (`streamshard convert --format ...`): directory
SRCs are discovered, 1 and 2 worker processes give the same fingerprint, verify passes."""

from __future__ import annotations

import numpy as np
import pytest

from streamshard import open_dataset
from streamshard.cli import main
from tests.convert_helpers import mds_writer

wds = pytest.importorskip("webdataset")


def make_inputs(root) -> dict[str, tuple[str, list[str]]]:
    """format -> (SRC directory, extra CLI options) holding ~100 samples each."""
    rng = np.random.default_rng(5)
    out = {}
    wdir = root / "wds"
    wdir.mkdir()
    for k in range(3):
        with wds.TarWriter(str(wdir / f"s{k}.tar")) as sink:
            for i in range(30):
                sink.write({"__key__": f"{k}_{i}", "txt": f"t{i}", "cls": i,
                            "npy": bytes(rng.integers(0, 255, 30, dtype=np.uint8))})
    out["webdataset"] = (str(wdir), [])
    writer = mds_writer()
    if writer is not None:
        for k in range(2):
            with writer(out=str(root / "mds" / f"sub{k}"), columns={"tokens": "ndarray:uint16",
                                                                     "id": "int"},
                        size_limit=2000, compression="zstd") as w:
                for i in range(50):
                    w.write({"id": i, "tokens": rng.integers(0, 9999, 40).astype(np.uint16)})
        out["mds"] = (str(root / "mds"), [])
    # Megatron layout written directly (see converters/megatron.py for the byte layout)
    mdir = root / "meg"
    mdir.mkdir()
    lengths = rng.integers(1, 80, 120).astype(np.int32)
    tokens = rng.integers(0, 65000, int(lengths.sum())).astype(np.uint16)
    tokens.tofile(mdir / "c.bin")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]).astype(np.int64)
    docs = np.arange(0, 121, 4, dtype=np.int64)
    with open(mdir / "c.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + np.uint64(1).tobytes() + bytes([8])
                + np.uint64(120).tobytes() + np.uint64(len(docs)).tobytes())
        f.write(lengths.tobytes() + pointers.tobytes() + docs.tobytes())
    out["megatron"] = (str(mdir), ["--doc-ids"])
    try:
        import datasets
    except ImportError:
        return out
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": [f"r{i}" for i in range(80)],
                                "ids": [list(range(i % 5)) for i in range(80)]}
                               ).save_to_disk(str(root / "hf"), num_shards=2)
    out["hf"] = (str(root / "hf"), [])
    return out


@pytest.mark.parametrize("fmt", ["webdataset", "mds", "megatron", "hf"])
def test_cli_workers_give_the_same_dataset(tmp_path, fmt, capsys):
    inputs = make_inputs(tmp_path)
    if fmt not in inputs:
        pytest.skip(f"{fmt}: the original writer is not installed")
    src, extra = inputs[fmt]
    prints = []
    for workers in (1, 2):
        dest = str(tmp_path / f"out{workers}")
        rc = main(["convert", src, dest, "--format", fmt, "--workers", str(workers),
                   "--chunk-size", "2KB", "--quiet", *extra])
        assert rc == 0, capsys.readouterr().err
        prints.append(open_dataset(dest).fingerprint)
        assert main(["verify", dest, "--quiet"]) == 0
    assert prints[0] == prints[1]
    ds = open_dataset(str(tmp_path / "out2"))
    assert len(ds) == {"webdataset": 90, "mds": 100, "megatron": 120, "hf": 80}[fmt]
    if fmt == "megatron":
        assert [ds[i]["document"] for i in (0, 3, 4, 119)] == [0, 0, 1, 29]
