"""Upload bytes to model input: decode, validate, orient, convert, resize, crop, normalise."""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import math
import re
import struct
import threading
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

RESIZE_SIZE = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Longest resized side (aspect ratio 16:1) up to which the full image is resized exactly as
# torchvision does; beyond it, only the cropped region is resampled. Up to 16:1 the full
# resize costs about what a 4:3 image of as many pixels does (40 megapixels: 156 against
# 122 ms); past it, it grows with the strip's length (10000x1 would become 2560000x256).
MAX_EXACT_RESIZE = 16 * RESIZE_SIZE
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg scales in the DCT domain, three
# to four times faster for a 12-megapixel photo) while its shorter side stays at least this
# long, so the antialiased resize still does most of the reduction: the model's input then
# stays within two 8-bit levels of a full decode's (at twice the resize target, eight).
MIN_DRAFT_SIDE = 4 * RESIZE_SIZE
DRAFT_SCALES = (8, 4, 2)

# Formats with well-exercised decoders. Pillow can open more (EPS, for one, shells out to
# Ghostscript); none of those is worth the attack surface for a classifier.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_FORMAT_NAMES = "JPEG, PNG, GIF, WebP, BMP or TIFF"
# Formats that phones, cameras and converters send, named in their refusal so that its fix
# is plain. HEIF-family files are ISO media files whose ``ftyp`` box lists brands.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_HEIF_BRANDS = frozenset({b"mif1", b"mif2", b"msf1"})
_OTHER_SIGNATURES = (
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF-", "PDF"),
)
# JPEG frame headers (SOF markers), which hold the sample precision; JPEG-LS's own.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_LS_FRAME = 0xF7
# The first bytes of each supported format but WebP (RIFF, then WEBP at offset 8).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323
TIFF_STRIP_OFFSETS, TIFF_TILE_OFFSETS = 273, 324
# Pillow walks a TIFF's strips or tiles, and a PNG's chunks, in Python, a few µs each:
# a million of them fit in 10 MB and hold the interpreter lock for seconds. A 40-megapixel
# image stored in 8 KB strips or chunks has about 15,000.
TIFF_MAX_PARTS = 65_536
# JPEG's own limit (WebP's is 16,383). A longer side is a strip no camera makes, and each
# row costs Pillow memory of its own: a 1x40,000,000 PNG took 915 MiB to decode, against
# 305 MiB for 6400x6250, the same number of pixels.
MAX_SIDE = 65_535
PNG_MAX_CHUNKS = 65_536
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libjpeg decodes every scan of a progressive JPEG, each over the whole image: 62,000 scans
# in 1 MB held a decode thread for 26 s. Encoders write about ten; 256 scans at 36
# megapixels take twice a plain decode.
JPEG_MAX_SCANS = 256
# Pillow reads a JPEG's segments before its first scan in Python; real files have a few
# dozen.
JPEG_MAX_SEGMENTS = 65_536
# ... and skips the bytes between segments (fill bytes, junk) one at a time: 0.3 µs each, so
# 10 MB of them held a decode thread for 3.4 s. Real files have none, or a few.
JPEG_MAX_STRAY_BYTES = 65_536
JPEG_SIGNATURE = b"\xff\xd8"
JPEG_START_OF_SCAN, JPEG_END_OF_IMAGE = 0xDA, 0xD9
JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, 0xD8})  # TEM, SOI (restarts are not candidates)
# Pillow reads a GIF's blocks before its first image in Python, a byte, an extension or a
# sub-block at a time (0.4 µs each: 2,000,000 comments in 10 MB took 0.8 s); the image's
# own data, and any frame after it, it leaves to its C decoder or never reads. Real files
# have a few (a loop count, a frame delay, an XMP packet of a few hundred sub-blocks).
GIF_MAX_BLOCKS = 65_536
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
GIF_EXTENSION, GIF_IMAGE, GIF_TRAILER = 0x21, 0x2C, 0x3B
# Where Pillow's loop stops its byte-at-a-time reading: any other byte it skips alone.
_GIF_BLOCK_START = re.compile(rb"[!,;]")
# Pillow decodes a run-length-encoded BMP in Python, up to 0.35 µs a pixel (a 26 KB file of
# 40 megapixels took 12 s) and 0.5 µs a byte, where libjpeg or zlib take 0.02-0.04 µs a
# pixel: such a BMP counts this many times its pixels, or its bytes if more, against the
# pixel limits.
BMP_RLE_PIXEL_COST = 16
BMP_RLE_COMPRESSIONS = (1, 2)  # RLE8, RLE4
# Images of more than 8 bits a sample are scaled to 8 bits, and a PNG's transparent colour
# is found, this many pixels at a time, so that no whole-image temporary is made (a float64
# copy takes 320 MB at 40 megapixels).
ROW_BLOCK_PIXELS = 1 << 20
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
FLOAT32_MAX = float(np.finfo(np.float32).max)
# EXIF orientation to the transpose that shows the image upright (as ImageOps.exif_transpose).
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_HEADER = b"Exif\x00\x00"
# Register every plugin now: Image.open(formats=...) looks plugins up before loading them.
# (Multi-picture JPEGs open through the JPEG plugin.)
Image.init()
# decode_image enforces its own limit, per call and configurable, right after reading the
# header; Pillow's process-wide guard would fire first with a message naming no setting.
Image.MAX_IMAGE_PIXELS = None

logger = logging.getLogger(__name__)

# libtiff's handler signature: (module, printf format, va_list).
_TIFF_ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
# libtiff reports some damage once a row: a 3 MB fax image of 65,535 rows gave 60,000 lines.
LIBTIFF_MAX_LINES = 10
# Lines each decode may still log; set by decode_image, on the thread that decodes.
_libtiff_lines = threading.local()


def _log_libtiff_error(module: bytes | None, format_: bytes, arguments: int | None) -> None:
    left = getattr(_libtiff_lines, "left", LIBTIFF_MAX_LINES)
    _libtiff_lines.left = left - 1
    if left <= 0:
        if left == 0:
            logger.warning("libtiff: more lines about this image are left out")
        return
    message = ctypes.create_string_buffer(512)
    _vsnprintf(message, len(message), format_, arguments)
    text = message.value.decode(errors="replace")
    logger.warning("libtiff: %s", f"{module.decode(errors='replace')}: {text}" if module else text)


def _route_libtiff_errors() -> None:
    """Have libtiff's error messages logged, with the request's id, instead of written to
    stderr as raw lines, which would break ``LOG_FORMAT=json``'s one object a line. Pillow
    links libtiff privately: find the copy it loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libtiff" in line}
    except OSError:  # not Linux: the messages stay on stderr
        return
    for path in paths:
        set_handler = ctypes.CDLL(path).TIFFSetErrorHandler
        set_handler.argtypes = [_TIFF_ERROR_HANDLER]
        set_handler.restype = ctypes.c_void_p
        set_handler(_libtiff_error_handler)


_libtiff_error_handler = _TIFF_ERROR_HANDLER(_log_libtiff_error)  # kept alive: C holds it
_vsnprintf = ctypes.CDLL(None).vsnprintf
# A va_list travels as a pointer on x86-64 and, by reference, on arm64 alike.
_vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_route_libtiff_errors()


class InvalidImage(ValueError):
    """The upload is not a decodable image in a supported format."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than the configured limit.

    Attributes:
        pixels_needed: The least ``max_pixels`` that would let this check pass (infinite
            when none would: a side over ``MAX_SIDE``).
    """

    def __init__(self, message: str, pixels_needed: float = math.inf) -> None:
        super().__init__(message)
        self.pixels_needed = pixels_needed


def decode_image(
    data: bytes, *, max_pixels: int, min_side: int | None = MIN_DRAFT_SIDE
) -> Image.Image:
    """Decode an upload into an RGB image, refusing oversized images before decoding pixels.

    Only the first frame of an animated image is used. EXIF orientation is applied, and
    transparent areas are composited onto white, as an image viewer shows them.

    A large JPEG is decoded at 1/2, 1/4 or 1/8 of its size while its shorter side stays at
    least ``min_side`` (enough for ResNet's resize to 256); None decodes it at full size,
    for a model that needs every pixel or the image's own coordinates.

    Raises:
        InvalidImage: Empty, unrecognised, unsupported or corrupt data.
        ImageTooLarge: The header declares more than ``max_pixels`` pixels.
    """
    if not data:
        raise InvalidImage("the uploaded file is empty")
    _libtiff_lines.left = LIBTIFF_MAX_LINES
    _check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        if (unsupported := _unsupported_kind(data)) is not None:
            raise InvalidImage(unsupported) from None
        if (claimed := _claimed_format(data)) is not None:
            raise InvalidImage(
                f"the upload starts as a {claimed} image does, but its header is corrupt or "
                "truncated"
            ) from None
        raise InvalidImage(f"the upload is not a {_FORMAT_NAMES} image") from None
    except MemoryError:
        raise  # the server's, not the image's: no memory for it now
    except Exception as exc:
        raise InvalidImage(_png_metadata_problem(exc) or "the image header is corrupt") from None

    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; "
            f"MAX_IMAGE_PIXELS allows {max_pixels}",
            pixels_needed=width * height if max(width, height) <= MAX_SIDE else math.inf,
        )
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(
            f"image is {width}x{height}; sides of more than {MAX_SIDE} pixels are not accepted"
        )
    if image.format == "TIFF":
        _check_tiff_tiles(image, max_pixels)
    if image.format == "BMP":
        _check_bmp_compression(image, len(data), max_pixels)
    colour_key = _png_colour_key(image)
    try:
        scale = 1 if min_side is None else _draft_scale(width, height, min_side)
        if scale > 1:
            image.draft(None, (width // scale, height // scale))  # a no-op but for JPEG
        image.load()
        if image.format == "BMP" and image.mode == "RGBA":
            image = _bmp_unused_alpha_dropped(image)
        return _to_rgb(_orient(image), colour_key)
    except MemoryError:
        raise
    except Exception as exc:
        # Pillow raises many types for bad data (OSError, ValueError, SyntaxError, ...).
        message = _png_metadata_problem(exc) or "the image data is corrupt or truncated"
        raise InvalidImage(message) from None


def _png_metadata_problem(exc: Exception) -> str | None:
    """What to tell the client when Pillow refused a PNG for its metadata's size; None for
    any other error.

    Pillow decompresses an ICC profile or compressed text (iCCP, zTXt, iTXt) to at most
    MAX_TEXT_CHUNK, and all text to MAX_TEXT_MEMORY: bounds against decompression bombs,
    kept (process-wide settings, and a few kilobytes of zlib can expand to gigabytes).
    Pillow names them only in its messages.
    """
    if not isinstance(exc, ValueError):
        return None
    if "MAX_TEXT_CHUNK" in str(exc):
        return (
            "a PNG metadata chunk (an ICC profile or compressed text: iCCP, zTXt or iTXt) "
            f"decompresses to more than {PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MiB, the "
            "most this server reads"
        )
    if "MAX_TEXT_MEMORY" in str(exc):
        return (
            "a PNG's text chunks hold more than "
            f"{PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB in all, the most this server reads"
        )
    return None


def _orient(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as stored when that cannot be read.

    Malformed EXIF is common in uploads (random bytes, a bare TIFF header, XMP in the EXIF
    slot) and torchvision's reference, which ignores orientation, decodes such files: the
    pixels are good, so they are classified as stored rather than refused. Only the
    orientation is read; ImageOps.exif_transpose also writes the EXIF back, which fails for
    tags stored with another type than Pillow's table gives them.
    """
    exif = image.info.get("exif")
    if isinstance(exif, bytes) and exif.startswith(EXIF_HEADER * 2):
        # A PNG's eXIf chunk holding a JPEG's "Exif\0\0" header, sometimes twice
        # (python-pillow/Pillow#8348): Pillow drops at most two of them.
        while exif.startswith(EXIF_HEADER * 2):
            exif = exif[len(EXIF_HEADER) :]
        image.info["exif"] = exif
    try:
        method = ORIENTATION_TRANSPOSES.get(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception as exc:  # SyntaxError, struct.error, TypeError (an unhashable value)...
        logger.info(
            "the upload's EXIF cannot be read (%s: %s); its orientation is not applied",
            type(exc).__name__,
            exc,
        )
        return image
    return image if method is None else image.transpose(method)


def _unsupported_kind(data: bytes) -> str | None:
    """Why an image Pillow will not open here is refused, when it is of a kind people send
    that is not accepted (HEIC, AVIF, JPEG 2000, a JPEG of other than 8-bit samples)."""
    accepted = f"send a {_FORMAT_NAMES} image (convert it first)"
    if data[4:8] == b"ftyp":
        # The major brand, then (past the minor version) the compatible ones; a size of 0
        # runs to the end of the file.
        box_end = min(int.from_bytes(data[:4], "big") or len(data), len(data), 4096)
        brands = {data[8:12]} | {data[start : start + 4] for start in range(16, box_end - 3, 4)}
        for family, name in (
            (_AVIF_BRANDS, "AVIF"),
            (_HEIC_BRANDS, "HEIC"),
            (_HEIF_BRANDS, "HEIF"),
        ):
            if brands & family:
                return f"the upload is an {name} image, which is not accepted; {accepted}"
    for magic, name in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return f"the upload is a {name} file, which is not accepted; {accepted}"
    if data.startswith(JPEG_SIGNATURE) and (frame := _jpeg_frame(data)) is not None:
        marker, precision = frame
        if marker == JPEG_LS_FRAME:
            return f"the JPEG is coded in JPEG-LS, which is not accepted; {accepted}"
        if precision in (12, 16):  # what encoders write beside 8; others are damage
            return (
                f"the JPEG has {precision}-bit samples; only 8-bit JPEGs are accepted: "
                "convert it to 8 bits a sample"
            )
    return None


def _jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """The marker and sample precision of a JPEG's frame header, walking the segments
    before it; None if it has none there."""
    position = len(JPEG_SIGNATURE)
    while position + 4 < len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_FRAME_MARKERS or marker == JPEG_LS_FRAME:
            return marker, data[position + 4]
        if marker in (0xD9, 0xDA):  # the end, or a scan, before any frame
            return None
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _claimed_format(data: bytes) -> str | None:
    """The supported format whose signature ``data`` starts with, if any: what a file that
    Pillow cannot open was meant to be."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    # A file cut off within its signature (a 2-byte FF D8) is a truncated image too; one
    # byte says too little to name a format.
    return next(
        (
            name
            for magic, name in _SIGNATURES
            if data.startswith(magic) or (len(data) >= 2 and magic.startswith(data))
        ),
        None,
    )


def _check_structure(data: bytes) -> None:
    """Refuse a TIFF, PNG, GIF or JPEG with more parts than any real image has, before Pillow
    or libjpeg walks them."""
    parts = _tiff_part_count(data)
    if parts > TIFF_MAX_PARTS:
        raise InvalidImage(
            f"the TIFF is stored in {parts} strips or tiles; at most {TIFF_MAX_PARTS} are accepted"
        )
    if _png_chunk_count(data, stop_after=PNG_MAX_CHUNKS) > PNG_MAX_CHUNKS:
        raise InvalidImage(f"the PNG holds more than {PNG_MAX_CHUNKS} chunks")
    if _gif_block_count(data, stop_after=GIF_MAX_BLOCKS) > GIF_MAX_BLOCKS:
        raise InvalidImage(
            f"the GIF holds more than {GIF_MAX_BLOCKS} blocks and sub-blocks before its first image"
        )
    scans = _jpeg_scan_count(data)
    if scans > JPEG_MAX_SCANS:
        raise InvalidImage(f"the JPEG holds {scans} scans; at most {JPEG_MAX_SCANS} are accepted")


def _jpeg_scan_count(data: bytes) -> int:
    """How many scans a JPEG holds up to its end-of-image marker; 0 for other formats.

    Markers are walked from the file's start, each segment skipped by its length, so bytes
    inside metadata (an EXIF thumbnail, an ICC profile) or after the image (the video a
    motion photo appends) are not taken for scans. Entropy-coded data holds no marker
    bytes but restart markers and stuffed 0xFF 0x00 pairs, so every other 0xFF there
    begins a marker.
    """
    if not data.startswith(JPEG_SIGNATURE):
        return 0
    # Marker candidates found in C (a byte loop over a 10 MB file would take a second):
    # 0xFF followed by neither 0x00, 0xFF (fill) nor a restart marker. A mask, built in
    # place, a byte a position whatever the file holds; the walk asks it for the first
    # candidate past each segment, so those inside skipped segments cost nothing (listing
    # them all took 0.2 s and 240 MiB for 10 MB of metadata made of 0xFF 0x01 pairs).
    values = np.frombuffer(data, np.uint8)
    following = values[1:]
    candidates = values[:-1] == 0xFF
    candidates &= following != 0x00
    candidates &= following != 0xFF
    candidates &= (following - np.uint8(0xD0)) > 7  # wraps below 0xD0: not RST0-RST7

    def first_candidate(start: int) -> int:
        rest = candidates[start:]
        offset = int(rest.argmax()) if rest.size else 0  # the first True, or 0 if none
        return start + offset if rest.size and rest[offset] else -1

    scans = segments = stray = 0
    next_start = len(JPEG_SIGNATURE)
    position = first_candidate(next_start)
    while True:
        if scans == 0:
            stray += (position if position >= 0 else len(data)) - next_start
            if stray > JPEG_MAX_STRAY_BYTES:
                raise InvalidImage(
                    f"the JPEG holds more than {JPEG_MAX_STRAY_BYTES} bytes between its "
                    "segments before its first scan, where markers belong"
                )
        if position < 0:
            break
        marker = data[position + 1]
        if marker == JPEG_END_OF_IMAGE:
            break
        segments += 1
        if segments > JPEG_MAX_SEGMENTS:
            raise InvalidImage(f"the JPEG holds more than {JPEG_MAX_SEGMENTS} segments")
        if marker == JPEG_START_OF_SCAN:
            scans += 1
        next_start = position + 1
        if marker not in JPEG_MARKERS_WITHOUT_LENGTH:
            next_start = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        position = first_candidate(next_start)
    return scans


def _png_chunk_count(data: bytes, stop_after: int) -> int:
    """How many chunks a PNG holds, counted up to one more than ``stop_after``; 0 for
    other formats."""
    if not data.startswith(PNG_SIGNATURE):
        return 0
    position, count = len(PNG_SIGNATURE), 0
    while position + 8 <= len(data) and count <= stop_after:
        (length,) = struct.unpack_from(">I", data, position)
        count += 1
        if data[position + 4 : position + 8] == b"IEND":
            break
        position += 12 + length  # length, type, data, CRC
    return count


def _gif_block_count(data: bytes, stop_after: int) -> int:
    """How many blocks a GIF holds before its first image's data, as Pillow reads them
    (each extension, each of its sub-blocks, each stray byte between blocks), counted up
    to one more than ``stop_after``; 0 for other formats."""
    if not data.startswith(GIF_SIGNATURES) or len(data) < 13:
        return 0
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # global palette
    count = 0
    while position < len(data) and count <= stop_after:
        introducer = data[position]
        if introducer in (GIF_IMAGE, GIF_TRAILER):
            break
        if introducer != GIF_EXTENSION:
            # A run of stray bytes, found in C: Pillow steps over them one by one.
            found = _GIF_BLOCK_START.search(data, position)
            end = len(data) if found is None else found.start()
            count += end - position
            position = end
            continue
        count += 1
        position += 2  # introducer, label
        while position < len(data) and count <= stop_after:  # sub-blocks, to an empty one
            size = data[position]
            position += 1 + size
            if size == 0:
                break
            count += 1
    return count


def _tiff_part_count(data: bytes) -> int:
    """How many strips or tiles a TIFF's first image declares, read from its first directory
    before Pillow parses it; 0 for other formats, or when the directory cannot be read."""
    byte_order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if byte_order is None:
        return 0
    try:
        (version,) = struct.unpack_from(byte_order + "H", data, 2)
        if version == 42:  # classic TIFF: 32-bit offsets, 12-byte entries
            (directory,) = struct.unpack_from(byte_order + "I", data, 4)
            (entries,) = struct.unpack_from(byte_order + "H", data, directory)
            entry_format, first, size = byte_order + "HHI", directory + 2, 12
        elif version == 43:  # BigTIFF: 64-bit offsets, 20-byte entries
            (directory,) = struct.unpack_from(byte_order + "Q", data, 8)
            (entries,) = struct.unpack_from(byte_order + "Q", data, directory)
            entry_format, first, size = byte_order + "HHQ", directory + 8, 20
        else:
            return 0
        for index in range(min(entries, len(data) // size)):
            tag, _, count = struct.unpack_from(entry_format, data, first + index * size)
            if tag in (TIFF_STRIP_OFFSETS, TIFF_TILE_OFFSETS):
                return int(count)
    # Truncated, or an offset past any file (2**63 overflows): Pillow reports it.
    except (struct.error, OverflowError):
        pass
    return 0


def _check_tiff_tiles(image: Image.Image, max_pixels: int) -> None:
    """libtiff allocates whole tiles, whose size a TIFF states apart from the image's: a few
    bytes can declare a 4x4 image stored in one tile of two billion pixels."""
    tags = image.tag_v2  # type: ignore[attr-defined]
    tile_width, tile_length = tags.get(TIFF_TILE_WIDTH), tags.get(TIFF_TILE_LENGTH)
    if tile_width is None and tile_length is None:
        return
    if not tile_width or not tile_length:
        raise InvalidImage("the TIFF's tile size is corrupt")
    width, height = image.size
    covered = -(-width // tile_width) * tile_width * -(-height // tile_length) * tile_length
    if covered > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height}, stored in {tile_width}x{tile_length} tiles that "
            f"cover {covered} pixels; MAX_IMAGE_PIXELS allows {max_pixels}",
            pixels_needed=covered,
        )


def _check_bmp_compression(image: Image.Image, size: int, max_pixels: int) -> None:
    # Pillow's RLE decoder loops in Python over each pixel of some runs and rows, and over
    # every 2-byte code, even one that draws nothing: both count.
    if image.info.get("compression") not in BMP_RLE_COMPRESSIONS:
        return
    width, height = image.size
    allowed = max_pixels // BMP_RLE_PIXEL_COST
    if max(width * height, size) > allowed:
        raise ImageTooLarge(
            f"image is a run-length-encoded BMP of {width}x{height} = {width * height} "
            f"pixels in {size} bytes; such a BMP may have at most {allowed} of either "
            f"(MAX_IMAGE_PIXELS / {BMP_RLE_PIXEL_COST}: it decodes that much more slowly)",
            pixels_needed=max(width * height, size) * BMP_RLE_PIXEL_COST,
        )


def _draft_scale(width: int, height: int, min_side: int) -> int:
    """The largest reduction a JPEG may be decoded at: one that keeps the shorter side at
    least ``min_side`` and divides both sides. (libjpeg rounds a reduced size up; the
    partial last row and column would shift every later sample by a fraction of a pixel.)
    Camera sizes (4032x3024, 6000x4000, ...) divide by 8."""
    for scale in DRAFT_SCALES:
        if width % scale == 0 and height % scale == 0 and min(width, height) // scale >= min_side:
            return scale
    return 1


def _png_colour_key(image: Image.Image) -> int | tuple[int, ...] | None:
    """The colour a PNG without an alpha channel marks transparent (its tRNS chunk), on the
    scale of the values Pillow decodes; None when it has none, or for a 16-bit RGB PNG,
    which Pillow decodes to 8 bits a sample: no decoded value tells the key colour apart
    from its neighbours, so its pixels stay as they are."""
    key = image.info.get("transparency")
    if image.format != "PNG" or image.mode not in ("1", "L", "I;16", "RGB") or key is None:
        return None
    raw_mode = image.tile[0].args  # how Pillow reads the samples: "RGB;16B", "L;2", ...
    if image.mode == "RGB":
        return None if raw_mode == "RGB;16B" else tuple(key)
    if raw_mode in ("L;1", "L;2", "L;4"):
        return int(key) * 255 // (2 ** int(raw_mode[2:]) - 1)  # as Pillow stretches them
    return int(key)


def _bmp_unused_alpha_dropped(image: Image.Image) -> Image.Image:
    """A 32-bit BMP whose alpha bytes are all 0 (as Photoshop and others write them) is
    opaque, as Windows and browsers show it: its alpha was never set, and compositing it
    would leave a blank white image."""
    if image.getchannel("A").getextrema() == (0, 0):
        return image.convert("RGB")
    return image


def _to_rgb(image: Image.Image, colour_key: int | tuple[int, ...] | None = None) -> Image.Image:
    transparent = None if colour_key is None else _pixels_of_colour(image, colour_key)
    if image.mode in HIGH_DEPTH_MODES:
        image = _high_depth_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        # Pasted through its own alpha onto white: the same values as alpha_composite, and
        # no RGBA copies (160 MB each at 40 megapixels).
        composited = Image.new("RGB", rgba.size, (255, 255, 255))
        composited.paste(rgba, (0, 0), rgba)
        return composited
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if transparent is not None:
        rgb.paste((255, 255, 255), (0, 0, *rgb.size), transparent)  # what alpha 0 shows
    return rgb


def _row_blocks(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """The image's rows, ROW_BLOCK_PIXELS at a time: each block's top row and pixels."""
    width, height = image.size
    rows = max(1, ROW_BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        yield top, image.crop((0, top, width, min(top + rows, height)))


def _pixels_of_colour(image: Image.Image, colour: int | tuple[int, ...]) -> Image.Image:
    """A mask, 255 where a pixel has ``colour``."""
    mask = np.empty((image.height, image.width), np.uint8)
    for top, block in _row_blocks(image.convert("L") if image.mode == "1" else image):
        matches = np.asarray(block) == np.asarray(colour)
        if matches.ndim == 3:
            matches = matches.all(axis=2)
        mask[top : top + block.height] = matches * np.uint8(255)
    return Image.fromarray(mask)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255; scale the full range instead.
    # Float images may mark no-data pixels NaN, which no integer cast can represent, and
    # hold infinities, here the largest 32-bit floats: scaled, they stay finite.
    def values(block: Image.Image) -> np.ndarray:
        return np.nan_to_num(
            np.asarray(block, dtype=np.float64),
            copy=False,
            nan=0.0,
            posinf=FLOAT32_MAX,
            neginf=-FLOAT32_MAX,
        )

    if image.mode.startswith("I;16"):
        peak = 65535.0
    else:
        # 32-bit integer and float modes do not say what range their values span. Float
        # images mostly hold 0..1 (scientific and HDR tools, numpy exports), read as 8-bit
        # levels all black: one whose values stay within 1 is taken to be on that scale.
        brightest = max(values(block).max(initial=0) for _, block in _row_blocks(image))
        if image.mode == "F" and brightest <= 1.0:
            peak = 1.0
        else:
            peak = 65535.0 if brightest > 255 else 255.0
    scaled = np.empty((image.height, image.width), np.uint8)
    for top, block in _row_blocks(image):
        rows = values(block)
        rows *= 255.0 / peak
        scaled[top : top + block.height] = np.clip(rows, 0, 255, out=rows).round(out=rows)
        del rows  # before the next block's values are made
    return Image.fromarray(scaled)


def to_model_input(image: Image.Image) -> np.ndarray:
    """Resize the shorter side to 256 and centre-crop 224, as torchvision does.

    Returns:
        The crop as a (224, 224, 3) uint8 array. It stays uint8 until ``normalize_batch``
        runs on the model's thread: a quarter of the memory while queued, and no torch
        work on decode threads, whose own OpenMP teams would slow the model's.
    """
    width, height = image.size
    # torchvision's output size: shorter side to RESIZE_SIZE, longer side truncated.
    if width <= height:
        resized_w, resized_h = RESIZE_SIZE, int(RESIZE_SIZE * height / width)
    else:
        resized_w, resized_h = int(RESIZE_SIZE * width / height), RESIZE_SIZE
    top = round((resized_h - CROP_SIZE) / 2.0)
    left = round((resized_w - CROP_SIZE) / 2.0)
    if max(resized_w, resized_h) <= MAX_EXACT_RESIZE:
        resized = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR)
        cropped = resized.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    else:
        # A strip such as 10000x1 would resize to 2560000x256 first. Resample only the
        # region that survives the crop: same sampling positions and filter, bounded work,
        # at the cost of an occasional one-level rounding difference.
        scale_x, scale_y = width / resized_w, height / resized_h
        box = (
            left * scale_x,
            top * scale_y,
            (left + CROP_SIZE) * scale_x,
            (top + CROP_SIZE) * scale_y,
        )
        cropped = image.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR, box=box)
    return np.asarray(cropped, dtype=np.uint8)


def normalize_batch(crops: torch.Tensor) -> torch.Tensor:
    """Turn a (N, 224, 224, 3) uint8 batch into the network's float input.

    The same operations, in the same order, as torchvision's transform (scale to [0, 1],
    subtract the mean, divide by the standard deviation), so the values are identical.

    Returns:
        A float32 (N, 3, 224, 224) tensor in channels_last memory layout: the channel
        permute is a view, so no pixel is moved to reorder it.
    """
    batch = crops.contiguous().to(torch.float32)
    values = math.prod(batch.shape[1:])
    mean, std = _per_value_mean_std(batch.device, values)
    batch.view(len(batch), values).div_(255).sub_(mean).div_(std)
    return batch.permute(0, 3, 1, 2)


@functools.cache
def _per_value_mean_std(device: torch.device, values: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The channel statistics repeated for every pixel of an (H, W, 3) image: an elementwise
    # operand vectorises, where broadcasting over an innermost dimension of 3 is three
    # times slower.
    mean = torch.tensor(IMAGENET_MEAN, device=device).repeat(values // 3)
    std = torch.tensor(IMAGENET_STD, device=device).repeat(values // 3)
    return mean, std


def preprocess(data: bytes, *, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
    """Decode, resize and crop one upload: the per-request work before the queue.

    With ``reduced_jpeg``, a large JPEG decodes at a reduced scale (see ``decode_image``):
    the model's input stays within two 8-bit levels of a full decode's, which can reorder
    near ties; without it, every pixel is decoded, as torchvision's reference pipeline does.
    """
    min_side = MIN_DRAFT_SIDE if reduced_jpeg else None
    return to_model_input(decode_image(data, max_pixels=max_pixels, min_side=min_side))
