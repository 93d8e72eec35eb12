"""The DNA trade-off figure from a finished train_dna.py run: RUN/tradeoff.png, or --out.

    python train_dna.py                          # writes runs/dna/results.json
    python docs/dna_tradeoff.py runs/dna         # -> runs/dna/tradeoff.png
    python docs/dna_tradeoff.py runs/dna runs/dna_kl0.05 ...   # and other runs' final SEPO rows, as points
    python docs/dna_tradeoff.py runs/dna [KL-study runs ...] --out docs/dna_tradeoff.png   # docs/dna.md's

Left: each SEPO run's mean reward (fine-tuning oracle) and path KL per iteration. Middle and right: the
evaluation oracle's Pred-Activity against 3-mer correlation and against ATAC-Acc for each run's checkpoints
(a fresh draw every --ckpt-every iterations), best-of-N for N = 1, 2, 4, ... (pre-trained samples ranked by
the fine-tuning oracle), the pre-trained model and the held-out data. Up and to the right is better. Further
runs (other KL weights or estimators, from the same pre-trained models) add their final SEPO row as a labelled
point.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run: str) -> dict:
    with open(os.path.join(run, "results.json")) as f:
        return json.load(f)


def main(run: str, *more: str, out: str = "") -> None:
    out = out or os.path.join(run, "tradeoff.png")  # never the committed docs/dna_tradeoff.png unless asked
    r = load(run)
    points = []  # (label, final SEPO row) of the further runs
    for c, row in ((m["config"], m["rows"]["SEPO"]) for m in map(load, more)):
        label = f"{c['grad']}/{c['ratio']}, alpha {c['kl_coef']:g}, KL over {c['kl_steps']} steps"
        points.append((label, row))
    results, bon, runs, every = r["rows"], r["best_of_n"], r["runs"], r["config"]["ckpt_every"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, h in runs.items():
        ax[0].plot([s["reward_mean"] for s in h["history"]], label=f"{name}: mean reward")
        ax[0].plot([s["kl"] for s in h["history"]], ":", label=f"{name}: path KL")
    ax[0].set(xlabel="SEPO iteration", title="fine-tuning oracle reward, KL to the pre-trained model")
    ax[0].legend(fontsize=7)
    for a, metric in zip(ax[1:], ("3-mer corr", "ATAC-Acc %")):
        bon_y = [b["Pred-Activity"] for b in bon]
        a.plot([b[metric] for b in bon], bon_y, "s--", c="gray", label="best-of-N")
        for b in bon:
            a.annotate(f"N={b['N']}", (b[metric], b["Pred-Activity"]), fontsize=7)
        for name, h in runs.items():
            a.plot([p[metric] for p in h["probes"]], [p["Pred-Activity"] for p in h["probes"]], "o-",
                   label=f"{name}, every {every} iterations")
        for (label, row), marker in zip(points, "^v<>Dpxh+*"):
            a.plot(row[metric], row["Pred-Activity"], marker, ms=7, label=label)
        for name in [n for n in results if n.startswith(("Pre-trained", "Data"))]:
            a.plot(results[name][metric], results[name]["Pred-Activity"], "*", ms=12, label=name)
        a.set(xlabel=metric, ylabel="Pred-Activity (evaluation oracle)")
    fig.tight_layout()
    fig.legend(*ax[1].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="the run's folder, then further runs' (their final SEPO rows)")
    p.add_argument("--out", default="", help="the figure (default: tradeoff.png in the first run's folder)")
    args = p.parse_args()
    main(*args.runs, out=args.out)
