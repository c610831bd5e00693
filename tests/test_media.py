"""Images and audio (issue 13, item 3): ``image``/``audio`` columns, ``--format imagefolder`` and
WebDataset tars with images, decoding by Pillow in the loader's workers, and augmentations seeded
per sample so that they do not depend on the world size, the workers or a resume."""

from __future__ import annotations

import io
import os
import tarfile
import wave

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")
torch = pytest.importorskip("torch")

from streamshard import ShardWriter, StreamingDataLoader, StreamingDataset, World, open_dataset  # noqa: E402
from streamshard.cli import main  # noqa: E402
from streamshard.errors import ConfigError, CorruptionError, InputError  # noqa: E402
from streamshard.media import (  # noqa: E402
    AudioDecode, ImageDecode, MediaTransform, RandomFlip, RandomResizedCrop, decode_media,
    decode_wav, sniff_image,
)
from streamshard.schema import Schema  # noqa: E402


def encode(arr: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    PIL.fromarray(arr).save(out, format=fmt)
    return out.getvalue()


def picture(seed: int, h: int = 20, w: int = 30) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def pil_decode(data: bytes, size=None) -> np.ndarray:
    img = PIL.open(io.BytesIO(data)).convert("RGB")
    if size:
        img = img.resize((size[1], size[0]), PIL.Resampling.BILINEAR)
    return np.asarray(img)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/CLASS/... like torchvision's ImageFolder, with the files that must be left out."""
    root = tmp_path_factory.mktemp("imgs") / "train"
    files = {"cat/a.png": ("PNG", 1), "cat/b.JPG": ("JPEG", 2), "dog/c.jpeg": ("JPEG", 3),
             "dog/nested/d.png": ("PNG", 4), "zebra/e.bmp": ("BMP", 5),
             ".hidden/x.png": ("PNG", 6)}
    for rel, (fmt, seed) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(picture(seed), fmt))
    (root / "cat" / "notes.txt").write_text("not an image, not an image extension")
    return root


def convert_folder(folder, dest, *extra) -> int:
    return main(["convert", str(folder), str(dest), "--format", "imagefolder", "--quiet", *extra])


def test_media_types_store_bytes_and_keep_their_type(tmp_path):
    schema = Schema({"img": "image", "snd": "audio", "y": "int64"})
    assert schema.to_json() == {"img": "image", "snd": "audio", "y": "int64"}
    png = encode(picture(0), "PNG")
    with ShardWriter(str(tmp_path / "ds"), columns=schema) as w:
        w.write({"img": png, "snd": b"RIFF....", "y": 1})
    with open_dataset(str(tmp_path / "ds")) as ds:
        assert ds.schema.to_json()["img"] == "image" and ds[0]["img"] == png


def test_imagefolder_labels_like_torchvision(folder, tmp_path):
    assert convert_folder(folder, tmp_path / "ds") == 0
    with open_dataset(str(tmp_path / "ds")) as ds:
        got = [ds[i] for i in range(len(ds))]
        assert ds.schema.to_json() == {"image": "image", "label": "int64", "class": "str",
                                       "path": "str"}
    # classes: sorted non-hidden directories (cat, dog, zebra); files in sorted path order
    assert [(g["path"], g["label"], g["class"]) for g in got] == [
        ("cat/a.png", 0, "cat"), ("cat/b.JPG", 0, "cat"), ("dog/c.jpeg", 1, "dog"),
        ("dog/nested/d.png", 1, "dog"), ("zebra/e.bmp", 2, "zebra")]
    for g in got:  # stored unchanged
        assert g["image"] == (folder / g["path"]).read_bytes()


def test_imagefolder_bad_file_is_named_and_skippable(folder, tmp_path):
    bad = tmp_path / "bad"
    (bad / "cls").mkdir(parents=True)
    (bad / "cls" / "ok.png").write_bytes(encode(picture(1), "PNG"))
    (bad / "cls" / "broken.png").write_bytes(b"this is text, not a PNG")
    with pytest.raises(InputError, match="cls/broken.png: not an image file"):
        main(["--debug", "convert", str(bad), str(tmp_path / "o"), "--format", "imagefolder",
              "--quiet"])
    assert main(["convert", str(bad), str(tmp_path / "o"), "--format", "imagefolder", "--quiet",
                 "--skip-errors", "--overwrite"]) == 0
    with open_dataset(str(tmp_path / "o")) as ds:
        assert len(ds) == 1


def make_loader(path, *, rank=0, world_size=1, workers=0, seed=3, transform=None):
    ds = StreamingDataset(path, global_batch_size=4 if world_size == 1 else 4, seed=seed,
                          world=World(rank, world_size), transform=transform, drop_last=False)
    kw = {"multiprocessing_context": "fork"} if workers else {}
    return StreamingDataLoader(ds, num_workers=workers, **kw)


def test_loader_decodes_to_uint8_chw_tensors(folder, tmp_path):
    dest = str(tmp_path / "ds")
    convert_folder(folder, dest)
    transform = decode_media(dest, image=ImageDecode(size=(8, 12), layout="CHW"))
    batch = next(iter(make_loader(dest, transform=transform)))
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (4, 3, 8, 12)
    for img, path in zip(batch["image"], batch["path"]):
        want = pil_decode((folder / path).read_bytes(), (8, 12)).transpose(2, 0, 1)
        assert np.array_equal(img.numpy(), want), path


AUGMENT = ImageDecode(size=16, augment=[RandomResizedCrop(scale=(0.2, 0.6)), RandomFlip()])


def images_by_path(loader, epochs=1) -> list[dict]:
    out = []
    for _ in range(epochs):
        seen = {}
        for batch in loader:
            for img, path in zip(batch["image"], batch["path"]):
                seen[path] = img.numpy().copy()
        out.append(seen)
    return out


def test_augmentations_follow_the_sample_not_the_world_or_workers(folder, tmp_path):
    dest = str(tmp_path / "ds")
    convert_folder(folder, dest)
    transform = decode_media(dest, image=AUGMENT)
    one = images_by_path(make_loader(dest, transform=transform), epochs=2)
    workers = images_by_path(make_loader(dest, transform=transform, workers=2))[0]
    ranks: dict = {}
    for r in range(2):
        ranks.update(images_by_path(make_loader(dest, rank=r, world_size=2,
                                                transform=transform))[0])
    assert set(one[0]) == set(workers) == set(ranks) and len(one[0]) == 5
    for path in one[0]:
        assert np.array_equal(one[0][path], workers[path]), path
        assert np.array_equal(one[0][path], ranks[path]), path
    # a new epoch draws new crops, a new seed too
    assert any(not np.array_equal(one[0][p], one[1][p]) for p in one[0])
    other = images_by_path(make_loader(dest, transform=transform, seed=4))[0]
    assert any(not np.array_equal(one[0][p], other[p]) for p in one[0])


def wav_bytes(pcm: np.ndarray, width: int, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(width)
        w.setframerate(rate)
        frames = pcm.T.reshape(-1)
        if width == 3:
            raw = np.stack([(frames >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8)
            w.writeframes(raw.tobytes())
        else:
            w.writeframes(frames.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes())
    return out.getvalue()


@pytest.mark.parametrize("width,lo,hi,scale,offset", [
    (2, -2**15, 2**15, 2**15, 0),  # 16-bit: the common case
    (3, -2**23, 2**23, 2**23, 0),  # 24-bit: unpacked by hand (numpy has no int24)
    (1, 0, 256, 128, 128),         # 8-bit WAV is unsigned
])
def test_wav_decodes_to_float_channels_first(width, lo, hi, scale, offset):
    pcm = np.random.default_rng(width).integers(lo, hi, (2, 50))
    got = decode_wav(wav_bytes(pcm, width))
    assert got.dtype == np.float32 and got.shape == (2, 50)
    np.testing.assert_allclose(got, (pcm - offset) / scale, atol=1e-6)


def test_audio_column_with_default_and_custom_hook(tmp_path):
    pcm = np.arange(-20, 20, dtype=np.int64).reshape(2, 20) * 1000
    with ShardWriter(str(tmp_path / "a"), columns={"snd": "audio", "y": "int64"}) as w:
        for i in range(4):
            w.write({"snd": wav_bytes(pcm, 2), "y": i})
    batch = next(iter(make_loader(str(tmp_path / "a"), transform=decode_media(str(tmp_path / "a")))))
    assert tuple(batch["snd"].shape) == (4, 2, 20)

    def first_ten(data, rng):  # a hook: decode and crop
        return decode_wav(data)[:, :10]

    t = decode_media(str(tmp_path / "a"), audio=AudioDecode(first_ten))
    assert tuple(next(iter(make_loader(str(tmp_path / "a"), transform=t)))["snd"].shape) == (4, 2, 10)


def test_webdataset_tar_with_jpegs_converts_and_decodes(tmp_path):
    tar_path = tmp_path / "shard-000.tar"
    pics = {f"s{i:03d}": encode(picture(i, 12, 10), "JPEG") for i in range(6)}
    with tarfile.open(tar_path, "w") as tar:
        for key, data in pics.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(int(key[1:]) % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    dest = str(tmp_path / "wds")
    assert main(["convert", str(tar_path), dest, "--format", "webdataset", "--quiet"]) == 0
    with open_dataset(dest) as ds:
        assert ds.schema.to_json()["jpg"] == "image"
    t = decode_media(dest, image=ImageDecode(layout="HWC"))
    batch = next(iter(make_loader(dest, transform=t)))
    assert tuple(batch["jpg"].shape) == (4, 12, 10, 3)
    for img, key in zip(batch["jpg"], batch["__key__"]):
        assert np.array_equal(img.numpy(), pil_decode(pics[key]))


def test_errors_name_the_column_and_the_fix():
    bad = MediaTransform({"img": ImageDecode()})
    with pytest.raises(CorruptionError, match=r"column 'img': cannot decode image \(unknown format"):
        bad({"img": b"nope"}, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="media column 'img' is not in the sample"):
        bad({"other": b""}, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="layout must be 'HWC' or 'CHW'"):
        ImageDecode(layout="NHWC")
    with pytest.raises(ConfigError, match="no image or audio columns"):
        decode_media(Schema({"x": "bytes"}))


@pytest.mark.parametrize("fmt,name", [("PNG", "PNG"), ("JPEG", "JPEG"), ("BMP", "BMP"),
                                      ("GIF", "GIF"), ("TIFF", "TIFF"), ("WEBP", "WEBP"),
                                      ("PPM", "PPM")])
def test_sniff_image_knows_what_pillow_writes(fmt, name):
    assert sniff_image(encode(picture(0, 4, 4), fmt)) == name
    assert sniff_image(b"plain text") is None
