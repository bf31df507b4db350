"""`pulse-edge serve` with a gate on every decode step, for tests that need a generation held mid-flight.

    python tests/pulse_testing/gated_serve.py GATE_FILE serve --model BUNDLE ...

While GATE_FILE exists, each decode step waits; so a test can hold the model busy for as long as it needs
(a full queue, a client leaving mid-answer) without guessing at timings. The hook lives here, in the tests,
and nowhere in the installed package.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> None:
    from pulse_edge.cli.main import main as cli
    from pulse_edge.runtime.engines.bundle_engine import BundleEngine

    gate = Path(sys.argv[1])
    step = BundleEngine.step

    def gated_step(self: BundleEngine, token: int):  # type: ignore[no-untyped-def]
        while gate.exists():
            time.sleep(0.005)
        return step(self, token)

    BundleEngine.step = gated_step  # type: ignore[method-assign]
    cli(sys.argv[2:], prog_name="pulse-edge")


if __name__ == "__main__":
    main()
