"""Staged outputs under signals and concurrency: SIGTERM, stale temporaries, two writers, torch.onnx's
wrapped interruptions; and what long commands show on stderr (stages, -q, -v, a pipe)."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pulse_edge.cli.main import main

# pulse_edge.staging's lock and pulse_edge.cli.progress are imported inside the tests that use them, so that the
# CLI cases also run against a pulse-edge without them (where they fail: that is what they were written to show).


@pytest.fixture(autouse=True)
def signals_as_a_terminal_delivers_them() -> Iterator[None]:
    """These tests send real signals: run them with the handlers an interactive shell gives, whatever this pytest
    inherited (under nohup SIGHUP is ignored, and a background job of a script ignores SIGINT: ignored signals stay
    ignored, by design, and these tests would then test nothing)."""
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    before = {s: signal.signal(s, handler) for s, handler in wanted.items()}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _sigterm(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process
    time.sleep(5)  # the handler interrupts the sleep
    raise AssertionError("SIGTERM did not interrupt the work")


def test_sigterm_during_make_tiny_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.fixtures.tiny as tiny

    monkeypatch.setattr(tiny, "write_shards", _sigterm)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert result.stderr.strip() == "pulse-edge: stopped by SIGTERM"
    assert _leftovers(tmp_path) == []  # no .ckpt.*.partial, no .ckpt.lock
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the work


def test_sigterm_during_export_cleans_up(tiny_checkpoint: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.build.bundle as bundle

    monkeypatch.setattr(bundle, "build_decoder", _sigterm)
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b")])
    assert result.exit_code == 143, result.output
    assert _leftovers(tmp_path) == []


def test_sigterm_during_a_batch_or_a_calibration_is_one_line_and_leaves_no_lock(
        tiny_bundle: Path, tiny_checkpoint: Path, ecg_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`infer --output`, `eval ecgbench` and `calibrate` died of SIGTERM with no line (exit -15) where export said
    "stopped by SIGTERM" (a concurrency review); the rerun resumes from what was written."""
    import pulse_edge.calibration.calibrate as calibration
    import pulse_edge.runtime.batch as batch

    def unhandled(signum: int, frame: object) -> None:  # what the default would do: end the process (pytest too)
        raise AssertionError("SIGTERM reached the process's own handler: the command did not handle it")

    monkeypatch.setattr(batch, "interpret", _sigterm)
    monkeypatch.setattr(calibration, "calibrate", _sigterm)
    out = tmp_path / "answers.jsonl"
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = CliRunner().invoke(main, ["infer", str(ecg_png), str(ecg_png), "--model", str(tiny_bundle),
                                           "--output", str(out), "--max-new-tokens", "2"])
        assert (result.exit_code, result.stderr.strip()) == (143, "pulse-edge: stopped by SIGTERM"), result.output
        assert _leftovers(tmp_path) == (["answers.jsonl"] if out.exists() else [])  # no lock, no partial line
        assert not out.exists() or out.read_text() == "" or out.read_text().endswith("\n")
        result = CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--samples", "2",
                                           "-o", str(tmp_path / "cal" / "s.npz")])
        assert (result.exit_code, result.stderr.strip()) == (143, "pulse-edge: stopped by SIGTERM"), result.output
        assert _leftovers(tmp_path / "cal") == []
        assert signal.getsignal(signal.SIGTERM) is unhandled  # handlers restored after the work
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_interruption_wrapped_by_torch_onnx_is_reported_as_one(tiny_checkpoint: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx catches what happens inside it and raises its ConversionError ("please report a bug")."""
    import torch
    from torch.onnx._internal.exporter._errors import ConversionError

    def exporter(*args: object, **kwargs: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            time.sleep(5)
        except KeyboardInterrupt as e:
            raise ConversionError("Failed to convert the exported program to an ONNX model. This is step 3/3 ... "
                                  "please create an issue in the PyTorch GitHub repository") from RuntimeError(e)

    monkeypatch.setattr(torch.onnx, "export", exporter)
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b")])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "pulse-edge: interrupted"
    assert _leftovers(tmp_path) == []


def test_an_exporter_error_without_a_signal_stays_a_bug(tiny_checkpoint: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torch.onnx._internal.exporter._errors import ConversionError

    def exporter(*args: object, **kwargs: object) -> None:
        raise ConversionError("a real exporter failure")

    monkeypatch.setattr(torch.onnx, "export", exporter)
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b")])
    assert isinstance(result.exception, ConversionError)  # a traceback: pulse-edge's bug to fix, not the user's
    assert _leftovers(tmp_path) == []


def test_stale_temporaries_of_the_target_are_removed(tmp_path: Path) -> None:
    stale = [tmp_path / ".ckpt.abc123_x.partial", tmp_path / ".ckpt.zz9y8x7w.partial"]  # mkdtemp's 8 characters
    for folder in stale:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights.bin").write_bytes(b"\0" * 1024)
    other = tmp_path / ".other.abcdefgh.partial"  # another target's: not ours to judge
    other.mkdir()
    # the live work of an export to ckpt.int8 (another name, another lock): `.ckpt.*.partial` matches it too
    longer = tmp_path / ".ckpt.int8.k2j4h6g8.partial"
    longer.mkdir()
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert _leftovers(tmp_path) == [".ckpt.int8.k2j4h6g8.partial", ".other.abcdefgh.partial", "ckpt"]


def test_files_a_killed_run_staged_are_removed_by_the_next_sole_writer(tmp_path: Path) -> None:
    """staged_file's `.STEM.XXXXXXXX.partial.SUFFIX` outlived a SIGKILL (a 5 MB scales file, hidden, for good):
    the next writer of the target, holding its lock, removes them, and only those: a folder's other files may be
    another command's live work (a calibrate writing into an eval's --out) or the user's."""
    from pulse_edge.staging import sole_writer

    scales = tmp_path / "scales.npz"
    killed = [tmp_path / ".scales.k8jr_e6y.partial.npz", tmp_path / ".scales.abcdefgh.partial.npz"]
    kept = [tmp_path / ".scales.int8.k8jr_e6y.partial.npz", tmp_path / ".scales.k8jr_e6y.partial.json",
            tmp_path / ".other.abcdefgh.partial.npz"]
    for path in (*killed, *kept):
        path.write_bytes(b"\0" * 64)
    with sole_writer(scales, what="scales file"):
        assert not any(p.exists() for p in killed) and all(p.exists() for p in kept)
    answers = tmp_path / "answers"
    answers.mkdir()
    left = [answers / ".scores.abcdefgh.partial.json", answers / ".run.k8jr_e6y.partial.json"]
    others = [answers / ".scales.abcdefgh.partial.npz", answers / ".draft.20240101.partial.md"]  # not this run's
    for path in (*left, *others):
        path.write_text("{")
    staged = (answers / "scores.json", answers / "run.json")  # the files a run stages there, under this lock
    with sole_writer(answers, what="--out directory", staged=staged):
        assert sorted(p.name for p in answers.iterdir()) == sorted(p.name for p in others)
    theirs = tmp_path / ".scales.zz9y8x7w.partial.npz"  # another user's in a sticky folder: left, no traceback
    theirs.write_bytes(b"")
    real = Path.unlink
    refuse = lambda self, missing_ok=False: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")) \
        if self == theirs else real(self, missing_ok)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "unlink", refuse)
        with sole_writer(scales, what="scales file"):
            assert theirs.exists()


def test_sighup_during_make_tiny_cleans_up_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cart's session closing (its terminal hung up) is a SIGHUP: handled like SIGTERM, exit 129."""
    import pulse_edge.export.fixtures.tiny as tiny

    def hang_up(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
        raise AssertionError("SIGHUP did not interrupt the work")

    monkeypatch.setattr(tiny, "write_shards", hang_up)
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert result.exit_code == 128 + signal.SIGHUP, result.output
    assert _leftovers(tmp_path) == []


def test_a_hang_up_the_process_ignores_stays_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nohup pulse-edge export ...`: the hang-up of the closing terminal was turned back into an interruption, and
    the run nohup was to protect stopped (a review of this session's signal handling)."""
    import pulse_edge.export.fixtures.tiny as tiny

    written = tiny.write_shards

    def hang_up(*args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signal.SIGHUP)
        return written(*args, **kwargs)

    monkeypatch.setattr(tiny, "write_shards", hang_up)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_an_output_directory_that_is_a_symbolic_link_is_refused_before_any_work(tmp_path: Path) -> None:
    """The finished work is renamed onto the path: onto a link that failed with a traceback, after the export."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "link")])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"pulse-edge: error: {tmp_path / 'link'} is a symbolic link; give the checkpoint directory's real path")
    assert _leftovers(real) == [] and _leftovers(tmp_path) == ["link", "real"]


def test_two_spellings_of_one_output_share_its_lock(tmp_path: Path) -> None:
    """By the name as spelled, `infer --output answers.jsonl` and `--output link.jsonl` both appended to one file."""
    from pulse_edge.errors import ConfigError
    from pulse_edge.staging import target_lock

    (tmp_path / "answers.jsonl").touch()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "answers.jsonl")
    with target_lock(tmp_path / "answers.jsonl", what="output file"), \
            pytest.raises(ConfigError, match="another pulse-edge command is writing"), \
            target_lock(tmp_path / "link.jsonl", what="output file"):
        pass


def test_a_short_write_with_no_errno_on_a_full_disk_is_the_disk_full_line(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """numpy's tofile raises OSError("64000 requested and 61408 written") with no errno: a traceback before."""
    import shutil

    import pulse_edge.export.fixtures.tiny as tiny

    def short_write(*args: object, **kwargs: object) -> None:
        raise OSError("64000 requested and 61408 written")

    monkeypatch.setattr(tiny, "write_shards", short_write)
    usage = shutil.disk_usage(tmp_path)
    asked: list[object] = []

    def filling(path: object) -> object:  # room enough for make-tiny's check before it writes, full while it writes
        asked.append(path)
        return usage if len(asked) == 1 else usage._replace(free=4096)

    monkeypatch.setattr(shutil, "disk_usage", filling)
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith("pulse-edge: error:") and "the disk is full" in result.stderr
    assert _leftovers(tmp_path) == []


def test_a_full_disk_while_a_staged_file_is_written_names_the_target_and_keeps_the_old_one(tmp_path: Path) -> None:
    """A write into an open file carries no file name: `eval`'s scores.json, a scales file... were "the disk is full"
    with no place named (a staged folder named its target); the hidden temporary's name is no better. The target
    keeps its last whole state."""
    import errno

    from pulse_edge.staging import staged_file

    out = tmp_path / "scores.json"
    out.write_text('{"old": 1}')
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  OSError(errno.ENOSPC, "No space left on device", "hidden")):
        with pytest.raises(OSError) as raised, staged_file(out) as work:
            work.write_text('{"new": ')
            raise OSError(error.errno, error.strerror, str(work)) if error.filename else error
        assert raised.value.filename == str(out) and raised.value.errno == errno.ENOSPC
    assert out.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_a_second_writer_of_one_target_is_refused_at_once(tmp_path: Path) -> None:
    from pulse_edge.staging import staged_directory, stale_partials

    target = tmp_path / "ckpt"
    with staged_directory(target, what="checkpoint") as live:  # a live export of the same target
        (live / "half-written.bin").write_bytes(b"\0" * 1024)
        started = time.monotonic()
        result = CliRunner().invoke(main, ["make-tiny", str(target)])
        assert time.monotonic() - started < 10  # refused before any work
        assert result.exit_code == 2
        assert result.stderr.strip() == (f"pulse-edge: error: another pulse-edge command is writing {target} (it "
                                         f"holds {tmp_path / '.ckpt.lock'}); wait for it to finish or choose another "
                                         "checkpoint directory")
        assert stale_partials(target) == [live] and (live / "half-written.bin").is_file()  # never removed
    assert _leftovers(tmp_path) == ["ckpt"]


def test_a_target_another_writer_finished_before_the_lock_was_taken_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before the lock (to refuse early) and again under it: the other writer may have renamed its work
    into place between the two, and a second rename would replace what it wrote."""
    from contextlib import contextmanager

    from pulse_edge import staging
    from pulse_edge.errors import ConfigError

    target, real_lock = tmp_path / "bundle", staging.target_lock

    @contextmanager
    def lock_after_the_other_finished(out: Path, **kwargs: Any):
        target.mkdir()
        (target / "manifest.json").write_text("theirs")
        with real_lock(out, **kwargs):
            yield

    monkeypatch.setattr(staging, "target_lock", lock_after_the_other_finished)
    with pytest.raises(ConfigError, match="exists and is not empty"), staging.staged_directory(target, what="bundle"):
        pytest.fail("no work may start")
    assert (target / "manifest.json").read_text() == "theirs" and staging.stale_partials(target) == []


def test_the_lock_is_held_across_processes_and_released_when_its_holder_dies(tmp_path: Path) -> None:
    from pulse_edge.staging import target_lock

    target = tmp_path / "bundle"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from pulse_edge.staging import target_lock\n"
         f"with target_lock(Path({str(target)!r}), what='bundle'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match="another pulse-edge command is writing"), \
                target_lock(target, what="bundle"):
            pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the flock
        holder.wait()
    with target_lock(target, what="bundle") as lock:  # the dead holder's lock file is taken over
        assert lock.exists()
    assert not lock.exists()


# --- what long commands show on stderr --------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _console(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO, **flags: bool) -> Any:
    from pulse_edge.cli import progress

    console = progress.configure(verbose=flags.get("verbose", False), quiet=flags.get("quiet", False))
    monkeypatch.setattr(console, "_stream", stream)
    return console


def _job() -> None:
    from pulse_edge.cli import progress

    log = logging.getLogger("pulse_edge.export.build.bundle")
    with progress.stage_progress("export fp32"):
        log.info("building the decoder graph (fp32, 2 layers)")
        log.warning("the weights exceed the free memory")


def test_a_terminal_sees_the_current_stage_and_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Terminal()
    _console(monkeypatch, stream)
    _job()
    shown = stream.getvalue()
    assert "pulse-edge: building the decoder graph (fp32, 2 layers)" in shown and "\r" in shown
    assert "pulse-edge: the weights exceed the free memory\n" in shown


@pytest.mark.parametrize(("stream", "flags", "expected"), [
    (_Terminal(), {"quiet": True}, "pulse-edge: the weights exceed the free memory\n"),
    (io.StringIO(), {}, "pulse-edge: the weights exceed the free memory\n"),  # a pipe: no bar
    (io.StringIO(), {"verbose": True}, "pulse-edge: building the decoder graph (fp32, 2 layers)\n"
                                       "pulse-edge: the weights exceed the free memory\n"),
])
def test_quiet_pipes_and_verbose_get_plain_lines(stream: io.StringIO, flags: dict[str, bool], expected: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _console(monkeypatch, stream, **flags)
    _job()
    assert stream.getvalue() == expected


def test_verbose_and_quiet_together_are_refused() -> None:
    result = CliRunner().invoke(main, ["-v", "-q", "verify", "x"])
    assert result.exit_code == 2 and "-v and -q contradict each other" in result.output


def test_the_torch_reference_raises_no_future_warning(tiny_pipeline: Any, ecg_png: Path) -> None:
    """transformers 5 renamed the decoder's cache argument; the old name printed a FutureWarning at export."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        result = tiny_pipeline.generate(Image.open(ecg_png), "Rate?", max_new_tokens=3)
    assert result.generated_tokens == 3


def test_a_lock_file_unlinked_between_open_and_lock_is_locked_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder unlinks its lock file while still locked; a process that opened the old file before that gets
    its flock on a file nobody else will ever open: it must try again on the new one, or two processes would
    both hold the target."""
    import pulse_edge.staging as staging

    calls = []
    real = staging._same_file

    def unlinked_once(fd: int, path: Path) -> bool:
        calls.append(path)
        if len(calls) == 1:  # as the previous holder leaving: its file gone from under our descriptor
            path.unlink()
        return real(fd, path)

    monkeypatch.setattr(staging, "_same_file", unlinked_once)
    with staging.target_lock(tmp_path / "out", what="output") as lock:
        assert len(calls) == 2 and lock.is_file()  # tried again, and holds the file that is there now


def test_what_a_stage_wrote_is_on_the_disk_before_the_rename_shows_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss right after the rename left files of the right size and times full of zeros: a stamp of the
    export's hash (runtime/bundle/verified.py) would then have passed them."""
    from pulse_edge import staging

    synced: list[str] = []
    real_fsync, real_rename, real_replace = os.fsync, Path.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, target: synced.append("rename") or real_rename(self, target))
    monkeypatch.setattr(os, "replace", lambda a, b: synced.append("replace") or real_replace(a, b))
    with staging.staged_directory(tmp_path / "out", what="bundle") as work:
        (work / "sub").mkdir()
        (work / "a.bin").write_bytes(b"a")
        (work / "sub" / "b.bin").write_bytes(b"b")
    before = synced[:synced.index("rename")]
    assert {Path(p).name for p in before} >= {"a.bin", "b.bin", "sub"}  # every file and folder first
    assert synced[-1] == str(tmp_path)  # then the folder the rename went into
    synced.clear()
    with staging.staged_file(tmp_path / "one.json") as work:
        work.write_text("{}")
    assert Path(synced[0]).name.endswith(".partial.json") and synced[1:] == ["replace", str(tmp_path)]


def test_an_interruption_is_known_when_sigint_is_ignored() -> None:
    """`pulse-edge export ... &` from a script starts with SIGINT ignored: interrupt_requested read SIGINT's handler
    only, so a SIGTERM caught inside torch.onnx came out as its "report a bug" traceback (a second review)."""
    from pulse_edge.staging import Interrupted, interrupt_requested, interrupts_handled

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_handled():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Interrupted:
                assert interrupt_requested() == signal.SIGTERM
            else:
                raise AssertionError("SIGTERM did not interrupt the work")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_signal_during_the_cleanup_waits_with_sigint_ignored(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The cleanup of a stopped export is held against a second signal; with SIGINT ignored (a script's background
    job) the flag was set on SIGINT's handler only, so a second SIGTERM cut the removal short (a third review)."""
    import shutil

    import pulse_edge.export.fixtures.tiny as tiny
    import pulse_edge.staging as staging

    removing = shutil.rmtree

    def signalled_again(path: object, *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        removing(path, *args, **kwargs)

    monkeypatch.setattr(tiny, "write_shards", _sigterm)
    monkeypatch.setattr(staging.shutil, "rmtree", signalled_again)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the autouse fixture puts it back
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert result.exit_code == 143, result.output
    assert _leftovers(tmp_path) == []


def test_a_lock_file_another_user_left_is_locked_read_only_or_named(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run another user killed leaves its `.NAME.lock` (0644, theirs): opening it for writing raised a bare
    PermissionError, a traceback. A flock needs no write access; a file not even readable is one line."""
    import errno

    from pulse_edge import staging
    from pulse_edge.errors import ConfigError

    out = tmp_path / "scales.npz"
    lock = tmp_path / ".scales.npz.lock"
    lock.write_text("")
    real_open, refused = os.open, {os.O_RDWR | os.O_CREAT}

    def as_another_user(path: Any, flags: int, *args: Any) -> int:
        if Path(path) == lock and flags in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(staging.os, "open", as_another_user)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        PermissionError(errno.EPERM, "Operation not permitted")))  # a sticky folder: not ours to remove
    with (staging.target_lock(out, what="scales file"),
          pytest.raises(ConfigError, match="another pulse-edge command is writing"),
          staging.target_lock(out, what="scales file")):
        pass
    refused.add(os.O_RDONLY)
    with (pytest.raises(ConfigError, match=r"cannot open .*\.scales\.npz\.lock to lock .*a run by another user "
                                           r"left it; remove it, or choose another scales file"),
          staging.target_lock(out, what="scales file")):
        pass


def test_what_a_command_writes_has_the_users_usual_modes_and_sizes_read_at_their_unit(tmp_path: Path) -> None:
    """mkdtemp makes 0700 and safetensors 0600: a model store other users read, a print a viewer opens, got the
    user's modes only because the work was given them; a size at exactly 1 MiB or 1 GiB is said in that unit."""
    from PIL import Image

    from pulse_edge.runtime.batch import save_image
    from pulse_edge.staging import size_text, staged_directory

    old = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "store", what="model folder") as work:
            (work / "sub").mkdir()
            (work / "sub" / "model.safetensors").write_bytes(b"x")
            (work / "sub" / "model.safetensors").chmod(0o600)
        save_image(Image.new("RGB", (4, 4)), tmp_path / "print.png")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")
             if not p.name.endswith(".lock")}
    assert modes == {"store": 0o755, "store/sub": 0o755, "store/sub/model.safetensors": 0o644, "print.png": 0o644}
    assert (size_text(1 << 30), size_text(1 << 20), size_text(1023 << 10)) == ("1.0 GiB", "1.0 MiB", "1023 KiB")
