"""Find and read ECGBench subsets in either released layout.

Parquet (the Hugging Face release, one config per subset, split `test`): rows
`id`, `image_path`, `image` (an HF image struct `{"bytes", "path"}` or raw
bytes) and `conversations`, whose shape the subset's config says (the
dataset card's `dataset_info`): `[{from, value}, ...]`, question then answer,
with `value` a string, or for ECG-QA a list of strings (the question a list of
one, the answer the options that are right); arena's `[{question, answer}, ...]`,
a dict a turn.
In a dataset snapshot they sit at `<subset>/test-*.parquet`; `data/<subset>/`
and a flat `<subset>.parquet` are accepted too.

JSON (the earlier release and the PULSE repository's `data/` folder): a list
of `{id, image, conversations}` in `<subset>.json` (or `.jsonl`), images in an
`images/` folder beside it, `image` being a path relative to that folder; the
repository's PTB-XL report file says `conversation`, `from` user / assistant.

Parquet is read a batch at a time with only the needed columns, so scoring
never touches the image bytes of a 3 GB file, and inference holds one batch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS
from pulse_edge.calibration.datasets.image_paths import image_under
from pulse_edge.calibration.datasets.json_text import parse_json, read_utf8
from pulse_edge.errors import ConfigError, InputError
from pulse_edge.jsonl import parse_json_line

if TYPE_CHECKING:
    from PIL import Image

PARQUET, JSON = "parquet", "json"
IMAGE_MARKER = "<image>"
_BATCH_ROWS = 16  # images of a batch are held at once: ~16 x 1.5 MB for PTB-XL prints

# Where a subset may sit under the data folder, first match wins; {s} is the subset name,
# {u} the same with underscores (ptb_test.jsonl), as some copies of the data name them.
_PARQUET_PATTERNS = ("{s}/test-*.parquet", "{s}/test/*.parquet", "{s}/*.parquet", "data/{s}/test-*.parquet",
                     "data/{s}/*.parquet", "{s}.parquet", "data/{s}.parquet")
_JSON_PATTERNS = ("{s}.json", "{s}.jsonl", "{u}.json", "{u}.jsonl", "data/{s}.json", "data/{s}.jsonl",
                  "{s}/{s}.json", "{s}/{s}.jsonl", "{s}/{u}.json", "{s}/{u}.jsonl")


@dataclass(frozen=True)
class Turn:
    """One question and its reference answer (ECG-QA answers may be several options). Only an item's last
    question may lack one (None): arena asks it after the model's own answers, and only the first is scored."""

    question: str
    answer: str | tuple[str, ...] | None


@dataclass(frozen=True)
class Sample:
    """One benchmark item; the image is decoded only when asked for."""

    id: str
    subset: str
    turns: tuple[Turn, ...]
    image_bytes: bytes | None = None
    image_file: Path | None = None
    image_name: str = ""
    layout: str = JSON  # PARQUET or JSON: where a missing image should have come from

    @property
    def question(self) -> str:
        return self.turns[0].question

    @property
    def answer(self) -> str | tuple[str, ...]:
        return cast("str | tuple[str, ...]", self.turns[0].answer)  # _turns answers every first question

    def load_image(self) -> Image.Image:
        """The image, or the standard print of a recording (DICOM, WFDB .hea, HL7 aECG), as `infer` reads it."""
        from pulse_edge.runtime.inputs import load_input

        if self.image_bytes is not None:
            return load_input(self.image_bytes, name=f"{self.subset}/{self.id} ({self.image_name})").image
        if self.image_file is None or not self.image_file.is_file():
            raise InputError(f"{self.subset}/{self.id}: image {self.image_name!r} not found under the data folder; "
                             + missing_image_fix(self))
        return load_input(self.image_file).image


def missing_image_fix(sample: Sample) -> str:
    """What to do about an image a sample cannot find: a parquet row without one (no bytes, no path beside the
    file) is a damaged download; a JSON layout's images come in archives of their own."""
    if sample.layout == PARQUET:
        return ("its row holds no image" if sample.image_file is None else "the image file its row names is "
                "missing") + ": download the subset's parquet files (and any image files beside them) again"
    return "unpack the image archives into images/ beside the JSON file"


@dataclass(frozen=True)
class SubsetSource:
    """Where one subset's records live."""

    subset: str
    layout: str  # PARQUET | JSON
    files: tuple[Path, ...]
    image_roots: tuple[Path, ...] = ()

    def describe(self) -> str:
        return f"{self.subset}: {self.layout} ({', '.join(str(f) for f in self.files)})"


def question_text(value: str) -> str:
    """The question without LLaVA's `<image>` marker (the pipeline puts the image in itself); nothing else
    is touched, so that the model reads the very text the paper's evaluation gave it."""
    return value.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "").replace(IMAGE_MARKER, "")


def discover(data_dir: str | Path) -> dict[str, SubsetSource]:
    """Every subset present under `data_dir`, in the paper's order; parquet wins over JSON."""
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"{root}: the ECGBench data folder does not exist or is not a folder")
    found: dict[str, SubsetSource] = {}
    for name in SUBSETS:
        source = _find_parquet(root, name) or _find_json(root, name)
        if source is not None:
            found[name] = source
    return found


def find_subset(data_dir: str | Path, subset: str) -> SubsetSource:
    """The source of one subset, or an error that says what the folder holds instead."""
    found = discover(data_dir)
    if subset in found:
        return found[subset]
    present = ", ".join(found) or "none"
    hint = ""
    if (Path(data_dir) / "snapshots").is_dir():
        hint = f"; this looks like a Hugging Face cache entry: pass {Path(data_dir) / 'snapshots'}/<revision>"
    raise InputError(f"{data_dir}: subset {subset!r} not found (expected {subset}/test-*.parquet or {subset}.json "
                     f"with images/); subsets present: {present}{hint}")


def count_samples(source: SubsetSource) -> int:
    if source.layout == PARQUET:
        pq = _pyarrow_parquet()
        total = 0
        for f in source.files:
            with _parquet_errors(f):
                total += pq.ParquetFile(f).metadata.num_rows
        return total
    return sum(len(_json_records(f)) for f in source.files)


def iter_samples(source: SubsetSource, *, with_images: bool = False,
                 ids: Collection[str] | None = None) -> Iterator[Sample]:
    """Samples in file order; `ids` restricts to those ids (their images only are read)."""
    reader = _iter_parquet if source.layout == PARQUET else _iter_json
    yield from reader(source, with_images, None if ids is None else frozenset(ids))


def load_samples(source: SubsetSource, *, limit: int | None = None) -> list[Sample]:
    """The first `limit` samples (all by default), without image bytes: enough to score."""
    samples: list[Sample] = []
    for sample in iter_samples(source):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(sample)
    return samples


def _find_parquet(root: Path, name: str) -> SubsetSource | None:
    for pattern in _PARQUET_PATTERNS:
        files = sorted(root.glob(pattern.format(s=name)))
        if files:
            return SubsetSource(name, PARQUET, tuple(files))
    return None


def _find_json(root: Path, name: str) -> SubsetSource | None:
    for pattern in _JSON_PATTERNS:
        path = root / pattern.format(s=name, u=name.replace("-", "_"))
        if path.is_file():
            return json_source(path, name, root)
    return None


def json_source(path: Path, name: str, root: Path | None = None) -> SubsetSource:
    """A subset's JSON file as a source: its images under images/ beside it (or the data folder's, `root`)."""
    root = path.parent if root is None else root
    roots = (path.parent / "images", path.parent, root / "images", root / "ECGBench" / "images", root)
    return SubsetSource(name, JSON, (path,), tuple(dict.fromkeys(roots)))


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError("reading ECGBench parquet files needs pyarrow: install pulse-edge[bench]") from e
    return pq


def _iter_parquet(source: SubsetSource, with_images: bool, ids: frozenset[str] | None) -> Iterator[Sample]:
    pq = _pyarrow_parquet()
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = None if ids is None else pa.array(sorted(ids), pa.string())
    for path in source.files:
        with _parquet_errors(path):
            parquet = pq.ParquetFile(path)
            names = set(parquet.schema_arrow.names)
        talk = _conversation_key(names)
        if "id" not in names or talk is None or (with_images and "image" not in names):
            raise InputError(f"{path}: not an ECGBench parquet file (columns {sorted(names)}; "
                             "needs id, conversations and image)")
        id_type = parquet.schema_arrow.field("id").type
        if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type) or pa.types.is_integer(id_type)):
            # str() of a float, bool or bytes id differs from arrow's cast that selects rows by id: its samples
            # would be listed, never read, and every rerun would have them "to answer"
            raise InputError(f"{path}: the id column holds {id_type}, not strings or integers; not an ECGBench file")
        columns = ["id", talk] + [c for c in ("image_path", "image") if c in names and with_images]
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        while True:
            with _parquet_errors(path):  # a damaged page surfaces when its batch is read
                batch = next(batches, None)
                if batch is None:
                    break
                if wanted is not None:
                    batch = batch.filter(pc.is_in(pc.cast(batch.column("id"), pa.string()), value_set=wanted))
                rows = batch.to_pylist()
            for row in rows:
                yield _parquet_sample(row, talk, source.subset, path)


@contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    """pyarrow's errors on a damaged or truncated file (ArrowInvalid, OSError) as one line."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path} is not a readable parquet file ({reason}); download it again") from e


def _parquet_sample(row: Mapping[str, Any], talk: str, subset: str, path: Path) -> Sample:
    if row["id"] is None:
        raise InputError(f"{path}: a row has no id (null); the subset file is damaged: download it again")
    sample_id = str(row["id"])
    turns = _turns(row[talk], f"{path}: {sample_id}")
    image = row.get("image")
    name = str(row.get("image_path") or "")
    if isinstance(image, Mapping):  # the HF image feature: {"bytes": ..., "path": ...}
        name = name or str(image.get("path") or "")
        data = image.get("bytes")
        if data is None and image.get("path"):  # an image stored by reference, beside the parquet file
            # Hugging Face's own form for images kept outside the file: a path beside it, or an absolute one
            return Sample(sample_id, subset, turns, image_file=path.parent / str(image["path"]), image_name=name,
                          layout=PARQUET)
        image = data
    return Sample(sample_id, subset, turns, image_bytes=image if isinstance(image, bytes) else None, image_name=name,
                  layout=PARQUET)


def _iter_json(source: SubsetSource, with_images: bool, ids: frozenset[str] | None) -> Iterator[Sample]:
    for path in source.files:
        for i, record in enumerate(_json_records(path)):
            talk = _conversation_key(record) if isinstance(record, Mapping) else None
            if talk is None or "id" not in record:
                raise InputError(f"{path}: record {i} is not an ECGBench item ({{id, image, conversations}})")
            sample_id = str(record["id"])
            if ids is not None and sample_id not in ids:
                continue
            turns = _turns(record[talk], f"{path}: {sample_id}")
            name = record.get("image", record.get("image_path", ""))
            name = str(name[0] if isinstance(name, list) and name else name or "")
            image_file = _resolve_image(source.image_roots, name, f"{path}: {sample_id}") if with_images else None
            yield Sample(sample_id, source.subset, turns, image_file=image_file, image_name=name)


def _json_records(path: Path) -> list[Any]:
    text = read_utf8(path)
    if path.suffix == ".jsonl":
        return [parse_json_line(line, path, number) for number, line in enumerate(text.splitlines(), start=1)
                if line.strip()]
    data = parse_json(text, path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{id, image, conversations}} items")
    return data


def _resolve_image(roots: tuple[Path, ...], name: str, where: str = "") -> Path | None:
    if not name:
        return None
    for root in roots:
        if (found := image_under(root, name, where or name)) is not None:
            return found
    return None


def _turns(conversations: Any, where: str) -> tuple[Turn, ...]:
    """Each question with its reference answer, from any of the released shapes (the module doc)."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: conversations must hold a question and an answer")
    if all(isinstance(c, Mapping) and "question" in c for c in conversations):
        pairs = [(c.get("question"), c.get("answer", None)) for c in conversations]  # arena: a turn a dict
    else:
        pairs = _alternating(conversations, where)
    turns = []
    for k, (asked, value) in enumerate(pairs):
        if asked is None or (value is None and k + 1 < len(pairs)):  # "" would be scored: empty matching empty
            raise InputError(f"{where}: a conversation turn has no {'question' if asked is None else 'answer'} "
                             "(null); the subset file is damaged: download it again")
        # ECG-QA's parquet stores every value as a list of strings (Arrow's one type for the question's text and
        # the answer's options): the question is its one string; str() of the list put brackets, quotes and
        # escaped line breaks before the model and into the options the scorer parses from it
        question = asked[0] if isinstance(asked, list) and len(asked) == 1 else asked
        if not isinstance(question, str):
            raise InputError(f"{where}: a question is a {type(asked).__name__} ({str(asked)[:60]}), not text; "
                             "not an ECGBench item")
        _check_answer(value, where)
        gold = None if value is None else tuple(str(v) for v in value) if isinstance(value, list) else str(value)
        turns.append(Turn(question_text(question), gold))
    return tuple(turns)


def _check_answer(value: Any, where: str) -> None:
    """An answer is text (a number as written), or a list of them (ECG-QA's options): a dict's str() was scored as
    text, its keys' and values' words matched by substring."""
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise InputError(f"{where}: an answer is a {type(item).__name__} ({str(item)[:60]}), not text; not an "
                             "ECGBench item")


def _alternating(conversations: list[Any], where: str) -> list[tuple[Any, Any]]:
    """(question, answer) of [{from: human|user, value}, {from: gpt|assistant, value}, ...]; a last question with
    no answer gets None: arena asks later turns after the model's own answers, and only the first is scored (a
    refusal here lost the whole subset over one such item)."""
    if len(conversations) < 2:
        raise InputError(f"{where}: conversations must hold a question and an answer")
    entries = [*conversations, None] if len(conversations) % 2 else conversations
    pairs = []
    for question, answer in zip(entries[0::2], entries[1::2], strict=True):
        if not (isinstance(question, Mapping) and (answer is None or isinstance(answer, Mapping))):
            raise InputError(f"{where}: each conversation entry must be {{from, value}} or {{question, answer}}")
        if question.get("from") not in _ASKERS or (answer is not None and answer.get("from") not in _ANSWERERS):
            raise InputError(f"{where}: conversations must alternate human / gpt, starting with human")
        if answer is not None and answer.get("value") is None:
            raise InputError(f"{where}: a conversation turn has no answer (null); the subset file is damaged: "
                             "download it again")
        pairs.append((question.get("value"), None if answer is None else answer.get("value")))
    return pairs


_ASKERS, _ANSWERERS = ("human", "user"), ("gpt", "assistant")
# the PULSE repository's report file (evaluation/ptb_report_generation_test.json) says "conversation"
_CONVERSATION_KEYS = ("conversations", "conversation")


def _conversation_key(keys: Collection[str]) -> str | None:
    """Which of a record's keys (a parquet file's columns) holds the conversation; None: neither."""
    return next((key for key in _CONVERSATION_KEYS if key in keys), None)
