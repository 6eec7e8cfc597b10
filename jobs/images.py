"""Writing finished images: atomically, with their generation parameters embedded.

PNG carries the parameters in a text chunk named ``parameters`` (what AUTOMATIC1111 writes and what
image browsers read); WebP and JPEG carry them in EXIF UserComment (UTF-16 with the ``UNICODE``
prefix, as piexif writes it).
"""
from __future__ import annotations

import hashlib
import os
import uuid
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PIL_FORMATS = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a hidden temp file beside ``path``, fsync it, then rename it to ``path``.

    A crash leaves either the old file (or none) under ``path`` or the whole new one, never a torn
    one; at worst a hidden ``.<name>.<hex>.tmp`` is left over, which readers ignore.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def write_image(pixels: np.ndarray, output_dir, rel_path: str, fmt: str, quality: int,
                parameters: str) -> tuple[str, int]:
    """Write an HxWx3 uint8 image to ``output_dir/rel_path``; return (sha256 hex, byte count)."""
    if fmt not in PIL_FORMATS:
        raise ValueError(f"fmt={fmt!r}: must be one of {', '.join(PIL_FORMATS)}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels: want an HxWx3 uint8 array, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels, "RGB")
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        kwargs = {"pnginfo": info}
    else:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        kwargs = {"exif": exif, "quality": quality}
    path = os.path.join(os.fspath(output_dir), rel_path)
    digest = []

    def write(f):
        image.save(f, format=PIL_FORMATS[fmt], **kwargs)
        f.flush()
        digest.append(sha256_file(f.name))

    atomic_write(path, write)
    return digest[0], os.path.getsize(path)


def read_parameters(path) -> str | None:
    """The generation parameters embedded by :func:`write_image`, or None."""
    with Image.open(path) as im:
        if im.format == "PNG":
            return im.info.get("parameters")
        raw = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not raw:
        return None
    if raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw[8:].decode("ascii", "replace")
