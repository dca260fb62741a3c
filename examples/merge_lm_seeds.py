"""Merge single-seed ``sae-adaptive compare --lm`` runs into one ``results.json`` of several
seeds, as ``--seeds N`` writes it (rows as mean ± std, the per-seed paired differences, every
run), and print both tables. For seeds run as separate processes (one per core or machine).

Usage: ``python examples/merge_lm_seeds.py OUT.json runs/lm_1m/seed0 runs/lm_1m/seed1 …``
(each folder holds one run's ``results.json``; OUT.json must not exist).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_adaptive_plugin.experiments.lm_report import (
    RESULTS_FILENAME,
    markdown_table,
    paired_table,
    seeds_payload,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="merged results.json to write (must not exist)")
    parser.add_argument("runs", type=Path, nargs="+", help="folders of single-seed runs")
    args = parser.parse_args()
    if args.out.exists():
        print(f"error: {args.out} exists; choose another path", file=sys.stderr)
        return 2
    runs, configs = [], []
    for folder in args.runs:
        payload = json.loads((folder / RESULTS_FILENAME).read_text())
        if "per_seed" in payload:
            print(f"error: {folder} already holds several seeds", file=sys.stderr)
            return 2
        config = dict(payload["config"])
        runs.append(
            {"seed": config.pop("seed"), "info": payload["info"], "results": payload["results"]}
        )
        configs.append(config)
    if any(config != configs[0] for config in configs):
        print("error: the runs' configs differ in more than the seed", file=sys.stderr)
        return 2
    if len({run["seed"] for run in runs}) != len(runs):
        print("error: two runs have the same seed", file=sys.stderr)
        return 2
    merged = seeds_payload(configs[0], runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(markdown_table(merged["results"]))
    print()
    print(paired_table(merged["paired_differences"]))
    print(f"\nwrote {args.out} (seeds {merged['seeds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
