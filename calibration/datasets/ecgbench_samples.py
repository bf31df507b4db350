"""ECGBench items as calibration samples, from a parquet file or a data folder (either released layout).

ECGBench is a test set: calibrating on the subsets you then score leaks them; prefer ECGInstruct.
"""

from __future__ import annotations

from pathlib import Path

from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, classify_task
from pulse_edge.calibration.datasets.ecgbench import readers as ecgbench_data
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS, resolve_subset
from pulse_edge.calibration.datasets.image_paths import image_under
from pulse_edge.errors import InputError


def load_ecgbench(path: str | Path, subset: str | None = None) -> list[CalibrationSample]:
    """Items of an ECGBench parquet or JSON file, or of every subset (or `subset`) in a data folder, with their
    images."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        name = subset or (p.parent.name if p.parent.name in SUBSETS else p.stem)
        sources = [ecgbench_data.SubsetSource(name, ecgbench_data.PARQUET, (p,))]
    elif p.is_file() and p.suffix == ".json":  # the file named, not whichever layout its folder also holds
        sources = [ecgbench_data.json_source(p, resolve_subset(subset or p.stem.replace("_", "-")).name)]
    elif p.is_dir():
        sources = _folder_sources(p, subset)
    else:
        raise InputError(f"{p}: {'not an' if p.exists() else 'no such'} ECGBench .parquet or .json file or data "
                         "folder")
    return [_ecgbench_sample(sample) for source in sources
            for sample in ecgbench_data.iter_samples(source, with_images=True)]


def _folder_sources(folder: Path, subset: str | None) -> list[ecgbench_data.SubsetSource]:
    if subset is not None:
        return [ecgbench_data.find_subset(folder, resolve_subset(subset).name)]
    found = list(ecgbench_data.discover(folder).values())
    if not found:
        raise InputError(f"{folder}: no ECGBench subsets found (expected <subset>/test-*.parquet "
                         "or <subset>.json with images/)")
    return found


def _ecgbench_sample(sample: ecgbench_data.Sample) -> CalibrationSample:
    sample_id = f"{sample.subset}/{sample.id}"
    file = sample.image_file
    if sample.image_bytes is None and (file is None or image_under(file.parent, file.name, sample_id) is None):
        raise InputError(f"ECGBench {sample_id}: image {sample.image_name!r} not found; unpack the image "
                         "archives into images/ beside the JSON file")
    turns = tuple((t.question, t.answer if isinstance(t.answer, str) else ", ".join(t.answer))
                  for t in sample.turns)
    return CalibrationSample(id=sample_id, source="ecgbench", task=classify_task(turns[0][0]), turns=turns,
                             image_path=sample.image_file if sample.image_bytes is None else None,
                             image_bytes=sample.image_bytes)
