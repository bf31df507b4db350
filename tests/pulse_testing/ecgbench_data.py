"""Small ECGBench-shaped datasets in both released layouts, for tests and dry runs.

The files are the real formats (HF parquet with an image struct column, or a
JSON list with an images/ folder); the items are made up, so nothing measured
on them says anything about accuracy.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pulse_edge.calibration.datasets.ecgbench.readers import IMAGE_MARKER
from pulse_edge.errors import ConfigError

Answer = str | tuple[str, ...]


@dataclass(frozen=True)
class FixtureItem:
    """One item: (question, reference answer) turns and the PNG bytes of its image."""

    id: str
    turns: tuple[tuple[str, Answer], ...]
    image: bytes

    def conversations(self, *, shape: str) -> list[dict[str, object]]:
        """The `conversations` field in one of the released shapes (SHAPES)."""
        out: list[dict[str, object]] = []
        for k, (question, answer) in enumerate(self.turns):
            asked = f"{IMAGE_MARKER}\n{question}" if k == 0 else question
            if shape == "question_answer":
                out.append({"question": asked, "answer": ", ".join(answer) if isinstance(answer, tuple) else answer})
                continue
            if shape == "value_lists":
                asked, answer = [asked], list(answer) if isinstance(answer, tuple) else [answer]
            elif shape == "text":
                answer = ", ".join(answer) if isinstance(answer, tuple) else answer
            else:  # "json": a list answer stays a list
                answer = list(answer) if isinstance(answer, tuple) else answer
            out.extend([{"from": "human", "value": asked}, {"from": "gpt", "value": answer}])
        return out


# How each subset's conversations are stored, as the dataset card's `dataset_info` gives the parquet configs:
# ECG-QA's `value` is a list of strings (the question a list of one), arena's turns are {question, answer};
# every other subset's value is a string. The JSON layout keeps list answers as lists.
PARQUET_SHAPES = {"ecgqa-test": "value_lists", "arena": "question_answer"}
JSON_SHAPES = {"arena": "question_answer"}


def item(sample_id: str, question: str, answer: Answer, image: bytes, *more: tuple[str, Answer]) -> FixtureItem:
    return FixtureItem(sample_id, ((question, answer), *more), image)


def ecg_png(seed: int = 0, width_px: int = 880, height_px: int = 680, rhythm: str = "sinus") -> bytes:
    """A rendered 12-lead print with a known rhythm, as PNG bytes."""
    from pulse_edge.runtime.ecg.render import render_ecg
    from pulse_edge.runtime.ecg.synthetic import synthesize_ecg

    buffer = io.BytesIO()
    render_ecg(synthesize_ecg(rhythm, seed=seed), width_px=width_px, height_px=height_px).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_subset(path: str | Path, items: Sequence[FixtureItem], *, image_struct: bool = True) -> Path:
    """One parquet file with the HF columns; `image_struct=False` stores raw bytes instead of {bytes, path}. The
    subset (the conversations' shape) is the folder's name for `test-*.parquet`, else the file's stem."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError("writing parquet fixtures needs pyarrow: install pulse-edge[bench]") from e
    path = Path(path)
    shape = PARQUET_SHAPES.get(path.parent.name if path.name.startswith("test") else path.stem, "text")
    turn = {"value_lists": pa.struct([("from", pa.string()), ("value", pa.list_(pa.string()))]),
            "question_answer": pa.struct([("question", pa.string()), ("answer", pa.string())]),
            "text": pa.struct([("from", pa.string()), ("value", pa.string())])}[shape]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if image_struct else pa.binary()
    schema = pa.schema([("id", pa.string()), ("image_path", pa.string()), ("image", image_type),
                        ("conversations", pa.list_(turn))])
    rows = [{"id": i.id, "image_path": f"{i.id}.png",
             "image": {"bytes": i.image, "path": f"{i.id}.png"} if image_struct else i.image,
             "conversations": i.conversations(shape=shape)} for i in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_json_subset(root: str | Path, subset: str, items: Sequence[FixtureItem]) -> Path:
    """`<root>/<subset>.json` and the images under `<root>/images/<subset>/`."""
    root = Path(root)
    records = []
    for i in items:
        relative = f"{subset}/{i.id}.png"
        image = root / "images" / relative
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(i.image)
        records.append({"id": i.id, "image": relative, "conversations": i.conversations(
            shape=JSON_SHAPES.get(subset, "json"))})
    path = root / f"{subset}.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
