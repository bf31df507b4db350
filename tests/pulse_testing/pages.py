"""Plain test images that are still ECG pages to the input checks: runtime/inputs/images.py refuses a page of one
colour (a blank export), so a stand-in page carries one dark trace line across its middle."""

from __future__ import annotations

from PIL import Image, ImageDraw


def page(size: tuple[int, int] = (300, 200), colour: object = "white", mode: str = "RGB") -> Image.Image:
    """A `colour` page of `size` with a one-pixel dark line across the middle row (the only non-`colour` pixels)."""
    image = Image.new(mode, size, colour)
    ImageDraw.Draw(image).line([(0, size[1] // 2), (size[0] - 1, size[1] // 2)], fill=_dark(mode))
    return image


def _dark(mode: str) -> object:
    return {"L": 0, "1": 0, "RGBA": (0, 0, 0, 255), "LA": (0, 255), "CMYK": (0, 0, 0, 255)}.get(mode, (0, 0, 0))
