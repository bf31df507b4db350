"""ECGBench items as calibration samples, from a parquet file or a data folder (either released layout).

ECGBench is a test set: calibrating on the subsets you then score leaks them; prefer ECGInstruct.

A parquet sample's image stays in its file (`ParquetImage`) until the sample is chosen: the whole release
holds about 13 GB of prints, so the pool is read without them and `fetch_images` reads the chosen ones,
one pass per file keeping only their rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, classify_task
from pulse_edge.calibration.datasets.ecgbench import readers as ecgbench_data
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS, resolve_subset
from pulse_edge.calibration.datasets.image_paths import image_under
from pulse_edge.errors import InputError

if TYPE_CHECKING:
    from PIL import Image


def load_ecgbench(path: str | Path, subset: str | None = None) -> list[CalibrationSample]:
    """Items of an ECGBench parquet or JSON file, or of every subset (or `subset`) in a data folder, with their
    images."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        # a subset named as the JSON branch and folders name it ("ptb" is ptb-test): one id space for both layouts
        name = resolve_subset(subset).name if subset else (p.parent.name if p.parent.name in SUBSETS else p.stem)
        sources = [ecgbench_data.SubsetSource(name, ecgbench_data.PARQUET, (p,))]
    elif p.is_file() and p.suffix == ".json":  # the file named, not whichever layout its folder also holds
        sources = [ecgbench_data.json_source(p, resolve_subset(subset or p.stem.replace("_", "-")).name)]
    elif p.is_dir():
        sources = _folder_sources(p, subset)
    else:
        raise InputError(f"{p}: {'not an' if p.exists() else 'no such'} ECGBench .parquet or .json file or data "
                         "folder")
    return [_ecgbench_sample(sample, source, deferred=source.layout == ecgbench_data.PARQUET) for source in sources
            for sample in ecgbench_data.iter_samples(source, with_images=source.layout == ecgbench_data.JSON)]


@dataclass(frozen=True)
class ParquetImage:
    """Where a parquet sample's image is: its subset's files and the row's id as written there."""

    source: ecgbench_data.SubsetSource
    row_id: str

    def load(self) -> Image.Image:
        return _fetch(self.source, {self.row_id})[self.row_id].load_image()


def fetch_images(samples: Sequence[CalibrationSample]) -> list[CalibrationSample]:
    """`samples` with their parquet images read (one pass over each file, only their rows kept), in order."""
    wanted: dict[ecgbench_data.SubsetSource, set[str]] = {}
    for s in samples:
        if isinstance(s.deferred, ParquetImage):
            wanted.setdefault(s.deferred.source, set()).add(s.deferred.row_id)
    fetched = {(source, row_id): sample for source, ids in wanted.items()
               for row_id, sample in _fetch(source, ids).items()}
    return [fetched[(s.deferred.source, s.deferred.row_id)] if isinstance(s.deferred, ParquetImage) else s
            for s in samples]


def _fetch(source: ecgbench_data.SubsetSource, ids: set[str]) -> dict[str, CalibrationSample]:
    found: dict[str, CalibrationSample] = {}
    for sample in ecgbench_data.iter_samples(source, with_images=True, ids=ids):
        if sample.id in found:  # two rows, one id: which image belongs to the chosen conversation is unknown
            raise InputError(f"ECGBench {source.subset}/{sample.id}: the id is repeated in {source.describe()}; "
                             "the subset file is damaged: download it again")
        found[sample.id] = _ecgbench_sample(sample, source, deferred=False)
    if missing := sorted(ids - found.keys()):  # the file changed between the two reads
        raise InputError(f"ECGBench {source.subset}/{missing[0]}: no longer in {source.describe()}; was the file "
                         "replaced while calibrating? Run again")
    return found


def _folder_sources(folder: Path, subset: str | None) -> list[ecgbench_data.SubsetSource]:
    if subset is not None:
        return [ecgbench_data.find_subset(folder, resolve_subset(subset).name)]
    found = list(ecgbench_data.discover(folder).values())
    if not found:
        raise InputError(f"{folder}: no ECGBench subsets found (expected <subset>/test-*.parquet "
                         "or <subset>.json with images/)")
    return found


def _ecgbench_sample(sample: ecgbench_data.Sample, source: ecgbench_data.SubsetSource, *,
                     deferred: bool) -> CalibrationSample:
    """`deferred`: read without its image (a parquet pool), which `ParquetImage` reads once it is chosen."""
    sample_id = f"{sample.subset}/{sample.id}"
    turns = tuple((t.question, t.answer if isinstance(t.answer, str) else ", ".join(t.answer))
                  for t in sample.turns if t.answer is not None)  # calibration feeds the reference answers
    base = CalibrationSample(id=sample_id, source="ecgbench", task=classify_task(turns[0][0]), turns=turns,
                             origin=sample.subset,
                             deferred=ParquetImage(source, sample.id))
    if deferred:
        return base
    file = sample.image_file
    if sample.image_bytes is None and (file is None or image_under(file.parent, file.name, sample_id) is None):
        raise InputError(f"ECGBench {sample_id}: image {sample.image_name!r} not found; "
                         + ecgbench_data.missing_image_fix(sample))
    return dataclasses.replace(base, deferred=None, image_bytes=sample.image_bytes,
                               image_path=sample.image_file if sample.image_bytes is None else None)
