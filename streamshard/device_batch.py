"""``DeviceBatch``: how ``StreamingDataset`` hands a device batch to a plain ``DataLoader``.

The dataset already yields whole device batches; a plain ``DataLoader(ds)`` (``batch_size=1``)
or ``DataLoader(ds, batch_size=8)`` would batch them again and, with lists, silently produce
nested lists of one-element tensors. A ``DeviceBatch`` is a read-only sequence of samples that
is deliberately *not* a ``collections.abc.Sequence``: torch's ``default_convert``
(``batch_size=None``) passes it through untouched, while ``default_collate`` of a batch of them
raises ``TypeError`` whose text, the type's name, says what to write instead.
"""

from __future__ import annotations

from typing import Any, Iterator

FIX = ("StreamingDataset device batches (the dataset yields whole batches, so DataLoader(ds) or "
       "DataLoader(ds, batch_size=N) would batch them again): use StreamingDataLoader(ds), or "
       "DataLoader(ds, batch_size=None, collate_fn=streamshard.collate.collate)")


class _NamedForTheFix(type):
    # torch formats the offending type into its error message: make that text the fix.
    def __repr__(cls) -> str:
        return FIX

    __str__ = __repr__


class DeviceBatch(metaclass=_NamedForTheFix):
    """The samples of one device batch, in order: ``len``, indexing, iteration, ``==`` with a
    list. ``list(batch)`` gives a plain list."""

    __slots__ = ("_samples",)

    def __init__(self, samples: list):
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: Any) -> Any:
        return self._samples[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._samples)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeviceBatch):
            return self._samples == other._samples
        return isinstance(other, list) and self._samples == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DeviceBatch({self._samples!r})"
