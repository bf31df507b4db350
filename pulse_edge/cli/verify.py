"""`pulse-edge verify BUNDLE`: is every file of a bundle the one export wrote?"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
def verify_cmd(bundle: Path) -> None:
    """Check a bundle: its manifest, every file's size and sha256, the embedding table (exit 2 on any damage)."""
    from pulse_edge.cli.progress import HashBar
    from pulse_edge.runtime.bundle.integrity import verify_bundle

    with HashBar() as bar:
        report = verify_bundle(bundle, progress=bar)
    click.echo(f"{bundle}: ok, {report.files} files ({report.bytes / 2**20:.1f} MiB) match their sha256 in "
               "manifest.json")
