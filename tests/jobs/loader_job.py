"""A torchrun job for tests/test_loader_dist.py: read `--steps` global batches on this world size,
optionally restoring a saved loader state first and saving one after `--save-at` batches.

Writes <out>/rank<R>.json: {"steps": [data step per batch], "ids": [[sample ids] per batch],
"world": [rank, world_size, local_rank, local_world_size]} (the World detect_world() found).
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

from streamshard import StreamingDataLoader, StreamingDataset
from streamshard.testing import take


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--load", default=None)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # World comes from torch.distributed through detect_world(): nothing passed explicitly.
    ds = StreamingDataset(args.data, global_batch_size=args.global_batch, seed=11)
    assert ds.world.world_size == dist.get_world_size() and ds.world.rank == rank
    loader = StreamingDataLoader(ds, num_workers=args.workers)
    if args.load:
        with open(args.load) as f:
            loader.load_state_dict(json.load(f))
    w = ds.world
    record = {"steps": [], "ids": [], "world": [w.rank, w.world_size, w.local_rank, w.local_world_size]}
    consumed = 0
    while consumed < args.steps:
        for batch in loader:
            record["steps"].append(loader.last_step)
            record["ids"].append(batch["id"].tolist())
            consumed += 1
            if args.save_at is not None and consumed == args.save_at:
                state = loader.state_dict()
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, state)
                assert all(s == state for s in gathered), "state differs between ranks"
                if rank == 0:
                    tmp = args.save + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump(state, f)
                    os.replace(tmp, args.save)
            if consumed >= args.steps:
                break
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
