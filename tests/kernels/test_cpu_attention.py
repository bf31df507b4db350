"""The CPU attention kernels (runtime/kernels: the bf16 prefill one on AMX tiles or on AVX-512 BF16, the AVX-512
decode one) against their numpy twin, and the build that makes them.

The prefill tests run once per variant this machine has; each kernel test skips on a machine without its
instructions or a C compiler (tests/conftest.py kernel_or_skip), and fails where the kernel is broken. The build
tests compile a plain C file and run wherever a compiler is.
"""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels import build
from pulse_edge.runtime.kernels.attention import DECODE, PREFILL, CausalAttention, KernelKind, reference

# q and the softmax weights are rounded to bf16 (8 significant bits, 2^-9 relative each); over a weighted
# mean of values the error stays near that: the largest seen was 2.8e-3 of the output's norm.
REL_TOL = 6e-3


@pytest.fixture(scope="module", params=PREFILL, ids=["amx", "avx512-bf16"])
def attention(request: pytest.FixtureRequest, kernel_or_skip: Callable[..., CausalAttention],
              tmp_path_factory: pytest.TempPathFactory) -> CausalAttention:
    return kernel_or_skip(lambda: CausalAttention.load(request.param, cache=tmp_path_factory.mktemp("kernels")))


@pytest.fixture(scope="module")
def decode(kernel_or_skip: Callable[..., CausalAttention], tmp_path_factory: pytest.TempPathFactory) -> CausalAttention:
    return kernel_or_skip(lambda: CausalAttention.load(DECODE, cache=tmp_path_factory.mktemp("kernels")))


def _inputs(rows: int, past: int, heads: int, kv_heads: int, capacity: int, d: int, sharp: float = 1.0,
            seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random codes over the whole buffer; scales put the scores near N(0, sharp^2)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((rows, heads, d), np.float32)
    k = rng.integers(-127, 128, (kv_heads, capacity, d), dtype=np.int8)
    v = rng.integers(-127, 128, (kv_heads, capacity, d), dtype=np.int8)
    ks = (rng.uniform(0.5, 1.5, (kv_heads, d)) * sharp / 73).astype(np.float32)  # 73 ~ the codes' std
    vs = rng.uniform(0.005, 0.02, (kv_heads, d)).astype(np.float32)
    return q, k, v, ks, vs


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


SHAPES = [  # rows, past, heads, kv_heads, capacity, d: edges of the 16-row and 64-key blocks, GQA groups
    (1, 0, 2, 2, 64, 64),
    (1, 700, 2, 2, 800, 128),
    (37, 0, 4, 4, 64, 128),
    (100, 29, 4, 2, 200, 64),
    (16, 1000, 2, 2, 1100, 128),
    (130, 77, 3, 1, 400, 128),
    (24, 40, 2, 2, 64, 128),  # positions end on a 64-key block: no padding keys, the buffer's last position read
    (64, 64, 4, 2, 128, 80),  # whole query and key blocks, past + rows == capacity
    (50, 20, 4, 4, 80, 16),  # the tiny test model's heads: 16 channels, padded to 64 in the tiles
    (33, 40, 2, 2, 90, 80),  # 80 channels: one 32-channel step half used, one 64-channel block partly
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "rows{}-past{}-h{}-kv{}-cap{}-d{}".format(*s))
def test_matches_the_numpy_twin(attention: CausalAttention, shape: tuple[int, ...]) -> None:
    q, k, v, ks, vs = _inputs(*shape)
    past = shape[1]
    out = attention(q, k, v, ks, vs, past=past, threads=2)
    assert np.isfinite(out).all()
    assert _relative(out, reference(q, k, v, ks, vs, past=past)) < REL_TOL


DECODE_SHAPES = [  # rows, past, heads, kv_heads, capacity, d: a decode step, a few rows, GQA, the head dims
    (1, 0, 2, 2, 16, 128),  # the first position: one key, softmax of one
    (1, 3039, 4, 4, 3100, 128),  # a decode step at ECG context
    (1, 100, 8, 2, 128, 64),
    (3, 200, 4, 4, 256, 16),  # the tiny test model's heads
    (15, 40, 2, 1, 64, 48),  # the most rows the decode graph's segments see; a head dim of three vectors
    (2, 500, 2, 2, 600, 256),  # the largest head dim
    (40, 0, 2, 2, 64, 128),  # a whole prompt (the decode graph prefills where no prefill graph is loaded)
]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "rows{}-past{}-h{}-kv{}-cap{}-d{}".format(*s))
def test_the_decode_kernel_matches_the_twin_to_float32(decode: CausalAttention, shape: tuple[int, ...]) -> None:
    """float32 throughout (the codes exact, 2^x to ~1e-7): the twin's result to float32 rounding."""
    q, k, v, ks, vs = _inputs(*shape, sharp=4.0)
    past = shape[1]
    out = decode(q, k, v, ks, vs, past=past, threads=2)
    assert _relative(out, reference(q, k, v, ks, vs, past=past)) < 1e-5


def _nan_in_its_head_only(attend: CausalAttention, bad: float) -> None:
    q, k, v, ks, vs = _inputs(2, 30, 4, 2, 64, 128)
    q[1, 2, 5] = bad
    out = attend(q, k, v, ks, vs, past=30, threads=2)
    assert np.isnan(out[1, 2]).all() and np.isfinite(np.delete(out[1], 2, axis=0)).all() and np.isfinite(out[0]).all()
    assert _relative(out[0], reference(q[:1], k, v, ks, vs, past=30)[0]) < REL_TOL


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_query_gives_a_non_finite_output_in_its_head_only(attention: CausalAttention,
                                                                       bad: float) -> None:
    """An overflow upstream must reach the logits (where the sampler refuses it), not become every key's equal
    weight: a plausible mean of the values. The other heads stay as the twin computes them."""
    _nan_in_its_head_only(attention, bad)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_decode_kernel_passes_a_non_finite_query_on_too(decode: CausalAttention, bad: float) -> None:
    _nan_in_its_head_only(decode, bad)


def test_the_decode_kernel_reads_only_the_positions_it_may(decode: CausalAttention) -> None:
    """Codes past the last position (a longer conversation's stale cache) change nothing; the last position's do."""
    q, k, v, ks, vs = _inputs(2, 60, 2, 2, 100, 64)
    before = decode(q, k, v, ks, vs, past=60, threads=1)
    k[:, 62:], v[:, 62:] = 127, -127
    np.testing.assert_array_equal(decode(q, k, v, ks, vs, past=60, threads=2), before)
    v[:, 61] = 127
    assert _relative(decode(q, k, v, ks, vs, past=60, threads=2), before) > 1e-3


def test_the_decode_kernel_refuses_a_head_dim_it_does_not_hold(decode: CausalAttention) -> None:
    q, k, v, ks, vs = _inputs(1, 3, 1, 1, 8, 272)
    with pytest.raises(ValueError, match="up to 256"):
        decode(q, k, v, ks, vs, past=3, threads=1)


# bf16 q moves each score by about |score| x 2^-9, so the bound grows with the scores' spread (7.3e-3 seen
# at 30); a wrong rescale of the running sum would be off by O(1).
@pytest.mark.parametrize(("sharp", "tol"), [(8.0, REL_TOL), (30.0, 2e-2)])
def test_peaked_softmax_rescales_the_running_sum(attention: CausalAttention, sharp: float, tol: float) -> None:
    """Scores spread over tens of units: the running max moves between key blocks many times."""
    q, k, v, ks, vs = _inputs(90, 300, 2, 2, 400, 128, sharp=sharp, seed=1)
    out = attention(q, k, v, ks, vs, past=300, threads=2)
    assert _relative(out, reference(q, k, v, ks, vs, past=300)) < tol


def test_a_row_never_sees_later_positions(attention: CausalAttention) -> None:
    q, k, v, ks, vs = _inputs(40, 10, 2, 2, 64, 128)
    before = attention(q, k, v, ks, vs, past=10, threads=1)
    k[:, 30:], v[:, 30:] = -k[:, 30:], 127  # rows 0-19 sit at positions 10-29
    after = attention(q, k, v, ks, vs, past=10, threads=1)
    np.testing.assert_array_equal(after[:20], before[:20])
    assert not np.allclose(after[20:], before[20:])


def test_the_prefill_variants_round_alike(tmp_path: Path, kernel_or_skip: Callable[..., CausalAttention]) -> None:
    """Where both run (an AMX CPU): the AVX-512 BF16 variant rounds as the AMX one does (bf16 products summed in
    fp32; only the order of the sums differs), so a bundle validated with one serves as well with the other."""
    amx, avx = (kernel_or_skip(lambda kind=kind: CausalAttention.load(kind, cache=tmp_path / "cache"),
                               "both variants needed: ") for kind in PREFILL)
    q, k, v, ks, vs = _inputs(300, 200, 4, 2, 512, 128, sharp=4.0)
    want = reference(q, k, v, ks, vs, past=200)
    a, b = (kernel(q, k, v, ks, vs, past=200, threads=2) for kernel in (amx, avx))
    assert _relative(a, b) < 1e-3 < _relative(a, want)  # apart by the sums' order, not by the rounding


def _kinds(*whats: str) -> tuple[KernelKind, ...]:
    return tuple(KernelKind("x.c", "f", (), (), what, amx=False, self_test_tol=0.0) for what in whats)


@pytest.mark.parametrize(("refusals", "loaded", "warned"), [
    ({"first": build.CPUUnsupported("no amx")}, "second", []),  # the expected case on a CPU without AMX: no warning
    ({"first": build.MachineUnsupported("Linux refused AMX state")}, "second", ["Linux refused AMX state"]),
    ({}, "first", []),
], ids=["cpu", "refused", "first"])
def test_the_first_kind_that_loads_is_the_kernel(refusals: dict, loaded: str, warned: list[str],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def load_one(cls, kind: KernelKind, cache: Path | None) -> str:
        if kind.what in refusals:
            raise refusals[kind.what]
        return kind.what

    monkeypatch.setattr(CausalAttention, "_load_one", classmethod(load_one))
    with caplog.at_level("WARNING"):
        assert CausalAttention.load(_kinds("first", "second")) == loaded
    assert [r.message for r in caplog.records] == [f"second runs instead: {m}" for m in warned]


@pytest.mark.parametrize(("refusals", "raised"), [
    ((build.CPUUnsupported("lacks amx"), build.CPUUnsupported("lacks avx512_bf16")), "lacks avx512_bf16"),
    ((build.MachineUnsupported("Linux refused AMX state"), build.CPUUnsupported("lacks avx512_bf16")),
     "Linux refused AMX state"),
    ((build.MachineUnsupported("Linux refused AMX state"), KernelUnavailable("disagrees with its twin")),
     "disagrees with its twin"),
], ids=["cpu", "refused", "broken"])
def test_where_no_kind_loads_the_reason_that_matters_is_raised(refusals: tuple, raised: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without the instructions is the expected, quiet case; anything else (a refusal, a compiler) is what the
    user must hear about, so it wins over the CPU's; and a broken kernel wins over the machine's reasons (a test
    must then fail, not skip)."""
    by_name = dict(zip(("first", "second"), refusals, strict=True))

    def load_one(cls, kind: KernelKind, cache: Path | None) -> None:
        raise by_name[kind.what]

    monkeypatch.setattr(CausalAttention, "_load_one", classmethod(load_one))
    with pytest.raises(KernelUnavailable, match=raised):
        CausalAttention.load(_kinds("first", "second"))


def test_the_thread_count_does_not_change_the_result(attention: CausalAttention) -> None:
    q, k, v, ks, vs = _inputs(70, 50, 4, 2, 128, 128)
    np.testing.assert_array_equal(attention(q, k, v, ks, vs, past=50, threads=1),
                                  attention(q, k, v, ks, vs, past=50, threads=2))


REFUSALS = [
    (lambda a: {**a, "q": a["q"][:, :, :72].copy(), "k": a["k"][:, :, :72].copy(), "v": a["v"][:, :, :72].copy()},
     "multiple of 16"),
    (lambda a: {**a, "q": np.zeros((8, 3, 128), np.float32)}, "not a multiple"),
    (lambda a: {**a, "past": 60}, "exceed the cache"),
    (lambda a: {**a, "k": a["k"].astype(np.int16)}, "k_codes must be"),
    (lambda a: {**a, "q": np.asfortranarray(a["q"])}, "q must be C-contiguous"),
    (lambda a: {**a, "ks": a["ks"][:1].copy()}, "scales must be"),
    (lambda a: {**a, "k": a["k"][:0].copy(), "v": a["v"][:0].copy()}, "not a multiple of 0 kv heads"),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_refuses_what_the_c_code_cannot_take(change, message: str) -> None:
    """The checks run before the library is touched: reference() shares them, so they run on any machine."""
    q, k, v, ks, vs = _inputs(8, 0, 4, 2, 64, 128)
    args = change({"q": q, "k": k, "v": v, "ks": ks, "vs": vs, "past": 0})
    with pytest.raises(ValueError, match=message):
        reference(args["q"], args["k"], args["v"], args["ks"], args["vs"], past=args["past"])


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_the_kernels_call_refuses_it_too(change, message: str, decode: CausalAttention) -> None:
    q, k, v, ks, vs = _inputs(8, 0, 4, 2, 64, 128)
    args = change({"q": q, "k": k, "v": v, "ks": ks, "vs": vs, "past": 0})
    with pytest.raises(ValueError, match=message):
        decode(args["q"], args["k"], args["v"], args["ks"], args["vs"], past=args["past"], threads=2)


@pytest.mark.parametrize(("rows", "past", "heads", "kv_heads", "capacity", "d"), [
    (8, 0, 4, 2, 64, 72), (8, 0, 3, 2, 64, 128), (8, 60, 4, 2, 64, 128), (0, 0, 4, 2, 64, 128)])
def test_the_c_entry_points_refuse_what_they_cannot_take(attention: CausalAttention, decode: CausalAttention,
                                                         rows: int, past: int, heads: int, kv_heads: int,
                                                         capacity: int, d: int) -> None:
    """A caller that skipped the Python checks still gets no write past a buffer: the C code refuses with its own
    code (PE_BAD_ARGUMENTS), and leaves the output as it was."""
    from pulse_edge.runtime.kernels.attention import BAD_ARGUMENTS

    q = np.ones((max(rows, 1), heads, d), np.float32)
    k = np.zeros((kv_heads, capacity, d), np.int8)
    scales = np.ones((kv_heads, d), np.float32)
    for kernel in (attention, decode):
        out = np.full_like(q, 7.0)
        status = getattr(kernel.library, kernel.kind.symbol)(
            q.ctypes.data, k.ctypes.data, k.ctypes.data, scales.ctypes.data, scales.ctypes.data, out.ctypes.data,
            rows, past, heads, kv_heads, capacity, d, 0.1, 2)
        assert status == BAD_ARGUMENTS and (out == 7.0).all()


# The build: a plain C file, so these run wherever a compiler is.
PLAIN = "int pe_answer(void) { return 42; }\n"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    if not shutil.which("cc") and not shutil.which("gcc"):
        pytest.skip("no C compiler on this machine")
    path = tmp_path / "plain.c"
    path.write_text(PLAIN)
    return path


def test_builds_once_and_loads(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build.build(source, (), cache)
    stamp = first.stat().st_mtime_ns
    assert build.build(source, (), cache) == first and first.stat().st_mtime_ns == stamp
    assert build.load(first).pe_answer() == 42
    source.write_text(PLAIN.replace("42", "43"))  # an edited source is another library
    second = build.build(source, (), cache)
    assert second != first and build.load(second).pe_answer() == 43


def test_an_edited_header_beside_the_source_is_another_library(source: Path, tmp_path: Path) -> None:
    """The kernels share vector_math.h: a change there must rebuild them, never load a library built before it."""
    cache = tmp_path / "cache"
    header = source.parent / "shared.h"
    header.write_text("#define ANSWER 42\n")
    source.write_text('#include "shared.h"\nint pe_answer(void) { return ANSWER; }\n')
    first = build.build(source, (), cache)
    header.write_text("#define ANSWER 43\n")
    second = build.build(source, (), cache)
    assert second != first and build.load(second).pe_answer() == 43


def _build_in_child(source: str, cache: str, cc: str, barrier) -> str:
    import os

    os.environ["CC"] = cc
    barrier.wait()  # the three ask at once, not one after another
    return str(build.build(Path(source), (), Path(cache)))


def test_concurrent_builds_compile_once(source: Path, tmp_path: Path) -> None:
    """Three processes ask for the same library at once: the lock makes two of them wait for the first one's
    build (the compiler wrapper logs every compile; --version calls are not compiles)."""
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cc"
    real = shutil.which("cc") or shutil.which("gcc")
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in --version) ;; *) echo x >> {log}; sleep 1 ;; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(3) as pool:
        barrier = manager.Barrier(3)
        paths = pool.starmap(_build_in_child, [(str(source), str(cache), str(wrapper), barrier)] * 3)
    assert len(set(paths)) == 1 and log.read_text().count("x") == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [Path(paths[0]).name]


def test_a_partial_library_left_by_a_killed_build_is_removed(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    target = build.library_path(source, (), cache, build.compiler())
    cache.mkdir()
    stale = cache / f".{target.stem}.dead.partial{target.suffix}"
    stale.write_text("half a library")
    assert build.build(source, (), cache) == target and not stale.exists()


def test_a_library_that_disagrees_with_its_twin_is_never_used(attention: CausalAttention, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The load's self-test: a compiler or CPU that makes the kernel compute something else is refused, and the
    runtime's auto mode runs the whole prefill graph instead, with a warning."""
    from pulse_edge.runtime.bundle.manifest import GraphSpec, SegmentSpec
    from pulse_edge.runtime.engines.segmented import kernel_for

    real = CausalAttention.__call__
    monkeypatch.setattr(CausalAttention, "__call__", lambda self, *a, **k: real(self, *a, **k) * 1.1)
    with pytest.raises(KernelUnavailable, match="disagrees with its twin"):
        CausalAttention.load(attention.kind, cache=tmp_path / "cache")  # this run's variant
    with pytest.raises(KernelUnavailable, match="disagrees with its twin"):
        CausalAttention.load(cache=tmp_path / "cache")  # and the runtime's choice among them
    cut = GraphSpec(file="prefill.onnx", engine="onnx", precision="int8", inputs=(), outputs=(),
                    segments=(SegmentSpec("prefill.seg00.onnx", (), ("logits",)),))
    with caplog.at_level("INFO"):
        assert kernel_for("prefill", cut, "auto", "cpu") is None
    assert [r.levelname for r in caplog.records if "disagrees with its twin" in r.message] == ["WARNING"]


def test_a_compile_error_is_one_line_and_leaves_nothing(source: Path, tmp_path: Path) -> None:
    source.write_text("int broken(void) { return }\n")
    cache = tmp_path / "cache"
    with pytest.raises(KernelUnavailable, match=r"could not compile plain\.c \(.*error") as caught:
        build.build(source, (), cache)
    assert "\n" not in str(caught.value) and not isinstance(caught.value, build.MachineUnsupported)  # a broken source
    assert not [p for p in cache.iterdir() if p.suffix == ".so" or "partial" in p.name]


def test_a_compiler_too_old_for_the_flags_is_the_machines_limit(source: Path, tmp_path: Path) -> None:
    """A flag the compiler does not know (an old gcc and -mamx-tile): the machine lacks it, the tests skip."""
    with pytest.raises(build.MachineUnsupported, match=r"could not compile plain\.c"):
        build.build(source, ("-mno-such-flag-pulse-edge",), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix in (".so", ".c")]


def test_no_compiler_no_cpu_feature_no_cache_are_refused(source: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KernelUnavailable, match="lacks \\(amx_bf16, amx_tile\\)"):
        build.require_cpu(["avx512f", "amx_tile", "amx_bf16"], "this kernel", flags=frozenset({"avx512f"}))
    with pytest.raises(KernelUnavailable, match=r"cannot be read .*reinstall pulse-edge"):
        build.build(tmp_path / "missing.c", (), tmp_path / "cache")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KernelUnavailable, match="is not writable"):
        build.build(source, (), blocker / "cache")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(KernelUnavailable, match="no C compiler found"):
        build.build(source, (), tmp_path / "cache")


@pytest.mark.parametrize("cc", [" ", 'gcc "unclosed', ""])
def test_a_cc_that_is_no_command_line_is_skipped_for_the_next_compiler(cc: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(build.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(build.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert build.compiler() == ["cc"]


def test_a_cache_that_cannot_hold_the_build_is_kernel_unavailable(source: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or a lock the file system refuses) while building: the engines fall back to ORT's kernels on
    KernelUnavailable; a bare OSError would have stopped the load."""
    import contextlib
    import errno

    @contextlib.contextmanager
    def full_disk(path: Path):
        raise OSError(errno.ENOSPC, "No space left on device")
        yield path  # never reached: a generator for contextmanager

    monkeypatch.setattr(build, "staged_file", full_disk)
    with pytest.raises(KernelUnavailable, match=r"cannot hold a new build \(No space left on device\); free some"):
        build.build(source, (), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so"))


def test_the_decode_kernel_on_a_worker_pool_gives_the_same_output(decode: CausalAttention,
                                                                  kernel_or_skip: Callable[..., Any]) -> None:
    """The native decode step runs the decode kernel on the quantized linear kernel's worker threads
    (runtime/kernels/thread_pool.h): the same heads split the same way, so the same output bit for bit."""
    from pulse_edge.runtime.kernels.linear import BlockGemv

    pool = kernel_or_skip(BlockGemv.load).pool(2)
    q, k, v, ks, vs = _inputs(3, 500, 8, 2, 600, 128, seed=9)
    started = decode(q, k, v, ks, vs, past=500, threads=2)
    pooled = decode(q, k, v, ks, vs, past=500, threads=2, pool=pool)
    np.testing.assert_array_equal(started, pooled)
    assert _relative(pooled, reference(q, k, v, ks, vs, past=500)) < 1e-5


@pytest.mark.parametrize(("refusal", "skipped"), [
    (build.CPUUnsupported("lacks avx512_bf16"), True), (build.MachineUnsupported("no C compiler found"), True),
    (KernelUnavailable("the attention kernel built here disagrees with its twin"), False),
    (KernelUnavailable("cc could not compile causal_attention.c (error: ...)"), False)])
def test_only_what_the_machine_lacks_skips_a_kernel_test(refusal: KernelUnavailable, skipped: bool,
                                                         kernel_or_skip: Callable[..., Any]) -> None:
    """The tests' loader: a CPU, compiler or OS without what the kernel needs skips; a kernel that fails its
    self-test or does not compile fails the test instead (else CI stays green on exactly the machines that run it)."""
    def load() -> None:
        raise refusal

    with pytest.raises(pytest.skip.Exception if skipped else KernelUnavailable, match=str(refusal)[:12]):
        kernel_or_skip(load)
