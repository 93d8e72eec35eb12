"""What train_dna.py and train_text.py share: flags from a config dataclass, the device and torchrun set-up,
checkpoints (atomic, keyed on their settings, resumed exactly), the training loop of the stages before SEPO,
sepo.SEPOConfig from the shared flags, the SEPO loop with its progress lines, the stage stopwatch, best-of-N's
sizes and sampling budget, the result files (markdown table, numbers, learning curves) and the timing of one
iteration for --bench. docs/design.md says why this is one module rather than a copy in each driver. Each
stage is cached in --out: a run that stops resumes where it was.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sepo
from models.safe_load import load_checkpoint

RANK = int(os.environ.get("RANK", 0))  # set by torchrun; a process alone is rank 0 of 1
WORLD = int(os.environ.get("WORLD_SIZE", 1))


# ---------------------------------------------------------------------------- flags
def arg(default, help: str, choices: Optional[tuple] = None):
    """A Config field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def parse_config(config_cls, presets: dict | Callable[[dict], dict], positive: tuple,
                 argv: Optional[list[str]], description: str, types: Optional[dict] = None) -> tuple:
    """Flags from the dataclass fields: an explicit flag wins over --preset, which wins over the field's
    default. presets: {name: settings}, or a function of the flags given that picks such a table (a paper
    path has presets of its own). Numbers are checked now, not after pre-training (`not >=` also catches
    NaN). -> (config, flags given)."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        if f.type == "bool":  # --x and --no-x: an explicit flag wins over a preset's True as over its False
            kind = dict(action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = dict(type=(types or {}).get(f.name, type(f.default)), choices=f.metadata["choices"])
        flag_help = f"{f.metadata['help']} (default: {f.default!r})"
        p.add_argument("--" + f.name.replace("_", "-"), help=flag_help, **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    table = presets(given) if callable(presets) else presets
    cfg = config_cls(**{**table[given.get("preset", "cpu")], **given})
    for k, v in dataclasses.asdict(cfg).items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if number and not (v > 0 if k in positive else v >= 0):
            raise ValueError(f"--{k.replace('_', '-')} must be {'> 0' if k in positive else '>= 0'}, got {v}")
    if cfg.batch % WORLD:
        raise ValueError(f"--batch {cfg.batch} is the groups of all {WORLD} processes together: "
                         f"make it divisible by {WORLD}")
    return cfg, given


def refuse_unread(given: dict, names: tuple, why: str) -> None:
    """Flags among names given explicitly (a preset's settings are not) are an error naming them: the chosen
    run does not read them, and results.json would record them as if it had."""
    unread = ", ".join("--" + f.replace("_", "-") for f in names if f in given)
    if unread:
        raise ValueError(f"{unread}: {why}")


# ---------------------------------------------------------------------------- device, processes, files
def setup(cfg) -> torch.device:
    """The device; under torchrun also the process group (NCCL and a GPU per process, or gloo on the CPU)."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if WORLD > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
        if RANK:
            sys.stdout = open(os.devnull, "w")
    return device


def rank0_first(stage: Callable, *args):
    """stage(*args) on rank 0, then on the other ranks, which load what it cached in --out: each model trains
    once."""
    out = stage(*args) if RANK == 0 else None
    if WORLD > 1:
        dist.barrier()
    return stage(*args) if RANK else out


def save_atomic(obj, path: str) -> None:
    """Text (UTF-8) or torch.save to a temporary file, synced to disk, then os.replace: a crash never leaves a
    half-written file."""
    if RANK:  # rank 0 alone writes: the ranks hold the same models, and a SEPO state every rank's streams
        return
    mode = dict(mode="w", encoding="utf-8") if isinstance(obj, str) else dict(mode="wb")  # not the locale's
    with open(f"{path}.tmp", **mode) as f:
        if isinstance(obj, str):
            f.write(obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new, whole
    os.replace(f"{path}.tmp", path)


def load_ckpt(path: str, settings: dict) -> Optional[dict]:
    """The checkpoint at path, or None; one made with other settings is an error, never a silent reuse. Read
    as data (models/safe_load.py): nothing in a file in --out can run."""
    ck = load_checkpoint(path) if os.path.exists(path) else None
    diff = {k: (ck["settings"].get(k), v) for k, v in settings.items() if ck and ck["settings"].get(k) != v}
    if diff:
        raise ValueError(f"{path} was made with other settings {diff} (saved, requested); "
                         f"use another --out or delete it")
    return ck


def fmt(d: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


# ---------------------------------------------------------------------------- training loops
def sepo_settings(cfg, **own) -> sepo.SEPOConfig:
    """sepo.SEPOConfig from the SEPO flags both drivers share, and own, a driver's own settings (advantage,
    seed, corrector steps, ...). --batch counts the groups of all processes; 0 means none for --kl-target,
    --path-steps and --micro-batch; --grad/--ratio auto leave the choice to sepo, by graph (the paper's pl /
    snis on the masked graph, rollout / rollout on the uniform one); the path KL spans at most --steps."""
    shared = dict(lr=cfg.lr, batch_size=cfg.batch // WORLD, group_size=cfg.group, epochs=cfg.epochs,
                  clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef, kl_target=cfg.kl_target or None,
                  kl_gain=cfg.kl_gain, kl_steps=min(cfg.kl_steps, cfg.steps), snis_samples=cfg.snis,
                  steps=cfg.steps, pl_positions=cfg.pl_positions, path_steps=cfg.path_steps or None,
                  micro_batch=cfg.micro_batch or None, grad=None if cfg.grad == "auto" else cfg.grad,
                  ratio=None if cfg.ratio == "auto" else cfg.ratio)
    config = sepo.SEPOConfig(**shared, **own)
    refuse_no_op(cfg, config)
    return config


def refuse_no_op(cfg, config: sepo.SEPOConfig) -> None:
    """Settings under which SEPO would run and train nothing: every advantage 0 (one sample per group under
    GRPO or the group baseline, one sample in all under the batch baseline). --lr 0 is refused with the
    drivers' other positive numbers (POSITIVE)."""
    if cfg.group == 1 and (config.advantage == "grpo" or config.baseline == "group"):
        what = "GRPO" if config.advantage == "grpo" else "--baseline group"
        raise ValueError(f"--group 1: under {what} every advantage is 0 (a group of one sample is its own "
                         f"mean), so SEPO would learn nothing; use --group >= 2")
    if cfg.batch * cfg.group == 1 and config.advantage == "ppo" and config.baseline == "batch":
        raise ValueError("--batch 1 --group 1: the batch baseline is the one sample's reward, every "
                         "advantage 0; use more samples")


def train_loop(name: str, model: nn.Module, loss_fn: Callable[[Tensor, torch.Generator], Tensor], n: int,
               steps: int, batch: int, lr: float, path: str, settings: dict, seed: int, every: int = 0,
               val_fn: Callable[[], dict] = dict) -> dict:
    """AdamW + cosine decay on random minibatches of indices [0, n); a checkpoint every `every` steps and at
    the end, and an exact resume from it. -> metrics: the smoothed training loss and val_fn's."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # the minibatch indices
    mgen = torch.Generator(device).manual_seed(seed + 1)  # the loss's own draws (noise levels, masks)
    step, run, metrics, tic = 0, 0.0, {}, time.perf_counter()
    ck = load_ckpt(path, settings)
    if ck is not None:
        model.load_state_dict(ck["model"])
        if ck["step"] == steps:  # finished; a cached model is judged again on this code's held-out sets
            metrics = {**ck["metrics"], **val_fn()}
            print(f"[{name}] cached in {path}: {fmt(metrics)}")
            return metrics
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        mgen.set_state(ck["mgen"])
        step, run = ck["step"], ck["run"]  # run: the smoothed loss goes on where it was
        print(f"[{name}] resuming at step {step}/{steps}")
    while step < steps:
        model.train()
        loss = loss_fn(torch.randint(n, (batch,), generator=gen).to(device), mgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        step += 1
        if step == steps or (every and step % every == 0):
            metrics = {"train_loss": run, "step": step, **val_fn()}
            seconds = time.perf_counter() - tic
            print(f"[{name}] step {step}/{steps} {fmt(metrics)} ({seconds:.0f}s)", flush=True)
            state = dict(settings=settings, model=model.state_dict(), opt=opt.state_dict(),
                         sched=sched.state_dict(), gen=gen.get_state(), mgen=mgen.get_state(), step=step,
                         run=run, metrics=metrics)
            save_atomic(state, path)
    return metrics


def progress_line(tag: str, s: dict, iters: int, nonfinite: str = "") -> str:
    """One line per SEPO iteration: reward, path KL, the KL weight in use, clipping, ratios, time."""
    line = (f"[{tag}] it {s['iteration']}/{iters} reward {s['reward_mean']:+.3f}±{s['reward_std']:.3f} "
            f"kl {s['kl']:.4f} alpha {s['kl_coef']:.3g} clip {s['clip_frac']:.2f} "
            f"ratio {s['ratio_mean']:.3f} (max {s['ratio_max']:.2f}) {s['time']:.1f}s")
    if s.get("kl_shrink", 1.0) < 1.0:
        line += f" budget: weights pulled back x{s['kl_shrink']:.3f}"
    if s.get("skipped"):
        line += f" SKIPPED {s['skipped']} update(s): non-finite {nonfinite}"
    return line


def train_sepo(trainer, tag: str, path: str, settings: dict, iters: int, every: int,
               probe: Optional[Callable[[nn.Module], dict]] = None) -> tuple[list, list]:
    """sepo.SEPO for `iters` iterations, resumed exactly from its checkpoint at path; a progress line per
    iteration, a checkpoint (and probe(model), the evaluation metrics of the trade-off plot) every `every`
    iterations and at the end. A larger --iters goes on from a finished run. -> (history, probes)"""
    ck, history, probes = load_ckpt(path, settings), [], []
    if ck is not None:
        if len(ck["history"]) > iters:
            raise ValueError(f"{path} holds {len(ck['history'])} iterations, more than --iters {iters}; "
                             f"use another --out")
        trainer.load_state_dict(ck["trainer"])
        history = ck["history"]
        # keep the every-`every` probes (and this run's last): an earlier, shorter run also probed its last
        old = ck.get("probes", [])  # absent from checkpoints the drivers wrote before they shared this loop
        probes = [p for p in old if p["iteration"] % every == 0 or p["iteration"] == iters]
        done = "cached" if len(history) >= iters else "resuming"
        print(f"[{tag}] {done}: {path} ({len(history)} iterations)")
    while len(history) < iters:
        s = trainer.step()
        history.append(s)
        print(progress_line(tag, s, iters, trainer.nonfinite), flush=True)
        if len(history) % every == 0 or len(history) == iters:
            if probe is not None:
                probes.append({"iteration": len(history), **probe(trainer.model)})
            state = {"settings": settings, "trainer": trainer.state_dict(), "history": history,
                     "probes": probes}
            save_atomic(state, path)
    return history, probes


def save_curves(runs: dict, path: str) -> None:
    """Reward, path KL and clip fraction per SEPO iteration, one line per run ({name: history})."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    fig = Figure(figsize=(12, 3.2))
    panels = {"reward_mean": "mean reward R(x)", "kl": "path KL to the pre-trained model",
              "clip_frac": "clip fraction"}
    for ax, (key, title) in zip(fig.subplots(1, 3), panels.items()):
        for name, history in runs.items():
            ax.plot([s[key] for s in history], label=name)
        ax.set(title=title, xlabel="SEPO iteration")
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Stopwatch:
    """The seconds of each stage, for the table's note: lap(name) books the time since the previous lap."""

    def __init__(self):
        self.start = time.perf_counter()
        self.laps = {}

    def lap(self, name: str) -> None:
        self.laps[name] = time.perf_counter() - self.start - sum(self.laps.values())

    def seconds(self) -> dict:
        """Every lap, and the total so far."""
        return {**self.laps, "total": time.perf_counter() - self.start}


# ---------------------------------------------------------------------------- evaluation and report
def sampling_budget(cfg, n: int) -> int:
    """N of best-of-N at SEPO's sampling budget: training drew cfg.iters * cfg.batch * cfg.group samples of
    the policy, so each of n outputs may cost its share of them in pre-trained draws, plus its own draw."""
    return 1 + math.ceil(cfg.iters * cfg.batch * cfg.group / n)


def bon_sizes(bon_max: int) -> list[int]:
    """The N of the best-of-N curve: 1, 2, 4, ... and bon_max itself (none for bon_max 0)."""
    if not bon_max:
        return []
    return sorted({2 ** k for k in range(bon_max.bit_length())} | {bon_max})


def best_of(pool: Tensor, reward: Tensor, n: int) -> Tensor:
    """Per output, its highest-reward draw among the first n: pool [M, N, ...], reward [M, N] -> [M, ...]."""
    return pool[torch.arange(len(pool)), reward[:, :n].argmax(1)]


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for cells in rows:
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def save_results(out: str, stem: str, table: str, result: dict, curves: dict, curves_file: str) -> None:
    """A run's report in out: the table (stem.md), its numbers (stem.json) and the learning curves of
    {name: history} (curves_file)."""
    save_atomic(table + "\n", os.path.join(out, f"{stem}.md"))
    save_atomic(json.dumps(result, indent=1), os.path.join(out, f"{stem}.json"))
    save_curves(curves, os.path.join(out, curves_file))


def write_results(cfg, stem: str, results: dict, cols: list[str], notes: list[str], saved: dict) -> None:
    """Print the table of results {row: {column: value}} (percentages to 0.1, the rest to 0.001) and its
    notes; write them (stem.md), the numbers with cfg (stem.json) and the learning curves of saved["runs"]
    (curves.png) into cfg.out."""
    cells = []
    for name, r in results.items():
        cells.append([name] + [f"{r[c]:.1f}" if "%" in c else f"{r[c]:.3f}" for c in cols])
    table = "\n".join(markdown_table(["Model", *cols], cells) + notes)
    print(table)
    curves = {name: run["history"] for name, run in saved["runs"].items()}
    save_results(cfg.out, stem, table, {"config": dataclasses.asdict(cfg), **saved}, curves, "curves.png")
    print(f"[done] {cfg.out}: {stem}.md, {stem}.json, curves.png, samples_*.txt")


# ---------------------------------------------------------------------------- --bench
def peak_gib(device: torch.device) -> float:
    """Peak GPU memory since the last reset, in GiB (NaN on a CPU)."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")


def timed_step(trainer, device: torch.device, what: str) -> tuple[float, float]:
    """--bench: one trainer.step() -> (its seconds, the peak GPU memory in GiB, NaN on a CPU), printed with
    the settings behind them and `what` (the samples and their model). CUDA's queue is drained and its peak
    reset first; step() reads its statistics back, so the GPU is done when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = trainer.step()["time"]
    peak = peak_gib(device)
    c = trainer.cfg
    memory = f", peak GPU memory {peak:.2f} GiB" if device.type == "cuda" else ""  # a CPU has no such peak
    print(f"[bench] {c.batch_size}x{c.group_size} {what}, {c.steps} steps, corrector_steps="
          f"{c.corrector_steps}, micro_batch={c.micro_batch or 'all'}, grad={c.grad}, ratio={c.ratio}: "
          f"one trainer.step() {seconds:.2f}s{memory}")
    return seconds, peak
