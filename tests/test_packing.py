"""Online packing and token-budget batches (streamshard/packing.py, packplan.py).

Pure packers and the window plan are property-tested with hypothesis; the loader is driven as
users' scripts drive it: StreamingDataLoader, a plain DataLoader with the batch sampler and
torchdata's StatefulDataLoader, with 0 and 2 workers, at world sizes 1, 2, 3 and 5.
"""

from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

from streamshard import (
    ConfigError, StateMismatchError, Stream, StreamingDataLoader, StreamingDataset, World,
)
from streamshard.batch_keys import BatchCollate
from streamshard.packing import (
    Packing, TokenBudget, bucket_batches, buckets, cu_seqlens, first_fit_decreasing, pack,
)
from streamshard.packplan import Planner, pool_of, pooled_ledgers, serve, window_positions
from streamshard.sampler import EpochOrder, Ledgers, SampleSequence
from streamshard.sampler.order import default_lanes
from streamshard.testing import batch_key, take
from streamshard.writer import ShardWriter

N, G, SEQ = 420, 30, 64
PACK = Packing(seq_len=SEQ, group=2, pool=3)
BUDGET = TokenBudget(max_tokens=96, group=3, pool=2)
# Tokens of document i are i * 1000 + 0, 1, ...: every token says which document and where.
BASE = 1000


def doc_lengths(n: int, seed: int = 3) -> np.ndarray:
    """Lognormal lengths (median ~20 tokens, a tail past SEQ), a few empty documents."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(3.0, 1.0, n).astype(np.int64), 400)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pack") / "docs")
    with ShardWriter(out, columns={"id": "int64", "tokens": "uint32[]"}, shard_size="4KB",
                     block_size="1KiB", compression="zstd") as writer:
        for i, n in enumerate(doc_lengths(N).tolist()):
            writer.write({"id": i, "tokens": (i * BASE + np.arange(n)).astype(np.uint32)})
    return out


def dataset(path, world=World(0, 1), packing=PACK, **kw) -> StreamingDataset:
    return StreamingDataset(path, global_batch_size=G, seed=5, world=world, packing=packing, **kw)


def segments(batch) -> list[tuple[int, ...]]:
    """The document pieces of a packed batch (row-major), checked against its metadata."""
    tokens, pos, seg = batch["tokens"].numpy(), batch["position_ids"].numpy(), batch["segment_ids"].numpy()
    assert tokens.shape[1:] == (SEQ,) and pos.shape == seg.shape == tokens.shape
    cu = batch["cu_seqlens"].numpy()
    assert cu[0] == 0 and cu[-1] == tokens.size and (np.diff(cu) > 0).all()
    assert int(batch["max_seqlen"]) == (np.diff(cu).max() if cu.size > 1 else 0)
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        row = a // SEQ
        assert (b - 1) // SEQ == row  # a segment never crosses a row
        flat_seg, flat_pos = seg.reshape(-1)[a:b], pos.reshape(-1)[a:b]
        assert (flat_seg == flat_seg[0]).all() and (flat_pos == np.arange(b - a)).all()
        if flat_seg[0] != 0:
            out.append(tuple(tokens.reshape(-1)[a:b].tolist()))
        else:
            assert b % SEQ == 0  # padding is a row's tail
    return out


def assert_exactly_once(pieces, doc_ids) -> None:
    """The pieces put back together are exactly the documents ``doc_ids``, each as often as
    it is listed (once, but for a quarantine fill that repeats a sample)."""
    by_doc = collections.defaultdict(list)
    for piece in pieces:
        doc = piece[0] // BASE
        assert all(t // BASE == doc for t in piece)
        by_doc[doc].append(piece)
    lengths = doc_lengths(N)
    want = collections.Counter(d for d in doc_ids if lengths[d] > 0)
    assert set(by_doc) == set(want)
    for doc, parts in by_doc.items():
        got = sorted(t % BASE for part in parts for t in part)
        assert got == sorted(list(range(lengths[doc])) * want[doc]), doc


# -- pure packers (hypothesis) -----------------------------------------------------------------
docs_strategy = st.lists(st.integers(0, 300), min_size=0, max_size=40)


@settings(max_examples=30, deadline=None)
@given(docs_strategy, st.integers(1, 97), st.booleans())
def test_pack_serves_every_token_once_in_rows_of_exactly_seq_len(lengths, seq_len, split):
    docs = [np.arange(n, dtype=np.uint32) + i * BASE for i, n in enumerate(lengths)]
    rows = pack(docs, Packing(seq_len=seq_len, split_documents=split, pad_id=7))
    assert rows.tokens.shape == rows.position_ids.shape == rows.segment_ids.shape
    assert rows.tokens.shape[1:] == (seq_len,)
    pad = rows.segment_ids == 0
    assert (rows.tokens[pad] == 7).all()
    served = rows.tokens[~pad]
    assert sorted(served.tolist()) == sorted(np.concatenate(docs + [np.empty(0, np.uint32)]).tolist())
    total = sum(lengths)
    if split:  # concatenate and cut: only the last row is padded
        assert len(rows) == -(-total // seq_len) and pad.sum() == len(rows) * seq_len - total
        assert (served == np.concatenate(docs + [np.empty(0, np.uint32)])).all()
    else:  # whole documents (pieces of seq_len for longer ones) placed by first-fit decreasing
        pieces = sum(max(1, -(-n // seq_len)) for n in lengths if n)
        assert -(-total // seq_len) <= len(rows) <= pieces
    # Segments: ids 1, 2, ... in each row, positions restart at every piece, padding at the tail.
    for r in range(len(rows)):
        seg, pos, tok = rows.segment_ids[r], rows.position_ids[r], rows.tokens[r]
        real = seg[seg > 0]
        assert (np.diff(real) >= 0).all() and (real.size == 0 or real[0] == 1)
        assert (np.diff(seg[seg > 0]) <= 1).all() and (seg[: real.size] > 0).all()
        for s in np.unique(real).tolist():
            where = np.flatnonzero(seg == s)
            assert (pos[where] == np.arange(where.size)).all()
            assert len({int(t) // BASE for t in tok[where]}) == 1  # one document per segment
            assert (np.diff(tok[where].astype(np.int64)) == 1).all()  # in order, contiguous
            if not split:  # a whole document, or a whole seq_len piece of a longer one
                doc, offset = divmod(int(tok[where[0]]), BASE)
                assert offset % seq_len == 0 and where.size == min(seq_len, lengths[doc] - offset)
    cu = cu_seqlens(rows.segment_ids)
    assert cu[-1] == rows.tokens.size and (np.diff(cu) > 0).all()
    assert cu.tolist() == rows.starts.tolist() + [rows.tokens.size]  # what packed_batch uses


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=60), st.integers(1, 300), st.integers(0, 2**32))
def test_buckets_respect_the_budget_and_hold_every_document(lengths, budget, key):
    docs = [np.arange(n, dtype=np.uint16) for n in lengths]
    out = bucket_batches(docs, TokenBudget(max_tokens=budget), key)
    seen = sorted(i for b in out for i in b["index"].tolist())
    assert seen == list(range(len(lengths)))
    for b in out:
        tokens, kept = b["tokens"], b["lengths"]
        assert tokens.shape[0] * max(tokens.shape[1], 1) <= budget  # the padded size
        assert (kept == np.minimum(np.asarray(lengths)[b["index"]], budget)).all()
        assert b["truncated"] == int((np.asarray(lengths)[b["index"]] - kept).sum())
        for row, n in zip(tokens, kept.tolist()):
            assert (row[:n] == np.arange(n)).all() and (row[n:] == 0).all()
    # Similar lengths: buckets are runs of the sorted lengths.
    cut = buckets(np.asarray(lengths), budget)
    flat = np.concatenate(cut + [np.empty(0, np.int64)])
    assert (np.diff(np.minimum(np.asarray(lengths, dtype=np.int64), budget)[flat]) >= 0).all()


def test_first_fit_decreasing_table():
    # (sizes, capacity, bins): one row per edge.
    table = [
        ([], 5, []),                            # nothing to place
        ([5], 5, [[0]]),                        # exactly full
        ([3, 3, 2, 2], 5, [[0, 2], [1, 3]]),    # decreasing, first bin that fits
        ([1, 4, 4, 1], 5, [[1, 0], [2, 3]]),    # ties by index
    ]
    for sizes, capacity, want in table:
        assert first_fit_decreasing(np.asarray(sizes, dtype=np.int64), capacity) == want


# -- the window plan (hypothesis, pure: no I/O) -------------------------------------------------
def planner(seq, cfg, world):
    ns = SimpleNamespace(sequence=seq, steps_per_epoch=seq.steps_per_epoch, world=world,
                         packing=cfg, datasets=[None], is_remote=lambda s: False)
    return Planner(ns)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(1, 4), st.integers(1, 6),
       st.integers(1, 4), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.booleans())
def test_windows_are_the_same_at_any_world_size(sizes, group, windows, pool, world_size, local,
                                                drop_last):
    g = group * max(windows, world_size)
    if sum(sizes) < g:
        sizes = sizes + [g]
    order = EpochOrder(sizes, seed=11, lanes=default_lanes(len(sizes), g // group))  # the loader's
    seq = SampleSequence(order, global_batch_size=g, drop_last=drop_last)
    cfg = Packing(seq_len=8, group=group, pool=pool)
    lanes = seq.lanes
    # Every document of window w is in lane w mod L (the pad of a drop_last=False epoch's last
    # step wraps to the epoch's first positions, whatever their lane: docs/SAMPLER.md).
    if drop_last and (g // group) % lanes == 0:
        first, count, _ = pool_of(0, seq.steps_per_epoch, pool)
        pos = window_positions(seq, first, count, np.arange(g // group), group)
        assert ((pos % lanes) == (np.arange(g // group) % lanes)[:, None]).all()
    served = collections.Counter()
    for step in range(min(seq.steps_per_epoch, 7)):
        by_window = {}
        for rank in range(world_size):
            key = planner(seq, cfg, World(rank, world_size, rank % local, local)).key(step, Ledgers())
            first, count, part = pool_of(step, seq.steps_per_epoch, pool)
            assert (key.pool_start, key.parts, key.part) == (first, count, part)
            for i, w in enumerate(key.windows):
                assert w not in by_window  # a window is read by one rank
                by_window[w] = key.sample_ids[i * key.docs:(i + 1) * key.docs]
        one = planner(seq, cfg, World(0, 1)).key(step, Ledgers())
        assert sorted(by_window) == list(one.windows) == list(range(g // group))
        assert all(by_window[w] == one.sample_ids[i * one.docs:(i + 1) * one.docs]
                   for i, w in enumerate(one.windows))
        if part == 0:
            served.update(one.sample_ids)
    if drop_last:
        assert max(served.values(), default=1) == 1  # each document once per epoch


class _Docs(SimpleNamespace):
    """The worker's side of a key over documents made from their ids (document ``i`` has
    ``i % 23 * 3`` tokens ``i * BASE + 0, 1, ...``): what ``StreamingDataset`` gives
    ``packplan.serve``, minus the shards."""

    def fetch(self, step, streams, samples):
        return [{"tokens": i * BASE + np.arange(i % 23 * 3)} for i in samples.tolist()]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 4), st.integers(5, 40), st.booleans(), st.sampled_from([Packing, TokenBudget]))
def test_an_epoch_of_rows_is_every_token_once_and_the_same_at_any_world_size(
        sizes, group, windows, pool, size, split, kind):
    g = group * windows * 5  # windows per step: a multiple of 5 >= every world size tested
    sizes = sizes + [g]
    seq = SampleSequence(EpochOrder(sizes, seed=2), global_batch_size=g)
    cfg = (Packing(seq_len=size, group=group, pool=pool, split_documents=split) if kind is Packing
           else TokenBudget(max_tokens=size * 3, group=group, pool=pool))
    steps = seq.steps_per_epoch
    per_world = {}
    for world_size in (1, 2, 3, 5):
        batches = []
        for rank in range(world_size):
            world = World(rank, world_size, rank % 2, 2)
            ds = _Docs(sequence=seq, steps_per_epoch=steps, world=world, packing=cfg,
                       datasets=[None], is_remote=lambda s: False, seed=9)
            plan = Planner(ds)
            batches.append([serve(ds, plan.key(t, Ledgers())) for t in range(steps)])
        per_world[world_size] = [
            sorted(tuple(row) for b in batches for row in (
                b[t]["tokens"].tolist() if kind is Packing else
                [tuple(r[:n]) for bucket in b[t] for r, n in zip(bucket["tokens"].tolist(),
                                                                 bucket["lengths"].tolist())]))
            for t in range(steps)]
        for b in batches:
            for t in range(steps):
                if kind is Packing:
                    assert b[t]["tokens"].shape[1:] == (size,)
                else:
                    assert all(x["tokens"].size <= cfg.max_tokens for x in b[t])
    assert per_world[2] == per_world[3] == per_world[5] == per_world[1]
    # Every token of every served document, once (budget: truncated to max_tokens). Document
    # 0 is empty, so token 0 in a packed row is padding (pad_id 0).
    served = [int(i) for t in range(steps) for i in seq.global_batch(t)[1]]
    got = collections.Counter(tok for rows in per_world[1] for row in rows for tok in row)
    got.pop(0, None)
    want = collections.Counter()
    for i in served:
        n = i % 23 * 3 if kind is Packing else min(i % 23 * 3, cfg.max_tokens)
        want.update((i * BASE + np.arange(n)).tolist())
    assert got == want


def test_pooled_ledgers_round_reseeds_and_quarantine_up_to_a_pool():
    ledgers = Ledgers(skips=((4, 5),), reseeds=((3, 9), (6, 1)), quarantine=((0, 17, 7),))
    got = pooled_ledgers(ledgers, steps_per_epoch=10, pool=3)
    assert got.skips == ((4, 5),)                # skips act per step
    assert got.reseeds == ((3, 9), (6, 1))       # 3 and 6 start pools
    assert got.quarantine == ((0, 17, 9),)       # 7 is inside [6, 9): from 9
    assert pooled_ledgers(Ledgers(reseeds=((9, 2),)), 10, 4).reseeds == ((10, 2),)  # short last pool
    assert pooled_ledgers(ledgers, 10, 1) == ledgers
    reweighted = pooled_ledgers(Ledgers(reweights=((3, 20, 80), (4, 30, 70), (5, 40, 60))), 10, 3)
    assert reweighted.reweights == ((3, 20, 80), (6, 40, 60))  # 4 and 5 are inside [3, 6): the
    # later one is in force from 6


# -- the loader, as a user's script drives it ----------------------------------------------------
def epoch_pieces(batches) -> list:
    return [p for b in batches for p in segments(b)]


def served_docs(ds) -> list[int]:
    seq = ds.sequence
    return [int(i) for s in range(seq.steps_per_epoch) for i in seq.global_batch(s)[1]]


def test_an_epoch_serves_every_token_of_every_document_once(path):
    ds = dataset(path)
    batches = list(StreamingDataLoader(ds))
    assert len(batches) == ds.steps_per_epoch == N // G
    assert_exactly_once(epoch_pieces(batches), served_docs(ds))
    assert min(len(b["tokens"]) for b in batches) > 0


@pytest.mark.parametrize("packing", [PACK, BUDGET], ids=["packing", "budget"])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_global_batches_do_not_depend_on_the_world_size(path, world_size, packing):
    def items(batch):  # rows of a packed step, buckets of a token-budget step
        if isinstance(batch, list):
            return [batch_key(b) for b in batch]
        return [tuple(r) for r in batch["tokens"].tolist()]

    one = [sorted(items(b)) for b in take(StreamingDataLoader(dataset(path, packing=packing)), 8)]
    parts = [take(StreamingDataLoader(dataset(path, World(r, world_size, r % 2, 2), packing)), 8)
             for r in range(world_size)]
    assert [sorted(i for p in parts for i in items(p[s])) for s in range(8)] == one
    assert all(items(p[s]) for p in parts for s in range(8))  # no rank is left without data


def test_plain_dataloader_over_rank_batches(path):
    ds = dataset(path)
    ds.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=BatchCollate())
    want = take(StreamingDataLoader(dataset(path)), 2 * ds.steps_per_epoch)[ds.steps_per_epoch:]
    assert [batch_key(b) for b in loader] == [batch_key(b) for b in want]


def test_the_packers_and_the_plan_run_without_torch():
    blocker = textwrap.dedent("""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(name, name=name)
        sys.meta_path.insert(0, NoTorch())
        import numpy as np
        from types import SimpleNamespace
        from streamshard import Packing, World
        from streamshard.packing import pack
        from streamshard.packplan import Planner
        from streamshard.sampler import EpochOrder, Ledgers, SampleSequence
        seq = SampleSequence(EpochOrder([40, 40], seed=1), global_batch_size=8)
        cfg = Packing(seq_len=16, group=2, pool=3)
        ns = SimpleNamespace(sequence=seq, steps_per_epoch=seq.steps_per_epoch, world=World(),
                             packing=cfg, datasets=[None], is_remote=lambda s: False)
        key = Planner(ns).key(4, Ledgers())
        rows = pack([np.arange(n) for n in (5, 30, 0, 7)], cfg)
        assert len(key.sample_ids) == 8 * 3 and rows.tokens.shape == (3, 16)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_workers_and_drivers_give_the_same_batches_and_resume_by_arithmetic(path, caplog):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    fork = {"multiprocessing_context": "fork"}
    want = [batch_key(b) for b in take(StreamingDataLoader(dataset(path)), 16)]
    two = [batch_key(b) for b in take(StreamingDataLoader(dataset(path), num_workers=2, **fork), 16)]
    assert two == want
    ds = dataset(path)
    plain = torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler(), num_workers=2,
                                        collate_fn=BatchCollate(), **fork)
    assert [batch_key(b) for b in plain] == want[:14]  # one epoch: 14 steps

    def make(workers):
        ds = dataset(path)
        return stateful.StatefulDataLoader(ds, batch_sampler=ds.batch_sampler(),
                                           num_workers=workers, collate_fn=BatchCollate(),
                                           **(fork if workers else {}))

    for workers, at in ((2, 4), (0, 7)):  # mid-pool (pools of 3 steps), then between pools
        first = make(workers)
        it = iter(first)
        head = [batch_key(next(it)) for _ in range(at)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make(workers)
        resumed.load_state_dict(state)
        with caplog.at_level(logging.WARNING):
            tail = [batch_key(b) for b in resumed]
        assert "fast-forwarding" not in caplog.text  # torchdata replayed nothing
        assert head + tail == want[:14], workers


@pytest.mark.parametrize("packing", [PACK, BUDGET], ids=["packing", "budget"])
def test_resume_at_every_step_equals_the_continued_run(path, packing):
    total = 16  # into the next epoch (14 steps per epoch); every step of the first two pools
    points = range(8) if packing is PACK else (1, 3, 13, 15)
    want = [batch_key(b) for b in take(StreamingDataLoader(dataset(path, packing=packing)), total)]
    for k in points:
        first = StreamingDataLoader(dataset(path, packing=packing))
        take(first, k) if k else None
        state = json.loads(json.dumps(first.state_dict()))
        assert set(state) == set(json.loads(json.dumps(StreamingDataLoader(
            dataset(path, packing=None)).state_dict())))  # the same keys: a few integers
        resumed = StreamingDataLoader(dataset(path, packing=packing))
        resumed.load_state_dict(state)
        assert [batch_key(b) for b in take(resumed, total - k)] == want[k:], k


def test_token_budget_batches_are_lists_of_buckets_within_budget(path):
    ds = dataset(path, packing=BUDGET)
    batches = list(StreamingDataLoader(ds, num_workers=0))
    docs, lengths = [], doc_lengths(N)
    for step_batch in batches:
        assert isinstance(step_batch, list)
        for bucket in step_batch:
            tokens, kept = bucket["tokens"], bucket["lengths"]
            assert tokens.dtype == torch.int64 and tokens.numel() <= BUDGET.max_tokens
            for row, n in zip(tokens.tolist(), kept.tolist()):
                if n:
                    doc = row[0] // BASE
                    assert row[:n] == (doc * BASE + np.arange(n)).tolist()
                    assert n == min(lengths[doc], BUDGET.max_tokens)  # the truncation rule
                    docs.append(doc)
    served = [d for d in served_docs(ds) if lengths[d] > 0]
    assert sorted(docs) == sorted(served)  # every document once


def test_a_reseed_or_quarantine_inside_a_pool_keeps_exactly_once(path):
    loader = StreamingDataLoader(dataset(path))
    batches = take(loader, 4)  # step 4 is the second step of the pool [3, 6)
    loader.reseed_from(4, 99)
    bad = int(loader.streaming_dataset.sequence.global_batch(9)[1][0])
    loader.quarantine([(0, bad, 4)])
    batches += list(loader)
    assert len(batches) == loader.steps_per_epoch
    # Both take effect at step 6: the same documents as a reseed and quarantine there (the
    # epoch has no drop_last tail, so the quarantine's fill repeats a sample: listed twice).
    ref = dataset(path).sequence.with_reseed(6, 99).with_quarantine(0, bad, 6)
    assert bad not in ref.global_batch(9)[1].tolist()
    assert_exactly_once(epoch_pieces(batches),
                        [int(i) for s in range(ref.steps_per_epoch) for i in ref.global_batch(s)[1]])


def test_skipped_steps_drop_their_rows_only(path):
    full = take(StreamingDataLoader(dataset(path)), 8)
    loader = StreamingDataLoader(dataset(path))
    loader.skip(4, 5)
    got = take(loader, 7)
    assert [batch_key(b) for b in got] == [batch_key(b) for b in full[:4] + full[5:]]


def test_state_records_the_packing_and_refuses_another(path):
    state = StreamingDataLoader(dataset(path)).state_dict()
    assert state["sequence"]["packing"] == PACK.state_fields()
    for other in (None, Packing(seq_len=SEQ * 2, group=2, pool=3), BUDGET):
        with pytest.raises(StateMismatchError, match="sequence.packing"):
            StreamingDataLoader(dataset(path, packing=other)).load_state_dict(state)


def test_a_pools_first_key_hints_its_shards_and_the_next_pools(path):
    from streamshard import open_dataset

    data = open_dataset(path)
    seq = dataset(path).sequence
    host = SimpleNamespace(sequence=seq, steps_per_epoch=seq.steps_per_epoch, world=World(0, 1),
                           packing=PACK, datasets=[data], is_remote=lambda s: True)
    plan = Planner(host)
    keys = [plan.key(t) for t in range(6)]
    assert [bool(k.prefetch) for k in keys] == [True, False, False, True, False, False]
    shard_of = lambda ids: {int(i) for i in np.searchsorted(data.index.offsets, ids, "right") - 1}  # noqa: E731
    want = shard_of(keys[0].sample_ids) | shard_of(keys[3].sample_ids)
    assert {s for _, s in keys[0].prefetch} == want and len(keys[0].prefetch) == len(want)
    assert {stream for stream, _ in keys[0].prefetch} == {0}


def test_explain_reads_a_packed_state(path):
    from streamshard import open_dataset
    from streamshard.explain import sequence_from_state

    loader = StreamingDataLoader(dataset(path))
    take(loader, 5)
    seq, step = sequence_from_state(loader.state_dict(), [open_dataset(path)])
    assert step == 5  # the step's documents; their tokens are served within its pool
    assert [r.sample_id for r in loader.samples_at(5, keys=False)] == seq.global_batch(5)[1].tolist()


def test_a_transform_that_breaks_the_column_is_named(path):
    ds = dataset(path, transform=lambda sample, rng: {"tokens": sample["tokens"].astype(float)})
    with pytest.raises(ConfigError, match=r"'tokens' of sample \d+ \(stream 0\) must be a 1-D integer"):
        next(iter(StreamingDataLoader(ds)))


def test_bad_configs_are_refused_with_the_value(path):
    for bad, match in [
        (lambda: Packing(seq_len=0), "seq_len must be a positive int, got 0"),
        (lambda: Packing(seq_len=8, group=True), "group must be a positive int"),
        (lambda: TokenBudget(max_tokens=8, pad_id=-1), "pad_id must be a non-negative int"),
        (lambda: dataset(path, packing=Packing(seq_len=8, group=7)), "group=7 must divide"),
        (lambda: dataset(path, World(0, 16), Packing(seq_len=8, group=2)), "fewer than world_size=16"),
        (lambda: dataset(path, packing=Packing(seq_len=8, column="id")), "'id' must be a 1-D integer"),
        (lambda: dataset(path, packing="pack"), "must be a Packing or a TokenBudget"),
    ]:
        with pytest.raises(ConfigError, match=match):
            bad()


def test_a_reweight_inside_a_pool_takes_effect_at_the_next_pool(tmp_path, path):
    # A mixture of two copies of the corpus (distinct sources, so distinct streams).
    import shutil
    other = str(tmp_path / "copy")
    shutil.copytree(path, other)
    streams = [Stream(path, 1.0), Stream(other, 1.0)]
    loader = StreamingDataLoader(dataset(streams))
    served = take(loader, 4)  # step 4 is the second step of the pool [3, 6)
    loader.reweight([1.0, 3.0], from_step=4)
    served += take(loader, 4)
    ref = StreamingDataLoader(dataset(streams))
    want = take(ref, 6)
    ref.reweight([1.0, 3.0], from_step=6)
    want += take(ref, 2)
    assert [batch_key(b) for b in served] == [batch_key(b) for b in want]


def _as_numpy(batch):
    """A torch packed batch or list of buckets as numpy (token ids int64 on both sides)."""
    if isinstance(batch, list):
        return [_as_numpy(b) for b in batch]
    return {k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v).astype(np.int64)
            for k, v in batch.items()}


@pytest.mark.parametrize("packing", [PACK, BUDGET], ids=["pack", "budget"])
def test_numpy_iterator_packs_like_the_torch_loader_and_shares_its_state(path, packing):
    from streamshard import NumpyBatchIterator

    loader = StreamingDataLoader(dataset(path, packing=packing))
    want = [_as_numpy(b) for b in take(loader, 7)]
    it = NumpyBatchIterator(path, global_batch_size=G, seed=5, world=World(0, 1), packing=packing)
    got = [_as_numpy(b) for b in take(it, 4)]
    state = it.state_dict()
    assert state == StreamingDataLoader(dataset(path, packing=packing)).state_dict() | {
        "step": 4}
    back = StreamingDataLoader(dataset(path, packing=packing))
    back.load_state_dict(state)  # a numpy state resumes the torch loader mid-pool
    got += [_as_numpy(b) for b in take(back, 3)]
    assert batch_key(got) == batch_key(want)
    assert batch_key(_as_numpy(it.batch_at(2))) == batch_key(want[2])
