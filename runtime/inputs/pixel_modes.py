"""Any pixel mode Pillow decodes, as the 8-bit RGB the model reads, saying where that differs from a plain convert.

PULSE's own code reads an image as `Image.open(path).convert("RGB")`. That is right for 8-bit RGB, grey, palette,
CMYK and YCbCr, and these pass through it unchanged. Three kinds of file it reads wrong, and these are read as a
viewer shows them instead, each with a note, since the model then sees other pixels than PULSE's code would give:

- transparency: `convert` drops alpha, and an ECG exported on a transparent background (black under alpha 0)
  turns into a black page; here it goes on white. A dark transparent colour (a PNG's tRNS key) over less than half
  the page, and drawn nowhere opaque, is the trace's own: on white the trace would vanish, so it is read as drawn;
- 16- and 32-bit grey: `convert` clips at 255, a white page; here the levels are scaled from the smallest full
  scale of 8 to 16 bits (then 32) that holds them: a 12-bit scanner's 0..4095 stored in 16 bits is black to white,
  not black to 6% grey;
- EXIF orientation (images.py turns the pixels; this module's note says so).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pulse_edge.errors import InputError

_WHITE = (255, 255, 255, 255)
U16_MAX = 2**16 - 1
I32_MAX = 2**31 - 1
U32_MAX = 2**32 - 1
_GREY_BITS = (8, 10, 12, 14, 16)  # the depths scanners and exporters store in 16-bit files
DARK_KEY = 128  # a transparent colour darker than this (ITU-R 601 luma) is taken for the trace's
# EXIF orientation values that move pixels, as ImageOps.exif_transpose applies them
ORIENTATIONS = {2: "mirrored", 3: "turned 180 degrees", 4: "flipped", 5: "turned and mirrored",
                6: "turned 90 degrees clockwise", 7: "turned and mirrored", 8: "turned 90 degrees anticlockwise"}


def to_rgb(image: Image.Image, name: str, say: list[str]) -> Image.Image:
    """Any supported pixel mode as RGB (module doc); what differs from a plain convert goes to `say`."""
    if image.mode in _ALPHA_MODES or ("transparency" in image.info and image.mode in ("P", "L", "RGB")):
        return _transparency_resolved(image, name, say)
    if image.mode in _INTEGER_GREY:
        widest, bits = _INTEGER_GREY[image.mode]
        return grey_to_8bit(np.asarray(image).astype(np.int64), widest, bits, name, say).convert("RGB")
    if image.mode not in _PLAIN_MODES:
        raise InputError(f"{name}: has an unsupported pixel mode {image.mode!r}; save it as 8-bit RGB or grey.")
    return image if image.mode == "RGB" else image.convert("RGB")


def orientation_line(orientation: int, name: str) -> list[str]:
    """The note for a photo that images.py turned upright by its EXIF orientation."""
    turned = ORIENTATIONS.get(orientation)
    return [f"{name}: {turned} as its EXIF orientation says; check that the print reads upright"] if turned else []


def grey_to_8bit(values: np.ndarray, widest: int, bits: int | None, name: str, say: list[str]) -> Image.Image:
    """Integer grey levels of a `bits`-bit file (None: a depth Pillow's mode does not tell) as 8-bit grey, scaled
    from the smallest full scale that holds them (module doc; `widest` past 16 bits), rounded to nearest: full
    scale -> 255 exactly."""
    top = int(values.max(initial=0))
    full = next((2**depth - 1 for depth in _GREY_BITS if top < 2**depth), widest)
    stored = f" in a {bits}-bit file" if bits else ""
    if full < U16_MAX:
        say.append(f"{name}: its grey levels stop at {top}{stored}, so they were read as {full.bit_length()}-bit "
                   f"grey ({full} is white)")
    else:  # PULSE's convert("RGB") clips at 255: a white page, where the model here sees the scaled levels
        say.append(f"{name}: its grey levels{stored} were scaled to 8 bits ({full} is white)")
    return Image.fromarray(((np.clip(values, 0, full) * 255 + full // 2) // full).astype(np.uint8), mode="L")


def _transparency_resolved(image: Image.Image, name: str, say: list[str]) -> Image.Image:
    """Transparent pixels on white (module doc), said; a dark transparent colour over less than half the page is
    the trace's own (the page around it is not transparent): read as drawn, as PULSE's code reads it."""
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A").histogram()  # pixels per alpha level
    total = image.width * image.height
    if alpha[255] == total:
        return rgba.convert("RGB")
    key = _key_colour(image)
    if key is not None and _luma(key) < DARK_KEY and 2 * alpha[0] < total and not _drawn_opaque_too(image, key):
        say.append(f"{name}: its transparent colour {key} is dark and covers less than half the page, so it is "
                   "taken for the trace and read as drawn")
        drawn = image.convert("RGB")
        drawn.info.pop("transparency", None)  # Pillow keeps the key: a saved print would hide its trace again
        return drawn
    say.append(f"{name}: has transparent pixels, shown on white as a viewer shows them")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _key_colour(image: Image.Image) -> tuple[int, int, int] | None:
    """The RGB colour a file marks transparent (a PNG's tRNS key); None where alpha is its own channel or a
    palette's per-entry alphas."""
    key = image.info.get("transparency")
    if image.mode == "P":
        palette = (image.getpalette() or []) if isinstance(key, int) else []
        colour = tuple(palette[3 * key:3 * key + 3])
        return colour if len(colour) == 3 else None
    if image.mode == "L" and isinstance(key, int):
        return key, key, key
    return tuple(key[:3]) if image.mode == "RGB" and isinstance(key, tuple) and len(key) >= 3 else None


def _drawn_opaque_too(image: Image.Image, key: tuple[int, int, int]) -> bool:
    """A palette that draws the key's colour opaque as well (an optimiser's transparent black border beside the
    black trace): there, transparency is the page's margin, not its trace."""
    if image.mode != "P":
        return False
    palette, used = image.getpalette() or [], image.histogram()
    return any(count and index != image.info["transparency"] and tuple(palette[3 * index:3 * index + 3]) == key
               for index, count in enumerate(used[:len(palette) // 3]))


def _luma(colour: tuple[int, int, int]) -> float:
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


# 16-bit grey in Pillow's I;16 modes; mode I holds 16-bit grey in some formats (a signed TIFF's; 16-bit PNGs in
# older Pillow releases) and 32-bit in others: its file's depth is not said
_INTEGER_GREY = {"I;16": (U16_MAX, 16), "I;16L": (U16_MAX, 16), "I;16B": (U16_MAX, 16), "I;16N": (U16_MAX, 16),
                 "I": (I32_MAX, None)}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_PLAIN_MODES = frozenset({"RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX"})  # convert("RGB") reads them right
