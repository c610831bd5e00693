"""StreamingDataLoader over a real S3 API (moto server on 127.0.0.1): multi-worker reads through
the shared cache equal local reads, resume works remotely, and the cache budget is checked
against the sampler's working set at start."""

from __future__ import annotations

import pytest

from streamshard import ConfigError, StreamingDataLoader, StreamingDataset, World
from streamshard.reader import open_dataset
from streamshard.testing import assert_resume_equivalent, take, write_id_dataset
from tests.remote_servers import S3Server

pytestmark = pytest.mark.slow(reason="real moto S3 server and DataLoader worker processes")


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory):
    server = S3Server().start()
    local = write_id_dataset(str(tmp_path_factory.mktemp("l") / "ds"), 1200, shard_size="6KB")
    server.make_bucket("loader")
    server.fs().put(local + "/", "loader/ds/", recursive=True)
    yield server, local, "s3://loader/ds"
    server.stop()


def ids(batch):
    return batch["id"].tolist()


def test_multiworker_remote_epoch_equals_local(s3_dataset, tmp_path):
    server, local, url = s3_dataset
    common = dict(global_batch_size=8, seed=5, world=World(), lanes=4)
    remote = StreamingDataLoader(
        StreamingDataset(url, cache_dir=str(tmp_path / "c"), storage_options=server.options(), **common),
        num_workers=2, multiprocessing_context="fork")
    here = StreamingDataLoader(StreamingDataset(local, **common))
    assert [ids(b) for b in remote] == [ids(b) for b in here]
    # prefetch ran ahead of the reads in the workers: shards were already cached when opened
    src = open_dataset(url, cache_dir=str(tmp_path / "c"), storage_options=server.options()).source
    assert src.cache.usage() > 0


def test_remote_resume_with_bounded_cache(s3_dataset, tmp_path):
    server, local, url = s3_dataset
    largest = max(s.bytes for s in open_dataset(local).index.shards)

    def make():
        ds = StreamingDataset(url, global_batch_size=8, seed=5, world=World(), lanes=2, window=40,
                              cache_dir=str(tmp_path / "c"), cache_limit=largest * 12,
                              storage_options=server.options())
        return StreamingDataLoader(ds)

    assert make().streaming_dataset.working_set_shards <= 12
    assert_resume_equivalent(make, at=[0, 37, 149], total=160)


def test_cache_budget_below_working_set_is_refused_at_start(s3_dataset, tmp_path):
    server, local, url = s3_dataset
    largest = max(s.bytes for s in open_dataset(local).index.shards)
    with pytest.raises(ConfigError, match="cache_limit"):
        StreamingDataset(url, global_batch_size=8, world=World(), lanes=4,
                         cache_dir=str(tmp_path / "c"), cache_limit=largest,
                         storage_options=server.options())
