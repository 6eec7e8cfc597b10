import hashlib
import os

import numpy as np
import pytest
from PIL import Image

import jobs.images
from jobs import read_parameters, sha256_file, write_image

TEXT = "a lake at dawn, café 🌄\nNegative prompt: blurry\nSteps: 20, Sampler: euler, Seed: 1"


def pixels(h=17, w=23, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def visible(folder):
    return sorted(p for p in os.listdir(folder) if not p.startswith("."))


def test_png_round_trip(tmp_path):
    px = pixels()
    sha, n = write_image(px, tmp_path, "images/job/abc.png", "png", 95, TEXT)
    path = tmp_path / "images/job/abc.png"
    data = path.read_bytes()
    assert n == len(data) == os.path.getsize(path)
    assert sha == hashlib.sha256(data).hexdigest() == sha256_file(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.text["parameters"] == TEXT
        np.testing.assert_array_equal(np.asarray(im), px)
    assert read_parameters(path) == TEXT
    assert os.listdir(path.parent) == ["abc.png"]  # no temp file left


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_lossy_formats_carry_parameters_in_exif(tmp_path, fmt):
    px = np.full((16, 24, 3), (200, 40, 90), np.uint8)
    sha, n = write_image(px, tmp_path, f"x.{fmt}", fmt, 90, TEXT)
    path = tmp_path / f"x.{fmt}"
    assert (sha, n) == (sha256_file(path), path.stat().st_size)
    with Image.open(path) as im:
        assert im.format == {"webp": "WEBP", "jpeg": "JPEG"}[fmt] and im.size == (24, 16)
        assert np.abs(np.asarray(im).astype(int) - px).max() <= 8
        raw = im.getexif().get_ifd(0x8769)[0x9286]
    assert raw == b"UNICODE\0" + TEXT.encode("utf-16-be")
    assert read_parameters(path) == TEXT


def test_same_input_same_bytes(tmp_path):
    a = write_image(pixels(), tmp_path, "a.png", "png", 95, TEXT)
    b = write_image(pixels(), tmp_path, "b.png", "png", 95, TEXT)
    c = write_image(pixels(seed=1), tmp_path, "c.png", "png", 95, TEXT)
    assert a == b and a[0] != c[0]


def test_failed_rename_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    old_sha, _ = write_image(pixels(seed=1), tmp_path, "a.png", "png", 95, "old")

    def crash(src, dst):
        raise OSError("disk gone")
    monkeypatch.setattr(jobs.images.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_image(pixels(seed=2), tmp_path, "a.png", "png", 95, "new")
    assert os.listdir(tmp_path) == ["a.png"]
    assert sha256_file(tmp_path / "a.png") == old_sha
    assert read_parameters(tmp_path / "a.png") == "old"


def test_crash_mid_write_leaves_no_file_under_final_name(tmp_path, monkeypatch):
    def half_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG\r\n\x1a\n half an image")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        write_image(pixels(), tmp_path, "sub/a.png", "png", 95, TEXT)
    assert os.listdir(tmp_path / "sub") == []


def test_temp_file_is_hidden_and_in_the_same_folder(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((src, dst))
        real(src, dst)
    monkeypatch.setattr(jobs.images.os, "replace", spy)
    write_image(pixels(), tmp_path, "d/a.png", "png", 95, TEXT)
    (src, dst), = seen
    assert os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path / "d")
    assert os.path.basename(src).startswith(".a.png.") and dst == str(tmp_path / "d/a.png")


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8)])
def test_rejects_bad_pixels(tmp_path, bad):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        write_image(bad, tmp_path, "a.png", "png", 95, "")
    assert visible(tmp_path) == []


def test_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="fmt='gif'"):
        write_image(pixels(), tmp_path, "a.gif", "gif", 95, "")


def test_sha256_file_streams(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()
