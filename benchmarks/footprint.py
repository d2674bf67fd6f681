"""Deployment memory, adapter runtime vs white-box open_clip: the ``craft-adapter footprint`` measurement as a script.

    .venv/bin/python benchmarks/footprint.py [--out benchmarks/results/footprint.json]

Architectures: the reference vendor, RN50 and ViT-B-16 (random init, same memory); 10 and 1000 classes. Every
figure comes from a fresh process; see ``craft_adapter/footprint.py`` for what each one means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from craft_adapter.reference.footprint import footprint_json, footprint_table, run_footprint


def main() -> None:
    """Measure, print the table and the ratios, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "footprint.json")
    args = parser.parse_args()
    console = Console()
    with console.status("measuring 8 deployments, each in a fresh process"):
        rows = run_footprint()
    console.print(footprint_table(rows))
    for r in rows:
        q = r.ratios()
        console.print(f"{r.arch} at {r.n_classes} classes: params 1/{q['param_bytes']:,.0f}, model memory "
                      f"1/{q['model_rss']:,.0f} (cold 1/{q['model_rss_cold']:,.0f}), whole process "
                      f"1/{q['process_rss']:,.1f} (paper: about 1/80)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(footprint_json(rows), indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
