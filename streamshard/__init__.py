"""streamshard: sharded, checksummed datasets with a deterministic, world-size-aware sampler
and O(1) mid-epoch resume for PyTorch. See README.md and docs/API.md."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# Library code reports through the ``streamshard`` logger hierarchy (logging.getLogger(__name__)
# in each module) and never prints; an application, the CLI or the demo configures handlers.
logging.getLogger(__name__).addHandler(logging.NullHandler())

from streamshard.errors import (  # noqa: F401
    ConfigError,
    CorruptionError,
    DatasetExistsError,
    DestinationLockedError,
    FormatError,
    InputError,
    MissingDependencyError,
    SchemaError,
    StateMismatchError,
    StorageError,
    StreamshardError,
)
from streamshard.world import World, detect_world  # noqa: F401

# The heavier public names are imported lazily so `import streamshard` stays cheap and so
# modules can be developed independently.
_LAZY = {
    "ShardWriter": "streamshard.writer",
    "WriteSummary": "streamshard.writer",
    "open_dataset": "streamshard.reader",
    "Dataset": "streamshard.reader",
    "verify_dataset": "streamshard.verify",
    "merge_datasets": "streamshard.merge",
    "StreamingDataset": "streamshard.dataset",
    "Stream": "streamshard.streams",
    "StreamingDataLoader": "streamshard.loader",
    "NumpyBatchIterator": "streamshard.numpy_loader",
    "OrderOptions": "streamshard.options",
    "ReadOptions": "streamshard.options",
    "sample_rng": "streamshard.sampler.rng",
    "Packing": "streamshard.packing",
    "TokenBudget": "streamshard.packing",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamshard' has no attribute {name!r}")
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        from streamshard.errors import missing_dependency

        # The format, the sampler, the CLI's convert/inspect/verify and NumpyBatchIterator work
        # without torch; the PyTorch loader does not.
        raise missing_dependency("torch", "torch", f"streamshard.{name}") from exc


# The public names, and only these (docs/API.md lists exactly this list; a test checks it).
__all__ = [
    "ConfigError", "CorruptionError", "Dataset", "DatasetExistsError", "DestinationLockedError",
    "FormatError", "InputError", "MissingDependencyError", "NumpyBatchIterator", "OrderOptions",
    "Packing", "ReadOptions", "SchemaError", "ShardWriter", "StateMismatchError", "StorageError",
    "Stream", "StreamingDataLoader", "StreamingDataset", "StreamshardError", "TokenBudget",
    "World", "WriteSummary", "detect_world",
    "merge_datasets", "open_dataset", "sample_rng", "verify_dataset",
]
assert sorted(__all__) == __all__


def __dir__() -> list[str]:
    """``dir(streamshard)`` shows the lazily imported names too."""
    return sorted(set(globals()) | set(_LAZY))
