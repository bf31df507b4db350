"""The bundle and the lean ONNX Runtime path: parity with the torch reference, chat, and bad bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pulse_testing.manifests import edit_manifest
from pulse_testing.pages import page

from pulse_edge.cli.main import main
from pulse_edge.errors import ConfigError, PromptError
from pulse_edge.export.build.bundle import ExportOptions, export_bundle
from pulse_edge.export.model.torch_backend import TorchPipeline
from pulse_edge.runtime.bundle.manifest import BundleError, read_manifest
from pulse_edge.runtime.ecg.render import render_ecg
from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
from pulse_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope="session")
def ort_pipeline(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle)


def _images() -> list[Image.Image]:
    return [render_ecg(synthesize_ecg(r, seed=s), width_px=w, height_px=h)
            for r, s, (w, h) in (("sinus", 11, (2200, 1700)), ("afib", 12, (3300, 2550)),
                                 ("bradycardia", 13, (1700, 2200)))]


def test_manifest_records_passing_validation(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    assert manifest.precision == "fp32" and manifest.image.merge == "flat"
    assert manifest.prompt.dummy_prefix_after_eos is False  # the checkpoint's tokenizer_config.json: not legacy
    assert set(manifest.graphs) == {"vision", "decoder"}
    validation = manifest.validation
    assert validation["pass"] is True and validation["greedy"]["all_equal"] is True
    lengths = [case["prefill_length"] for case in validation["decoder"]["cases"]]
    assert lengths == [5, 64, 2950]
    assert all(c["prefill"]["max_rel_err"] < 1e-4 for c in validation["decoder"]["cases"])
    assert len(manifest.source.sha256) == 64


@pytest.mark.parametrize("question", ["What is the rhythm?", "Is there ST elevation in V2?", "Report."])
def test_ort_greedy_tokens_equal_torch(ort_pipeline: Pipeline, tiny_pipeline: TorchPipeline,
                                       question: str) -> None:
    for image in _images():
        ours = ort_pipeline.generate(image, question, max_new_tokens=24)
        ref = tiny_pipeline.generate(image, question, max_new_tokens=24)
        assert ours.token_ids == ref.token_ids
        assert (ours.image_tokens, ours.prompt_tokens, ours.text) == (ref.image_tokens, ref.prompt_tokens, ref.text)


def test_multi_turn_chat_keeps_the_cache_and_matches_torch(ort_pipeline: Pipeline,
                                                           tiny_pipeline: TorchPipeline) -> None:
    image = _images()[0]
    ours, ref = ort_pipeline.chat(), tiny_pipeline.chat()
    counted = 0
    for question, kwargs in (("What is the rhythm?", {"image": image}), ("And the rate?", {}), ("Axis?", {})):
        a = ours.ask(question, max_new_tokens=6, **kwargs)
        b = ref.ask(question, max_new_tokens=6, **kwargs)
        assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens
        counted += a.prompt_tokens + a.generated_tokens
    assert ort_pipeline.engine.length > 2880  # the image is still in the cache after three turns
    # every position counted once: the last answer's last token is the only one not (yet) in the cache
    assert counted == ort_pipeline.engine.length + 1
    with pytest.raises(PromptError, match="cannot bring a new image"):
        ours.ask("Another one?", image=image)


def test_a_follow_up_closes_an_answer_the_token_limit_cut(ort_pipeline: Pipeline,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The template puts </s> after every answer: one the model ended has it as its last token; one cut at
    max_new_tokens gets it before the next question, or the model reads its question as the answer's words."""
    prefilled: list[list[int]] = []
    real = ort_pipeline.engine.prefill
    monkeypatch.setattr(ort_pipeline.engine, "prefill",
                        lambda ids, features, **kw: prefilled.append(list(ids)) or real(ids, features, **kw))
    chat = ort_pipeline.chat()
    first = chat.ask("What is the rhythm?", _images()[0], max_new_tokens=1)
    assert first.stop_reason == "max_new_tokens" and first.token_ids[-1] != ort_pipeline.tokenizer.eos_id
    chat.ask("And the rate?", max_new_tokens=1)
    eos = ort_pipeline.tokenizer.eos_id
    assert prefilled[1][:2] == [first.token_ids[-1], eos]  # the answer's last token, then the closing </s>


def test_a_conversation_whose_cache_a_newer_one_took_refuses_its_follow_up(ort_pipeline: Pipeline) -> None:
    """Conversations share the pipeline's one cache: after generate() on another print, a follow-up in the old
    chat would be answered about the wrong ECG, in silence. It is refused; a fresh chat answers."""
    first, second = _images()[:2]
    chat = ort_pipeline.chat()
    chat.ask("What is the rhythm?", first, max_new_tokens=2)
    chat.ask("And the rate?", max_new_tokens=2)  # its own follow-up: the cache is still its own
    ort_pipeline.generate(second, "What is the rhythm?", max_new_tokens=2)
    with pytest.raises(PromptError, match="taken by a newer conversation"):
        chat.ask("And the axis?", max_new_tokens=2)
    assert ort_pipeline.chat().ask("What is the rhythm?", first, max_new_tokens=2).generated_tokens == 2


def test_a_conversation_whose_question_stopped_partway_refuses_to_go_on(ort_pipeline: Pipeline) -> None:
    """A question that fails after its positions entered the cache (an engine fault, non-finite logits, a raising
    on_text, Ctrl-C) leaves the cache ahead of the conversation: a retry or follow-up would attend to positions
    it never recorded. Refused in one line; a new conversation answers."""
    image = _images()[0]
    chat = ort_pipeline.chat()

    def interrupted(text: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.ask("What is the rhythm?", image, max_new_tokens=4, on_text=interrupted)
    for retry in ({"question": "What is the rhythm?", "image": image}, {"question": "And the rate?"}):
        with pytest.raises(PromptError, match=r"^an earlier question of this conversation stopped partway "
                                              r"\(KeyboardInterrupt\), leaving the cache out of step with it: "
                                              r"ask in a new conversation$"):
            chat.ask(max_new_tokens=2, **retry)
    fresh = ort_pipeline.chat().ask("What is the rhythm?", image, max_new_tokens=4)
    assert fresh.token_ids == ort_pipeline.generate(image, "What is the rhythm?", max_new_tokens=4).token_ids


def test_a_numpy_integer_is_a_token_limit(ort_pipeline: Pipeline) -> None:
    import numpy as np

    assert ort_pipeline.generate(_images()[0], "Rate?", max_new_tokens=np.int64(2)).generated_tokens == 2


@pytest.mark.parametrize("limit", [0, -3, 2.5, float("nan"), True])
def test_an_absurd_token_limit_is_refused_before_any_work(ort_pipeline: Pipeline, limit: object) -> None:
    from pulse_edge.errors import ConfigError
    from pulse_edge.runtime.batch import BatchOptions

    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number >= 1"):
        ort_pipeline.generate(_images()[0], "Rate?", max_new_tokens=limit)
    with pytest.raises(ConfigError, match="max_new_tokens must be a whole number >= 1"):
        BatchOptions(max_new_tokens=limit, model="m")
    for model in ("", None, "  "):  # a Python caller's batch: the rerun check needs the model to compare
        with pytest.raises(ConfigError, match="BatchOptions needs model"):
            BatchOptions(model=model)


def test_a_blank_question_is_refused_before_the_cache_moves(ort_pipeline: Pipeline) -> None:
    """Nothing asked: it was answered as if a question had been (the CLI refused it already)."""
    image = _images()[0]
    for blank in ("", "  ", "\n"):
        with pytest.raises(PromptError, match=r"^the question is blank; ask something"):
            ort_pipeline.generate(image, blank, max_new_tokens=2)
    chat = ort_pipeline.chat()
    chat.ask("What is the rhythm?", image, max_new_tokens=2)
    with pytest.raises(PromptError, match="the question is blank"):
        chat.ask(" ", max_new_tokens=2)
    assert chat.ask("And the rate?", max_new_tokens=2).generated_tokens == 2  # the chat goes on


def test_the_decoder_engine_refuses_positions_past_its_cache(tiny_bundle: Path) -> None:
    """Below the prompt's and the decode loop's own limits, the engine keeps its cache from overrunning."""
    import numpy as np

    from pulse_edge.runtime.engines.ort import SessionConfig, decoder_engine

    manifest = read_manifest(tiny_bundle)
    engine = decoder_engine(tiny_bundle, manifest.graphs["decoder"], manifest.kv, manifest.text.vocab_size,
                            SessionConfig(prepack=False))
    hidden = manifest.text.hidden_size
    engine.forward(np.zeros((1, 3, hidden), dtype=np.float32))
    room = manifest.kv.max_length - 3
    with pytest.raises(ValueError, match=f"^{room + 1} positions do not fit: {room} left of"):
        engine.forward(np.zeros((1, room + 1, hidden), dtype=np.float32))
    assert engine.length == 3  # refused before anything moved


def test_merged_features_of_another_length_than_counted_are_refused(ort_pipeline: Pipeline,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt reserved the counted positions: features one short would shift every position after them."""
    from pulse_edge.runtime.image.preprocess import preprocess

    engine = ort_pipeline.engine
    real = engine.merge

    class OneShort:
        layout = real.layout

        def __call__(self, features, size):
            return real(features, size)[:-1]

    monkeypatch.setattr(engine, "merge", OneShort())
    with pytest.raises(RuntimeError, match="merge produced 2879 image tokens, preprocessing counted 2880"):
        engine.image_features(preprocess(_images()[0], ort_pipeline.manifest.image))


def test_an_image_handed_over_in_memory_meets_a_files_limits(ort_pipeline: Pipeline) -> None:
    """generate() takes a PIL image: the same size limits and transparency rule as a decoded file."""
    from pulse_edge.errors import InputError

    with pytest.raises(InputError, match="too small"):
        ort_pipeline.generate(Image.new("RGB", (8, 8)), "Rate?", max_new_tokens=1)
    # black ink whose opacity is the print's darkness: composited on white it is the print in grey; read as RGB
    # without compositing, a black page
    ink = _images()[0].convert("L")
    transparent = Image.new("RGBA", ink.size, "black")
    transparent.putalpha(Image.eval(ink, lambda v: 255 - v))

    def tokens(image: Image.Image) -> list[int]:
        return ort_pipeline.generate(image, "Rate?", max_new_tokens=3).token_ids

    assert tokens(transparent) == tokens(_flatten(transparent))
    with pytest.raises(InputError, match="holds no ECG trace"):  # alpha dropped: a black page, refused as blank
        tokens(transparent.convert("RGB"))


def _flatten(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, "white")
    return Image.alpha_composite(white, image).convert("RGB")


def test_chunked_prefill_gives_the_same_answer(tiny_bundle: Path, ort_pipeline: Pipeline) -> None:
    image = _images()[1]
    assert ort_pipeline.engine.prefill_chunk == 512  # the default: ~3000-position prompts run in 6 chunks
    one_pass = Pipeline.from_bundle(tiny_bundle, prefill_chunk=None)
    assert (one_pass.generate(image, "Rate?", max_new_tokens=12).token_ids
            == ort_pipeline.generate(image, "Rate?", max_new_tokens=12).token_ids)


def test_decoder_sessions_plan_no_memory_pattern_and_vision_does(ort_pipeline: Pipeline) -> None:
    """The decoder's input shapes change every run (runtime/engines/ort.py session_settings)."""
    engine = ort_pipeline.engine
    assert engine.vision.session.get_session_options().enable_mem_pattern
    assert not engine.decoder.session.get_session_options().enable_mem_pattern


def test_fp16_bundle_validates_and_runs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bundle = export_bundle(tiny_checkpoint, tmp_path / "fp16", ExportOptions(precision="fp16"))
    manifest = read_manifest(bundle)
    assert manifest.kv.dtype == "float16" and manifest.validation["pass"] is True
    from pulse_edge.runtime.bundle.verified import is_stamped

    assert is_stamped(bundle, manifest.files)  # export hashed it: the first load need not again
    result = Pipeline.from_bundle(bundle).generate(_images()[0], "Rate?", max_new_tokens=5)
    assert result.generated_tokens == 5


def _edit_manifest(bundle: Path, **changes: object) -> None:
    edit_manifest(bundle, lambda data: data.update(changes))


def _cli_error(bundle: Path, image: Path, *extra: str) -> str:
    res = CliRunner().invoke(main, ["infer", str(image), "--model", str(bundle), "--max-new-tokens", "2", *extra])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("pulse-edge: error:") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def test_bundle_from_another_version_is_refused(tiny_bundle: Path, tmp_path: Path, ecg_png: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    _edit_manifest(bundle, version=99)
    assert "manifest version 99 is not supported" in _cli_error(bundle, ecg_png)


def test_missing_and_truncated_graph_files_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = shutil.copytree(tiny_bundle, tmp_path / "missing")
    (missing / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx named in manifest\.json is missing"):
        read_manifest(missing)
    truncated = shutil.copytree(tiny_bundle, tmp_path / "truncated")
    data = truncated / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data is 1000 bytes but the manifest says \d+: the file is "
                                          "truncated"):
        read_manifest(truncated)


def test_short_context_refuses_long_prompts_and_big_images(tiny_checkpoint: Path, tmp_path: Path,
                                                            ecg_png: Path) -> None:
    bundle = export_bundle(tiny_checkpoint, tmp_path / "short", ExportOptions(max_context=2048))
    assert "the image needs 2880 tokens but the context holds 2048" in _cli_error(bundle, ecg_png)
    small = tmp_path / "small.png"
    page((336, 336)).save(small)  # 1 tile + base = 1152 image tokens: fits
    assert "the prompt takes" in _cli_error(bundle, small, "--question", "Describe every lead. " * 300)


def test_absent_provider_is_an_error_not_a_fallback(tiny_bundle: Path, ecg_png: Path) -> None:
    err = _cli_error(tiny_bundle, ecg_png, "--provider", "cuda")
    assert "provider 'cuda'" in err and "not available" in err


def test_a_session_that_fell_back_to_another_provider_is_refused(tmp_path: Path) -> None:
    """onnxruntime-gpu lists CUDA and TensorRT as available wherever it is installed; one that then fails to
    start (no libnvinfer) leaves the session on the next one, CPU at the end, said only in a hidden log line."""
    from types import SimpleNamespace

    from pulse_edge.runtime.engines.sessions import SessionConfig, check_session_provider

    fell_back = SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match=r"decoder.onnx: onnxruntime could not start TensorrtExecutionProvider "
                       r"\(the session fell back to CUDAExecutionProvider, CPUExecutionProvider\).*--provider cuda"):
        check_session_provider(fell_back, SessionConfig(provider="tensorrt"), tmp_path / "decoder.onnx")
    on_cpu = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    check_session_provider(on_cpu, SessionConfig(provider="cpu"), tmp_path / "decoder.onnx")  # as asked
    with pytest.raises(ConfigError, match="could not start CUDAExecutionProvider"):
        check_session_provider(on_cpu, SessionConfig(provider="cuda"), tmp_path / "decoder.onnx")


def test_failed_export_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.build.bundle as bundle_module

    def broken(*args: object, **kwargs: object) -> None:
        raise ConfigError("simulated failure halfway through the decoder")

    monkeypatch.setattr(bundle_module, "build_decoder", broken)
    with pytest.raises(ConfigError):
        export_bundle(tiny_checkpoint, tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_infer_json_from_a_bundle_matches_the_checkpoint(tiny_bundle: Path, tiny_checkpoint: Path,
                                                         ecg_png: Path) -> None:
    runner = CliRunner()
    args = ["infer", str(ecg_png), "--json", "--max-new-tokens", "8", "--model"]
    ort = json.loads(runner.invoke(main, [*args, str(tiny_bundle)]).stdout)
    ref = json.loads(runner.invoke(main, [*args, str(tiny_checkpoint)]).stdout)
    assert ort["backend"] == "ort" and ref["backend"] == "torch"
    assert ort["token_ids"] == ref["token_ids"] and ort["image_tokens"] == 2880


def test_context_too_small_for_any_image_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--max-context must be between 1984 \(the smallest image.s tokens and 256"):
        export_bundle(tiny_checkpoint, tmp_path / "tiny-context", ExportOptions(max_context=1000))
    assert list(tmp_path.iterdir()) == []


def test_serving_a_bundle_never_imports_torch(tiny_bundle: Path, ecg_png: Path) -> None:
    """Not just the imports: a whole generation from a bundle runs without torch or transformers."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from pulse_edge.runtime.inputs.images import load_image\n"
            "from pulse_edge.runtime.pipeline import Pipeline\n"
            f"r = Pipeline.from_bundle({str(tiny_bundle)!r}).generate(load_image({str(ecg_png)!r}), 'Rate?', "
            "max_new_tokens=3)\n"
            "print(r.generated_tokens, [m for m in ('torch', 'transformers', 'triton') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["3", "[]\n"]


def test_a_flat_bundle_has_no_image_newline(tiny_bundle: Path, ort_pipeline: Pipeline) -> None:
    """spatial_unpad bundles carry image_newline.npy (tests/test_unpad_bundle.py); PULSE's flat ones do not."""
    manifest = read_manifest(tiny_bundle)
    assert manifest.image_newline is None
    assert "image_newline" not in json.loads((tiny_bundle / "manifest.json").read_text())
    assert not (tiny_bundle / "image_newline.npy").exists()
    assert ort_pipeline.engine.merge.layout.merge == "flat" and ort_pipeline.engine.merge.image_newline is None


def test_a_wrong_decoder_graph_fails_validation_and_writes_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the graph for real (rotary tables of the wrong base): validation must catch it."""
    import numpy as np

    import pulse_edge.export.graphs.decoder as decoder_module
    from pulse_edge.export.build.bundle import ExportValidationError

    original = decoder_module._rotary_tables

    def wrong_rotary(lm: object, shape: object) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = original(lm, shape)
        return cos, np.roll(sin, 1, axis=-1)

    monkeypatch.setattr(decoder_module, "_rotary_tables", wrong_rotary)
    expected = r"disagree with the torch reference.*decoder after a 5-position prefill: rel err"
    with pytest.raises(ExportValidationError, match=expected) as info:
        export_bundle(tiny_checkpoint, tmp_path / "wrong")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_backend_that_does_not_match_the_model_is_one_line(tiny_bundle: Path, tiny_checkpoint: Path,
                                                             ecg_png: Path) -> None:
    assert "the torch backend serves checkpoints" in _cli_error(tiny_bundle, ecg_png, "--backend", "torch")
    assert "is not a pulse-edge bundle" in _cli_error(tiny_checkpoint, ecg_png, "--backend", "ort")


def test_export_that_cannot_be_validated_here_is_refused_up_front(tiny_checkpoint: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The 7B case on a 24 GiB machine, scaled down: refuse before writing anything, with the reason."""
    import pulse_edge.export.build.memory as memory_module

    monkeypatch.setattr(memory_module, "mem_available_bytes", lambda: 1_000_000)  # 1 MB free
    with pytest.raises(ConfigError, match=r"needs ~0.0 GiB of memory \(weights 0.0, KV cache 0.0 for \d+ "
                                          r"positions\) but 0.0 GiB is available; export with a smaller"):
        export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(precision="fp16"))
    # a CPU recipe with a prefill graph: its parity stage is the peak, so dropping that graph is what helps
    with pytest.raises(ConfigError, match=r"export without the prefill graph \(--no-prefill-graph\), or on a"):
        export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions.for_precision("int8"))
    assert list(tmp_path.iterdir()) == []


def test_fp32_attention_is_refused_on_cuda_before_any_session(tiny_bundle: Path) -> None:
    """ORT's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 bundle there would run attention on the CPU
    with the cache copied every layer. check_device says so without needing a GPU; fp16 bundles pass."""
    import dataclasses

    from pulse_edge.runtime.engines.ort import SessionConfig, check_device

    manifest = read_manifest(tiny_bundle)
    for provider in ("cuda", "tensorrt"):
        with pytest.raises(ConfigError, match=r"computes attention in fp32.* --precision fp16 for a GPU$"):
            check_device(manifest, SessionConfig(provider=provider))
    check_device(manifest, SessionConfig(provider="cpu"))
    check_device(dataclasses.replace(manifest, kv=dataclasses.replace(manifest.kv, dtype="float16")),
                 SessionConfig(provider="cuda"))
    fp8 = dataclasses.replace(manifest, precision="fp8")  # the ORT fp8 recipe's fp32 base: the GPU path is TensorRT
    with pytest.raises(ConfigError, match=r"keeps an fp32 base; for a GPU export it with --target tensorrt"):
        check_device(fp8, SessionConfig(provider="tensorrt"))


def test_tensorrt_falls_back_to_cuda_not_cpu_and_caches_engines(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.runtime.engines.ort import SessionConfig, graph_cache_key, provider_chain

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    chain = provider_chain(SessionConfig(provider="tensorrt", device_id=1), fp16=True)
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt = chain[0][1]
    assert trt["trt_fp16_enable"] is True and trt["device_id"] == 1 and chain[1][1] == {"device_id": 1}
    assert trt["trt_engine_cache_path"] == str(tmp_path / "pulse-edge" / "tensorrt")
    mine = provider_chain(SessionConfig(provider="tensorrt", provider_options={"trt_fp16_enable": False}), fp16=True)
    assert mine[0][1]["trt_fp16_enable"] is False  # the caller's options win
    assert provider_chain(SessionConfig(provider="cpu"), fp16=False) == ["CPUExecutionProvider"]
    for given in ({"provider_options": {"trt_fp16_enable": False}}, {"device_id": 1}):  # read by no CPU session
        with pytest.raises(ConfigError, match="the cpu provider takes neither"):
            SessionConfig(provider="cpu", **given)
    # ORT keys cached engines by graph structure: a re-exported bundle (same names, new weights) gets a new folder
    graph = tmp_path / "b" / "decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph")
    graph.with_name("decoder.onnx.data").write_bytes(b"weights")
    first = graph_cache_key(graph)
    assert graph_cache_key(graph) == first
    graph.with_name("decoder.onnx.data").write_bytes(b"other weights")
    assert graph_cache_key(graph) != first


def test_prefetch_reads_the_whole_file_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding table is read through once at load (a cold row costs a disk read inside the decode loop);
    a file that cannot be read is no error: the lookups fault the rows in themselves."""
    import builtins

    from pulse_edge.runtime.engines.bundle_engine import prefetch

    table = tmp_path / "embed_tokens.npy"
    table.write_bytes(bytes(range(256)) * 100_000)  # 25.6 MB: several 8 MiB reads
    read = []
    real_open = builtins.open

    class Counting:
        def __init__(self, f: object) -> None:
            self.f = f

        def readinto(self, buffer: bytearray) -> int:
            n = self.f.readinto(buffer)
            read.append(n)
            return n

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Counting(real_open(*a, **k)))
    thread = prefetch(table)
    thread.join(timeout=30)
    assert not thread.is_alive() and thread.daemon
    assert sum(read) == table.stat().st_size and read[-1] == 0
    prefetch(tmp_path / "missing.npy").join(timeout=30)  # no exception escapes the thread


def test_a_bf16_reference_is_judged_as_an_oracle_with_its_own_error(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint too big for fp32 here is validated against its bf16 weights: the decoder checks use the
    bf16-reference bound, the vision graph still the bundle's own (its reference is an fp32 copy)."""
    import torch

    import pulse_edge.export.build.bundle as bundle_module
    from pulse_edge.export.validate.tolerances import TOLERANCES

    monkeypatch.setattr(bundle_module, "reference_dtype", lambda _checkpoint: torch.bfloat16)
    out = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(precision="fp32"))
    validation = read_manifest(out).validation
    assert validation["pass"] and validation["reference_dtype"] == "bfloat16"
    assert validation["tolerance_level"] == "bf16_reference"
    assert validation["decoder"]["tolerance"]["max_rel_err"] == TOLERANCES["bf16_reference"].max_rel_err
    assert validation["vision"]["tolerance"]["max_rel_err"] == TOLERANCES["fp32"].max_rel_err


def test_a_prefill_graph_needs_room_for_its_packed_weights_only_when_prepacked() -> None:
    from pulse_edge.runtime.engines.memory import choose_prefill_graph

    gib = 1 << 30
    assert not choose_prefill_graph("auto", 8 * gib, prepacked=True, available=15 * gib).load  # 14.8 + 1 > 15
    assert choose_prefill_graph("auto", 8 * gib, prepacked=True, available=16 * gib).load
    assert choose_prefill_graph("auto", 8 * gib, prepacked=False, available=9 * gib).load  # weights stay mapped
    assert choose_prefill_graph("auto", 8 * gib, prepacked=True, available=None).load  # no /proc/meminfo: no check


def test_the_prefill_chunk_is_the_runtimes_choice_unless_asked(tiny_bundle: Path) -> None:
    """AUTO_CHUNK: 512 on a bundle without a prefill graph (measured with the int8 graph in tests/cli/
    test_kv_cache_cli.py); an explicit chunk or one pass is kept; anything else is one line."""
    from pulse_edge.runtime.engines.bundle_engine import AUTO_CHUNK, DEFAULT_PREFILL_CHUNK, resolve_chunk

    assert Pipeline.from_bundle(tiny_bundle).engine.prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert Pipeline.from_bundle(tiny_bundle, prefill_chunk=None).engine.prefill_chunk is None
    assert resolve_chunk(AUTO_CHUNK, prefill_graph=True) > resolve_chunk(AUTO_CHUNK, prefill_graph=False)
    assert resolve_chunk(300, prefill_graph=True) == 300
    for bad in (0, "big", True):
        with pytest.raises(ConfigError, match="prefill chunk must be >= 1 token"):
            Pipeline.from_bundle(tiny_bundle, prefill_chunk=bad)


def _failing(error: Exception):
    def run(*_args: object, **_kwargs: object) -> None:
        raise error
    return run


# the method that fails, the exception type it raises in onnxruntime 1.32 (`run`: ORT's own; `run_with_iobinding`,
# every decoder call: a builtin RuntimeError; test_onnxruntimes_own_failures_are_translated_from_both_run_methods
# shows both on a real graph), its text, the exit code and the one line after "error: "
MID_RUN_FAILURES = {
    "a kernel failed": ("run", "Fail", "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
                        "Add node.\nStacktrace: ...", 3,
                        "onnxruntime failed running vision.onnx ([ONNXRuntimeError] : 1 : FAIL : Non-zero status code "
                        "returned while running Add node.); the bundle passed its load checks, so this is a fault in "
                        "pulse-edge or onnxruntime: please report it with the output of `pulse-edge --version` and the "
                        "bundle's manifest.json"),
    "out of memory": ("run_with_iobinding", "RuntimeError",
                      "Error in execution: Non-zero status code returned while running MatMul node. Name:'m' Status "
                      "Message: bfc_arena.cc:360 Failed to allocate memory for requested buffer of size 4096\n", 2,
                      "onnxruntime could not allocate memory running decoder.onnx (Non-zero status code returned while "
                      "running MatMul node. Name:'m' Status Message: bfc_arena.cc:360 Failed to allocate memory for "
                      "requested buffer of size 4096): free memory (close other programs) or use a smaller bundle or "
                      "fewer --threads, and run the command again"),
}


@pytest.mark.parametrize("case", sorted(MID_RUN_FAILURES))
def test_onnxruntime_failing_mid_run_is_one_line_with_its_own_exit_code(case: str, tiny_bundle: Path, ecg_png: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's own exception types raised while a graph runs: out of memory is the machine's state (exit 2, what to
    free); anything else is a fault of ours or ORT's (exit 3, what to report); no tokens, no traceback."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    method, kind, text, code, line = MID_RUN_FAILURES[case]
    error = RuntimeError(text) if kind == "RuntimeError" else getattr(ort_state, kind)(text)
    monkeypatch.setattr(onnxruntime.InferenceSession, method, _failing(error))
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tiny_bundle), "--max-new-tokens", "2"])
    assert (res.exit_code, res.stdout) == (code, ""), res.output
    assert res.stderr.splitlines() == [f"pulse-edge: error: {line}"]


def test_an_engine_fault_stops_a_batch_and_records_nothing_for_its_input(tiny_bundle: Path, ecg_png: Path,
                                                                         tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlike one input's bad file or non-finite logits, the next input would meet the same fault: exit 3 at the first,
    and no error line that would mark it done (a rerun retries it)."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", _failing(ort_state.Fail("FAIL : a kernel failed")))
    out = tmp_path / "answers.jsonl"
    res = CliRunner().invoke(main, ["infer", str(ecg_png), str(ecg_png), "--model", str(tiny_bundle),
                                    "--max-new-tokens", "2", "--output", str(out)])
    assert res.exit_code == 3, res.output
    assert [line for line in res.stderr.splitlines() if line.startswith("pulse-edge: error:")] == [
        "pulse-edge: error: onnxruntime failed running vision.onnx (FAIL : a kernel failed); the bundle passed its "
        "load checks, so this is a fault in pulse-edge or onnxruntime: please report it with the output of "
        "`pulse-edge --version` and the bundle's manifest.json"]
    assert not out.exists() or out.read_text() == ""


@pytest.mark.parametrize(("provider", "text", "gpus"), [
    ("cpu", "CUDA failure 2: out of memory ; GPU=0", False),
    ("cuda", "CUDA failure 2: out of memory ; GPU=0", True),
    ("cuda", "Failed to allocate memory for requested buffer of size 4096", True),  # the CUDA arena's
    ("cuda", "std::bad_alloc", False),  # C++'s new: the host's memory, whatever the provider
])
def test_out_of_memory_mid_run_is_the_hosts_or_the_gpus(provider: str, text: str, gpus: bool) -> None:
    from pulse_edge.errors import DeviceMemoryError
    from pulse_edge.runtime.engines.sessions import ort_run_errors

    with pytest.raises(MemoryError) as caught, ort_run_errors("decoder.onnx", provider):
        raise RuntimeError(f"Error in execution: {text}")
    assert (type(caught.value) is DeviceMemoryError) == gpus
    assert ("the GPU's memory is full" in str(caught.value)) == gpus


@pytest.mark.parametrize("method", ["run", "run_with_iobinding"])
@pytest.mark.parametrize(("values", "size", "raised"), [(1, 1 << 42, MemoryError), (2, 3, "EngineRunError")])
def test_onnxruntimes_own_failures_are_translated_from_both_run_methods(method: str, values: int, size: int,
                                                                        raised: object) -> None:
    """A real graph failing in onnxruntime, not a stand-in exception: Expand of `values` numbers to `size` (16 TiB
    cannot be allocated; 2 numbers do not broadcast to 3), run the way the vision graph (`run`) or the decoder
    (`run_with_iobinding`) runs; both raise other exception types, and both are one line."""
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper

    from pulse_edge.errors import EngineRunError
    from pulse_edge.runtime.engines.sessions import ort_run_errors

    graph = helper.make_graph([helper.make_node("Expand", ["x", "shape"], ["y"])], "expand",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"x": np.zeros(values, np.float32), "shape": np.array([size], np.int64)}
    expected = EngineRunError if raised == "EngineRunError" else MemoryError
    said = r"running g\.onnx \((\[ONNXRuntimeError\] : \d : [A-Z_]+ : )?Non-zero status code returned while running Ex"
    with pytest.raises(expected, match=said) as caught, ort_run_errors("g.onnx"):
        if method == "run":
            session.run(None, feed)
        else:
            binding = session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("y", "cpu")
            session.run_with_iobinding(binding)
    assert type(caught.value) is expected and "\n" not in str(caught.value)


def test_an_error_that_is_not_onnxruntimes_passes_through_as_it_is(tiny_bundle: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    pipeline = Pipeline.from_bundle(tiny_bundle)
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", _failing(ValueError("ours")))
    with pytest.raises(ValueError, match=r"^ours$"):
        pipeline.generate(_images()[0], "Rate?", max_new_tokens=2)


def test_a_closed_pipeline_drops_its_sessions_and_refuses_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    """A cart switching bundles frees the first one's memory; answering with a closed pipeline is one line, not a
    crash on freed buffers."""
    import gc
    import weakref

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))  # its own table file: no other test maps it
    released: list[int] = []
    with Pipeline.from_bundle(bundle) as pipeline:
        assert pipeline.generate(_images()[0], "Rate?", max_new_tokens=2).token_ids
        session = weakref.ref(pipeline.engine.vision.session)
        pipeline.engine.release = lambda: released.append(1)  # what a TensorRT engine frees its GPU memory with
    gc.collect()
    assert session() is None  # ONNX Runtime's session (and its memory) is gone, not only hidden
    for use in (lambda: pipeline.generate(_images()[0], "Rate?", max_new_tokens=2), lambda: pipeline.chat().ask("x"),
                lambda: pipeline.prefilled_by, lambda: pipeline.decoded_by):  # the reports, too, say nothing stale
        with pytest.raises(ConfigError, match=r"^this pipeline was closed \(Pipeline\.close\); load the bundle again"):
            use()
    pipeline.close()  # a second close does nothing
    assert released == [1]
    gc.collect()
    table = bundle / read_manifest(bundle).embedding.file
    assert str(table.resolve()) not in Path("/proc/self/maps").read_text()  # the table's map went too


def test_close_from_another_thread_or_from_on_text_never_hangs_and_is_one_line(tiny_bundle: Path) -> None:
    """close() waited for the running answer while that answer's on_text waited for the closing thread (a UI
    thread): a hang. Closed from inside on_text, the next step indexed an emptied table (a raw IndexError)."""
    import threading

    from pulse_edge.runtime.generation.sampling import SamplingParams

    sampling = SamplingParams(temperature=1.0, seed=3)  # no early EOS: the answer runs until it is stopped
    pipeline = Pipeline.from_bundle(tiny_bundle)
    closed = threading.Event()

    def wait_for_the_close(_: str) -> None:  # as a UI's on_text that hands each piece to the closing thread
        threading.Thread(target=lambda: (pipeline.close(), closed.set())).start()
        assert closed.wait(10), "close() waited for the answer whose on_text waits for it"

    with pytest.raises(ConfigError, match=r"^this pipeline was closed"):
        pipeline.generate(_images()[0], "Rate?", max_new_tokens=200, sampling=sampling, on_text=wait_for_the_close)
    assert pipeline.engine.closed  # released as the question ended
    again = Pipeline.from_bundle(tiny_bundle)
    with pytest.raises(ConfigError, match=r"^this pipeline was closed"):
        again.generate(_images()[0], "Rate?", max_new_tokens=200, sampling=sampling, on_text=lambda _: again.close())


def test_two_threads_on_one_pipeline_get_each_its_own_answer(tiny_bundle: Path) -> None:
    """One cache: a second thread's conversation reset it under the first's running answer, and both answered
    partly from the other's ECG, with no error. A question now holds the engine; the other waits."""
    from concurrent.futures import ThreadPoolExecutor

    from pulse_edge.runtime.generation.sampling import SamplingParams

    pipeline = Pipeline.from_bundle(tiny_bundle)
    images = _images()

    def answer(i: int) -> list[int]:  # sampled, seeded: the random model's greedy answers are alike
        sampling = SamplingParams(temperature=1.0, seed=i % 2)
        return pipeline.generate(images[i % 2], "Rate?", max_new_tokens=24, sampling=sampling).token_ids

    alone = [answer(0), answer(1)]
    assert alone[0] != alone[1]

    with ThreadPoolExecutor(4) as pool:  # 3 or more threads found the gap between generate's reset and its ask
        together = list(pool.map(answer, range(12)))
    assert together == [alone[i % 2] for i in range(12)]


def test_torch_settings_given_with_a_bundle_are_refused_not_ignored(tiny_bundle: Path, ecg_png: Path) -> None:
    """--dtype fp32 --device cuda:3 with a bundle used to run the bundle's own precision on the CPU, silently."""
    from pulse_edge.backends import open_backend

    for given, named in (({"dtype": "fp32"}, "--dtype"), ({"device": "cuda:3"}, "--device"),
                         ({"vision_tower": "/towers/clip"}, "--vision-tower")):
        with pytest.raises(ConfigError, match=rf"^{named}: settings of the torch backend \(a checkpoint\); a bundle"):
            open_backend(tiny_bundle, **given)
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tiny_bundle), "--dtype", "bf16"])
    assert res.exit_code == 2 and "--dtype: settings of the torch backend" in res.output


def test_reading_options_given_with_an_input_already_read_are_refused(tiny_bundle: Path, ecg_png: Path) -> None:
    """Pipeline.interpret(EcgInput, fs=...) used to drop them: the input was read already, with its own."""
    from pulse_edge.errors import InputError
    from pulse_edge.runtime.inputs import load_input

    pipeline = Pipeline.from_bundle(tiny_bundle)
    ecg = load_input(ecg_png)
    with pytest.raises(InputError, match=r"^fs, leads: how to read an input, but this one was read already"):
        pipeline.interpret(ecg, fs=500.0, leads=("I", "II"), max_new_tokens=1)
    assert pipeline.interpret(ecg, max_new_tokens=1).source == str(ecg_png)


def test_prefill_graph_on_for_a_bundle_without_one_is_refused(tiny_bundle: Path, ecg_png: Path,
                                                               tmp_path: Path) -> None:
    from pulse_edge.runtime.engines.ort import SessionConfig

    with pytest.raises(ConfigError, match=r"^--prefill-graph on: this bundle has no prefill graph"):
        Pipeline.from_bundle(tiny_bundle, session=SessionConfig(prefill_graph="on"))
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tiny_bundle), "--json", "--output",
                                    str(tmp_path / "answers.jsonl")])
    assert res.exit_code == 2 and "--json prints one answer as JSON; with --output" in res.output, res.output
    assert not (tmp_path / "answers.jsonl").exists()


def test_sampling_options_with_greedy_decoding_are_noted(tiny_bundle: Path, ecg_png: Path) -> None:
    """--top-p and --seed shape sampling only: with --temperature 0 (the default) the CLI says they are not used;
    with sampling, or not given, it says nothing."""
    base = ["infer", str(ecg_png), "--model", str(tiny_bundle), "--max-new-tokens", "1"]
    note = "pulse-edge: note: --top-p, --seed shape sampling (--temperature > 0); with --temperature 0 the answer"
    runs = {(): False, ("--top-p", "0.5", "--seed", "7"): True,
            ("--top-p", "0.5", "--seed", "7", "--temperature", "0.7"): False}
    for extra, noted in runs.items():
        res = CliRunner().invoke(main, [*base, *extra])
        assert res.exit_code == 0, res.output
        assert (note in res.stderr) is noted, res.stderr


def test_a_stop_asked_during_the_prefill_ends_it_at_the_next_chunk(tiny_bundle: Path) -> None:
    """A 7B prompt on a CPU takes tens of seconds: a server's cancelled request (client gone, deadline, shutdown)
    held the model until its first token. Now it stops between chunks, and the conversation is closed to
    follow-ups (its cache holds part of the prompt)."""
    from pulse_edge.errors import GenerationStopped

    pipeline = Pipeline.from_bundle(tiny_bundle, prefill_chunk=64)
    asked: list[int] = []
    chat = pipeline.chat()
    with pytest.raises(GenerationStopped, match="stopped after 64 of the prompt's"):  # True at its third asking
        chat.ask("Rate?", _images()[0], should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert asked == [1, 1, 1]  # before the image, before the first chunk, at the first chunk boundary
    with pytest.raises(PromptError, match="stopped partway"):
        chat.ask("And the axis?")
    assert pipeline.chat().ask("Rate?", _images()[0], max_new_tokens=2).generated_tokens == 2  # a new one runs


def test_wrong_argument_types_are_one_line_errors_before_the_cache_moves(tiny_bundle: Path, ecg_png: Path) -> None:
    """Cart code calling the API wrongly got a raw AttributeError or TypeError (and a chat broken for good)."""
    import numpy as np

    from pulse_edge.errors import InputError
    from pulse_edge.runtime.generation.sampling import SamplingParams
    from pulse_edge.runtime.inputs import load_input

    pipeline = Pipeline.from_bundle(tiny_bundle)
    chat = pipeline.chat()
    cases = [(lambda: chat.ask("Rate?", _images()[0], sampling={"temperature": 1}), ConfigError,
              "sampling must be a SamplingParams"),
             (lambda: chat.ask(None, _images()[0]), PromptError, "the question must be text"),
             (lambda: SamplingParams(temperature="1"), ConfigError, "temperature must be a number"),
             (lambda: SamplingParams(temperature=5e-324), ConfigError, "0 \\(greedy\\) or at least"),
             (lambda: load_input(np.zeros((12, 5000)), fs="500"), InputError, "must be a number of Hz"),
             (lambda: load_input("x" * 5000 + ".png"), InputError, "cannot be read as a path"),
             (lambda: Pipeline.from_bundle(tiny_bundle, session={"threads": 2}), ConfigError,
              "session must be a SessionConfig")]
    for call, error, words in cases:
        with pytest.raises(error, match=words) as caught:
            call()
        assert "\n" not in str(caught.value)
    assert chat.ask("Rate?", _images()[0], max_new_tokens=2).generated_tokens == 2  # the chat was not broken
    with pytest.raises(InputError, match="not a PIL image"):  # a path: interpret() and load_input() read files
        pipeline.generate(str(ecg_png), "Rate?")


def test_a_close_asked_while_another_thread_holds_the_engine_is_carried_out_when_it_lets_go(
        tiny_bundle: Path, tmp_path: Path) -> None:
    """A close asked while another thread held the engine for a chat()'s reset (no question after it) set the
    flag and freed nothing, ever: a TensorRT engine's GPU memory stayed."""
    import threading

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    pipeline = Pipeline.from_bundle(bundle)
    holding, closed = threading.Event(), threading.Event()
    under_the_holder: list[bool] = []

    def hold() -> None:
        with pipeline.engine.lock:  # as chat() holds it for its reset
            holding.set()
            closed.wait(10)
            under_the_holder.append(pipeline.engine.closed)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    pipeline.close()  # the lock is taken: close returns at once, the flag raised
    closed.set()
    holder.join(10)
    assert not holder.is_alive() and under_the_holder == [False]  # never freed under the holder
    assert pipeline.engine.closed  # but as it let go


def test_close_can_wait_for_the_running_answer_to_let_the_memory_go(tiny_bundle: Path) -> None:
    """A cart loading its next TensorRT bundle needs the first one's GPU memory back: close(wait=...) waits for
    the answer another thread holds the engine with, or says in one line that it did not end in time."""
    import threading

    pipeline = Pipeline.from_bundle(tiny_bundle)
    holding, go = threading.Event(), threading.Event()

    def hold() -> None:
        with pipeline.engine.lock:
            holding.set()
            go.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    with pytest.raises(ConfigError, match=r"did not end within 0\.05 s"):
        pipeline.close(wait=0.05)
    threading.Timer(0.2, go.set).start()
    pipeline.close(wait=10)  # returns once the holder let go and the memory went
    assert pipeline.engine.released.is_set() and pipeline.engine.closed
    holder.join(10)
    with pytest.raises(ConfigError, match="takes seconds >= 0"):
        pipeline.close(wait=-1)


def test_the_prefills_logits_are_the_callers_after_the_next_step(ort_pipeline: Pipeline) -> None:
    """The decoder reuses its logits buffer on every run: the prefill's row, handed out without a copy, was
    overwritten by the next step under a caller that kept it (to compare or resample)."""
    engine = ort_pipeline.engine
    engine.reset()
    logits = engine.prefill([ort_pipeline.tokenizer.bos_id, 100, 200], None)
    kept = logits.copy()
    engine.step(int(np.argmax(kept)))
    np.testing.assert_array_equal(logits, kept)
    engine.reset()
