"""The networks of train_text.py.

The default text run's own small bidirectional transformer (`ScoreNet`, built by `make_diffusion`), trained
from scratch by `python train_text.py`. It stays the default run's model: every published number of the
default run was made with it, so it is not replaced by SEDD's class (models/sedd.py).

The paper's path (`train_text.py --sedd`) reads GPT-2 ids laid out as data/text.py's gpt2_pairs lays them
out: a prompt block left-padded with EOT, then a response block whose first EOT ends the text. Here:
  load_policy   SEDD (Lou, Meng & Ermon 2024) from a hub-layout folder or hub id (models/sedd.py: load_sedd),
                or random weights of SEDD small's or medium's configuration ('random:small', for --bench);
  end_at_eot    a sample as the readers of "<|endoftext|>" read it: everything after the response's first
                EOT made EOT (a sample may write text after its end; no reward model or judge reads it);
  TextReward    any reward-model format (models/gpt2.py: load_reward_model) as SEPO's reward, sigmoid(score);
  fingerprint   a hash of a network's weights, which keys the cached stages on the weights, not on a name;
  load_networks every network a --sedd run names, loaded (so checked) before any work (to_device: the
                judge and the perplexity LM, moved to the GPU for the evaluation only);
  bench_networks what --bench times, in either run: untrained networks of the default run's sizes, or the
                SEDD given with --reward-model (or an untrained reward model of ours).
"""
from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sepo
from data.text import EOT, GPT2_VOCAB
from models.gpt2 import RewardModel, load_causal_lm, load_reward_model
from models.sedd import SEDD, bf16_copy, load_sedd


# ---------------------------------------------------------------------------- the default run's LM
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
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                                               activation="gelu", batch_first=True,
                                                               norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_out)
        nn.init.zeros_(self.head.weight)  # s = 1 / uniform logits: a calm first step
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32, device=x.device) / 32)
        arg_ = torch.log(sigma.float().clamp_min(1e-6))[:, None] * 4.0 * freqs
        cond = self.t_mlp(torch.cat([arg_.sin(), arg_.cos()], -1)).chunk(len(self.layers), -1)
        h = self.tok(x) + self.pos[: x.shape[1]]
        for layer, c in zip(self.layers, cond):
            h = layer(h + c[:, None])
        return F.pad(self.head(self.norm(h[:, self.n_fixed:])), (0, 0, self.n_fixed, 0))


def make_diffusion(cfg, n: int, device) -> tuple[sepo.Graph, object, ScoreNet]:
    """graph, noise schedule and network for cfg.graph: masked = sepo.Masked + LogLinear (MDLM), uniform =
    sepo.Uniform + Geometric (SEDD's uniform graph); cfg gives prompt_len, response_len, d_model, n_layers,
    n_heads."""
    if cfg.graph == "uniform":
        graph, noise = sepo.Uniform(n), sepo.Geometric()
    else:
        graph, noise = sepo.Masked(n), sepo.LogLinear()
    model = ScoreNet(graph.vocab_size, n, cfg.prompt_len + cfg.response_len, cfg.d_model, cfg.n_layers,
                     cfg.n_heads, cfg.prompt_len)
    return graph, noise, model.to(device)


# ---------------------------------------------------------------------------- the SEDD path
# SEDD's published configurations (Score-Entropy-Discrete-Diffusion, configs/model/{small,medium}.yaml)
SEDD_CONFIGS = {name: {"tokens": GPT2_VOCAB, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
                       "model": {"type": "ddit", "hidden_size": h, "n_heads": heads, "n_blocks": blocks,
                                 "cond_dim": 128, "dropout": 0.1, "scale_by_sigma": True}}
                for name, h, heads, blocks in (("small", 768, 12, 12), ("medium", 1024, 16, 24))}


def sedd_diffusion() -> tuple[sepo.Masked, sepo.LogLinear]:
    """SEDD's absorbing graph over GPT-2's 50257 tokens (MASK = 50257) and log-linear schedule (eps 1e-3)."""
    return sepo.Masked(GPT2_VOCAB), sepo.LogLinear(1e-3)


def load_policy(name: str, device, prompt_len: int, checkpoint: bool = False) -> SEDD:
    """SEDD from a hub-layout folder, a SEDD run or a hub id (load_sedd: strict, eval mode, no dropout), or
    'random:small' / 'random:medium': seeded random weights of that configuration (to time an iteration
    without the files). fp32; the head runs on the response block only (head_from = prompt_len); checkpoint:
    activation checkpointing of every block."""
    if name.startswith("random:"):
        size = name.removeprefix("random:")
        if size not in SEDD_CONFIGS:
            raise ValueError(f"--sedd {name}: random weights of {sorted(SEDD_CONFIGS)} only (random:medium)")
        with torch.random.fork_rng(devices=[]):  # seeded: the same weights in every run and process
            torch.manual_seed(0)
            model = SEDD.from_config(SEDD_CONFIGS[size], dropout=0.0, head_from=prompt_len,
                                     checkpoint=checkpoint)
            for p in model.parameters():
                if p.dim() > 1:  # not SEDD's zero init of head and adaLN: outputs that depend on the input
                    nn.init.normal_(p, std=0.02)
        return model.to(device).eval()
    model = load_sedd(name, device, head_from=prompt_len, checkpoint=checkpoint)
    if model.tokens != GPT2_VOCAB or model.mask_id != GPT2_VOCAB:
        raise ValueError(f"--sedd {name}: a SEDD over {model.tokens} tokens with mask id {model.mask_id}; "
                         f"the text path needs GPT-2's {GPT2_VOCAB} tokens and the absorbing graph")
    return model


def end_at_eot(x: Tensor, prompt_len: int) -> Tensor:
    """x [N, P + R] with every response token from the response's first EOT on replaced by EOT: the text as
    every reader of "<|endoftext|>" reads it (data/text.py: gpt2_text_ids). A copy; x is not changed."""
    resp = x[:, prompt_len:]
    after = (resp == EOT).int().cumsum(1) > 0
    return torch.cat([x[:, :prompt_len], resp.masked_fill(after, EOT)], 1)


class TextReward(nn.Module):
    """A reward model of any format (models/gpt2.py) on GPT-2 ids [N, P + R], each sample read up to its
    response's first EOT (end_at_eot). score(x): the model's own scalar; reward(x) = sigmoid(score(x)), in
    (0, 1) whatever the format's scale, so one --kl-coef means the same for every reward model (our own
    RewardModel's R, as in the default run)."""

    def __init__(self, model: nn.Module, prompt_len: int, batch_size: int = 256):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.prompt_len = prompt_len
        self.batch_size = batch_size
        self.format = getattr(model, "format", "sepo")

    @torch.no_grad()
    def score(self, x: Tensor) -> Tensor:
        """In the model's own precision whatever the caller's autocast (train_text.py evaluates under bf16
        autocast with --amp bf16; a judge, as SEDD's, scores in full precision)."""
        device, back = next(self.model.parameters()).device, x.device
        x = end_at_eot(x, self.prompt_len).to(device)
        with torch.autocast(device.type, enabled=False):
            parts = [self.model(x[i:i + self.batch_size]).float() for i in range(0, len(x), self.batch_size)]
        return torch.cat(parts).to(back)

    def reward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.score(x))


def fingerprint(model: nn.Module) -> str:
    """The first 16 hex digits of the sha256 of a network's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_networks(cfg, device, amp: str, evaluation: bool = True) -> dict:
    """The networks of a --sedd run (cfg: train_text.Config), each loaded and checked before any work:
    policy  the SEDD to fine-tune, fp32, head on the response block, cfg.checkpointing;
    ref     its frozen pre-trained copy, the KL reference and the evaluation's pre-trained model, stored in
            bf16 under amp 'bf16' (half the memory; its matmuls run in bf16 then anyway, but its embeddings
            and norms are rounded too, so its log-scores differ from the policy's by up to ~0.03 nats);
    reward  cfg.reward_model as a TextReward (None: train_text.py trains ours), on the device;
    judge   cfg.judge likewise (None: the gold judge) and lm, the causal LM of the generative perplexity
            (cfg.ppl_model; None: none), both on the CPU until the evaluation (to_device);
    sedd_sha256, reward_sha256, judge_sha256: their weights' fingerprints (None where absent).
    evaluation=False leaves out the judge and the perplexity LM (--bench)."""
    merges = {"": None, "0": 0, "1": 1, "2": 2}
    policy = load_policy(cfg.sedd, device, cfg.prompt_len, cfg.checkpointing)
    ref = bf16_copy(policy) if amp == "bf16" else copy.deepcopy(policy)  # the file is read once
    out = {"policy": policy, "ref": ref.requires_grad_(False), "sedd_sha256": fingerprint(policy)}
    judge = cfg.judge if evaluation else ""
    for name, path, lora, heads in (("reward", cfg.reward_model, cfg.lora_merges, cfg.reward_heads),
                                    ("judge", judge, cfg.judge_lora_merges, cfg.judge_heads)):
        net = load_reward_model(path, lora_merges=merges[lora], n_heads=heads or None) if path else None
        net = None if net is None else net.to(device if name == "reward" else "cpu")
        if getattr(net, "format", "") == "sepo" and net.gpt.wte.num_embeddings != GPT2_VOCAB:
            vocab = net.gpt.wte.num_embeddings
            raise ValueError(f"{path}: our reward model over {vocab} ids of train_text.py's BPE, not over "
                             f"GPT-2's {GPT2_VOCAB}: train one with --sedd")
        length = cfg.prompt_len + cfg.response_len
        positions = net.gpt.wpe.num_embeddings if getattr(net, "format", "") == "sepo" else length
        if positions < length:
            raise ValueError(f"{path}: our reward model has {positions} positions, fewer than --prompt-len + "
                             f"--response-len = {length}: train one with these lengths")
        out[name] = None if net is None else TextReward(net, cfg.prompt_len)
        out[f"{name}_sha256"] = None if net is None else fingerprint(net)
    if judge and out["judge_sha256"] == out["reward_sha256"]:
        raise ValueError(f"--judge {cfg.judge} holds the weights of the training reward model: a judge must "
                         "be another model")
    out["lm"] = load_causal_lm(cfg.ppl_model) if cfg.ppl_model and evaluation else None
    return out


def to_device(nets: dict, device) -> tuple:
    """(judge, lm) of load_networks on the device: they wait on the CPU until the evaluation, out of the way
    of SEPO's memory (gpt2-large alone holds 3.1 GB in fp32)."""
    judge, lm = nets.get("judge"), nets.get("lm")
    if lm is not None:
        lm.model.to(device)
    return None if judge is None else judge.to(device), lm


def bench_networks(cfg, device, amp: str) -> tuple:
    """(graph, noise, policy, KL reference, reward model) of which --bench times one SEPO iteration (cfg:
    train_text.Config): untrained networks of the default run's sizes (the reference: sepo's frozen copy),
    or with --sedd load_networks's SEDD and --reward-model, else an untrained reward model of ours."""
    length = cfg.prompt_len + cfg.response_len
    if not cfg.sedd:
        graph, noise, model = make_diffusion(cfg, cfg.vocab, device)
        rm = RewardModel(cfg.vocab, length, cfg.rm_d_model, cfg.rm_layers, cfg.rm_heads).to(device)
        return graph, noise, model, None, rm
    graph, noise = sedd_diffusion()
    nets = load_networks(cfg, device, amp, evaluation=False)
    if nets["reward"] is None:
        ours = RewardModel(GPT2_VOCAB, length, cfg.rm_d_model, cfg.rm_layers, cfg.rm_heads, EOT)
        nets["reward"] = TextReward(ours, cfg.prompt_len).to(device)
    return graph, noise, nets["policy"], nets["ref"], nets["reward"]
