"""De-identification of the image files that are not DICOM: PNG, JPEG and NIfTI (``medlens deid`` beside DICOM).

Each file is rewritten at the level of its container, so the pixels are never decoded or re-encoded (the
image data are copied byte for byte):

- PNG: only the chunks an image needs are kept (IHDR, PLTE, IDAT, IEND and the colour chunks tRNS, gAMA,
  cHRM, sRGB, sBIT, pHYs, bKGD); text (tEXt, iTXt, zTXt), EXIF (eXIf), time stamps (tIME), ICC profiles
  (iCCP: a free-text profile name), private chunks and anything after IEND are removed;
- JPEG: every APPn segment (EXIF, XMP, ICC, IPTC/Photoshop, ...) and every comment (COM) is removed except
  what decoding depends on: the JFIF header (APP0, its thumbnail removed) and Adobe's colour-transform
  segment (APP14); frames, tables and scans are copied as they are, data after EOI removed. An EXIF
  orientation goes with the EXIF block: viewers that turned the image by it show the stored orientation;
- NIfTI-1/2 (``.nii``, ``.nii.gz``): the header's free-text fields (descrip, aux_file, intent_name, and in
  NIfTI-1 the Analyze leftovers db_name and data_type) are emptied and every header extension (DICOM
  headers, XML, JSON sidecars...) is dropped; the voxel data follow the new header unchanged, in the same
  byte order, with the same scaling. A ``.nii.gz`` is written without a file name or time in its gzip header.

Each function takes the file's bytes and returns ``(new bytes, changes)``, ``changes`` as the DICOM path's
``(tag, attribute, action, old value, new value)`` rows of the log; a malformed file raises ``ValueError``.
"""

from __future__ import annotations

import gzip
import io
import zlib

import nibabel as nib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs",
                      b"bKGD"})
NIFTI_TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type")
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".nii": "nifti", ".nii.gz": "nifti"}

_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
_JPEG_APP_NAMES = {0xE0: "APP0", 0xE1: "APP1 (EXIF/XMP)", 0xE2: "APP2 (ICC profile/FlashPix)",
                   0xED: "APP13 (IPTC/Photoshop)", 0xEE: "APP14"}


def kind_of(name: str) -> tuple[str, str] | None:
    """(kind, suffix) of a file name this module handles (``png``, ``jpeg``, ``nifti``), else None."""
    low = name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return SUFFIXES[suffix], suffix
    return None


def _shown(value: bytes) -> str:
    return " ".join(value.decode("latin-1").replace("\0", " ").split())[:120]


def strip_png(data: bytes) -> tuple[bytes, list[tuple]]:
    """A PNG with only the chunks of :data:`PNG_KEPT`; pixel data (IDAT) copied as they are."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (no signature)")
    out, changes, pos, ended = [PNG_SIGNATURE], [], len(PNG_SIGNATURE), False
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("truncated PNG chunk")
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = data[pos + 4:pos + 8], pos + 12 + n
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        if len(out) == 1 and kind != b"IHDR":
            raise ValueError("PNG without IHDR first")
        if kind in PNG_KEPT:
            out.append(data[pos:end])
        else:
            name = kind.decode("latin-1")
            changes.append((name, f"PNG {name} chunk", "removed", _shown(data[pos + 8:end - 4]), ""))
        pos = end
        if kind == b"IEND":
            ended = True
            break
    if not ended:
        raise ValueError("PNG without IEND")
    if pos < len(data):
        changes.append(("", "data after IEND", "removed", f"{len(data) - pos} bytes", ""))
    return b"".join(out), changes


def _entropy_end(data: bytes, pos: int) -> int:
    """The offset of the first marker after the entropy-coded data of a scan starting at ``pos``."""
    while True:
        j = data.find(b"\xff", pos)
        if j < 0 or j + 1 >= len(data):
            raise ValueError("JPEG scan without an end")
        nxt = data[j + 1]
        if nxt == 0x00 or nxt in _JPEG_STANDALONE or nxt == 0xFF:
            pos = j + 1 if nxt == 0xFF else j + 2  # stuffed byte, restart marker, or fill bytes
            continue
        return j


def strip_jpeg(data: bytes) -> tuple[bytes, list[tuple]]:
    """A JPEG without APPn (but JFIF without thumbnail and Adobe's APP14) and COM segments; scans copied."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    out, changes, pos = bytearray(b"\xff\xd8"), [], 2
    while True:
        while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise ValueError("JPEG marker expected")
        m = data[pos + 1]
        if m == 0xD9:  # EOI
            out += b"\xff\xd9"
            pos += 2
            break
        if m in _JPEG_STANDALONE:
            out += data[pos:pos + 2]
            pos += 2
            continue
        if pos + 4 > len(data):
            raise ValueError("truncated JPEG segment")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > len(data) or end < pos + 4:
            raise ValueError("truncated JPEG segment")
        seg, body = data[pos:end], data[pos + 4:end]
        pos = end
        if m == 0xDA:  # start of scan: header, then the entropy-coded data up to the next marker
            stop = _entropy_end(data, pos)
            out += seg + data[pos:stop]
            pos = stop
        elif m == 0xE0 and body[:5] == b"JFIF\x00" and len(body) >= 14:
            out += b"\xff\xe0\x00\x10" + body[:12] + b"\x00\x00"  # the JFIF header without its thumbnail
            if len(body) > 14 or body[12:14] != b"\x00\x00":
                changes.append(("APP0", "JFIF thumbnail", "removed", f"{len(body) - 14} bytes", ""))
        elif m == 0xEE and body[:5] == b"Adobe":
            out += seg  # colour transform: how the decoder reads the components
        elif 0xE0 <= m <= 0xEF or m == 0xFE:
            name = "COM (comment)" if m == 0xFE else _JPEG_APP_NAMES.get(m, f"APP{m - 0xE0}")
            changes.append((f"FF{m:02X}", f"JPEG {name} segment", "removed", _shown(body), ""))
        else:
            out += seg
    if pos < len(data):
        changes.append(("", "data after EOI", "removed", f"{len(data) - pos} bytes", ""))
    return bytes(out), changes


def _gunzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error:
        raise ValueError("corrupt gzip stream") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(f"decompresses to more than {limit} bytes")
    return out


def strip_nifti(data: bytes, gz: bool, limit: int) -> tuple[bytes, list[tuple]]:
    """A single-file NIfTI-1/2 with its free-text header fields emptied and its extensions dropped."""
    raw = _gunzip(data, limit) if gz else data
    if len(raw) < 4:
        raise ValueError("not a NIfTI file")
    size = int.from_bytes(raw[:4], "little")
    size = size if size in (348, 540) else int.from_bytes(raw[:4], "big")
    header_class = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if header_class is None:
        raise ValueError("not a NIfTI file (sizeof_hdr is neither 348 nor 540)")
    try:
        hdr = header_class.from_fileobj(io.BytesIO(raw), check=False)
    except Exception as e:  # the class only
        raise ValueError(f"unreadable NIfTI header ({type(e).__name__})") from None
    if hdr["magic"].tobytes().rstrip(b"\x00") not in (b"n+1", b"n+2"):
        raise ValueError("a NIfTI header/image pair (.hdr/.img), not a single file")
    offset = int(hdr["vox_offset"])
    if offset < size or offset > len(raw):
        raise ValueError("NIfTI voxel offset outside the file")
    changes = []
    for name in NIFTI_TEXT_FIELDS:
        if name in hdr.keys():
            old = hdr[name].tobytes()
            if old.strip(b"\x00 "):
                changes.append(("", f"NIfTI {name}", "emptied", _shown(old), ""))
            hdr[name] = b""
    for ext in hdr.extensions:
        changes.append(("", f"NIfTI extension (code {ext.get_code()})", "removed",
                        f"{len(ext.get_content() or b'')} bytes", ""))
    hdr.extensions.clear()
    new_offset = size + 4  # header, then the 4-byte extension flag (all zero: no extension)
    hdr["vox_offset"] = new_offset
    buf = io.BytesIO()
    hdr.write_to(buf)
    head = buf.getvalue()
    if len(head) != new_offset:
        raise ValueError("NIfTI header of unexpected size after rewriting")
    out = head + raw[offset:]
    return (gzip.compress(out, mtime=0) if gz else out), changes


def strip_file(kind: str, suffix: str, data: bytes, limit: int) -> tuple[bytes, list[tuple]]:
    """Dispatch on ``kind`` (from :func:`kind_of`)."""
    if kind == "png":
        return strip_png(data)
    if kind == "jpeg":
        return strip_jpeg(data)
    return strip_nifti(data, suffix.endswith(".gz"), limit)
