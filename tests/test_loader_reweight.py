"""Mixtures that change, the way a training script uses them: ``loader.reweight``,
``load_state_dict(state, reweight=True)``, weight schedules, repeat/choose, and the batch
sampler under a plain DataLoader and torchdata's StatefulDataLoader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.utils.data

from streamshard import ConfigError, StateMismatchError, StreamingDataLoader, StreamingDataset, World
from streamshard.dataset import Stream
from streamshard.testing import take
from streamshard.writer import ShardWriter

SIZES = (150, 90, 60)  # stream s holds ids s*10_000 + i
G = 10


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = []
    for s, n in enumerate(SIZES):
        path = str(root / f"s{s}")
        with ShardWriter(path, columns={"id": "int64"}, shard_size="2KB", block_size="1KiB",
                         compression=None) as w:
            for i in range(n):
                w.write({"id": s * 10_000 + i})
        out.append(path)
    return out


def loader(streams, *, rank=0, world=1, **kw):
    ds = StreamingDataset(streams, global_batch_size=G, seed=5, world=World(rank, world), **kw)
    return StreamingDataLoader(ds)


def ids(batches):
    return [b["id"].tolist() for b in batches]


def stream_counts(batches, n_streams=3):
    flat = np.concatenate([np.asarray(b) for b in batches]) // 10_000
    return np.bincount(flat, minlength=n_streams).tolist()


def roundtrip(state):
    return json.loads(json.dumps(state))  # as a checkpoint stores it


def test_reweight_mid_run_is_exact_per_block_and_resumes_exactly(sources):
    streams = [Stream(sources[0], 1.0), Stream(sources[1], 1.0)]
    run = loader(streams)
    head = ids(take(run, 7))
    run.reweight([1, 4])  # from the next step (7): blocks of M = 100 from its first position
    run.reweight([1, 4])  # the same call twice changes nothing
    assert run.ledgers.reweights == ((7, 20, 80),)
    middle = ids(take(run, 20))
    state = roundtrip(run.state_dict())
    tail = ids(take(run, 15))
    # 20 steps of 10 = 2 blocks of 100 from step 7's first position: exactly 20 / 80 each.
    assert stream_counts(middle[:10]) == stream_counts(middle[10:]) == [20, 80, 0]
    assert stream_counts(head) != [14, 56, 0]
    resumed = loader(streams)  # the script's own weights: the ledger carries the change
    resumed.load_state_dict(state)
    assert ids(take(resumed, 15)) == tail
    # At 2 ranks, the assembled global batches are the same.
    ranks = [loader(streams, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    per_rank = [ids(take(r, 15)) for r in ranks]
    assert [sorted(a + b) for a, b in zip(*per_rank)] == [sorted(t) for t in tail]


def test_reweight_refuses_a_served_step_and_bad_weights(sources):
    run = loader([Stream(sources[0]), Stream(sources[1])])
    take(run, 5)
    with pytest.raises(ConfigError, match="cannot reweight from step 3: it was already served"):
        run.reweight([1, 2], from_step=3)
    with pytest.raises(ConfigError, match="got 3 weights for 2 streams"):
        run.reweight([1, 2, 3])
    with pytest.raises(ConfigError, match="no weight for stream 1"):
        run.reweight({sources[0]: 1.0})
    run.reweight({sources[0]: 1.0, sources[1]: 0.0}, from_step=9)  # by source; 0 removes
    assert run.ledgers.reweights == ((9, 100),)
    assert stream_counts(ids(take(run, 14))[4:]) == [100, 0, 0]  # steps 9.. only stream 0
    single = loader(sources[0])
    with pytest.raises(ConfigError, match="reweight needs a mixture"):
        single.reweight([1.0])


def test_resume_with_new_weights_needs_reweight_true_and_keeps_the_history(sources):
    old = [Stream(sources[0], 1.0), Stream(sources[1], 1.0)]
    new = [Stream(sources[0], 1.0), Stream(sources[1], 3.0)]
    run = loader(old)
    history = ids(take(run, 12))
    state = roundtrip(run.state_dict())
    with pytest.raises(StateMismatchError, match="pass reweight=True to load_state_dict"):
        loader(new).load_state_dict(state)
    resumed = loader(new)
    resumed.load_state_dict(state, reweight=True)
    # The same as the old run reweighted at the saved step.
    reference = loader(old)
    reference.load_state_dict(state)
    reference.reweight([1, 3])
    after = ids(take(resumed, 20))
    assert after == ids(take(reference, 20))
    assert stream_counts(after) == [50, 150, 0]
    # The history is in the state: explaining a past step still shows what was served.
    past = resumed.samples_at(3, keys=False)
    assert sorted(s.stream * 10_000 + s.sample_id for s in past) == sorted(history[3])
    # A later resume with the same (new) script is an ordinary, exact one.
    state2 = roundtrip(resumed.state_dict())
    more = ids(take(resumed, 10))
    again = loader(new)
    again.load_state_dict(state2)
    assert ids(take(again, 10)) == more
    # reweight=True with unchanged weights changes nothing.
    same = loader(new)
    same.load_state_dict(state2, reweight=True)
    assert same.state_dict() == state2
    # A second change of script keeps both earlier periods exactly.
    third = loader([Stream(sources[0], 5.0), Stream(sources[1], 1.0)])
    third.load_state_dict(state2, reweight=True)
    assert third.ledgers.reweights[0] == (0, 50, 50) and len(third.ledgers.reweights) == 3
    for step in (3, 15):  # before the first change, between the two
        assert sorted(r.sample_id + 10_000 * r.stream for r in third.samples_at(step, keys=False)) \
            == sorted(r.sample_id + 10_000 * r.stream for r in resumed.samples_at(step, keys=False))
    assert stream_counts(ids(take(third, 10))) == [83, 17, 0]


def test_a_schedule_equals_the_ledger_entries_and_resumes_anywhere(sources):
    scheduled = [Stream(sources[0], [(0, 1.0), (6, 3.0)]), Stream(sources[1], [(0, 1.0), (6, 1.0)])]
    run = loader(scheduled)
    served = ids(take(run, 30))
    manual = loader([Stream(sources[0]), Stream(sources[1])])
    manual.reweight([3, 1], from_step=6)
    assert ids(take(manual, 30)) == served
    # explain rebuilds the same sequence from the state alone (schedule and ledger included).
    from streamshard.explain import sequence_from_state

    manual_state = roundtrip(manual.state_dict())
    for state in (roundtrip(run.state_dict()), manual_state):
        seq, _ = sequence_from_state(state, run.streaming_dataset.datasets)
        assert [sorted(seq.global_batch(s)[1] + 10_000 * seq.global_batch(s)[0])
                for s in range(30)] == [sorted(b) for b in served]
    for at in (4, 6, 17):
        first = loader(scheduled)
        take(first, at)
        resumed = loader(scheduled)
        resumed.load_state_dict(roundtrip(first.state_dict()))
        assert ids(take(resumed, 30 - at)) == served[at:]


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=[(1, 1.0)]), "a weight schedule starts at step 0"),
    (dict(weight=[(0, 1.0), (0, 2.0)]), "schedule steps must increase"),
    (dict(weight=[(0, -1.0)]), "schedule weight must be a non-negative number"),
    (dict(weight=2.0, repeat=2), "repeat/choose .* and weight .* are exclusive"),
    (dict(repeat=1.5, choose=3), "give repeat or choose, not both"),
    (dict(choose=0), "choose must be a positive int"),
    (dict(repeat=float("inf")), "repeat must be a positive number"),
])
def test_stream_refuses_bad_sampling(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Stream("some/path", **kwargs)


def test_repeat_and_choose_take_exact_counts_per_epoch(sources):
    streams = [Stream(sources[0], choose=40), Stream(sources[1], repeat=2.5), Stream(sources[2])]
    ds = StreamingDataset(streams, global_batch_size=G, seed=1, world=World(0, 1))
    assert ds.sequence.epoch_size == 40 + 225 + 60 and ds.steps_per_epoch == 32
    epochs = [ids(StreamingDataLoader(ds)) for _ in range(2)]  # 2 epochs, 320 of 325 served each
    for served in epochs:
        flat = np.concatenate(served)
        # Exact per epoch of 325 positions; drop_last leaves 5 positions unserved.
        full = np.bincount(flat // 10_000, minlength=3)
        assert abs(full - [40, 225, 60]).sum() == 5
    for epoch in range(3):  # every position of an epoch, the tail included: exact counts
        streams_e, samples_e = ds.sequence.map_positions(epoch, np.arange(325))
        assert np.bincount(streams_e).tolist() == [40, 225, 60]
        # repeat=2.5 of 90 samples: each twice, 45 of them a third time
        times = np.bincount(samples_e[streams_e == 1], minlength=90)
        assert sorted(np.bincount(times).tolist()) == [0, 0, 45, 45]
        assert len(set(samples_e[streams_e == 0].tolist())) == 40  # choose=40: distinct
    with pytest.raises(ConfigError, match="repeat/choose"):
        StreamingDataLoader(ds).reweight([1, 1, 1])
    with pytest.raises(ConfigError, match="relative weights in a mixture sampled by repeat"):
        StreamingDataset([Stream(sources[0], choose=4), Stream(sources[1], 2.0)],
                         global_batch_size=G, world=World(0, 1))
    with pytest.raises(ConfigError, match="epoch_size cannot be set with repeat/choose"):
        StreamingDataset(streams, global_batch_size=G, epoch_size=100, world=World(0, 1))


def test_batch_sampler_reweight_with_plain_and_stateful_dataloaders(sources):
    streams = [Stream(sources[0], 1.0), Stream(sources[1], 1.0)]
    reference = loader(streams)
    reference.reweight([1, 4], from_step=0)
    want = ids(take(reference, 14))
    ds = StreamingDataset(streams, global_batch_size=G, seed=5, world=World(0, 1))
    sampler = ds.batch_sampler(columnar=False)
    sampler.reweight([1, 4])  # from sampler.step = 0, applies from the next iter()
    plain = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn)
    assert ids(plain)[:14] == want
    from torchdata.stateful_dataloader import StatefulDataLoader

    def stateful(weights, on_load=False):
        ds = StreamingDataset([Stream(sources[0], weights[0]), Stream(sources[1], weights[1])],
                              global_batch_size=G, seed=5, world=World(0, 1))
        sampler = ds.batch_sampler()
        sampler.reweight_on_load = on_load  # StatefulDataLoader passes no argument
        return StatefulDataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn)

    first = stateful([1.0, 1.0])
    it = iter(first)
    head = [next(it)["id"].tolist() for _ in range(6)]
    state = json.loads(json.dumps(first.state_dict()))
    refused = stateful([1.0, 4.0])
    refused.load_state_dict(state)  # StatefulDataLoader restores its sampler at the next iter()
    with pytest.raises(StateMismatchError, match="reweight=True"):
        iter(refused)
    resumed = stateful([1.0, 4.0], on_load=True)
    resumed.load_state_dict(state)
    reference = loader(streams)
    assert ids(take(reference, 6)) == head
    reference.reweight([1, 4])
    assert ids(resumed)[:8] == ids(take(reference, 8))


def test_old_states_without_the_ledger_still_load(sources):
    streams = [Stream(sources[0]), Stream(sources[1])]
    run = loader(streams)
    take(run, 4)
    state = roundtrip(run.state_dict())
    tail = ids(take(run, 5))
    del state["reweights"]  # as saved before this ledger existed
    resumed = loader(streams)
    resumed.load_state_dict(state)
    assert ids(take(resumed, 5)) == tail


def test_numpy_iterator_reweights_like_the_torch_loader_and_mixing_is_torch_free(sources):
    import subprocess
    import sys

    from streamshard import NumpyBatchIterator
    from tests.test_numpy_loader import BLOCKER, ROOT

    streams = [Stream(sources[0]), Stream(sources[1])]
    torch_run = loader(streams)
    take(torch_run, 3)
    torch_run.reweight([2, 1], from_step=5)
    state = roundtrip(torch_run.state_dict())
    it = NumpyBatchIterator([Stream(sources[0], 2.0), Stream(sources[1])], global_batch_size=G,
                            seed=5, world=World(0, 1))
    with pytest.raises(StateMismatchError, match="reweight=True"):
        it.load_state_dict(state)
    it.load_state_dict(state, reweight=True)
    plain = NumpyBatchIterator(streams, global_batch_size=G, seed=5, world=World(0, 1))
    plain.load_state_dict(state)
    plain.reweight([2, 1], from_step=5)  # already in the ledger: nothing changes
    assert plain.state_dict() == state
    want = ids(take(torch_run, 6))
    assert [b["id"].tolist() for b in take(plain, 6)] == want
    # reweight=True: the new weights from the saved step 3 on (the saved entry at 5 is replaced).
    reference = loader(streams)
    reference.load_state_dict(state)
    reference.reweight([2, 1], from_step=3)
    assert [b["id"].tolist() for b in take(it, 6)] == ids(take(reference, 6)) != want
    script = BLOCKER + "import streamshard.mixing, streamshard.sampler.reweight\n" \
        "print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_adding_and_removing_streams_at_a_resume_keeps_ids_and_history(sources):
    a, b, c = sources
    run = loader([Stream(a), Stream(b)])
    take(run, 6)
    run.quarantine([(1, 7, 0)])  # stream 1 (b), sample 7: ids are history ids
    state = roundtrip(run.state_dict())
    assert len(state["fingerprints"]) == 2
    # Drop a, add c, in another list order: refused without reweight=True.
    with pytest.raises(StateMismatchError, match="streams added .*reweight=True"):
        loader([Stream(c), Stream(b)]).load_state_dict(state)
    moved = loader([Stream(c, 2.0), Stream(b, 1.0)])
    moved.load_state_dict(state, reweight=True)
    ds = moved.streaming_dataset
    assert ds.streams[0].describe().startswith("<removed ")  # a's id 0 stays taken
    assert ds.fingerprints[:2] == state["fingerprints"] and ds.streams[1].source == b
    assert ds.streams[2].source == c and ds.streams[0].weight == 0.0
    served = ids(take(moved, 30))
    flat = np.concatenate(served)
    assert not (flat // 10_000 == 0).any()  # a is gone from exactly the saved step
    assert 10_007 not in flat  # the quarantine still names b's sample 7 (stream id 1)
    # b 1/3, c 2/3 of every block of M = 100 from step 6's first position.
    assert stream_counts(served[:10]) == [0, 33, 67]
    moved.reweight([1.0, 1.0], from_step=40)  # the listed streams (b, c) in stream-id order
    assert moved.ledgers.reweights[-1] == (40, 0, 50, 50)
    saved2 = roundtrip(moved.state_dict())
    assert len(saved2["fingerprints"]) == 3 and saved2["quarantine"] == [[1, 7, 0]]
    tail = ids(take(moved, 12))
    # The same script resumes as an ordinary resume (no reweight=True), exactly.
    again = loader([Stream(c, 2.0), Stream(b, 1.0)])
    again.load_state_dict(saved2)
    assert ids(take(again, 12)) == tail
    # Steps are explained with history ids; a past step that read the removed stream is refused.
    assert {r.stream for r in again.samples_at(8, keys=False)} == {1, 2}
    with pytest.raises(ConfigError, match="was removed from the mixture at a resume"):
        again.samples_at(2, keys=False)
    # A removed stream listed again comes back with its id (0) and its place in its own order.
    back = loader([Stream(a), Stream(b), Stream(c)])
    back.load_state_dict(saved2, reweight=True)
    assert back.streaming_dataset.fingerprints == saved2["fingerprints"]
    assert stream_counts(ids(take(back, 10))) == [34, 33, 33]
    # A single-dataset run cannot gain streams (its order is not a mixture member's).
    lone = loader(a)
    take(lone, 2)
    with pytest.raises(StateMismatchError, match="streams can be added to and removed from a mixture"):
        loader([Stream(a), Stream(c)]).load_state_dict(roundtrip(lone.state_dict()), reweight=True)


def test_a_state_whose_rows_do_not_fit_the_mixture_is_refused_at_load(sources):
    streams = [Stream(sources[0]), Stream(sources[1])]
    state = roundtrip(loader(streams).state_dict())
    state["reweights"] = [[3, 1, 1, 1]]  # three counts for two streams
    with pytest.raises(StateMismatchError, match="has 3 counts for a mixture of 2 streams"):
        loader(streams).load_state_dict(state)
    absolute = [Stream(sources[0], choose=20), Stream(sources[1])]
    saved = roundtrip(loader(absolute).state_dict())
    with pytest.raises(StateMismatchError, match="cannot change mid-run"):
        loader([Stream(sources[0], choose=30), Stream(sources[1])]).load_state_dict(
            saved, reweight=True)


def test_reweight_under_a_live_iterator_with_workers_replans_from_the_next_step(sources):
    streams = [Stream(sources[0]), Stream(sources[1])]
    reference = loader(streams)
    want = ids(take(reference, 3))
    reference.reweight([1, 9])
    want += ids(take(reference, 10))
    ds = StreamingDataset(streams, global_batch_size=G, seed=5, world=World(0, 1))
    live = StreamingDataLoader(ds, num_workers=2, multiprocessing_context="fork")
    it = iter(live)
    got = [next(it)["id"].tolist() for _ in range(3)]  # workers have prefetched further
    live.reweight([1, 9])
    got += [next(it)["id"].tolist() for _ in range(10)]
    assert got == want
