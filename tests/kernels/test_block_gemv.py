"""The quantized linear kernel (runtime/kernels/block_gemv.c) against its numpy twin and against what it stands in
for, ONNX Runtime's MatMulNBits at accuracy level 4 on prepacked weights.

Skips (tests/conftest.py kernel_or_skip) on a machine without AVX-512 VNNI or a C compiler; fails where the kernel
is broken.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.calibration.quant_math import quantize_blockwise
from pulse_edge.runtime.kernels.linear import (
    BlockGemv,
    BlockWeight,
    LinearScratch,
    QuantizedRows,
    random_weight,
    reference,
)

# exact integer dots, float32 sums in another order than the twin's float64 ones: measured 3-8e-7
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def gemv(kernel_or_skip: Callable[..., BlockGemv], tmp_path_factory: pytest.TempPathFactory) -> BlockGemv:
    return kernel_or_skip(lambda: BlockGemv.load(cache=tmp_path_factory.mktemp("kernels")))


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


SHAPES = [  # bits, block, k, n, rows: the models' blocks, wider ones, K ending inside a block, several rows
    (4, 128, 4096, 64, 1), (8, 128, 4096, 64, 1), (4, 256, 1000, 50, 2), (8, 64, 200, 33, 4), (4, 128, 130, 16, 3),
    (8, 256, 11008, 20, 1),
]


@pytest.mark.parametrize(("bits", "block", "k", "n", "rows"), SHAPES)
def test_the_kernel_computes_its_twin(gemv: BlockGemv, bits: int, block: int, k: int, n: int, rows: int) -> None:
    rng = np.random.default_rng(k + n)
    weight = random_weight(rng, k, n, bits, block)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :3] *= 40  # an outlier sets its block's scale
    assert _relative(gemv(gemv.quantize(x, weight), weight, threads=2), reference(x, weight)) < REL_TOL


def _matmul_nbits(x: np.ndarray, weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, BlockWeight]:
    """ONNX Runtime's MatMulNBits on the weight quantized as the export quantizes it, and that weight."""
    bq = quantize_blockwise(weight, bits, block)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=bq.k, N=bq.n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(bq.packed, "w"),
                               numpy_helper.from_array(bq.scales.astype(np.float32), "s")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    packed = BlockWeight(bq.packed, bq.scales.astype(np.float32).reshape(-1), bq.k, bq.n, bits, block)
    return session.run(None, {"x": x})[0], packed


@pytest.mark.parametrize(("bits", "block", "k", "n", "rows"), SHAPES)
def test_the_one_call_path_is_the_two_calls_bit_for_bit(gemv: BlockGemv, bits: int, block: int, k: int, n: int,
                                                        rows: int) -> None:
    """`linear` (quantize into a shared scratch and multiply in one C call: the decode step's path) against
    quantize + multiply, with one scratch serving a wider weight first: the rows' prefix is all it reads."""
    rng = np.random.default_rng(k + rows)
    weight, wider = random_weight(rng, k, n, bits, block), random_weight(rng, k + 512, 8, bits, block)
    scratch = LinearScratch(weight, wider)
    gemv.linear(rng.standard_normal((4, k + 512)).astype(np.float32), wider, threads=2, scratch=scratch)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    np.testing.assert_array_equal(gemv.linear(x, weight, threads=2, scratch=scratch),
                                  gemv(gemv.quantize(x, weight), weight, threads=2))


def test_the_one_call_path_refuses_what_it_cannot_hold(gemv: BlockGemv) -> None:
    rng = np.random.default_rng(3)
    weight, wider = random_weight(rng, 256, 16, 4, 128), random_weight(rng, 512, 16, 4, 128)
    scratch = LinearScratch(weight)
    with pytest.raises(ValueError, match="the scratch 256 wide"):
        gemv.linear(np.zeros((1, 512), np.float32), wider, threads=1, scratch=scratch)
    with pytest.raises(ValueError, match="the kernel takes 1 to 4"):
        gemv.linear(np.zeros((5, 256), np.float32), weight, threads=1, scratch=scratch)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        gemv.linear(np.zeros((1, 256), np.float64), weight, threads=1, scratch=scratch)


@pytest.mark.parametrize(("bits", "block", "k"), [(4, 128, 512), (8, 128, 384), (4, 256, 700), (8, 64, 300)])
def test_the_kernel_computes_what_matmulnbits_computes(gemv: BlockGemv, bits: int, block: int, k: int) -> None:
    """The function the decode graph's MatMulNBits computes on prepacked weights (activations quantized per block
    at accuracy level 4), to float32 rounding: the same codes, the same integer dots."""
    rng = np.random.default_rng(bits * k)
    x = rng.standard_normal((3, k)).astype(np.float32)
    want, weight = _matmul_nbits(x, rng.standard_normal((k, 40)).astype(np.float32), bits, block)
    assert _relative(gemv(gemv.quantize(x, weight), weight, threads=2), want) < REL_TOL


def test_the_kernel_refuses_what_it_does_not_compute(gemv: BlockGemv) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="blocks of 64"):  # 4-bit blocks of 64: not a whole 64-byte load
        random_weight(rng, 64, 16, 4, 64)
    x, codes, scales = np.ones((1, 64), np.float32), np.empty(64, np.int8), np.empty(2, np.float32)
    assert gemv.library.pe_block_quantize(x.ctypes.data, 1, 64, 4, 64, codes.ctypes.data, scales.ctypes.data,
                                          scales[1:].ctypes.data) == -1  # and the C code refuses them itself
    weight = random_weight(rng, 128, 16, 8, 128)
    with pytest.raises(ValueError, match="1 to 4"):
        gemv(gemv.quantize(np.ones((5, 128), np.float32), weight), weight, threads=1)
    with pytest.raises(ValueError, match=r"\[rows, 128\]"):
        gemv.quantize(np.ones((1, 100), np.float32), weight)


def test_an_all_zero_row_gives_zeros(gemv: BlockGemv) -> None:
    """A block of zeros has no scale to divide by: codes 0, output 0, never NaN."""
    weight = random_weight(np.random.default_rng(1), 256, 32, 4, 128)
    y = gemv(gemv.quantize(np.zeros((1, 256), np.float32), weight), weight, threads=2)
    assert np.array_equal(y, np.zeros_like(y))


@pytest.mark.parametrize(("bits", "bad"), [(4, np.nan), (8, np.nan), (4, np.inf)])
def test_a_non_finite_activation_makes_its_row_nan_not_garbage(gemv: BlockGemv, bits: int, bad: float) -> None:
    """A NaN activation once came out as huge finite outputs (its code INT_MIN skewed the zero-point term): an
    overflow upstream must reach the logits, where the sampler refuses it. The other row is untouched."""
    rng = np.random.default_rng(3)
    weight = random_weight(rng, 512, 32, bits, 128)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    clean = gemv(gemv.quantize(x, weight), weight, threads=2)
    x[0, 5] = bad
    y = gemv(gemv.quantize(x, weight), weight, threads=2)
    assert np.isnan(y[0]).all() and np.array_equal(y[1], clean[1])


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_any_thread_count_gives_the_same_output(gemv: BlockGemv, threads: int) -> None:
    """Outputs are split among the pool's threads (at least 16 each): 1 thread, an odd count, and more threads than
    there are shares of 16 outputs (8) all compute each output the same way, so bit for bit the same."""
    rng = np.random.default_rng(threads)
    weight = random_weight(rng, 512, 100, 4, 128)  # 100 outputs: up to 6 shares of 16 (3 threads: 33, 33, 34)
    x = gemv.quantize(rng.standard_normal((2, 512)).astype(np.float32), weight)
    np.testing.assert_array_equal(gemv(x, weight, threads=threads), gemv(x, weight, threads=2))


def _in_child(gemv: BlockGemv, weight: BlockWeight, x: np.ndarray, queue) -> None:
    queue.put(gemv(gemv.quantize(x, weight), weight, threads=2))


def test_a_forked_child_computes_on_its_own_thread(gemv: BlockGemv) -> None:
    """A process forked after the pool started has its memory but not its workers: it runs every part itself
    (thread_pool.h) instead of waiting on workers that do not exist there."""
    import multiprocessing
    from queue import Empty

    rng = np.random.default_rng(5)
    weight = random_weight(rng, 256, 64, 8, 128)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    want = gemv(gemv.quantize(x, weight), weight, threads=2)  # the pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(gemv, weight, x, queue))
    child.start()
    try:
        got = queue.get(timeout=60)
        child.join(timeout=60)
    except Empty:  # says which way it failed: a hang in the kernel, or a child that died before answering
        pytest.fail(f"the forked child answered nothing in 60 s (alive: {child.is_alive()}, exit code "
                    f"{child.exitcode})")
    finally:
        if child.is_alive():  # a hung child (workers waited on that do not exist) must not outlive the test
            child.terminate()
    assert child.exitcode == 0, f"the forked child answered, then exited with {child.exitcode}"
    np.testing.assert_array_equal(got, want)


def test_the_c_entry_points_refuse_a_block_they_have_no_layout_for(gemv: BlockGemv) -> None:
    """The C code checks too (a damaged bundle's block of 0 would divide by zero, a 4-bit block of 64 write past the
    activations' buffer): -1, nothing written."""
    x = np.ones((1, 128), np.float32)
    codes, scales = np.zeros(256, np.int8), np.zeros(2, np.float32)
    for bits, block in ((4, 64), (8, 0), (8, 96)):
        assert gemv.library.pe_block_quantize(x.ctypes.data, 1, 128, bits, block, codes.ctypes.data,
                                              scales.ctypes.data, scales.ctypes.data) == -1
        assert gemv.library.pe_block_gemv(gemv.pool(1).handle, codes.ctypes.data, scales.ctypes.data,
                                          codes.ctypes.data, scales.ctypes.data, scales.ctypes.data, x.ctypes.data,
                                          1, 16, 128, bits, block) == -1
    assert not codes.any() and (x == 1).all()  # x stood in for the output too


def test_buffers_the_c_code_would_misread_are_refused_when_made() -> None:
    """The calls hand the arrays' addresses to C as they are: a weight or quantized rows of another shape, type or
    layout are refused when made, before any call can read past them."""
    rng = np.random.default_rng(3)
    good = random_weight(rng, 256, 8, 4, 128)
    with pytest.raises(ValueError, match="codes uint8"):
        BlockWeight(good.codes[:, :1], good.scales, 256, 8, 4, 128)  # one block of two
    with pytest.raises(ValueError, match="not C-contiguous"):
        BlockWeight(np.asfortranarray(good.codes), good.scales, 256, 8, 4, 128)
    with pytest.raises(ValueError, match="scales float64"):
        BlockWeight(good.codes, good.scales.astype(np.float64), 256, 8, 4, 128)
    codes, scales = np.zeros((2, 256), np.int8), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="zero_terms float32 \\[2, 1\\]"):
        QuantizedRows(codes, scales, np.zeros((2, 1), np.float32), 4, 128)
    with pytest.raises(ValueError, match="codes int16"):
        QuantizedRows(codes.astype(np.int16), scales, scales.copy(), 4, 128)
    QuantizedRows(codes, scales, scales.copy(), 4, 128)  # the layout pe_block_quantize writes


def test_a_library_that_disagrees_with_its_twin_is_refused_at_load(gemv: BlockGemv, tmp_path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The load's self-test: a compiler or CPU that makes the kernel compute something else is refused (ONNX
    Runtime's kernels run instead), as the attention and elementwise kernels' are."""
    from pulse_edge.errors import KernelUnavailable

    real = BlockGemv.__call__
    monkeypatch.setattr(BlockGemv, "__call__", lambda self, *a, **k: real(self, *a, **k) * (1 + 1e-4))
    with pytest.raises(KernelUnavailable, match="disagrees with its twin"):
        BlockGemv.load(cache=tmp_path / "cache")
