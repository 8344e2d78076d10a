#!/usr/bin/python3
"""Regenerate the evidence tables of docs/results-adapters.md and docs/results-harmonization.md.

Runs the pipelines of pipelines/ once per method and seed with `concord run` (sequentially,
one at a time), then aggregates every run's summary.json into Markdown tables of
mean +- sample standard deviation over seeds, per site, site mean and worst site.

  scripts/experiments/evidence.py adapters       [--seeds 1 2 3] [--runs DIR] [--out FILE]
  scripts/experiments/evidence.py harmonization  [--seeds 1 2 3 4 5] [--runs DIR] [--out FILE]
  scripts/experiments/evidence.py generative --only brainsim --seeds 1 2 3 4 5
  scripts/experiments/evidence.py generative --only pneumonia --seeds 1 2 3
                                                 (docs/results-generative.md)
  ... --aggregate-only    rebuild the tables from existing runs without running anything
  ... --only TEXT         only the datasets whose title contains TEXT (runs and tables)

A run whose summary.json already exists is not repeated (delete its folder to redo it), so an
interrupted invocation resumes where it stopped. Python standard library only.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FEDREP = ["adapter.type=split", "adapter.args.mode=fedrep", "adapter.args.shared=[features]",
          "adapter.args.local=[head]"]
METHODS = [  # label, --set overrides on top of the pipeline file
    ("FedAvg", []),
    ("FedProx (mu 0.01)", ["aggregator.type=fedprox", "aggregator.args.mu=0.01"]),
    ("FedBN (batchnorm local)", ["adapter.type=batchnorm", "adapter.args.policy=local"]),
    ("SiloBN (batchnorm stats-local)", ["adapter.type=batchnorm",
                                        "adapter.args.policy=stats-local"]),
    ("FedRep (split fedrep)", FEDREP),
    ("FedAvg + fine-tune (2 epochs)", ["adapter.type=finetune", "adapter.args.epochs=2"]),
]
AMPLITUDE = "[{type: amplitude, args: {mode: normalize, beta: 0.01}}]"
HISTOGRAM = "[{type: histogram-match, args: {quantiles: 101, foreground: mean}}]"
REPLAY = ("[{type: replay, args: {latent: 16, width: 16, batch_size: 16, ratio: 0.5}, "
          "stage: {rounds: 5, local_epochs: 2, lr: 0.001}}]")
CYCLEGAN = ("[{type: cyclegan, args: {reference_site: auto, generator_sharing: local, ngf: 16, "
            "ndf: 16, n_blocks: 3, batch_size: 4, style_epochs: 10, style_batch: 16, "
            "reference_samples: 64}, stage: {rounds: 3, local_epochs: 1, lr: 0.0002}}]")
BRAINSIM_BASE = ["data.dataset.args.train_per_site=160", "model.args.width=32",
                 "training.lr=0.001", "federation.rounds=20"]
PNEUMONIA_BASE = ["data.partition.alpha=0.1", "data.partition.test=iid",
                  "data.dataset.args.size=32", "data.dataset.args.limit=1500",
                  "federation.rounds=15", "harmonizers=[]"]


def with_base(base, methods):
    return [(label, base + sets) for label, sets in methods]


EXPERIMENTS = {
    "adapters": {
        "title": "Personalization methods",
        "datasets": [
            ("brainsim (shift 2.0)", "pipelines/personalization-brainsim.yaml", METHODS),
            ("PneumoniaMNIST (5 sites, Dirichlet 0.5, scanner shift 1.0)",
             "pipelines/personalization-pneumoniamnist.yaml", METHODS),
            # Control: the same brainsim budget without scanner shift, FedAvg and FedBN only.
            ("brainsim control (shift 0)", "pipelines/personalization-brainsim.yaml",
             [(label, ["data.dataset.args.shift=0"] + sets) for label, sets in METHODS[:3:2]]),
        ],
        "out": "runs/evidence/adapters.md",
        "seeds": [1, 2, 3],
    },
    "harmonization": {
        "title": "Harmonizers with FedAvg",
        "datasets": [
            ("brainsim (shift 1.5)", None, [
                ("FedAvg", "pipelines/harmonization-brainsim-fedavg.yaml"),
                ("FedAvg + amplitude normalize", "pipelines/harmonization-brainsim-amplitude.yaml"),
                ("FedAvg + histogram-match",
                 "pipelines/harmonization-brainsim-histogram-match.yaml"),
            ]),
        ],
        "out": "runs/evidence/harmonization.md",
        "seeds": [1, 2, 3, 4, 5],
    },
    "generative": {
        "title": "Learned harmonizers (cyclegan, replay) with FedAvg",
        "datasets": [
            # brainsim: pipelines/brainsim-cyclegan.yaml with more data and a larger task model
            # (the pipeline's own 64 images per site and width 16 leave every method near
            # chance), the harmonizers line replaced per method. FedBN is a reference row: the
            # same federation with site-local BatchNorm and no harmonizer.
            ("brainsim (4 sites, shift 1.5, 32 px, 160 train per site)",
             "pipelines/brainsim-cyclegan.yaml", with_base(BRAINSIM_BASE, [
                 ("FedAvg", ["harmonizers=[]"]),
                 ("FedAvg + amplitude (beta 0.01)", ["harmonizers=" + AMPLITUDE]),
                 ("FedAvg + histogram-match", ["harmonizers=" + HISTOGRAM]),
                 ("FedAvg + replay", ["harmonizers=" + REPLAY]),
                 ("FedAvg + cyclegan (local generators)", []),
                 ("FedAvg + cyclegan (federated generator)",
                  ["harmonizers.0.args.generator_sharing=federated"]),
                 ("FedBN (reference: local BatchNorm, no harmonizer)",
                  ["harmonizers=[]", "adapter.type=batchnorm", "adapter.args.policy=local"]),
             ])),
            # PneumoniaMNIST with strong label skew (Dirichlet 0.1 over 5 sites) plus scanner
            # shift 1.0; every site is tested on the pooled label mix (partition test: iid).
            # This copy's training split is 10% normal (the test split 37.5%): read ROC AUC.
            ("PneumoniaMNIST (5 sites, Dirichlet 0.1, scanner shift 1.0, 32 px)",
             "pipelines/personalization-pneumoniamnist.yaml", with_base(PNEUMONIA_BASE, [
                 ("FedAvg", []),
                 ("FedAvg + amplitude (beta 0.01)", ["harmonizers=" + AMPLITUDE]),
                 ("FedAvg + replay", ["harmonizers=" + REPLAY]),
                 # The training split is 90% pneumonia: replay with a uniform label mix also
                 # rebalances the classes every site sees.
                 ("FedAvg + replay (uniform label mix)",
                  ["harmonizers=" + REPLAY.replace("ratio: 0.5", "ratio: 0.5, label_mix: uniform")]),
                 ("FedAvg + cyclegan (local generators)", ["harmonizers=" + CYCLEGAN]),
             ])),
        ],
        "out": "runs/evidence/generative.md",
        "seeds": [1, 2, 3],
    },
}
METRICS = ["balanced-accuracy", "roc-auc", "accuracy"]


def slug(s):
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def run_one(concord, pipeline, sets, seed, run_dir, log):
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):
        return
    cmd = [concord, "run", os.path.join(ROOT, pipeline), "--set", "seed=%d" % seed]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["--run-dir", run_dir, "--no-progress"]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "passive")
    t0 = time.time()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "evidence.log"), "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    line = "%s  rc=%d  %.1f s" % (" ".join(cmd), rc, time.time() - t0)
    print(line, file=log, flush=True)
    if rc != 0 or not os.path.exists(summary):
        print("evidence: run failed (rc %d), see %s/evidence.log" % (rc, run_dir), file=sys.stderr)


def mean_sd(values, signed=False):
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    s = ("%+.3f ± %.3f" if signed else "%.3f ± %.3f") % (m, sd)
    if len(v) < len(values):
        s += " (n=%d)" % len(v)
    return s


# Two-sided 97.5% quantiles of Student's t with n - 1 degrees of freedom, n = 2..10.
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306,
        10: 2.262}


def ci95(values):
    """95% confidence interval of the mean of paired differences (t distribution); a difference
    is claimed only when its interval excludes 0 (marked *)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if len(v) < 2 or len(v) not in T975:
        return "n/a"
    m = sum(v) / len(v)
    half = T975[len(v)] * math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))
    lo, hi = m - half, m + half
    return "[%+.3f, %+.3f]%s" % (lo, hi, " *" if lo > 0 or hi < 0 else "")


def site_values(summary, metric, key):
    """{site: value or None} for metrics (key 'metrics') or personalized metrics."""
    out = {}
    for s in summary["sites"]:
        m = s.get(key)
        if m is None:
            return None
        v = m.get(metric)
        out[s["site"]] = None if v is None else float(v)
    return out


def reduce_sites(vals):
    v = [x for x in vals.values() if x is not None and not math.isnan(x)]
    if not v:
        return None, None
    return sum(v) / len(v), min(v)


def table(rows, sites, metric):
    head = "| method | " + " | ".join(sites) + " | site mean | worst site |"
    lines = [head, "|" + "---|" * (len(sites) + 3)]
    for label, per_seed in rows:  # per_seed: list of {site: value}
        cells = [mean_sd([d.get(s) for d in per_seed]) for s in sites]
        red = [reduce_sites(d) for d in per_seed]
        cells.append(mean_sd([r[0] for r in red]))
        cells.append(mean_sd([r[1] for r in red]))
        lines.append("| " + label + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows, base_label):
    """Site-mean and worst-site differences to the base row, paired by seed (same seed = same
    data, scanners and initialisation), mean +- sd over the seeds both have."""
    base = dict(rows).get(base_label)
    if base is None:
        return ""
    bred = [reduce_sites(d) for d in base]
    lines = ["| method | Δ site mean vs %s | Δ worst site vs %s | seeds with Δ site mean > 0 | "
             "95%% CI of Δ site mean | 95%% CI of Δ worst site |" % (base_label, base_label),
             "|---|---|---|---|---|---|"]
    for label, per_seed in rows:
        if label == base_label or len(per_seed) != len(base):
            continue
        red = [reduce_sites(d) for d in per_seed]
        dm = [None if a[0] is None or b[0] is None else a[0] - b[0] for a, b in zip(red, bred)]
        dw = [None if a[1] is None or b[1] is None else a[1] - b[1] for a, b in zip(red, bred)]
        pos = sum(1 for x in dm if x is not None and x > 0)
        lines.append("| %s | %s | %s | %d of %d | %s | %s |" %
                     (label, mean_sd(dm, True), mean_sd(dw, True), pos, len(dm), ci95(dm),
                      ci95(dw)))
    return "\n".join(lines)


def aggregate(exp, seeds, runs, only=None):
    out = ["<!-- generated by scripts/experiments/evidence.py %s --seeds %s -->" %
           (exp, " ".join(map(str, seeds)))]
    for title, base, methods in EXPERIMENTS[exp]["datasets"]:
        if only and only.lower() not in title.lower():
            continue
        rows = {m: [] for m in METRICS}
        sites, seconds, missing = [], [], []
        for label, spec in methods:
            summaries = []
            for seed in seeds:
                p = os.path.join(runs, slug(title), slug(label), "seed%d" % seed, "summary.json")
                if not os.path.exists(p):
                    missing.append("%s seed %d" % (label, seed))
                    continue
                with open(p) as f:
                    summaries.append(json.load(f))
            if not summaries:
                continue
            for s in summaries:
                seconds.append(float(s.get("seconds", 0)))
                for e in s["sites"]:
                    if e["site"] not in sites:
                        sites.append(e["site"])
            for metric in METRICS:
                rows[metric].append((label, [site_values(s, metric, "metrics") for s in summaries]))
                pers = [site_values(s, metric, "personalized") for s in summaries]
                if all(p is not None for p in pers):
                    rows[metric].append((label + ", personalized", pers))
        out.append("\n### %s\n" % title)
        if seconds:
            out.append("%d runs, engine time per run %.1f-%.1f s (mean %.1f s).\n" %
                       (len(seconds), min(seconds), max(seconds), sum(seconds) / len(seconds)))
        if missing:
            out.append("Missing runs: " + ", ".join(missing) + ".\n")
        for metric in METRICS:
            out.append("\n**%s** (mean ± sd over %d seeds)\n" % (metric, len(seeds)))
            out.append(table(rows[metric], sites, metric))
            if rows[metric]:
                out.append("\nPaired by seed, %s:\n" % metric)
                out.append(paired(rows[metric], rows[metric][0][0]))
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="default: 1 2 3 (adapters), 1 2 3 4 5 (harmonization)")
    ap.add_argument("--runs", default=None, help="run folders (default runs/evidence/<exp>)")
    ap.add_argument("--out", default=None, help="Markdown output (default runs/evidence/<exp>.md)")
    ap.add_argument("--concord", default=os.path.join(ROOT, "build/bin/concord"))
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--only", default=None, help="run only datasets whose title contains this")
    a = ap.parse_args()
    exp = EXPERIMENTS[a.experiment]
    a.seeds = a.seeds or exp["seeds"]
    runs = os.path.abspath(a.runs or os.path.join(ROOT, "runs/evidence", a.experiment))
    out = a.out or os.path.join(ROOT, exp["out"])
    if not a.aggregate_only:
        for title, base, methods in exp["datasets"]:
            if a.only and a.only.lower() not in title.lower():
                continue
            for seed in a.seeds:  # seed-major: a cut-short invocation still covers every method
                for label, spec in methods:
                    pipeline, sets = (base, spec) if base else (spec, [])
                    run_dir = os.path.join(runs, slug(title), slug(label), "seed%d" % seed)
                    run_one(a.concord, pipeline, sets, seed, run_dir, sys.stdout)
    text = "## %s\n\n" % exp["title"] + aggregate(a.experiment, a.seeds, runs, a.only)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
