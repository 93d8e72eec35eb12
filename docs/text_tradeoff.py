"""The reward-naturalness trade-off of train_text.py over KL weights: a figure and a markdown table.

    for a in 0.0 0.03 0.1 0.3 1.0; do python train_text.py --kl-coef $a --out runs/text_kl$a; done
    python docs/text_tradeoff.py runs/text_kl*         # -> runs/text_kl0.0/tradeoff.png and the table
    python docs/text_tradeoff.py runs/text_kl* --out docs/text_tradeoff.png   # docs/text.md's figure

Copy pretrain.pt, reward_model_steps16.pt and policy_pairs_steps16.pt of the first run into
the other --out folders before starting them: the runs then share the pre-trained LM and the reward model, and
only SEPO and the evaluation run again. Each point is one run: the gold judge's win rate against the
pre-trained model (95% bootstrap interval over prompts) and the reward-model score, against the perplexity
of the samples under the pre-trained model.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(folders: list[str], out: str = "") -> None:
    if not folders:
        raise SystemExit("usage: python docs/text_tradeoff.py RUN_FOLDER [RUN_FOLDER ...] [--out FIGURE]")
    out = out or os.path.join(folders[0], "tradeoff.png")  # never docs/text_tradeoff.png unless asked
    runs = []
    for d in folders:
        name = next(f for f in sorted(os.listdir(d)) if f.startswith("results_steps") and f.endswith(".json"))
        with open(os.path.join(d, name)) as f:
            r = json.load(f)
        runs.append((r["config"]["kl_coef"], {row["model"].split(" (")[0]: row for row in r["rows"]}))
    runs.sort(key=lambda run: run[0])
    pre = runs[0][1]["pre-trained"]
    print("| alpha | RM score | gold win rate [95% CI] | perplexity | distinct-1 |\n|---|---|---|---|---|")
    for a, rows in [("pre-trained", {"SEPO": pre})] + runs:
        s = rows["SEPO"]
        print(f"| {a} | {s['rm_score']:.3f} | {s['gold_win']:.3f} [{s['gold_win_ci'][0]:.3f}, "
              f"{s['gold_win_ci'][1]:.3f}] | {s['perplexity']:.1f} | {s['distinct_1']:.3f} |")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((ax[0], "gold_win", "gold win rate vs pre-trained"), (ax[1], "rm_score", "reward-model score"))
    for a, key, label in panels:
        ppl, y = [rows["SEPO"]["perplexity"] for _, rows in runs], [rows["SEPO"][key] for _, rows in runs]
        err = None
        if key == "gold_win":
            err = [[v - rows["SEPO"]["gold_win_ci"][0] for v, (_, rows) in zip(y, runs)],
                   [rows["SEPO"]["gold_win_ci"][1] - v for v, (_, rows) in zip(y, runs)]]
        a.errorbar(ppl, y, yerr=err, fmt="o-", capsize=3, label="SEPO, one run per KL weight")
        for (alpha, _), x_, y_ in zip(runs, ppl, y):
            a.annotate(f"alpha={alpha:g}", (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=8)
        a.plot(pre["perplexity"], pre[key], "*", ms=12, c="gray", label="pre-trained (second draw)")
        a.set(xscale="log", xlabel="perplexity under the pre-trained LM (log scale)", ylabel=label)
        ticks = [t for t in (20, 50, 100, 200, 500, 1000, 2000) if min(ppl + [pre["perplexity"]]) / 1.5 < t
                 < max(ppl) * 1.5]
        a.minorticks_off()
        a.set_xticks(ticks, [str(t) for t in ticks])
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train_text.py runs' folders, one per KL weight")
    p.add_argument("--out", default="", help="the figure (default: tradeoff.png in the first run's folder)")
    args = p.parse_args()
    main(args.runs, out=args.out)
