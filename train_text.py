"""SEPO on text: RLHF of a discrete diffusion language model, end to end (the paper's Section 4.1).

    python train_text.py                          # CPU, minutes, offline: a small LM trained here, 16 steps
    python train_text.py --data train.jsonl.gz    # a real HH-RLHF preference file (or a folder of them)
    python train_text.py --sedd DIR               # the paper's path: a pre-trained SEDD on GPT-2 tokens
    python train_text.py --sedd louaaron/sedd-medium --preset paper --reward-model RM  # SEDD-SEPO-128
    python train_text.py --preset paper --bench   # time one SEPO iteration, print peak GPU memory

Stages, each cached in --out and resumable: HH-format pairs and a BPE tokenizer (data/text.py), pre-training
of a small diffusion LM on the chosen responses (models/text.py), a GPT-2-architecture reward model, SEPO with
PPO advantages, and an evaluation on held-out prompts (gold-judge win rate with a 95% interval over prompts,
perplexity, distinct-n). With --sedd the LM is a pre-trained SEDD (models/sedd.py: load_sedd), the pairs are
real HH-RLHF in GPT-2 ids (--data; by default the vendored harmless-base test split), the reward model is
--reward-model (any format of models/gpt2.py) or trained here, the judge is --judge or the gold judge, and
--ppl-model adds SEDD's generative perplexity. docs/text.md describes the data, the protocol and the results.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import sepo
from data.text import (EOT, GPT2_VOCAB, PAD, TextData, TextScorer, gold_labelled_pairs, pair_accuracy,
                       prepare, table_cells)
from models.gpt2 import RewardModel
from models.text import (TextReward, bench_networks, end_at_eot, load_networks, make_diffusion,
                         sedd_diffusion, to_device)
from train_common import (RANK, WORLD, Stopwatch, arg, best_of, bon_sizes, fmt, load_ckpt, markdown_table,
                          parse_config, peak_gib, rank0_first, refuse_unread, sampling_budget, save_atomic,
                          save_results, sepo_settings, setup, timed_step, train_loop, train_sepo)


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class Config:
    preset: str = arg("cpu", "cpu: minutes on a laptop; gpu: one GPU; paper: the paper's settings",
                      ("cpu", "gpu", "paper"))
    data: str = arg("", "HH-RLHF file (.jsonl[.gz]) or folder; '' = data/chatterbot_hh.jsonl.gz (--sedd: "
                        "data/hh_rlhf_harmless_base_test.jsonl.gz)")
    out: str = arg("runs/text", "output folder: cached stages, checkpoints, table, plots, examples")
    seed: int = arg(0, "streams seeded 1000 * seed + offsets < 1000: reproducible, no stream shared by seeds")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    bench: bool = arg(False, "only time one SEPO iteration with untrained models and exit")
    max_pairs: int = arg(0, "use at most this many pairs of --data (a seeded subsample; 0: all)")
    long_prompts: str = arg("skip", "a prompt longer than --prompt-len: skip its pair (counted), error, or "
                                    "(--sedd) keep its last tokens", ("skip", "error", "truncate"))
    # the paper's path: a pre-trained SEDD on GPT-2 ids; reward model, judge and perplexity LM of your choice
    sedd: str = arg("", "SEDD folder (hub layout) or hub id, e.g. louaaron/sedd-medium (fetched only when "
                        "named); --bench also takes random:small, random:medium")
    reward_model: str = arg("", "--sedd: a transformers folder or hub id, a minChatGPT checkpoint or ours "
                                "('' = train ours on the pairs)")
    lora_merges: str = arg("", "minChatGPT --reward-model: times LoRA's B A is added to the stored weights "
                               "(models/gpt2.py: load_minchatgpt)", ("", "0", "1", "2"))
    judge: str = arg("", "--sedd: the win rates' judge, a --reward-model format but not the training reward "
                         "model ('' = the gold judge)")
    reward_heads: int = arg(0, "minChatGPT --reward-model of no GPT-2 width: its attention heads")
    judge_lora_merges: str = arg("", "minChatGPT --judge: as --lora-merges", ("", "0", "1", "2"))
    judge_heads: int = arg(0, "minChatGPT --judge: as --reward-heads")
    ppl_model: str = arg("", "--sedd: causal LM folder or hub id of the generative perplexity (SEDD's: "
                             "gpt2-large; '' = the pre-trained SEDD's ELBO perplexity only)")
    checkpointing: bool = arg(False, "--sedd: recompute each SEDD block in the backward pass (memory)")
    graph: str = arg("masked", "masked: sepo.Masked + LogLinear (MDLM); uniform: sepo.Uniform + Geometric",
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
    policy_pairs: int = arg(8, "gold-labelled pairs of pre-trained LM samples per training prompt for the "
                               "reward model (0: none; with --data or --sedd the default: real labels)")
    iters: int = arg(40, "SEPO iterations")
    lr: float = arg(3e-4, "SEPO Adam learning rate")
    batch: int = arg(8, "prompts per SEPO iteration")
    group: int = arg(8, "responses per prompt")
    epochs: int = arg(2, "K gradient steps per iteration")
    clip_eps: float = arg(0.2, "clipping eps of the objective")
    kl_coef: float = arg(0.1, "alpha, weight of the path KL to the pre-trained model")
    kl_target: float = arg(0.0, "a KL budget: alpha = --kl-coef + lambda, lambda >= 0, keeps the path KL at "
                                "most it (0: none)")
    kl_gain: float = arg(0.5, "--kl-target: lambda += kl_gain * min(KL / target - 1, 1) (docs/math.md §7)")
    kl_steps: int = arg(10, "the path KL covers the last kl_steps sampler steps (capped at --steps)")
    snis: int = arg(4, "M latent paths per sample (SNIS ratio, --grad path)")
    steps: int = arg(16, "sampler steps in rollouts and evaluation (the paper: 128 and 1024)")
    corrector_steps: int = arg(0, "gradient-flow corrector steps per sampler step")
    pl_positions: int = arg(8, "--grad pl, masked graph: response positions per sample")
    grad: str = arg("pl", "grad log pi estimator (pl: the paper's; auto: by graph; docs/math.md §3-4)",
                    ("pl", "path", "rollout", "auto"))
    ratio: str = arg("snis", "importance ratio (snis: the paper's; auto: by graph; docs/math.md §5)",
                     ("snis", "rollout", "auto"))
    path_steps: int = arg(0, "--grad path/rollout: transitions with gradient per path (0: all)")
    micro_batch: int = arg(0, "samples per gradient pass (0: all); bounds memory, same update")
    chunk_size: int = arg(1024, "sequences per no-grad pass of SEPO (ratios, the KL reference)")
    eval_batch: int = arg(64, "sequences per sampling and ELBO pass of the evaluation")
    amp: str = arg("none", "bf16: autocast the rollout and gradient passes; auto: bf16 on CUDA",
                   ("none", "bf16", "auto"))
    baseline: str = arg("group", "PPO advantage A = R - b, b the mean reward of the prompt's group, the "
                                 "batch or a running mean", ("group", "batch", "running"))
    t_eval: float = arg(0.0, "--grad pl: time of the score pass (0: one sampler step, 1 / steps)")
    ckpt_every: int = arg(5, "SEPO iterations between checkpoints")
    eval_prompts: int = arg(128, "held-out prompts evaluated (at most all of them)")
    eval_samples: int = arg(8, "responses per held-out prompt and model")
    elbo_t: int = arg(8, "Monte-Carlo times per sequence for the perplexity (sepo.elbo)")
    bon_max: int = arg(0, "best-of-N by the reward model: a row at SEPO's sampling budget, the curve N = 1, "
                          "2, 4, ... and bon_max (0: none)")

    @property
    def stream_seed(self) -> int:  # streams seeded stream_seed + k, k < 1000: two seeds share no stream
        return 1000 * self.seed


PRESETS = {
    "cpu": {},
    # One GPU: the largest pipeline that runs end to end in minutes, 128 steps; --steps 1024 also fits.
    "gpu": dict(vocab=4096, prompt_len=32, response_len=32, d_model=384, n_layers=6, n_heads=6,
                pretrain_steps=4000, pretrain_batch=128, pretrain_lr=5e-4, rm_d_model=256, rm_layers=4,
                rm_heads=4, rm_lr=3e-4, steps=128, iters=100, batch=8, group=8, lr=1e-4, kl_steps=10, snis=4,
                pl_positions=16, micro_batch=16),
    # The paper's SEPO settings (docs/math.md §10) on a SEDD-small-sized network (12 x 768, ~99M parameters).
    "paper": dict(vocab=4096, prompt_len=64, response_len=64, d_model=768, n_layers=12, n_heads=12,
                  pretrain_steps=50_000, pretrain_batch=64, pretrain_lr=3e-4, rm_d_model=768, rm_layers=12,
                  rm_heads=12, rm_epochs=1.0, rm_batch=32, rm_lr=5e-5, policy_pairs=4, steps=128, iters=7000,
                  batch=8, group=8, lr=1e-4, kl_coef=0.05, kl_steps=10, snis=4, pl_positions=16,
                  micro_batch=8, eval_prompts=640, elbo_t=16),
}
# --sedd (docs/text.md): GPT-2 lengths that fit HH-RLHF (P = 128 holds 62% of its prompts, 256 88%; R = 32
# holds 51% of its replies whole, 128 95%); small passes, as each holds [chunk, P + R, 50258] scores.
SEDD_PAPER = dict(prompt_len=256, response_len=128, rm_d_model=768, rm_layers=12, rm_heads=12, rm_epochs=1.0,
                  rm_batch=32, rm_lr=5e-5, steps=128, iters=7000, batch=8, group=8, epochs=2, lr=1e-5,
                  kl_coef=0.05, kl_steps=10, snis=4, pl_positions=16, micro_batch=1, chunk_size=4,
                  eval_batch=8, amp="auto", checkpointing=True, eval_prompts=256)
SEDD_PRESETS = {"cpu": dict(prompt_len=128, response_len=32, iters=10, batch=4, group=4, lr=1e-5,
                            micro_batch=4, chunk_size=16, eval_batch=16, eval_prompts=32, eval_samples=4),
                "gpu": {**SEDD_PAPER, "iters": 500, "micro_batch": 4, "chunk_size": 16, "eval_batch": 32},
                "paper": SEDD_PAPER}
POSITIVE = ("vocab", "prompt_len", "response_len", "d_model", "n_layers", "n_heads", "pretrain_steps",
            "pretrain_batch", "pretrain_lr", "rm_d_model", "rm_layers", "rm_heads", "rm_epochs", "rm_batch",
            "rm_lr", "ckpt_every", "eval_prompts", "eval_samples", "elbo_t", "kl_gain", "chunk_size",
            "eval_batch", "lr")  # lr 0: SEPO would train nothing
SEDD_ONLY = ("reward_model", "lora_merges", "reward_heads", "judge", "judge_lora_merges", "judge_heads",
             "ppl_model", "checkpointing")
LM_ONLY = ("graph", "vocab", "d_model", "n_layers", "n_heads", "pretrain_steps", "pretrain_batch",
           "pretrain_lr")  # the default run's LM: not read with --sedd


def parse_args(argv: Optional[list[str]] = None) -> Config:
    """Flags from the Config fields: an explicit flag wins over --preset (SEDD_PRESETS with --sedd), which
    wins over the field's default."""
    presets = lambda given: SEDD_PRESETS if given.get("sedd") else PRESETS  # the SEDD path has its own
    cfg, given = parse_config(Config, presets, POSITIVE, argv, __doc__.split("\n\n")[0])
    if (cfg.data or cfg.sedd) and "policy_pairs" not in given:
        cfg.policy_pairs = 0  # real preference files have real labels; the gold judge only evaluates
    needs = [f for f in SEDD_ONLY if getattr(cfg, f)] + ["long_prompts"] * (cfg.long_prompts == "truncate")
    if needs and not cfg.sedd:
        raise ValueError(f"--{needs[0].replace('_', '-')} is for the SEDD path (GPT-2 ids): add --sedd")
    if cfg.sedd:
        refuse_unread(given, LM_ONLY, "the default run's own LM, not read with --sedd (it fine-tunes SEDD)")
    for width, heads in (("rm_d_model", "rm_heads"), ("d_model", "n_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise ValueError(f"--{width.replace('_', '-')} {getattr(cfg, width)} must be divisible by "
                             f"--{heads.replace('_', '-')} {getattr(cfg, heads)}")
    if cfg.sedd.startswith("random:") and not cfg.bench:
        raise ValueError(f"--sedd {cfg.sedd}: random weights only time an iteration (--bench)")
    return cfg


def sepo_config(cfg: Config, amp: str) -> sepo.SEPOConfig:
    """SEPO's settings: the shared flags (train_common.sepo_settings), PPO's advantage R - b, the text run's
    own flags."""
    return sepo_settings(cfg, corrector_steps=cfg.corrector_steps, advantage="ppo", baseline=cfg.baseline,
                         seed=cfg.stream_seed, t_eval=cfg.t_eval or None, chunk_size=cfg.chunk_size, amp=amp)


# ---------------------------------------------------------------------------- stages: cached, resumable
LM_KEYS = ("seed", "max_pairs", "vocab", "prompt_len", "response_len", "graph", "d_model", "n_layers",
           "n_heads", "pretrain_steps", "pretrain_batch", "pretrain_lr")
SEDD_KEYS = ("seed", "max_pairs", "prompt_len", "response_len", "long_prompts")  # + the weights' hash
RM_ONLY = ("rm_d_model", "rm_layers", "rm_heads", "rm_epochs", "rm_batch", "rm_lr", "policy_pairs", "steps",
           "corrector_steps")
MODEL_HASHES = ("sedd_sha256", "reward_sha256")  # --sedd: the weights loaded, in data.info


def keys(cfg: Config, data: TextData, rm: bool = True) -> dict:
    """A stage's settings, the base of its random streams, the hashes of the data file (not its path: one file
    however spelt), the tokenizer and (--sedd) the weights loaded: none changes unnoticed."""
    names = (SEDD_KEYS if cfg.sedd else LM_KEYS) + (RM_ONLY if rm else ())
    return {**{n: getattr(cfg, n) for n in names}, "data_sha256": data.info["sha256"],
            "tokenizer_sha256": data.info["tokenizer_sha256"], "stream_seed": cfg.stream_seed,
            **{k: data.info[k] for k in MODEL_HASHES if k in data.info}}


def pretrain(cfg: Config, data: TextData, device) -> tuple[sepo.Graph, object, nn.Module]:
    """Stage 2: the diffusion LM, trained with sepo.pretrain_loss (the prompt block is never noised)."""
    torch.manual_seed(cfg.stream_seed)
    graph, noise, model = make_diffusion(cfg, data.tok.get_vocab_size(), device)
    X = data.lm_train.to(device)
    loss_fn = lambda i, g: sepo.pretrain_loss(model, graph, noise, X[i], cfg.prompt_len, g)
    train_loop("pretrain", model, loss_fn, len(X), cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_lr,
               os.path.join(cfg.out, "pretrain.pt"), keys(cfg, data, rm=False), cfg.stream_seed, every=200)
    save_atomic(data.tok.to_str(), os.path.join(cfg.out, "tokenizer.json"))  # only now: pretrain.pt took it
    return graph, noise, model.eval().requires_grad_(False)


def generate(cfg: Config, model: nn.Module, graph, noise, prompts: Tensor, seed: int) -> Tensor:
    """One response per row of prompts [N, Lp] -> [N, Lp + Lr] (on the model's device)."""
    device = next(model.parameters()).device
    return sepo.sample(model, graph, noise, len(prompts), cfg.prompt_len + cfg.response_len, cfg.steps,
                       cfg.corrector_steps, prompts.to(device), torch.Generator(device).manual_seed(seed),
                       batch_size=cfg.eval_batch)


def policy_pairs(cfg: Config, data: TextData, graph, noise, pre: nn.Module, prompts: Tensor, seed: int
                 ) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) [N, L]: --policy-pairs pairs of pre-trained LM responses per prompt, ordered by the
    gold judge (the stand-in labeller), near-ties (< 0.05) dropped. Trained on real replies only, a reward
    model scores model samples by features the judge ignores, and SEPO climbs those; labelled samples put it
    on SEPO's start. --sedd: each row up to its first EOT, as the judge labels it and the reward reads it."""
    x = generate(cfg, pre, graph, noise, prompts.repeat_interleave(2 * cfg.policy_pairs, 0), seed).cpu()
    x = end_at_eot(x, cfg.prompt_len) if cfg.sedd else x
    return gold_labelled_pairs(x, data.response_texts(x[:, cfg.prompt_len:]))


def train_reward_model(cfg: Config, data: TextData, graph, noise, pre: nn.Module, device
                       ) -> tuple[RewardModel, dict]:
    """Stage 3: Bradley-Terry, -log sigmoid(score(chosen) - score(rejected)), on the reward model's pairs plus
    (--policy-pairs) gold-labelled pairs of pre-trained LM responses to the training prompts."""
    settings, tag = keys(cfg, data), f"steps{cfg.steps}"
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
    vocab, pad = (GPT2_VOCAB, EOT) if cfg.sedd else (data.tok.get_vocab_size(), PAD)
    rm = RewardModel(vocab, cfg.prompt_len + cfg.response_len, cfg.rm_d_model, cfg.rm_layers, cfg.rm_heads,
                     pad).to(device)
    c, r = c.to(device), r.to(device)

    def val_fn() -> dict:
        rm.eval()
        return {f"accuracy_{k}": pair_accuracy(rm.reward(a.to(device)), rm.reward(b.to(device)))
                for k, (a, b) in tests.items()}
    steps = max(1, round(cfg.rm_epochs * len(c) / cfg.rm_batch))
    info = train_loop("reward", rm, lambda i, g: -F.logsigmoid(rm(c[i]) - rm(r[i])).mean(), len(c), steps,
                      cfg.rm_batch, cfg.rm_lr, os.path.join(cfg.out, f"reward_model_{tag}.pt"), settings,
                      cfg.stream_seed + 1, val_fn=val_fn)
    return rm.eval().requires_grad_(False), info


def finetune(cfg: Config, data: TextData, graph, noise, pre: nn.Module, rm, amp: str,
             policy: Optional[nn.Module] = None) -> tuple[nn.Module, list]:
    """Stage 4: sepo.SEPO from the pre-trained weights (a copy of pre, or --sedd's fp32 policy) on the
    training prompts, the KL to pre; a progress line per iteration, a checkpoint every --ckpt-every
    iterations (--iters may grow: the run resumes)."""
    device = next(pre.parameters()).device
    pool = data.train_prompts.to(device)
    scfg = sepo_config(cfg, amp)
    model = copy.deepcopy(pre) if policy is None else policy
    prompt_fn = lambda k, gen: pool[torch.randint(len(pool), (k,), generator=gen).to(device)]
    # pre stays frozen (the evaluation reads it): SEPO's reference as is, no copy (SEDD medium, bf16: 0.85 GB)
    trainer = sepo.SEPO(model.requires_grad_(True), graph, noise, lambda x: rm.reward(x),
                        cfg.prompt_len + cfg.response_len, scfg, ref_model=pre, prompt_fn=prompt_fn,
                        copy_ref=False)
    settings = {**keys(cfg, data), **dataclasses.asdict(trainer.cfg), "world_size": WORLD}
    history, _ = train_sepo(trainer, "sepo", os.path.join(cfg.out, f"sepo_steps{cfg.steps}.pt"), settings,
                            cfg.iters, cfg.ckpt_every)
    return trainer.model.eval().requires_grad_(False), history


# ---------------------------------------------------------------------------- evaluation and report
def evaluate(cfg: Config, data: TextData, graph, noise, pre: nn.Module, ft: nn.Module, rm, judge=None,
             lm=None) -> tuple[list, list, list, dict]:
    """Stage 5, on held-out prompts: --eval-samples responses per prompt and model. A first pre-trained draw
    is the reference every row is judged against (the gold judge on the text, or --judge's score); a second
    pre-trained draw shows the win rate of no change. With --bon-max, best-of-N (N pre-trained responses per
    output, the reward model's favourite kept) from one pool: a row at SEPO's sampling budget and the curve
    N = 1, 2, 4, ..., bon_max. --sedd reads every sample up to its first EOT (models/text.py: end_at_eot).
    -> (rows, curve, examples, each row's samples)"""
    prompts = data.test_prompts[: cfg.eval_prompts]
    many = prompts.repeat_interleave(cfg.eval_samples, 0)
    P = cfg.prompt_len
    k = cfg.eval_samples
    read = (lambda x: end_at_eot(x, P)) if cfg.sedd else (lambda x: x)
    first = read(generate(cfg, pre, graph, noise, many, cfg.stream_seed + 100))
    score = TextScorer(cfg, data, first, pre, graph, noise, rm, judge, lm)  # rows judged against `first`
    replies = data.encode_responses(data.test_replies[: len(prompts)], cfg.response_len)
    sepo_row = f"SEPO ({cfg.steps} steps)"
    draws = {"pre-trained": generate(cfg, pre, graph, noise, many, cfg.stream_seed + 200),
             sepo_row: generate(cfg, ft, graph, noise, many, cfg.stream_seed + 100),  # paired with `first`
             "chosen replies (data)": torch.cat([prompts, replies], 1)}
    if cfg.bon_max:
        n_match = sampling_budget(cfg, len(many))
        n_pool = max(cfg.bon_max, n_match)
        pool = generate(cfg, pre, graph, noise, many.repeat_interleave(n_pool, 0), cfg.stream_seed + 400)
        pool = read(pool)
        reward = rm.reward(pool).view(len(many), n_pool)
        pool = pool.view(len(many), n_pool, -1)
        draws[f"best-of-{n_match} (RM)"] = best_of(pool, reward, n_match)
    draws = {name: read(x) for name, x in draws.items()}
    rows = [score(name, x) for name, x in draws.items()]
    curve = []
    for n in bon_sizes(cfg.bon_max):
        curve.append({"N": n, **score(f"best-of-{n} (RM)", best_of(pool, reward, n))})
    shown = [[" ".join(t.split()) for t in data.response_texts(draws[name][::k, P:])]  # one line each
             for name in ("pre-trained", sepo_row)]
    examples = list(zip(data.prompt_texts(prompts), *shown))
    return rows, curve, examples, {name: x.cpu() for name, x in draws.items()}


def report(cfg: Config, rows: list, curve: list, examples: list, history: list, info: dict,
           stamps: dict) -> dict:
    judge = f"judge {cfg.judge}" if cfg.judge else "gold judge (gold_score)" if cfg.sedd else "gold"
    lm = "ELBO of the pre-trained SEDD" if cfg.sedd else "pre-trained"
    ppl = "perplexity (SEDD's ELBO, not GPT-2 large)" if cfg.sedd else "perplexity"
    head, cells = table_cells(rows, judge, lm, ppl, cfg.ppl_model)
    accuracy = fmt({k: v for k, v in info.items() if "accuracy" in k})
    note = (f"Reward model held-out pairwise accuracy: {accuracy}; data: {fmt(info['data'])}. "
            f"Stage times (s): {fmt(stamps)}.")
    table = "\n".join(markdown_table(head, cells) + ["", note])
    ex = "\n\n".join(f"PROMPT:      {p}\npre-trained: {a}\nSEPO:        {b}" for p, a, b in examples[:8])
    print("\n" + table + "\n\n" + ex)
    result = {"rows": rows, "best_of_n": curve, "info": info, "stage_seconds": stamps,
              "config": dataclasses.asdict(cfg), "history": history,
              "examples": [dict(zip(("prompt", "pretrained", "sepo"), e)) for e in examples]}
    tag = f"steps{cfg.steps}"
    save_atomic(ex + "\n", os.path.join(cfg.out, f"examples_{tag}.txt"))
    save_results(cfg.out, f"results_{tag}", table, result, {"SEPO": history}, f"curves_{tag}.png")
    return result


def bench(cfg: Config, device: torch.device, amp: str) -> dict:
    """Time one SEPO iteration at these settings with untrained models (--sedd: the SEDD given, and
    --reward-model if given) on random prompts; peak GPU memory on CUDA."""
    torch.manual_seed(cfg.stream_seed)
    graph, noise, model, ref, rm = bench_networks(cfg, device, amp)
    prompts = torch.randint(3, EOT if cfg.sedd else cfg.vocab, (256, cfg.prompt_len), device=device)
    prompt_fn = lambda k, gen: prompts[torch.randint(256, (k,), generator=gen).to(device)]
    L = cfg.prompt_len + cfg.response_len
    trainer = sepo.SEPO(model.requires_grad_(True), graph, noise, lambda x: rm.reward(x), L,
                        sepo_config(cfg, amp), ref_model=ref, prompt_fn=prompt_fn, copy_ref=ref is None)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    lm = f"SEDD {cfg.sedd}" if cfg.sedd else cfg.graph
    seconds, peak = timed_step(trainer, device, f"responses of a {size:.1f}M-parameter {lm} LM on {device}")
    return {"step_s": seconds, "peak_gib": peak}


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv)
    device = setup(cfg)
    amp = "bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda") else "none"
    sepo_config(cfg, amp)  # a bad SEPO setting fails now, not after pre-training
    if cfg.bench:
        return bench(cfg, device, amp)
    nets = load_networks(cfg, device, amp) if cfg.sedd else {}  # a wrong file fails now, before any work
    os.makedirs(cfg.out, exist_ok=True)
    clock = Stopwatch()
    data = prepare(cfg.data, bool(cfg.sedd), cfg.vocab, cfg.prompt_len, cfg.response_len, cfg.stream_seed,
                   cfg.max_pairs or None, cfg.long_prompts)
    data.info.update({k: nets[k] for k in MODEL_HASHES if nets.get(k)})  # --sedd: the weights' hashes
    print(f"[data] {json.dumps(data.info)}")
    if cfg.sedd:
        graph, noise = sedd_diffusion()
        pre = nets["ref"]
    else:
        graph, noise, pre = rank0_first(pretrain, cfg, data, device)
    clock.lap("data" if cfg.sedd else "pretrain")
    if cfg.reward_model:  # given: scored on the held-out pairs
        rm = nets["reward"]
        info = {"accuracy_data": pair_accuracy(*(rm.reward(x) for x in data.rm_test))}
    else:
        rm, info = rank0_first(train_reward_model, cfg, data, graph, noise, pre, device)
        rm = TextReward(rm, cfg.prompt_len) if cfg.sedd else rm
    clock.lap("reward")
    ft, history = finetune(cfg, data, graph, noise, pre, rm, amp, nets.get("policy"))
    clock.lap("sepo")
    if RANK:  # the evaluation and the report are rank 0's
        return {}
    bf16 = torch.autocast(device.type, torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    with bf16:  # sampling and ELBO in the rollouts' precision; the scorers turn it off (models/text.py)
        judge, lm = to_device(nets, device)
        rows, curve, examples, samples = evaluate(cfg, data, graph, noise, pre, ft, rm, judge, lm)
    save_atomic(samples, os.path.join(cfg.out, f"samples_steps{cfg.steps}.pt"))
    clock.lap("evaluation")
    if device.type == "cuda":
        info["peak_gpu_gib"] = peak_gib(device)
    return report(cfg, rows, curve, examples, history, {**info, "data": data.info}, clock.seconds())


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
