"""`pulse-edge verify BUNDLE`: is every file of a bundle the one export wrote?"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
def verify_cmd(bundle: Path) -> None:
    """Check a bundle: its manifest, every file's size and sha256, the embedding table, and the TensorRT engine
    sets inside it (exit 2 on any damage)."""
    from pulse_edge.cli.progress import HashBar
    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.bundle.engines import ENGINES_FILE, read_engines
    from pulse_edge.runtime.bundle.integrity import verify_bundle

    with HashBar() as bar:
        report = verify_bundle(bundle, progress=bar)
        engine_sets = sorted(p.parent for p in bundle.glob(f"engines-*/{ENGINES_FILE}"))
        for directory in sorted(p.parent for p in bundle.glob("engines-*/*.engine")):  # engines, no index: damage
            if directory not in engine_sets:
                raise BundleError(f"{directory} holds TensorRT engines but no {ENGINES_FILE}: the set is incomplete; "
                                  f"re-copy it, or rebuild it with `pulse-edge build-engines {bundle}`")
        for directory in engine_sets:
            read_engines(directory, bundle, verify=True, progress=bar)
    click.echo(f"{bundle}: ok, {report.files} files ({report.bytes / 2**20:.1f} MiB) match their sha256 in "
               "manifest.json" + "".join(f"; {d.name}: its engines match {ENGINES_FILE}" for d in engine_sets))
