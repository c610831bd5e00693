"""The loaders' options as two small frozen values: what order samples come in, and how shards
are read.

``StreamingDataset`` and ``NumpyBatchIterator`` take ``order=OrderOptions(...)`` and
``reading=ReadOptions(...)``; each field is also accepted as a keyword of its own (``seed=3`` is
``order=OrderOptions(seed=3)``), the form every release before this one took. Giving one option
both ways is an error, so a value never silently wins over another. No torch here.

- :class:`OrderOptions` is the sequence definition: everything in it is saved in the loader
  state, and a resume with a different value is refused (docs/LOADER.md).
- :class:`ReadOptions` never changes which samples a step serves: where shards come from, what is
  cached, how far ahead, and the first-touch check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from streamshard.blockshuffle import DEFAULT_BLOCKS_PER_GROUP
from streamshard.errors import ConfigError
from streamshard.sampler.order import check_int
from streamshard.sizes import parse_size


def _optional_int(value: Any, name: str, minimum: int) -> int | None:
    return None if value is None else check_int(value, name, minimum=minimum)


def _bool(value: Any, name: str, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        kind = "a bool or None" if optional else "True or False"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class OrderOptions:
    """Which samples each global batch holds (docs/SAMPLER.md); saved in the loader state.

    ``shuffle``/``seed``: permute each epoch with this seed (``False``: the dataset's order).
    ``lanes``/``window``: reading lanes and the window shuffled within each (``None``: the
    defaults, fixed by the first run's state). ``block_shuffle``: the block-aware shuffle
    (``None``: on for compressed shards), over units of ``blocks_per_group`` blocks.
    ``drop_last``: drop an epoch's last partial global batch (else pad it by wrapping).
    ``epoch_size``/``mixture_block``: a mixture's epoch length and interleaving block.
    """

    shuffle: bool = True
    seed: int = 0
    lanes: int | None = None
    window: int | None = None
    drop_last: bool = True
    block_shuffle: bool | None = None
    blocks_per_group: int = DEFAULT_BLOCKS_PER_GROUP
    epoch_size: int | None = None
    mixture_block: int | None = None

    def __post_init__(self) -> None:
        _bool(self.shuffle, "shuffle")
        _bool(self.drop_last, "drop_last")
        _bool(self.block_shuffle, "block_shuffle", optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        set_ = object.__setattr__
        set_(self, "lanes", _optional_int(self.lanes, "lanes", 1))
        set_(self, "window", _optional_int(self.window, "window", 1))
        set_(self, "blocks_per_group", check_int(self.blocks_per_group, "blocks_per_group",
                                                 minimum=1))
        set_(self, "epoch_size", _optional_int(self.epoch_size, "epoch_size", 1))
        set_(self, "mixture_block", _optional_int(self.mixture_block, "mixture_block", 1))


@dataclass(frozen=True)
class ReadOptions:
    """How shards are read; never which samples a step serves (not in the loader state).

    ``cache_dir``/``cache_limit``/``storage_options``: the node-wide cache of a remote dataset
    and the fsspec options (a ``Stream``'s own options win). ``block_cache``: bytes of
    decompressed blocks kept per dataset (``None``: sized to what the order keeps in flight).
    ``lookahead``: steps per prefetch hint given to remote sources. ``verify_blocks``: check
    each uncompressed block's xxh64 on first touch (``False`` only for data verified offline).
    """

    cache_dir: str | None = None
    cache_limit: int | str | None = None
    storage_options: dict | None = field(default=None, compare=False, hash=False)
    block_cache: int | str | None = None
    lookahead: int = 16
    verify_blocks: bool = True

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"cache_dir must be a path string or None, got {self.cache_dir!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError(f"storage_options must be a dict or None, got "
                              f"{self.storage_options!r:.80}")
        for name in ("cache_limit", "block_cache"):
            value = getattr(self, name)
            if value is not None and not (value in (0, "0") and name == "block_cache"):
                parse_size(value, name=name)  # "64MB", 1 << 30, ...: refused here, not at open
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) \
                or self.lookahead < 1:
            raise ConfigError(f"lookahead must be a positive int, got {self.lookahead!r}")
        _bool(self.verify_blocks, "verify_blocks")


ORDER_FIELDS = tuple(f.name for f in dataclasses.fields(OrderOptions))
READING_FIELDS = tuple(f.name for f in dataclasses.fields(ReadOptions))


def resolve(order: OrderOptions | None, reading: ReadOptions | None,
            keywords: Mapping[str, Any], owner: str) -> tuple[OrderOptions, ReadOptions]:
    """``(OrderOptions, ReadOptions)`` from the grouped values and the flat keywords of
    ``owner``'s constructor. An unknown keyword is a ``TypeError`` (as Python's own); an option
    given both in a group and as a keyword is a ``ConfigError``."""
    for name, kind, value in (("order", OrderOptions, order), ("reading", ReadOptions, reading)):
        if value is not None and not isinstance(value, kind):
            raise ConfigError(f"{name} must be a streamshard.{kind.__name__} or None, got "
                              f"{value!r:.80}")
    unknown = [k for k in keywords if k not in ORDER_FIELDS and k not in READING_FIELDS]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    groups = []
    for name, kind, value, fields in (("order", OrderOptions, order, ORDER_FIELDS),
                                      ("reading", ReadOptions, reading, READING_FIELDS)):
        flat = {k: v for k, v in keywords.items() if k in fields}
        if value is None:
            groups.append(kind(**flat))
            continue
        if flat:
            first = next(iter(flat))
            raise ConfigError(f"{first} is given both as a keyword and in {name}=: give it once "
                              f"(e.g. {name}={kind.__name__}(..., {first}={flat[first]!r}))")
        groups.append(value)
    return groups[0], groups[1]
