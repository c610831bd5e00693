"""Beyond PyTorch (issue 13, item 7): ``NumpyBatchIterator`` serves the batches and saves the state
of ``StreamingDataLoader`` (a state restores into either), and the format, the sampler, the
numpy iterator and the CLI's convert / inspect / verify / merge run with torch not importable (a
``sys.meta_path`` blocker in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from streamshard import NumpyBatchIterator, Stream, World

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 203  # prime: the epoch tail policy is exercised


def ids(batch) -> list[int]:
    return np.asarray(batch["id"]).tolist()


def torch_loader(source, **kw):
    pytest.importorskip("torch")
    from streamshard import StreamingDataLoader, StreamingDataset

    return StreamingDataLoader(StreamingDataset(source, **kw))


def epoch_ids(loader) -> list[list[int]]:
    return [ids(b) for b in loader]


CASES = {
    # one dataset, global batch 8
    "single": lambda p, q: (p, dict(global_batch_size=8, seed=7)),
    # rank 1 of 2: its device half of each global batch
    "rank1of2": lambda p, q: (p, dict(global_batch_size=8, seed=7, world=World(1, 2))),
    # a weighted mixture of two datasets, keeping the tail batch
    "mixture": lambda p, q: ([Stream(p, 0.7), Stream(q, 0.3)],
                             dict(batch_size=6, seed=3, drop_last=False)),
    # in dataset order
    "no-shuffle": lambda p, q: (p, dict(batch_size=5, shuffle=False)),
}


@pytest.fixture
def paths(id_dataset_factory):
    return id_dataset_factory(N), id_dataset_factory(61, shard_size="1KB")


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_batches_and_state_as_the_torch_loader(paths, case):
    source, kw = CASES[case](*paths)
    kw.setdefault("world", World())
    ours, theirs = NumpyBatchIterator(source, **kw), torch_loader(source, **kw)
    assert len(ours) == len(theirs)
    for _ in range(2):  # two epochs: the second continues the first
        got, want = epoch_ids(ours), epoch_ids(theirs)
        assert got == want and got
        assert ours.state_dict() == theirs.state_dict()


def test_batches_are_numpy_columns(paths):
    it = NumpyBatchIterator(paths[0], batch_size=4, seed=1, world=World())
    batch = next(iter(it))
    assert isinstance(batch["id"], np.ndarray) and batch["id"].dtype == np.int64
    assert batch["tokens"].shape == (4, 4) and batch["tokens"].dtype == np.uint16


@pytest.mark.parametrize("save_at", [0, 5, 24])
def test_state_restores_across_loaders_both_ways(paths, save_at):
    kw = dict(global_batch_size=8, seed=11, world=World())
    full = epoch_ids(NumpyBatchIterator(paths[0], **kw))
    it = NumpyBatchIterator(paths[0], **kw)
    stream = iter(it)
    for _ in range(save_at):
        next(stream)
    state = json.loads(json.dumps(it.state_dict()))
    torch_side = torch_loader(paths[0], **kw)
    torch_side.load_state_dict(state)
    assert epoch_ids(torch_side) == full[save_at:]
    back = NumpyBatchIterator(paths[0], **kw)
    torch_again = torch_loader(paths[0], **kw)
    for _, _b in zip(range(save_at), torch_again):
        pass
    back.load_state_dict(torch_again.state_dict())
    assert epoch_ids(back) == full[save_at:]


def test_ledgers_and_transform_match(paths):
    def add_noise(sample, rng):  # per-sample rng: same draw in both loaders
        sample["noise"] = float(rng.random())
        return sample

    kw = dict(global_batch_size=8, seed=5, world=World(), transform=add_noise)
    ours, theirs = NumpyBatchIterator(paths[0], **kw), torch_loader(paths[0], **kw)
    for loader in (ours, theirs):
        loader.skip(3, 6)
        loader.reseed_from(10, 99)
    got = [(ids(b), np.asarray(b["noise"]).round(12).tolist()) for b in ours]
    want = [(ids(b), np.asarray(b["noise"]).round(12).tolist()) for b in theirs]
    assert got == want and len(got) == len(ours) - 3
    assert ours.state_dict() == theirs.state_dict()


def test_load_state_dict_mid_iteration_continues_from_it(paths):
    it = NumpyBatchIterator(paths[0], global_batch_size=8, seed=2, world=World())
    full = epoch_ids(NumpyBatchIterator(paths[0], global_batch_size=8, seed=2, world=World()))
    stream = iter(it)
    next(stream), next(stream)
    saved = it.state_dict()
    next(stream)
    it.load_state_dict(saved)  # a live iterator continues from the restored step
    assert [ids(b) for b in stream] == full[2:]


def test_mismatch_is_refused_with_both_values(paths):
    from streamshard import StateMismatchError

    a = NumpyBatchIterator(paths[0], global_batch_size=8, seed=2, world=World())
    b = NumpyBatchIterator(paths[0], global_batch_size=8, seed=3, world=World())
    with pytest.raises(StateMismatchError, match="seed"):
        b.load_state_dict(a.state_dict())


# What a run saved before a default changed (one row per default), and an explicit setting
# that differs from it (refused: only settings left to the default adopt the saved ones).
OLD_STATES = {
    # before lanes were sized for locality: 64 lanes (any lanes a first run fixed)
    "lanes": (dict(lanes=64), dict(lanes=2), "sequence.lanes"),
    # before the block-aware shuffle of zstd shards: no "blocks" (the window order)
    "blocks": (dict(block_shuffle=False), dict(block_shuffle=True), "sequence.blocks"),
    # from before both defaults
    "both": (dict(lanes=64, block_shuffle=False), dict(lanes=2), "sequence.lanes"),
}


@pytest.mark.parametrize("case", sorted(OLD_STATES))
def test_old_states_restore_across_loaders_both_ways(paths, case):
    """A state from before the locality / block-aware defaults (saved by either loader) restores
    into the other loader left on the defaults and continues that run's order; the saved lanes
    and blocks are adopted by both alike, and refused where set explicitly."""
    from streamshard import StateMismatchError

    old, explicit, field = OLD_STATES[case]
    kw = dict(global_batch_size=8, seed=13, world=World())
    for save_with, restore_into in ((NumpyBatchIterator, torch_loader),
                                    (torch_loader, NumpyBatchIterator)):
        first = save_with(paths[0], **kw, **old)
        head = [ids(b) for _, b in zip(range(4), first)]
        state = json.loads(json.dumps(first.state_dict()))
        tail = epoch_ids(first)
        assert head and tail and ("blocks" in state["sequence"]) == ("block_shuffle" not in old)
        resumed = restore_into(paths[0], **kw)  # defaults: other lanes / the block order
        assert resumed.state_dict()["sequence"] != state["sequence"]
        resumed.load_state_dict(state)
        assert resumed.state_dict()["sequence"] == state["sequence"]
        assert epoch_ids(resumed) == tail
        with pytest.raises(StateMismatchError, match=field):
            restore_into(paths[0], **kw, **explicit).load_state_dict(state)


def test_streams_added_and_removed_at_a_resume_restore_in_either_loader(id_dataset_factory):
    """A mixture resumed with a stream removed and one added (reweight=True) lays its streams
    out in the run's history order in both loaders (streams.SequenceHost.adopt_layout), so a
    state saved by either continues identically in the other."""
    a, b, c = (id_dataset_factory(n, shard_size="1KB") for n in (90, 61, 47))
    kw = dict(global_batch_size=8, seed=3, world=World())
    for save_with, restore_into in ((NumpyBatchIterator, torch_loader),
                                    (torch_loader, NumpyBatchIterator)):
        first = save_with([Stream(a), Stream(b)], **kw)
        for _ in zip(range(3), first):
            pass
        state = json.loads(json.dumps(first.state_dict()))
        resumed = restore_into([Stream(c, 2.0), Stream(b)], **kw)
        same = save_with([Stream(c, 2.0), Stream(b)], **kw)
        for loader in (resumed, same):
            loader.load_state_dict(state, reweight=True)
        assert resumed.state_dict() == same.state_dict()
        assert len(resumed.state_dict()["fingerprints"]) == 3
        assert [ids(x) for _, x in zip(range(6), resumed)] == \
            [ids(x) for _, x in zip(range(6), same)]


def test_numpy_iterator_is_driven_by_the_shared_batch_sampler(paths):
    """The iterator's step, ledgers and state are its StreamingBatchSampler's: no second copy."""
    from streamshard.batch_keys import StreamingBatchSampler

    it = NumpyBatchIterator(paths[0], global_batch_size=8, seed=4, world=World())
    assert isinstance(it._keys, StreamingBatchSampler) and it._keys.dataset is it
    stream = iter(it)
    next(stream), next(stream)
    it.skip(2, 4)
    assert it._keys.ledgers is it.ledgers and it.state_dict() == it._keys.state_at(4)
    assert it.state_dict()["step"] == 4 and it.last_step == 1


BLOCKER = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTorch())
"""


@pytest.mark.slow(reason="one interpreter without torch running every torch-free path (~4 s)")
def test_everything_but_the_torch_loader_runs_without_torch(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(50)))
    script = BLOCKER + textwrap.dedent(f"""
        import io, json, contextlib
        import numpy as np
        import streamshard
        from streamshard import NumpyBatchIterator, Stream, World, open_dataset, ShardWriter
        from streamshard.cli import main
        from streamshard.sampler import EpochOrder, SampleSequence
        from streamshard.errors import MissingDependencyError
        out = {{}}
        with contextlib.redirect_stdout(io.StringIO()) as cli_out:
            out["convert"] = main(["convert", {str(src)!r}, {str(tmp_path / 'ds')!r}, "--format",
                                   "jsonl", "--fields", "text:str,id:int64", "--quiet"])
            out["inspect"] = main(["inspect", {str(tmp_path / 'ds')!r}, "--json"])
            out["verify"] = main(["verify", {str(tmp_path / 'ds')!r}, "--quiet"])
        with ShardWriter({str(tmp_path / 'w')!r}, columns={{"x": "int64"}}) as w:
            for i in range(10):
                w.write({{"x": i}})
        out["read"] = open_dataset({str(tmp_path / 'w')!r})[3]["x"]
        seq = SampleSequence(EpochOrder([10, 10], seed=1), global_batch_size=4)
        out["sampler"] = seq.map_positions(0, np.arange(4))[1].tolist()
        it = NumpyBatchIterator({str(tmp_path / 'ds')!r}, global_batch_size=8, seed=4,
                                world=World())
        out["batches"] = [b["id"].tolist() for b in it]
        out["state"] = it.state_dict()
        try:
            streamshard.StreamingDataset
        except MissingDependencyError as e:
            out["hint"] = str(e)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            out["benchmark"] = main(["benchmark", {str(tmp_path / 'ds')!r}])
        out["benchmark_err"] = err.getvalue()
        out["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["convert"], out["inspect"], out["verify"]) == (0, 0, 0)
    assert out["read"] == 3 and len(out["sampler"]) == 4
    assert out["torch_loaded"] is False
    assert "pip install 'streamshard[torch]'" in out["hint"]
    assert out["benchmark"] == 1 and "needs" in out["benchmark_err"]
    # the same batches and state as the torch loader in this (torch) process
    theirs = torch_loader(str(tmp_path / "ds"), global_batch_size=8, seed=4, world=World())
    assert out["batches"] == epoch_ids(theirs)
    assert out["state"] == json.loads(json.dumps(theirs.state_dict()))


def test_row_gather_equals_the_per_sample_path(tmp_path):
    from streamshard import ShardWriter
    from streamshard.numpy_loader import collate_numpy

    cols = {"a": "int32", "f": "float32", "b": "bool", "t": "uint16[4]", "m": "float64[2,3]"}
    rng = np.random.default_rng(0)
    for comp in (None, "zstd"):
        path = str(tmp_path / f"fixed-{comp}")
        with ShardWriter(path, columns=cols, compression=comp, shard_size="2KB",
                         block_size="512B") as w:
            for i in range(100):
                w.write({"a": -i, "f": i / 3, "b": i % 2 == 0,
                         "t": rng.integers(0, 60000, 4).astype(np.uint16),
                         "m": rng.random((2, 3))})
        fast = NumpyBatchIterator(path, batch_size=16, seed=4, world=World())
        slow = NumpyBatchIterator(path, batch_size=16, seed=4, world=World(),
                                  collate_fn=collate_numpy)  # per-sample reads
        assert fast._rows is not None and slow._rows is None
        for x, y in zip(fast, slow):
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
                np.testing.assert_array_equal(x[k], y[k])
