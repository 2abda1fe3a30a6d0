"""A corpus of hostile and odd uploads to ``POST /cls``, built in code, with the documented answer.

Each :class:`Case` is one request (multipart files, or raw bytes and headers, plus a query)
and the status the README's error table promises for it. ``build_corpus`` makes them all
from one real photo, so nothing is downloaded and the corpus is the same on every run.
"""

from __future__ import annotations

import base64
import gzip
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests import images

# The upload limit the corpus is sent under: small, so the over-limit case stays small too.
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
BOUNDARY = "corpus-boundary-7d1f"
MANY_PARTS = 5000

Files = list[tuple[str, tuple[str, bytes, str]]]


@dataclass(frozen=True)
class Case:
    """One request and the answer the service documents for it.

    Attributes:
        name: Test id.
        status: The documented status code.
        detail: Words the ``detail`` of an error must contain (case-insensitive), so the
            message names the problem; empty for 200s.
        files: Multipart parts, encoded by httpx; ``None`` when ``content`` is sent as is.
        content: A raw body, for requests httpx would not encode itself.
        headers: Extra or overriding headers (Content-Type, Content-Length).
        params: The query string.
    """

    name: str
    status: int
    detail: str = ""
    files: Files | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def request(self, base_url: str = "http://test", path: str = "/cls") -> httpx.Request:
        """The request to send; a caller's headers win over the ones httpx derives."""
        return httpx.Request(
            "POST",
            f"{base_url}{path}",
            params=self.params,
            files=self.files,
            content=self.content,
            headers=self.headers,
        )


def upload(data: bytes, name: str = "upload.bin", content_type: str = "image/jpeg") -> Files:
    return [("file", (name, data, content_type))]


def multipart(
    parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = BOUNDARY
) -> bytes:
    """A multipart/form-data body: (field, filename, data, content type) each."""
    body = io.BytesIO()
    for name, filename, data, content_type in parts:
        body.write(f"--{boundary}\r\n".encode())
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body.write(disposition.encode() + b"\r\n")
        if content_type is not None:
            body.write(f"Content-Type: {content_type}\r\n".encode())
        body.write(b"\r\n" + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue()


def multipart_headers(body: bytes, boundary: str = BOUNDARY) -> dict[str, str]:
    return {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
    }


def raw_multipart(
    name: str, status: int, detail: str, parts: list[tuple[str, str | None, bytes, str | None]]
) -> Case:
    body = multipart(parts)
    return Case(name, status, detail, content=body, headers=multipart_headers(body))


def float_tiff_with_nan() -> bytes:
    """A 32-bit float TIFF whose no-data pixels are NaN, as GIS tools write them."""
    pixels = np.linspace(0, 255, 64 * 48, dtype=np.float32).reshape(48, 64)
    pixels[10:20, 10:40] = np.nan
    return images.encode(Image.fromarray(pixels, "F"), "TIFF")


def valid_images(photo: Image.Image) -> dict[str, bytes]:
    """Every valid oddity the service must classify (200): modes, formats, shapes, EXIF."""
    small = photo.resize((160, 120))
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    return {
        "one-pixel": images.encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "strip-10000x1": images.encode(images.gradient(10_000, 1), "PNG"),
        "greyscale": images.encode(small.convert("L"), "JPEG"),
        "palette": images.encode(small.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "cmyk": images.encode(small.convert("CMYK"), "JPEG"),
        "rgba": images.encode(rgba, "PNG"),
        "sixteen-bit-png": images.sixteen_bit_grey_png(),
        "animated-gif": images.animated_gif(),
        "webp": images.encode(small, "WEBP"),
        "tiff": images.encode(small, "TIFF"),
        "bmp": images.encode(small, "BMP"),
        "exif-rotated-jpeg": images.exif_rotated_jpeg(small),
        # XMP text where the EXIF belongs: Pillow cannot read it, the pixels are good.
        "png-with-malformed-exif": images.with_png_chunk(
            images.encode(small, "PNG"), b"eXIf", b"<x:xmpmeta></x:xmpmeta>"
        ),
        # NaN pixels must not make the 8-bit cast warn (an error under pytest).
        "float-tiff-with-nan": float_tiff_with_nan(),
    }


def corrupt_header_jpeg(jpeg: bytes) -> bytes:
    """The photo with its first frame header (SOF) overwritten: JPEG magic, nonsense after."""
    start = jpeg.index(b"\xff\xc0") if b"\xff\xc0" in jpeg else jpeg.index(b"\xff\xc2")
    length = struct.unpack(">H", jpeg[start + 2 : start + 4])[0]
    return jpeg[: start + 4] + b"\x00" * (length - 2) + jpeg[start + 2 + length :]


def png_with_bad_header_crc(photo: Image.Image) -> bytes:
    """A PNG whose header chunk's checksum is wrong: Pillow cannot open it at all."""
    png = images.encode(photo.resize((32, 24)), "PNG")
    crc_at = 8 + 8 + 13  # signature, IHDR's length and type, its 13 bytes of data
    return png[:crc_at] + b"\x00\x00\x00\x00" + png[crc_at + 4 :]


def build_corpus(photo_path: Path) -> list[Case]:
    """Every case, built from one real JPEG photo."""
    jpeg = photo_path.read_bytes()
    photo = images.photo(photo_path)
    not_image = "not a JPEG, PNG, GIF, WebP, BMP or TIFF image"
    cases = [
        Case("empty-file", 400, "empty", upload(b"")),
        Case("random-bytes", 400, not_image, upload(np.random.default_rng(0).bytes(4096))),
        Case("text", 400, not_image, upload(b"hello, I am a cat\n" * 20, "cat.txt", "text/plain")),
        Case(
            "html",
            400,
            not_image,
            upload(b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        ),
        Case("truncated-jpeg", 400, "corrupt or truncated", upload(jpeg[: len(jpeg) // 2])),
        # Pillow takes a JPEG whose frame header does not parse for no JPEG at all; the
        # answer names what the file was meant to be.
        Case(
            "corrupt-header-jpeg",
            400,
            "starts as a JPEG image does, but its header is corrupt or truncated",
            upload(corrupt_header_jpeg(jpeg)),
        ),
        Case(
            "png-with-a-bad-header-crc",
            400,
            "starts as a PNG image does, but its header is corrupt or truncated",
            upload(png_with_bad_header_crc(photo)),
        ),
        Case("png-bomb-30000x30000", 400, "MAX_IMAGE_PIXELS", upload(images.png_bomb())),
        Case("gif-bomb-30000x30000", 400, "MAX_IMAGE_PIXELS", upload(images.gif_bomb())),
        Case(
            "bmp-rle8-6324x6324",
            400,
            "run-length-encoded BMP",
            upload(images.rle8_bmp(6324, 6324), "slow.bmp", "image/bmp"),
        ),
        Case(
            "tiff-4x4-in-one-46336-pixel-tile",
            400,
            "MAX_IMAGE_PIXELS",
            upload(images.tiled_tiff(4, 4, tile=46336)),
        ),
        # A BigTIFF whose first directory lies 2**64 - 1 bytes in: no offset in memory.
        Case(
            "bigtiff-directory-past-any-file",
            400,
            "header is corrupt",
            upload(b"II+\x00\x08\x00\x00\x00" + b"\xff" * 8, "huge.tif", "image/tiff"),
        ),
        Case(
            "jpeg-of-10010-scans",
            400,
            "at most 256 are accepted",
            upload(images.progressive_jpeg_with_extra_scans(10_000)),
        ),
        Case(
            "gif-of-70000-comments",
            400,
            "more than 65536 blocks and sub-blocks before its first image",
            upload(images.gif_with_blocks_before_its_image(b"!\xfe\x01C\x00" * 70_000)),
        ),
        Case(
            "over-max-upload-bytes",
            413,
            "MAX_UPLOAD_BYTES",
            upload(jpeg + b"\x00" * (MAX_UPLOAD_BYTES + 1 - len(jpeg))),
        ),
        Case("no-file-field", 422, "file: Field required", content=b"", headers={}),
        Case(
            "wrong-field-name",
            422,
            "image: a file under another name than 'file'",
            [("image", ("photo.jpg", jpeg, "image/jpeg"))],
        ),
        Case(
            "raw-body-as-curl-labels-it",
            422,
            "send the image as a multipart/form-data part named 'file'",
            content=b"&".join([jpeg[:200]] * 20),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        Case(
            "json-body",
            422,
            "file: Field required",
            content=b'{"file": "aGVsbG8="}',
            headers={"Content-Type": "application/json"},
        ),
        Case(
            "urlencoded-body",
            422,
            "plain form field",
            content=b"file=hello",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        Case(
            "text-declared-as-png",
            400,
            not_image,
            upload(b"definitely not a PNG", "image.png", "image/png"),
        ),
        Case(
            "photo-declared-as-text",
            200,
            files=upload(jpeg, "notes.txt", "text/plain"),
        ),
    ]
    # The multipart parser takes boundaries of up to 256 characters.
    for length, status, detail in (
        (257, 400, "the multipart boundary is 257 characters long; at most 256"),
        (256, 200, ""),
    ):
        body = multipart([("file", "photo.jpg", jpeg, "image/jpeg")], "b" * length)
        headers = multipart_headers(body, boundary="b" * length)
        cases.append(Case(f"boundary-of-{length}-characters", status, detail, None, body, headers))
    # A transfer encoding is not undone (RFC 7578 drops it): refused, not read as corrupt.
    b64 = base64.encodebytes(jpeg)
    for encoding, status, detail, data in (
        ("base64", 400, "Content-Transfer-Encoding base64, which is not decoded", b64),
        ("binary", 200, "", jpeg),
    ):
        encoded = multipart([("file", "photo.jpg", data, "image/jpeg")]).replace(
            b"Content-Type: image/jpeg\r\n",
            f"Content-Type: image/jpeg\r\nContent-Transfer-Encoding: {encoding}\r\n".encode(),
        )
        cases.append(
            Case(
                f"part-encoded-{encoding}",
                status,
                detail,
                None,
                encoded,
                multipart_headers(encoded),
            )
        )
    # An empty part under another name (a form's unused file input) is ignored, header and all.
    unused = multipart(
        [("file", "photo.jpg", jpeg, "image/jpeg"), ("other", "", b"", "application/x-empty")]
    ).replace(
        b"Content-Type: application/x-empty\r\n",
        b"Content-Type: application/x-empty\r\nContent-Transfer-Encoding: base64\r\n",
    )
    cases.append(
        Case("empty-part-encoded-base64", 200, "", None, unused, multipart_headers(unused))
    )
    # The parser reads at most 8 header lines a part.
    headed = multipart([("file", "photo.jpg", jpeg, "image/jpeg")]).replace(
        b"Content-Type: image/jpeg\r\n",
        b"Content-Type: image/jpeg\r\n" + b"X-Note: one more line\r\n" * 7,
    )
    cases.append(
        Case("part-of-9-header-lines", 400, "at most 8", None, headed, multipart_headers(headed))
    )
    body = multipart([("file", "photo.jpg", jpeg, "image/jpeg")])
    cases += [
        # Framing that does not parse is corrupt data (400), not a missing field.
        Case(
            "boundary-mismatch",
            400,
            "multipart",
            content=body,
            headers=multipart_headers(body, boundary="some-other-boundary"),
        ),
        # The parser would decode part headers and fields with the charset: names
        # garbled (utf-16: "file: Field required"), or a bare parsing error (punycode).
        *(
            Case(
                f"multipart-charset-{charset}",
                400,
                f"multipart/form-data with charset={charset} is not supported",
                content=body,
                headers={
                    **multipart_headers(body),
                    "Content-Type": f"multipart/form-data; charset={charset}; boundary={BOUNDARY}",
                },
            )
            for charset in ("utf-16", "punycode", "iso-8859-1")
        ),
        Case(
            "multipart-charset-utf-8",
            200,
            content=body,
            headers={
                **multipart_headers(body),
                "Content-Type": f"multipart/form-data; charset=UTF-8; boundary={BOUNDARY}",
            },
        ),
        # Passed on still compressed, the body would be answered as malformed multipart.
        Case(
            "content-encoding-gzip",
            415,
            "Content-Encoding gzip is not supported",
            content=gzip.compress(body),
            headers={**multipart_headers(gzip.compress(body)), "Content-Encoding": "gzip"},
        ),
        Case(
            "content-encoding-identity",
            200,
            content=body,
            headers={**multipart_headers(body), "Content-Encoding": "identity"},
        ),
        Case(
            "transfer-encoding-gzip-chunked",
            501,
            "Transfer-Encoding gzip, chunked is not supported",
            content=gzip.compress(body),
            headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Transfer-Encoding": "gzip, chunked",
            },
        ),
        Case(
            "multipart-without-boundary",
            400,
            "boundary",
            content=body,
            headers={"Content-Type": "multipart/form-data"},
        ),
        # A body cut off (a client or proxy that gave up) parses as one without its last
        # part: without the check it would be answered as a missing "file" field.
        *(
            Case(
                f"multipart-cut-off-{where}",
                400,
                "does not end with its closing boundary",
                content=body[:cut],
                headers=multipart_headers(body[:cut]),
            )
            for where, cut in (
                ("after-the-part-headers", body.index(jpeg)),
                ("mid-file", body.index(jpeg) + len(jpeg) // 2),
                ("before-the-closing-boundary", body.rindex(f"--{BOUNDARY}--".encode())),
                ("inside-the-closing-boundary", len(body) - 4),
            )
        ),
        # The closing delimiter starts a line: without its line break it is part data, so
        # the body ends inside its last part (a parser drops that part without a word).
        Case(
            "multipart-closing-boundary-without-its-line-break",
            400,
            "does not end with its closing boundary",
            content=body.replace(f"\r\n--{BOUNDARY}--".encode(), f"\n--{BOUNDARY}--".encode()),
            headers=multipart_headers(body[1:]),
        ),
        # The boundary's text alone inside a part's data does not close the body.
        *(
            Case(
                f"multipart-cut-off-after-a-{kind}-holding-the-boundary-text",
                400,
                "does not end with its closing boundary",
                content=spoofed[: spoofed.index(jpeg) + len(jpeg) // 2],
                headers=multipart_headers(spoofed[: spoofed.index(jpeg) + len(jpeg) // 2]),
            )
            for kind, spoofed in (
                (
                    "field",
                    multipart(
                        [
                            ("note", None, f"ends at --{BOUNDARY}--".encode(), None),
                            ("file", "photo.jpg", jpeg, "image/jpeg"),
                        ]
                    ),
                ),
                (
                    "file-name",
                    multipart([("file", f"--{BOUNDARY}--.jpg", jpeg, "image/jpeg")]),
                ),
            )
        ),
        # ASGITransport hands the app the whole body whatever Content-Length says; the
        # service never trusts the header for sizes (only for an early 413), so the body
        # decides. tests/test_hostile_inputs.py also sends these to a real server.
        Case(
            "content-length-shorter",
            200,
            content=body,
            headers={**multipart_headers(body), "Content-Length": str(len(body) // 2)},
        ),
        Case(
            "content-length-longer",
            200,
            content=body,
            headers={**multipart_headers(body), "Content-Length": str(len(body) + 1000)},
        ),
        Case(
            "content-length-over-limit",
            413,
            "MAX_UPLOAD_BYTES",
            content=body,
            headers={**multipart_headers(body), "Content-Length": str(50 * MAX_UPLOAD_BYTES)},
        ),
    ]
    cases += [
        raw_multipart(
            f"{MANY_PARTS}-fields",
            400,
            "more than 8 plain form fields",
            [("file", "photo.jpg", jpeg, "image/jpeg")]
            + [(f"field{i}", None, b"x", None) for i in range(MANY_PARTS)],
        ),
        raw_multipart(
            f"{MANY_PARTS}-files",
            400,
            "takes one file",
            [("file", f"{i}.jpg", b"x", "image/jpeg") for i in range(MANY_PARTS)],
        ),
        raw_multipart("no-parts", 422, "file: Field required", []),
        # Read as a plain field of no name, the part would fail on the image's bytes: no UTF-8.
        Case(
            "part-without-content-disposition",
            400,
            "a part of the multipart body has no name in its Content-Disposition header",
            content=(
                unnamed := f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n\r\n".encode()
                + jpeg
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            ),
            headers=multipart_headers(unnamed),
        ),
        raw_multipart(
            "part-with-empty-name",
            400,
            "has no name in its Content-Disposition header; send the image as the form field",
            [("", "photo.jpg", jpeg, "image/jpeg")],
        ),
        # FastAPI's own message here names a Python type ("<class 'str'>"); the service's does not.
        raw_multipart(
            "file-as-plain-field", 422, "plain form field", [("file", None, b"hi", None)]
        ),
        raw_multipart(
            "large-plain-field", 422, "plain form field", [("file", None, b"x" * 1_500_000, None)]
        ),
        # RFC 7578 has no filename*: multipart parsers read a part with only that as a field.
        Case(
            "filename-star-only",
            422,
            "file: expected a file part, with filename= in its Content-Disposition "
            "(filename* alone is not read, RFC 7578), received a plain form field",
            content=(
                filename_star := f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
                f"name=\"file\"; filename*=UTF-8''%C3%A9.jpg\r\n"
                "Content-Type: image/jpeg\r\n\r\n".encode()
                + jpeg
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            ),
            headers=multipart_headers(filename_star),
        ),
        # FastAPI binds the last of repeated entries: each order would get its own answer.
        raw_multipart(
            "file-then-plain-field",
            422,
            "file: was sent 2 times",
            [("file", "photo.jpg", jpeg, "image/jpeg"), ("file", None, b"hi", None)],
        ),
        raw_multipart(
            "plain-field-then-file",
            422,
            "file: was sent 2 times",
            [("file", None, b"hi", None), ("file", "photo.jpg", jpeg, "image/jpeg")],
        ),
        raw_multipart(
            "file-then-empty-field",
            422,
            "file: was sent 2 times",
            [("file", "photo.jpg", jpeg, "image/jpeg"), ("file", None, b"", None)],
        ),
        # httpx percent-encodes control characters in filenames; these go on the wire raw.
        raw_multipart(
            "control-characters-in-raw-filename",
            200,
            "",
            [("file", "../../etc/passwd\x00\x01\x1b[31m/..\\..\\boot.ini.jpg", jpeg, "image/jpeg")],
        ),
        # A CRLF in the filename injects a header and a blank line: the file's data then
        # starts with the rest of the filename, so it is no longer an image.
        raw_multipart(
            "crlf-injection-in-filename",
            400,
            not_image,
            [("file", 'a.jpg"\r\nX-Injected: 1\r\n\r\n', jpeg, "image/jpeg")],
        ),
        Case(
            "hostile-filename",
            200,
            files=upload(jpeg, "../../etc/passwd\x00\x01\r\n\x1b[31m/..\\..\\boot.ini.jpg"),
        ),
        Case("unicode-filename", 200, files=upload(jpeg, "k\u00e4tzchen \U0001f431.jpg")),
    ]
    for top_k in ("0", "-1", "1001", "x"):
        cases.append(
            Case(f"top_k={top_k}", 422, "top_k", upload(jpeg, "photo.jpg"), params={"top_k": top_k})
        )
    for name, data in valid_images(photo).items():
        cases.append(Case(name, 200, files=upload(data, f"{name}.img")))
    return cases
