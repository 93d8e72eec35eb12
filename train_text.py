"""SEPO on text: RLHF of a discrete diffusion language model, end to end and offline.

The paper's language experiment (Zekri & Boullé, section 4.1) in miniature:

  1. data       real English dialogue turns (chatterbot-corpus, BSD-3) turned into
                preference pairs in the HH-RLHF format by a transparent "gold judge"
                (VADER sentiment + politeness - length penalty), or a real HH-RLHF
                file given with --data.
  2. tokenizer  byte-level BPE trained offline with `tokenizers` on the training split.
  3. pretrain   a small sigma-conditioned transformer trained from scratch with
                sepo.pretrain_loss: masked graph (MDLM denoiser, default) or
                uniform graph (SEDD-style log concrete scores, --graph uniform). The prompt is a fixed,
                left-padded prefix block that is never noised; only the response is
                diffused.
  4. reward     a GPT-2-architecture model built from a config (no pretrained
                weights) with a scalar head, trained with the Bradley-Terry loss on
                half of the pairs plus gold-labelled pairs of pre-trained LM samples
                (how RLHF collects labels); R(x) = sigmoid(score) in (0, 1).
  5. SEPO       sepo.SEPO with PPO advantages and the KL to the pre-trained model,
                prompts drawn from the training split.
  6. evaluate   on held-out prompts: reward-model score, win rate against the
                pre-trained model under the gold judge (which the policy never sees),
                NLL under the pre-trained model (sepo.elbo) and distinct-n, so reward
                hacking shows up; a table, a reward/KL plot and examples.

Every stage is cached in --out and resumable; run it again to continue.

    python train_text.py                         # default: ~13 min on a 2-core CPU
    python train_text.py --steps 128 --iters 200 # SEDD-SEPO-128 style variant
    python train_text.py --preset paper --data hh-rlhf/train.jsonl.gz --device cuda
"""
from __future__ import annotations

import argparse
import copy
import glob
import gzip
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config
# Presets fix every size-related knob; any flag given on the command line wins.
PRESETS: dict[str, dict] = {
    # ~13 min on 2 CPU cores: tiny models, short responses, few sampler steps.
    "default": dict(vocab=2048, prompt_len=20, response_len=16,
                    d_model=128, n_layers=3, n_heads=4,
                    pretrain_steps=1200, pretrain_batch=64, pretrain_lr=1e-3,
                    rm_d_model=64, rm_layers=2, rm_heads=4, rm_epochs=4, rm_batch=64, rm_lr=1e-3,
                    policy_pairs=8, steps=16, iters=40, batch=8, group=8, lr=3e-4, epochs=2, kl_coef=0.1,
                    kl_steps=10, snis=4, pl_positions=8, eval_prompts=128, elbo_t=8),
    # The paper's settings (SEPO_MATH section 10: 128 sampler steps, Adam 1e-4, K = 2, M = 4,
    # eps = 0.2, alpha = 0.05 truncated to the last 10 steps, 7k iterations) on a SEDD-small-sized
    # network (12 x 768, ~100M parameters). The path KL backpropagates through
    # batch * group * kl_steps sequences at once, so 8 x 2 sequences of 64 + 64 tokens keep
    # the activations (~0.7 MB per token) within 24 GB.
    "paper": dict(vocab=4096, prompt_len=64, response_len=64,
                  d_model=768, n_layers=12, n_heads=12,
                  pretrain_steps=50000, pretrain_batch=64, pretrain_lr=3e-4,
                  rm_d_model=768, rm_layers=12, rm_heads=12, rm_epochs=1, rm_batch=32, rm_lr=5e-5,
                  policy_pairs=4,
                  steps=128, iters=7000, batch=8, group=2, lr=1e-4, epochs=2, kl_coef=0.05,
                  kl_steps=10, snis=4, pl_positions=16, eval_prompts=640, elbo_t=16),
    # Seconds: used by the tests.
    "tiny": dict(vocab=300, prompt_len=12, response_len=8,
                 d_model=32, n_layers=1, n_heads=2,
                 pretrain_steps=20, pretrain_batch=16, pretrain_lr=1e-3,
                 rm_d_model=32, rm_layers=1, rm_heads=2, rm_epochs=2, rm_batch=32, rm_lr=1e-3,
                 policy_pairs=1,
                 steps=4, iters=2, batch=2, group=2, lr=1e-4, epochs=1, kl_coef=0.05,
                 kl_steps=2, snis=2, pl_positions=4, eval_prompts=8, elbo_t=2),
}

SPECIALS = ["[PAD]", "[H]", "[A]"]  # pad, start of a Human turn, start of an Assistant turn
PAD, HUMAN, ASSISTANT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="default", help="size preset; individual flags override it")
    a("--out", default="runs/text", help="output folder: cached stages, checkpoints, table, plot, examples")
    a("--data", default=None, help="HH-RLHF preference file (.jsonl or .jsonl.gz, keys 'chosen'/'rejected'); "
      "default: pairs built offline from chatterbot-corpus by the gold judge")
    a("--max-pairs", type=int, default=None, help="use at most this many pairs from --data (seeded subsample)")
    a("--long-prompts", choices=["error", "skip"], default="error",
      help="what to do with a prompt longer than --prompt-len tokens")
    a("--graph", choices=["uniform", "masked"], default="masked",
      help="uniform: sepo.Uniform + sepo.Geometric, network outputs log concrete scores (SEDD); "
      "masked: sepo.Masked + sepo.LogLinear, network outputs denoiser logits (MDLM)")
    a("--seed", type=int, default=0, help="seed of every stage")
    a("--device", default="cpu", help="torch device (cpu, cuda)")
    a("--threads", type=int, default=2, help="torch CPU threads")
    g = p.add_argument_group("sizes (default: from --preset)")
    g.add_argument("--vocab", type=int, help="BPE vocabulary size, special tokens included")
    g.add_argument("--prompt-len", type=int, help="prompt block length in tokens (prompts are left-padded)")
    g.add_argument("--response-len", type=int, help="response length in tokens (longer responses are cut)")
    g.add_argument("--d-model", type=int, help="diffusion LM width")
    g.add_argument("--n-layers", type=int, help="diffusion LM transformer layers")
    g.add_argument("--n-heads", type=int, help="diffusion LM attention heads")
    g = p.add_argument_group("pre-training of the diffusion LM")
    g.add_argument("--pretrain-steps", type=int, help="optimizer steps")
    g.add_argument("--pretrain-batch", type=int, help="sequences per step")
    g.add_argument("--pretrain-lr", type=float, help="AdamW peak learning rate (cosine decay)")
    g = p.add_argument_group("reward model (GPT-2 architecture)")
    g.add_argument("--rm-d-model", type=int, help="GPT-2 n_embd")
    g.add_argument("--rm-layers", type=int, help="GPT-2 n_layer")
    g.add_argument("--rm-heads", type=int, help="GPT-2 n_head")
    g.add_argument("--rm-epochs", type=int, help="epochs over the reward model's data (half of the pairs + --policy-pairs)")
    g.add_argument("--rm-batch", type=int, help="pairs per step")
    g.add_argument("--rm-lr", type=float, help="AdamW learning rate")
    g.add_argument("--policy-pairs", type=int, help="gold-labelled pairs of pre-trained LM responses per "
                   "training prompt added to the reward model's data, as RLHF labels model samples "
                   "(0: none; default 0 with --data, whose pairs carry real labels)")
    g = p.add_argument_group("SEPO fine-tuning")
    g.add_argument("--steps", type=int, help="sampler (denoising) steps in rollouts and evaluation "
                   "(the paper's SEDD-SEPO-128 / -1024 use 128 / 1024)")
    g.add_argument("--iters", type=int, help="SEPO iterations (sepo.SEPO.step calls)")
    g.add_argument("--batch", type=int, help="prompts per iteration")
    g.add_argument("--group", type=int, help="responses per prompt")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--epochs", type=int, help="optimisation epochs per iteration (K)")
    g.add_argument("--kl-coef", type=float, help="alpha, weight of the KL to the pre-trained model")
    g.add_argument("--kl-steps", type=int, help="KL truncated to the last k sampler steps")
    g.add_argument("--snis", type=int, help="M, SNIS paths per sample for the importance ratio")
    g.add_argument("--pl-positions", type=int, help="masked graph: response positions per sample in grad log pi "
                   "(an unbiased random subset, scaled; sepo.SEPOConfig.pl_positions)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO clipping epsilon")
    g.add_argument("--baseline", choices=["prompt", "batch", "running"], default="prompt",
                   help="PPO advantage A = R - b: b = mean reward of the other responses to the same "
                   "prompt (a Monte-Carlo value V(prompt)), the batch mean, or a running mean")
    g.add_argument("--t-eval", type=float, default=None,
                   help="time of the score pass in the SEPO gradient (sepo.SEPOConfig.t_eval; "
                   "default: one sampler step, 1 / steps)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-prompts", type=int, help="held-out prompts evaluated (at most all of them)")
    g.add_argument("--eval-samples", type=int, default=8, help="responses per held-out prompt and model")
    g.add_argument("--elbo-t", type=int, help="Monte-Carlo times per sequence in sepo.elbo")
    g.add_argument("--examples", type=int, default=8, help="prompt/response examples printed and saved")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.data is not None and args.policy_pairs is None:
        args.policy_pairs = 0  # a real preference file has real labels; the gold judge only evaluates
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- gold judge
# The gold judge plays the human labeller. It is a fixed, readable rule: the
# policy never sees it (SEPO only sees the learned reward model), so a higher
# gold win rate after fine-tuning means the reward model transferred, not that
# the policy gamed the judge.
POLITE = ["please", "thank", "thanks", "sorry", "glad", "happy", "welcome", "appreciate",
          "of course", "sure", "great", "kind", "love", "enjoy", "hope", "nice", "good"]
_VADER = None


def gold_score(response: str) -> float:
    """compound VADER sentiment in [-1, 1] + 0.25 per politeness marker (at most 2)
    - 0.15 per word under 4 words - 0.05 per word over 20 words. Empty text: -2."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _VADER = SentimentIntensityAnalyzer()
    text = response.strip()
    words = re.findall(r"[A-Za-z0-9']+", text)
    if not words:
        return -2.0
    low = " " + " ".join(w.lower() for w in words) + " "
    polite = sum(1 for m in POLITE if f" {m}" in low)  # prefix match: thank/thanks/thankful
    score = _VADER.polarity_scores(text)["compound"] + 0.25 * min(polite, 2)
    return score - 0.15 * max(0, 4 - len(words)) - 0.05 * max(0, len(words) - 20)


def gold_win_rate(a: list[str], b: list[str]) -> float:
    """Fraction of paired responses where the gold judge prefers a over b (ties count 1/2)."""
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in
            zip(map(gold_score, a), map(gold_score, b))]
    return float(np.mean(wins))


# ----------------------------------------------------------------------------- data
@dataclass
class Pair:
    prompt: list[tuple[str, str]]  # [(role, text)], role "Human"/"Assistant"; ends with a Human turn
    chosen: str                    # final Assistant response preferred by the labeller
    rejected: str
    line: int = 0                  # 1-based line in the source file (for error messages)


_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(text: str, where: str = "") -> tuple[list[tuple[str, str]], str]:
    """'\\n\\nHuman: ... \\n\\nAssistant: ...' -> (prompt turns, final Assistant response)."""
    parts = _TURN.split(text)
    if len(parts) < 5 or parts[-2] != "Assistant":
        raise ValueError(f"{where}: expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns, got {text[:80]!r}")
    if parts[0].strip():
        raise ValueError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0][:60]!r}")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 2, 2)]
    if not any(role == "Human" and t for role, t in turns):
        raise ValueError(f"{where}: empty prompt (no non-empty Human turn before the final Assistant turn)")
    return turns, parts[-1].strip()


def load_hh(path: str) -> list[Pair]:
    """Read an HH-RLHF file (.jsonl or .jsonl.gz): one JSON object per line with string
    fields 'chosen' and 'rejected' sharing the same dialogue prefix. Errors name the line."""
    opener = gzip.open if path.endswith(".gz") else open
    pairs, mismatched = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for k in ("chosen", "rejected"):
                if not isinstance(obj.get(k), str):
                    raise ValueError(f"{where}: missing or non-string field {k!r}")
            prompt, chosen = split_hh(obj["chosen"], where + " (chosen)")
            prompt_r, rejected = split_hh(obj["rejected"], where + " (rejected)")
            mismatched += prompt_r != prompt  # HH-RLHF has a few; keep the chosen side's prompt
            pairs.append(Pair(prompt, chosen, rejected, n))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    if mismatched:
        print(f"[data] note: {mismatched} pairs have different prompts in chosen/rejected; used chosen's")
    return pairs


def to_hh(prompt: list[tuple[str, str]], response: str) -> str:
    return "".join(f"\n\n{r}: {t}" for r, t in prompt) + f"\n\nAssistant: {response}"


def chatterbot_dialogues() -> list[tuple[str, str]]:
    """Consecutive turns (utterance, reply) of the English chatterbot-corpus files,
    cleaned: no code blocks, no near-empty turns, whitespace collapsed, duplicates removed."""
    import chatterbot_corpus
    import yaml
    root = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    seen, out = set(), []
    for f in sorted(glob.glob(os.path.join(root, "*.yml"))):
        with open(f, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        for conv in doc.get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conv]
            for u, r in zip(turns, turns[1:]):
                if "```" in u + r or len(u) < 2 or len(r) < 2 or (u, r) in seen:
                    continue
                seen.add((u, r))
                out.append((u, r))
    return out


def build_default_pairs(path: str, seed: int) -> None:
    """Offline HH-format preference pairs from real replies: for every dialogue turn,
    four pairs (its real reply vs another real reply of the corpus); the gold judge picks
    'chosen'. Pairs the judge scores within 0.05 are dropped as ties."""
    rng = random.Random(seed)
    dialogues = chatterbot_dialogues()
    replies = [r for _, r in dialogues]
    lines = []
    for u, r in dialogues:
        for _ in range(4):
            other = rng.choice(replies)
            ga, gb = gold_score(r), gold_score(other)
            if abs(ga - gb) < 0.05:
                continue
            c, j = (r, other) if ga > gb else (other, r)
            lines.append(json.dumps({"chosen": to_hh([("Human", u)], c), "rejected": to_hh([("Human", u)], j)}))
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- tokenizer
def prompt_text(prompt: list[tuple[str, str]]) -> str:
    return " ".join(("[H] " if r == "Human" else "[A] ") + t for r, t in prompt) + " [A]"


def train_tokenizer(texts: list[str], vocab: int, path: str):
    """Byte-level BPE trained offline; specials [PAD]=0, [H]=1, [A]=2. Cached as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if os.path.exists(path):
        tok = Tokenizer.from_file(path)
        if tok.get_vocab_size() != vocab:
            raise ValueError(f"{path} has vocabulary {tok.get_vocab_size()}, --vocab is {vocab}; use another --out")
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    # pad the vocabulary to exactly `vocab` ids (a small corpus may yield fewer merges)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"[UNUSED{i}]" for i in range(missing)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD, HUMAN, ASSISTANT]
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def encode_prompts(tok, prompts: list[list[tuple[str, str]]], prompt_len: int,
                   lines: list[int] | None = None, source: str = "", long: str = "error"
                   ) -> tuple[torch.Tensor, list[int]]:
    """Left-pad each prompt (ending in [A]) to prompt_len. Returns ids [N, prompt_len] and
    the indices kept. A prompt longer than the block raises (or is skipped with long='skip')."""
    out, kept = [], []
    for i, p in enumerate(prompts):
        ids = tok.encode(prompt_text(p)).ids
        if len(ids) > prompt_len:
            if long == "skip":
                continue
            where = f"{source}:{lines[i]}" if lines else f"prompt {i}"
            raise ValueError(f"{where}: prompt is {len(ids)} tokens, longer than the prompt block "
                             f"(--prompt-len {prompt_len}); raise --prompt-len or pass --long-prompts skip")
        out.append([PAD] * (prompt_len - len(ids)) + ids)
        kept.append(i)
    return torch.tensor(out, dtype=torch.long).reshape(-1, prompt_len), kept


def encode_responses(tok, responses: list[str], response_len: int) -> torch.Tensor:
    """Right-pad (or cut) each response to response_len tokens."""
    rows = []
    for r in responses:
        ids = [i for i in tok.encode(r).ids if i > ASSISTANT][:response_len]  # no specials inside
        rows.append(ids + [PAD] * (response_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, response_len)


def decode(tok, ids: torch.Tensor) -> list[str]:
    """Token ids -> text, dropping [PAD]/[H]/[A] (the model may put pads anywhere) and any
    control character a byte-level token can decode to (keeps logs and files printable)."""
    texts = (tok.decode([i for i in row.tolist() if i > ASSISTANT]) for row in ids)
    return [" ".join("".join(c if c.isprintable() else " " for c in t).split()) for t in texts]


@dataclass
class TextData:
    tok: object
    train_prompts: torch.Tensor      # [Np, Lp] unique prompts, training split (SEPO's prompt pool)
    test_prompts: torch.Tensor       # [Nq, Lp] unique prompts, held out (evaluation only)
    test_replies: list[str]          # the chosen reply of one pair per held-out prompt (reference row)
    lm_train: torch.Tensor           # [N, Lp + Lr] (prompt | response) for pre-training
    rm_train: tuple[torch.Tensor, torch.Tensor]  # (chosen, rejected) [N, L] the RM's half
    rm_test: tuple[torch.Tensor, torch.Tensor]   # the other half (+ held-out prompts' pairs)
    info: dict = field(default_factory=dict)


def prepare_data(args: argparse.Namespace) -> TextData:
    """Load (or build) the pairs, split by prompt, train the tokenizer, encode."""
    os.makedirs(args.out, exist_ok=True)
    src = args.data
    if src is None:
        src = os.path.join(args.out, "pairs_chatterbot.jsonl.gz")
        if not os.path.exists(src):
            build_default_pairs(src, args.seed)
    pairs = load_hh(src)
    if args.max_pairs and len(pairs) > args.max_pairs:
        pairs = random.Random(args.seed).sample(pairs, args.max_pairs)
    # split by prompt so held-out prompts are never seen in pre-training, RM or SEPO
    keys = sorted({prompt_text(p.prompt) for p in pairs})
    random.Random(args.seed).shuffle(keys)
    n_test = max(1, int(0.15 * len(keys)))
    test_keys = set(keys[:n_test])
    train = [p for p in pairs if prompt_text(p.prompt) not in test_keys]
    test = [p for p in pairs if prompt_text(p.prompt) in test_keys]
    texts = [prompt_text(p.prompt) + " " + p.chosen + " " + p.rejected for p in train]
    tok = train_tokenizer(texts, args.vocab, os.path.join(args.out, "tokenizer.json"))

    def encode(ps: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Pair]]:
        # our own corpus simply skips prompts too long for the block; a user file obeys --long-prompts
        x, kept = encode_prompts(tok, [p.prompt for p in ps], args.prompt_len, [p.line for p in ps], src,
                                 args.long_prompts if args.data else "skip")
        ps = [ps[i] for i in kept]
        c = encode_responses(tok, [p.chosen for p in ps], args.response_len)
        r = encode_responses(tok, [p.rejected for p in ps], args.response_len)
        return x, torch.cat([x, c], 1), torch.cat([x, r], 1), ps

    xp, c_tr, r_tr, train = encode(train)
    xq, c_te, r_te, test = encode(test)
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"{src}: too few usable pairs ({len(train)} train, {len(test)} held out)")
    # pre-training data: real dialogues for the default corpus (its pairs contain
    # replies borrowed from other prompts); both sides of each pair for --data.
    if args.data is None:
        dia = [(u, r) for u, r in chatterbot_dialogues() if prompt_text([("Human", u)]) not in test_keys]
        xd, kept = encode_prompts(tok, [[("Human", u)] for u, _ in dia], args.prompt_len, long="skip")
        lm = torch.cat([xd, encode_responses(tok, [dia[i][1] for i in kept], args.response_len)], 1)
    else:
        lm = torch.cat([c_tr, r_tr])
    # the reward model trains on a random half of the training pairs; the other half and
    # all held-out prompts' pairs measure its pairwise accuracy
    perm = torch.randperm(len(c_tr), generator=torch.Generator().manual_seed(args.seed))
    half, rest = perm[: len(perm) // 2], perm[len(perm) // 2:]
    # unique prompts: one row each (the SEPO prompt pool / evaluation prompts)
    _, first = np.unique(xp.numpy(), axis=0, return_index=True)
    _, first_q = np.unique(xq.numpy(), axis=0, return_index=True)
    first_q = np.sort(first_q)
    info = dict(source=src, pairs=len(train) + len(test), train_pairs=len(train), test_pairs=len(test),
                train_prompts=len(first), test_prompts=len(first_q), lm_sequences=len(lm),
                vocab=tok.get_vocab_size())
    return TextData(tok, xp[np.sort(first)], xq[first_q], [test[i].chosen for i in first_q], lm,
                    (c_tr[half], r_tr[half]), (torch.cat([c_tr[rest], c_te]), torch.cat([r_tr[rest], r_te])), info)


# ----------------------------------------------------------------------------- checkpoints
def save_atomic(obj: object, path: str) -> None:
    """torch.save to a temp file, then os.replace: a crash never leaves a torn checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: str, expect: dict) -> dict | None:
    """Load a stage checkpoint if present; refuse one made with different settings."""
    if not os.path.exists(path):
        return None
    ck = torch.load(path, map_location="cpu", weights_only=False)
    diff = {k: (ck["config"].get(k), v) for k, v in expect.items() if ck["config"].get(k) != v}
    if diff:
        raise ValueError(f"{path} was made with other settings {diff} (saved, requested); "
                         f"use another --out or delete it")
    return ck


# ----------------------------------------------------------------------------- score network
class ScoreNet(nn.Module):
    """Bidirectional transformer conditioned on the total noise sigma.

    Uniform graph: outputs log concrete scores log s(x, t)[l, v] (V = n).
    Masked graph: outputs denoiser logits over the n clean tokens (input vocab n + 1).
    sigma enters through a sinusoidal embedding of log sigma added to the residual stream
    before every layer (a cheap stand-in for SEDD's adaLN). The first n_fixed positions hold
    the prompt, which is never noised, so sepo never reads their outputs: they are left at 0
    and the vocabulary head (a third of the FLOPs) runs on the response only."""

    def __init__(self, vocab_in: int, vocab_out: int, length: int, d_model: int, n_layers: int, n_heads: int,
                 n_fixed: int = 0):
        super().__init__()
        self.n_fixed = n_fixed
        self.tok = nn.Embedding(vocab_in, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(64, d_model), nn.SiLU(), nn.Linear(d_model, d_model * n_layers))
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_out)
        nn.init.zeros_(self.head.weight)  # start at s = 1 / uniform logits: a calm first step
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        arg = torch.log(sigma.float().clamp_min(1e-6))[:, None] * 4.0 * freqs
        cond = self.t_mlp(torch.cat([arg.sin(), arg.cos()], -1)).chunk(len(self.layers), -1)
        h = self.tok(x) + self.pos[: x.shape[1]]
        for layer, c in zip(self.layers, cond):
            h = layer(h + c[:, None])
        return F.pad(self.head(self.norm(h[:, self.n_fixed:])), (0, 0, self.n_fixed, 0))


def make_diffusion(args: argparse.Namespace, n: int):
    """graph, noise, network for --graph."""
    import sepo
    L = args.prompt_len + args.response_len
    if args.graph == "uniform":
        graph, noise = sepo.Uniform(n), sepo.Geometric()
        model = ScoreNet(n, n, L, args.d_model, args.n_layers, args.n_heads, args.prompt_len)
    else:
        graph, noise = sepo.Masked(n), sepo.LogLinear()
        model = ScoreNet(n + 1, n, L, args.d_model, args.n_layers, args.n_heads, args.prompt_len)
    return graph, noise, model.to(args.device)


def lm_config(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("graph", "seed", "data", "max_pairs", "vocab", "prompt_len",
                                          "response_len", "d_model", "n_layers", "n_heads",
                                          "pretrain_steps", "pretrain_batch", "pretrain_lr")}


def pretrain(args: argparse.Namespace, data: TextData):
    """Stage 3: pre-train the diffusion LM with sepo.pretrain_loss (prompt block not noised)."""
    import sepo
    torch.manual_seed(args.seed)
    graph, noise, model = make_diffusion(args, data.tok.get_vocab_size())
    path, cfg = os.path.join(args.out, "pretrain.pt"), lm_config(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    total = args.pretrain_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step, hist = 0, []
    ck = load_ckpt(path, cfg)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, hist = ck["step"], ck["hist"]
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(ck["cuda_rng"])
        if step >= total:
            print(f"[pretrain] cached: {path} ({step} steps, last loss {hist[-1]:.3f})")
            return graph, noise, model.eval()
        print(f"[pretrain] resuming at step {step}/{total}")
    X = data.lm_train.to(args.device)
    model.train()
    t0, run = time.time(), []
    while step < total:
        idx = torch.randint(len(X), (args.pretrain_batch,), device=args.device)
        loss = sepo.pretrain_loss(model, graph, noise, X[idx], prefix_len=args.prompt_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        run.append(loss.item())
        if step % 50 == 0 or step == total:
            hist.append(float(np.mean(run)))
            run = []
            print(f"[pretrain] step {step}/{total} loss {hist[-1]:.3f} nats/token "
                  f"lr {sched.get_last_lr()[0]:.1e} {time.time() - t0:.0f}s", flush=True)
        if step % 200 == 0 or step == total:
            save_atomic(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                             step=step, hist=hist, rng=torch.get_rng_state(), config=cfg,
                             cuda_rng=torch.cuda.get_rng_state() if X.is_cuda else None), path)
    return graph, noise, model.eval()


@torch.no_grad()
def generate(args: argparse.Namespace, model: nn.Module, graph, noise, prompts: torch.Tensor, seed: int) -> torch.Tensor:
    import sepo
    g = torch.Generator(device=args.device).manual_seed(seed)
    L = args.prompt_len + args.response_len
    out = [sepo.sample(model, graph, noise, len(p), L, steps=args.steps, prefix=p.to(args.device), generator=g)
           for p in prompts.split(64)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- reward model
class RewardModel(nn.Module):
    """GPT-2 architecture from a config (random init, no hub) + scalar head.

    Reads (prompt | response) with the pads squeezed out (GPT-2 has absolute positions,
    so the text starts at position 0) and scores the hidden state of the last real token.
    R(x) = sigmoid(score) in (0, 1)."""

    def __init__(self, vocab: int, n_positions: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        from transformers import GPT2Config, GPT2Model
        cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=PAD, eos_token_id=PAD)
        self.gpt = GPT2Model(cfg)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = x != PAD
        order = torch.sort((~real).int(), dim=1, stable=True).indices  # real tokens first, in order
        ids, mask = x.gather(1, order), real.gather(1, order)
        h = self.gpt(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        last = (mask.sum(1) - 1).clamp_min(0)
        return self.head(h[torch.arange(len(x), device=x.device), last]).squeeze(-1)

    @torch.no_grad()
    def reward(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat([torch.sigmoid(self(x[i:i + batch])) for i in range(0, len(x), batch)])


def bt_loss(rm: RewardModel, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(score(chosen) - score(rejected))."""
    return -F.logsigmoid(rm(chosen) - rm(rejected)).mean()


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    rm.eval()
    acc = float((rm.reward(chosen) > rm.reward(rejected)).float().mean())
    return acc


@torch.no_grad()
def policy_pairs(args: argparse.Namespace, data: TextData, graph, noise, pre: nn.Module,
                 prompts: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) [N, L]: --policy-pairs pairs of pre-trained LM responses per prompt,
    ordered by the gold judge (the stand-in labeller), near-ties (< 0.05) dropped.

    This is how RLHF collects preferences (HH-RLHF labels model samples): it puts the reward
    model's data on the distribution SEPO starts from. Trained on real replies only, the reward
    model scores model samples by features the judge ignores, and SEPO climbs those."""
    many = prompts.repeat_interleave(2 * args.policy_pairs, 0)
    x = generate(args, pre, graph, noise, many, seed).cpu()
    g = torch.tensor([gold_score(t) for t in decode(data.tok, x[:, args.prompt_len:])]).view(-1, 2)
    a, b = x[0::2], x[1::2]
    first = (g[:, 0] > g[:, 1])[:, None]
    keep = (g[:, 0] - g[:, 1]).abs() >= 0.05
    return torch.where(first, a, b)[keep], torch.where(first, b, a)[keep]


def rm_config(args: argparse.Namespace) -> dict:
    # the policy pairs are samples of the pre-trained LM, so the LM's settings count too
    return dict(lm_config(args), **{k: getattr(args, k) for k in (
        "rm_d_model", "rm_layers", "rm_heads", "rm_epochs", "rm_batch", "rm_lr", "policy_pairs", "steps")})


def train_reward_model(args: argparse.Namespace, data: TextData, graph=None, noise=None, pre: nn.Module | None = None,
                       verbose: bool = True) -> RewardModel:
    """Stage 4: Bradley-Terry on the RM's half of the data pairs plus, with --policy-pairs,
    gold-labelled pairs of pre-trained LM responses to the training prompts."""
    L = args.prompt_len + args.response_len
    path = os.path.join(args.out, "reward_model.pt")
    cfg = rm_config(args)
    ck = load_ckpt(path, cfg)
    torch.manual_seed(args.seed + 1)  # same RM whether or not the LM stage was cached
    rm = RewardModel(data.tok.get_vocab_size(), L, args.rm_d_model, args.rm_layers, args.rm_heads).to(args.device)
    if ck is not None:
        rm.load_state_dict(ck["model"])
        data.info.update(ck["info"])
        print(f"[reward] cached: {path} (held-out pairwise accuracy {ck['info']['rm_accuracy']:.3f})")
        return rm.eval()
    (c, r), tests, n_policy = data.rm_train, {"data": data.rm_test}, 0
    if args.policy_pairs > 0:
        t0 = time.time()
        pc, pr = policy_pairs(args, data, graph, noise, pre, data.train_prompts, args.seed + 10)
        tests["samples"] = policy_pairs(args, data, graph, noise, pre, data.test_prompts, args.seed + 20)
        c, r, n_policy = torch.cat([c, pc]), torch.cat([r, pr]), len(pc)
        print(f"[reward] {len(pc)} gold-labelled pairs of pre-trained LM responses "
              f"({len(tests['samples'][0])} more on held-out prompts) {time.time() - t0:.0f}s", flush=True)
    c, r = c.to(args.device), r.to(args.device)
    opt = torch.optim.AdamW(rm.parameters(), lr=args.rm_lr, weight_decay=0.01)
    t0 = time.time()
    for ep in range(args.rm_epochs):
        rm.train()
        perm, losses = torch.randperm(len(c), device=args.device), []
        for i in range(0, len(c), args.rm_batch):
            j = perm[i:i + args.rm_batch]
            loss = bt_loss(rm, c[j], r[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        acc = {k: pairwise_accuracy(rm, *(t.to(args.device) for t in v)) for k, v in tests.items()}
        if verbose:
            print(f"[reward] epoch {ep + 1}/{args.rm_epochs} BT loss {np.mean(losses):.3f} held-out pairwise "
                  f"accuracy {' '.join(f'{k} {v:.3f}' for k, v in acc.items())} {time.time() - t0:.0f}s", flush=True)
    info = {"rm_accuracy": acc["data"], "rm_accuracy_samples": acc.get("samples", float("nan")),
            "policy_pairs": n_policy}
    data.info.update(info)
    save_atomic(dict(model=rm.state_dict(), info=info, config=cfg), path)
    return rm.eval()


# ----------------------------------------------------------------------------- SEPO
def sepo_config(args: argparse.Namespace) -> dict:
    # not `iters`: asking for more iterations resumes the same run; the reward model it climbed counts
    return dict(rm_config(args), steps=args.steps, batch=args.batch, group=args.group,
                lr=args.lr, epochs=args.epochs, kl_coef=args.kl_coef, kl_steps=args.kl_steps,
                snis=args.snis, pl_positions=args.pl_positions, clip_eps=args.clip_eps, t_eval=args.t_eval,
                baseline=args.baseline)


def finetune(args: argparse.Namespace, data: TextData, graph, noise, pre: nn.Module, rm: RewardModel):
    """Stage 5: SEPO with PPO advantages, KL to the pre-trained model, training prompts."""
    import sepo
    L = args.prompt_len + args.response_len
    pool = data.train_prompts.to(args.device)

    def prompt_fn(num: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(pool), (num,), generator=generator, device=generator.device)
        return pool[idx.to(pool.device)]

    cfg = sepo.SEPOConfig(lr=args.lr, batch_size=args.batch, group_size=args.group, epochs=args.epochs,
                          clip_eps=args.clip_eps, kl_coef=args.kl_coef, kl_steps=min(args.kl_steps, args.steps),
                          snis_samples=args.snis, steps=args.steps, advantage="ppo", t_eval=args.t_eval,
                          pl_positions=args.pl_positions,
                          baseline="group" if args.baseline == "prompt" else args.baseline, seed=args.seed)
    policy = copy.deepcopy(pre).requires_grad_(True)  # pre stays frozen: it is the KL reference
    trainer = sepo.SEPO(policy, graph, noise, lambda x: rm.reward(x), L, cfg,
                        ref_model=pre, prompt_fn=prompt_fn)
    path, ccfg = os.path.join(args.out, f"sepo_steps{args.steps}.pt"), sepo_config(args)
    hist: list[dict] = []
    ck = load_ckpt(path, ccfg)
    if ck is not None:
        trainer.load_state_dict(ck["trainer"])
        hist = ck["hist"]
        print(f"[sepo] {'cached' if len(hist) >= args.iters else 'resuming'}: {path} ({len(hist)} iterations)")
    while len(hist) < args.iters:
        s = trainer.step()
        hist.append({k: float(v) for k, v in s.items()})
        print(f"[sepo] iter {len(hist)}/{args.iters} reward {s['reward_mean']:.3f}±{s['reward_std']:.3f} "
              f"KL {s['kl']:.4f} clip {s['clip_frac']:.2f} ratio max {s['ratio_max']:.2f} "
              f"{s['time']:.1f}s", flush=True)
        if len(hist) % 5 == 0 or len(hist) == args.iters:
            save_atomic(dict(trainer=trainer.state_dict(), hist=hist, config=ccfg), path)
    return trainer.model.eval(), hist


# ----------------------------------------------------------------------------- evaluation
def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over the whole set (low = repetitive)."""
    grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def evaluate(args: argparse.Namespace, data: TextData, graph, noise, pre: nn.Module, ft: nn.Module,
             rm: RewardModel) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """Held-out prompts: --eval-samples responses each from the pre-trained and the fine-tuned
    model (same seeds), and a second pre-trained draw as the 50% reference of the win rate."""
    import sepo
    prompts = data.test_prompts[: args.eval_prompts]
    many = prompts.repeat_interleave(args.eval_samples, 0)
    P = args.prompt_len
    x_pre = generate(args, pre, graph, noise, many, args.seed + 100)
    x_pre2 = generate(args, pre, graph, noise, many, args.seed + 200)
    x_ft = generate(args, ft, graph, noise, many, args.seed + 100)
    x_real = torch.cat([prompts, encode_responses(data.tok, data.test_replies[: len(prompts)], args.response_len)], 1)
    pre_text = decode(data.tok, x_pre[:, P:])
    rows = []
    for name, x in [("pre-trained", x_pre2), (f"SEPO ({args.steps} steps)", x_ft), ("chosen replies (data)", x_real)]:
        x = x.to(args.device)
        text = decode(data.tok, x[:, P:])
        g = torch.Generator(device=args.device).manual_seed(args.seed + 300)
        ll = torch.cat([sepo.elbo(pre, graph, noise, xb, num_t=args.elbo_t, prefix_len=P, generator=g)
                        for xb in x.split(64)])
        nll = float(-ll.mean()) / args.response_len
        versus = pre_text if len(text) == len(pre_text) else pre_text[:: args.eval_samples]
        rows.append({"model": name, "rm_score": float(rm.reward(x).mean()),
                     "gold_mean": float(np.mean([gold_score(t) for t in text])),
                     "gold_win_vs_pre": gold_win_rate(text, versus),
                     "nll_per_token_pre": nll, "ppl_pre": math.exp(min(nll, 50.0)),
                     "distinct_1": distinct_n(text, 1), "distinct_2": distinct_n(text, 2), "n": len(text)})
    ft_text = decode(data.tok, x_ft[:: args.eval_samples, P:])
    pre_text = pre_text[:: args.eval_samples]
    prompts_text = [data.tok.decode([i for i in row.tolist() if i != PAD], skip_special_tokens=False)
                    for row in prompts]
    examples = list(zip(prompts_text, pre_text, ft_text))
    return rows, examples


def format_table(rows: list[dict], info: dict) -> str:
    head = "| model | n | RM score R(x) | gold mean | gold win rate vs pre-trained | NLL/token under pre-trained (ELBO) | perplexity | distinct-1 | distinct-2 |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['rm_score']:.3f} | {r['gold_mean']:.3f} | {r['gold_win_vs_pre']:.3f} "
                     f"| {r['nll_per_token_pre']:.3f} | {r['ppl_pre']:.1f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} |")
    lines.append("")
    lines.append(f"reward model held-out pairwise accuracy: {info.get('rm_accuracy', float('nan')):.3f} on data pairs, "
                 f"{info.get('rm_accuracy_samples', float('nan')):.3f} on pairs of pre-trained LM samples; "
                 f"data: {info.get('pairs')} pairs ({info.get('train_prompts')} training prompts, "
                 f"{info.get('test_prompts')} held-out prompts), vocabulary {info.get('vocab')}")
    return "\n".join(lines)


def plot_curves(hist: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    it = [h["iteration"] if "iteration" in h else i + 1 for i, h in enumerate(hist)]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    for a, key, title in zip(ax, ["reward_mean", "kl", "clip_frac"], ["mean reward R(x) (rollouts)",
                                                                     "path KL to pre-trained (last k steps)", "clip fraction"]):
        y = np.array([h[key] for h in hist])
        a.plot(it, y, alpha=0.4, label="per iteration")
        w = min(5, len(y))  # running mean: one iteration sees only batch x group rollouts
        a.plot(it[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
        a.set_title(title)
        a.legend(fontsize=7)
        a.set_xlabel("SEPO iteration")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    stamps = {}

    data = prepare_data(args)
    print(f"[data] {json.dumps(data.info)}")
    stamps["data"] = time.time() - t_start

    graph, noise, pre = pretrain(args, data)
    for p in pre.parameters():
        p.requires_grad_(False)
    stamps["pretrain"] = time.time() - t_start

    rm = train_reward_model(args, data, graph, noise, pre)
    for p in rm.parameters():
        p.requires_grad_(False)
    stamps["reward"] = time.time() - t_start

    ft, hist = finetune(args, data, graph, noise, pre, rm)
    stamps["sepo"] = time.time() - t_start
    plot_curves(hist, os.path.join(args.out, f"curves_steps{args.steps}.png"))

    rows, examples = evaluate(args, data, graph, noise, pre, ft, rm)
    stamps["eval"] = time.time() - t_start
    table = format_table(rows, data.info)
    ex = "\n\n".join(f"PROMPT:      {p}\npre-trained: {a}\nSEPO:        {b}" for p, a, b in examples[: args.examples])
    print("\n" + table + "\n\n" + ex)
    result = dict(rows=rows, info=data.info, stage_times_s=stamps, config=vars(args),
                  examples=[dict(prompt=p, pretrained=a, sepo=b) for p, a, b in examples])
    if str(args.device).startswith("cuda"):
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"[done] peak GPU memory {result['peak_gpu_memory_gb']:.1f} GB")
    tag = f"steps{args.steps}"
    for name, text in [(f"results_{tag}.md", table + "\n"), (f"examples_{tag}.txt", ex + "\n"),
                       (f"results_{tag}.json", json.dumps(result, indent=1))]:
        with open(os.path.join(args.out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    print(f"\n[done] {time.time() - t_start:.0f}s total; stage end times {json.dumps({k: round(v) for k, v in stamps.items()})}; "
          f"outputs in {args.out}/")
    return result


if __name__ == "__main__":
    main()
