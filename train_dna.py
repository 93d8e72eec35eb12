"""SEPO on real regulatory DNA: the paper's DNA experiment (Section 4.2), end to end.

    python train_dna.py                       # CPU, minutes: the whole pipeline at small size
    python train_dna.py --preset gpu          # one GPU: larger models, 128 sampler steps
    python train_dna.py --preset paper        # the paper's settings (docs/math.md §10)
    python train_dna.py --data gosai_all.csv  # the Gosai MPRA table: seq,hepg2,k562,sknsh[,chr]
    python train_dna.py --preset paper --bench        # time one SEPO iteration, print peak GPU memory
    python train_dna.py --drakes DIR --preset paper   # the paper's run on the DRAKES release unzipped in DIR

The default run trains everything itself, each stage cached in --out and resumable: data (data/dna.py),
pre-training, oracles (networks: models/dna.py), SEPO (plain and with the gradient-flow corrector),
evaluation against best-of-N. --drakes starts from the release's pretrained MDLM and gReLU oracles, trains
SEPO and scores every row by DRAKES's protocol (data/drakes.py). docs/dna.md explains both.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import sepo
from data.dna import (CELL_TYPES, SEQ_LEN, DnaData, DnaScorer, chrom_name, decode_sequences, file_sha256,
                      held_out_metrics, hepg2_score, load_data, oracle_chromosomes, pearson,
                      split_by_chromosome, top_hepg2)
from data.drakes import HEPG2, METRICS, PUBLISHED, oracle_predictions, published_table, table_samples
from models.dna import AccessibilityCNN, DilatedCNNDenoiser, EnformerOracle, predict
from models.drakes import bench_networks, load_release
from train_common import (RANK, WORLD, Stopwatch, arg, best_of, bon_sizes, fmt, parse_config, rank0_first,
                          refuse_unread, sampling_budget, save_atomic, sepo_settings, setup, timed_step,
                          train_loop, train_sepo, write_results)

GRAPH, NOISE = sepo.Masked(4), sepo.LogLinear()  # MDLM's absorbing graph over A, C, G, T; DRAKES's eps 1e-3
# --drakes: the flag that gives each release file (data/drakes.py RELEASE) elsewhere than its release path
RELEASE_FLAGS = {"pretrained": "drakes_pretrained", "ft_oracle": "drakes_ft_oracle",
                 "eval_oracle": "drakes_eval_oracle", "atac": "drakes_atac", "data": "drakes_data",
                 "drakes": "drakes_finetuned", "drakes_zero": "drakes_zero_alpha"}
DRAKES_ROWS = {"drakes": "DRAKES (finetuned.ckpt)", "drakes_zero": "DRAKES without KL (zero_alpha.ckpt)"}


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class Config:
    preset: str = arg("cpu", "cpu: minutes on a laptop; gpu: one GPU; paper: the paper's settings",
                      ("cpu", "gpu", "paper"))
    data: str = arg("", "'' = the vendored ENCODE DHS file; .csv(.gz) = a Gosai table seq,hepg2,k562,sknsh")
    out: str = arg("runs/dna", "output folder: cached stages, checkpoints, table, plots, samples")
    seed: int = arg(0, "streams seeded 1000 * seed + offsets < 1000: reproducible, no stream shared by seeds")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    bench: bool = arg(False, "only time one SEPO iteration (plain and with the corrector), untrained models")
    test_chrom: str = arg("chr1", "held-out test chromosome (1, Chr1 and chr1 all name chr1)")
    val_chrom: str = arg("chr2", "validation chromosome (pre-training validation loss)")
    hidden: int = arg(32, "denoiser channels")
    stacks: int = arg(1, "denoiser stacks of 5 dilated convolutions (dilations 1, 1, 4, 16, 64)")
    pretrain_steps: int = arg(500, "pre-training optimizer steps")
    pretrain_batch: int = arg(64, "pre-training batch size")
    pretrain_lr: float = arg(3e-3, "pre-training AdamW learning rate (cosine decay)")
    val_every: int = arg(200, "pre-training steps between validation losses and checkpoints")
    oracle_dim: int = arg(48, "Enformer width (dim // heads must be a multiple of 6)")
    oracle_depth: int = arg(1, "Enformer transformer layers")
    oracle_heads: int = arg(2, "Enformer attention heads")
    oracle_downsamples: int = arg(4, "Enformer pooling stages (>= 3)")
    oracle_epochs: float = arg(2.0, "epochs over its half of the training chromosomes, per oracle")
    oracle_batch: int = arg(128, "oracle batch size")
    oracle_lr: float = arg(2e-3, "oracle AdamW learning rate (cosine decay)")
    access_epochs: float = arg(6.0, "epochs of the accessibility CNN (its loss plateaus first; docs/dna.md)")
    iters: int = arg(40, "SEPO iterations per fine-tuned model")
    lr: float = arg(3e-4, "SEPO Adam learning rate")
    batch: int = arg(4, "SEPO groups per iteration")
    group: int = arg(8, "GRPO group size G")
    epochs: int = arg(2, "K gradient steps per iteration")
    clip_eps: float = arg(0.2, "clipping eps of the objective")
    kl_coef: float = arg(0.2, "alpha, weight of the path KL to the pre-trained model")
    kl_target: float = arg(0.0, "a KL budget: alpha = --kl-coef + lambda, lambda >= 0 keeps the path KL "
                                "at most it (0: none)")
    kl_gain: float = arg(0.5, "--kl-target: lambda += kl_gain * min(KL / target - 1, 1) each iteration")
    kl_steps: int = arg(16, "the path KL covers the last kl_steps sampler steps (capped at --steps)")
    snis: int = arg(2, "M latent paths per sample (SNIS ratio, --grad path)")
    steps: int = arg(16, "sampler steps (rollouts; evaluation but --drakes's, which takes --eval-steps)")
    corrector_steps: int = arg(1, "corrector steps per sampler step of 'SEPO with GF' (0: no such run; < 70)")
    pl_positions: int = arg(32, "--grad pl: masked positions per sample")
    grad: str = arg("pl", "grad log pi estimator (pl: the paper's; auto: sepo's choice for the graph; "
                          "docs/math.md §3-4)", ("auto", "pl", "path", "rollout"))
    ratio: str = arg("snis", "importance ratio (snis: the paper's; auto: sepo's choice; docs/math.md §5)",
                     ("auto", "snis", "rollout"))
    path_steps: int = arg(0, "--grad path/rollout: transitions with gradient per path (0: all)")
    micro_batch: int = arg(0, "samples per gradient pass (0: all); bounds memory, same update")
    amp: str = arg("none", "bf16: autocast of the rollout and gradient passes", ("none", "bf16"))
    ckpt_every: int = arg(10, "SEPO iterations between checkpoints (and probes of the trade-off plot)")
    n_eval: int = arg(640, "samples per evaluated model (paper: 640)")
    bon_max: int = arg(8, "best-of-N curve for N = 1, 2, 4, ... and bon_max")
    elbo_t: int = arg(4, "Monte-Carlo times per sequence for App-Log-Lik")
    drakes: str = arg("", "the unzipped DRAKES release (DRAKES_data.zip): SEPO from its models, scored by "
                          "DRAKES's protocol ('': the default run)")
    drakes_pretrained: str = arg("", "--drakes: pretrained.ckpt, if not at its release path")
    drakes_ft_oracle: str = arg("", "--drakes: reward_oracle_ft.ckpt, if not at its release path")
    drakes_eval_oracle: str = arg("", "--drakes: reward_oracle_eval.ckpt, if not at its release path")
    drakes_atac: str = arg("", "--drakes: binary_atac_cell_lines.ckpt, if not at its release path")
    drakes_data: str = arg("", "--drakes: gosai_all.csv, if not at its release path")
    drakes_finetuned: str = arg("", "--drakes: DRAKES's finetuned.ckpt (optional row), if not at its path")
    drakes_zero_alpha: str = arg("", "--drakes: DRAKES's zero_alpha.ckpt (optional row), if not at its path")
    reward_oracle: str = arg("ft", "--drakes: SEPO's reward, the HepG2 output of the fine-tuning oracle "
                                   "(DRAKES's protocol) or of the evaluation oracle (SEPO's code)",
                             ("ft", "eval"))
    atac_column: int = arg(1, "--drakes: the ATAC model's column ATAC-Acc reads (DRAKES: 1; SEPO's code: 0)")
    eval_steps: int = arg(128, "--drakes: steps of DRAKES's evaluation sampler and of App-Log-Lik")

    @property
    def stream_seed(self) -> int:  # streams seeded stream_seed + k, k < 1000: two seeds share no stream
        return 1000 * self.seed

    @property
    def release_files(self) -> dict:  # --drakes: {release name: the path a flag gives, or None}
        return {name: getattr(self, flag) or None for name, flag in RELEASE_FLAGS.items()}

    @property
    def release(self) -> bool:  # --drakes or a release file given: the DRAKES run
        return bool(self.drakes) or any(self.release_files.values())


PRESETS = {
    "cpu": {},
    # One GPU: a 3.3M-parameter denoiser, 128 sampler steps.
    "gpu": dict(hidden=128, stacks=4, pretrain_steps=6000, pretrain_batch=256, pretrain_lr=1e-3,
                val_every=500, oracle_dim=96, oracle_depth=2, oracle_heads=4, oracle_downsamples=3,
                oracle_epochs=4, iters=60, lr=1e-4, batch=8, group=8, kl_coef=0.2, kl_steps=128, snis=4,
                steps=128, pl_positions=16, ckpt_every=10, bon_max=64, elbo_t=8),
    # The paper's settings (docs/math.md §10); the denoiser follows the DRAKES CNN layout.
    "paper": dict(hidden=128, stacks=4, pretrain_steps=100_000, pretrain_batch=256, pretrain_lr=1e-3,
                  val_every=5000, oracle_dim=192, oracle_depth=4, oracle_heads=8, oracle_downsamples=3,
                  oracle_epochs=10, oracle_lr=5e-4, access_epochs=10, iters=500, lr=1e-4, batch=8, group=8,
                  epochs=2, clip_eps=0.2, kl_coef=0.05, kl_steps=10, snis=4, steps=128, pl_positions=16,
                  ckpt_every=25, bon_max=64, elbo_t=16),
}
# --drakes: cpu and gpu keep their SEPO settings; paper takes the SEPO reference trainer's (docs/dna.md: where
# they differ from the paper's text), micro-batched so that an iteration fits one 24 GB card
DRAKES_PRESETS = {name: {**p, "out": "runs/drakes"} for name, p in PRESETS.items()}
DRAKES_PRESETS["paper"] = dict(out="runs/drakes", iters=1000, lr=1e-4, batch=16, group=8, epochs=5,
                               clip_eps=0.2, snis=2, steps=128, kl_coef=1e-4, kl_steps=50, pl_positions=16,
                               micro_batch=16, ckpt_every=50)
POSITIVE = ("hidden", "stacks", "pretrain_steps", "pretrain_batch", "pretrain_lr", "lr", "oracle_dim",
            "oracle_heads", "oracle_downsamples", "oracle_epochs", "oracle_batch", "oracle_lr",
            "access_epochs", "ckpt_every", "n_eval", "bon_max", "elbo_t", "kl_gain", "eval_steps")


def presets_for(given: dict) -> dict:
    """The DRAKES run (--drakes, or any release file given) has presets of its own."""
    release = any(given.get(flag) for flag in ("drakes", *RELEASE_FLAGS.values()))
    return DRAKES_PRESETS if release else PRESETS


DRAKES_ONLY = ("reward_oracle", "atac_column", "eval_steps")  # the flags the default run does not read


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags from the Config fields (train_common.parse_config); the DRAKES run has presets of its own. A flag
    the run does not read, or a setting a later stage would refuse, is an error now."""
    about, types = __doc__.split("\n\n")[0], {"test_chrom": chrom_name, "val_chrom": chrom_name}
    cfg, given = parse_config(Config, presets_for, POSITIVE, argv, about, types)
    if cfg.release and "data" in given:
        raise ValueError("--data is the default run's table; the DRAKES run reads --drakes-data")
    if cfg.release:
        own = ("test_chrom", "val_chrom", *PRETRAIN_KEYS, *ORACLE_KEYS, "access_epochs", "bon_max", "elbo_t")
        refuse_unread(given, own, "the default run's, not read by the DRAKES run (--drakes)")
    else:
        refuse_unread(given, DRAKES_ONLY, "the DRAKES run's (--drakes), not read by the default run")
    flags = "--oracle-dim, --oracle-heads, --oracle-downsamples"  # refused now, not after pre-training
    EnformerOracle.check(cfg.oracle_dim, cfg.oracle_heads, cfg.oracle_downsamples, flags)
    if cfg.corrector_steps >= 70:  # SEPO with GF seeds stream_seed + 30 + it: below the evaluation's + 100
        raise ValueError(f"--corrector-steps must be < 70, got {cfg.corrector_steps} (its random stream)")
    return cfg


# ---------------------------------------------------------------------------- the default run's stages
PRETRAIN_KEYS = ("hidden", "stacks", "pretrain_steps", "pretrain_batch", "pretrain_lr", "val_every")
ORACLE_KEYS = ("oracle_dim", "oracle_depth", "oracle_heads", "oracle_downsamples", "oracle_epochs",
               "oracle_batch", "oracle_lr")
ACCESS_KEYS = ("access_epochs", "oracle_batch", "oracle_lr")


def keys(cfg: Config, data: DnaData, *names: str) -> dict:
    """A stage's settings, the base of its random streams and the data file's hash (not --data: a file is the
    same data however its path is spelled): none changes unnoticed."""
    names = ("seed", "test_chrom", "val_chrom", *names)
    return {"data_sha256": data.sha256, "stream_seed": cfg.stream_seed, **{n: getattr(cfg, n) for n in names}}


def pretrain(cfg: Config, train: DnaData, val: DnaData, device) -> nn.Module:
    """Stage 2: the MDLM denoiser, trained on the training chromosomes with sepo.pretrain_loss."""
    torch.manual_seed(cfg.stream_seed)
    model = DilatedCNNDenoiser(cfg.hidden, cfg.stacks).to(device)
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.stream_seed))
    xtr, xval = train.x.to(device), val.x[order[:2048]].to(device)  # 2048 at random: a file may be sorted

    def val_loss() -> dict:
        g = torch.Generator(device).manual_seed(cfg.stream_seed + 7)
        with torch.no_grad():
            losses = [sepo.pretrain_loss(model.eval(), GRAPH, NOISE, xb, generator=g).item()
                      for xb in xval.split(256)]
        return {"val_loss": float(np.mean(losses))}
    loss = lambda i, g: sepo.pretrain_loss(model, GRAPH, NOISE, xtr[i], generator=g)
    train_loop("pretrain", model, loss, len(xtr), cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr,
               os.path.join(cfg.out, "pretrain.pt"), keys(cfg, train, *PRETRAIN_KEYS), cfg.stream_seed,
               cfg.val_every, val_loss)
    return model.eval().requires_grad_(False)


def train_oracles(cfg: Config, train: DnaData, test: DnaData, device) -> tuple[dict, dict]:
    """Stage 3: fine-tuning and evaluation oracles on chromosome-disjoint halves of the training chromosomes,
    and the accessibility CNN on the evaluation oracle's half (it shares no data with the fine-tuning one)."""
    halves = oracle_chromosomes(train.chrom, cfg.test_chrom, cfg.val_chrom)
    print(f"[data] fine-tuning oracle on {','.join(halves[0])}; evaluation oracle on {','.join(halves[1])}")
    models, report, kind = {}, {}, train.kind
    for j, name in enumerate(("ft_oracle", "eval_oracle", "access")):
        part = train.subset(np.isin(train.chrom, halves[min(j, 1)]))
        torch.manual_seed(cfg.stream_seed + 10 + j)
        if name == "access":  # balanced classes: p > 0.5 means "HepG2 more likely than not"
            m, y = AccessibilityCNN().to(device), part.hepg2().float().to(device)
            w = (1 - y).sum() / y.sum().clamp(min=1)
            loss = lambda out, t: F.binary_cross_entropy_with_logits(out, t, pos_weight=w)
            epochs, settings = cfg.access_epochs, keys(cfg, train, *ACCESS_KEYS)
        else:
            m = EnformerOracle(len(CELL_TYPES) if kind == "encode" else 3, cfg.oracle_dim, cfg.oracle_depth,
                               cfg.oracle_heads, cfg.oracle_downsamples).to(device)
            y, loss = part.y, F.cross_entropy if kind == "encode" else F.mse_loss
            epochs, settings = cfg.oracle_epochs, keys(cfg, train, *ORACLE_KEYS)
        xo, yo = part.x.to(device), y.to(device)
        steps = max(1, round(epochs * len(part) / cfg.oracle_batch))
        fit = lambda i, g, m=m, f=loss, xo=xo, yo=yo: f(m(xo[i]), yo[i])
        held_out = lambda m=m, name=name: held_out_metrics(name, predict(m, test.x), test)
        report[name] = train_loop(name, m, fit, len(part), steps, cfg.oracle_batch, cfg.oracle_lr,
                                  os.path.join(cfg.out, f"{name}.pt"), settings, cfg.stream_seed + 10 + j, 0,
                                  held_out)
        models[name] = m.eval().requires_grad_(False)
        if any(k.endswith("auroc") and v < 0.6 for k, v in report[name].items()):  # seeds differ: docs/dna.md
            print(f"[oracles] WARNING: {name} is near chance on {cfg.test_chrom}: {fmt(report[name])}")
    scores = [hepg2_score(predict(models[k], test.x), kind) for k in ("ft_oracle", "eval_oracle")]
    report["agreement"] = pearson(*scores)
    print(f"[oracles] test-chromosome Pearson of the two oracles' HepG2 scores: {report['agreement']:.3f}")
    return models, report


def sepo_config(cfg: Config, corrector_steps: int) -> sepo.SEPOConfig:
    """SEPO's settings: the shared flags (train_common.sepo_settings), GRPO's group-normalised advantage, and
    a stream of its own for each of the two runs."""
    return sepo_settings(cfg, corrector_steps=corrector_steps, advantage="grpo", amp=cfg.amp,
                         seed=cfg.stream_seed + 30 + corrector_steps)


def finetune(cfg: Config, policy: nn.Module, pretrained: nn.Module, reward_fn, corrector_steps: int,
             settings: dict, probe: Optional[Callable] = None) -> tuple[nn.Module, list, list]:
    """Stage 4: sepo.SEPO trains policy, a copy of the pre-trained model, its KL reference; train_common.
    train_sepo resumes it from --out, prints a line per iteration, checkpoints and calls probe(model) every
    ckpt_every iterations. settings key the checkpoint on what it builds on (reward, probes' scorers): no
    stale run is reused. -> (model, history, probes)"""
    trainer = sepo.SEPO(policy, GRAPH, NOISE, reward_fn, SEQ_LEN, sepo_config(cfg, corrector_steps),
                        ref_model=pretrained)
    tag = "sepo_gf" if corrector_steps else "sepo"
    settings = {**settings, **dataclasses.asdict(trainer.cfg), "world_size": WORLD}
    history, probes = train_sepo(trainer, tag, os.path.join(cfg.out, f"{tag}.pt"), settings, cfg.iters,
                                 cfg.ckpt_every, probe)
    return trainer.model.eval().requires_grad_(False), history, probes


def sepo_runs(cfg: Config) -> list[tuple[str, int]]:
    """(name, corrector steps) of the SEPO runs: plain, and with the gradient-flow corrector."""
    return [("SEPO", 0)] + ([("SEPO with GF", cfg.corrector_steps)] if cfg.corrector_steps else [])


# ---------------------------------------------------------------------------- the default run's evaluation
def draw(cfg: Config, model: nn.Module, n: int, corrector_steps: int, seed: int) -> Tensor:
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    x = sepo.sample(model, GRAPH, NOISE, n, SEQ_LEN, cfg.steps, corrector_steps, generator=g, batch_size=512)
    return x.cpu()


def save_samples(cfg: Config, rows: dict) -> None:
    for name, x in rows.items():  # samples_pre-trained.txt, samples_sepo.txt, ...
        tag = name.split(" (")[0].replace(" ", "_").lower()
        save_atomic("\n".join(decode_sequences(x)) + "\n", os.path.join(cfg.out, f"samples_{tag}.txt"))


def evaluate(cfg: Config, score, pretrained: nn.Module, runs: dict, models: dict, test: DnaData
             ) -> tuple[dict, list]:
    """Stage 5: the table's rows, and best-of-N from one pool of pre-trained samples for N = 1, 2, 4, ..."""
    rows = {"Pre-trained": draw(cfg, pretrained, cfg.n_eval, 0, cfg.stream_seed + 100)}
    for j, (name, (gf, model, _, _)) in enumerate(runs.items()):
        rows[name] = draw(cfg, model, cfg.n_eval, gf, cfg.stream_seed + 101 + j)
    n_match = sampling_budget(cfg, cfg.n_eval)
    n_pool = max(cfg.bon_max, n_match)
    pool = draw(cfg, pretrained, cfg.n_eval * n_pool, 0, cfg.stream_seed + 110).view(cfg.n_eval, n_pool, -1)
    reward = hepg2_score(predict(models["ft_oracle"], pool.flatten(0, 1)), test.kind).view(cfg.n_eval, n_pool)
    rows[f"Best-of-{n_match} (ft oracle)"] = best_of(pool, reward, n_match)
    rows[f"Data ({cfg.test_chrom}, HepG2)"] = top_hepg2(test, cfg.n_eval)  # chosen as the reference set is
    save_samples(cfg, rows)
    results = {name: {**score(x), "n": len(x)} for name, x in rows.items()}  # n: the Data row's may be short
    return results, [{"N": n, **score(best_of(pool, reward, n))} for n in bon_sizes(cfg.bon_max)]


def report(cfg: Config, results: dict, bon: list, runs: dict, oracles: dict, stamps: dict) -> None:
    cols = ["Pred-Activity", "ATAC-Acc %", "3-mer corr", "JASPAR corr", "App-Log-Lik", "Reward (ft oracle)"]
    what = ("HepG2 log-odds (DHS cell-type specificity)" if "hepg2_auroc" in str(oracles)
            else "predicted HepG2 MPRA activity")
    tests = "; ".join(f"{k} {fmt({m: v for m, v in r.items() if m.startswith('test')})}"
                      for k, r in oracles.items() if k != "agreement")
    short = "".join(f" ({name}: {r['n']}, all there are)" for name, r in results.items()
                    if r["n"] < cfg.n_eval)  # a small test chromosome's Data row
    note = (f"{cfg.n_eval} samples per row{short}, {cfg.steps} sampler steps, medians (metrics: "
            f"docs/dna.md); Pred-Activity: the evaluation oracle's {what}. Oracles on {cfg.test_chrom}: "
            f"{tests}; the two oracles agree at Pearson {oracles['agreement']:.3f}. Stage times (s): "
            f"{fmt(stamps)}.")
    history = {name: {"history": h, "probes": p} for name, (_, _, h, p) in runs.items()}
    saved = {"rows": results, "best_of_n": bon, "oracles": oracles, "stage_seconds": stamps, "runs": history}
    write_results(cfg, "results", results, cols, ["", note], saved)
    print(f"[done] trade-off figure: python docs/dna_tradeoff.py {cfg.out}")  # -> {cfg.out}/tradeoff.png


# ---------------------------------------------------------------------------- --drakes: the DRAKES release
def drakes_main(cfg: Config, device: torch.device) -> dict:
    """--drakes: no pre-training, no oracle training. SEPO fine-tunes the release's pretrained MDLM, its KL
    reference, on an oracle's HepG2 output; then DRAKES's evaluation of every row (docs/dna.md)."""
    clock = Stopwatch()
    # every file found, loaded and checked before --out exists (models/drakes.py)
    rel = load_release(cfg.drakes or None, cfg.release_files, cfg.atac_column, cfg.eval_steps, device)
    os.makedirs(cfg.out, exist_ok=True)
    oracle = rel[f"{cfg.reward_oracle}_oracle"]
    reward_fn = lambda x: oracle_predictions(oracle, x)[:, HEPG2].to(x.device)
    settings = {"reward_oracle": cfg.reward_oracle, "reward_sha256": file_sha256(oracle.info["source"]),
                "pretrained_sha256": file_sha256(rel["paths"]["pretrained"])}
    clock.lap("load")
    runs = {}  # name: (corrector steps, model, history)
    for name, gf in sepo_runs(cfg):  # the copy keeps what the release froze frozen (the CNN's Fourier W)
        policy = copy.deepcopy(rel["pretrained"])
        runs[name] = (gf, *finetune(cfg, policy, rel["pretrained"], reward_fn, gf, settings)[:2])
    clock.lap("sepo")
    if RANK:  # the evaluation and the report are rank 0's
        return {}
    # every row drawn by DRAKES's sampler; best-of-N at SEPO's sampling budget, picked by SEPO's reward
    models = {name: (rel[k], 0) for k, name in DRAKES_ROWS.items() if k in rel}
    models.update({name: (model, gf) for name, (gf, model, _) in runs.items()})
    n = sampling_budget(cfg, cfg.n_eval)
    rows = table_samples(rel["pretrained"], models, reward_fn, cfg.n_eval, cfg.eval_steps, n,
                         f"Best-of-{n} ({cfg.reward_oracle} oracle)")
    save_samples(cfg, rows)
    results = {name: rel["scorer"](x) for name, x in rows.items()}
    clock.lap("evaluation")
    stamps = clock.seconds()
    trained = {"ft": "on the fine-tuning oracle (DRAKES's protocol)",
               "eval": "on the evaluation oracle (as the SEPO reference code), the one Pred-Activity reads"}
    note = (f"SEPO and best-of-N trained {trained[cfg.reward_oracle]}. ATAC-Acc reads column "
            f"{cfg.atac_column} ({rel['atac_task']}) of the ATAC model. {cfg.n_eval} samples per row by "
            f"DRAKES's {cfg.eval_steps}-step sampler (seed 0); medians; DRAKES's metrics (docs/dna.md). "
            f"Stage times (s): {fmt(stamps)}.")
    published = ["Published numbers (not computed by this run; sources in data/drakes.py):", "",
                 published_table()]
    saved = {"rows": results, "reward_oracle": cfg.reward_oracle, "atac_column": cfg.atac_column,
             "atac_task": rel["atac_task"], "release": rel["paths"], "stage_seconds": stamps,
             "published": PUBLISHED, "runs": {name: {"history": h} for name, (_, _, h) in runs.items()}}
    write_results(cfg, "results_drakes", results, list(METRICS), ["", note, ""] + published, saved)
    return results


# ---------------------------------------------------------------------------- --bench, and main
def bench(cfg: Config, device: torch.device) -> dict:
    """Time one SEPO iteration (plain, and with the corrector) at these settings with an untrained denoiser
    and oracle, or --drakes's (random weights of their shapes if absent); peak GPU memory on CUDA."""
    torch.manual_seed(cfg.stream_seed)
    if cfg.release:
        model, oracle = bench_networks(cfg.drakes or None, cfg.release_files, cfg.reward_oracle, device)
        reward_fn = lambda x: oracle_predictions(oracle, x)[:, HEPG2].to(x.device)
    else:
        model = DilatedCNNDenoiser(cfg.hidden, cfg.stacks).to(device)
        oracle = EnformerOracle(4, cfg.oracle_dim, cfg.oracle_depth, cfg.oracle_heads, cfg.oracle_downsamples)
        oracle = oracle.to(device)
        reward_fn = lambda x: hepg2_score(predict(oracle, x), "encode")
    size = sum(p.numel() for p in model.parameters()) / 1e6
    what = f"samples of a {size:.2f}M-parameter denoiser on {device}"
    out = {}
    for gf in sorted({0, cfg.corrector_steps}):
        trainer = sepo.SEPO(model, GRAPH, NOISE, reward_fn, SEQ_LEN, sepo_config(cfg, gf))
        out[f"step_s_gf{gf}"] = timed_step(trainer, device, what)[0]
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    sepo_config(cfg, cfg.corrector_steps)  # a bad SEPO setting fails now, not after pre-training
    device = setup(cfg)
    if cfg.bench:
        return bench(cfg, device)
    if cfg.release:
        return drakes_main(cfg, device)
    os.makedirs(cfg.out, exist_ok=True)
    clock = Stopwatch()
    data = load_data(cfg.data)
    split = split_by_chromosome(data, cfg.test_chrom, cfg.val_chrom)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in split.items())
    print(f"[data] {len(data)} sequences ({data.kind}): {sizes}")
    pretrained = rank0_first(pretrain, cfg, split["train"], split["val"], device)
    clock.lap("pretrain")
    models, oracle_report = rank0_first(train_oracles, cfg, split["train"], split["test"], device)
    clock.lap("oracles")
    score = DnaScorer(models, pretrained, GRAPH, NOISE, split["train"], cfg.elbo_t, cfg.stream_seed + 200)
    reward_fn = lambda x: hepg2_score(predict(models["ft_oracle"], x), data.kind).to(x.device)  # the reward
    # SEPO's checkpoints are keyed on every stage they build on: their reward, and their probes' scorers
    settings = keys(cfg, split["train"], *PRETRAIN_KEYS, *ORACLE_KEYS, *ACCESS_KEYS, "ckpt_every", "n_eval",
                    "elbo_t")
    runs = {}  # name: (corrector steps, model, history, probes)
    for name, gf in sepo_runs(cfg):
        probe = lambda m, gf=gf: {} if RANK else score(draw(cfg, m, cfg.n_eval, gf, cfg.stream_seed + 150))
        policy = copy.deepcopy(pretrained).requires_grad_(True)
        runs[name] = (gf, *finetune(cfg, policy, pretrained, reward_fn, gf, settings, probe))
    clock.lap("sepo")
    if RANK:  # the evaluation and the report are rank 0's
        return {}
    results, bon = evaluate(cfg, score, pretrained, runs, models, split["test"])
    clock.lap("evaluation")
    report(cfg, results, bon, runs, oracle_report, clock.seconds())
    return results


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
