#!/usr/bin/python3
"""The epsilon-accuracy curve of docs/privacy.md: pipelines/privacy-pneumoniamnist.yaml (client-level
DP-FedAvg, central noise) at several budgets and without DP, over seeds, one run at a time.

  scripts/experiments/privacy_curve.py [--budgets 8 64 512] [--seeds 1 2 3] [--runs DIR] [--out FILE]
  ... --aggregate-only    rebuild the table from existing runs

Runs whose summary.json exists are not repeated. Python standard library only (shares run_one
and mean_sd with evidence.py).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evidence import ROOT, mean_sd, run_one  # noqa: E402

PIPELINE = "pipelines/privacy-pneumoniamnist.yaml"
METRICS = ["roc-auc", "balanced-accuracy", "accuracy"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[8.0, 64.0, 512.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "privacy-curve"))
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "privacy-curve", "curve.md"))
    ap.add_argument("--concord", default=os.path.join(ROOT, "build", "bin", "concord"))
    ap.add_argument("--aggregate-only", action="store_true")
    a = ap.parse_args()
    configs = [("no DP", None, ["privacy=null"])]
    configs += [("epsilon %g" % e, e, ["privacy.epsilon=%g" % e]) for e in a.budgets]
    os.makedirs(a.runs, exist_ok=True)
    rows = []
    with open(os.path.join(a.runs, "runs.log"), "a") as log:
        for label, eps, sets in configs:
            per_seed = []
            for seed in a.seeds:
                run_dir = os.path.join(a.runs, ("nodp" if eps is None else "eps-%g" % eps),
                                       "seed-%d" % seed)
                if not a.aggregate_only:
                    run_one(a.concord, PIPELINE, sets, seed, run_dir, log)
                path = os.path.join(run_dir, "summary.json")
                if os.path.exists(path):
                    with open(path) as f:
                        per_seed.append(json.load(f))
            rows.append((label, per_seed))
    lines = ["| budget | z | epsilon spent | " + " | ".join("mean " + m for m in METRICS) +
             " | runs |", "|---" * (len(METRICS) + 4) + "|"]
    for label, runs in rows:
        z = [r["privacy"]["noise_multiplier"] for r in runs if "privacy" in r]
        spent = [r["privacy"]["epsilon"] for r in runs if "privacy" in r]
        cells = [mean_sd([r["mean"].get(m) if r["mean"].get(m) is not None else float("nan")
                          for r in runs]) for m in METRICS]
        lines.append("| %s | %s | %s | %s | %d |" % (
            label, mean_sd(z) if z else "-", mean_sd(spent) if spent else "-",
            " | ".join(cells), len(runs)))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
