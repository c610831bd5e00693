"""Decoding encoded media columns where samples are read: in DataLoader workers, per sample.

Columns of type ``image`` and ``audio`` hold the encoded file bytes (PNG, JPEG, WAV, ...) and read
back as ``bytes`` (docs/FORMAT.md); nothing is decoded at conversion time, so a dataset is as
small as the files it came from. Decoding is a transform, so it runs in the loader's workers and
gets the per-sample generator ``sample_rng(seed, epoch, stream, sample_id)``: random
augmentations are the same for a sample whatever the world size or the number of workers, and
change with the epoch::

    from streamshard.media import ImageDecode, RandomFlip, RandomResizedCrop, decode_media

    transform = decode_media("data/imgs", image=ImageDecode(
        size=224, layout="CHW", augment=[RandomResizedCrop(), RandomFlip()]))
    ds = StreamingDataset("data/imgs", batch_size=64, transform=transform)
    # batch["image"]: uint8 tensor [64, 3, 224, 224]; batch["label"]: int64 [64]

Images are decoded by Pillow (``pip install 'streamshard[media]'``); audio by any hook, WAV by the
standard library's ``wave``; video by your hook (see docs/MEDIA.md). Decoders and augmentations
are small frozen values, picklable for spawned workers (lambdas are not: use functions).
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from streamshard.errors import ConfigError, CorruptionError, missing_dependency

Decoder = Callable[[bytes, np.random.Generator], Any]
Augment = Callable[[Any, np.random.Generator], Any]  # (PIL.Image, rng) -> PIL.Image

# Magic numbers of the image formats Pillow reads by default (and torchvision's ImageFolder
# takes by extension): for conversion-time checks without Pillow.
_IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def sniff_image(data: bytes) -> str | None:
    """The image format of ``data`` by its magic number (JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM),
    or ``None``. No decoding, no Pillow."""
    for magic, name in _IMAGE_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    return None


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:
        raise missing_dependency("pillow", "media", "Decoding image columns") from exc
    return Image


def _size_pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise ConfigError(f"{name} must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageDecode:
    """Encoded image bytes -> ``uint8`` array, ``HWC`` (default) or ``CHW``.

    ``mode`` is Pillow's (``RGB``, ``L`` gives one channel, ``RGBA``); ``augment`` (a callable or
    a list applied in order) gets the ``PIL.Image`` and the sample's generator before the resize
    to ``size`` (``int`` = square, or ``(height, width)``; ``None`` keeps the stored size, which
    then must be the same for every sample of a batch to collate)."""

    size: int | tuple[int, int] | None = None
    layout: str = "HWC"
    mode: str = "RGB"
    augment: Augment | Sequence[Augment] | None = None
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        _size_pair(self.size, "ImageDecode size")
        if self.layout not in ("HWC", "CHW"):
            raise ConfigError(f"ImageDecode layout must be 'HWC' or 'CHW', got {self.layout!r}")
        if self.resample not in _RESAMPLE:
            raise ConfigError(f"ImageDecode resample must be one of {', '.join(_RESAMPLE)}, "
                              f"got {self.resample!r}")
        if self.augment is not None and not callable(self.augment) and not all(
                callable(a) for a in self.augment):
            raise ConfigError("ImageDecode augment must be a callable (image, rng) or a list "
                              "of them")

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        Image = _pil()
        try:
            img = Image.open(io.BytesIO(data))
            img = img.convert(self.mode)
        except Exception as exc:  # Pillow raises many types for bad data
            kind = sniff_image(bytes(data[:16])) or "unknown format"
            raise CorruptionError(f"cannot decode image ({kind}, {len(data)} bytes): {exc}") from None
        augments = () if self.augment is None else (
            (self.augment,) if callable(self.augment) else tuple(self.augment))
        for aug in augments:
            img = aug(img, rng)
        hw = _size_pair(self.size, "size")
        if hw is not None and (img.height, img.width) != hw:
            img = img.resize((hw[1], hw[0]), getattr(Image.Resampling, self.resample.upper()))
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return np.ascontiguousarray(arr.transpose(2, 0, 1)) if self.layout == "CHW" else arr.copy()


@dataclass(frozen=True)
class RandomResizedCrop:
    """A crop of random area ``scale`` (fraction of the image) and aspect ``ratio`` (w/h, drawn
    log-uniformly), as in the ImageNet recipes; the resize happens in :class:`ImageDecode`. Falls
    back to a center crop after ten draws that do not fit."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, img: Any, rng: np.random.Generator) -> Any:
        width, height = img.size
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = float(np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]))))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return img.crop((left, top, left + w, top + h))
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return img.crop((left, top, left + side, top + side))


@dataclass(frozen=True)
class RandomFlip:
    """Mirror left-right with probability ``p``."""

    p: float = 0.5

    def __call__(self, img: Any, rng: np.random.Generator) -> Any:
        if rng.random() < self.p:
            return img.transpose(_pil().Transpose.FLIP_LEFT_RIGHT)
        return img


def decode_wav(data: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
    """WAV bytes (PCM 8/16/24/32-bit) -> ``float32`` array ``[channels, frames]`` in [-1, 1]."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, frames = w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise CorruptionError(f"cannot decode WAV audio ({len(data)} bytes): {exc}") from None
    if width == 1:
        pcm = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8  # sign-extend 24 bits
        pcm = value.astype(np.float32) / float(1 << 23)
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        pcm = np.frombuffer(raw, dtype).astype(np.float32) / float(1 << (8 * width - 1))
    else:
        raise CorruptionError(f"WAV sample width {width} bytes is not supported")
    return np.ascontiguousarray(pcm.reshape(-1, channels).T)


@dataclass(frozen=True)
class AudioDecode:
    """Encoded audio bytes -> whatever ``hook(data, rng)`` returns (default :func:`decode_wav`).
    Use a hook for FLAC/MP3/... (soundfile, torchaudio) or for random crops of the waveform."""

    hook: Decoder = decode_wav

    def __call__(self, data: bytes, rng: np.random.Generator) -> Any:
        return self.hook(data, rng)


@dataclass(frozen=True)
class MediaTransform:
    """A ``transform(sample, rng)`` that decodes ``decoders[column]`` in place, in column order,
    then applies ``then(sample, rng)``. Errors name the column."""

    decoders: Mapping[str, Decoder]
    then: Callable[[dict, np.random.Generator], Any] | None = None
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.decoders or not all(callable(d) for d in self.decoders.values()):
            raise ConfigError("MediaTransform needs a non-empty mapping column -> decoder")
        object.__setattr__(self, "_order", tuple(self.decoders))

    def __call__(self, sample: dict, rng: np.random.Generator) -> Any:
        for column in self._order:
            try:
                sample[column] = self.decoders[column](sample[column], rng)
            except KeyError:
                raise ConfigError(f"media column {column!r} is not in the sample (columns: "
                                  f"{', '.join(sample)})") from None
            except CorruptionError as exc:
                raise CorruptionError(f"column {column!r}: {exc}") from None
        return sample if self.then is None else self.then(sample, rng)


def decode_media(source: Any, *, image: Decoder | None = None, audio: Decoder | None = None,
                 then: Callable[[dict, np.random.Generator], Any] | None = None,
                 storage_options: dict | None = None) -> MediaTransform:
    """A :class:`MediaTransform` for every ``image`` column (``image``, default
    ``ImageDecode()``) and ``audio`` column (``audio``, default ``AudioDecode()``) of a dataset.
    ``source`` is a ``Schema``, an open dataset, or a path/URL (its index is read)."""
    from streamshard.schema import Schema

    if isinstance(source, Schema):
        schema = source
    elif hasattr(source, "schema"):
        schema = source.schema
    else:
        from streamshard.reader import open_dataset

        with open_dataset(source, storage_options=storage_options) as ds:
            schema = ds.schema
    decoders: dict[str, Decoder] = {}
    for name, ct in schema.columns.items():
        if ct.kind == "image":
            decoders[name] = image if image is not None else ImageDecode()
        elif ct.kind == "audio":
            decoders[name] = audio if audio is not None else AudioDecode()
    if not decoders:
        raise ConfigError(f"no image or audio columns in the schema {schema.to_json()}")
    return MediaTransform(decoders, then)
