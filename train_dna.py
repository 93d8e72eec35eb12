"""SEPO on real regulatory DNA: the paper's DNA experiment (Section 4.2), end to end.

    python train_dna.py                       # CPU, minutes: the whole pipeline at small size
    python train_dna.py --preset gpu          # one GPU: larger models, 128 sampler steps
    python train_dna.py --preset paper        # the paper's settings (docs/math.md §10)
    python train_dna.py --data gosai_all.csv  # the Gosai MPRA table: seq,hepg2,k562,sknsh[,chr]
    python train_dna.py --preset paper --bench  # time one SEPO iteration, print peak GPU memory

Stages, each cached in --out and resumable: data (data/dna.py), pre-training, oracles, SEPO (plain and with the
gradient-flow corrector), evaluation against best-of-N. docs/dna.md explains the data, metrics and results.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import sepo
from data.dna import (CELL_TYPES, SEQ_LEN, DnaData, auroc, chrom_name, decode_sequences, hepg2_score, kmer_counts, load_data,
                      load_jaspar_pwms, motif_hits, oracle_chromosomes, pearson, spearman, split_by_chromosome, top_hepg2)

GRAPH, NOISE = sepo.Masked(4), sepo.LogLinear()  # the DNA diffusion: MDLM's absorbing graph over A, C, G, T


# ---------------------------------------------------------------------------- configuration
def arg(default, help: str, choices: Optional[tuple] = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    preset: str = arg("cpu", "cpu: minutes on a laptop; gpu: one GPU; paper: the paper's settings", ("cpu", "gpu", "paper"))
    data: str = arg("", "'' = the vendored ENCODE DHS file; .csv(.gz) = a Gosai table seq,hepg2,k562,sknsh[,chr]")
    out: str = arg("runs/dna", "output folder: cached stages, checkpoints, table, plots, samples")
    seed: int = arg(0, "stage k draws from seed 1000 * seed + k: runs are reproducible and seeds share no stream")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    bench: bool = arg(False, "only time one SEPO iteration (plain and with the corrector) with untrained models")
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
    kl_target: float = arg(0.0, "a KL budget: alpha = --kl-coef + lambda, lambda >= 0, keeps the path KL at most it (0: none)")
    kl_gain: float = arg(0.5, "--kl-target: lambda += kl_gain * min(KL / target - 1, 1) each iteration (docs/math.md §7)")
    kl_steps: int = arg(16, "the path KL covers the last kl_steps sampler steps (capped at --steps)")
    snis: int = arg(2, "M latent paths per sample (SNIS ratio, --grad path)")
    steps: int = arg(16, "sampler steps (rollouts and evaluation)")
    corrector_steps: int = arg(1, "corrector steps per sampler step of the 'SEPO with GF' run (0: skip that run)")
    pl_positions: int = arg(32, "--grad pl: masked positions per sample")
    grad: str = arg("pl", "grad log pi estimator (pl: the paper's; docs/math.md §3-4)", ("pl", "path", "rollout"))
    ratio: str = arg("snis", "importance ratio (snis: the paper's; docs/math.md §5)", ("snis", "rollout"))
    path_steps: int = arg(0, "--grad path/rollout: transitions with gradient per path (0: all)")
    micro_batch: int = arg(0, "samples per gradient pass (0: all); bounds memory, same update")
    amp: str = arg("none", "bf16: autocast of the rollout and gradient passes", ("none", "bf16"))
    ckpt_every: int = arg(10, "SEPO iterations between checkpoints (each also evaluated for the trade-off plot)")
    n_eval: int = arg(640, "samples per evaluated model (paper: 640)")
    bon_max: int = arg(8, "best-of-N curve for N = 1, 2, 4, ... and bon_max")
    elbo_t: int = arg(4, "Monte-Carlo times per sequence for App-Log-Lik")

    @property
    def stream_seed(self) -> int:  # stage k draws from stream_seed + k, k < 1000: two seeds share no stream
        return 1000 * self.seed


PRESETS = {
    "cpu": {},
    # One GPU: a 3.3M-parameter denoiser, 128 sampler steps.
    "gpu": dict(hidden=128, stacks=4, pretrain_steps=6000, pretrain_batch=256, pretrain_lr=1e-3, val_every=500, oracle_dim=96,
                oracle_depth=2, oracle_heads=4, oracle_downsamples=3, oracle_epochs=4, iters=60, lr=1e-4, batch=8, group=8,
                kl_coef=0.2, kl_steps=128, snis=4, steps=128, pl_positions=16, ckpt_every=10, bon_max=64, elbo_t=8),
    # The paper's settings (docs/math.md §10); the denoiser follows the DRAKES CNN layout.
    "paper": dict(hidden=128, stacks=4, pretrain_steps=100_000, pretrain_batch=256, pretrain_lr=1e-3, val_every=5000,
                  oracle_dim=192, oracle_depth=4, oracle_heads=8, oracle_downsamples=3, oracle_epochs=10, oracle_lr=5e-4,
                  access_epochs=10, iters=500, lr=1e-4, batch=8, group=8, epochs=2, clip_eps=0.2, kl_coef=0.05, kl_steps=10,
                  snis=4, steps=128, pl_positions=16, ckpt_every=25, bon_max=64, elbo_t=16),
}
POSITIVE = ("hidden", "stacks", "pretrain_steps", "pretrain_batch", "pretrain_lr", "oracle_dim", "oracle_heads",
            "oracle_downsamples", "oracle_epochs", "oracle_batch", "oracle_lr", "access_epochs", "ckpt_every", "n_eval",
            "bon_max", "elbo_t", "kl_gain")


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags from the Config fields: an explicit flag wins over --preset, which wins over the field's default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kind = (dict(action="store_true", default=None) if f.type == "bool" else
                dict(type=chrom_name if f.name.endswith("_chrom") else type(f.default), choices=f.metadata["choices"]))
        p.add_argument("--" + f.name.replace("_", "-"), help=f"{f.metadata['help']} (default: {f.default!r})", **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = Config(**{**PRESETS[given.get("preset", "cpu")], **given})
    for k, v in dataclasses.asdict(cfg).items():  # fail now, not after pre-training; `not >=` also catches NaN
        if isinstance(v, (int, float)) and not (v > 0 if k in POSITIVE else v >= 0):
            raise ValueError(f"--{k.replace('_', '-')} must be {'> 0' if k in POSITIVE else '>= 0'}, got {v}")
    if cfg.batch % WORLD:
        raise ValueError(f"--batch {cfg.batch} is the groups of all {WORLD} processes together: make it divisible by {WORLD}")
    return cfg


# ---------------------------------------------------------------------------- models
class DilatedCNNDenoiser(nn.Module):
    """MDLM denoiser p_theta(x_0 | x_t): residual dilated 1-d convolutions (the DRAKES DNA layout: stacks of
    dilations 1, 1, 4, 16, 64), time-conditioned on sigmabar by a learned per-layer shift."""

    def __init__(self, hidden: int = 32, stacks: int = 1, kernel: int = 9):
        super().__init__()
        dil = [d for _ in range(stacks) for d in (1, 1, 4, 16, 64)]
        self.embed = nn.Embedding(5, hidden)  # A, C, G, T, MASK
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)
        self.time = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden * len(dil)))
        self.norms = nn.ModuleList(nn.GroupNorm(1, hidden) for _ in dil)  # channels-first: fast on CPU
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, dilation=d, padding=d * (kernel // 2)) for d in dil)
        self.out = nn.Conv1d(hidden, 4, 1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = torch.log(sigma.float().clamp(min=1e-4))[:, None] * self.freqs  # log sigmabar spans the schedule
        shift = self.time(torch.cat([s.sin(), s.cos()], -1)).view(len(x), len(self.convs), -1, 1)
        h = self.embed(x).transpose(1, 2)  # [B, hidden, L]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = h + conv(F.gelu(norm(h) + shift[:, i]))
        return self.out(h).transpose(1, 2)  # [B, L, 4] logits over A, C, G, T


class EnformerOracle(nn.Module):
    """Enformer trunk (enformer-pytorch, random init, small dims, no hub weights) + mean pooling + linear head."""

    def __init__(self, n_out: int, dim: int = 48, depth: int = 1, heads: int = 2, downsamples: int = 4):
        super().__init__()
        from enformer_pytorch import Enformer
        if (dim // heads) % 6 or dim % heads or downsamples < 3:
            raise ValueError(f"Enformer needs dim // heads a multiple of 6, >= 3 downsamples: {dim=} {heads=} {downsamples=}")
        self.trunk = Enformer.from_hparams(dim=dim, depth=depth, heads=heads, attn_dim_key=max(dim // heads, 8),
                                           num_downsamples=downsamples, dim_divisible_by=dim // 4, target_length=-1,
                                           output_heads=dict(human=1), dropout_rate=0.1, attn_dropout=0.05, pos_dropout=0.01)
        self.head = nn.Linear(2 * dim, n_out)
        for parent in list(self.modules()):  # under torchrun enformer-pytorch picks SyncBatchNorm; an oracle is one rank's
            for name in [n for n, m in parent.named_children() if isinstance(m, nn.SyncBatchNorm)]:
                setattr(parent, name, nn.BatchNorm1d(getattr(parent, name).num_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(F.one_hot(x, 4).float(), return_only_embeddings=True).mean(1))


class AccessibilityCNN(nn.Module):
    """A plain CNN (deliberately not Enformer) calling 'accessible in HepG2' from sequence: the ATAC-Acc analogue."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(4, hidden, 15, padding=7), nn.ReLU(), nn.MaxPool1d(4),
                                 nn.Conv1d(hidden, hidden, 7, padding=3), nn.ReLU(), nn.MaxPool1d(4),
                                 nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1),
                                 nn.Flatten(), nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(F.one_hot(x, 4).float().transpose(1, 2)).squeeze(-1)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model.eval()(xb.to(dev)).float().cpu() for xb in x.split(batch)]) if len(x) else torch.empty(0)


# ---------------------------------------------------------------------------- stages: cached, resumable
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun; alone: 0, 1


def setup(cfg: Config) -> torch.device:
    """The device; under torchrun also the process group (NCCL and a GPU per process, or gloo on the CPU)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if WORLD > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
        sys.stdout = sys.stdout if RANK == 0 else open(os.devnull, "w")
    return device


def rank0_first(stage: Callable, *args):
    """stage(*args) on rank 0, then on the other ranks, which load what it cached in --out: each model trains once."""
    out = stage(*args) if RANK == 0 else None
    if WORLD > 1:
        dist.barrier()
    return stage(*args) if RANK else out


def save_atomic(obj, path: str) -> None:
    """Text or torch.save to a temporary file, then os.replace: a crash never leaves a half-written file."""
    if RANK:  # rank 0 alone writes: the ranks hold the same models, and a SEPO state every rank's streams
        return
    Path(f"{path}.tmp").write_text(obj) if isinstance(obj, str) else torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_ckpt(path: str, settings: dict) -> Optional[dict]:
    """The checkpoint at path, or None; one made with other settings is an error, never a silent reuse."""
    ck = torch.load(path, map_location="cpu", weights_only=False) if os.path.exists(path) else None
    diff = {k: (ck["settings"].get(k), v) for k, v in settings.items() if ck and ck["settings"].get(k) != v}
    if diff:
        raise ValueError(f"{path} was made with other settings {diff} (saved, requested); use another --out or delete it")
    return ck


PRETRAIN_KEYS = ("hidden", "stacks", "pretrain_steps", "pretrain_batch", "pretrain_lr", "val_every")
ORACLE_KEYS = ("oracle_dim", "oracle_depth", "oracle_heads", "oracle_downsamples", "oracle_epochs", "oracle_batch",
               "oracle_lr")
ACCESS_KEYS = ("access_epochs", "oracle_batch", "oracle_lr")


def keys(cfg: Config, data: DnaData, *names: str) -> dict:
    """A stage's settings, the base of its random streams and the data file's hash: none changes unnoticed."""
    names = ("data", "seed", "test_chrom", "val_chrom", *names)
    return {"data_sha256": data.sha256, "stream_seed": cfg.stream_seed, **{n: getattr(cfg, n) for n in names}}


def train_loop(name: str, model: nn.Module, loss_fn: Callable[[Tensor, torch.Generator], Tensor], n: int,
               steps: int, batch: int, lr: float, path: str, settings: dict, seed: int, every: int = 0,
               val_fn: Callable[[], dict] = dict) -> dict:
    """AdamW + cosine decay on random minibatches of indices [0, n); a checkpoint every `every` steps and at
    the end, and an exact resume from it. -> metrics: the smoothed training loss and val_fn's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    device = next(model.parameters()).device
    gen, mgen = torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed + 1)
    step, run, metrics, tic, ck = 0, 0.0, {}, time.perf_counter(), load_ckpt(path, settings)
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ck["step"] == steps:  # finished; validation re-measured: a cached model is judged on this code's held-out sets
            metrics = {**ck["metrics"], **val_fn()}
            print(f"[{name}] cached in {path}: {fmt(metrics)}")
            return metrics
        opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"]), mgen.set_state(ck["mgen"])
        step, run = ck["step"], ck["run"]  # run: the smoothed loss goes on where it was
        print(f"[{name}] resuming at step {step}/{steps}")
    while step < steps:
        model.train()
        loss = loss_fn(torch.randint(n, (batch,), generator=gen).to(device), mgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step()
        step, run = step + 1, loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step == steps or (every and step % every == 0):
            metrics = {"train_loss": run, "step": step, **val_fn()}
            print(f"[{name}] step {step}/{steps} {fmt(metrics)} ({time.perf_counter() - tic:.0f}s)", flush=True)
            save_atomic(dict(settings=settings, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                             gen=gen.get_state(), mgen=mgen.get_state(), step=step, run=run, metrics=metrics), path)
    return metrics


def fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def pretrain(cfg: Config, train: DnaData, val: DnaData, device) -> nn.Module:
    """Stage 2: the MDLM denoiser, trained on the training chromosomes with sepo.pretrain_loss."""
    torch.manual_seed(cfg.stream_seed)
    model = DilatedCNNDenoiser(cfg.hidden, cfg.stacks).to(device)
    pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.stream_seed))[:2048]  # a file may be sorted
    xtr, xval = train.x.to(device), val.x[pick].to(device)

    def val_loss() -> dict:
        g = torch.Generator(device).manual_seed(cfg.stream_seed + 7)
        with torch.no_grad():
            return {"val_loss": float(np.mean([sepo.pretrain_loss(model.eval(), GRAPH, NOISE, xb, generator=g).item()
                                               for xb in xval.split(256)]))}
    train_loop("pretrain", model, lambda i, g: sepo.pretrain_loss(model, GRAPH, NOISE, xtr[i], generator=g), len(xtr),
               cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, os.path.join(cfg.out, "pretrain.pt"),
               keys(cfg, train, *PRETRAIN_KEYS), cfg.stream_seed, cfg.val_every, val_loss)
    return model.eval().requires_grad_(False)


def train_oracles(cfg: Config, train: DnaData, test: DnaData, device) -> tuple[dict, dict]:
    """Stage 3: fine-tuning and evaluation oracles on chromosome-disjoint halves of the training chromosomes,
    and the accessibility CNN on the evaluation oracle's half (it shares no data with the fine-tuning oracle)."""
    halves = oracle_chromosomes(train.chrom, cfg.test_chrom, cfg.val_chrom)
    print(f"[data] fine-tuning oracle on {','.join(halves[0])}; evaluation oracle on {','.join(halves[1])}")
    models, report, encode = {}, {}, train.kind == "encode"
    for j, name in enumerate(("ft_oracle", "eval_oracle", "access")):
        part = train.subset(np.isin(train.chrom, halves[min(j, 1)]))
        torch.manual_seed(cfg.stream_seed + 10 + j)
        if name == "access":  # balanced classes: p > 0.5 means "HepG2 more likely than not"
            m, y = AccessibilityCNN().to(device), part.hepg2().float().to(device)
            w = (1 - y).sum() / y.sum().clamp(min=1)
            loss = lambda out, t: F.binary_cross_entropy_with_logits(out, t, pos_weight=w)
            held_out = lambda m: {"test_auroc": auroc(predict(m, test.x), test.hepg2())}
            epochs, settings = cfg.access_epochs, keys(cfg, train, *ACCESS_KEYS)
        else:
            m, y = EnformerOracle(len(CELL_TYPES) if encode else 3, cfg.oracle_dim, cfg.oracle_depth, cfg.oracle_heads,
                                  cfg.oracle_downsamples).to(device), part.y
            loss = F.cross_entropy if encode else F.mse_loss
            held_out = lambda m: ({"test_hepg2_auroc": auroc(hepg2_score(predict(m, test.x), "encode"), test.hepg2())}
                                  if encode else {"test_hepg2_pearson": pearson(predict(m, test.x)[:, 0], test.y[:, 0])})
            epochs, settings = cfg.oracle_epochs, keys(cfg, train, *ORACLE_KEYS)
        xo, yo = part.x.to(device), y.to(device)
        report[name] = train_loop(name, m, lambda i, g, m=m, f=loss, xo=xo, yo=yo: f(m(xo[i]), yo[i]), len(part),
                                  max(1, round(epochs * len(part) / cfg.oracle_batch)), cfg.oracle_batch, cfg.oracle_lr,
                                  os.path.join(cfg.out, f"{name}.pt"), settings, cfg.stream_seed + 10 + j, 0,
                                  lambda m=m, h=held_out: h(m))
        models[name] = m.eval().requires_grad_(False)
        if any(k.endswith("auroc") and v < 0.6 for k, v in report[name].items()):  # seeds differ: docs/dna.md
            print(f"[oracles] WARNING: {name} is near chance on {cfg.test_chrom}: {fmt(report[name])}")
    report["agreement"] = pearson(*(hepg2_score(predict(models[k], test.x), train.kind) for k in ("ft_oracle", "eval_oracle")))
    print(f"[oracles] test-chromosome Pearson of the two oracles' HepG2 scores: {report['agreement']:.3f}")
    return models, report


def sepo_config(cfg: Config, corrector_steps: int) -> sepo.SEPOConfig:
    return sepo.SEPOConfig(lr=cfg.lr, batch_size=cfg.batch // WORLD, group_size=cfg.group, epochs=cfg.epochs,
                           clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, kl_target=cfg.kl_target or None,
                           kl_gain=cfg.kl_gain, kl_steps=min(cfg.kl_steps, cfg.steps), snis_samples=cfg.snis, steps=cfg.steps,
                           corrector_steps=corrector_steps, advantage="grpo", pl_positions=cfg.pl_positions, grad=cfg.grad,
                           ratio=cfg.ratio, path_steps=cfg.path_steps or None, micro_batch=cfg.micro_batch or None,
                           amp=cfg.amp, seed=cfg.stream_seed + 30 + corrector_steps)


def finetune(cfg: Config, train: DnaData, pretrained: nn.Module, reward_fn, corrector_steps: int, tag: str,
             probe: Callable[[nn.Module, int], dict]) -> tuple[nn.Module, list, list]:
    """Stage 4: sepo.SEPO from the pre-trained weights; a line per iteration, a checkpoint (and a probe of the
    evaluation metrics, for the trade-off plot) every ckpt_every iterations. -> (model, history, probes)."""
    scfg = sepo_config(cfg, corrector_steps)
    trainer = sepo.SEPO(copy.deepcopy(pretrained).requires_grad_(True), GRAPH, NOISE, reward_fn, SEQ_LEN, scfg,
                        ref_model=pretrained)
    # keyed on every setting of the stages it builds on (its reward, its probes' scorers): no stale run is reused
    path = os.path.join(cfg.out, f"{tag}.pt")
    settings = {**keys(cfg, train, *PRETRAIN_KEYS, *ORACLE_KEYS, *ACCESS_KEYS, "ckpt_every", "n_eval", "elbo_t"),
                **dataclasses.asdict(scfg), "world_size": WORLD}
    ck, history, probes = load_ckpt(path, settings), [], []
    if ck is not None:
        trainer.load_state_dict(ck["trainer"])
        if len(ck["history"]) > cfg.iters:
            raise ValueError(f"{path} holds {len(ck['history'])} iterations, more than --iters {cfg.iters}; use another --out")
        history = ck["history"]
        # keep the every-ckpt_every probes (and this run's last): an earlier, shorter run also probed its last
        probes = [p for p in ck["probes"] if p["iteration"] % cfg.ckpt_every == 0 or p["iteration"] == cfg.iters]
        print(f"[{tag}] {'cached' if len(history) >= cfg.iters else 'resuming'}: {path} ({len(history)} iterations)")
    while len(history) < cfg.iters:
        s = trainer.step()
        history.append(s)
        print(f"[{tag}] it {len(history)}/{cfg.iters} reward {s['reward_mean']:+.3f}±{s['reward_std']:.2f} kl {s['kl']:.4f} "
              f"alpha {s['kl_coef']:.3g} clip {s['clip_frac']:.2f} ratio {s['ratio_mean']:.3f} {s['time']:.1f}s", flush=True)
        if len(history) % cfg.ckpt_every == 0 or len(history) == cfg.iters:
            probes.append({"iteration": len(history), **probe(trainer.model, corrector_steps)})
            save_atomic({"settings": settings, "trainer": trainer.state_dict(), "history": history, "probes": probes}, path)
    return trainer.model.eval().requires_grad_(False), history, probes


# ---------------------------------------------------------------------------- evaluation and report
def draw(cfg: Config, model: nn.Module, n: int, corrector_steps: int, seed: int) -> Tensor:
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return sepo.sample(model, GRAPH, NOISE, n, SEQ_LEN, cfg.steps, corrector_steps, generator=g, batch_size=512).cpu()


def make_scorer(cfg: Config, models: dict, pretrained: nn.Module, train: DnaData) -> Callable[[Tensor], dict]:
    """The table's metrics for samples x [N, 200]; reference set: the 1000 training sequences of highest HepG2
    signal (ENCODE: among the HepG2 DHS); JASPAR hits at relative PWM score >= 0.85 on either strand."""
    top, pwms, device = top_hepg2(train, 1000), load_jaspar_pwms()[1], next(pretrained.parameters()).device
    top_kmers, top_motifs = kmer_counts(top), motif_hits(top, pwms)

    def score(x: Tensor) -> dict:
        g = torch.Generator(device).manual_seed(cfg.stream_seed + 200)  # the same noise for every row: paired
        ll = sepo.elbo(pretrained, GRAPH, NOISE, x.to(device), cfg.elbo_t, generator=g, batch_size=256)
        return {"Pred-Activity": hepg2_score(predict(models["eval_oracle"], x), train.kind).median().item(),
                "ATAC-Acc %": 100 * (predict(models["access"], x) > 0).float().mean().item(),
                "3-mer corr": pearson(kmer_counts(x), top_kmers), "JASPAR corr": spearman(motif_hits(x, pwms), top_motifs),
                "App-Log-Lik": ll.median().item(),
                "Reward (ft oracle)": hepg2_score(predict(models["ft_oracle"], x), train.kind).median().item()}
    return score


def evaluate(cfg: Config, score, pretrained: nn.Module, runs: dict, models: dict, test: DnaData) -> tuple[dict, list]:
    """Stage 5: the table's rows, and best-of-N from one pool of pre-trained samples for N = 1, 2, 4, ..."""
    rows = {"Pre-trained": draw(cfg, pretrained, cfg.n_eval, 0, cfg.stream_seed + 100)}
    for j, (name, (gf, model, _, _)) in enumerate(runs.items()):
        rows[name] = draw(cfg, model, cfg.n_eval, gf, cfg.stream_seed + 101 + j)
    n_match = 1 + math.ceil(cfg.iters * cfg.batch * cfg.group / cfg.n_eval)  # SEPO's sampling budget
    n_pool = max(cfg.bon_max, n_match)
    pool = draw(cfg, pretrained, cfg.n_eval * n_pool, 0, cfg.stream_seed + 110).view(cfg.n_eval, n_pool, SEQ_LEN)
    reward = hepg2_score(predict(models["ft_oracle"], pool.flatten(0, 1)), test.kind).view(cfg.n_eval, n_pool)
    best = lambda n: pool[torch.arange(cfg.n_eval), reward[:, :n].argmax(1)]
    rows[f"Best-of-{n_match} (ft oracle)"] = best(n_match)
    rows[f"Data ({cfg.test_chrom}, HepG2)"] = top_hepg2(test, cfg.n_eval)  # chosen as the 3-mer/JASPAR reference set is
    for name, x in rows.items():  # samples_pre-trained.txt, samples_sepo.txt, ...
        tag = name.split(" (")[0].replace(" ", "_").lower()
        save_atomic("\n".join(decode_sequences(x)) + "\n", os.path.join(cfg.out, f"samples_{tag}.txt"))
    results = {name: score(x) for name, x in rows.items()}
    curve = [{"N": n, **score(best(n))} for n in sorted({2 ** k for k in range(cfg.bon_max.bit_length())} | {cfg.bon_max})]
    return results, curve


def report(cfg: Config, results: dict, bon: list, runs: dict, oracles: dict, stamps: dict) -> None:
    cols = ["Pred-Activity", "ATAC-Acc %", "3-mer corr", "JASPAR corr", "App-Log-Lik", "Reward (ft oracle)"]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.1f}" if "%" in c else f"{r[c]:.3f}" for c in cols) + " |"
              for name, r in results.items()]
    what = "HepG2 log-odds (DHS cell-type specificity)" if "hepg2_auroc" in str(oracles) else "predicted HepG2 MPRA activity"
    tests = "; ".join(f"{k} {fmt({m: v for m, v in r.items() if m.startswith('test')})}"
                      for k, r in oracles.items() if k != "agreement")
    lines += ["", f"{cfg.n_eval} samples per row, {cfg.steps} sampler steps, medians (metrics: docs/dna.md); "
              f"Pred-Activity: the evaluation oracle's {what}. Oracles on {cfg.test_chrom}: {tests}; the two "
              f"oracles agree at Pearson {oracles['agreement']:.3f}. Stage times (s): {fmt(stamps)}."]
    table = "\n".join(lines)
    print(table)
    history = {name: {"history": h, "probes": p} for name, (_, _, h, p) in runs.items()}
    save_atomic(table + "\n", os.path.join(cfg.out, "results.md"))
    save_atomic(json.dumps({"config": dataclasses.asdict(cfg), "rows": results, "best_of_n": bon, "oracles": oracles,
                            "stage_seconds": stamps, "runs": history}, indent=1), os.path.join(cfg.out, "results.json"))
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    fig = Figure(figsize=(12, 3.2))
    panels = {"reward_mean": "mean reward R(x)", "kl": "path KL to the pre-trained model", "clip_frac": "clip fraction"}
    for a, (key, title) in zip(fig.subplots(1, 3), panels.items()):
        for name, run in history.items():
            a.plot([s[key] for s in run["history"]], label=name)
        a.set(title=title, xlabel="SEPO iteration"), a.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(cfg.out, "curves.png"), dpi=110)
    print(f"[done] {cfg.out}: results.md, results.json, curves.png; trade-off figure: python docs/dna_tradeoff.py {cfg.out}")


def bench(cfg: Config, device: torch.device) -> dict:
    """Time one SEPO iteration (plain, and with the corrector) at these settings with an untrained denoiser and
    oracle; peak GPU memory on CUDA. (docs/bf16_error.py measures what --amp bf16 does to the ratios.)"""
    torch.manual_seed(cfg.stream_seed)
    model = DilatedCNNDenoiser(cfg.hidden, cfg.stacks).to(device)
    oracle = EnformerOracle(4, cfg.oracle_dim, cfg.oracle_depth, cfg.oracle_heads, cfg.oracle_downsamples).to(device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    reward_fn, cuda, out = lambda x: hepg2_score(predict(oracle, x), "encode"), device.type == "cuda", {}
    for gf in sorted({0, cfg.corrector_steps}):
        trainer = sepo.SEPO(model, GRAPH, NOISE, reward_fn, SEQ_LEN, sepo_config(cfg, gf))
        if cuda:
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        t = out[f"step_s_gf{gf}"] = trainer.step()["time"]  # step() reads its statistics back: CUDA has finished
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
        print(f"[bench] {cfg.batch}x{cfg.group} samples, {cfg.steps} steps, corrector_steps={gf}, {n_params:.2f}M-parameter "
              f"denoiser on {device}, grad {cfg.grad}, ratio {cfg.ratio}: one trainer.step() {t:.2f}s, peak GPU {mem:.2f} GiB")
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    sepo_config(cfg, cfg.corrector_steps)  # a bad SEPO setting fails now, not after pre-training
    device = setup(cfg)
    if cfg.bench:
        return bench(cfg, device)
    os.makedirs(cfg.out, exist_ok=True)
    tic, stamps = time.perf_counter(), {}
    data = load_data(cfg.data)
    split = split_by_chromosome(data, cfg.test_chrom, cfg.val_chrom)
    print(f"[data] {len(data)} sequences ({data.kind}): " + ", ".join(f"{k} {len(v)}" for k, v in split.items()))
    pretrained = rank0_first(pretrain, cfg, split["train"], split["val"], device)
    stamps["pretrain"] = time.perf_counter() - tic
    models, oracle_report = rank0_first(train_oracles, cfg, split["train"], split["test"], device)
    stamps["oracles"] = time.perf_counter() - tic - sum(stamps.values())
    score = make_scorer(cfg, models, pretrained, split["train"])
    reward_fn = lambda x: hepg2_score(predict(models["ft_oracle"], x), data.kind).to(x.device)  # the only reward
    probe = lambda m, gf: score(draw(cfg, m, cfg.n_eval, gf, cfg.stream_seed + 150)) if RANK == 0 else {}
    runs = {}  # name: (corrector steps, model, history, probes)
    for name, gf in [("SEPO", 0)] + ([("SEPO with GF", cfg.corrector_steps)] if cfg.corrector_steps else []):
        runs[name] = (gf, *finetune(cfg, split["train"], pretrained, reward_fn, gf, "sepo_gf" if gf else "sepo", probe))
    stamps["sepo"] = time.perf_counter() - tic - sum(stamps.values())
    if RANK:  # the evaluation and the report are rank 0's
        return {}
    results, bon = evaluate(cfg, score, pretrained, runs, models, split["test"])
    stamps["evaluation"] = time.perf_counter() - tic - sum(stamps.values())
    report(cfg, results, bon, runs, oracle_report, {**stamps, "total": time.perf_counter() - tic})
    return results


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
