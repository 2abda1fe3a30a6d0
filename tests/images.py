"""Images made in code for tests: odd modes, formats, EXIF rotation and decompression bombs."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def gradient(width: int = 320, height: int = 240) -> Image.Image:
    """A deterministic colourful RGB image with structure at several scales."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    green = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    blue = (((x // 16 + y // 16) % 2) * 255).astype(np.uint8)
    return Image.fromarray(np.dstack([red, green, blue]))


def sixteen_bit_grey_png(width: int = 64, height: int = 48) -> bytes:
    ramp = np.linspace(0, 65535, width * height, dtype=np.uint16).reshape(height, width)
    return encode(Image.fromarray(ramp), "PNG")


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """A JPEG whose pixels are stored unrotated, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(frames: int = 3, size: tuple[int, int] = (40, 30)) -> bytes:
    images = [Image.new("P", size, color=i * 40) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)
    return buffer.getvalue()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small PNG whose header declares a huge greyscale image (its data is one short row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def two_bit_grey_png(levels: np.ndarray, key: int) -> bytes:
    """A greyscale PNG of 2 bits a sample (``levels`` 0-3), ``key`` its transparent level."""
    height, width = levels.shape
    bits = np.unpackbits(levels.astype(np.uint8)[..., None], axis=2)[..., 6:]
    packed = np.packbits(bits.reshape(height, width * 2), axis=1)
    rows = b"".join(b"\x00" + row.tobytes() for row in packed)  # filter type 0 each
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 2, 0, 0, 0, 0))
        + png_chunk(b"tRNS", struct.pack(">H", key))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def sixteen_bit_rgb_png(pixels: np.ndarray, key: tuple[int, int, int]) -> bytes:
    """An RGB PNG of 16 bits a sample with ``key`` its transparent colour, a text chunk
    before its header (which Pillow reads, though the format puts the header first)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"tEXt", b"Comment\x00first")
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + png_chunk(b"tRNS", struct.pack(">HHH", *key))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def rle8_bmp(width: int, height: int, idle_codes: int = 0) -> bytes:
    """A run-length-encoded 8-bit BMP: each row one pixel of index 5, the rest left to the
    end-of-line code (index 0), which Pillow fills a byte at a time in Python; then
    ``idle_codes`` moves by (0, 0), each a turn of Pillow's loop that draws nothing."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    pixels = b"\x01\x05\x00\x00" * height + b"\x00\x02\x00\x00" * idle_codes + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return (
        b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
    )


def bitfields_bmp(pixels: np.ndarray) -> bytes:
    """A 32-bit BMP with a BITMAPV5 header whose masks give it an alpha channel, as
    Photoshop writes one, of ``pixels`` (height x width x RGBA)."""
    height, width, _ = pixels.shape
    data = np.ascontiguousarray(pixels[::-1][..., [2, 1, 0, 3]]).tobytes()  # bottom-up BGRA
    info = struct.pack("<IiiHHIIiiII", 124, width, height, 1, 32, 3, len(data), 2835, 2835, 0, 0)
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000)
    info += bytes(124 - len(info))
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + data


def gif_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny GIF whose logical screen and single frame declare a huge size."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)
    palette = b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    pixels = b"\x02\x02\x4c\x01\x00"  # LZW minimum code size 2, one small sub-block
    return b"GIF89a" + screen + palette + frame + pixels + b";"


def tiled_tiff(width: int, height: int, tile: int, pixels: bytes | None = None) -> bytes:
    """An 8-bit greyscale TIFF stored in one square tile of ``tile`` pixels a side, deflated
    (``pixels``, tile-sized, default all black)."""
    data = zlib.compress(pixels if pixels is not None else bytes(min(tile * tile, 1 << 20)))
    tags = [  # (tag, type: 3 short or 4 long, value), in tag order
        (256, 3, width),
        (257, 3, height),
        (258, 3, 8),
        (259, 3, 8),  # deflate
        (262, 3, 1),  # black is zero
        (277, 3, 1),
        (322, 4, tile),
        (323, 4, tile),
        (324, 4, 8),  # the tile's data follows the 8-byte header
        (325, 4, len(data)),
    ]
    return _tiff_of(data, tags)


def _tiff_of(data: bytes, tags: list[tuple[int, int, int]]) -> bytes:
    """A little-endian TIFF: its header, ``data`` (at offset 8), then one directory of
    ``tags``, each (tag, type: 3 short or 4 long, value), in tag order."""
    directory = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + directory + bytes(4)


def tiff_in_strips(strips: int) -> bytes:
    """A 4x4 greyscale TIFF whose directory lists ``strips`` strips (all empty)."""
    offsets_at, counts_at = 8, 8 + 4 * strips
    directory_at = counts_at + 4 * strips
    tags = [  # (tag, type: 3 short or 4 long, count, value or offset), in tag order
        (256, 3, 1, 4),
        (257, 3, 1, 4),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, strips, offsets_at),
        (278, 3, 1, 1),
        (279, 4, strips, counts_at),
    ]
    directory = struct.pack("<H", len(tags))
    for tag, kind, count, value in tags:
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, count) + packed
    header = b"II*\x00" + struct.pack("<I", directory_at)
    return header + bytes(8 * strips) + directory + bytes(4)


def tiff_with_a_corrupt_strip() -> bytes:
    """A deflate-compressed TIFF whose one strip's zlib header is broken: libtiff reports an
    error of its own as it decodes."""
    data = bytearray(encode(gradient(64, 64), "TIFF", compression="tiff_deflate"))
    data[9] ^= 0xFF  # the strip starts right after the 8-byte header
    return bytes(data)


def fax_tiff_of_noise(width: int = 64, height: int = 1000) -> bytes:
    """A bilevel TIFF in CCITT Group 3 whose one strip is random bytes: libtiff reports a
    bad code word on most rows, and fills them in."""
    noise = np.random.default_rng(0).integers(0, 256, width * height // 8, dtype=np.uint8)
    data = noise.tobytes()
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 1),
        (259, 3, 3),  # CCITT Group 3
        (262, 3, 0),
        (273, 4, 8),  # the strip, right after the header
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(data)),
    ]
    return _tiff_of(data, tags)


def progressive_jpeg_with_extra_scans(extra: int, size: tuple[int, int] = (800, 625)) -> bytes:
    """A progressive JPEG whose smallest refinement scan is repeated ``extra`` more times:
    still a valid image, as libjpeg decodes every scan again over the whole image."""
    jpeg = encode(Image.new("RGB", size, (120, 130, 140)), "JPEG", progressive=True, quality=50)
    # A scan's entropy-coded data runs to the next marker: 0xFF followed by neither a
    # stuffed 0x00 nor a restart marker (0xD0-0xD7).
    markers = [
        at
        for at in range(2, len(jpeg) - 1)
        if jpeg[at] == 0xFF
        and jpeg[at + 1] not in (0x00, 0xFF)
        and not 0xD0 <= jpeg[at + 1] <= 0xD7
    ]
    scans = [
        jpeg[start:end] for start, end in itertools.pairwise(markers) if jpeg[start + 1] == 0xDA
    ]
    last_scan_end = jpeg.rindex(b"\xff\xd9")
    return jpeg[:last_scan_end] + min(scans[1:], key=len) * extra + jpeg[last_scan_end:]


def with_png_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """The PNG with one more chunk right after its header (IHDR)."""
    ihdr_end = 8 + 12 + 13  # signature, IHDR's length, type and CRC, its 13 bytes of data
    return png[:ihdr_end] + png_chunk(kind, data) + png[ihdr_end:]


def with_jpeg_app1(jpeg: bytes, payload: bytes) -> bytes:
    """The JPEG with an APP1 segment (where EXIF lives) holding ``payload``, after SOI."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + jpeg[2:]


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF header and one directory of (tag, type, count, 4-byte value)
    entries, as an EXIF segment holds after its "Exif\\0\\0" header; written by hand so
    that a tag can have a type Pillow does not expect."""
    directory = b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in sorted(entries))
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + directory + b"\x00\x00\x00\x00"


def gif_with_blocks_before_its_image(blocks: bytes, size: tuple[int, int] = (64, 48)) -> bytes:
    """A one-frame GIF with ``blocks`` (extensions, stray bytes) before its image."""
    gif = encode(Image.new("P", size, 1), "GIF")
    flags = gif[10]
    image_at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the palette
    return gif[:image_at] + blocks + gif[image_at:]


def gif_xmp_extension(xmp: bytes) -> bytes:
    """XMP as Adobe writes it in a GIF: the packet's raw bytes, which a reader takes for
    sub-blocks of whatever sizes its bytes give, then a 258-byte "magic trailer" that
    leads every such chain to the terminating empty sub-block."""
    return b"!\xff\x0bXMP DataXMP" + xmp + b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
