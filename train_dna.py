"""SEPO on real regulatory DNA: the paper's DNA experiment (section 4.2) in miniature, end to end.

    python train_dna.py                      # CPU, minutes: the whole pipeline at small size
    python train_dna.py --preset paper       # the paper's settings (SEPO_MATH section 10), one GPU
    python train_dna.py --data gosai_all.csv # the Gosai MPRA table (seq,hepg2,k562,sknsh,chr...)

One story, top to bottom; every stage is cached in --out and resumes where it stopped:
  1. pre-train a masked diffusion model (MDLM, log-linear schedule) with a dilated-CNN denoiser;
  2. train reward models on chromosome-disjoint halves of the training chromosomes, both with the
     Enformer architecture (enformer-pytorch, small dims, no hub weights) plus a linear head:
     the FINE-TUNING oracle (the only reward SEPO ever sees) and the EVALUATION oracle; plus an
     independent accessibility CNN for the ATAC-Acc analogue;
  3. fine-tune with sepo.SEPO (GRPO advantages, clipped objective, truncated KL to the pre-trained
     model), without and with the gradient-flow corrector ("SEPO with GF");
  4. sample and evaluate: Pred-Activity (eval oracle), ATAC-Acc analogue, 3-mer and JASPAR motif
     correlations with the top HepG2 sequences, App-Log-Lik; plus best-of-N at equal budget.

Data. The default data are real ENCODE DNase-hypersensitive sites (DHS), 200 bp around the summit,
each specific to one of four cell types (data/encode_dhs_200bp.tsv.gz, see data/README.md). There is
no activity measurement here, so "Pred-Activity" is the evaluation oracle's HepG2 log-odds
log p(HepG2 | x) / (1 - p(HepG2 | x)) of a cell-type classifier: predicted HepG2 DHS *specificity*,
not MPRA enhancer activity as in the paper. With --data on a Gosai CSV the oracles regress measured
MPRA activity and Pred-Activity is predicted HepG2 activity, as in the paper.

Quick defaults vs the paper (section 10). To fit a 2-core CPU in minutes the default run uses tiny
models (52k-parameter denoiser and oracles), 16 sampler steps instead of 128, 4 x 8 samples per
iteration, M = 2 SNIS paths, 40 iterations, and a stronger KL anchor (alpha = 0.2 over all 16 steps
instead of 0.05 over the last 10 of 128; with alpha = 0.05 the tiny model drifts to AT-rich sequences
the oracle likes and the 3-mer correlation collapses) at lr 3e-4. --preset paper restores section 10.
One torch thread by default: with two threads on two busy cores OpenMP slowed every stage ~10x here.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gzip
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sepo

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "encode_dhs_200bp.tsv.gz")
BASES = "ACGT"
SEQ_LEN = 200
CELL_TYPES = ("GM12878", "HepG2", "K562", "hESCT0")  # ENCODE file; the HepG2 class is the target
GOSAI_TARGETS = ("hepg2", "k562", "sknsh")            # Gosai CSV; hepg2 is the target
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------
# 0. Configuration. Defaults: the quick CPU run; PAPER: SEPO_MATH section 10.
# ---------------------------------------------------------------------------


@dataclass
class Config:
    preset: str = field(default="quick", metadata={"help": "quick (CPU, minutes) or paper (section 10 settings, GPU); explicit flags override the preset"})
    data: str = field(default="", metadata={"help": "data file: '' = the vendored ENCODE DHS file; a .csv = Gosai format (seq,hepg2,k562,sknsh + chr/chrom/chromosome column)"})
    out: str = field(default="runs/dna", metadata={"help": "output folder: checkpoints (stages are cached and resumed), table, plots, samples"})
    seed: int = field(default=0, metadata={"help": "seed of every stage (runs are reproducible)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0 = torch default; 1 is the safe choice when other processes share the cores: OpenMP slows down badly when oversubscribed)"})
    test_chrom: str = field(default="chr1", metadata={"help": "held-out test chromosome (oracle accuracy, top sequences exclude it)"})
    val_chrom: str = field(default="chr2", metadata={"help": "validation chromosome (pre-training validation loss)"})
    # 1. masked diffusion model
    hidden: int = field(default=32, metadata={"help": "denoiser channels"})
    stacks: int = field(default=1, metadata={"help": "denoiser stacks of 5 dilated convolutions (dilations 1,1,4,16,64)"})
    kernel: int = field(default=9, metadata={"help": "denoiser convolution width"})
    pretrain_steps: int = field(default=500, metadata={"help": "pre-training optimizer steps"})
    pretrain_batch: int = field(default=64, metadata={"help": "pre-training batch size"})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "pre-training AdamW learning rate (cosine decay)"})
    val_every: int = field(default=200, metadata={"help": "pre-training steps between validation losses / checkpoints"})
    # 2. oracles
    oracle_dim: int = field(default=48, metadata={"help": "Enformer width (dim // heads must be a multiple of 6)"})
    oracle_depth: int = field(default=1, metadata={"help": "Enformer transformer layers"})
    oracle_heads: int = field(default=2, metadata={"help": "Enformer attention heads"})
    oracle_downsamples: int = field(default=4, metadata={"help": "Enformer pooling stages (>= 3; 200 bp / 2^k positions reach the transformer)"})
    oracle_epochs: float = field(default=2.0, metadata={"help": "epochs over its half of the training data, per oracle"})
    oracle_batch: int = field(default=128, metadata={"help": "oracle batch size"})
    oracle_lr: float = field(default=2e-3, metadata={"help": "oracle AdamW learning rate (cosine decay)"})
    # 3. SEPO
    iters: int = field(default=40, metadata={"help": "SEPO iterations per fine-tuned model"})
    lr: float = field(default=3e-4, metadata={"help": "SEPO Adam learning rate"})
    batch: int = field(default=4, metadata={"help": "SEPO groups per iteration"})
    group: int = field(default=8, metadata={"help": "GRPO group size G (samples per group)"})
    epochs: int = field(default=2, metadata={"help": "K gradient steps per iteration"})
    clip_eps: float = field(default=0.2, metadata={"help": "clipping eps of the PPO objective"})
    kl_coef: float = field(default=0.2, metadata={"help": "alpha, weight of the path KL to the pre-trained model"})
    kl_steps: int = field(default=16, metadata={"help": "the path KL covers the last kl_steps sampler steps (capped at --steps)"})
    snis: int = field(default=2, metadata={"help": "M latent paths per sample for the SNIS importance ratio"})
    steps: int = field(default=16, metadata={"help": "sampler steps (training rollouts and evaluation)"})
    pl_positions: int = field(default=32, metadata={"help": "masked positions per sample in grad log pi"})
    corrector_steps: int = field(default=1, metadata={"help": "gradient-flow corrector steps per sampler step of the 'SEPO with GF' run (0: skip that run)"})
    ckpt_every: int = field(default=10, metadata={"help": "SEPO iterations between checkpoints"})
    # 4. evaluation
    n_eval: int = field(default=640, metadata={"help": "samples per evaluated model (paper: 640)"})
    bon_n: int = field(default=0, metadata={"help": "best-of-N: N (0 = equal sampling budget: 1 + iters*batch*group/n_eval)"})
    elbo_t: int = field(default=4, metadata={"help": "Monte-Carlo times per sequence for App-Log-Lik (sepo.elbo)"})
    top_n: int = field(default=1000, metadata={"help": "size of the top-HepG2 reference set for the 3-mer and motif correlations"})
    motif_threshold: float = field(default=0.85, metadata={"help": "JASPAR hit: relative PWM score >= this (0..1, both strands)"})
    jaspar_release: str = field(default="JASPAR2024", metadata={"help": "pyjaspar release (offline SQLite in the package)"})
    bench: bool = field(default=False, metadata={"help": "only time one trainer.step() at the current settings (--preset paper --bench: the paper's) with untrained models, print peak GPU memory on CUDA, and exit"})


PAPER = dict(  # SEPO_MATH section 10; the denoiser follows the DFM/DRAKES CNN layout, the rest is ours
    hidden=128, stacks=4, pretrain_steps=100_000, pretrain_batch=256, pretrain_lr=1e-3, val_every=5000,
    oracle_dim=192, oracle_depth=4, oracle_heads=8, oracle_downsamples=3, oracle_epochs=10, oracle_lr=5e-4,
    iters=500, lr=1e-4, batch=8, group=8, epochs=2, clip_eps=0.2, kl_coef=0.05, kl_steps=10, snis=4,
    steps=128, pl_positions=16, corrector_steps=1, ckpt_every=25, n_eval=640, elbo_t=16,
)


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags from the Config fields; --preset paper changes the defaults, explicit flags win."""
    def build(defaults: dict) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in dataclasses.fields(Config):
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                p.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
                kw = dict(choices=("quick", "paper")) if f.name == "preset" else {}
                p.add_argument(flag, type=typ, default=defaults.get(f.name, f.default), help=f.metadata["help"], **kw)
        return p
    pre = build({}).parse_args(argv)
    if pre.preset == "paper":
        pre = build(PAPER).parse_args(argv)
    return Config(**vars(pre))


# ---------------------------------------------------------------------------
# 1. Data: load, validate (every error names the row), split by chromosome.
# ---------------------------------------------------------------------------


@dataclass
class DnaData:
    x: Tensor                  # [N, 200] long, A,C,G,T = 0..3
    chrom: np.ndarray          # [N] str
    label: Optional[Tensor]    # ENCODE: [N] cell-type index into CELL_TYPES
    activity: Optional[Tensor] # Gosai: [N, 3] measured activity (hepg2, k562, sknsh)
    signal: Tensor             # [N] ranking score of the top-HepG2 set (DHS signal / HepG2 activity)
    kind: str                  # "encode" or "gosai"

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: np.ndarray) -> "DnaData":
        t = torch.as_tensor(idx, dtype=torch.long)
        return DnaData(self.x[t], self.chrom[idx], None if self.label is None else self.label[t],
                       None if self.activity is None else self.activity[t], self.signal[t], self.kind)


_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _b in enumerate(BASES):
    _LUT[ord(_b)] = _LUT[ord(_b.lower())] = _i


def encode_sequences(seqs: list[str], length: int = SEQ_LEN, rows: Optional[list[int]] = None) -> Tensor:
    """ACGT strings -> LongTensor[N, length]; a wrong length or a letter outside ACGT (case-insensitive)
    raises ValueError naming the row (1-based data row, or rows[i] when given) and the position."""
    name = (lambda i: f"row {rows[i] if rows is not None else i + 1}")
    for i, s in enumerate(seqs):
        if len(s) != length:
            raise ValueError(f"{name(i)}: sequence has length {len(s)}, expected {length}")
    if not seqs:
        return torch.empty(0, length, dtype=torch.long)
    raw = np.frombuffer("".join(seqs).encode("latin-1", errors="replace"), dtype=np.uint8)
    codes = _LUT[raw].reshape(len(seqs), length)
    bad = np.argwhere(codes == 255)
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"{name(i)}: invalid base {seqs[i][j]!r} at position {j + 1} (only A, C, G, T allowed)")
    return torch.from_numpy(codes.astype(np.int64))


def decode_sequences(x: Tensor) -> list[str]:
    return ["".join(BASES[v] for v in row) for row in x.tolist()]


def _read_table(path: str, delimiter: str) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise ValueError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    for i, r in enumerate(rows[1:], 1):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {i} has {len(r)} fields, the header has {len(header)}")
    return header, rows[1:]


def _column(path: str, header: list[str], *names: str) -> int:
    for n in names:
        if n in header:
            return header.index(n)
    raise ValueError(f"{path}: missing column {' or '.join(map(repr, names))} (header: {header})")


def _floats(path: str, rows: list[list[str]], col: int, name: str) -> Tensor:
    out = []
    for i, r in enumerate(rows, 1):
        try:
            v = float(r[col])
        except ValueError:
            raise ValueError(f"{path}: row {i}: column {name!r} is not a number: {r[col]!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"{path}: row {i}: column {name!r} is not finite: {r[col]!r}")
        out.append(v)
    return torch.tensor(out)


def load_encode(path: str = DEFAULT_DATA) -> DnaData:
    """The vendored ENCODE DHS table (chrom, summit, cell_type, signal, split, sequence; tab-separated)."""
    header, rows = _read_table(path, "\t")
    cs, ct, cg, cp, cq = (_column(path, header, n) for n in ("chrom", "cell_type", "signal", "split", "sequence"))
    for i, r in enumerate(rows, 1):
        if r[ct] not in CELL_TYPES:
            raise ValueError(f"{path}: row {i}: unknown cell_type {r[ct]!r} (known: {', '.join(CELL_TYPES)})")
        if r[cp] not in SPLITS:
            raise ValueError(f"{path}: row {i}: unknown split {r[cp]!r} (known: {', '.join(SPLITS)})")
    x = encode_sequences([r[cq].strip() for r in rows], rows=None)
    label = torch.tensor([CELL_TYPES.index(r[ct]) for r in rows])
    return DnaData(x, np.array([r[cs] for r in rows]), label, None, _floats(path, rows, cg, "signal"), "encode")


def load_gosai(path: str) -> DnaData:
    """A Gosai/DRAKES MPRA CSV: seq, hepg2, k562, sknsh and a chromosome column (chr/chrom/chromosome)."""
    header, rows = _read_table(path, ",")
    cq = _column(path, header, "seq", "sequence")
    cc = _column(path, header, "chr", "chrom", "chromosome")
    act = torch.stack([_floats(path, rows, _column(path, header, n), n) for n in GOSAI_TARGETS], 1)
    x = encode_sequences([r[cq].strip() for r in rows])
    chrom = np.array([r[cc].strip() if r[cc].strip().startswith("chr") else "chr" + r[cc].strip() for r in rows])
    return DnaData(x, chrom, None, act, act[:, 0].clone(), "gosai")


def load_data(path: str) -> DnaData:
    path = path or DEFAULT_DATA
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} not found")
    return load_gosai(path) if path.endswith((".csv", ".csv.gz")) else load_encode(path)


def oracle_chromosomes(chrom: np.ndarray, test_chrom: str, val_chrom: str) -> tuple[list[str], list[str]]:
    """Split the training chromosomes (all but test and validation) into two disjoint halves of about
    equal size (greedy, largest first): (fine-tuning oracle's, evaluation oracle's)."""
    names, counts = np.unique(chrom, return_counts=True)
    train = sorted(((c, n) for n, c in zip(names, counts) if n not in (test_chrom, val_chrom)),
                   key=lambda t: (-t[0], t[1]))
    halves, sizes = ([], []), [0, 0]
    for c, n in train:
        k = int(sizes[1] < sizes[0])
        halves[k].append(n)
        sizes[k] += c
    if not halves[0] or not halves[1]:
        raise ValueError(f"need at least two training chromosomes besides {test_chrom} and {val_chrom}")
    return sorted(halves[0]), sorted(halves[1])


# ---------------------------------------------------------------------------
# 2. Models: the dilated-CNN denoiser, the Enformer oracle, the accessibility CNN.
# ---------------------------------------------------------------------------


class DilatedCNNDenoiser(nn.Module):
    """MDLM denoiser p_theta(x_0 | x_t): residual dilated 1-d convolutions (the DFM/DRAKES DNA layout:
    stacks of dilations 1, 1, 4, 16, 64), time-conditioned on sigmabar through a learned per-layer shift.
    Channels-first with GroupNorm: several times faster on CPU than per-position LayerNorm."""

    def __init__(self, hidden: int = 32, stacks: int = 1, kernel: int = 9, vocab_size: int = 5, n_out: int = 4):
        super().__init__()
        dil = [d for _ in range(stacks) for d in (1, 1, 4, 16, 64)]
        self.embed = nn.Embedding(vocab_size, hidden)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)
        self.time = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden * len(dil)))
        self.norms = nn.ModuleList(nn.GroupNorm(1, hidden) for _ in dil)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, dilation=d, padding=d * (kernel // 2)) for d in dil)
        self.out = nn.Conv1d(hidden, n_out, 1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        # log(sigmabar) spans the schedule evenly; sin/cos features let the MLP resolve it
        s = torch.log(sigma.float().clamp(min=1e-4))[:, None] * self.freqs
        shift = self.time(torch.cat([s.sin(), s.cos()], -1)).view(len(x), len(self.convs), -1, 1)
        h = self.embed(x).transpose(1, 2)  # [B, hidden, L]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = h + conv(F.gelu(norm(h) + shift[:, i]))
        return self.out(h).transpose(1, 2)  # [B, L, 4] logits over A, C, G, T


class EnformerOracle(nn.Module):
    """Enformer trunk (enformer-pytorch, random init, small dims) + mean pooling + linear head."""

    def __init__(self, n_out: int, dim: int = 48, depth: int = 1, heads: int = 2, downsamples: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        from enformer_pytorch import Enformer
        if (dim // heads) % 6 or dim % heads:
            raise ValueError(f"Enformer needs dim // heads to be a multiple of 6 (got dim={dim}, heads={heads})")
        if downsamples < 3:
            raise ValueError("enformer-pytorch needs num_downsamples >= 3")
        self.trunk = Enformer.from_hparams(
            dim=dim, depth=depth, heads=heads, attn_dim_key=max(dim // heads, 8), num_downsamples=downsamples,
            dim_divisible_by=dim // 4, target_length=-1, output_heads=dict(human=1), dropout_rate=dropout,
            attn_dropout=dropout / 2, pos_dropout=dropout / 10)
        self.head = nn.Linear(2 * dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        emb = self.trunk(F.one_hot(x, 4).float(), return_only_embeddings=True)  # [B, L / 2^k, 2 dim]
        return self.head(emb.mean(1))


class AccessibilityCNN(nn.Module):
    """A plain CNN (deliberately not Enformer) calling 'accessible in HepG2' from sequence: ATAC-Acc analogue."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(4, hidden, 15, padding=7), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(hidden, hidden, 7, padding=3), nn.ReLU(), nn.MaxPool1d(4),
            nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(),
            nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(F.one_hot(x, 4).float().transpose(1, 2)).squeeze(-1)


def hepg2_score(logits: Tensor, kind: str) -> Tensor:
    """The oracle's HepG2 score: ENCODE, log-odds of the HepG2 class; Gosai, predicted HepG2 activity."""
    if kind == "gosai":
        return logits[:, 0]
    h = CELL_TYPES.index("HepG2")
    others = torch.cat([logits[:, :h], logits[:, h + 1:]], 1)
    return logits[:, h] - torch.logsumexp(others, 1)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch].to(dev)).float().cpu() for i in range(0, len(x), batch)]) if len(x) else torch.empty(0)


# ---------------------------------------------------------------------------
# 3. Cached, resumable stages: atomic checkpoints and a generic training loop.
# ---------------------------------------------------------------------------


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file, then os.replace: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: str, settings: dict) -> Optional[dict]:
    """The checkpoint at path, or None; one made with other settings is an error, not a silent reuse."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("settings") != settings:
        diff = {k: (ck.get("settings", {}).get(k), v) for k, v in settings.items() if ck.get("settings", {}).get(k) != v}
        raise SystemExit(f"{path} was made with other settings {diff} (old, new); use another --out or delete it")
    return ck


def train_loop(name: str, model: nn.Module, loss_fn: Callable[[Tensor, torch.Generator], Tensor], n_train: int,
               steps: int, batch: int, lr: float, path: str, settings: dict, seed: int, device,
               every: int = 0, val_fn: Optional[Callable[[], dict]] = None) -> dict:
    """AdamW + cosine decay on random minibatches of indices [0, n_train); checkpoints every `every`
    steps and at the end, resumes exactly (weights, optimizer, sampling RNG). Returns the final metrics."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    gen = torch.Generator().manual_seed(seed)
    mgen = torch.Generator(device).manual_seed(seed + 1)
    step, metrics = 0, {}
    ck = load_ckpt(path, settings)
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ck["done"]:
            print(f"[{name}] cached in {path}: {fmt(ck['metrics'])}")
            return ck["metrics"]
        opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"]), mgen.set_state(ck["mgen"])
        step = ck["step"]
        print(f"[{name}] resuming at step {step}/{steps}")
    tic, run = time.perf_counter(), 0.0
    while step < steps:
        model.train()
        idx = torch.randint(n_train, (batch,), generator=gen)
        loss = loss_fn(idx, mgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step()
        step += 1
        run = loss.item() if step == 1 else 0.98 * run + 0.02 * loss.item()
        last = step == steps
        if last or (every and step % every == 0):
            metrics = {"train_loss": run, **(val_fn() if val_fn else {})}
            print(f"[{name}] step {step}/{steps} {fmt(metrics)} ({time.perf_counter() - tic:.0f}s)", flush=True)
            save_atomic({"settings": settings, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "gen": gen.get_state(), "mgen": mgen.get_state(),
                         "step": step, "done": last, "metrics": metrics}, path)
    return metrics


def fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


# ---------------------------------------------------------------------------
# 4. Metrics (each tested against a hand computation in test_train_dna.py).
# ---------------------------------------------------------------------------


def kmer_counts(x: Tensor, k: int = 3) -> Tensor:
    """Counts of the 4^k k-mers over all windows of all sequences [4^k] (index = base-4 number, A=0)."""
    if x.shape[1] < k:
        return torch.zeros(4 ** k)
    code = sum(x[:, i:x.shape[1] - k + 1 + i] * 4 ** (k - 1 - i) for i in range(k))
    return torch.bincount(code.flatten(), minlength=4 ** k).float()


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the ranks (ties share their average rank)."""
    from scipy.stats import rankdata
    return pearson(torch.as_tensor(rankdata(a.numpy())), torch.as_tensor(rankdata(b.numpy())))


def load_jaspar_pwms(release: str = "JASPAR2024") -> tuple[list[str], list[Tensor]]:
    """Human CORE vertebrate motifs from pyjaspar's offline database, as log2-odds PWMs [4, w]
    (pseudocount 0.8 spread over the bases, uniform background)."""
    from pyjaspar import jaspardb
    motifs = jaspardb(release=release).fetch_motifs(collection="CORE", tax_group=["vertebrates"], species=["9606"])
    names, pwms = [], []
    for m in motifs:
        counts = torch.tensor([list(m.counts[b]) for b in BASES], dtype=torch.float64)
        p = (counts + 0.2) / (counts.sum(0, keepdim=True) + 0.8)
        names.append(f"{m.matrix_id} {m.name}")
        pwms.append(torch.log2(p / 0.25).float())
    if not pwms:
        raise RuntimeError(f"pyjaspar returned no human CORE motifs for {release}")
    return names, pwms


def motif_hits(x: Tensor, pwms: list[Tensor], rel_threshold: float = 0.85) -> Tensor:
    """Hits per motif, summed over sequences and both strands [num_motifs]: a window is a hit when its
    PWM score s satisfies (s - min) / (max - min) >= rel_threshold (min/max: the motif's extreme scores)."""
    N, L = x.shape
    wmax = max(p.shape[1] for p in pwms)
    rc = [p.flip(0).flip(1) for p in pwms]  # reverse complement: A<->T, C<->G is the flip of ACGT
    W = torch.zeros(2 * len(pwms), 4, wmax)
    lo, hi, width = [], [], []
    for i, p in enumerate(pwms + rc):
        W[i, :, : p.shape[1]] = p
        lo.append(p.min(0).values.sum()), hi.append(p.max(0).values.sum()), width.append(p.shape[1])
    lo, hi, width = torch.stack(lo), torch.stack(hi), torch.tensor(width)
    thr = (lo + rel_threshold * (hi - lo))[None, :, None]
    valid = torch.arange(L)[None, :] <= (L - width)[:, None]  # window must fit inside the sequence
    total = torch.zeros(2 * len(pwms))
    for i in range(0, N, 256):
        oh = F.one_hot(x[i:i + 256], 4).float().transpose(1, 2)
        s = F.conv1d(F.pad(oh, (0, wmax - 1)), W)  # [n, 2M, L]
        total += ((s >= thr - 1e-5) & valid[None]).sum((0, 2)).float()
    return total[: len(pwms)] + total[len(pwms):]


def evaluate_samples(x: Tensor, eval_oracle: nn.Module, access: nn.Module, ft_oracle: nn.Module, kind: str,
                     top_kmers: Tensor, top_motifs: Tensor, pwms: list[Tensor], ll: Tensor, thr: float) -> dict:
    """The paper's DNA metrics for one set of samples (plus the fine-tuning oracle's reward)."""
    pred = hepg2_score(predict(eval_oracle, x), kind)
    return {
        "pred": pred,
        "Pred-Activity": pred.median().item(),
        "ATAC-Acc %": 100.0 * (torch.sigmoid(predict(access, x)) > 0.5).float().mean().item(),
        "3-mer corr": pearson(kmer_counts(x, 3), top_kmers),
        "JASPAR corr": spearman(motif_hits(x, pwms, thr), top_motifs),
        "App-Log-Lik": ll.median().item(),
        "Reward (ft oracle)": hepg2_score(predict(ft_oracle, x), kind).median().item(),
    }


# ---------------------------------------------------------------------------
# 5. The pipeline.
# ---------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def make_denoiser(cfg: Config) -> DilatedCNNDenoiser:
    return DilatedCNNDenoiser(cfg.hidden, cfg.stacks, cfg.kernel)


def make_oracle(cfg: Config, n_out: int) -> EnformerOracle:
    return EnformerOracle(n_out, cfg.oracle_dim, cfg.oracle_depth, cfg.oracle_heads, cfg.oracle_downsamples)


def sepo_config(cfg: Config, corrector_steps: int, seed: int) -> sepo.SEPOConfig:
    return sepo.SEPOConfig(lr=cfg.lr, batch_size=cfg.batch, group_size=cfg.group, epochs=cfg.epochs,
                           clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, kl_steps=min(cfg.kl_steps, cfg.steps),
                           snis_samples=cfg.snis, steps=cfg.steps, corrector_steps=corrector_steps,
                           advantage="grpo", pl_positions=cfg.pl_positions, seed=seed)


def keys(cfg: Config, *names: str) -> dict:
    return {n: getattr(cfg, n) for n in names}


def bench(cfg: Config, device: torch.device) -> None:
    """Time one SEPO iteration (plain and with GF) at the current settings (use with --preset paper)
    with an untrained denoiser and oracle of the configured sizes; prints peak GPU memory on CUDA."""
    torch.manual_seed(cfg.seed)
    model, oracle = make_denoiser(cfg).to(device), make_oracle(cfg, len(CELL_TYPES)).to(device).eval()
    reward = lambda x: hepg2_score(predict(oracle, x), "encode").to(x.device)
    for gf in (0, cfg.corrector_steps):
        trainer = sepo.SEPO(model, sepo.Masked(4), sepo.LogLinear(), reward, SEQ_LEN, sepo_config(cfg, gf, cfg.seed))
        if device.type == "cuda":
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        stats = trainer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"[bench] corrector_steps={gf}, steps={cfg.steps}, {cfg.batch}x{cfg.group} samples, denoiser "
              f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params on {device}: one trainer.step() "
              f"{time.perf_counter() - tic:.2f}s{mem} (reward {stats['reward_mean']:.3f}, kl {stats['kl']:.4f})")


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    if cfg.bench:
        bench(cfg, device)
        return {}
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    graph, noise = sepo.Masked(4), sepo.LogLinear()
    data_keys = ("data", "seed", "test_chrom", "val_chrom")

    # -- data ---------------------------------------------------------------------------------
    data = load_data(cfg.data)
    is_test, is_val = data.chrom == cfg.test_chrom, data.chrom == cfg.val_chrom
    train_idx, val_idx, test_idx = np.flatnonzero(~is_test & ~is_val), np.flatnonzero(is_val), np.flatnonzero(is_test)
    if not (len(val_idx) and len(test_idx)):
        raise SystemExit(f"no sequences on the validation ({cfg.val_chrom}) or test ({cfg.test_chrom}) chromosome")
    ft_chroms, ev_chroms = oracle_chromosomes(data.chrom, cfg.test_chrom, cfg.val_chrom)
    print(f"[data] {len(data)} sequences ({data.kind}): train {len(train_idx)}, validation {len(val_idx)} "
          f"({cfg.val_chrom}), test {len(test_idx)} ({cfg.test_chrom})")
    print(f"[data] fine-tuning oracle chromosomes {','.join(ft_chroms)}; evaluation oracle {','.join(ev_chroms)}")
    train, val, test = data.subset(train_idx), data.subset(val_idx), data.subset(test_idx)

    # -- 1. pre-train the masked diffusion model ------------------------------------------------
    torch.manual_seed(cfg.seed)
    pretrained = make_denoiser(cfg).to(device)
    xtr, xval = train.x.to(device), val.x[:2048].to(device)

    def val_loss() -> dict:
        pretrained.eval()
        g = torch.Generator(device).manual_seed(cfg.seed + 7)
        with torch.no_grad():
            losses = [sepo.pretrain_loss(pretrained, graph, noise, xval[i:i + 256], generator=g).item()
                      for i in range(0, len(xval), 256)]
        return {"val_loss": float(np.mean(losses))}

    pre = train_loop("pretrain", pretrained, lambda idx, g: sepo.pretrain_loss(pretrained, graph, noise, xtr[idx.to(device)], generator=g),
                     len(xtr), cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, os.path.join(cfg.out, "pretrain.pt"),
                     keys(cfg, *data_keys, "hidden", "stacks", "kernel", "pretrain_steps", "pretrain_batch", "pretrain_lr"),
                     cfg.seed, device, cfg.val_every, val_loss)
    pretrained.eval().requires_grad_(False)
    print(f"[pretrain] validation loss {pre['val_loss']:.4f} nats/base (MDLM NELBO bound; uniform bases: {math.log(4):.4f})")

    # -- 2. oracles on chromosome-disjoint halves + the accessibility classifier -----------------
    n_out = len(CELL_TYPES) if data.kind == "encode" else len(GOSAI_TARGETS)
    oracles, oracle_report = {}, {}
    for j, (name, chroms) in enumerate((("ft_oracle", ft_chroms), ("eval_oracle", ev_chroms))):
        part = train.subset(np.flatnonzero(np.isin(train.chrom, chroms)))
        torch.manual_seed(cfg.seed + 10 + j)
        model = make_oracle(cfg, n_out).to(device)
        xo = part.x.to(device)
        yo = (part.label if data.kind == "encode" else part.activity).to(device)
        if data.kind == "encode":
            loss_fn = lambda idx, g, m=model, xo=xo, yo=yo: F.cross_entropy(m(xo[idx.to(xo.device)]), yo[idx.to(xo.device)])
        else:
            loss_fn = lambda idx, g, m=model, xo=xo, yo=yo: F.mse_loss(m(xo[idx.to(xo.device)]), yo[idx.to(xo.device)])

        def held_out(m=model) -> dict:
            out = predict(m, test.x)
            if data.kind == "encode":
                return {"test_acc": (out.argmax(1) == test.label).float().mean().item(),
                        "test_hepg2_auroc": auroc(hepg2_score(out, "encode"), test.label == CELL_TYPES.index("HepG2"))}
            return {"test_hepg2_pearson": pearson(out[:, 0], test.activity[:, 0])}

        steps = max(1, round(cfg.oracle_epochs * len(part) / cfg.oracle_batch))
        oracle_report[name] = train_loop(name, model, loss_fn, len(part), steps, cfg.oracle_batch, cfg.oracle_lr,
                                         os.path.join(cfg.out, f"{name}.pt"),
                                         keys(cfg, *data_keys, "oracle_dim", "oracle_depth", "oracle_heads",
                                              "oracle_downsamples", "oracle_epochs", "oracle_batch", "oracle_lr"),
                                         cfg.seed + 10 + j, device, 0, held_out)
        oracles[name] = model.eval().requires_grad_(False)
    # accessibility: HepG2 DHS vs the other cell types' DHS (Gosai: HepG2 activity above its median),
    # trained on the evaluation oracle's chromosomes so it shares no data with the fine-tuning oracle
    part = train.subset(np.flatnonzero(np.isin(train.chrom, ev_chroms)))
    y_acc = (part.label == CELL_TYPES.index("HepG2")) if data.kind == "encode" else (part.activity[:, 0] > train.activity[:, 0].median())
    y_test = (test.label == CELL_TYPES.index("HepG2")) if data.kind == "encode" else (test.activity[:, 0] > train.activity[:, 0].median())
    torch.manual_seed(cfg.seed + 20)
    access = AccessibilityCNN().to(device)
    xa, ya = part.x.to(device), y_acc.float().to(device)
    pos_weight = ((1 - ya).sum() / ya.sum().clamp(min=1))  # balanced classes: p > 0.5 means "more likely HepG2 than not"
    oracle_report["access"] = train_loop(
        "access", access, lambda idx, g: F.binary_cross_entropy_with_logits(access(xa[idx.to(device)]), ya[idx.to(device)],
                                                                            pos_weight=pos_weight),
        len(part), max(1, round(2 * len(part) / cfg.oracle_batch)), cfg.oracle_batch, 2e-3,  # 2 epochs
        os.path.join(cfg.out, "access.pt"), keys(cfg, *data_keys, "oracle_batch"), cfg.seed + 20, device, 0,
        lambda: {"test_acc": ((predict(access, test.x) > 0).eq(y_test)).float().mean().item(),
                 "test_auroc": auroc(predict(access, test.x), y_test)})
    access.eval().requires_grad_(False)
    ft_oracle, ev_oracle = oracles["ft_oracle"], oracles["eval_oracle"]
    agree = pearson(hepg2_score(predict(ft_oracle, test.x), data.kind), hepg2_score(predict(ev_oracle, test.x), data.kind))
    print(f"[oracles] test-chromosome Pearson between the fine-tuning and evaluation oracles' HepG2 scores: {agree:.3f}")

    def reward_fn(x: Tensor) -> Tensor:  # the fine-tuning oracle, and only it, is SEPO's reward
        return hepg2_score(predict(ft_oracle, x), data.kind).to(x.device)

    # -- 3. SEPO fine-tuning (plain, and with the gradient-flow corrector) -----------------------
    variants = [("SEPO", 0)] + ([("SEPO with GF", cfg.corrector_steps)] if cfg.corrector_steps > 0 else [])
    finetuned, histories = {}, {}
    sepo_keys = keys(cfg, *data_keys, "hidden", "stacks", "kernel", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                     "oracle_dim", "oracle_depth", "oracle_heads", "oracle_downsamples", "oracle_epochs", "oracle_batch",
                     "oracle_lr", "lr", "batch", "group", "epochs", "clip_eps", "kl_coef", "kl_steps", "snis", "steps",
                     "pl_positions")
    for j, (name, gf) in enumerate(variants):
        tag = "sepo_gf" if gf else "sepo"
        path = os.path.join(cfg.out, f"{tag}.pt")
        settings = {**sepo_keys, "corrector_steps": gf}
        trainer = sepo.SEPO(copy.deepcopy(pretrained).requires_grad_(True), graph, noise, reward_fn, SEQ_LEN,
                            sepo_config(cfg, gf, cfg.seed + 30 + j), ref_model=pretrained)
        ck, history = load_ckpt(path, settings), []
        if ck is not None:
            trainer.load_state_dict(ck["trainer"])
            history = ck["history"]
            print(f"[{tag}] cached in {path}" if len(history) >= cfg.iters else
                  f"[{tag}] resuming at iteration {len(history)}/{cfg.iters}")
        while len(history) < cfg.iters:
            stats = trainer.step()
            history.append(stats)
            print(f"[{tag}] it {len(history)}/{cfg.iters} reward {stats['reward_mean']:+.3f} (std {stats['reward_std']:.2f}) "
                  f"kl {stats['kl']:.4f} clip {stats['clip_frac']:.2f} ratio {stats['ratio_mean']:.3f} "
                  f"time {stats['time']:.1f}s", flush=True)
            if len(history) % cfg.ckpt_every == 0 or len(history) == cfg.iters:
                save_atomic({"settings": settings, "trainer": trainer.state_dict(), "history": history}, path)
        finetuned[name] = trainer.model.eval().requires_grad_(False)
        histories[name] = history

    # -- 4. evaluation ---------------------------------------------------------------------------
    tic = time.perf_counter()
    top_pool = train if data.kind == "gosai" else train.subset(np.flatnonzero(train.label.numpy() == CELL_TYPES.index("HepG2")))
    top = top_pool.x[top_pool.signal.argsort(descending=True)[: cfg.top_n]]
    motif_names, pwms = load_jaspar_pwms(cfg.jaspar_release)
    top_kmers, top_motifs = kmer_counts(top, 3), motif_hits(top, pwms, cfg.motif_threshold)
    budget = cfg.iters * cfg.batch * cfg.group
    bon_n = cfg.bon_n or 1 + math.ceil(budget / cfg.n_eval)

    def draw(model: nn.Module, n: int, gf: int, seed: int) -> Tensor:
        g = torch.Generator(device).manual_seed(seed)
        return torch.cat([sepo.sample(model, graph, noise, min(512, n - i), SEQ_LEN, cfg.steps, gf, generator=g).cpu()
                          for i in range(0, n, 512)])

    rows = {"Pre-trained": draw(pretrained, cfg.n_eval, 0, cfg.seed + 100)}
    for j, (name, gf) in enumerate(variants):
        rows[name] = draw(finetuned[name], cfg.n_eval, gf, cfg.seed + 101 + j)
    pool = draw(pretrained, cfg.n_eval * bon_n, 0, cfg.seed + 110).view(cfg.n_eval, bon_n, SEQ_LEN)
    best = hepg2_score(predict(ft_oracle, pool.flatten(0, 1)), data.kind).view(cfg.n_eval, bon_n).argmax(1)
    rows[f"Best-of-{bon_n} (ft oracle)"] = pool[torch.arange(cfg.n_eval), best]
    def score(x: Tensor) -> dict:
        g = torch.Generator(device).manual_seed(cfg.seed + 200)  # same noise for every row: a paired comparison
        ll = torch.cat([sepo.elbo(pretrained, graph, noise, x[i:i + 256].to(device), cfg.elbo_t, generator=g).cpu()
                        for i in range(0, len(x), 256)])
        return evaluate_samples(x, ev_oracle, access, ft_oracle, data.kind, top_kmers, top_motifs, pwms, ll,
                                cfg.motif_threshold)

    results = {}
    for name, x in rows.items():
        results[name] = score(x)
        with open(os.path.join(cfg.out, f"samples_{name.split(' (')[0].replace(' ', '_').lower()}.txt"), "w") as f:
            f.write("\n".join(decode_sequences(x)) + "\n")
    # held-out real sequences for scale: HepG2 DHS (Gosai: the most HepG2-active) of the test chromosome
    ref = test.x[test.label == CELL_TYPES.index("HepG2")] if data.kind == "encode" else test.x[test.signal.argsort(descending=True)]
    results[f"Data ({cfg.test_chrom}, HepG2)"] = score(ref[: cfg.n_eval])
    t_eval = time.perf_counter() - tic

    # -- report: table, plots ------------------------------------------------------------------------
    table = results_table(results, cfg, data.kind, pre, oracle_report, agree, bon_n, budget, len(pwms))
    print(table)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "pretrain": pre, "oracles": oracle_report, "oracle_agreement": agree,
                   "bon_n": bon_n, "rows": {k: {m: v for m, v in r.items() if m != "pred"} for k, r in results.items()},
                   "history": histories}, f, indent=1)
    plot(results, histories, cfg.out, data.kind)
    print(f"[done] evaluation {t_eval:.0f}s, total {time.perf_counter() - t_start:.0f}s; wrote {cfg.out}/results.md, "
          f"pred_activity_violin.png, sepo_curves.png")
    return results


def auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata
    pos = positive.bool().numpy()
    n1, n0 = pos.sum(), (~pos).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score.numpy())
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def results_table(results: dict, cfg: Config, kind: str, pre: dict, oracles: dict, agree: float, bon_n: int,
                  budget: int, n_motifs: int) -> str:
    cols = ["Pred-Activity", "ATAC-Acc %", "3-mer corr", "JASPAR corr", "App-Log-Lik", "Reward (ft oracle)"]
    lines = ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c != "ATAC-Acc %" else f"{r[c]:.1f}" for c in cols) + " |")
    what = ("evaluation oracle's HepG2 log-odds (predicted HepG2 DHS cell-type specificity, not MPRA activity)"
            if kind == "encode" else "evaluation oracle's predicted HepG2 MPRA activity")
    acc = ("% called HepG2-accessible (HepG2 DHS vs other cell types' DHS) by an independent CNN"
           if kind == "encode" else "% called HepG2-active (above the training median) by an independent CNN")
    notes = [
        "",
        f"{cfg.n_eval} samples per row, {cfg.steps} sampler steps; medians. Pred-Activity: {what}. "
        f"ATAC-Acc: {acc} (analogue of the paper's ATAC-Acc). 3-mer corr: Pearson of 3-mer counts with the top "
        f"{cfg.top_n} HepG2 training sequences (ranked by {'DHS signal' if kind == 'encode' else 'HepG2 activity'}); "
        f"JASPAR corr: Spearman of hit counts of {n_motifs} human JASPAR CORE motifs ({cfg.jaspar_release}, relative "
        f"score >= {cfg.motif_threshold}) with the same set. App-Log-Lik: median ELBO (nats per sequence) under the "
        f"pre-trained model. Reward (ft oracle): the fine-tuning oracle's score, the only signal SEPO saw. "
        f"Best-of-{bon_n}: {bon_n} pre-trained samples per output, the best under the fine-tuning oracle kept "
        f"(SEPO used {budget} training rollouts + {cfg.n_eval} samples). The last row scores held-out "
        f"real sequences of the test chromosome ({'HepG2 DHS' if kind == 'encode' else 'most HepG2-active'}) for scale.",
        f"Pre-training validation loss {pre['val_loss']:.4f} nats/base. Oracles (test chromosome {cfg.test_chrom}): "
        + "; ".join(f"{k} " + fmt({m: v for m, v in r.items() if m.startswith('test')}) for k, r in oracles.items())
        + f"; fine-tuning vs evaluation oracle Pearson {agree:.3f}.",
    ]
    return "\n".join(lines + notes)


def plot(results: dict, histories: dict, out: str, kind: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    ax.violinplot([results[n]["pred"].numpy() for n in names], showmedians=True)
    ax.set_xticks(range(1, len(names) + 1), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("Pred-Activity (eval oracle, " + ("HepG2 log-odds" if kind == "encode" else "HepG2 activity") + ")")
    ax.set_title("Evaluation-oracle HepG2 score of generated sequences")
    fig.tight_layout(), fig.savefig(os.path.join(out, "pred_activity_violin.png"), dpi=120), plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, h in histories.items():
        it = [s["iteration"] for s in h]
        axes[0].plot(it, [s["reward_mean"] for s in h], label=name)
        axes[1].plot(it, [s["kl"] for s in h], label=name)
    axes[0].set(xlabel="iteration", ylabel="mean reward (fine-tuning oracle)")
    axes[1].set(xlabel="iteration", ylabel="path KL to pre-trained (last steps)")
    axes[0].legend()
    fig.tight_layout(), fig.savefig(os.path.join(out, "sepo_curves.png"), dpi=120), plt.close(fig)


if __name__ == "__main__":
    main()
