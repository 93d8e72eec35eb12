"""SEDD's score network (the DDiT transformer) and a strict loader for its published checkpoints.

SEDD: Lou, Meng & Ermon, "Discrete Diffusion Modeling by Estimating the Ratios of the Data Distribution",
ICML 2024; code louaaron/Score-Entropy-Discrete-Diffusion (model/transformer.py, model/rotary.py), weights
louaaron/sedd-small and louaaron/sedd-medium on the Hugging Face hub. Plain torch: flash-attn's varlen call
becomes torch's scaled_dot_product_attention (same mathematics), and every parameter and buffer keeps its
upstream name, so the published state dicts load strictly.

The network. x [B, L] holds token ids (GPT-2 ids 0..50256 in the published models, MASK = `tokens` = 50257)
and sigma [B] the total noise sigmabar(t) of each row. The output [B, L, V], V = tokens + 1 for the absorbing
graph ('absorb') and tokens for the uniform one, is the log concrete score

    log s_theta(x, sigma)[l, y] ~ log p_sigma(x with x^l := y) / p_sigma(x),

computed in this order (transformer.py, SEDD.forward):
    1. h = embedding[x], the residual stream (fp32); c = SiLU(MLP([cos(sigma f), sin(sigma f)])), the
       condition of every adaLN layer;
    2. n_blocks DiT blocks, each with (shift, scale, gate) x 2 from adaLN(c):
           h = h + gate_msa * Attention(LN(h) * (1 + scale_msa) + shift_msa)   (non-causal, rotary)
           h = h + gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp)
    3. y = Linear(LN(h) * (1 + scale) + shift), (shift, scale) from adaLN(c);
    4. absorb (scale_by_sigma): y = y - log(e^sigma - 1) - log(V - 1), so that zero logits give scores
       that sum to 1 / (e^sigma - 1) over the V - 1 real tokens, as the true scores at a MASK position do;
    5. y[l, x^l] = 0, i.e. s(x)_{l, x^l} = 1.

What SEDD trains. Its loss (score entropy, DWDSE) reads the outputs at MASK positions only, where the true
score is s_y = p_0(x^l = y | x_t) / (e^sigma - 1). The outputs at clean positions are untrained, apart from
the 0 forced at the current token: never read them. sepo's masked-graph estimators never do.

With sepo. `sepo.Masked(tokens)` reads the denoiser p_theta(v | x_t) = softmax(out[l, :tokens]) at a MASK
position l. Step 4's shift is a constant of the row, so it cancels: the denoiser is the softmax of the
head's logits over the real tokens, s_v normalised, and the MASK column (0 there: s(MASK -> MASK) = 1) is
ignored. SEDD's own samplers use the unnormalised sum instead: the analytic step unmasks with probability
min(1, (e^dsigma - 1) sum_y s_y), sepo's MDLM step with (e^dsigma - 1) / (e^sigma - 1) (= dt / t for the
log-linear schedule). Both draw the new token proportionally to s_y, and they are the same step when the
scores are normalised (sum_y s_y = 1 / (e^sigma - 1)); test_sedd.py checks both. A 'uniform' SEDD gives
`sepo.Uniform(tokens)` its log concrete scores directly.

Precision. LayerNorm, rotary, the residual stream and the returned log-scores are fp32. `autocast=True` runs
the matmuls and the attention in bf16 (upstream always autocasts on CUDA and returns bf16 log-scores; ours
stay fp32). Dropout (upstream p = 0.1 in train mode) defaults to 0 here and in `load_sedd`, so that train()
and eval() compute the same function, as a policy-gradient ratio needs.

Memory. The output alone is [B, L, V] fp32: 206 MB per 1024-token sequence at V = 50258. `head_from` skips
the output layer at a fixed prompt, `checkpoint=True` recomputes each block in the backward pass. Attention
goes through SDPA with no mask, so on CUDA it gets the flash or memory-efficient kernel (no L x L scores).

Loading. `load_sedd` reads a hub-layout directory (config.json + model.safetensors or pytorch_model.bin), a
hub id (downloaded only when named), or a SEDD training run (.hydra/config.yaml + checkpoints-meta/
checkpoint.pth, EMA weights by default). It checks every key, shape and dtype against `expected_keys`:
upstream's PyTorchModelHubMixin loads with strict=False and would hide a mismatch. `bf16_copy` gives a loaded
model's frozen bf16 copy (a KL reference), the same tensors as loading the file again with dtype=bfloat16.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

GRAPHS = ("absorb", "uniform")
NOISES = ("loglinear", "geometric")  # upstream noise_lib; the network itself never reads the schedule
FREQ_DIM = 256  # size of the sinusoidal sigma embedding (TimestepEmbedder's frequency_embedding_size)
MLP_RATIO = 4
ROTARY_BASE = 10_000
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the hub layout, in order of preference


def _no_autocast(x: Tensor) -> torch.autocast:
    """Turn off any autocast region around a computation that must stay fp32."""
    return torch.autocast(x.device.type, enabled=False)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift (DiT; upstream modulate_fused)."""
    return x * (1 + scale) + shift


# === Layers ======================================================================================


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalising in fp32 whatever the autocast (eps = 1e-5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with _no_autocast(x):
            x = F.layer_norm(x.float(), (x.shape[-1],))
        return x * self.weight


class EmbeddingLayer(nn.Module):
    """Token embedding as a raw [V, H] parameter named `embedding` (upstream's name), indexed directly."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding[x]


class TimestepEmbedder(nn.Module):
    """sigma -> MLP([cos(sigma f_k), sin(sigma f_k)]), f_k = 10000^(-k / 128), k < 128, cos first
    (DiT's timestep embedding, fed with the total noise sigma instead of t)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def sinusoid(sigma: Tensor) -> Tensor:
        """[B] -> [B, 256], in fp32."""
        half = FREQ_DIM // 2
        k = torch.arange(half, device=sigma.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10_000) * k / half)
        args = sigma.float()[:, None] * freqs
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def forward(self, sigma: Tensor) -> Tensor:
        emb = self.sinusoid(sigma).to(self.mlp[0].weight.dtype)  # bf16 weights (load_sedd(dtype=bf16))
        return self.mlp(emb).float()


class Rotary(nn.Module):
    """Rotary position embedding tables (Su et al. 2021) in the rotate-half (GPT-NeoX) layout: channel j and
    j + d/2 of a head of size d form the pair rotated by the angle position * inv_freq[j]."""

    def __init__(self, head_dim: int, base: int = ROTARY_BASE):
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(head_dim, base))  # persistent: in the state dict

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin), each [L, 1, d] fp32, to broadcast over [B, L, heads, d]."""
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float())
        emb = torch.cat([freqs, freqs], -1)[:, None, :]
        return emb.cos(), emb.sin()


def rotary_inv_freq(head_dim: int, base: int = ROTARY_BASE) -> Tensor:
    """1 / base^(2j / head_dim), j < head_dim / 2: the rotation frequencies (the `inv_freq` buffer)."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the two halves of the last dim."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, computed in fp32 and returned in x's dtype."""
    with _no_autocast(x):
        x32 = x.float()
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class DDiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero conditioning (DiT, Peebles & Xie 2023): non-causal rotary
    self-attention and a tanh-GELU MLP, each modulated by (shift, scale) and gated by a gate from adaLN(c)."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(MLP_RATIO * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.adaLN_modulation.bias)

    def attention(self, h: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """attn_out(softmax(q k^T / sqrt(d)) v) over all L positions, q and k rotated; [B, L, H] -> [B, L, H].
        The qkv projection's output is laid out q | k | v, each head-major."""
        B, L, H = h.shape
        q, k, v = self.attn_qkv(h).view(B, L, 3, self.n_heads, H // self.n_heads).unbind(2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.attn_out(a.transpose(1, 2).reshape(B, L, H))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # 6 x [B, 1, H], in this order:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        a = self.attention(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_msa * F.dropout(a, self.dropout, self.training)
        m = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(m, self.dropout, self.training)


class DDitFinalLayer(nn.Module):
    """y = linear(LN(h) * (1 + scale) + shift), (shift, scale) = adaLN(c) (shift first); zero-initialised."""

    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# === The network =================================================================================


class SEDD(nn.Module):
    """SEDD's DDiT score network: model(x [B, L], sigma [B]) -> log s_theta(x, sigma) [B, L, V] (module doc).

    tokens: real tokens (50257 for GPT-2); graph 'absorb' adds MASK = id tokens, so V = tokens + 1, and
    'uniform' has V = tokens. scale_by_sigma (step 4; None: on for absorb, as in both published models) is
    only defined for absorb. dropout: residual-branch dropout in train mode (upstream 0.1; 0 here, see the
    module doc). head_from: the output layer runs on positions >= head_from only and the first head_from
    rows of the output are 0 (a fixed prompt that sepo never reads). autocast: bf16 matmuls and attention.
    checkpoint: recompute each block in the backward pass (activation checkpointing) when grads are on.
    """

    def __init__(self, tokens: int, hidden_size: int, n_heads: int, n_blocks: int, cond_dim: int,
                 graph: str = "absorb", scale_by_sigma: Optional[bool] = None, dropout: float = 0.0,
                 head_from: int = 0, autocast: bool = False, checkpoint: bool = False):
        super().__init__()
        scale_by_sigma = graph == "absorb" if scale_by_sigma is None else scale_by_sigma
        _check_arch(tokens, hidden_size, n_heads, n_blocks, cond_dim, graph, scale_by_sigma, dropout,
                    "SEDD()")
        self.tokens = tokens
        self.vocab_size = tokens + (graph == "absorb")
        self.mask_id = tokens if graph == "absorb" else None
        self.scale_by_sigma = scale_by_sigma
        self.dropout = dropout
        self.head_from = head_from
        self.autocast = autocast
        self.checkpoint = checkpoint
        self.config = {"tokens": tokens, "graph": {"type": graph},
                       "model": {"type": "ddit", "hidden_size": hidden_size, "n_heads": n_heads,
                                 "n_blocks": n_blocks, "cond_dim": cond_dim, "scale_by_sigma": scale_by_sigma,
                                 "dropout": dropout}}
        self.vocab_embed = EmbeddingLayer(hidden_size, self.vocab_size)
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(hidden_size // n_heads)
        self.blocks = nn.ModuleList(DDiTBlock(hidden_size, n_heads, cond_dim, dropout)
                                    for _ in range(n_blocks))
        self.output_layer = DDitFinalLayer(hidden_size, self.vocab_size, cond_dim)

    @classmethod
    def from_config(cls, config: Mapping, **overrides) -> SEDD:
        """Build from upstream's nested config (tokens, graph.type, model.{hidden_size, n_heads, n_blocks,
        cond_dim, scale_by_sigma, dropout}; the hub's config.json). overrides: any constructor argument,
        e.g. dropout=0.0. `model.config` is the config as given; the module's own dropout, which may
        differ from the config's training value, is `model.dropout`."""
        model = cls(**{**architecture(config), **overrides})
        model.config = copy.deepcopy(dict(config))
        return model

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log s_theta(x, sigma) [B, L, V] fp32; x [B, L] ids, sigma [B] the total noise sigmabar(t)."""
        if x.dim() != 2 or x.dtype != torch.long or sigma.shape != x.shape[:1]:
            raise ValueError(f"SEDD needs x LongTensor[B, L] and sigma [B]; got x {tuple(x.shape)} "
                             f"{x.dtype}, sigma {tuple(sigma.shape)}")
        if not self.autocast and self.output_layer.linear.weight.dtype != torch.float32:
            raise ValueError(f"{self.output_layer.linear.weight.dtype} weights need autocast=True "
                             "(the residual stream is fp32)")
        L = x.shape[1]
        start = min(self.head_from, L)
        with _no_autocast(x):
            h = self.vocab_embed(x).float()
            c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(L, x.device)
        bf16 = torch.autocast(x.device.type, dtype=torch.bfloat16)
        with bf16 if self.autocast else contextlib.nullcontext():  # an outer autocast region stays on
            for block in self.blocks:
                if self.checkpoint and torch.is_grad_enabled():
                    h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, c, use_reentrant=False)
                else:
                    h = block(h, cos, sin, c)
            out = self.output_layer(h[:, start:], c).float()
        if self.scale_by_sigma:
            # log(e^sigma - 1) by expm1, exact for small sigma (upstream switches to exp(sigma) - 1 above 0.5)
            log_expm1 = torch.expm1(sigma.float()).log()
            out = out - log_expm1[:, None, None] - math.log(self.vocab_size - 1)
        out = out.scatter(-1, x[:, start:, None], 0.0)  # log s(x)_{l, x^l} = 0
        return F.pad(out, (0, 0, start, 0))


def _check_arch(tokens: int, hidden_size: int, n_heads: int, n_blocks: int, cond_dim: int, graph: str,
                scale_by_sigma: bool, dropout: float, where: str) -> None:
    if graph not in GRAPHS:
        raise ValueError(f"{where}: graph.type '{graph}' is not one of {GRAPHS}")
    if scale_by_sigma and graph != "absorb":
        raise ValueError(f"{where}: model.scale_by_sigma is defined for the absorb graph only (as upstream)")
    if min(tokens, hidden_size, n_heads, n_blocks, cond_dim) < 1 or hidden_size % n_heads:
        raise ValueError(f"{where}: need positive sizes and n_heads dividing hidden_size; got tokens "
                         f"{tokens}, hidden_size {hidden_size}, n_heads {n_heads}, n_blocks {n_blocks}, "
                         f"cond_dim {cond_dim}")
    if (hidden_size // n_heads) % 2:
        raise ValueError(f"{where}: the head size hidden_size / n_heads = {hidden_size // n_heads} must be "
                         "even (rotary pairs)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: model.dropout must be in [0, 1), got {dropout}")


def _get(config: Mapping, key: str, where: str) -> Any:
    """config['a']['b'] for key 'a.b', or an error naming the missing key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"{where}: the config has no '{key}'")
        node = node[part]
    return node


def architecture(config: Mapping, where: str = "config") -> dict:
    """SEDD's constructor arguments from upstream's nested config, checked (unknown graph or noise type,
    model type other than 'ddit', inconsistent sizes): an error names `where` and the key."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{where}: expected upstream's nested config, a mapping; got {type(config).__name__}")
    arch = {"tokens": _get(config, "tokens", where), "graph": _get(config, "graph.type", where)}
    for key in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "scale_by_sigma", "dropout"):
        arch[key] = _get(config, f"model.{key}", where)
    if "noise" in config and _get(config, "noise.type", where) not in NOISES:
        raise ValueError(f"{where}: noise.type '{config['noise']['type']}' is not one of {NOISES}")
    model_type = config["model"].get("type", "ddit")
    if model_type != "ddit":
        raise ValueError(f"{where}: model.type '{model_type}' is not 'ddit' (SEDD's transformer)")
    for key in ("tokens", "hidden_size", "n_heads", "n_blocks", "cond_dim"):
        if not isinstance(arch[key], int) or isinstance(arch[key], bool):
            raise ValueError(f"{where}: '{key}' must be an integer, got {arch[key]!r}")
    if not isinstance(arch["scale_by_sigma"], bool):
        raise ValueError(f"{where}: 'model.scale_by_sigma' must be true or false, got "
                         f"{arch['scale_by_sigma']!r}")
    _check_arch(**arch, where=where)
    return arch


def expected_keys(config: Mapping) -> dict[str, tuple[int, ...]]:
    """The ordered state-dict key -> shape map of SEDD for `config` (upstream's nested config): the names
    and shapes of the published checkpoints. rotary_emb.inv_freq is a buffer, constant given head_dim."""
    a = architecture(config)
    V = a["tokens"] + (a["graph"] == "absorb")
    H, C = a["hidden_size"], a["cond_dim"]
    keys = {"vocab_embed.embedding": (V, H),
            "sigma_map.mlp.0.weight": (C, FREQ_DIM), "sigma_map.mlp.0.bias": (C,),
            "sigma_map.mlp.2.weight": (C, C), "sigma_map.mlp.2.bias": (C,),
            "rotary_emb.inv_freq": (H // a["n_heads"] // 2,)}
    for i in range(a["n_blocks"]):
        p = f"blocks.{i}."
        keys.update({p + "norm1.weight": (H,),
                     p + "attn_qkv.weight": (3 * H, H), p + "attn_out.weight": (H, H),
                     p + "norm2.weight": (H,),
                     p + "mlp.0.weight": (MLP_RATIO * H, H), p + "mlp.0.bias": (MLP_RATIO * H,),
                     p + "mlp.2.weight": (H, MLP_RATIO * H), p + "mlp.2.bias": (H,),
                     p + "adaLN_modulation.weight": (6 * H, C), p + "adaLN_modulation.bias": (6 * H,)})
    keys.update({"output_layer.norm_final.weight": (H,),
                 "output_layer.linear.weight": (V, H), "output_layer.linear.bias": (V,),
                 "output_layer.adaLN_modulation.weight": (2 * H, C),
                 "output_layer.adaLN_modulation.bias": (2 * H,)})
    return keys


# === Loading =====================================================================================

_VOCAB_KEYS = ("vocab_embed.embedding", "output_layer.linear.weight", "output_layer.linear.bias")


def check_state_dict(state: Mapping, config: Mapping, source: str) -> dict[str, Tensor]:
    """The state dict, checked strictly against expected_keys(config): no missing or extra key, every
    shape as expected, every tensor fp32; inv_freq may be absent (it is then filled in) and is checked
    when present. Every problem is listed in one error that names `source` and the keys."""
    want = expected_keys(config)
    a = architecture(config, source)
    V = a["tokens"] + (a["graph"] == "absorb")
    problems = []
    missing = [k for k in want if k not in state and k != "rotary_emb.inv_freq"]
    extra = [k for k in state if k not in want]
    if missing:
        problems.append(f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected keys: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for key, shape in want.items():
        t = state.get(key)
        if t is None:
            continue
        if not isinstance(t, Tensor):
            problems.append(f"'{key}' holds a {type(t).__name__}, not a tensor")
        elif t.dtype != torch.float32:
            problems.append(f"'{key}' is {t.dtype}, expected torch.float32 (the published weights are fp32)")
        elif key in _VOCAB_KEYS and t.shape[0] != V:
            problems.append(f"'{key}' has {t.shape[0]} classes, expected tokens + {V - a['tokens']} = {V} "
                            f"for the '{a['graph']}' graph (shape {tuple(t.shape)})")
        elif tuple(t.shape) != shape:
            problems.append(f"'{key}': expected shape {shape}, found {tuple(t.shape)}")
    inv_freq = rotary_inv_freq(a["hidden_size"] // a["n_heads"])
    t = state.get("rotary_emb.inv_freq")
    if isinstance(t, Tensor) and t.shape == inv_freq.shape and not torch.allclose(t, inv_freq, rtol=1e-6):
        problems.append("'rotary_emb.inv_freq' differs from 1 / 10000^(2j / head_dim)")
    if problems:
        raise ValueError(f"{source}: not a SEDD state dict for this config:\n  " + "\n  ".join(problems))
    return {k: (inv_freq if k == "rotary_emb.inv_freq" else state[k]) for k in want}


def _read_weights(path: Path) -> Mapping:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # a dependency of transformers (requirements.txt)
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only, no code
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), found {type(state).__name__}")
    return state


def _read_config(path: Path) -> dict:
    try:
        if path.suffix == ".json":
            config = json.loads(path.read_text())
        else:
            import yaml  # a training run's .hydra/config.yaml (pyyaml: requirements.txt)
            config = yaml.safe_load(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the config: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping, found {type(config).__name__}")
    return config


def _run_state(path: Path, ema: bool) -> Mapping:
    """A training run's checkpoint {'model', 'ema', 'optimizer', 'step'}: the model's state dict, with its
    parameters replaced by the EMA's shadow_params (upstream load_model_local does the same) if ema."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{path}: expected SEDD's training checkpoint, a dict with a 'model' state dict")
    state = dict(ckpt["model"])
    if not ema:
        return state
    ema_state = ckpt.get("ema")
    shadow = ema_state.get("shadow_params") if isinstance(ema_state, Mapping) else None
    params = [k for k in state if k != "rotary_emb.inv_freq"]  # module.parameters() order, without the buffer
    if not isinstance(shadow, (list, tuple)) or len(shadow) != len(params):
        found = len(shadow) if isinstance(shadow, (list, tuple)) else "none"
        raise ValueError(f"{path}: 'ema.shadow_params' should list {len(params)} tensors, found {found} "
                         "(pass ema=False for the raw weights)")
    for key, t in zip(params, shadow, strict=True):
        if not isinstance(t, Tensor) or t.shape != state[key].shape:
            raise ValueError(f"{path}: 'ema.shadow_params' entry for '{key}' does not match its shape")
    state.update(zip(params, shadow, strict=True))
    return state


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def _download(repo_id: str, cache_dir: Optional[str]) -> Path:
    """config.json and the first weight file of WEIGHT_FILES that the hub (or its cache) has, in the hub
    cache; with HF_HUB_OFFLINE set, the cache only."""
    hint = (f"to use '{repo_id}' offline, download it on a machine with network access: "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, then pass DIR to load_sedd")
    try:
        from huggingface_hub import constants, hf_hub_download  # a dependency of transformers
    except ImportError as err:
        raise ImportError(f"loading a hub id needs huggingface_hub; otherwise {hint}") from err
    # the hub reads HF_HUB_OFFLINE once, at import: read it again in case it was set since
    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    offline = constants.HF_HUB_OFFLINE or env in ("1", "ON", "YES", "TRUE")
    errors, cause = [], None
    # config.json, then the first weight file found; all land in one snapshot folder of the cache
    for name in ("config.json",) + WEIGHT_FILES:
        try:
            file = hf_hub_download(repo_id, name, cache_dir=cache_dir, local_files_only=offline)
        except Exception as err:  # offline, no network, no such repo or file: each its own exception type
            errors.append(f"{name}: {type(err).__name__}")
            cause = err
            if name == "config.json":
                break
        else:
            if name != "config.json":
                return Path(file).parent
    state = "HF_HUB_OFFLINE is set and the files are not in the cache" if offline else "the download failed"
    raise OSError(f"'{repo_id}' is not a local directory, and {state} ({'; '.join(errors)}); "
                  f"{hint}") from cause


def load_sedd(path_or_id: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              dtype: Optional[torch.dtype] = None, dropout: float = 0.0, ema: bool = True,
              cache_dir: Optional[str] = None, **options) -> SEDD:
    """A SEDD network from a checkpoint, checked strictly, in eval mode with `dropout` (0: none).

    path_or_id: a directory in the hub layout (config.json, the full Hydra config; model.safetensors,
        else pytorch_model.bin, read with torch.load(weights_only=True)); a SEDD training run directory
        (.hydra/config.yaml and checkpoints-meta/checkpoint.pth, whose EMA weights are used unless
        ema=False, as upstream's load_model_local does); or a hub id such as 'louaaron/sedd-medium',
        downloaded with huggingface_hub (cache_dir: its cache) only when named and not a local path.
    dtype: the weights' storage dtype, float32 (None) or bfloat16; bfloat16 halves the memory (a frozen
        reference model) and turns autocast on (the residual stream stays fp32).
    options: SEDD's head_from, autocast, checkpoint. The config is `model.config`.
    """
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be None, torch.float32 or torch.bfloat16, got {dtype}")
    path = Path(path_or_id)
    if path.is_dir() and (path / ".hydra" / "config.yaml").is_file():
        config_file = path / ".hydra" / "config.yaml"
        weights = path / "checkpoints-meta" / "checkpoint.pth"
    elif path.is_dir():
        config_file = path / "config.json"
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), path / WEIGHT_FILES[0])
    elif not path.exists() and _looks_like_hub_id(str(path_or_id)):
        return load_sedd(_download(str(path_or_id), cache_dir), device, dtype, dropout, ema, **options)
    else:
        raise FileNotFoundError(f"{path}: neither a directory (config.json with model.safetensors or "
                                "pytorch_model.bin; or a SEDD run) nor a hub id owner/name")
    for f in (config_file, weights):
        if not f.is_file():
            want = " or ".join(WEIGHT_FILES) if f.name in WEIGHT_FILES else f.relative_to(path)
            raise FileNotFoundError(f"{path}: no {want}")
    config = _read_config(config_file)
    arch = architecture(config, str(config_file))
    state = _run_state(weights, ema) if weights.name == "checkpoint.pth" else _read_weights(weights)
    state = check_state_dict(state, config, str(weights))
    if dtype == torch.bfloat16:
        state = {k: v if k == "rotary_emb.inv_freq" else v.to(dtype) for k, v in state.items()}
        options["autocast"] = True
    with torch.device("meta"):  # no initialisation work: every tensor comes from the file
        model = SEDD(**{**arch, "dropout": dropout, **options})
    model.load_state_dict(state, strict=True, assign=True)
    model.config = config
    return model.to(device).eval()


def bf16_copy(model: SEDD) -> SEDD:
    """A frozen copy of `model` stored as load_sedd(dtype=torch.bfloat16) stores the same file: parameters
    rounded to bf16, the rotary frequencies fp32, autocast on, no activation checkpointing, eval mode, no
    gradients. A KL reference without reading the checkpoint a second time; only the bf16 tensors are
    allocated (no fp32 copy first), and `model` is not changed."""
    low = {id(p): nn.Parameter(p.detach().to(torch.bfloat16, copy=True), requires_grad=False)
           for p in model.parameters()}
    ref = copy.deepcopy(model, memo=low)  # deepcopy takes every parameter from the memo: its bf16 copy
    ref.autocast = True
    ref.checkpoint = False
    return ref.eval()
