"""An image folder with one sub-directory per class -> ``image``, ``label``, ``class``, ``path``.

The layout and the labels are those of torchvision's ``ImageFolder`` (torchvision/datasets/
folder.py, ``find_classes`` and ``make_dataset``; torchvision is not needed): the classes are the
sorted names of the non-hidden sub-directories of SRC, ``label`` is a class's position in that
list, and every file below a class directory (nested directories included) whose extension is an
image extension (any case) is a sample. Samples come in sorted relative-path order (which is
class order). The file bytes are stored unchanged in an ``image`` column (decode them in the
loader with :mod:`streamshard.media`); a file whose content is not a recognizable image (magic
number of JPEG, PNG, GIF, BMP, TIFF, WebP, PPM/PGM) is a bad record naming it.

Give the folder itself as SRC (``streamshard convert train/ data/train --format imagefolder``):
the class list is read from the directory above the class directories, so a glob of some files
still labels them as the whole folder does.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Mapping, Sequence

from streamshard.converters import Piece, ReadContext, register
from streamshard.errors import ConfigError, InputError
from streamshard.media import sniff_image

# torchvision's IMG_EXTENSIONS, in both cases (discovery matches extensions case-sensitively).
_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
COLUMNS = {"image": "image", "label": "int64", "class": "str", "path": "str"}


@functools.lru_cache(maxsize=64)
def classes_of(root: str) -> tuple[str, ...]:
    """Sorted non-hidden sub-directory names of ``root`` (torchvision's ``find_classes``)."""
    try:
        with os.scandir(root) as it:
            found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise InputError(f"{root}: cannot list the class directories: {exc}") from None
    if not found:
        raise InputError(f"{root}: no class directories (expected ROOT/CLASS/IMAGE files)")
    return tuple(found)


def _root_and_class(path: str, name: str) -> tuple[str, str]:
    """The folder root and class of an input file named ``name`` relative to its SRC."""
    parts = name.split("/")
    if len(parts) < 2:
        raise InputError(f"{name}: an image directly in the folder root has no class; "
                         f"expected ROOT/CLASS/{parts[-1]} (give the folder as SRC)")
    root = os.path.abspath(path)
    for _ in parts:
        root = os.path.dirname(root)
    return root, parts[0]


class ImageFolderConverter:
    name = "imagefolder"
    help = "a folder of images with one sub-directory per class (torchvision's ImageFolder)"
    options = ()
    extensions = _EXT + tuple(e.upper() for e in _EXT)

    def columns(self, files: Sequence[str], options: Mapping[str, Any]) -> dict[str, str]:
        if not files:
            raise ConfigError("--format imagefolder: no image files given")
        return dict(COLUMNS)

    def split(self, path: str, name: str, size: int, chunk_bytes: int,
              options: Mapping[str, Any]) -> list[Piece]:
        return [Piece(path, name, 0, 1, size)]

    def read(self, piece: Piece, options: Mapping[str, Any], ctx: ReadContext) -> Iterator[dict]:
        ctx.set_locator(lambda: piece.name)
        try:
            root, cls = _root_and_class(piece.path, piece.name)
            labels = {c: i for i, c in enumerate(classes_of(root))}
            with open(piece.path, "rb") as f:
                data = f.read()
        except InputError as exc:
            ctx.bad_record(exc)
            return
        except OSError as exc:
            ctx.bad_record(InputError(f"{piece.name}: cannot read: {exc}"))
            return
        ctx.advance(piece.nbytes)
        if sniff_image(data[:16]) is None:
            ctx.bad_record(InputError(f"{piece.name}: not an image file (no JPEG/PNG/GIF/BMP/"
                                      f"TIFF/WebP/PPM signature in its first bytes)"))
            return
        yield {"image": data, "label": labels[cls], "class": cls, "path": piece.name}


register("imagefolder", ImageFolderConverter())
