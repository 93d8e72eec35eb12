"""The reward-naturalness frontier: SEPO at several KL budgets against best-of-N, from finished runs.

    python docs/frontier.py dna RUN [RUN ...]    # train_dna.py runs  -> RUN/frontier.png (the first), a table
    python docs/frontier.py text RUN [RUN ...]   # train_text.py runs -> RUN/frontier.png (the first), a table
    python docs/frontier.py dna RUN [RUN ...] --out docs/dna_frontier.png   # docs/dna.md's figure

The runs share their pre-trained models (docs/dna.md and docs/text.md give the commands); best-of-N comes
from the first run that has a curve (--bon-max). Every point is labelled with its sampling budget: samples
drawn per evaluated output, N for best-of-N and 1 + ceil(iterations x batch x group / outputs) for SEPO (its
training samples spread over the outputs, plus the output's own draw). DNA: the evaluation oracle's
Pred-Activity against 3-mer correlation and App-Log-Lik; text: the gold judge's win rate (95% interval over
prompts) and the reward model's score against the perplexity under the pre-trained model. The table flags, for
each SEPO point, whether a best-of-N point is at least as good on both axes of the first panel (dominated; a
lower perplexity is the more natural) and which N it beats on both. Its KL columns hold SEPO's path KL as
realised against its budget: the mean over the second half of the iterations and the largest mean over 10
consecutive iterations; for best-of-N, the bound log N - (N - 1) / N on the KL of its samples' law to the
pre-trained model.
"""
import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXES = {"dna": ("Pred-Activity", ["3-mer corr", "App-Log-Lik"]),
        "text": ("gold_win", ["perplexity", "perplexity"])}


def realised_kl(history: list[dict]) -> tuple[float, float]:
    """(mean path KL over the second half of the iterations, largest mean over 10 consecutive iterations)."""
    kl = [h["kl"] for h in history]
    half = kl[len(kl) // 2:]
    window = min(10, len(kl))
    moving = [sum(kl[i - window:i]) / window for i in range(window, len(kl) + 1)]
    return sum(half) / len(half), max(moving)


def load(kind: str, run: str) -> dict:
    texts = [f for f in sorted(os.listdir(run)) if f.startswith("results_steps") and f.endswith(".json")]
    name = "results.json" if kind == "dna" else texts[0]
    with open(os.path.join(run, name)) as f:
        return json.load(f)


def points(kind: str, r: dict, first: dict) -> list[dict]:
    """The SEPO rows of one run, each with its label, its sampling budget and its realised KL; a run of other
    iterations or KL steps than the `first` run's config is a series of its own."""
    c = r["config"]
    outputs = c["n_eval"] if kind == "dna" else r["rows"][0]["n"]
    budget = 1 + math.ceil(c["iters"] * c["batch"] * c["group"] / outputs)
    kl = f"KL <= {c['kl_target']:g}" if c.get("kl_target") else f"alpha {c['kl_coef']:g}"
    if kind == "dna":
        rows = {n: (row, r["runs"][n]["history"]) for n, row in r["rows"].items() if n.startswith("SEPO")}
    else:
        rows = {"SEPO": (row, r["history"]) for row in r["rows"] if row["model"].startswith("SEPO")}
    out = []
    for name, (row, hist) in rows.items():
        est = f"{c['grad']}/{c['ratio']}" + (" + GF" if name.endswith("GF") else "")
        est += f", {c['iters']} iterations" if c["iters"] != first["iters"] else ""
        est += f", KL over {c['kl_steps']} steps" if c["kl_steps"] != first["kl_steps"] else ""
        half, peak = realised_kl(hist)
        out.append({"series": est, "label": kl, "budget": budget, "row": row, "kl_half": half,
                    "kl_peak": peak, "alpha_end": hist[-1].get("kl_coef", c["kl_coef"]),
                    "target": c.get("kl_target") or 0.0})
    return out


def main(kind: str, runs: list[str], out: str = "") -> None:
    if kind not in AXES or not runs:
        raise SystemExit(__doc__)
    out = out or os.path.join(runs[0], "frontier.png")  # never a committed docs/ figure unless asked
    loaded = [load(kind, run) for run in runs]
    bon = next(r["best_of_n"] for r in loaded if r.get("best_of_n"))
    pts = [p for r in loaded for p in points(kind, r, loaded[0]["config"])]
    y, xs = AXES[kind]
    ref = loaded[0]["rows"]
    refs = ({n: row for n, row in ref.items() if n.startswith(("Pre-trained", "Data"))} if kind == "dna" else
            {row["model"]: row for row in ref if not row["model"].startswith(("SEPO", "best"))})
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6))
    for a, x, ylab in zip(ax, xs, [y, y if kind == "dna" else "rm_score"]):
        def draw(rows: list, fmt: str, **kw):  # the text win rate with its 95% interval over prompts
            err = None
            if ylab == "gold_win":
                err = [[r["gold_win"] - r["gold_win_ci"][0] for r in rows],
                       [r["gold_win_ci"][1] - r["gold_win"] for r in rows]]
            return a.errorbar([r[x] for r in rows], [r[ylab] for r in rows], yerr=err, fmt=fmt, capsize=2,
                              **kw)[0]
        draw(bon, "s--", c="gray", label="best-of-N (pre-trained samples)")
        for b in bon:
            a.annotate(f"N={b['N']} [{b['N']}]", (b[x], b[ylab]), textcoords="offset points", xytext=(3, -9),
                       fontsize=6.5, c="gray")
        for series in dict.fromkeys(p["series"] for p in pts):  # budgets joined in order; a fixed alpha apart
            mine = sorted((p for p in pts if p["series"] == series), key=lambda p: p["target"])
            budgeted = [p["row"] for p in mine if p["target"]]
            line = draw(budgeted, "o-", lw=1, label=f"SEPO {series}, KL budgets")
            fixed = [p["row"] for p in mine if not p["target"]]
            if fixed:
                draw(fixed, "D", c=line.get_color(), label=f"SEPO {series}, fixed alpha")
            for p in mine:
                tag = f"{p['label'].replace('KL <= ', '<=')} [{p['budget']}]"
                a.annotate(tag, (p["row"][x], p["row"][ylab]), textcoords="offset points", xytext=(3, 3),
                           fontsize=6.5, c=line.get_color())
        for name, row in refs.items():
            draw([row], "*", ms=12, label=name)
        if a is ax[0]:  # the target corner: the data's Pred-Activity at 3-mer >= 0.9; win 0.65 at 1.25x ppl
            pre = next(r for n, r in refs.items() if n.startswith(("Pre", "pre")))
            data = next(r for n, r in refs.items() if n.startswith(("Data", "chosen")))
            corner = (0.9, data[y]) if kind == "dna" else (0.0, 0.65)
            width = 0.2 if kind == "dna" else 1.25 * pre["perplexity"]
            lim = a.get_xlim(), a.get_ylim()  # the corner shaded, the axes left as the points set them
            a.add_patch(plt.Rectangle(corner, width, 10, color="green", alpha=0.08, label="target (docs)"))
            a.set(xlim=lim[0], ylim=lim[1])
        a.set(xlabel=x + (" under the pre-trained model (log scale)" if x == "perplexity" else ""),
              ylabel={"gold_win": "gold win rate vs pre-trained",
                      "rm_score": "reward-model score"}.get(ylab, ylab))
        if x == "perplexity":  # log scale, plain tick labels
            lo, hi = a.get_xlim()
            a.set_xscale("log")
            a.minorticks_off()
            ticks = [t for t in (20, 30, 50, 70, 100, 150, 200, 300, 500, 1000) if lo <= t <= hi]
            a.set_xticks(ticks, [str(t) for t in ticks])
            a.set_xlim(lo, hi)
    fig.legend(*ax[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("[k]: sampling budget, samples drawn per output; SEPO points: their KL budget (<= nats) or "
                 "fixed alpha", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    x, up = xs[0], 1 if kind == "dna" else -1  # +1 where a larger x is more natural (3-mer), -1 (perplexity)
    cols = ([y, "ATAC-Acc %", "3-mer corr", "JASPAR corr", "App-Log-Lik"] if kind == "dna" else
            ["gold_win", "rm_score", "perplexity", "distinct_1"])
    heads = {"gold_win": "gold win rate [95% CI]", "rm_score": "RM score", "distinct_1": "distinct-1"}

    def fmt(row: dict, c: str) -> str:
        return f"{row[c]:.1f}" if "%" in c or c == "perplexity" else f"{row[c]:.3f}"
    print("| SEPO | KL budget / alpha | samples per output | KL, second half | KL, peak 10-iteration mean "
          "| alpha at the end | " + " | ".join(heads.get(c, c) for c in cols)
          + " | dominated by best-of-N | beats best-of-N |\n" + "|---" * (len(cols) + 8) + "|")
    for p in sorted(pts, key=lambda p: (p["series"], p["target"] == 0, p["target"])):
        row = p["row"]
        over = [b["N"] for b in bon if up * b[x] >= up * row[x] and b[y] >= row[y]]  # ties count against SEPO
        under = [b["N"] for b in bon if up * b[x] < up * row[x] and b[y] < row[y]]
        cells = [fmt(row, c) for c in cols]
        if kind == "text":
            cells[0] = f"{row['gold_win']:.3f} [{row['gold_win_ci'][0]:.3f}, {row['gold_win_ci'][1]:.3f}]"
        dominated = "N = " + ", ".join(map(str, over)) if over else "no"
        beats = "N = " + ", ".join(map(str, under)) if under else "none"
        print(f"| {p['series']} | {p['label']} | {p['budget']} | {p['kl_half']:.2f} | {p['kl_peak']:.2f} | "
              f"{p['alpha_end']:.3g} | " + " | ".join(cells) + f" | {dominated} | {beats} |")
    for b in bon:  # KL(best-of-N || pre-trained) <= log N - (N - 1) / N (Beirami et al. 2024)
        cells = [fmt(b, c) for c in cols]
        if kind == "text":
            cells[0] = f"{b['gold_win']:.3f} [{b['gold_win_ci'][0]:.3f}, {b['gold_win_ci'][1]:.3f}]"
        bound = math.log(b["N"]) - (b["N"] - 1) / b["N"]
        print(f"| best-of-{b['N']} | | {b['N']} | <= {bound:.2f} | | | " + " | ".join(cells) + " | | |")
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(AXES), help="the runs' driver: train_dna.py or train_text.py")
    p.add_argument("runs", nargs="+", help="the runs' folders; best-of-N from the first with a curve")
    p.add_argument("--out", default="", help="the figure (default: frontier.png in the first run's folder)")
    args = p.parse_args()
    main(args.kind, args.runs, out=args.out)
