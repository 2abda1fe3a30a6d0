"""Decoding and preprocessing: every supported kind of upload becomes the reference tensor."""

from __future__ import annotations

import io
import logging
import math
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps, PngImagePlugin
from torchvision import transforms

from classification import (
    ImageTooLarge,
    InvalidImage,
    decode_image,
    normalize_batch,
    preprocess,
)
from classification.preprocess import (
    BMP_RLE_PIXEL_COST,
    GIF_MAX_BLOCKS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JPEG_MAX_SCANS,
    JPEG_MAX_SEGMENTS,
    LIBTIFF_MAX_LINES,
    MAX_SIDE,
    PNG_MAX_CHUNKS,
    ROW_BLOCK_PIXELS,
    _high_depth_to_l,
    _jpeg_scan_count,
)
from tests import images
from tests.support import Reference

MAX_PIXELS = 40_000_000


# One 8-bit level after normalisation.
ONE_LEVEL = 1 / 255 / min(0.229, 0.224, 0.225) + 1e-6


def model_input(data: bytes) -> torch.Tensor:
    """What the network receives for one upload: its crop, normalised as part of a batch."""
    crop = preprocess(data, max_pixels=MAX_PIXELS)
    assert crop.shape == (224, 224, 3)
    assert crop.dtype == np.uint8
    return normalize_batch(torch.from_numpy(np.stack([crop])))[0]


def assert_matches_reference(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_matches_torchvision_reference_on_photos(photos: list[Path], reference: Reference) -> None:
    """The served input tensor equals torchvision's transform of the same photo."""
    for path in photos:
        ours = model_input(path.read_bytes())
        assert_matches_reference(ours, reference.input_for(images.photo(path)))


def test_a_batch_normalises_each_crop_as_torchvision_does(photos: list[Path]) -> None:
    crops = [preprocess(path.read_bytes(), max_pixels=MAX_PIXELS) for path in photos]
    batch = normalize_batch(torch.from_numpy(np.stack(crops)))
    expected = torch.stack(
        [
            transforms.functional.normalize(
                transforms.functional.to_tensor(crop.copy()), IMAGENET_MEAN, IMAGENET_STD
            )
            for crop in crops
        ]
    )
    assert torch.equal(batch, expected)
    assert batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "size",
    [
        (37, 29),
        (224, 224),
        (256, 256),
        (300, 1200),
        (1501, 999),
        (1023, 257),
        (257, 1023),
        (256, 259),
        (3, 12),
        (164, 677),  # aspect ratios up to 16:1
        (2000, 257),
        (257, 4100),
    ],
)
def test_matches_torchvision_reference_at_many_sizes(
    photos: list[Path], reference: Reference, size: tuple[int, int]
) -> None:
    """Up- and downscaling, either orientation, odd sizes: still the reference tensor. The
    crop's offset is rounded half to even, as torchvision's is (a margin of 35 or 795 px:
    17.5 and 397.5 become 18 and 398), across and down."""
    image = images.photo(photos[0]).resize(size)
    assert_matches_reference(
        model_input(images.encode(image, "PNG")),
        reference.input_for(image),
    )


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("P", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
        ("RGB", "TIFF"),
        ("RGB", "BMP"),
        ("L", "JPEG"),
        ("1", "PNG"),
    ],
)
def test_modes_and_formats_decode_to_rgb(mode: str, fmt: str) -> None:
    source = images.gradient().convert(mode)
    decoded = decode_image(images.encode(source, fmt), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.size == source.size


def test_transparency_is_composited_on_white() -> None:
    """Fully transparent pixels show as white, whatever colour they hide."""
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    decoded = decode_image(images.encode(rgba, "PNG"), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((5, 5)) == (255, 255, 255)

    half = Image.new("LA", (32, 32), (0, 128))
    grey = decode_image(images.encode(half, "PNG"), max_pixels=MAX_PIXELS).getpixel((1, 1))
    assert all(120 <= channel <= 135 for channel in grey)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_partial_transparency_blends_as_alpha_compositing_over_white(mode: str) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    source = Image.fromarray(pixels, "RGBA").convert(mode)
    white = Image.new("RGBA", source.size, (255, 255, 255, 255))
    expected = Image.alpha_composite(white, source.convert("RGBA")).convert("RGB")
    decoded = decode_image(images.encode(source, "PNG"), max_pixels=MAX_PIXELS)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_a_bmp_whose_alpha_is_all_zero_is_opaque_and_one_with_alpha_is_composited() -> None:
    """Photoshop writes 32-bit BMPs with an alpha channel left at 0, which viewers show
    opaque: composited through it, the photo would become a blank white image."""
    rgb = np.asarray(images.gradient(48, 32))
    unset = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    decoded = decode_image(images.bitfields_bmp(unset), max_pixels=MAX_PIXELS)
    assert np.array_equal(np.asarray(decoded), rgb)

    used = unset.copy()
    used[:, 24:, 3] = 255  # the left half transparent, the right half opaque
    decoded = np.asarray(decode_image(images.bitfields_bmp(used), max_pixels=MAX_PIXELS))
    assert (decoded[:, :24] == 255).all()
    assert np.array_equal(decoded[:, 24:], rgb[:, 24:])


def test_palette_with_transparency() -> None:
    palette_image = Image.new("P", (16, 16), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = images.encode(palette_image, "PNG", transparency=0)
    assert decode_image(data, max_pixels=MAX_PIXELS).getpixel((0, 0)) == (255, 255, 255)


def _keyed_png_cases() -> list[tuple[str, bytes, bytes, np.ndarray]]:
    """PNGs without an alpha channel whose tRNS chunk names a transparent colour: each with
    the same PNG without the chunk, and where the source has the key colour."""
    rng = np.random.default_rng(5)
    cases = []
    rgb = rng.integers(0, 4, (40, 50, 3), dtype=np.uint8) * 60
    cases.append(("RGB", Image.fromarray(rgb), (60, 120, 0), (rgb == (60, 120, 0)).all(axis=2)))
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    cases.append(("L", Image.fromarray(grey), int(grey[3, 4]), grey == grey[3, 4]))
    deep = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    cases.append(("I;16", Image.fromarray(deep), int(deep[3, 4]), deep == deep[3, 4]))
    bilevel = rng.integers(0, 2, (40, 50), dtype=np.uint8).astype(bool)
    cases.append(("1", Image.fromarray(bilevel), 0, ~bilevel))
    encoded = [
        (name, images.encode(image, "PNG", transparency=key), images.encode(image, "PNG"), where)
        for name, image, key, where in cases
    ]
    levels = rng.integers(0, 4, (40, 50), dtype=np.uint8)
    encoded.append(("2-bit L", images.two_bit_grey_png(levels, key=1), b"", levels == 1))
    return encoded


@pytest.mark.parametrize(
    ("keyed", "plain", "where"),
    [case[1:] for case in _keyed_png_cases()],
    ids=[case[0] for case in _keyed_png_cases()],
)
def test_a_png_colour_key_is_transparent_as_an_alpha_channel_is(
    keyed: bytes, plain: bytes, where: np.ndarray
) -> None:
    """Pixels of the colour a PNG's tRNS chunk names show white, as alpha 0 does; the others
    are as without the chunk."""
    decoded = np.asarray(decode_image(keyed, max_pixels=MAX_PIXELS))
    assert where.any()
    assert not where.all()
    assert (decoded[where] == 255).all()
    if plain:
        unkeyed = np.asarray(decode_image(plain, max_pixels=MAX_PIXELS))
        assert np.array_equal(decoded[~where], unkeyed[~where])
    else:  # 2 bits a sample: levels 0-3 stretched to 0, 85, 170, 255
        assert set(np.unique(decoded[~where]).tolist()) <= {0, 170, 255}


def test_a_sixteen_bit_rgb_colour_key_is_left_alone() -> None:
    """Pillow keeps 8 bits of each 16-bit sample, so pixels near the key colour would be
    taken for it: such a key is not applied (the README says so)."""
    pixels = np.zeros((4, 6, 3), np.uint16)
    pixels[:, :3] = (256, 256, 256)  # 8 bits of it: (1, 1, 1), but not the key colour
    pixels[:, 3:] = (1, 1, 1)  # the key colour, which 8 bits cannot tell from black
    decoded = np.asarray(
        decode_image(images.sixteen_bit_rgb_png(pixels, (1, 1, 1)), max_pixels=MAX_PIXELS)
    )
    assert (decoded[:, :3] == 1).all()
    assert (decoded[:, 3:] == 0).all()


def _scaled_to_8_bits_whole(image: Image.Image) -> np.ndarray:
    """The 8-bit values of a high-depth image computed in one pass over the whole image,
    against which the scaling a block of rows at a time is checked."""
    limit = float(np.finfo(np.float32).max)
    pixels = np.nan_to_num(np.asarray(image, np.float64), nan=0.0, posinf=limit, neginf=-limit)
    peak = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
    if image.mode == "F" and pixels.max(initial=0) <= 1:
        peak = 1.0
    return np.clip(pixels * (255.0 / peak), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "F bright", "F unit"])
def test_high_depth_images_scale_in_blocks_as_over_the_whole(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled a few rows at a time, the values are those of the whole image at once: the
    range of 32-bit and float images still comes from the whole image."""
    monkeypatch.setitem(_high_depth_to_l.__globals__, "ROW_BLOCK_PIXELS", 64)
    rng = np.random.default_rng(9)
    if mode == "I;16":
        pixels = rng.integers(0, 65536, (37, 29), dtype=np.uint16)
    elif mode == "I":
        pixels = rng.integers(-100, 250, (37, 29), dtype=np.int32)
        pixels[36, 28] = 70_000  # the one bright value, in the last block
    elif mode == "F unit":
        pixels = rng.uniform(-0.1, 1, (37, 29)).astype(np.float32)
        pixels[0, :2] = (np.nan, -np.inf)
    else:
        pixels = rng.uniform(-10, 300 if mode == "F bright" else 250, (37, 29)).astype(np.float32)
        pixels[0, :3] = (np.nan, np.inf, -np.inf)
    image = Image.fromarray(pixels)
    scaled = np.asarray(_high_depth_to_l(image))
    assert np.array_equal(scaled, _scaled_to_8_bits_whole(image))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_high_depth_image_decodes_without_whole_image_float_copies(fmt: str) -> None:
    """A 16-bit PNG or float TIFF decoded through float64 copies of the whole image would
    take about 28 bytes a pixel: a 556 KB upload of 40 megapixels, 1.1 GB. Pixel arrays stay
    small."""
    width, height = 2000, 1500
    ramp = np.linspace(0, 65535 if fmt == "PNG" else 1.0, width * height)
    pixels = ramp.astype(np.uint16 if fmt == "PNG" else np.float32).reshape(height, width)
    data = images.encode(Image.fromarray(pixels), fmt)
    tracemalloc.start()
    try:
        decode_image(data, max_pixels=MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The 8-bit result, and a block of rows or two in float64.
    assert peak < width * height + 2 * 8 * ROW_BLOCK_PIXELS


def test_a_run_length_encoded_bmp_counts_its_slow_decoding_against_the_pixel_limit() -> None:
    """Pillow decodes RLE BMPs in Python: 26 KB of one could hold a thread for 12 s."""
    limit = 1_000_000
    allowed = limit // BMP_RLE_PIXEL_COST
    small = np.asarray(decode_image(images.rle8_bmp(100, allowed // 100), max_pixels=limit))
    assert (small[:, 0] == 5).all()  # palette index 5 is grey 5 in this palette
    assert (small[:, 1:] == 0).all()
    started = time.monotonic()
    with pytest.raises(ImageTooLarge, match="run-length-encoded BMP"):
        decode_image(images.rle8_bmp(100, allowed // 100 + 1), max_pixels=limit)
    with pytest.raises(ImageTooLarge, match=r"at most 2500000 of either \(MAX_IMAGE_PIXELS / 16"):
        decode_image(images.rle8_bmp(6324, 6324), max_pixels=MAX_PIXELS)
    # A few pixels and megabytes of codes that draw nothing: 10 MiB took Pillow 4.9 s.
    with pytest.raises(ImageTooLarge, match=r"64x64 = 4096 pixels in 4[0-9]{6} bytes"):
        decode_image(images.rle8_bmp(64, 64, idle_codes=1_000_000), max_pixels=MAX_PIXELS)
    assert time.monotonic() - started < 1  # refused before decoding


def test_sixteen_bit_greyscale_keeps_its_range() -> None:
    """16-bit values are scaled to 8 bits, not clipped at 255."""
    decoded = np.asarray(decode_image(images.sixteen_bit_grey_png(), max_pixels=MAX_PIXELS))
    assert decoded.min() == 0
    assert decoded.max() == 255
    assert 100 < decoded.mean() < 155


def test_a_float_image_of_values_up_to_one_is_scaled_by_255() -> None:
    """Float images mostly hold 0..1: read as 8-bit levels, such a TIFF would be all black,
    and classified as a black image. Up to 1 it is taken for that scale; above, for 8-bit
    levels (or 16-bit ones past 255)."""
    grey = images.gradient(60, 40).convert("L")
    levels = np.asarray(grey, dtype=np.float32)
    for pixels in (levels / 255, levels):
        data = images.encode(Image.fromarray(pixels, "F"), "TIFF")
        decoded = np.asarray(decode_image(data, max_pixels=MAX_PIXELS).convert("L"))
        assert np.abs(decoded.astype(int) - np.asarray(grey)).max() <= 1


def test_a_dark_sixteen_bit_image_stays_dark() -> None:
    """The scale comes from the bit depth, not the content: 16-bit values up to 254 are
    near black, not read as 8-bit levels."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(255, dtype=np.uint16).reshape(15, 17)).save(buffer, "PNG")
    decoded = np.asarray(decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS))
    assert decoded.max() == 1


def test_exif_orientation_is_applied() -> None:
    upright = images.gradient(320, 240)
    decoded = decode_image(images.exif_rotated_jpeg(upright, 6), max_pixels=MAX_PIXELS)
    assert decoded.size == (240, 320)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((4032, 3024), (2016, 1512)),  # a phone camera's size
        ((8192, 4096), (2048, 1024)),
        ((8000, 4100), (2000, 1025)),
        ((8190, 4098), (4095, 2049)),  # halves evenly, quarters not
        ((4097, 3072), (4097, 3072)),  # an odd side: libjpeg would round it up
        ((2046, 3000), (2046, 3000)),  # halving would leave the shorter side below 1024
    ],
)
def test_large_jpegs_decode_at_reduced_scale(
    size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    """libjpeg scales in the DCT domain by the largest of 1/8, 1/4, 1/2 that divides both
    sides and keeps the shorter one at least 4 x 256."""
    data = images.encode(images.gradient(*size), "JPEG", quality=85)
    assert decode_image(data, max_pixels=MAX_PIXELS).size == decoded


def test_a_jpeg_decodes_at_full_size_when_asked() -> None:
    """For a model that needs every pixel, or the image's own coordinates."""
    data = images.encode(images.gradient(4032, 3024), "JPEG", quality=85)
    assert decode_image(data, max_pixels=MAX_PIXELS, min_side=None).size == (4032, 3024)
    assert decode_image(data, max_pixels=MAX_PIXELS, min_side=3024).size == (4032, 3024)


def test_other_formats_decode_at_full_size() -> None:
    data = images.encode(images.gradient(2200, 2100), "PNG")
    assert decode_image(data, max_pixels=MAX_PIXELS).size == (2200, 2100)


def test_a_reduced_decode_keeps_exif_orientation() -> None:
    stored = images.gradient(2100, 4200)
    decoded = decode_image(images.exif_rotated_jpeg(stored, 6), max_pixels=MAX_PIXELS)
    assert decoded.size == (4200 // 2, 2100 // 2)  # halved, then turned a quarter


def plain_pillow(data: bytes) -> np.ndarray:
    """What torchvision's reference decodes: Image.open(...).convert("RGB"), no orientation."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def with_exif(image: Image.Image, fmt: str, exif: bytes) -> bytes:
    """``image`` encoded with ``exif`` in the format's EXIF slot, bytes as given."""
    if fmt == "PNG":
        return images.with_png_chunk(images.encode(image, "PNG"), b"eXIf", exif)
    if fmt == "JPEG":
        return images.with_jpeg_app1(images.encode(image, "JPEG", quality=90), exif)
    return images.encode(image, fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize(
    "exif",
    [
        bytes(range(50, 100)),
        b"Exif\x00\x00" + bytes(range(50, 100)),
        b"II*\x00",  # a TIFF header and nothing more
        b"<x:xmpmeta></x:xmpmeta>",  # XMP written to the EXIF slot
    ],
    ids=["random", "header-then-random", "bare-tiff-header", "xmp-text"],
)
def test_an_image_with_malformed_exif_is_decoded_as_stored(
    fmt: str, exif: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Such files are not refused as corrupt, as torchvision's reference decodes them: the
    pixels are good, only the orientation is lost, and that is logged."""
    data = with_exif(images.gradient(60, 40), fmt, exif)
    with caplog.at_level(logging.INFO, logger="classification.preprocess"):
        decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert np.array_equal(np.asarray(decoded), plain_pillow(data))
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "EXIF cannot be read" in caplog.records[0].getMessage()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_doubled_exif_header_still_gives_the_orientation(fmt: str) -> None:
    """A client wrote "Exif\\0\\0" twice (python-pillow/Pillow#8348): Pillow reads that in a
    JPEG or WebP, and a PNG's eXIf chunk, which has no such header, reads as they do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    tiff = exif.tobytes()[len(b"Exif\x00\x00") :]
    data = with_exif(images.gradient(60, 40), fmt, b"Exif\x00\x00Exif\x00\x00" + tiff)
    assert decode_image(data, max_pixels=MAX_PIXELS).size == (40, 60)


def test_the_orientation_applies_when_another_tag_has_an_unexpected_type() -> None:
    """ImageOps.exif_transpose writes the EXIF back, and fails on a tag whose type is not
    the one in Pillow's table (here a LONG where a BYTE is expected): only the orientation
    is needed, so the image is turned all the same."""
    stored = images.gradient(60, 40)
    orientation = (0x0112, 3, 1, struct.pack("<HH", 6, 0))  # SHORT 6
    retyped = (0x02BC, 4, 1, struct.pack("<I", 300))  # XMP tag, a LONG
    data = with_exif(stored, "JPEG", b"Exif\x00\x00" + images.exif_block([orientation, retyped]))
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    expected = Image.fromarray(plain_pillow(data)).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pillow_does(fmt: str, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = images.encode(images.gradient(60, 40), fmt, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as image:
        expected = ImageOps.exif_transpose(image).convert("RGB")
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.size == ((40, 60) if orientation >= 5 else (60, 40))
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_a_reduced_decode_stays_close_to_reference(
    photos: list[Path], reference: Reference
) -> None:
    """The DCT-domain reduction is an area filter, not the antialiased bilinear one: some
    values differ, by a fraction of an 8-bit level on average and a few levels at most; a
    sampling grid shifted by part of a pixel would differ by tens of levels. (Served
    answers are checked against torchvision's, large photos included, in
    ``test_served_agreement``.)"""
    for path in photos:
        image = images.photo(path).resize((4032, 3024), Image.Resampling.BICUBIC)
        data = images.encode(image, "JPEG", quality=90)
        with Image.open(io.BytesIO(data)) as full:
            theirs = reference.input_for(full)
        difference = (model_input(data) - theirs).abs()
        assert difference.mean().item() < 0.25 * ONE_LEVEL
        assert difference.max().item() < 4 * ONE_LEVEL


def test_animated_gif_uses_first_frame() -> None:
    decoded = decode_image(images.animated_gif(), max_pixels=MAX_PIXELS)
    assert decoded.size == (40, 30)
    assert decoded.getpixel((0, 0)) == decoded.getpixel((10, 10))


@pytest.mark.parametrize("size", [(4200, 257), (97, 3000), (10_000, 7), (5, 4000)])
def test_extreme_aspect_ratios_stay_within_one_level_of_reference(
    photos: list[Path], reference: Reference, size: tuple[int, int]
) -> None:
    """Past 16:1 only the cropped region is resampled: bounded work, same picture."""
    image = images.photo(photos[1]).resize(size)
    ours = model_input(images.encode(image, "PNG"))
    difference = (ours - reference.input_for(image)).abs()
    assert difference.max().item() <= ONE_LEVEL
    assert (difference > 1e-6).float().mean().item() < 0.1


@pytest.mark.parametrize("size", [(1, 1), (10_000, 1), (1, 10_000), (64, 4000)])
def test_degenerate_sizes_give_model_input_quickly(size: tuple[int, int]) -> None:
    data = images.encode(Image.new("RGB", size, (10, 200, 30)), "PNG")
    started = time.perf_counter()
    pixels = preprocess(data, max_pixels=MAX_PIXELS)
    assert pixels.shape == (224, 224, 3)
    assert (pixels == (10, 200, 30)).all()
    # A full resize of 10000x1 takes seconds and gigabytes; the bounded path milliseconds.
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, I am text", "not a JPEG"),
        (b"<html><body>hi</body></html>", "not a JPEG"),
        (bytes(range(256)) * 20, "not a JPEG"),
    ],
)
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_truncated_jpeg_is_refused(photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(data[: len(data) // 3], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "claimed"), [(b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF")]
)
def test_a_file_cut_off_within_its_signature_is_called_truncated(data: bytes, claimed: str) -> None:
    """A 2-byte FF D8 is a JPEG cut off within its signature, not "not a JPEG, ...": the
    signature check must not want three bytes."""
    with pytest.raises(InvalidImage, match=f"starts as a {claimed} image does, but its header"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_corrupt_jpeg_header_is_refused(photos: list[Path]) -> None:
    data = bytearray(photos[0].read_bytes())
    data[2:40] = b"\x00" * 38
    with pytest.raises(InvalidImage):
        decode_image(bytes(data), max_pixels=MAX_PIXELS)


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(InvalidImage, match="not a JPEG"):
        decode_image(images.encode(images.gradient(), "PPM"), max_pixels=MAX_PIXELS)


def _with_sample_precision(jpeg: bytes, precision: int) -> bytes:
    """``jpeg`` with its frame header's sample precision changed."""
    position = 2
    while jpeg[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + int.from_bytes(jpeg[position + 2 : position + 4], "big")
    return jpeg[: position + 4] + bytes([precision]) + jpeg[position + 5 :]


def _iso_media_header(*brands: bytes) -> bytes:
    """The ``ftyp`` box an ISO media file (HEIF, AVIF) starts with, then some data."""
    box = b"ftyp" + brands[0] + b"\x00\x00\x00\x00" + b"".join(brands)
    return (len(box) + 4).to_bytes(4, "big") + box + bytes(64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_iso_media_header(b"heic", b"mif1", b"heic"), "an HEIC image, which is not accepted"),
        (_iso_media_header(b"mif1", b"mif1", b"heic"), "an HEIC image, which is not accepted"),
        (_iso_media_header(b"mif1", b"mif1", b"miaf"), "an HEIF image, which is not accepted"),
        (_iso_media_header(b"msf1", b"msf1", b"hevc"), "an HEIC image, which is not accepted"),
        (_iso_media_header(b"heix", b"mif1"), "an HEIC image, which is not accepted"),
        # A box size of 0 runs to the end of the file.
        (
            bytes(4) + _iso_media_header(b"mif1", b"avif")[4:],
            "an AVIF image, which is not accepted",
        ),
        (_iso_media_header(b"avif", b"mif1", b"miaf"), "an AVIF image, which is not accepted"),
        (_iso_media_header(b"mif1", b"mif1", b"avif"), "an AVIF image, which is not accepted"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), "a JPEG 2000 file, which is not accepted"),
        (b"\xff\x4f\xff\x51" + bytes(64), "a JPEG 2000 file, which is not accepted"),
        (b"%PDF-1.7\n" + bytes(64), "a PDF file, which is not accepted"),
    ],
)
def test_formats_people_send_that_are_not_accepted_are_named(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=f"{message}; send a JPEG, PNG, GIF, WebP"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_an_avif_pillow_could_open_is_refused_by_name() -> None:
    with pytest.raises(InvalidImage, match="an AVIF image, which is not accepted"):
        decode_image(images.encode(images.gradient(), "AVIF"), max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("precision", [12, 16])
def test_a_jpeg_of_more_than_8_bits_a_sample_is_named_so(
    photos: list[Path], precision: int
) -> None:
    """Pillow reads 8-bit JPEGs only; the refusal says why, not that the file is corrupt."""
    data = _with_sample_precision(photos[0].read_bytes(), precision)
    with pytest.raises(InvalidImage, match=f"the JPEG has {precision}-bit samples; only 8-bit"):
        decode_image(data, max_pixels=MAX_PIXELS)
    # Set back to 8 bits, the same file decodes.
    assert decode_image(_with_sample_precision(data, 8), max_pixels=MAX_PIXELS).size[0] > 0


@pytest.mark.parametrize("precision", [0, 3, 255])
def test_a_jpeg_frame_of_no_real_precision_is_called_corrupt(
    photos: list[Path], precision: int
) -> None:
    data = _with_sample_precision(photos[0].read_bytes(), precision)
    with pytest.raises(InvalidImage, match="header is corrupt or truncated"):
        decode_image(data, max_pixels=MAX_PIXELS)


def test_a_jpeg_ls_file_is_named_so(photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    position = 2
    while data[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    jpeg_ls = data[: position + 1] + b"\xf7" + data[position + 2 :]
    with pytest.raises(InvalidImage, match="the JPEG is coded in JPEG-LS, which is not accepted"):
        decode_image(jpeg_ls, max_pixels=MAX_PIXELS)


def _with_bytes_after_first_segment(jpeg: bytes, stray: bytes) -> bytes:
    end = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:end] + stray + jpeg[end:]


@pytest.mark.parametrize("stray", [b"\xff" * (10 << 20), b"\x00" * (10 << 20)])
def test_a_jpeg_padded_between_its_segments_is_refused_before_pillow_walks_it(
    photos: list[Path], stray: bytes
) -> None:
    """Pillow skips such bytes one at a time in Python: 3.4 s for 10 MB of fill bytes."""
    data = _with_bytes_after_first_segment(photos[0].read_bytes(), stray)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="bytes between its segments before its first scan"):
        decode_image(data, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("stray", [b"\xff" * 100, b"\x00" * 100])
def test_a_few_bytes_between_a_jpegs_segments_are_skipped(photos: list[Path], stray: bytes) -> None:
    data = photos[0].read_bytes()
    padded = decode_image(_with_bytes_after_first_segment(data, stray), max_pixels=MAX_PIXELS)
    assert np.array_equal(np.asarray(padded), np.asarray(decode_image(data, max_pixels=MAX_PIXELS)))


@pytest.mark.parametrize("bomb", [images.png_bomb, images.gif_bomb])
def test_decompression_bombs_are_refused_before_pixels_are_allocated(bomb: object) -> None:
    assert callable(bomb)
    data = bomb()
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge, match="30000x30000"):
            decode_image(data, max_pixels=MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


@pytest.mark.parametrize("size", [(1, MAX_SIDE + 1), (MAX_SIDE + 1, 1)])
def test_a_side_longer_than_any_camera_makes_is_refused(size: tuple[int, int]) -> None:
    """A strip within the pixel limit would still cost Pillow memory per row."""
    with pytest.raises(ImageTooLarge, match=f"{size[0]}x{size[1]}"):
        decode_image(images.encode(Image.new("RGB", size), "PNG"), max_pixels=MAX_PIXELS)
    at_the_limit = Image.new("RGB", (min(size[0], MAX_SIDE), min(size[1], MAX_SIDE)))
    crop = preprocess(images.encode(at_the_limit, "PNG"), max_pixels=MAX_PIXELS)
    assert crop.shape == (224, 224, 3)


def test_a_tiff_is_limited_by_its_tiles_not_only_its_declared_size() -> None:
    """libtiff allocates whole tiles: a 4x4 image in one 46336-pixel tile would take 2 GB."""
    with pytest.raises(ImageTooLarge, match="46336x46336 tiles"):
        decode_image(images.tiled_tiff(4, 4, tile=46336), max_pixels=MAX_PIXELS)
    # An ordinary tiled TIFF, its one tile larger than the image, decodes.
    pixels = bytes(range(256)) * 4
    image = decode_image(images.tiled_tiff(20, 10, tile=32, pixels=pixels), max_pixels=MAX_PIXELS)
    assert image.size == (20, 10)
    assert np.asarray(image)[1, :3, 0].tolist() == [32, 33, 34]  # row 1 starts at byte 32


@pytest.mark.parametrize(
    "data",
    [
        images.encode(Image.new("RGB", (30, 20)), "PNG"),
        images.tiled_tiff(4, 4, tile=64),
        images.rle8_bmp(100, 40),
    ],
    ids=["declared size", "tiles", "run-length-encoded BMP"],
)
def test_an_image_too_large_says_the_least_limit_that_takes_it(data: bytes) -> None:
    """What the service reads to refuse an image at once when no limit it may try later
    (MAX_IMAGE_PIXELS) would take it. Each check names the least limit it passes at."""

    def refusal(limit: int) -> ImageTooLarge | None:
        try:
            decode_image(data, max_pixels=limit)
        except ImageTooLarge as refused:
            return refused
        return None

    limit = 1
    for _ in range(3):
        refused = refusal(limit)
        if refused is None:
            break
        assert refused.pixels_needed > limit
        limit = int(refused.pixels_needed)
    else:
        pytest.fail(f"still refused at {limit} pixels")
    assert refusal(limit - 1) is not None


def test_an_image_with_a_side_too_long_is_too_large_under_any_limit() -> None:
    data = images.encode(Image.new("L", (MAX_SIDE + 1, 1)), "PNG")
    for limit in (1, MAX_PIXELS):
        with pytest.raises(ImageTooLarge) as refused:
            decode_image(data, max_pixels=limit)
        assert refused.value.pixels_needed == math.inf


def test_libtiff_errors_are_logged_not_written_to_stderr(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """libtiff writes its errors to the process's stderr by default: raw lines in a log of
    one JSON object per line, with no time and no request id."""
    with (
        caplog.at_level(logging.WARNING, logger="classification.preprocess"),
        pytest.raises(InvalidImage, match="corrupt or truncated"),
    ):
        decode_image(images.tiff_with_a_corrupt_strip(), max_pixels=MAX_PIXELS)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("libtiff: ZIPDecode: Decoding error at scanline 0") for m in messages)
    assert capfd.readouterr().err == ""


def test_libtiff_logs_a_few_lines_an_image_however_many_rows_it_finds_damaged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It reports damage once a row: a 3 MB upload would give 60,000 lines, each a Python
    call under the interpreter lock and a log record."""
    for _ in range(2):  # the allowance is each image's
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="classification.preprocess"):
            decode_image(images.fax_tiff_of_noise(), max_pixels=MAX_PIXELS)  # filled in
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == LIBTIFF_MAX_LINES + 1, messages
        for message in messages[:-1]:
            assert message.startswith("libtiff: Fax3Decode1D: Bad code word at line"), message
        assert messages[-1] == "libtiff: more lines about this image are left out"


def test_a_tiff_listing_more_strips_than_any_real_image_is_refused_before_parsing() -> None:
    """Pillow lists the strips in Python as it opens a TIFF: 1.2 million took seconds."""
    data = images.tiff_in_strips(1_200_000)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match="1200000 strips or tiles; at most 65536"):
        decode_image(data, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 1.0
    # The same structure with four strips (one per row) is an image like any other.
    assert decode_image(images.tiff_in_strips(4), max_pixels=MAX_PIXELS).size == (4, 4)


def png_with_empty_chunks(count: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    for _ in range(count):
        info.add(b"noTe", b"")  # an ancillary chunk no reader knows
    return images.encode(images.gradient(8, 8), "PNG", pnginfo=info)


def test_a_png_of_more_chunks_than_any_real_image_is_refused_before_parsing() -> None:
    """Pillow reads a PNG's chunks in Python: 800,000 empty ones took 2 s."""
    crowded = png_with_empty_chunks(PNG_MAX_CHUNKS)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=f"more than {PNG_MAX_CHUNKS} chunks"):
        decode_image(crowded, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 1.0
    # A few hundred are an image like any other.
    assert decode_image(png_with_empty_chunks(300), max_pixels=MAX_PIXELS).size == (8, 8)


XMP_OVER_1_MIB = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b" " * 1_100_000 + b"</x:xmpmeta>"


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (b"iCCP", b"an ICC profile\x00\x00" + zlib.compress(bytes(1_100_000))),
        (b"zTXt", b"Comment\x00\x00" + zlib.compress(XMP_OVER_1_MIB)),
        (b"iTXt", b"XML:com.adobe.xmp\x00\x01\x00\x00\x00" + zlib.compress(XMP_OVER_1_MIB)),
    ],
    ids=["iCCP", "zTXt", "compressed-iTXt"],
)
@pytest.mark.parametrize("where", ["before-the-pixels", "after-the-pixels"])
def test_a_png_metadata_chunk_over_pillows_limit_is_refused_by_name(
    kind: bytes, data: bytes, where: str
) -> None:
    """Pillow decompresses such a chunk to at most 1 MiB (a bound against zlib bombs): the
    answer says so, not "the image header is corrupt" (or "data", after IDAT)."""
    png = images.encode(images.gradient(60, 40), "PNG")
    if where == "before-the-pixels":
        upload = images.with_png_chunk(png, kind, data)
    else:
        end = png.index(b"IEND") - 4  # the IEND chunk's length field
        upload = png[:end] + images.png_chunk(kind, data) + png[end:]
    with pytest.raises(InvalidImage, match=r"metadata chunk .* decompresses to more than 1 MiB"):
        decode_image(upload, max_pixels=MAX_PIXELS)


def test_png_text_beyond_pillows_total_is_refused_by_name() -> None:
    info = PngImagePlugin.PngInfo()
    for index in range(70):  # 70 x 1 MiB of text, a few kilobytes compressed
        info.add_text(f"Comment{index}", "x" * (2**20 - 100), zip=True)
    data = images.encode(images.gradient(8, 8), "PNG", pnginfo=info)
    with pytest.raises(InvalidImage, match="text chunks hold more than 64 MiB in all"):
        decode_image(data, max_pixels=MAX_PIXELS)
    # The XMP of the refused chunks above, stored uncompressed: nothing to inflate.
    uncompressed = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + XMP_OVER_1_MIB
    png = images.with_png_chunk(images.encode(images.gradient(8, 8), "PNG"), b"iTXt", uncompressed)
    assert decode_image(png, max_pixels=MAX_PIXELS).size == (8, 8)


@pytest.mark.parametrize(
    "blocks",
    [
        b"!\xfe\x01C\x00" * 2_000_000,  # comment extensions, one 1-byte sub-block each
        b"!\xfe" + b"\x01C" * 5_000_000 + b"\x00",  # one comment of 1-byte sub-blocks
        b"!\xff\x0bABCDEFGH1.0\x00" * 700_000,  # application extensions
        b"\x00" * 10_000_000,  # stray bytes, which Pillow steps over one at a time
    ],
    ids=["comments", "sub-blocks", "application-extensions", "stray-bytes"],
)
def test_a_gif_of_more_blocks_than_any_real_image_is_refused_before_parsing(
    blocks: bytes,
) -> None:
    """Pillow reads a GIF's blocks before its first image in Python: 2,000,000 comments in
    10 MB took 0.8 s, every upload."""
    crowded = images.gif_with_blocks_before_its_image(blocks)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=f"more than {GIF_MAX_BLOCKS} blocks and sub-blocks"):
        decode_image(crowded, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 0.5


def test_a_gif_within_the_block_limit_decodes() -> None:
    """Up to the limit, and real files' blocks (an XMP packet, whose bytes a reader takes
    for hundreds of sub-blocks; frames after the first, which Pillow never reads), decode."""
    at_the_limit = b"!\xfe\x01C\x00" * (GIF_MAX_BLOCKS // 2)  # an extension and a sub-block
    xmp = images.gif_xmp_extension(b"<x:xmpmeta>" + b"<rdf:Description/>" * 2000 + b"</x:xmpmeta>")
    for blocks in (at_the_limit, xmp, b"\x00" * GIF_MAX_BLOCKS):
        gif = images.gif_with_blocks_before_its_image(blocks)
        assert decode_image(gif, max_pixels=MAX_PIXELS).size == (64, 48)
    with pytest.raises(InvalidImage, match="blocks and sub-blocks"):
        decode_image(
            images.gif_with_blocks_before_its_image(at_the_limit + b"\x00"), max_pixels=MAX_PIXELS
        )
    animated = images.animated_gif(frames=3)
    later_frames_crowded = animated[:-1] + b"!\xfe\x01C\x00" * (GIF_MAX_BLOCKS + 1) + b";"
    assert decode_image(later_frames_crowded, max_pixels=MAX_PIXELS).size == (40, 30)


def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_refused_before_decoding() -> None:
    """libjpeg decodes every scan over the whole image: 10,000 repeated scans of an 800x625
    image, 128 KB, took 0.8 s."""
    crowded = images.progressive_jpeg_with_extra_scans(10_000)
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=f"10010 scans; at most {JPEG_MAX_SCANS}"):
        decode_image(crowded, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 0.1
    # Up to the limit (the encoder's 10 and repeats), a JPEG like any other.
    allowed = images.progressive_jpeg_with_extra_scans(JPEG_MAX_SCANS - 10)
    assert decode_image(allowed, max_pixels=MAX_PIXELS).size == (800, 625)
    one_more = images.progressive_jpeg_with_extra_scans(JPEG_MAX_SCANS - 9)
    with pytest.raises(InvalidImage, match=f"{JPEG_MAX_SCANS + 1} scans"):
        decode_image(one_more, max_pixels=MAX_PIXELS)


def test_scan_marker_bytes_in_metadata_or_after_the_image_are_not_scans(
    photos: list[Path],
) -> None:
    """Only the image's own segments count: not comment bytes, nor a motion photo's video
    after the end-of-image marker (random bytes hold a start-of-scan pair every 64 KiB)."""
    jpeg = photos[0].read_bytes()
    comment = b"\xff\xfe" + (2 + 600).to_bytes(2, "big") + b"\xff\xda" * 300
    with_comments = jpeg[:2] + comment * 50 + jpeg[2:]
    after_the_image = b"\xff\xda" * (JPEG_MAX_SCANS + 1)
    for data in (with_comments, jpeg + after_the_image):
        assert decode_image(data, max_pixels=MAX_PIXELS).size == images.photo(photos[0]).size


def test_marker_like_bytes_inside_skipped_segments_cost_what_any_bytes_do() -> None:
    """The scan count skips each segment by its length; the 0xFF pairs inside one are not
    looked at one by one. With every such pair listed in Python, 10 MB of APP5 segments
    full of 0xFF 0x01 pairs would take 0.22 s and 240 MiB to count, against 0.01 s and
    30 MiB for the same segments full of zeros."""
    jpeg = images.encode(images.gradient(300, 200), "JPEG", quality=90)

    def with_app5_segments(fill: bytes) -> bytes:
        segment = b"\xff\xe5" + (2 + len(fill)).to_bytes(2, "big") + fill
        return jpeg[:2] + segment * 160 + jpeg[2:]

    def cost(data: bytes) -> tuple[float, int]:
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            assert _jpeg_scan_count(data) == 1
            best = min(best, time.perf_counter() - started)
        tracemalloc.start()
        try:
            _jpeg_scan_count(data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return best, peak

    marker_like_s, marker_like_peak = cost(with_app5_segments(b"\xff\x01" * 32766 + b"\x00"))
    zeros_s, zeros_peak = cost(with_app5_segments(bytes(65533)))
    assert marker_like_peak < 1.5 * zeros_peak
    assert marker_like_s < 5 * zeros_s
    small = with_app5_segments(b"\xff\x01" * 100)
    assert decode_image(small, max_pixels=MAX_PIXELS).size == (300, 200)


def test_a_jpeg_of_more_segments_than_any_real_image_is_refused() -> None:
    crowded = images.encode(images.gradient(8, 8), "JPEG")
    crowded = crowded[:2] + b"\xff\xfe\x00\x02" * (JPEG_MAX_SEGMENTS + 1) + crowded[2:]
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=f"more than {JPEG_MAX_SEGMENTS} segments"):
        decode_image(crowded, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_configurable() -> None:
    data = images.encode(images.gradient(320, 240), "PNG")
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS allows 1000"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=320 * 240).size == (320, 240)


def test_no_memory_to_decode_is_the_servers_error_not_a_corrupt_image(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the worker's memory limit a good image is no bad one: its MemoryError passes, to
    be answered 503 to retry, not 400 "corrupt"."""

    def no_memory(self: object) -> None:
        raise MemoryError

    data = photos[0].read_bytes()
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(MemoryError):
        preprocess(data, max_pixels=MAX_PIXELS)
