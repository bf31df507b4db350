"""Input decoding: every accepted format round-trips, every bad input is one clear InputError."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pulse_testing.pages import page

from pulse_edge.errors import InputError
from pulse_edge.runtime.inputs import images as inputs
from pulse_edge.runtime.inputs.images import ACCEPTED_FORMATS, MAX_PIXELS, MIN_SIDE_PX, load_image, load_image_bytes

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def pattern(size: tuple[int, int] = (400, 300)) -> Image.Image:
    """Red left half, blue right half: orientation and colour survive (or not) visibly."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2 :] = BLUE
    return Image.fromarray(array)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes of valid PNG structure whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def assert_input_error(call, name: str, *needles: str) -> str:
    """`call` raises InputError whose message is one line, names the file and contains `needles` in what it says
    after the name (a needle found in the file's name or its temporary folder's proves nothing)."""
    with pytest.raises(InputError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message
    assert name in message
    reason = message[message.index(name) + len(name):]
    for needle in needles:
        assert needle.lower() in reason.lower(), message
    return message


# --- accepted formats round-trip ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_lossless_formats_round_trip_exactly(tmp_path, fmt):
    original = pattern()
    loaded = load_image(write(tmp_path, f"ecg.{fmt.lower()}", encode(original, fmt)))
    assert loaded.mode == "RGB"
    assert loaded.size == (400, 300)
    assert np.array_equal(np.asarray(loaded), np.asarray(original))


def test_jpeg_round_trips_within_compression_error(tmp_path):
    loaded = load_image(write(tmp_path, "ecg.jpg", encode(pattern(), "JPEG", quality=95)))
    assert loaded.mode == "RGB" and loaded.size == (400, 300)
    assert np.abs(np.asarray(loaded, dtype=int) - np.asarray(pattern(), dtype=int))[:, 10:190].max() < 12


# Every TIFF header form: classic and BigTIFF (big_tiff), little- and big-endian (Pillow writes 16-bit grey "I;16B"
# in big-endian order).
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow misreading the big-endian BigTIFF
@pytest.mark.parametrize(("mode", "big_tiff", "magic"), [("I;16", False, b"II*\x00"), ("I;16B", False, b"MM\x00*"),
                                                         ("I;16", True, b"II+\x00"), ("I;16B", True, b"MM\x00+")])
def test_every_tiff_header_form_is_read_or_refused_for_what_it_is(mode, big_tiff, magic):
    values = np.zeros((200, 200), dtype=np.uint16)
    values[:, 100:] = 65535
    data = encode(Image.frombytes(mode, (200, 200), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()),
                  "TIFF", big_tiff=big_tiff)
    assert data[:4] == magic
    try:
        loaded = np.asarray(load_image_bytes(data, name="g.tif"))
    except InputError as e:  # Pillow 13 cannot open a big-endian BigTIFF: said so, not "corrupt, re-scan it"
        assert magic == b"MM\x00+" and "is a big-endian BigTIFF, which Pillow" in str(e) and "corrupt" not in str(e)
        return
    assert loaded[0, [0, 150]].tolist() == [[0, 0, 0], [255] * 3]


def test_bytes_and_path_give_the_same_pixels(tmp_path):
    data = encode(pattern(), "PNG")
    from_bytes = load_image_bytes(data, name="row-17")
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(write(tmp_path, "a.png", data))))


def test_format_is_sniffed_not_taken_from_the_extension(tmp_path):
    png_named_jpg = load_image(write(tmp_path, "scan.jpg", encode(pattern(), "PNG")))
    jpeg_named_png = load_image(write(tmp_path, "scan.png", encode(pattern(), "JPEG")))
    no_extension = load_image(write(tmp_path, "scan", encode(pattern(), "BMP")))
    assert png_named_jpg.size == jpeg_named_png.size == no_extension.size == (400, 300)


def test_multi_frame_tiff_gives_the_first_frame(tmp_path):
    frames = [page((200, 200), colour) for colour in (GREEN, RED, BLUE)]
    data = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    loaded = load_image(write(tmp_path, "multi.tif", data))
    assert loaded.getpixel((100, 50)) == GREEN


def test_pdf_first_page_renders_at_200_dpi(tmp_path):
    # 850x1100 px at 100 dpi is an 8.5x11 in (US letter) page; at 200 dpi that is 1700x2200 px.
    page = pattern((850, 1100))
    second = Image.new("RGB", (850, 1100), GREEN)
    data = encode(page, "PDF", resolution=100, save_all=True, append_images=[second])
    loaded = load_image(write(tmp_path, "ecg.pdf", data))
    assert loaded.mode == "RGB"
    assert loaded.size == (1700, 2200)
    left, right = loaded.getpixel((400, 1100)), loaded.getpixel((1300, 1100))
    assert left[0] > 200 and left[2] < 60  # red half, not the green second page
    assert right[2] > 200 and right[0] < 60


def test_pdf_render_is_capped_below_max_pixels(monkeypatch):
    # 200x200 px at 2 dpi is a 100x100 in page: 20000x20000 px at 200 dpi, far above the cap.
    monkeypatch.setattr(inputs, "MAX_PIXELS", 4_000_000)
    loaded = load_image_bytes(
        encode(page((200, 200)), "PDF", resolution=2), name="poster.pdf"
    )
    width, height = loaded.size
    assert width * height <= 4_000_000
    assert width > 1900 and height > 1900  # capped, not collapsed


# --- modes ---------------------------------------------------------------------------------


def test_transparent_png_is_composited_on_white(tmp_path):
    # A trace exported on a transparent background: black line at alpha 255, the rest alpha 0 (black).
    rgba = np.zeros((200, 300, 4), dtype=np.uint8)
    rgba[100, :, 3] = 255
    loaded = np.asarray(load_image(write(tmp_path, "trace.png", encode(Image.fromarray(rgba), "PNG"))))
    assert (loaded[50] == 255).all()
    assert (loaded[100] == 0).all()


def test_half_transparent_pixels_blend_with_white():
    rgba = page((200, 200), (0, 0, 0, 128), "RGBA")
    loaded = load_image_bytes(encode(rgba, "PNG"), name="half.png")
    assert loaded.getpixel((5, 5)) == (127, 127, 127)  # 255 * (1 - 128/255) rounds to 127


def test_grey_with_alpha_and_palette_with_transparency_go_on_white():
    la = page((200, 200), (0, 0), "LA")
    palette = Image.new("P", (200, 200), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.paste(1, (0, 0, 100, 200))
    palette_data = encode(palette, "PNG", transparency=0)
    assert load_image_bytes(encode(la, "PNG"), name="la.png").getpixel((5, 5)) == WHITE
    loaded = load_image_bytes(palette_data, name="p.png")
    assert loaded.getpixel((50, 50)) == RED
    assert loaded.getpixel((150, 50)) == WHITE


def test_16_bit_grey_is_scaled_not_clipped():
    # 65535 -> 255, 257*100 -> 100, 32768 -> 32768/257 = 127.5 -> rounds to 128, 0 -> 0.
    values = np.zeros((200, 200), dtype=np.uint16)
    values[:, 50:100], values[:, 100:150], values[:, 150:] = 257 * 100, 32768, 65535
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    for fmt in ("PNG", "TIFF"):
        loaded = np.asarray(load_image_bytes(encode(image, fmt), name=f"grey16.{fmt}"))
        assert loaded[0, [0, 60, 110, 160]].tolist() == [[0, 0, 0], [100] * 3, [128] * 3, [255] * 3]


def test_32_bit_grey_is_scaled_from_its_range_not_clipped_at_16_bits():
    """Pillow's mode I holds a TIFF's 32-bit greyscale: clipped at 65535, everything above 0 came out white."""
    values = np.zeros((200, 200), dtype=np.int32)
    values[:, 50:100], values[:, 100:] = 2**30, 2**31 - 1
    loaded = np.asarray(load_image_bytes(encode(Image.fromarray(values, mode="I"), "TIFF"), name="grey32.tif"))
    assert loaded[0, [0, 60, 110]].tolist() == [[0, 0, 0], [128] * 3, [255] * 3]
    notes: list[str] = []  # mode I holds 16-bit grey too (a signed TIFF's): the note names no file depth
    load_image_bytes(encode(Image.fromarray(values // 2**19, mode="I"), "TIFF"), name="g.tif", said=notes)
    assert notes == ["g.tif: its grey levels stop at 4095, so they were read as 12-bit grey (4095 is white)"]


def test_unsigned_32_bit_grey_keeps_white_white():
    """A TIFF's usual 32-bit grey is unsigned (SampleFormat 1, its default): Pillow reads it as signed, white as -1,
    and clipped at 0 the page was black (refused as blank)."""
    values = np.full((200, 300), 2**32 - 1, np.uint32)
    values[100], values[:, 50] = 0, 2**31
    data = encode(Image.fromarray(values.view(np.int32), mode="I"), "TIFF")
    signed, unsigned = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00", b"\x53\x01\x03\x00\x01\x00\x00\x00\x01\x00"
    assert data.count(signed) == 1  # Pillow's SampleFormat 2 entry, turned into 1 as other writers set it
    loaded = np.asarray(load_image_bytes(data.replace(signed, unsigned), name="u32.tif"))
    assert loaded[0, [0, 50]].tolist() == [[255] * 3, [128] * 3] and loaded[100, 0].tolist() == [0, 0, 0]
    sixteen = (values >> 16).astype(np.uint32)  # 16-bit data stored in 32 bits: scaled from its own range
    data = encode(Image.fromarray(sixteen.view(np.int32), mode="I"), "TIFF").replace(signed, unsigned)
    assert np.asarray(load_image_bytes(data, name="u16in32.tif"))[0, 0].tolist() == [255] * 3


@pytest.mark.parametrize(("image", "fmt"), [
    (Image.new("RGB", (400, 300), "white"), "PNG"), (Image.new("RGB", (400, 300), "black"), "JPEG"),
    (Image.new("RGBA", (400, 300), (0, 80, 0, 0)), "PNG"),  # alpha 0 everywhere: white once composited
    (Image.new("RGB", (400, 300), "white"), "PDF")], ids=["white", "black jpeg", "transparent", "blank pdf page"])
def test_a_page_of_one_colour_is_refused_as_blank(image: Image.Image, fmt: str) -> None:
    """The model would answer about a trace that is not there."""
    assert_input_error(lambda: load_image_bytes(encode(image, fmt), name=f"blank.{fmt.lower()}"),
                       f"blank.{fmt.lower()}", "holds no ECG trace: every pixel is the same colour")
    from pulse_edge.runtime.inputs import load_input

    assert_input_error(lambda: load_input(image, name="in-memory"), "in-memory", "holds no ECG trace")
    assert load_image_bytes(encode(page((400, 300)), fmt), name="ok").size[0] >= 400  # one line is enough


def test_a_white_scan_with_sensor_noise_is_blank_and_a_faint_line_is_not() -> None:
    """A scanner's blank page is not one colour: levels 253-255 (the noise BLANK_LEVELS allows) are still blank."""
    noise = np.random.default_rng(0).integers(253, 256, (300, 400, 3), dtype=np.uint8)
    assert_input_error(lambda: load_image_bytes(encode(Image.fromarray(noise), "PNG"), name="scan.png"),
                       "scan.png", "holds no ECG trace")
    traced = noise.copy()
    traced[150, 20:380] = 200  # one faint trace line
    assert load_image_bytes(encode(Image.fromarray(traced), "PNG"), name="trace.png").size == (400, 300)


def test_grey_palette_and_cmyk_become_rgb():
    grey = page((200, 200), 77, "L")
    cmyk = page((200, 200), (0, 255, 255, 0), "CMYK")  # no cyan/black, full magenta+yellow = red
    palette = page((200, 200), GREEN).convert("P")
    assert load_image_bytes(encode(grey, "PNG"), name="l.png").getpixel((1, 1)) == (77, 77, 77)
    assert load_image_bytes(encode(cmyk, "TIFF"), name="c.tif").getpixel((1, 1)) == RED
    assert load_image_bytes(encode(palette, "BMP"), name="p.bmp").getpixel((1, 1)) == GREEN
    cmyk_jpeg = load_image_bytes(encode(cmyk, "JPEG", quality=95), name="c.jpg").getpixel((1, 1))
    assert cmyk_jpeg[0] > 230 and max(cmyk_jpeg[1:]) < 25


def test_an_image_opened_by_the_caller_is_read_as_its_file_would_be(caplog):
    """`Image.open` is lazy: handed over in memory, a phone photo must still turn by its EXIF orientation, a
    truncated file still fail in one line here (not later, deep in preprocessing), and a second TIFF page
    still be said."""
    from pulse_edge.runtime.inputs import load_input

    exif = Image.Exif()
    exif[0x0112] = 6
    photo = encode(pattern((300, 200)), "JPEG", quality=95, exif=exif)
    in_memory = load_input(Image.open(io.BytesIO(photo)), name="phone.jpg").image
    assert in_memory.size == (200, 300) and in_memory.tobytes() == load_image_bytes(photo, name="p.jpg").tobytes()
    png = encode(pattern(), "PNG")
    assert_input_error(lambda: load_input(Image.open(io.BytesIO(png[: len(png) // 2])), name="cut.png"), "cut.png",
                       "corrupt or truncated")
    pages = io.BytesIO()
    page((400, 300)).save(pages, "TIFF", save_all=True, append_images=[pattern()])
    with caplog.at_level("WARNING"):
        load_image_bytes(pages.getvalue(), name="two.tif")  # a caller that takes no notes: the log says it
        in_memory = load_input(Image.open(io.BytesIO(pages.getvalue())), name="two-in-memory.tif")
        as_file = load_input(pages.getvalue(), name="two-bytes.tif")
    assert [r.getMessage().split(" has ")[0] for r in caplog.records if "has 2 pages" in r.getMessage()] == ["two.tif"]
    # load_input's callers (infer, the server's clients) get it as a note of the answer instead
    assert [n.split(" has ")[0] for n in (*in_memory.notes, *as_file.notes) if "has 2 pages; reading page 1" in n] == [
        "two-in-memory.tif", "two-bytes.tif"]
    caplog.clear()
    phone = io.BytesIO()  # a phone JPEG with its MPF preview: Pillow opens it as two frames, yet it is one photo
    pattern().save(phone, "MPO", save_all=True, append_images=[pattern((160, 120))])
    with caplog.at_level("WARNING"):
        load_image_bytes(phone.getvalue(), name="phone.jpg")
    assert not [r for r in caplog.records if "pages" in r.getMessage()]
    closed = Image.open(io.BytesIO(png))
    closed.close()
    assert_input_error(lambda: load_input(closed, name="gone.png"), "gone.png", "was closed before it was handed over")


def test_float_images_are_refused_with_the_mode():
    floats = Image.fromarray(np.ones((200, 200), dtype=np.float32))
    assert_input_error(lambda: load_image_bytes(encode(floats, "TIFF"), name="f.tif"), "f.tif", "'F'")


def test_exif_orientation_is_applied():
    # Stored 300x200 landscape, red left half; EXIF orientation 6 says "rotate 90 degrees clockwise to
    # display", so the displayed image is 200x300 with the red half on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image_bytes(encode(pattern((300, 200)), "JPEG", quality=95, exif=exif), name="phone.jpg")
    assert loaded.size == (200, 300)
    top, bottom = loaded.getpixel((100, 40)), loaded.getpixel((100, 260))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    notes: list[str] = []
    load_image_bytes(encode(pattern((300, 200)), "JPEG", quality=95, exif=exif), name="phone.jpg", said=notes)
    assert notes == ["phone.jpg: turned 90 degrees clockwise as its EXIF orientation says; check that the print "
                     "reads upright"]  # a photo whose pixels were already turned, tag left, comes out sideways


def _ecg_sheet(dtype: type, paper: int) -> Image.Image:
    """Grey levels on a page `paper` bright with a trace of 0 (black) across it."""
    values = np.full((200, 300), paper, dtype)
    values[100, :], values[:, 40] = 0, paper // 2
    return Image.fromarray(values)


@pytest.mark.parametrize(("paper", "bits"), [(4095, 12), (1023, 10), (255, 8)])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_grey_stored_wider_than_its_levels_is_scaled_from_their_depth(fmt: str, paper: int, bits: int) -> None:
    """A 12-bit scanner's 0..4095 in a 16-bit file was scaled from 65535: a near-black page (levels 0..16) the model
    read anyway; 8-bit levels in a 16-bit file were refused as blank. Read from their own depth, said."""
    notes: list[str] = []
    loaded = np.asarray(load_image_bytes(encode(_ecg_sheet(np.uint16, paper), fmt), name="deep", said=notes))
    assert loaded[0, 0].tolist() == [255] * 3 and loaded[100, 0].tolist() == [0] * 3
    assert loaded[0, 40].tolist() == [127] * 3  # half the depth's white, rounded to nearest
    assert notes == [f"deep: its grey levels stop at {paper} in a 16-bit file, so they were read as {bits}-bit grey "
                     f"({paper} is white)"]
    full = []
    load_image_bytes(encode(_ecg_sheet(np.uint16, 60000), fmt), name="full", said=full)
    # 16-bit data: its own scale, said all the same (PULSE's convert("RGB") clips it at 255, a white page)
    assert full == ["full: its grey levels in a 16-bit file were scaled to 8 bits (65535 is white)"]


def test_transparency_is_said_and_a_dark_transparent_colour_is_the_trace() -> None:
    """Shown on white, a transparent black key erased a black trace: PULSE's code (convert) keeps it, and so does
    this where the key covers less than half the page; any transparency composited is a note."""
    sheet = np.full((200, 300, 3), 255, np.uint8)
    sheet[100, :] = 0
    notes: list[str] = []
    keyed = np.asarray(load_image_bytes(encode(Image.fromarray(sheet), "PNG", transparency=(0, 0, 0)), name="k.png",
                                        said=notes))
    assert (keyed[100] == 0).all() and (keyed[0] == 255).all()
    assert notes == ["k.png: its transparent colour (0, 0, 0) is dark and covers less than half the page, so it is "
                     "taken for the trace and read as drawn"]
    background = sheet.copy()  # the same black key as a background: on white, the red trace kept
    background[:], background[100, :] = 0, RED
    notes = []
    shown = np.asarray(load_image_bytes(encode(Image.fromarray(background), "PNG", transparency=(0, 0, 0)),
                                        name="b.png", said=notes))
    assert shown[0, 0].tolist() == list(WHITE) and shown[100, 0].tolist() == list(RED)
    assert notes == ["b.png: has transparent pixels, shown on white as a viewer shows them"]
    opaque = []
    load_image_bytes(encode(Image.fromarray(sheet).convert("RGBA"), "PNG"), name="o.png", said=opaque)
    assert opaque == []


def _palette_sheet(margin_index: int, trace_index: int = 1) -> Image.Image:
    """A white page with a black trace, and a margin of `margin_index` beside it: palette 0 black, 1 black, 2
    white."""
    values = np.full((300, 400), 2, np.uint8)
    values[:, :60] = margin_index
    values[150, 60:] = trace_index
    sheet = Image.fromarray(values, "P")
    sheet.putpalette([0, 0, 0, 0, 0, 0, 255, 255, 255])
    return sheet


def test_a_transparent_colour_is_the_trace_only_where_nothing_opaque_is_drawn_in_it(tmp_path: Path) -> None:
    """An optimiser's palette: a transparent black margin (index 0) beside an opaque black trace (index 1) is a
    margin, shown on white; a palette whose only black is the transparent one draws its trace in it. Read as
    drawn, the print keeps no transparency (saved by --save-render, read again by the model's own check)."""
    from pulse_edge.runtime.batch import save_image
    from pulse_edge.runtime.inputs.images import accept_image

    notes: list[str] = []
    margin = np.asarray(load_image_bytes(encode(_palette_sheet(0), "PNG", transparency=0), name="m.png",
                                         said=notes))
    assert margin[5, 5].tolist() == list(WHITE) and margin[150, 200].tolist() == list(BLACK)
    assert notes == ["m.png: has transparent pixels, shown on white as a viewer shows them"]
    drawn = load_image_bytes(encode(_palette_sheet(2, trace_index=0), "PNG", transparency=0), name="t.png",
                             said=(notes := []))  # the only black drawn is the transparent one: the trace
    assert "transparency" not in drawn.info and notes[0].startswith("t.png: its transparent colour (0, 0, 0) is dark")
    again: list[str] = []
    accept_image(drawn, name="t.png", said=again)
    save_image(drawn, tmp_path / "print.png")
    assert again == [] and "transparency" not in Image.open(tmp_path / "print.png").info
    assert np.asarray(drawn)[150, 200].tolist() == list(BLACK)
    grey = np.where(np.asarray(_palette_sheet(2)) == 1, 0, 255).astype(np.uint8)  # the same in grey: key 0
    kept = np.asarray(load_image_bytes(encode(Image.fromarray(grey, "L"), "PNG", transparency=0), name="g.png"))
    assert kept[150, 200].tolist() == list(BLACK)
    light = np.where(np.asarray(_palette_sheet(2)) == 1, 0, 255).astype(np.uint8)
    light[:40, :40] = 200  # a light grey box marked transparent: a label's background, never a trace
    shown = np.asarray(load_image_bytes(encode(Image.fromarray(light, "L"), "PNG", transparency=200), name="l.png"))
    assert shown[5, 5].tolist() == list(WHITE) and shown[150, 200].tolist() == list(BLACK)


def test_a_tiffs_exif_rotation_is_said_too() -> None:
    """Pillow turns a TIFF while loading it and drops the tag: read after the load, the rotation went unsaid."""
    exif = Image.Exif()
    exif[0x0112] = 6
    notes: list[str] = []
    turned = load_image_bytes(encode(pattern((400, 200)), "TIFF", exif=exif), name="scan.tif", said=notes)
    assert turned.size == (200, 400)
    assert notes == ["scan.tif: turned 90 degrees clockwise as its EXIF orientation says; check that the print "
                     "reads upright"]


# --- size limits ---------------------------------------------------------------------------


def test_limits_are_sane():
    assert set(ACCEPTED_FORMATS) == {"PNG", "JPEG", "TIFF", "BMP", "PDF"}
    assert 64 <= MIN_SIDE_PX <= 256
    assert MAX_PIXELS > 35_000_000  # a 600-dpi A4 scan must fit


def test_one_by_one_is_too_small():
    assert_input_error(
        lambda: load_image_bytes(encode(Image.new("RGB", (1, 1)), "PNG"), name="dot.png"),
        "dot.png",
        "too small",
        "1x1",
    )


def test_min_side_boundary():
    ok = load_image_bytes(encode(page((MIN_SIDE_PX, 1000)), "PNG"), name="ok.png")
    assert ok.size == (MIN_SIDE_PX, 1000)
    narrow = encode(Image.new("RGB", (1000, MIN_SIDE_PX - 1)), "PNG")
    assert_input_error(lambda: load_image_bytes(narrow, name="strip.png"), "strip.png", "too small")


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (20000, 20000),  # 400 Mpx: beyond Pillow's own hard limit
        (10000, 10000),  # 100 Mpx: where Pillow only warns
        (9000, 8000),  # 72 Mpx: below Pillow's limits, above ours
    ],
)
def test_too_large_is_refused_from_the_header_fast(tmp_path, width, height):
    path = write(tmp_path, f"huge{width}.png", png_claiming(width, height))
    assert path.stat().st_size < 1000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        start = time.perf_counter()
        assert_input_error(lambda: load_image(path), path.name, "too large")
        elapsed = time.perf_counter() - start
        assert warnings.filters == filters_before  # the loader's stricter filter did not leak
    assert elapsed < 1.0
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# --- every other failure -------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_input_error(lambda: load_image(tmp_path / "nope.png"), "nope.png", "does not exist")


def test_directory(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    assert_input_error(lambda: load_image(folder), "scans", "directory")


def test_empty_file_and_empty_bytes(tmp_path):
    assert_input_error(lambda: load_image(write(tmp_path, "zero.png", b"")), "zero.png", "empty")
    assert_input_error(lambda: load_image_bytes(b"", name="row-3"), "row-3", "empty")


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "locked.png", encode(pattern(), "PNG"))
    path.chmod(0)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:  # root opens it anyway: refuse it as the kernel would
        import pulse_edge.runtime.inputs.images as images

        def refused(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))
        monkeypatch.setattr(images, "open", refused, raising=False)
    assert_input_error(lambda: load_image(path), "locked.png", "cannot be opened (Permission denied)",
                       "check its permissions")


def test_text_file_lists_accepted_formats(tmp_path):
    path = write(tmp_path, "notes.png", b"Sinus rhythm, rate 72.\n")
    assert_input_error(lambda: load_image(path), "notes.png", *ACCEPTED_FORMATS)


@pytest.mark.parametrize(
    ("fmt", "needle"),
    [("GIF", "GIF"), ("WEBP", "WebP")],
)
def test_refused_image_formats_say_what_they_are(fmt, needle):
    data = encode(pattern(), fmt)
    assert_input_error(lambda: load_image_bytes(data, name=f"ecg.{fmt}"), f"ecg.{fmt}", needle, "PNG")


def test_dicom_is_recognised_and_sent_to_load_input(tmp_path):
    # DICOM Part 10: 128-byte preamble, then "DICM", then data elements.
    path = write(tmp_path, "ecg.png", b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64)
    assert_input_error(lambda: load_image(path), "ecg.png", "DICOM", "not an image", "load_input")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow on a cut TIFF tag table
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_truncated_images_are_corrupt_not_crashes(fmt):
    data = encode(pattern(), fmt)
    for cut in (len(data) // 2, 40):
        assert_input_error(
            lambda d=data[:cut]: load_image_bytes(d, name=f"cut.{fmt}"), f"cut.{fmt}", "corrupt"
        )


def test_garbled_png_is_corrupt():
    data = bytearray(encode(pattern(), "PNG"))
    data[60:160] = bytes(100)  # zero the start of the compressed pixel stream
    assert_input_error(lambda: load_image_bytes(bytes(data), name="bad.png"), "bad.png", "corrupt")


def test_corrupt_pdf(tmp_path):
    path = write(tmp_path, "report.pdf", b"%PDF-1.7\n" + b"\x00garbage" * 20)
    assert_input_error(lambda: load_image(path), "report.pdf", "is a corrupt, empty or locked PDF", "re-export it")


def _pdf_without_pages() -> bytes:
    """A well-formed PDF (catalog, an empty page tree, a correct xref table) with no page."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    table = len(out)
    out += b"xref\n0 3\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size 3 /Root 1 0 R >>\nstartxref\n%d\n%%EOF\n" % table


def test_pdf_with_no_pages():
    """PDFium refuses a document without pages when it opens it (so the reader's own page-count check is only a
    guard): one line. Its reason ("no page found", or a "Data format error" left from an earlier failure: PDFium's
    last error is process-wide) is not asserted."""
    pytest.importorskip("pypdfium2")
    assert_input_error(lambda: load_image_bytes(_pdf_without_pages(), name="blank.pdf"), "blank.pdf",
                       "is a corrupt, empty or locked PDF", "re-export it")


def test_names_with_newlines_still_give_one_line(tmp_path):
    message = assert_input_error(lambda: load_image_bytes(b"junk", name="a\nb.png"), "a b.png")
    assert message.count("\n") == 0


# --- lean runtime --------------------------------------------------------------------------


def test_importing_inputs_loads_neither_torch_nor_pdfium():
    code = (
        "import sys, pulse_edge.runtime.inputs.images, pulse_edge.runtime.image.preprocess; "
        "print(sorted(m for m in ('torch', 'transformers', 'pypdfium2') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_pdf_page_is_rendered_as_large_as_fits_and_never_past_the_limit() -> None:
    """PDFium rounds each side up: the scale that fits exactly in real numbers can tip the page just over
    MAX_PIXELS, and a large page would then be refused instead of rendered a little smaller."""
    import math

    from pulse_edge.runtime.inputs.images import PDF_DPI, _pdf_scale

    rng = np.random.default_rng(5)
    for width, height in [(14400.0, 14400.0), (1191.0, 842.0), *rng.uniform(3000, 40000, (200, 2)).tolist()]:
        scale = _pdf_scale((width, height), "p.pdf")
        pixels = math.ceil(width * scale) * math.ceil(height * scale)
        assert pixels <= MAX_PIXELS, (width, height)
        assert pixels > 0.99 * MAX_PIXELS or scale == PDF_DPI / 72  # shrunk no further than needed, or full dpi


def _damaged_exif_jpeg() -> bytes:
    """A print whose EXIF orientation tag's type field is garbage: Pillow warns and keeps the pixels unturned."""
    pixels = np.full((400, 600, 3), 255, np.uint8)
    pixels[200] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", exif=exif.tobytes())
    data = bytearray(out.getvalue())
    at = data.find(b"Exif\x00\x00") + 14
    data[at:at + 2] = b"\xff\x7f"
    return bytes(data)


def test_two_threads_reading_prints_keep_their_own_notes_and_leave_the_warning_filters_as_they_were() -> None:
    """warnings.catch_warnings saves and restores the process's filters and printer: two threads inside at once
    restored each other's. A clean PNG got the other thread's "EXIF data is damaged" note (about 1 in 5 here), and
    "DecompressionBombWarning is an error" and a recording printer stayed set for the host program (a concurrency
    review)."""
    import threading

    from pulse_edge.runtime.inputs import load_input

    damaged, clean = _damaged_exif_jpeg(), io.BytesIO()
    page((600, 400)).save(clean, "PNG")
    assert any("EXIF data is damaged" in note for note in load_input(damaged, name="bad.jpg").notes)
    filters, printer = list(warnings.filters), warnings._showwarnmsg_impl
    wrong: list[str] = []

    def reading(data: bytes, name: str, rounds: int = 150) -> None:
        for _ in range(rounds):
            noted = any("EXIF data is damaged" in note for note in load_input(data, name=name).notes)
            if noted != (name == "bad.jpg"):
                wrong.append(name)

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the race shows within a few rounds
    try:
        threads = [threading.Thread(target=reading, args=args) for args in ((damaged, "bad.jpg"),
                                                                           (clean.getvalue(), "good.png"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert wrong == []
    assert warnings.filters == filters and warnings._showwarnmsg_impl is printer


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_another_thread_reads_can_read_too() -> None:
    """The readers' lock held by a thread that is not in the child: the child's first read waited for ever."""
    import threading

    from pulse_edge.runtime.inputs import warned

    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        with warned.caught_warnings():
            holding.set()
            release.wait(10)

    png = _png_bytes()
    thread = threading.Thread(target=reader)
    thread.start()
    holding.wait(10)
    try:
        child = os.fork()
        if child == 0:  # the child: one read, then out whatever happens (the alarm ends a wait for ever)
            signal.alarm(5)
            try:
                load_image_bytes(png, name="forked.png")
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(child, 0)
    finally:
        release.set()
        thread.join()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def _png_bytes() -> bytes:
    out = io.BytesIO()
    page((600, 400)).save(out, "PNG")
    return out.getvalue()
