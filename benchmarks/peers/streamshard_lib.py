"""streamshard itself: ``ShardWriter`` (64 MB shards, zstd or uncompressed) ->
``StreamingDataset`` + ``StreamingDataLoader``; resume with the loader's ``state_dict``."""

from __future__ import annotations

from peers import BATCH_SIZE, SHARD_BYTES, Peer, list_collate


class StreamshardPeer(Peer):
    package = "streamshard"
    resume_kind = "state"

    def __init__(self, compression):
        self.compression = compression
        self.notes = (f"ShardWriter(compression={compression!r}, shard_size={SHARD_BYTES}) -> "
                      "StreamingDataset(batch_size, shuffle, seed) + StreamingDataLoader")

    def convert(self, wl, dest):
        from streamshard import ShardWriter

        col = f"uint16[{wl.fixed_len}]" if wl.fixed_len is not None else "bytes"
        with ShardWriter(dest, columns={wl.column: col}, shard_size=SHARD_BYTES,
                         compression=self.compression) as w:
            for s in wl.iter_samples():
                w.write(s)

    def loader(self, wl, dest, *, shuffle, workers, seed, batch_size=BATCH_SIZE):
        from streamshard import StreamingDataLoader, StreamingDataset, World

        ds = StreamingDataset(dest, batch_size=batch_size, shuffle=shuffle, seed=seed,
                              world=World(0, 1))
        kw = {} if wl.fixed_len is not None else {"collate_fn": list_collate}
        return StreamingDataLoader(ds, num_workers=workers, **kw)

    def getitem(self, wl, dest):
        from streamshard import open_dataset

        return open_dataset(dest).__getitem__

    def state_dict(self, loader):
        return loader.state_dict()

    def load_state_dict(self, loader, state):
        loader.load_state_dict(state)
