"""`pulse-edge infer FOLDER --output FILE.jsonl` end to end on a tiny bundle: 50 mixed files, 3 of them broken.

Every input gets one line, the broken ones their error; the run completes (exit 0) and a rerun answers nothing
again. runtime/batch.py's own tests (tests/runtime/test_batch.py) cover torn lines and --fail-fast with a
stand-in model; this one runs the real command, bundle and readers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from pulse_testing.ecg_files import beats
from pulse_testing.pages import page

from pulse_edge.cli.main import main

GOOD = 47
BROKEN = ("notes.txt", "cut.png", "short.npy")


def _mixed_folder(root: Path) -> Path:
    """47 readable inputs (PNG, JPEG, NPY recordings, in nested folders) and 3 broken ones."""
    rng = np.random.default_rng(0)
    for i in range(GOOD):
        folder = root / f"ward{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 3
        if kind == 2:
            np.save(folder / f"exam{i:02d}.npy", beats(5000, 500.0, seed=i))
            continue
        pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"exam{i:02d}.{'png' if kind == 0 else 'jpg'}")
    (root / "notes.txt").write_text("not an ECG")
    (root / "cut.png").write_bytes((root / "ward0" / "exam00.png").read_bytes()[:80])
    np.save(root / "short.npy", beats(500, 500.0))  # 1 s of signal: under the 2.5 s a print needs
    return root


def _infer(folder: Path, out: Path, bundle: Path):
    return CliRunner().invoke(main, ["-q", "infer", str(folder), "--model", str(bundle), "--output", str(out),
                                     "--fs", "500", "--max-new-tokens", "1"])


def test_a_folder_of_50_with_3_broken_completes_and_a_rerun_skips_the_47(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = _mixed_folder(tmp_path / "ecgs")
    out = folder / "answers.jsonl"  # inside the folder it reads: never one of its inputs
    first = _infer(folder, out, tiny_bundle)
    assert first.exit_code == 2, first.output  # the batch ran through, and a script is told not all answered
    assert first.stderr.splitlines()[-1].startswith(f"pulse-edge: {GOOD} answered, {len(BROKEN)} failed, 0 already")
    said = [line for line in first.stderr.splitlines() if line.startswith("pulse-edge: failed: ")]
    assert sorted(name for name in BROKEN for line in said if name in line) == sorted(BROKEN)  # as they fail
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == GOOD + len(BROKEN)
    failed = {Path(line["source"]).name: line["error"] for line in lines if "error" in line}
    assert set(failed) == set(BROKEN)
    assert all("\n" not in message for message in failed.values())
    answered = [line for line in lines if "error" not in line]
    assert {line["input_kind"] for line in answered} == {"image", "npy"}
    assert all(line["generated_tokens"] == 1 for line in answered)

    with out.open("a") as torn:  # a crash mid-line: the rerun says so and redoes it
        torn.write('{"source": "cut sho')
    again = _infer(folder, out, tiny_bundle)
    assert again.exit_code == 2, again.output
    assert "its last line was cut short (a crash?); it is redone" in again.stderr
    rerun = [json.loads(line) for line in out.read_text().splitlines()][len(lines):]
    assert sorted(Path(line["source"]).name for line in rerun) == sorted(BROKEN)  # only the failures are retried
    assert all("error" in line for line in rerun)
    for name in BROKEN:
        (folder / name).unlink()
    assert _infer(folder, out, tiny_bundle).exit_code == 0  # every input answered: 0


def test_a_batch_records_the_bundle_by_its_manifest_so_a_re_export_in_place_is_refused(tiny_bundle: Path,
                                                                                       tmp_path: Path) -> None:
    """A bundle moved or copied answers as the same model; one re-exported at the same path (another manifest)
    does not: its answers would sit beside the first bundle's in one file."""
    import hashlib
    import shutil

    folder, out = tmp_path / "ecgs", tmp_path / "answers.jsonl"
    folder.mkdir()
    page((300, 200)).save(folder / "a.png")
    bundle = tmp_path / "pulse"
    shutil.copytree(tiny_bundle, bundle)
    assert _infer(folder, out, bundle).exit_code == 0
    manifest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert json.loads(out.read_text())["settings"]["model"] == f"bundle sha256:{manifest} on onnxruntime cpu"
    moved = tmp_path / "moved"
    bundle.rename(moved)
    page((300, 200)).save(folder / "b.png")
    assert _infer(folder, out, moved).exit_code == 0  # the same bundle elsewhere: resumes
    manifest_file = moved / "manifest.json"
    manifest_file.write_text(manifest_file.read_text() + "\n")  # other bytes, as a re-export's manifest has
    page((300, 200)).save(folder / "c.png")
    refused = _infer(folder, out, moved)
    assert refused.exit_code == 2 and "holds answers asked with another model ('bundle sha256:" in refused.output


def test_a_checkpoint_is_recorded_with_its_files_and_torchs_dtype(tmp_path: Path) -> None:
    """By path alone, fp32 and bf16 answers, or a checkpoint made again in place, went into one file unmarked."""
    from pulse_edge.backends import model_identity

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    first = model_identity(checkpoint, "torch", dtype="fp32")
    assert first == model_identity(checkpoint, "torch", dtype="fp32")
    assert first != model_identity(checkpoint, "torch", dtype="bf16")
    (checkpoint / "config.json").write_text('{"seed": 7}')  # made again: another size and time
    assert first != model_identity(checkpoint, "torch", dtype="fp32")


def test_a_bundle_is_recorded_with_what_runs_it(tiny_bundle: Path) -> None:
    from pulse_edge.backends import model_identity

    on_cpu = model_identity(tiny_bundle, "ort")
    assert on_cpu.endswith("on onnxruntime cpu") and on_cpu != model_identity(tiny_bundle, "ort", provider="cuda")
