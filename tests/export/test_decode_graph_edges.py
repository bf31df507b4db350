"""Refusals of the decode graph's readers that earlier tests left open (a fifth mutation round: each test fails on
a mutant of the check it names): the native step's reading of the decode graph (export/graphs/decode_index.py),
the cut for the CPU kernels (export/graphs/segments.py), the kernel's device, the decode verdict
(export/build/segments.py) and the decode index's schema (runtime/bundle/decode_index.py)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pulse_edge.errors import BundleError, ConfigError
from pulse_edge.export.graphs.decode_index import NotIndexable, read_decode_graph
from pulse_edge.export.graphs.segments import build_segments, kv_scales
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.decode_index import Linear, Tensor, read_index
from pulse_edge.runtime.bundle.manifest import read_manifest
from pulse_edge.runtime.engines.segmented import kernel_for
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import BlockGemv


@pytest.fixture(scope="module")
def indexed(cpu_int8_bundle: Path, kernel_or_skip) -> Path:
    """The int8 bundle where the export wrote its decode index: only where the native step's kernels run."""
    for load in (BlockGemv.load, lambda: CausalAttention.load(DECODE), LayerOps.load):
        kernel_or_skip(load, "the export writes no decode index here: ")
    return cpu_int8_bundle


@pytest.fixture(scope="module")
def segmented(cpu_int8_bundle: Path, kernel_or_skip) -> Path:
    """The int8 bundle where the export cut its prefill graph: only where the prefill attention kernel runs."""
    kernel_or_skip(CausalAttention.load, "the export writes no segments here: ")
    return cpu_int8_bundle


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _attr(node, key, value):
    for a in list(node.attribute):
        if a.name == key:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(key, value))


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def _first(m, op):
    return next(n for n in m.graph.node if n.op_type == op)


EDITS = {
    "inline weight": lambda m: _init(m, "final_norm.weight").ClearField("data_location"),
    "wrong dtype": lambda m: setattr(_init(m, "final_norm.weight"), "data_type", onnx.TensorProto.FLOAT16),
    "other data file": lambda m: next(e for e in _init(m, "final_norm.weight").external_data
                                      if e.key == "location").__setattr__("value", "other.data"),
    "zero points": lambda m: _first(m, "MatMulNBits").input.append("zp"),
    "accuracy level": lambda m: _attr(_first(m, "MatMulNBits"), "accuracy_level", 0),
    "odd block": lambda m: _attr(_first(m, "MatMulNBits"), "block_size", 48),
    "rotary interleaved": lambda m: _attr(_first(m, "GroupQueryAttention"), "rotary_interleaved", 1),
    "other rotary": lambda m: _first(m, "GroupQueryAttention").input.__setitem__(7, "rotary.sin"),
    "position ids": lambda m: _first(m, "GroupQueryAttention").input.__setitem__(9, "pos"),
    "separate k": lambda m: _first(m, "GroupQueryAttention").input.__setitem__(1, "k"),
    "other heads": lambda m: _attr([n for n in m.graph.node if n.op_type == "GroupQueryAttention"][1], "num_heads", 8),
    "poison not zero": lambda m: _init(m, "poison.zero").CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32),
                                                                                             "poison.zero")),
    "split axis": lambda m: _attr(_first(m, "Split"), "axis", 1),
    "slice start": lambda m: _first(m, "Slice").input.__setitem__(1, "last.end"),
    "trailing node": lambda m: m.graph.node.append(helper.make_node("Identity", ["logits"], ["x"], name="extra")),
    "eps differ": lambda m: _attr(_node(m, "final_norm/skipnorm"), "epsilon", 1e-3),
    "scale": lambda m: [_attr(n, "scale", 0.5) for n in m.graph.node if n.op_type == "GroupQueryAttention"],
    "ends early": lambda m: [m.graph.node.pop() for _ in range(3)],
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_every_departure_from_the_steps_form_gets_no_index(cpu_int8_bundle: Path, tmp_path: Path, edit: str) -> None:
    model = onnx.load(str(cpu_int8_bundle / "decoder.onnx"), load_external_data=False)
    read_decode_graph(cpu_int8_bundle / "decoder.onnx")  # the unedited graph is indexable
    EDITS[edit](model)
    onnx.save_model(model, str(tmp_path / "decoder.onnx"))
    with pytest.raises(NotIndexable):
        read_decode_graph(tmp_path / "decoder.onnx")


def _gqa(m):
    return next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")




CUT_EDITS = {
    "position ids": lambda m: _gqa(m).input.__setitem__(9, "pos"),
    "one scale": lambda m: _gqa(m).input.__setitem__(13, ""),
    "per-tensor cache": lambda m: _attr(_gqa(m), "k_quant_type", "PER_TENSOR"),
    "softcap": lambda m: _attr(_gqa(m), "softcap", 30.0),
    "other kv heads": lambda m: _attr(_gqa(m), "kv_num_heads", 2),
    "scale": lambda m: _attr(_gqa(m), "scale", 0.5),
}


@pytest.mark.parametrize("edit", list(CUT_EDITS), ids=list(CUT_EDITS))
def test_attention_the_kernel_does_not_compute_is_not_cut(cpu_int8_bundle: Path, edit: str) -> None:
    model = onnx.load(str(cpu_int8_bundle / "decoder.onnx"), load_external_data=False)
    build_segments(model, 2, 4, 16, "decoder")  # unedited: cut
    CUT_EDITS[edit](model)
    with pytest.raises(ValueError, match="not cut"):
        build_segments(model, 2, 4, 16, "decoder")


def test_the_split_widths_follow_kv_heads_not_heads() -> None:
    """heads 8, kv_heads 2 (GQA): the k and v widths are kv_heads x head_dim."""
    from pulse_edge.export.graphs.segments import _open_attention
    gqa = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "s", "t", "cos", "sin"],
                           ["o", "k", "v"], name="layers.0.attn/gqa", domain="com.microsoft", num_heads=8,
                           kv_num_heads=2, do_rotary=1)
    _, consts = _open_attention(gqa, 0, 2, 16)
    widths = next(c for c in consts if c.name.endswith("split_widths"))
    assert onnx.numpy_helper.to_array(widths).tolist() == [128, 32, 32]


def test_external_data_outside_the_bundle_is_refused(cpu_int8_bundle: Path, tmp_path: Path) -> None:
    model = onnx.load(str(cpu_int8_bundle / "decoder.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == "layers.0.attn.k_scale")
    next(e for e in t.external_data if e.key == "location").value = "../decoder.onnx.data"
    with pytest.raises(ValueError, match="outside the bundle"):
        kv_scales(model, 2, cpu_int8_bundle)


def test_the_kernel_is_cpu_only(segmented: Path) -> None:
    spec = read_manifest(segmented).graphs[names.PREFILL]
    assert kernel_for(names.PREFILL, spec, "auto", "cuda") is None
    with pytest.raises(ConfigError, match="runs on the CPU, not with --provider cuda"):
        kernel_for(names.PREFILL, spec, "kernel", "cuda")


def test_a_decode_kernel_off_its_twin_fails_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.export.build import segments as bs
    monkeypatch.setattr(bs, "emulated_reference", lambda *a, **k: nullcontext())
    loaded = SimpleNamespace(model=SimpleNamespace(language_model=None))
    manifest = SimpleNamespace(graphs={names.DECODER: None}, kv=None)
    report = bs.checked_decode_parity(lambda *a, **k: {"pass": True, "kernel_call_rel_err": 1e-3}, "k", loaded,
                                      Path(), manifest, None, SimpleNamespace(recipe=None, scales=None), None, None,
                                      "int8", None, prepacked=True)
    assert not report["pass"] and not report["kernel_plausible"]


def test_a_float_linear_round_trips(indexed: Path, tmp_path: Path) -> None:
    d = json.loads((indexed / names.DECODE_INDEX_FILE).read_text())
    d["lm_head"] = Linear(0, d["hidden"], d["vocab"], weight=Tensor("w", "float32", (d["hidden"], d["vocab"]), 0)
                          ).to_dict()
    (tmp_path / "i.json").write_text(json.dumps(d))
    assert read_index(tmp_path / "i.json").lm_head.bits == 0


@pytest.mark.parametrize("edit", [
    lambda d: d["final_norm"].update(shape=[0]), lambda d: d["final_norm"].update(shape=[1] * 5),
    lambda d: d["lm_head"].update(bits=2), lambda d: d.update(eps=0), lambda d: d.update(layers=[]),
    lambda d: d.update(version=2), lambda d: d.update(store="round-clip-128")],
    ids=["zero dim", "rank 5", "2 bits", "eps 0", "no layers", "version 2", "other store"])
def test_an_index_outside_the_schema_is_refused(indexed: Path, tmp_path: Path, edit) -> None:
    d = json.loads((indexed / names.DECODE_INDEX_FILE).read_text())
    edit(d)
    (tmp_path / "i.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="re-export the bundle"):
        read_index(tmp_path / "i.json")


def test_every_weight_of_the_decode_graph_starts_on_a_page(cpu_int8_bundle: Path) -> None:
    """ORT maps external data only where a tensor starts 4 KiB aligned; elsewhere it copies the weights into
    memory, silently, and the bundle's memory use doubles (export/graphs/decoder.py ExternalData)."""
    model = onnx.load(str(cpu_int8_bundle / "decoder.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(offset % 4096 == 0 for offset in offsets)


def test_an_fp16_graph_takes_neither_an_int8_nor_an_fp16_cache_option(tiny_pipeline, tmp_path: Path) -> None:
    from pulse_edge.export.graphs.decoder import DecoderShape, build_decoder

    lm = tiny_pipeline.loaded.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=64)
    with pytest.raises(ValueError, match="an fp16 KV cache is an fp32 graph's option"):
        build_decoder(lm, shape, tmp_path, precision="fp16", fp16_cache=True)
    kv = SimpleNamespace(check=lambda *args: None)  # scales that fit; the precision is what is refused
    with pytest.raises(ValueError, match="an int8 KV cache goes with float32 attention"):
        build_decoder(lm, shape, tmp_path, precision="fp16", kv=kv)
