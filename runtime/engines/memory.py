"""Whether this machine's memory holds a CPU recipe's prefill graph beside its decode graph.

An int8 or int4 CPU bundle carries two decoder graphs over one KV cache (runtime/engines/ort.py): the
weight-only decode graph and a W8A8 prefill graph, a second int8 copy of the decoder layers. With
prepacking, ONNX Runtime holds each graph's weights as anonymous memory of its own; where the two do not
fit, the kernel kills the process in the middle of an answer (as it did to the 7B int8 bundle on a 23.5 GiB
machine while the decoder graphs still planned ORT's memory pattern: see session_settings in
runtime/engines/ort.py). So before the prefill graph's session is made, the runtime compares what it will
take with what the machine has left once the vision and decode graphs are loaded:

    need = prefill weights file x PREFILL_PER_FILE_BYTE + MARGIN_BYTES
    need <= MemAvailable  -> the prefill graph serves inputs of 16 positions or more
    otherwise            -> the decode graph prefills too (slower: MatMulNBits and the quantized-cache attention
                            instead of the int8 GEMM), with one warning line that says so and what to do

Both ways are validated: export checks the decode graph alone and the prefill graph alone at the plan's
prompt lengths (up to 2950 positions in the standard plan; export/build/bundle.py). `prefill_graph` "on"
loads it regardless, "off" never.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# What loading and running the prefill graph adds to the process's peak memory, per byte of its weights
# file, with prepacking. Measured with ORT 1.32 on the full-shape 7B int8 bundle (2 threads, a 3024-position
# print in chunks of 512): peak RSS 19.8 GiB with the prefill graph, 8.4 GiB without (its decode graph
# prefilling) = 11.3 GiB for a 6.2 GiB file, 1.84x: one packed copy at load (1.0x), the rest while the first
# prompts run (docs/performance.md, the full 7B).
PREFILL_PER_FILE_BYTE = 1.85
# Without prepacking the weights stay mapped from the file; what a prompt's chunks still add.
PREFILL_WORKING_BYTES = 1 << 30
# Left to the rest of the machine (the cart's own software, the page cache the mapped table needs).
MARGIN_BYTES = 1 << 30


def mem_available_bytes() -> int | None:
    """Linux's estimate of the memory that can be given to a process without swapping; None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class PrefillGraphChoice:
    """Whether to load the prefill graph, and the one line that says why not (None when it is loaded or was
    turned off on purpose)."""

    load: bool
    warning: str | None = None


def prefill_graph_need(weights_file_bytes: int) -> int:
    return int(weights_file_bytes * PREFILL_PER_FILE_BYTE) + MARGIN_BYTES


def choose_prefill_graph(mode: str, weights_file_bytes: int, *, prepacked: bool, available: int | None,
                         u8_copies: bool = False) -> PrefillGraphChoice:
    """mode "auto" | "on" | "off" (pulse_edge.choices.PREFILL_GRAPH_MODES). Without prepacking the weights stay
    mapped from the file (pages the kernel can drop), so only the working memory must fit; unless `u8_copies`
    (an x86 CPU without VNNI: ORT rewrites every int8 weight of the graph into a u8 copy of its own,
    runtime/engines/sessions.py U8U8_ENTRY), which adds one byte per weight byte (128 MiB of int8 weights: +130
    MiB anonymous, export/build/memory.py U8_COPY_BYTES_PER_PARAM)."""
    if mode == "off":
        return PrefillGraphChoice(load=False)
    copies = weights_file_bytes if u8_copies else 0
    need = prefill_graph_need(weights_file_bytes) if prepacked else copies + PREFILL_WORKING_BYTES + MARGIN_BYTES
    if mode == "on" or available is None or need <= available:
        return PrefillGraphChoice(load=True)
    return PrefillGraphChoice(load=False, warning=(
        f"the prefill graph needs ~{need / 2**30:.1f} GiB more memory but {available / 2**30:.1f} GiB is "
        "available: long prompts run on the decode graph (a slower first token; both graphs are validated); "
        "free memory, or pass --prefill-graph on to load it anyway (--prefill-graph off: never load it, no warning)"))
