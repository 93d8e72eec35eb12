"""SEPO on text: RLHF of a discrete diffusion language model, end to end and offline (the paper's Section 4.1).

    python train_text.py                          # CPU, minutes: small models, 16 sampler steps
    python train_text.py --preset gpu --steps 128 # one GPU (SEDD-SEPO-128; --steps 1024 runs too)
    python train_text.py --preset paper           # the paper's SEPO settings, a 99M-parameter diffusion LM
    python train_text.py --data train.jsonl.gz    # a real HH-RLHF preference file
    python train_text.py --preset paper --bench   # time one SEPO iteration, print peak GPU memory

Stages, each cached in --out and resumable: HH-format pairs and a BPE tokenizer (data/text.py), pre-training
of the diffusion LM on the chosen responses, a GPT-2-architecture reward model, SEPO with PPO advantages, and an
evaluation on held-out prompts (gold-judge win rate with a 95% interval over prompts, perplexity, distinct-n).
docs/text.md describes the data, the judge and the measured results.
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
from data.text import (DEFAULT_PAIRS, PAD, TextData, bootstrap_ci, decode, distinct_n, encode_responses, gold_score,
                       pair_accuracy, prepare_data)


# ---------------------------------------------------------------------------- configuration
def arg(default, help: str, choices: Optional[tuple] = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    preset: str = arg("cpu", "cpu: minutes on a laptop; gpu: one GPU; paper: the paper's settings", ("cpu", "gpu", "paper"))
    data: str = arg("", "HH-RLHF preference file (.jsonl or .jsonl.gz); '' = data/chatterbot_hh.jsonl.gz")
    out: str = arg("runs/text", "output folder: cached stages, checkpoints, table, plots, examples")
    seed: int = arg(0, "stage k draws from seed 1000 * seed + k: runs are reproducible and seeds share no stream")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    bench: bool = arg(False, "only time one SEPO iteration with untrained models and exit")
    max_pairs: int = arg(0, "use at most this many pairs of --data (a seeded subsample; 0: all)")
    long_prompts: str = arg("skip", "a prompt longer than --prompt-len: skip its pair (counted) or error", ("skip", "error"))
    graph: str = arg("masked", "masked: sepo.Masked + LogLinear (MDLM); uniform: sepo.Uniform + Geometric (SEDD)",
                     ("masked", "uniform"))
    vocab: int = arg(2048, "BPE vocabulary size, special tokens included")
    prompt_len: int = arg(20, "prompt block length in tokens (prompts are left-padded)")
    response_len: int = arg(16, "response length in tokens (longer responses are cut)")
    d_model: int = arg(128, "diffusion LM width")
    n_layers: int = arg(3, "diffusion LM transformer layers")
    n_heads: int = arg(4, "diffusion LM attention heads")
    pretrain_steps: int = arg(1200, "diffusion LM optimizer steps")
    pretrain_batch: int = arg(64, "diffusion LM sequences per step")
    pretrain_lr: float = arg(1e-3, "diffusion LM AdamW learning rate (cosine decay)")
    rm_d_model: int = arg(64, "reward model (GPT-2) n_embd")
    rm_layers: int = arg(2, "reward model n_layer")
    rm_heads: int = arg(4, "reward model n_head")
    rm_epochs: float = arg(4.0, "epochs over the reward model's pairs")
    rm_batch: int = arg(64, "pairs per reward-model step")
    rm_lr: float = arg(1e-3, "reward model AdamW learning rate (cosine decay)")
    policy_pairs: int = arg(8, "gold-labelled pairs of pre-trained LM samples per training prompt for the reward model "
                               "(0: none; the default with --data: a real file has real labels)")
    iters: int = arg(40, "SEPO iterations")
    lr: float = arg(3e-4, "SEPO Adam learning rate")
    batch: int = arg(8, "prompts per SEPO iteration")
    group: int = arg(8, "responses per prompt")
    epochs: int = arg(2, "K gradient steps per iteration")
    clip_eps: float = arg(0.2, "clipping eps of the objective")
    kl_coef: float = arg(0.1, "alpha, weight of the path KL to the pre-trained model")
    kl_target: float = arg(0.0, "a KL budget: alpha = --kl-coef + lambda, lambda >= 0, keeps the path KL at most it (0: none)")
    kl_gain: float = arg(0.5, "--kl-target: lambda += kl_gain * min(KL / target - 1, 1) each iteration (docs/math.md §7)")
    kl_steps: int = arg(10, "the path KL covers the last kl_steps sampler steps (capped at --steps)")
    snis: int = arg(4, "M latent paths per sample (SNIS ratio, --grad path)")
    steps: int = arg(16, "sampler steps in rollouts and evaluation (the paper: 128 and 1024)")
    corrector_steps: int = arg(0, "gradient-flow corrector steps per sampler step")
    pl_positions: int = arg(8, "--grad pl, masked graph: response positions per sample")
    grad: str = arg("pl", "grad log pi estimator (pl: the paper's; docs/math.md §3-4)", ("pl", "path", "rollout"))
    ratio: str = arg("snis", "importance ratio (snis: the paper's; docs/math.md §5)", ("snis", "rollout"))
    path_steps: int = arg(0, "--grad path/rollout: transitions with gradient per path (0: all)")
    micro_batch: int = arg(0, "samples per gradient pass (0: all); bounds memory, same update")
    amp: str = arg("none", "bf16: autocast of the rollout and gradient passes", ("none", "bf16"))
    baseline: str = arg("group", "PPO advantage A = R - b, b the mean reward of the prompt's group, the batch or "
                                 "a running mean", ("group", "batch", "running"))
    t_eval: float = arg(0.0, "--grad pl: time of the score pass (0: one sampler step, 1 / steps)")
    ckpt_every: int = arg(5, "SEPO iterations between checkpoints")
    eval_prompts: int = arg(128, "held-out prompts evaluated (at most all of them)")
    eval_samples: int = arg(8, "responses per held-out prompt and model")
    elbo_t: int = arg(8, "Monte-Carlo times per sequence for the perplexity (sepo.elbo)")
    bon_max: int = arg(0, "best-of-N by the reward model: a row at SEPO's sampling budget, the curve N = 1, 2, 4, ... and "
                          "bon_max (0: none)")

    @property
    def stream_seed(self) -> int:  # stage k draws from stream_seed + k, k < 1000: two seeds share no stream
        return 1000 * self.seed


PRESETS = {
    "cpu": {},
    # One GPU: the largest pipeline that runs end to end in minutes, 128 steps; --steps 1024 also fits.
    "gpu": dict(vocab=4096, prompt_len=32, response_len=32, d_model=384, n_layers=6, n_heads=6, pretrain_steps=4000,
                pretrain_batch=128, pretrain_lr=5e-4, rm_d_model=256, rm_layers=4, rm_heads=4, rm_lr=3e-4, steps=128,
                iters=100, batch=8, group=8, lr=1e-4, kl_steps=10, snis=4, pl_positions=16, micro_batch=16),
    # The paper's SEPO settings (docs/math.md §10) on a SEDD-small-sized network (12 x 768, ~99M parameters).
    "paper": dict(vocab=4096, prompt_len=64, response_len=64, d_model=768, n_layers=12, n_heads=12, pretrain_steps=50_000,
                  pretrain_batch=64, pretrain_lr=3e-4, rm_d_model=768, rm_layers=12, rm_heads=12, rm_epochs=1.0, rm_batch=32,
                  rm_lr=5e-5, policy_pairs=4, steps=128, iters=7000, batch=8, group=8, lr=1e-4, kl_coef=0.05, kl_steps=10,
                  snis=4, pl_positions=16, micro_batch=8, eval_prompts=640, elbo_t=16),
}
POSITIVE = ("vocab", "prompt_len", "response_len", "d_model", "n_layers", "n_heads", "pretrain_steps", "pretrain_batch",
            "pretrain_lr", "rm_d_model", "rm_layers", "rm_heads", "rm_epochs", "rm_batch", "rm_lr", "ckpt_every",
            "eval_prompts", "eval_samples", "elbo_t", "kl_gain")


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags from the Config fields: an explicit flag wins over --preset, which wins over the field's default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kind = (dict(action="store_true", default=None) if f.type == "bool" else
                dict(type=type(f.default), choices=f.metadata["choices"]))
        p.add_argument("--" + f.name.replace("_", "-"), help=f"{f.metadata['help']} (default: {f.default!r})", **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = Config(**{**PRESETS[given.get("preset", "cpu")], **given})
    for k, v in dataclasses.asdict(cfg).items():  # fail now, not after pre-training; `not >=` also catches NaN
        if isinstance(v, (int, float)) and not (v > 0 if k in POSITIVE else v >= 0):
            raise ValueError(f"--{k.replace('_', '-')} must be {'> 0' if k in POSITIVE else '>= 0'}, got {v}")
    if cfg.batch % WORLD:
        raise ValueError(f"--batch {cfg.batch} is the groups of all {WORLD} processes together: make it divisible by {WORLD}")
    if cfg.data and "policy_pairs" not in given:
        cfg.policy_pairs = 0  # a real preference file has real labels; the gold judge only evaluates
    return cfg


# ---------------------------------------------------------------------------- models
class ScoreNet(nn.Module):
    """Bidirectional transformer conditioned on the total noise sigma. Uniform graph: log concrete scores
    log s(x, t)[l, v] (V = n); masked graph: denoiser logits over the n clean tokens (input vocabulary n + 1).
    sigma enters through a sinusoidal embedding of log sigma added to the residual stream before every layer
    (a cheap stand-in for SEDD's adaLN). sepo never reads the outputs at the prompt block (never noised), so
    they are left at 0 and the vocabulary head (a third of the FLOPs here) runs on the response only."""

    def __init__(self, vocab_in: int, vocab_out: int, length: int, d_model: int, n_layers: int, n_heads: int,
                 n_fixed: int = 0):
        super().__init__()
        self.n_fixed = n_fixed
        self.tok = nn.Embedding(vocab_in, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(64, d_model), nn.SiLU(), nn.Linear(d_model, d_model * n_layers))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_out)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # s = 1 / uniform logits: a calm first step

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32, device=x.device) / 32)
        arg_ = torch.log(sigma.float().clamp_min(1e-6))[:, None] * 4.0 * freqs
        cond = self.t_mlp(torch.cat([arg_.sin(), arg_.cos()], -1)).chunk(len(self.layers), -1)
        h = self.tok(x) + self.pos[: x.shape[1]]
        for layer, c in zip(self.layers, cond):
            h = layer(h + c[:, None])
        return F.pad(self.head(self.norm(h[:, self.n_fixed:])), (0, 0, self.n_fixed, 0))


def make_diffusion(cfg: Config, n: int, device) -> tuple[sepo.Graph, object, ScoreNet]:
    """graph, noise schedule and network for --graph."""
    graph, noise = (sepo.Uniform(n), sepo.Geometric()) if cfg.graph == "uniform" else (sepo.Masked(n), sepo.LogLinear())
    model = ScoreNet(graph.vocab_size, n, cfg.prompt_len + cfg.response_len, cfg.d_model, cfg.n_layers, cfg.n_heads,
                     cfg.prompt_len)
    return graph, noise, model.to(device)


class RewardModel(nn.Module):
    """GPT-2 architecture from a config (random init, no hub) + a scalar head. Reads (prompt | response) with
    the pads squeezed out (GPT-2 has absolute positions, so the text starts at position 0) and scores the hidden
    state of the last real token; R(x) = sigmoid(score) in (0, 1)."""

    def __init__(self, vocab: int, n_positions: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model
        self.gpt = GPT2Model(GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d_model, n_layer=n_layers,
                                        n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=PAD, eos_token_id=PAD))
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        real = x != PAD
        order = torch.sort((~real).int(), dim=1, stable=True).indices  # real tokens first, in order
        ids, mask = x.gather(1, order), real.gather(1, order)
        h = self.gpt(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self.head(h[torch.arange(len(x), device=x.device), (mask.sum(1) - 1).clamp_min(0)]).squeeze(-1)

    @torch.no_grad()
    def reward(self, x: Tensor, batch: int = 256) -> Tensor:
        return torch.cat([torch.sigmoid(self(x[i:i + batch])) for i in range(0, len(x), batch)])


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


LM_KEYS = ("data", "seed", "max_pairs", "vocab", "prompt_len", "response_len", "graph", "d_model", "n_layers",
           "n_heads", "pretrain_steps", "pretrain_batch", "pretrain_lr")
RM_KEYS = LM_KEYS + ("rm_d_model", "rm_layers", "rm_heads", "rm_epochs", "rm_batch", "rm_lr", "policy_pairs", "steps",
                     "corrector_steps")


def keys(cfg: Config, names: tuple, data: TextData) -> dict:
    """A stage's settings, the base of its random streams, the data file's and the tokenizer's hashes: none changes
    unnoticed."""
    return {**{n: getattr(cfg, n) for n in names}, "data_sha256": data.info["sha256"],
            "tokenizer_sha256": data.info["tokenizer_sha256"], "stream_seed": cfg.stream_seed}


def pretrain(cfg: Config, data: TextData, device) -> tuple[sepo.Graph, object, nn.Module]:
    """Stage 2: the diffusion LM, trained with sepo.pretrain_loss (the prompt block is never noised)."""
    torch.manual_seed(cfg.stream_seed)
    graph, noise, model = make_diffusion(cfg, data.tok.get_vocab_size(), device)
    X = data.lm_train.to(device)
    train_loop("pretrain", model, lambda i, g: sepo.pretrain_loss(model, graph, noise, X[i], cfg.prompt_len, g), len(X),
               cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr, os.path.join(cfg.out, "pretrain.pt"),
               keys(cfg, LM_KEYS, data), cfg.stream_seed, every=200)
    save_atomic(data.tok.to_str(), os.path.join(cfg.out, "tokenizer.json"))  # only now: pretrain.pt accepted its hash
    return graph, noise, model.eval().requires_grad_(False)


def generate(cfg: Config, model: nn.Module, graph, noise, prompts: Tensor, seed: int) -> Tensor:
    """One response per row of prompts [N, Lp] -> [N, Lp + Lr] (on the model's device)."""
    device = next(model.parameters()).device
    return sepo.sample(model, graph, noise, len(prompts), cfg.prompt_len + cfg.response_len, cfg.steps,
                       cfg.corrector_steps, prompts.to(device), torch.Generator(device).manual_seed(seed), batch_size=64)


def policy_pairs(cfg: Config, data: TextData, graph, noise, pre: nn.Module, prompts: Tensor, seed: int
                 ) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) [N, L]: --policy-pairs pairs of pre-trained LM responses per prompt, ordered by the gold
    judge (the stand-in labeller), near-ties (< 0.05) dropped. Trained on real replies only, a reward model scores
    model samples by features the judge ignores, and SEPO climbs those; labelled samples put it on SEPO's start."""
    x = generate(cfg, pre, graph, noise, prompts.repeat_interleave(2 * cfg.policy_pairs, 0), seed).cpu()
    g = torch.tensor([gold_score(t) for t in decode(data.tok, x[:, cfg.prompt_len:])]).view(-1, 2)
    first, keep = (g[:, 0] > g[:, 1])[:, None], (g[:, 0] - g[:, 1]).abs() >= 0.05
    return torch.where(first, x[0::2], x[1::2])[keep], torch.where(first, x[1::2], x[0::2])[keep]


def train_reward_model(cfg: Config, data: TextData, graph, noise, pre: nn.Module, device) -> tuple[RewardModel, dict]:
    """Stage 3: Bradley-Terry, -log sigmoid(score(chosen) - score(rejected)), on the reward model's half of the
    pairs plus (--policy-pairs) gold-labelled pairs of pre-trained LM responses to the training prompts."""
    settings, tag = keys(cfg, RM_KEYS, data), f"steps{cfg.steps}"
    pp = load_ckpt(os.path.join(cfg.out, f"policy_pairs_{tag}.pt"), settings)
    if pp is None and cfg.policy_pairs > 0:
        tic = time.perf_counter()
        pp = {"settings": settings,
              "train": policy_pairs(cfg, data, graph, noise, pre, data.train_prompts, cfg.stream_seed + 10),
              "test": policy_pairs(cfg, data, graph, noise, pre, data.test_prompts, cfg.stream_seed + 20)}
        save_atomic(pp, os.path.join(cfg.out, f"policy_pairs_{tag}.pt"))
        print(f"[reward] {len(pp['train'][0])} gold-labelled pairs of pre-trained LM responses "
              f"({len(pp['test'][0])} on held-out prompts) {time.perf_counter() - tic:.0f}s", flush=True)
    (c, r), tests = data.rm_train, {"data": data.rm_test}
    if pp is not None:
        c, r, tests["samples"] = torch.cat([c, pp["train"][0]]), torch.cat([r, pp["train"][1]]), pp["test"]
    torch.manual_seed(cfg.stream_seed + 1)
    rm = RewardModel(data.tok.get_vocab_size(), cfg.prompt_len + cfg.response_len, cfg.rm_d_model, cfg.rm_layers,
                     cfg.rm_heads).to(device)
    c, r = c.to(device), r.to(device)
    info = train_loop("reward", rm, lambda i, g: -F.logsigmoid(rm(c[i]) - rm(r[i])).mean(), len(c),
                      max(1, round(cfg.rm_epochs * len(c) / cfg.rm_batch)), cfg.rm_batch, cfg.rm_lr,
                      os.path.join(cfg.out, f"reward_model_{tag}.pt"), settings, cfg.stream_seed + 1,
                      val_fn=lambda: {f"accuracy_{k}": pair_accuracy(rm.eval().reward(a.to(device)), rm.reward(b.to(device)))
                                      for k, (a, b) in tests.items()})
    return rm.eval().requires_grad_(False), info


def sepo_config(cfg: Config) -> sepo.SEPOConfig:
    return sepo.SEPOConfig(lr=cfg.lr, batch_size=cfg.batch // WORLD, group_size=cfg.group, epochs=cfg.epochs,
                           clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, kl_target=cfg.kl_target or None,
                           kl_gain=cfg.kl_gain, kl_steps=min(cfg.kl_steps, cfg.steps), snis_samples=cfg.snis, steps=cfg.steps,
                           corrector_steps=cfg.corrector_steps, advantage="ppo", baseline=cfg.baseline, seed=cfg.stream_seed,
                           pl_positions=cfg.pl_positions, t_eval=cfg.t_eval or None, grad=cfg.grad, ratio=cfg.ratio,
                           path_steps=cfg.path_steps or None, micro_batch=cfg.micro_batch or None, amp=cfg.amp)


def finetune(cfg: Config, data: TextData, graph, noise, pre: nn.Module, rm: RewardModel) -> tuple[nn.Module, list]:
    """Stage 4: sepo.SEPO from the pre-trained weights on the training prompts; a line per iteration, a
    checkpoint every ckpt_every iterations (--iters may grow: the run resumes)."""
    device = next(pre.parameters()).device
    pool = data.train_prompts.to(device)
    scfg = sepo_config(cfg)
    trainer = sepo.SEPO(copy.deepcopy(pre).requires_grad_(True), graph, noise, lambda x: rm.reward(x),
                        cfg.prompt_len + cfg.response_len, scfg, ref_model=pre,
                        prompt_fn=lambda k, gen: pool[torch.randint(len(pool), (k,), generator=gen).to(device)])
    path = os.path.join(cfg.out, f"sepo_steps{cfg.steps}.pt")
    settings = {**keys(cfg, RM_KEYS, data), **dataclasses.asdict(scfg), "world_size": WORLD}
    ck, history = load_ckpt(path, settings), []
    if ck is not None:
        trainer.load_state_dict(ck["trainer"])
        history = ck["history"]
        if len(history) > cfg.iters:
            raise ValueError(f"{path} holds {len(history)} iterations, more than --iters {cfg.iters}; use another --out")
        print(f"[sepo] {'cached' if len(history) >= cfg.iters else 'resuming'}: {path} ({len(history)} iterations)")
    while len(history) < cfg.iters:
        s = trainer.step()
        history.append(s)
        print(f"[sepo] iter {len(history)}/{cfg.iters} reward {s['reward_mean']:.3f}±{s['reward_std']:.3f} KL {s['kl']:.4f} "
              f"alpha {s['kl_coef']:.3g} clip {s['clip_frac']:.2f} ratio<={s['ratio_max']:.2f} {s['time']:.1f}s", flush=True)
        if len(history) % cfg.ckpt_every == 0 or len(history) == cfg.iters:
            save_atomic({"settings": settings, "trainer": trainer.state_dict(), "history": history}, path)
    return trainer.model.eval().requires_grad_(False), history


# ---------------------------------------------------------------------------- evaluation and report
def evaluate(cfg: Config, data: TextData, graph, noise, pre: nn.Module, ft: nn.Module, rm: RewardModel
             ) -> tuple[list, list, list]:
    """Stage 5, on held-out prompts: --eval-samples responses per prompt and model. A first pre-trained draw is
    the reference every row is judged against; a second pre-trained draw shows the win rate of no change. With
    --bon-max, best-of-N (N pre-trained responses per output, the reward model's favourite kept) from one pool:
    a row at SEPO's sampling budget and the curve N = 1, 2, 4, ..., bon_max. -> (rows, curve, examples)"""
    prompts, device = data.test_prompts[: cfg.eval_prompts], next(pre.parameters()).device
    many, P, k = prompts.repeat_interleave(cfg.eval_samples, 0), cfg.prompt_len, cfg.eval_samples
    ref = [gold_score(t) for t in decode(data.tok, generate(cfg, pre, graph, noise, many, cfg.stream_seed + 100)[:, P:])]
    real = torch.cat([prompts, encode_responses(data.tok, data.test_replies[: len(prompts)], cfg.response_len)], 1)
    draws = {"pre-trained": generate(cfg, pre, graph, noise, many, cfg.stream_seed + 200),
             f"SEPO ({cfg.steps} steps)": generate(cfg, ft, graph, noise, many, cfg.stream_seed + 100),  # paired with ref
             "chosen replies (data)": real}
    if cfg.bon_max:
        n_match = 1 + math.ceil(cfg.iters * cfg.batch * cfg.group / len(many))  # SEPO's sampling budget
        n_pool = max(cfg.bon_max, n_match)
        pool = generate(cfg, pre, graph, noise, many.repeat_interleave(n_pool, 0), cfg.stream_seed + 400)
        score = rm.reward(pool).view(len(many), n_pool)
        best = lambda n: pool.view(len(many), n_pool, -1)[torch.arange(len(many)), score[:, :n].argmax(1)]
        draws[f"best-of-{n_match} (RM)"] = best(n_match)

    def measure(name: str, x: Tensor) -> dict:
        text, per = decode(data.tok, x[:, P:]), len(x) // len(prompts)  # per: responses per prompt (1 or k)
        gold = np.array([gold_score(t) for t in text])
        versus = np.array(ref).reshape(len(prompts), k)[:, :per].reshape(-1)
        per_prompt = (np.sign(gold - versus) / 2 + 0.5).reshape(len(prompts), -1).mean(1)  # ties count 1/2
        g = torch.Generator(device).manual_seed(cfg.stream_seed + 300)
        ll = sepo.elbo(pre, graph, noise, x.to(device), cfg.elbo_t, P, g, batch_size=64)
        nll = float(-ll.mean()) / cfg.response_len
        return {"model": name, "n": len(text), "rm_score": float(rm.reward(x.to(device)).mean()),
                "gold_mean": float(gold.mean()), "gold_win": float(per_prompt.mean()),
                "gold_win_ci": bootstrap_ci(per_prompt, seed=cfg.stream_seed), "nll_per_token": nll,
                "perplexity": math.exp(min(nll, 50.0)), **{f"distinct_{n}": distinct_n(text, n, per) for n in (1, 2)}}
    rows = [measure(name, x) for name, x in draws.items()]
    Ns = sorted({2 ** j for j in range(cfg.bon_max.bit_length())} | {cfg.bon_max}) if cfg.bon_max else []
    curve = [{"N": n, **measure(f"best-of-{n} (RM)", best(n))} for n in Ns]
    texts = [decode(data.tok, x[::k, P:]) for x in (draws["pre-trained"], draws[f"SEPO ({cfg.steps} steps)"])]
    prompt_texts = [data.tok.decode([i for i in row.tolist() if i != PAD], skip_special_tokens=False) for row in prompts]
    return rows, curve, list(zip(prompt_texts, *texts))


def report(cfg: Config, rows: list, curve: list, examples: list, history: list, info: dict, stamps: dict) -> dict:
    head = ("| model | n | RM score | gold mean | gold win rate vs pre-trained [95% CI] | NLL/token (pre-trained) "
            "| perplexity | distinct-1 | distinct-2 |")
    lines = [head, "|---" * 9 + "|"] + [
        f"| {r['model']} | {r['n']} | {r['rm_score']:.3f} | {r['gold_mean']:.3f} | {r['gold_win']:.3f} "
        f"[{r['gold_win_ci'][0]:.3f}, {r['gold_win_ci'][1]:.3f}] | {r['nll_per_token']:.3f} | {r['perplexity']:.1f} "
        f"| {r['distinct_1']:.3f} | {r['distinct_2']:.3f} |" for r in rows]
    lines += ["", f"Reward model held-out pairwise accuracy: {fmt({k: v for k, v in info.items() if 'accuracy' in k})}; "
              f"data: {fmt(info['data'])}. Stage times (s): {fmt(stamps)}."]
    table = "\n".join(lines)
    ex = "\n\n".join(f"PROMPT:      {p}\npre-trained: {a}\nSEPO:        {b}" for p, a, b in examples[:8])
    print("\n" + table + "\n\n" + ex)
    result = {"rows": rows, "best_of_n": curve, "info": info, "stage_seconds": stamps, "config": dataclasses.asdict(cfg),
              "history": history, "examples": [dict(zip(("prompt", "pretrained", "sepo"), e)) for e in examples]}
    tag = f"steps{cfg.steps}"
    for name, text in [(f"results_{tag}.md", table + "\n"), (f"examples_{tag}.txt", ex + "\n"),
                       (f"results_{tag}.json", json.dumps(result, indent=1))]:
        save_atomic(text, os.path.join(cfg.out, name))
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    fig = Figure(figsize=(12, 3.2))
    panels = {"reward_mean": "mean reward R(x)", "kl": "path KL to the pre-trained model", "clip_frac": "clip fraction"}
    for a, (key, title) in zip(fig.subplots(1, 3), panels.items()):
        a.plot([h[key] for h in history]), a.set(title=title, xlabel="SEPO iteration")
    fig.tight_layout(), fig.savefig(os.path.join(cfg.out, f"curves_{tag}.png"), dpi=110)
    return result


def bench(cfg: Config, device: torch.device) -> dict:
    """Time one SEPO iteration at these settings with an untrained diffusion LM and reward model (random
    prompts); peak GPU memory on CUDA."""
    torch.manual_seed(cfg.stream_seed)
    graph, noise, model = make_diffusion(cfg, cfg.vocab, device)
    rm = RewardModel(cfg.vocab, cfg.prompt_len + cfg.response_len, cfg.rm_d_model, cfg.rm_layers, cfg.rm_heads).to(device)
    prompts = torch.randint(3, cfg.vocab, (256, cfg.prompt_len), device=device)
    trainer = sepo.SEPO(model, graph, noise, lambda x: rm.reward(x), cfg.prompt_len + cfg.response_len, sepo_config(cfg),
                        prompt_fn=lambda k, gen: prompts[torch.randint(256, (k,), generator=gen).to(device)])
    if device.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    out = {"step_s": trainer.step()["time"],  # its statistics are read back (.item()): CUDA has finished
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")}
    print(f"[bench] {cfg.batch}x{cfg.group} responses, {cfg.steps} steps, micro_batch={cfg.micro_batch or 'all'}, "
          f"grad={cfg.grad}, ratio={cfg.ratio}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
          f"{cfg.graph} LM on {device}: one trainer.step() {out['step_s']:.2f}s, peak GPU memory {out['peak_gib']:.2f} GiB")
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    sepo_config(cfg)  # a bad SEPO setting fails now, not after pre-training
    device = setup(cfg)
    if cfg.bench:
        return bench(cfg, device)
    os.makedirs(cfg.out, exist_ok=True)
    tic, stamps = time.perf_counter(), {}
    data = prepare_data(cfg.data or DEFAULT_PAIRS, cfg.vocab, cfg.prompt_len, cfg.response_len, cfg.stream_seed,
                        cfg.max_pairs or None, cfg.long_prompts)
    print(f"[data] {json.dumps(data.info)}")
    graph, noise, pre = rank0_first(pretrain, cfg, data, device)
    stamps["pretrain"] = time.perf_counter() - tic
    rm, info = rank0_first(train_reward_model, cfg, data, graph, noise, pre, device)
    stamps["reward"] = time.perf_counter() - tic - sum(stamps.values())
    ft, history = finetune(cfg, data, graph, noise, pre, rm)
    stamps["sepo"] = time.perf_counter() - tic - sum(stamps.values())
    if RANK:  # the evaluation and the report are rank 0's
        return {}
    rows, curve, examples = evaluate(cfg, data, graph, noise, pre, ft, rm)
    stamps["evaluation"] = time.perf_counter() - tic - sum(stamps.values())
    if device.type == "cuda":
        info["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return report(cfg, rows, curve, examples, history, {**info, "data": data.info},
                  {**stamps, "total": time.perf_counter() - tic})


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
