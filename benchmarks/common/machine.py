"""What a result was measured on: the machine and the model, for run records and reports."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pulse_edge.runtime.engines.sessions import usable_cpus
from pulse_edge.runtime.kernels.build import cpu_flags

CHECKPOINT_PRECISION = "checkpoint (fp32/bf16/fp16 as run)"
# PULSE-7B's decoder (Vicuna-7B): a model of another shape is a test model whatever its weights.
PULSE_HIDDEN, PULSE_LAYERS = 4096, 32


# The instruction sets the CPU paths choose between (runtime/kernels: AMX tiles or AVX-512; ORT's MLAS: VNNI),
# which a model name alone does not tell ("AMD EPYC" is Zen 4 or Zen 5 on two VMs of the same name).
# avx512bw and avx512vl: the decode-attention kernel's requirement (docs/kernels.md).
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
             "amx_int8", "amx_bf16")
# the libraries whose kernels the CPU benchmarks time (torch and transformers: bench backends' and recipes' rows)
LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "numpy", "torch", "transformers")


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_id": _cpu_id(), "isa": [flag for flag in ISA_FLAGS if flag in cpu_flags()],
            "libraries": _libraries(), "cores": usable_cpus(), "machine_cores": os.cpu_count(), "ram_gib": _ram_gib()}


def machine_text(m: Mapping[str, Any]) -> str:
    """One line for a report's heading: the CPU as the kernels see it, the cores, the RAM and the libraries (a
    record from before these were kept prints what it has)."""
    cpu = m["cpu"] + (f" ({m['cpu_id']})" if m.get("cpu_id") else "")
    isa = f"; ISA {' '.join(m['isa']) or 'none of ' + '/'.join(ISA_FLAGS)}" if "isa" in m else ""
    libraries = "; " + ", ".join(f"{name} {version}" for name, version in m["libraries"].items()) if m.get(
        "libraries") else ""
    ram = f", {m['ram_gib']} GiB RAM" if m.get("ram_gib") is not None else ""
    # the cores this process may use (its affinity), and the machine's where a mask leaves some out
    total = m.get("machine_cores")
    cores = f"{m['cores']} of {total} cores (affinity)" if total and total != m["cores"] else f"{m['cores']} cores"
    return f"{cpu}, {cores}{ram}{isa}{libraries}"


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Name, precision and decoder shape of a checkpoint or bundle directory (what can be read without loading it)."""
    root = Path(model_dir)
    manifest = _read_json(root / "manifest.json")
    config = _read_json(root / "config.json")
    if manifest is not None:
        precision = str(manifest.get("precision") or CHECKPOINT_PRECISION)
        hidden = _dig(manifest, "text", "hidden_size")
        layers = _dig(manifest, "kv", "layers")
    else:
        precision = CHECKPOINT_PRECISION
        text = config.get("text_config", config) if config else {}
        hidden, layers = text.get("hidden_size"), text.get("num_hidden_layers")
    full_shape = None if hidden is None or layers is None else (hidden == PULSE_HIDDEN and layers == PULSE_LAYERS)
    return {"name": root.resolve().name, "path": str(root.resolve()), "precision": precision,
            "hidden_size": hidden, "layers": layers, "full_shape": full_shape}


def accuracy_warning(model: Mapping[str, Any]) -> str:
    """The caveat every report carries about what its accuracy numbers can mean."""
    if model.get("full_shape") is False:
        return (f"TEST MODEL: hidden size {model.get('hidden_size')}, {model.get('layers')} layers is not "
                "PULSE-7B's shape. These results exercise the pipeline only and are MEANINGLESS for accuracy.")
    return ("Accuracy means something only if these are the real PULSE-7B weights: a random-weight model of the "
            "full shape looks the same from here, and its results are meaningless for accuracy.")


def _cpu_id() -> str | None:
    """Linux's "cpu family", "model" and "stepping" of the first CPU: tells CPU generations apart."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first CPU's block ends at its blank line
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    parts = [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model"),
                                                        ("stepping", "stepping")) if key in fields]
    return " ".join(parts) or None


def _libraries() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what Python knows
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _dig(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data
