"""ECGInstruct (PULSE's training data) as calibration samples: a JSON list of `{id, image, conversations}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, classify_task
from pulse_edge.calibration.datasets.ecgbench import readers as ecgbench_data
from pulse_edge.calibration.datasets.image_paths import image_under
from pulse_edge.calibration.datasets.json_text import parse_json, read_utf8
from pulse_edge.errors import InputError
from pulse_edge.runtime.text.prompt import IMAGE_MARKER

log = logging.getLogger(__name__)


def load_ecginstruct(json_path: str | Path, image_root: str | Path | None = None) -> list[CalibrationSample]:
    """Read and validate an ECGInstruct JSON list; images are relative to `image_root` (default: the JSON's folder).

    Every problem is one `InputError` line naming the item (index and id) and what is wrong; items whose image is
    missing are left out with a warning where others have theirs (a partly unpacked image set).
    """
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else path.parent
    samples, missing = [], []
    for i, item in enumerate(_read_json_list(path)):
        try:
            samples.append(_ecginstruct_sample(item, i, path, root))
        except _ImageMissing as e:
            missing.append(e)
    if missing and not samples:
        raise missing[0]
    if missing:  # a partly unpacked image set: what is there still calibrates, said
        log.warning("%d of %d ECGInstruct items have no image under %s (first: %s); calibrating from the %d that "
                    "do", len(missing), len(missing) + len(samples), root, missing[0].image, len(samples))
    return samples


class _ImageMissing(InputError):
    """An item whose image is not under the image root (the line names the item and the root)."""

    def __init__(self, message: str, image: str) -> None:
        super().__init__(message)
        self.image = image


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise InputError(f"{path}: ECGInstruct file not found")
    data = parse_json(read_utf8(path), path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{id, image, conversations}} items "
                         f"(ECGInstruct format), got a {type(data).__name__}")
    return data


def _ecginstruct_sample(item: Any, index: int, path: Path, root: Path) -> CalibrationSample:
    where = f"{path}: item {index}"
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: expected an object {{id, image, conversations}}, got a {type(item).__name__}")
    where = f"{where} (id {item.get('id', '?')})"
    missing = [key for key in ("id", "image", "conversations") if key not in item]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(missing)}")
    turns = _conversation_turns(item["conversations"], where)
    image = image_under(root, str(item["image"]), where)
    if image is None:
        raise _ImageMissing(f"{where}: image {item['image']!r} not found under {root}; pass the folder the image "
                            "paths are relative to as image_root (--image-root)", str(item["image"]))
    folder = str(item["image"]).replace("\\", "/").lstrip("./").partition("/")
    return CalibrationSample(id=str(item["id"]), source="ecginstruct", task=classify_task(turns[0][0]),
                             turns=turns, image_path=image, origin=folder[0] if folder[1] else "")


def _conversation_turns(conversations: Any, where: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs from alternating human/gpt messages; `<image>` only opens the first question."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: conversations must be a non-empty list of {{from, value}} messages")
    for j, message in enumerate(conversations):
        expected = ("human",) if j % 2 == 0 else ("gpt", "assistant")
        if not isinstance(message, Mapping) or not isinstance(message.get("value"), str):
            raise InputError(f"{where}: conversation message {j} must be {{from, value}} with a text value")
        if message.get("from") not in expected:
            raise InputError(f"{where}: conversation message {j} is from {message.get('from')!r}, expected "
                             f"{expected[0]!r} (messages must alternate human/gpt, starting with human)")
    if len(conversations) % 2:
        raise InputError(f"{where}: the conversation ends with a human message that has no gpt answer")
    values = [str(message["value"]) for message in conversations]
    if IMAGE_MARKER not in values[0]:
        raise InputError(f"{where}: the first human message does not carry the image (expected it to start "
                         f"with '{IMAGE_MARKER}\\n')")
    if any(IMAGE_MARKER in value for value in values[2::2]):
        raise InputError(f"{where}: '{IMAGE_MARKER}' appears in a later human message; PULSE takes one image")
    # LLaVA's training (preprocess_multimodal) took the marker out of the question that holds it and stripped that
    # one: "<image>\n\nQ" and "Q <image>" were trained as "Q"; later questions as written
    questions = [ecgbench_data.question_text(values[0]).strip(), *values[2::2]]
    return tuple(zip(questions, values[1::2], strict=True))
