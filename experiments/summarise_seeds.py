"""Summarise a multi-seed ablation: the mean over seeds, with its spread, of each row of ``comparison.csv``.

    python experiments/summarise_seeds.py OUT [--csv FILE] [--eval FOLDER]

OUT holds ``seed*/eval/comparison.csv`` files written by ``pelmark eval`` (see
``experiments/finetune_ablation.sh``); each compares the seed's runs with that
seed's own baseline, paired image by image. For every split and row this prints
the seeds' mean RMSE (model px) with its standard deviation, the mean paired
difference against the baseline with its standard deviation, the mean relative
change, and in how many seeds the paired 95 % interval excludes zero (and in
which direction).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean, stdev


def read_rows(out: Path, eval_dir: str = "eval") -> dict[tuple[str, str], list[dict[str, str]]]:
    """Rows per (split, model) over the seeds; each seed's baseline appears once per split as ``<name> (baseline)``."""
    rows: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    files = sorted(out.glob(f"seed*/{eval_dir}/comparison.csv"))
    if not files:
        raise SystemExit(f"error: {out}: no seed*/{eval_dir}/comparison.csv files")
    for path in files:
        with open(path, newline="") as handle:
            seed_rows = list(csv.DictReader(handle))
        # Every row is compared with the first run (the baseline); a +reg row also with its own run, shown as "vs".
        first = Counter(row["baseline"] for row in seed_rows).most_common(1)[0][0]
        baselines = {}
        for row in seed_rows:
            if row["baseline"] == first:
                rows[row["split"], row["model"]].append(row)
                baselines[row["split"], first + " (baseline)"] = {"Mean": row["baseline_Mean"]}
            else:
                rows[row["split"], f"{row['model']} vs {row['baseline']}"].append(row)
        for key, row in baselines.items():
            rows[key].append(row)
    return rows


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    values = []
    for row in rows:
        try:
            value = float(row.get(key, ""))
        except ValueError:
            continue
        if math.isfinite(value):
            values.append(value)
    return values


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = stdev(values) if len(values) > 1 else float("nan")
    return f"{mean(values):.2f} ± {spread:.2f}"


def summarise(out: Path, eval_dir: str = "eval") -> list[dict[str, str]]:
    table = []
    for (split, model), rows in read_rows(out, eval_dir).items():
        below = sum(1 for r in rows if _floats([r], "hi") and float(r["hi"]) < 0)
        above = sum(1 for r in rows if _floats([r], "lo") and float(r["lo"]) > 0)
        table.append({
            "split": split,
            "model": model,
            "seeds": str(len(_floats(rows, "Mean"))),
            "rmse_px": _mean_sd(_floats(rows, "Mean")),
            "difference_px": _mean_sd(_floats(rows, "difference")),
            "relative_pct": _mean_sd(_floats(rows, "relative_pct")),
            "ci_below_0": str(below),
            "ci_above_0": str(above),
        })  # fmt: skip
    return sorted(table, key=lambda r: (r["split"], not r["model"].endswith("(baseline)"), r["model"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--csv", type=Path, help="also write the summary here")
    parser.add_argument("--eval", default="eval", help="the folder of each seed to read (default eval; eval-seg for experiments/epochs_ablation.sh's seg-informed)")
    args = parser.parse_args()
    table = summarise(args.out, args.eval)
    fields = list(table[0])
    widths = {f: max(len(f), *(len(r[f]) for r in table)) for f in fields}
    print("  ".join(f.ljust(widths[f]) for f in fields))
    for row in table:
        print("  ".join(row[f].ljust(widths[f]) for f in fields))
    print("mean ± sd over seeds; difference = row - its seed's baseline (or, after 'vs', its own run; model px); "
          "ci_below_0 / ci_above_0: seeds whose paired 95 % interval lies wholly below / above 0")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fields)
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
