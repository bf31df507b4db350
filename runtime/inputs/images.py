"""Decode a user's ECG file (PNG, JPEG, TIFF, BMP or the first page of a PDF) into an RGB image.

Every way an input can be unusable ends in one `InputError` whose message is a
single line naming the file, the problem and what to do about it; anything
else escaping from here is a bug. The format is sniffed from the content, never
trusted from the extension: ECG exports are routinely renamed, and a DICOM file
called `ecg.png` must be told apart from a broken PNG.

Lean runtime: stdlib, numpy and pillow only; pypdfium2 is imported lazily so
that image-only deployments never load PDFium.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pulse_edge.errors import InputError
from pulse_edge.runtime.inputs.pixel_modes import U32_MAX, grey_to_8bit, orientation_line, to_rgb
from pulse_edge.runtime.inputs.warned import caught_warnings

log = logging.getLogger(__name__)

# A 12-lead ECG is printed as 3-4 rows of leads plus a rhythm strip. Below ~128 px
# on the shorter side each row gets fewer than ~25 px, the 1 mm grid and the QRS
# morphology are gone, and the vision tower would be reading an upscaled blur of a
# thumbnail or icon (the usual reason an image is that small); so refuse it.
MIN_SIDE_PX: int = 128

# A 600-dpi A4 scan is ~35 Mpx and a 600-dpi US-letter one ~34 Mpx; nothing a
# scanner or phone produces for an ECG comes near 64 Mpx, while a decoded RGB image
# of that size already costs ~190 MB of RAM on an edge device.
MAX_PIXELS: int = 64_000_000

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP", "PDF")

# 200 dpi keeps the 0.04 s / 0.1 mV minor grid of a printed ECG at ~8 px per
# millimetre, well above the ~2 px per grid cell the 336 px tiles finally see.
PDF_DPI: int = 200
_PDF_POINTS_PER_INCH = 72
# The PDF spec lets the %PDF- header start anywhere in the first 1024 bytes.
_HEADER_BYTES = 1024
_PDF_MAGIC = b"%PDF-"

# (offset, magic bytes, Pillow format name)
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "TIFF"),  # BigTIFF
    (0, b"MM\x00+", "TIFF"),
    (0, b"BM", "BMP"),
)
# Files of an accepted format whose header form Pillow cannot open, where its refusal would read "corrupt":
# (magic, what the file is, what to do). Pillow 13 takes a BigTIFF for a classic TIFF unless it is little-endian
# (it tests the version's first byte, which is 0 in big-endian order), so a sound big-endian BigTIFF fails to open.
_PILLOW_CANNOT_OPEN: tuple[tuple[bytes, str, str], ...] = (
    (b"MM\x00+", f"is a big-endian BigTIFF, which Pillow {Image.__version__} cannot open",
     "save it as PNG, or as a classic or little-endian TIFF"),
)

_ACCEPTED_HINT = f"accepted formats: {', '.join(ACCEPTED_FORMATS)}"
RECORDING_HINT = "DICOM, WFDB (.hea), HL7 aECG (.xml), CSV or NPY (with the sampling rate)"

_CONVERT = f"convert it to PNG ({_ACCEPTED_HINT})"

# Formats we recognise but refuse: (offset, magic bytes, what the file is, what to do).
# GIF (256 colours, possibly animated) and WebP are not what ECG carts, scanners or
# PACS export, and keeping the accepted set small keeps every member of it tested.
_REFUSED: tuple[tuple[int, bytes, str, str], ...] = (
    (
        128,
        b"DICM",
        "is a DICOM file, not an image",
        "read it with load_input (pulse_edge.runtime.inputs), which renders ECG waveforms",
    ),
    (0, b"GIF87a", "is a GIF image, which is not accepted", _CONVERT),
    (0, b"GIF89a", "is a GIF image, which is not accepted", _CONVERT),
    (8, b"WEBP", "is a WebP image, which is not accepted", _CONVERT),
    (4, b"ftyp", "is a HEIC/AVIF photo (or other ISO media), which is not accepted", "export it as JPEG"),
    (0, b"\x00\x00\x00\x0cjP  ", "is a JPEG 2000 image, which is not accepted", _CONVERT),
    (
        0,
        b"PK\x03\x04",
        "is a ZIP archive (an office document, or numpy's .npz)",
        f"export the ECG page as PDF ({_ACCEPTED_HINT}), or save one signal array with numpy.save (.npy)",
    ),
)

# PDFium error codes whose own wording ("Success" for an empty page tree) would mislead.
_PDFIUM_REASONS: dict[int, str] = {0: "no page found", 4: "it is password-protected"}

# Exactly what Pillow raises for undecodable data: OSError (truncated data, decoder
# errors, UnidentifiedImageError), SyntaxError (broken chunks), ValueError (bad
# parameters in headers), EOFError and struct.error (short or malformed tag tables).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)

_SHRINK_ADVICE = "downscale it (300 dpi is plenty for an ECG)"
_ORIENTATION_TAG = 0x0112  # EXIF's Orientation
BLANK_LEVELS = 2  # a page whose every channel spans no more levels than this is blank (JPEG noise included)


def load_image(path: str | os.PathLike, *, said: list[str] | None = None) -> Image.Image:
    """Read an image or PDF file and return it as a fully decoded RGB image. `said`: where to put what the reader
    has to say (which page of several it read), for the caller to pass on as notes; None logs it as a warning."""
    p = Path(path)
    name = _one_line(os.fspath(path))
    if not p.exists():
        raise _fail(name, "does not exist", "check the path")
    if p.is_dir():
        raise _fail(name, "is a directory, not a file", f"pass one {'/'.join(ACCEPTED_FORMATS)} file")
    # Opened apart from the `with` so that only opening errors read as "cannot be opened".
    try:
        stream = open(p, "rb")  # noqa: SIM115
    except OSError as exc:
        reason = _one_line(exc.strerror or str(exc))
        raise _fail(name, f"cannot be opened ({reason})", "check its permissions") from exc
    with stream, _saying(said) as say:
        return _decode(stream, name, say)


def load_image_bytes(data: bytes, *, name: str = "<bytes>", said: list[str] | None = None) -> Image.Image:
    """Decode an image or PDF held in memory (e.g. a dataset row) with the same rules as `load_image`."""
    with _saying(said) as say:
        return _decode(io.BytesIO(data), _one_line(name), say)


def accept_image(image: Image.Image, *, name: str = "<image>", said: list[str] | None = None) -> Image.Image:
    """An image handed over in memory (`Image.open` is lazy: it may not be decoded yet) with a decoded file's
    checks: size limits, a decode that fails in one line here rather than later, EXIF rotation, RGB."""
    name = _one_line(name)
    if not isinstance(image, Image.Image):  # a path handed to generate(): interpret() and load_input() read files
        raise _fail(name, f"is a {type(image).__name__}, not a PIL image", "pass an image, or a file to "
                    "Pipeline.interpret or load_input")
    with _saying(said) as say:
        return _check_not_blank(to_rgb(_decoded(image, image.format or "image", name, say), name, say), name)


@contextmanager
def _saying(said: list[str] | None) -> Iterator[list[str]]:
    """The list the decoders append their lines to: the caller's, or one logged as warnings at the end."""
    lines = said if said is not None else []
    yield lines
    if said is None:
        for line in lines:
            log.warning("%s", line)


def _decode(stream: BinaryIO, name: str, say: list[str]) -> Image.Image:
    """Sniff the format from the first bytes and hand the stream to the matching decoder."""
    header = stream.read(_HEADER_BYTES)
    stream.seek(0)
    if not header:
        raise _fail(name, "is empty (0 bytes)", "re-export or re-download the file")
    fmt = _sniff(header, name)
    with _damaged_exif_noted(name, say):
        image = _render_pdf(stream, name, say) if fmt == "PDF" else _decode_raster(stream, fmt, name, say)
    _check_size(image.size, name)
    return _check_not_blank(image, name)


@contextmanager
def _damaged_exif_noted(name: str, say: list[str]) -> Iterator[None]:
    """Pillow warns of damaged EXIF on stderr (at open and again at the rotation) and goes on without its
    orientation: one note instead; any other warning is passed on as it came."""
    with caught_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    damaged = False
    for w in caught:
        if issubclass(w.category, UserWarning) and "EXIF" in str(w.message):
            damaged = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if damaged:
        say.append(f"{name}: its EXIF data is damaged, so a rotation it may record was not applied; check that the "
                   "print reads upright")


def _sniff(header: bytes, name: str) -> str:
    """Return the accepted format `header` starts with, or raise saying what the file is instead."""
    for offset, magic, fmt in _SIGNATURES:
        if header.startswith(magic, offset):
            return fmt
    if _PDF_MAGIC in header:
        return "PDF"
    for offset, magic, problem, advice in _REFUSED:
        if header.startswith(magic, offset):
            raise _fail(name, problem, advice)
    raise _fail(name, "is not an image, PDF or ECG recording that pulse-edge can read (unknown content)",
                f"{_ACCEPTED_HINT}; recordings: {RECORDING_HINT}")


def _decode_raster(stream: BinaryIO, fmt: str, name: str, say: list[str]) -> Image.Image:
    """Open with Pillow restricted to the sniffed format, check the header size, then decode fully."""
    try:
        with _pillow_errors(name, fmt):
            image = Image.open(stream, formats=[fmt])
    except InputError:
        stream.seek(0)
        header = stream.read(8)
        for magic, problem, advice in _PILLOW_CANNOT_OPEN:
            if header.startswith(magic):
                raise _fail(name, problem, advice) from None
        raise
    return to_rgb(_decoded(image, fmt, name, say), name, say)


def _decoded(image: Image.Image, fmt: str, name: str, say: list[str]) -> Image.Image:
    """Check the header's size, decode every pixel, turn by the EXIF orientation (phone photos of printouts
    carry their rotation there, not in the pixels); a multi-page TIFF or GIF says which page it reads."""
    with _pillow_errors(name, fmt):
        _check_size(image.size, name)  # from the header alone: before decoding a single pixel
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)  # before load: a TIFF's load turns it and drops it
        image.load()
        page = image.tell()
        oriented = ImageOps.exif_transpose(_unsigned_32bit(image, name, say))  # a new image, detached from the file
    say.extend(orientation_line(orientation, name))
    say.extend(_pages_line(image, page, name))
    return oriented


@contextmanager
def _pillow_errors(name: str, fmt: str) -> Iterator[None]:
    """Pillow's refusals as one line each. Pillow only warns between its own pixel limit and twice that: the
    warning is an error inside this block only (catch_warnings restores the filters on exit)."""
    with caught_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except _BOMB_ERRORS as exc:
            raise _fail(name, f"is too large (more than {MAX_PIXELS:,} pixels)", _SHRINK_ADVICE) from exc
        except _PIL_DECODE_ERRORS as exc:
            if "closed image" in str(exc):
                raise _fail(name, "was closed before it was handed over", "pass it open (or loaded)") from exc
            raise _fail(
                name, f"is a corrupt or truncated {fmt} ({_pil_reason(exc)})", "re-export or re-scan it"
            ) from exc


def _pages_line(image: Image.Image, page: int, name: str) -> list[str]:
    """Never silently, as for a PDF: the ECG may be on another page. Counting pages seeks through the file, so
    it runs after the page read was copied out; a later page too damaged to count is said as such. A phone
    JPEG's preview (MPO) is no page."""
    if image.format == "MPO":
        return []
    try:
        frames = getattr(image, "n_frames", 1)
    except _PIL_DECODE_ERRORS:
        frames = None
    if frames == 1:
        return []
    count = f"{frames} pages" if frames else "more than one page (a later one unreadable)"
    return [f"{name} has {count}; reading page {page + 1} (export the ECG's page alone to read another)"]


def _render_pdf(stream: BinaryIO, name: str, say: list[str]) -> Image.Image:
    """Render the first page of a PDF at PDF_DPI (capped to MAX_PIXELS) as RGB."""
    import pypdfium2 as pdfium  # lazy: only PDF inputs pay for loading PDFium

    with ExitStack() as stack:
        try:
            document = stack.enter_context(closing(pdfium.PdfDocument(stream)))
            if len(document) == 0:
                raise _fail(name, "is a PDF with no pages", "export the ECG page again")
            if len(document) > 1:  # never silently: the ECG may be on another page
                say.append(f"{name} has {len(document)} pages; reading the first (export the ECG's page alone to "
                           "read another)")
            page = stack.enter_context(closing(document[0]))
            scale = _pdf_scale(page.get_size(), name)
            bitmap = stack.enter_context(closing(page.render(scale=scale)))
            # to_pil() shares the bitmap's buffer, which closing frees: copy it out first.
            image = bitmap.to_pil().copy()
        except pdfium.PdfiumError as exc:
            reason = _PDFIUM_REASONS.get(getattr(exc, "err_code", None), _one_line(str(exc)))
            raise _fail(
                name, f"is a corrupt, empty or locked PDF ({reason})", "re-export it unencrypted"
            ) from exc
    return to_rgb(image, name, say)


def _pdf_scale(page_size: tuple[float, float], name: str) -> float:
    """Pixels per PDF point: PDF_DPI, lowered just enough that the rendered page stays within MAX_PIXELS."""
    width, height = page_size
    if width <= 0 or height <= 0:
        raise _fail(name, f"has a first page of size {width}x{height} pt", "export the ECG page again")
    scale = min(PDF_DPI / _PDF_POINTS_PER_INCH, math.sqrt(MAX_PIXELS / (width * height)))
    # PDFium rounds each side up, which can tip an exact fit just over the limit.
    while math.ceil(width * scale) * math.ceil(height * scale) > MAX_PIXELS:
        scale *= 0.999
    return scale


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise _fail(name, f"is too large ({width}x{height}, limit {MAX_PIXELS:,} pixels)", _SHRINK_ADVICE)
    if min(width, height) < MIN_SIDE_PX:
        raise _fail(
            name,
            f"is too small ({width}x{height}); an ECG needs at least {MIN_SIDE_PX} px on the shorter side",
            "use the original scan or export at a higher resolution",
        )


def _check_not_blank(image: Image.Image, name: str) -> Image.Image:
    """Refuse a page of one colour: a blank PDF page, an all-black scan, or a PNG whose alpha hid everything (some
    exporters leave alpha 0 as 'unused'). The model would answer about a trace that is not there. getextrema
    reads the pixels once and copies nothing."""
    if all(high - low <= BLANK_LEVELS for low, high in image.getextrema()):
        raise _fail(name, "holds no ECG trace: every pixel is the same colour (a blank page, or transparency that "
                    "hid everything)", "export the ECG page again, with its trace")
    return image


def _unsigned_32bit(image: Image.Image, name: str, say: list[str]) -> Image.Image:
    """A TIFF of unsigned 32-bit grey (SampleFormat 1, also its default) as 8-bit grey scaled from its levels'
    range: Pillow reads it as signed mode I, where white (2**32 - 1) is -1, and clipped at 0 the page turned black.
    Read while the TIFF's tags are at hand (exif_transpose's copy has none); any other image as it is."""
    tags = getattr(image, "tag_v2", None)
    if image.mode != "I" or tags is None or tags.get(258) not in (32, (32,)) or tags.get(339, 1) not in (1, (1,)):
        return image
    return grey_to_8bit(np.asarray(image).view(np.uint32).astype(np.int64), U32_MAX, 32, name, say)


def _pil_reason(exc: Exception) -> str:
    # UnidentifiedImageError's text is the repr of our stream object: say what it means instead.
    if isinstance(exc, Image.UnidentifiedImageError):
        return "its header cannot be parsed"
    return _one_line(str(exc))


def _one_line(text: str) -> str:
    """Join the lines of a file name or library message so that errors stay one line."""
    return " ".join(text.splitlines())


def _fail(name: str, problem: str, advice: str) -> InputError:
    return InputError(f"{name}: {problem}; {advice}.")
