"""Tests of models/sedd.py: SEDD's network against the upstream network's own outputs (models/golden), its
parts against explicit formulas, the sampler step against SEDD's analytic and Euler steps, and the strict
loader on stand-in checkpoints in the hub layout (written here, full 50258-token vocabulary). CPU, offline.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m pytest -q test_sedd.py
"""
from __future__ import annotations

import ast
import json
import math
import re
import socket
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import sepo
from models.sedd import SEDD, apply_rotary, bf16_copy, expected_keys, load_sedd, modulate, rotary_inv_freq

GOLDEN = Path(__file__).parent / "models" / "golden"
GPT2 = 50257  # GPT-2's real tokens; MASK = 50257 and V = 50258 in the published models


def tiny(tokens: int = 11, std: float = 0.2, seed: int = 0, **kw) -> SEDD:
    """SEDD(tokens, hidden 32, 4 heads, 2 blocks, cond 16) in eval mode, every parameter drawn N(0, std^2)
    (LayerNorm weights N(1, std^2)), the buffer inv_freq left as it is."""
    model = SEDD(tokens, 32, 4, 2, 16, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + float("norm" in name))
    return model.eval()


def masked_input(tokens: int, B: int, L: int, seed: int = 0) -> Tensor:
    """Random real tokens, about half of them MASK (= tokens), at least one of each per row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(tokens, (B, L), generator=g)
    x = x.masked_fill(torch.rand(B, L, generator=g) < 0.5, tokens)
    x[:, 0] = tokens
    x[:, 1] = 0
    return x


# --- the upstream network's own outputs ----------------------------------------------------------------


def test_golden_matches_upstream_network():
    """models/golden/sedd_tiny.pt: upstream SEDD's log-scores for weights set by a recipe (N(0, 0.05^2) from a
    generator seeded with crc32 of the key, in state-dict order; inv_freq left constant), fp32 on CPU."""
    g = torch.load(GOLDEN / "sedd_tiny.pt", weights_only=True)
    model = SEDD.from_config(ast.literal_eval(g["config"])).eval()  # the config is stored as a dict's repr
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key != "rotary_emb.inv_freq":
                gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                t.copy_(torch.randn(t.shape, generator=gen) * g["std"])
        out = model(g["x"], g["sigma"]).double()
    assert out.shape == (2, 32, GPT2 + 1)
    # fp32 rounding gives about 1e-6 here; the blocks' share of the output is about 1e-3 at std 0.05 (a causal
    # mask moves it by 8e-4), so the tolerance is absolute and well below that
    torch.testing.assert_close(out[..., g["columns"]], g["output_columns"], rtol=0, atol=2e-5)
    torch.testing.assert_close(out[..., :GPT2].logsumexp(-1), g["logsumexp_real"], rtol=0, atol=2e-5)


def published_config(size: str) -> dict:
    """Upstream configs/model/{small,medium}.yaml with configs/config.yaml's tokens, graph and noise."""
    hidden, heads, blocks = {"small": (768, 12, 12), "medium": (1024, 16, 24)}[size]
    return {"tokens": GPT2, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
            "model": {"name": size, "type": "ddit", "hidden_size": hidden, "cond_dim": 128, "length": 1024,
                      "n_blocks": blocks, "n_heads": heads, "scale_by_sigma": True, "dropout": 0.1}}


@pytest.mark.parametrize("size", ["small", "medium"])
def test_key_lists_at_published_sizes(size):
    """Built on the meta device, the network has exactly upstream's keys, shapes and dtypes, in order, and
    expected_keys gives the same list; the parameter count is the one measured upstream."""
    text = (GOLDEN / f"sedd_{size}_keys.txt").read_text()
    rows = [line.split("\t") for line in text.splitlines() if not line.startswith("#")]
    want = {k: tuple(json.loads(shape)) for k, shape, _ in rows}
    with torch.device("meta"):
        model = SEDD.from_config(published_config(size))
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert list(got.items()) == list(want.items())
    assert list(expected_keys(published_config(size)).items()) == list(want.items())
    assert {str(t.dtype) for t in model.state_dict().values()} == {f"torch.{d}" for _, _, d in rows}
    n_params = int(re.search(r"(\d+) parameters", text).group(1))
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_fresh_network_outputs_uniform_scores():
    """Zero-initialised head and adaLN: every score is 1 / ((e^sigma - 1) * 50257), so the log-scores are
    exactly -log(e^sigma - 1) - log(50257), with 0 at the current token (MASK included)."""
    torch.manual_seed(0)
    model = SEDD(GPT2, 32, 4, 2, 16).eval()
    sigma = torch.tensor([1e-6, 0.3, 0.5, 2.0, 6.9])
    x = masked_input(GPT2, 5, 8)
    with torch.no_grad():
        out = model(x, sigma)
    want = torch.tensor([-math.log(math.expm1(s)) - math.log(GPT2) for s in sigma.double().tolist()],
                        dtype=torch.float64)
    current = F.one_hot(x, GPT2 + 1).bool()
    assert (out[current] == 0).all()
    want = want[:, None, None].expand(out.shape).masked_fill(current, 0)
    torch.testing.assert_close(out.masked_fill(current, 0).double(), want, rtol=1e-6, atol=0)


def test_uniform_graph_network():
    """'uniform': V = tokens, no sigma shift (a fresh network's scores are all 1), the keys of expected_keys,
    and the output is what sepo.Uniform(n) takes."""
    config = {"tokens": 11, "graph": {"type": "uniform"}, "noise": {"type": "geometric"},
              "model": {"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "cond_dim": 16,
                        "scale_by_sigma": False, "dropout": 0.1}}
    model = SEDD.from_config(config).eval()
    assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == expected_keys(config)
    x = torch.randint(11, (3, 5))
    out = sepo.model_output(model, sepo.Uniform(11), x, torch.rand(3) + 0.1)
    assert out.shape == (3, 5, 11) and (out == 0).all()
    with pytest.raises(ValueError, match="absorb graph only"):
        SEDD(11, 32, 4, 2, 16, graph="uniform", scale_by_sigma=True)


def test_sepo_denoiser_is_the_softmax_of_the_head():
    """sepo.Masked(50257) reads softmax(out[l, :50257]) at MASK positions: the scale_by_sigma shift is a
    constant of the row, so the denoiser is the same with and without it; the outputs differ by the shift."""
    shifted = tiny(GPT2, std=0.1)
    raw = SEDD(GPT2, 32, 4, 2, 16, scale_by_sigma=False).eval()
    raw.load_state_dict(shifted.state_dict())
    x, sigma = masked_input(GPT2, 2, 6), torch.tensor([0.05, 3.0])
    with torch.no_grad():
        a, b = shifted(x, sigma), raw(x, sigma)
    graph = sepo.Masked(GPT2)
    m = x == GPT2
    torch.testing.assert_close(graph.denoiser_log_probs(a)[m], graph.denoiser_log_probs(b)[m],
                               rtol=0, atol=2e-5)
    shift = -torch.expm1(sigma).log() - math.log(GPT2)
    current = F.one_hot(x, GPT2 + 1).bool()
    shift = shift[:, None, None].expand(a.shape)
    torch.testing.assert_close((a - b)[~current], shift[~current], rtol=0, atol=2e-5)


# --- the parts, with random weights --------------------------------------------------------------------


def rotary_complex(x: Tensor) -> Tensor:
    """Rotary as a complex multiplication: z_j = x_j + i x_{j + d/2} times e^{i p theta_j} at position p
    (dim -3 of x [..., L, heads, d]), theta_j = 10000^(-2j / d); in float64."""
    L, d = x.shape[-3], x.shape[-1]
    theta = 10_000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], -1)


def test_rotary_complex_form_and_relative_positions():
    cos, sin = tiny().rotary_emb(9, torch.device("cpu"))
    x = torch.randn(2, 9, 3, 8)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), rotary_complex(x), rtol=1e-6, atol=1e-6)
    q = apply_rotary(torch.randn(8).expand(1, 9, 1, 8), cos, sin)[0, :, 0]
    k = apply_rotary(torch.randn(8).expand(1, 9, 1, 8), cos, sin)[0, :, 0]
    dots = q @ k.T  # q at position m against k at position n: depends on m - n only
    torch.testing.assert_close(dots[1:, 1:], dots[:-1, :-1], rtol=1e-5, atol=1e-5)


def explicit_attention(block, h: Tensor) -> Tensor:
    """attn_out(softmax(q k^T / sqrt(d)) v) head by head, qkv split as q | k | v blocks, each head-major."""
    B, L, H = h.shape
    nh = block.n_heads
    d = H // nh
    q, k, v = block.attn_qkv(h).double().split(H, -1)
    q, k, v = (t.view(B, L, nh, d) for t in (q, k, v))
    q, k = rotary_complex(q), rotary_complex(k)
    heads = []
    for i in range(nh):
        scores = q[:, :, i] @ k[:, :, i].transpose(1, 2) / math.sqrt(d)  # [B, L, L]: no mask, not causal
        heads.append(scores.softmax(-1) @ v[:, :, i])
    return torch.cat(heads, -1).float() @ block.attn_out.weight.T


def test_attention_matches_explicit_softmax():
    model = tiny()
    block = model.blocks[0]
    h = torch.randn(2, 7, 32)
    cos, sin = model.rotary_emb(7, h.device)
    with torch.no_grad():
        torch.testing.assert_close(block.attention(h, cos, sin), explicit_attention(block, h),
                                   rtol=1e-5, atol=1e-5)


def test_adaln_chunk_order():
    """adaLN(c) = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp): with one gate at 0 the
    block adds exactly the other branch, computed here from its own slices, and the zero-gated branch's shift
    and scale change nothing. The final layer's pair is (shift, scale)."""
    model = tiny()
    block, H = model.blocks[0], 32
    x, c = torch.randn(2, 7, H), torch.randn(2, 16)
    cos, sin = model.rotary_emb(7, x.device)

    def run(slices: Tensor) -> Tensor:
        with torch.no_grad():
            block.adaLN_modulation.weight.zero_()
            block.adaLN_modulation.bias.copy_(slices.flatten())
            return block(x, cos, sin, c)

    s = torch.randn(6, H)
    no_attn, no_mlp = s.clone(), s.clone()
    no_attn[2] = 0
    no_mlp[5] = 0
    with torch.no_grad():
        mlp = s[5] * block.mlp(modulate(block.norm2(x), s[3], s[4]))
        attn = s[2] * block.attention(modulate(block.norm1(x), s[0], s[1]), cos, sin)
    torch.testing.assert_close(run(no_attn) - x, mlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(no_mlp) - x, attn, rtol=1e-5, atol=1e-5)
    moved = no_attn.clone()
    moved[:2] += 1.0
    torch.testing.assert_close(run(moved), run(no_attn), rtol=0, atol=0)
    moved = no_mlp.clone()
    moved[3:5] += 1.0
    torch.testing.assert_close(run(moved), run(no_mlp), rtol=0, atol=0)
    final = model.output_layer
    shift, scale = torch.randn(2, H)
    with torch.no_grad():
        final.adaLN_modulation.weight.zero_()
        final.adaLN_modulation.bias.copy_(torch.cat([shift, scale]))
        torch.testing.assert_close(final(x, c), final.linear(final.norm_final(x) * (1 + scale) + shift))


def test_head_from_skips_the_prompt():
    model = tiny()
    x, sigma = masked_input(11, 2, 9), torch.tensor([0.4, 1.5])
    with torch.no_grad():
        full = model(x, sigma)
        model.head_from = 4
        part = model(x, sigma)
        model.head_from = 20  # longer than the sequence: all prompt
        none = model(x, sigma)
    assert (part[:, :4] == 0).all() and (none == 0).all() and none.shape == full.shape
    torch.testing.assert_close(part[:, 4:], full[:, 4:], rtol=1e-6, atol=1e-6)


def test_bad_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"x LongTensor\[B, L\] and sigma \[B\].*sigma \(2, 1\)"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 1))
    with pytest.raises(ValueError, match="torch.float32"):
        model(torch.zeros(2, 5), torch.ones(2))
    with pytest.raises(ValueError, match="n_heads dividing hidden_size"):
        SEDD(11, 30, 4, 2, 16)
    with pytest.raises(KeyError, match="'model.cond_dim'"):
        SEDD.from_config({"tokens": 11, "graph": {"type": "absorb"},
                          "model": {"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "scale_by_sigma": True,
                                    "dropout": 0.1}})


# --- precision and memory options ----------------------------------------------------------------------


def test_bf16_autocast_keeps_fp32_stream_and_output():
    """autocast=True: the projections run in bf16, the residual stream and the log-scores stay fp32, and the
    output is close to the fp32 one. An outer autocast region (sepo's amp='bf16') gives the same."""
    model = tiny(std=0.1)
    x, sigma = masked_input(11, 2, 12), torch.tensor([0.3, 2.0])
    dtypes = {}
    model.blocks[0].attn_qkv.register_forward_hook(lambda m, i, o: dtypes.__setitem__("qkv", o.dtype))
    model.blocks[0].register_forward_hook(lambda m, i, o: dtypes.__setitem__("stream", o.dtype))
    model.blocks[0].norm2.register_forward_hook(lambda m, i, o: dtypes.__setitem__("norm", o.dtype))
    with torch.no_grad():
        ref = model(x, sigma)
        model.autocast = True
        low = model(x, sigma)
        assert dtypes == {"qkv": torch.bfloat16, "stream": torch.float32, "norm": torch.float32}
        model.autocast = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outer = model(x, sigma)
    assert low.dtype == outer.dtype == torch.float32
    assert dtypes["qkv"] == torch.bfloat16
    err = (low - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()
    torch.testing.assert_close(outer, low, rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    """checkpoint=True recomputes each block in the backward pass (its forward runs twice) and gives the
    same output and gradients, dropout included (the recomputation replays the random state)."""
    model = tiny(dropout=0.1).train()
    x, sigma = masked_input(11, 2, 10), torch.tensor([0.3, 2.0])
    w = torch.randn(2, 10, 12)
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda m, i: calls.append(1))
    results = []
    for ckpt in (False, True):
        model.checkpoint = ckpt
        model.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        out = model(x, sigma)
        (out * w).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (out0, g0, n0), (out1, g1, n1) = results
    assert (n0, n1) == (1, 2)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- samplers: SEDD's steps against sepo's MDLM step ---------------------------------------------------


def sedd_analytic_probs(score: Tensor, x: Tensor, dsigma: Tensor) -> Tensor:
    """SEDD's analytic step, unnormalised (upstream sampling.py AnalyticPredictor on the absorbing graph):
    staggered_score(s, dsigma) * transp_transition(x, dsigma), MASK = the last class. [B, L, V]"""
    e = dsigma.exp()[:, None, None]
    stag = score * e
    stag[..., -1] += (1 - e[..., 0]) * score.sum(-1)  # the sum runs over every class, MASK included
    masked = (x == score.shape[-1] - 1)[..., None]
    keep = torch.exp(-dsigma)[:, None, None] * F.one_hot(x, score.shape[-1])
    return stag * (keep + masked * (1 - torch.exp(-dsigma))[:, None, None])


def sedd_euler_probs(score: Tensor, x: Tensor, dt: Tensor, rate: Tensor) -> Tensor:
    """SEDD's Euler step (EulerPredictor, absorbing graph): one_hot(x) + dt sigma'(t) Qbar, where Qbar has
    rates s_y out of a MASK position and none out of a clean one. [B, L, V]"""
    masked = x == score.shape[-1] - 1
    out_rates = (score * masked[..., None]).scatter(-1, x[..., None], 0.0) * (dt * rate)[:, None, None]
    return out_rates.scatter(-1, x[..., None], 1 - out_rates.sum(-1, keepdim=True))


def test_sampler_step_against_sedd_closed_forms():
    """Step t -> s, ds = sigma(t) - sigma(s), sigma = sigma(t). At a MASK position SEDD's analytic step is
    p_y = s_y (e^ds - 1), p_MASK = 1 - (e^ds - 1) sum_y s_y. sepo's MDLM step draws the new token from the
    same conditional (s_y normalised) but unmasks with probability (e^ds - 1) / (e^sigma - 1) = dt / t: the
    two unmasking probabilities differ by the factor (e^sigma - 1) sum_y s_y. With normalised scores
    (sum_y s_y = 1 / (e^sigma - 1)) SEDD's analytic step, its Euler step and sepo's step are the same
    distribution. Clean tokens never move."""
    n = 11
    model, noise, graph = tiny(n, std=0.3), sepo.LogLinear(), sepo.Masked(n)
    x = masked_input(n, 3, 8)
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    s = torch.tensor([0.8, 0.45, 0.0], dtype=torch.float64)
    (sig_t, rate), sig_s = noise(t), noise(s)[0]
    with torch.no_grad():
        out = model(x, sig_t.float()).double()
    m = x == n
    analytic = sedd_analytic_probs(out.exp(), x, sig_t - sig_s)
    sepo_p = graph.predictor_log_probs(out, x, noise, t, s).exp()
    onehot = F.one_hot(x, n + 1).double()
    torch.testing.assert_close(analytic[~m], onehot[~m])
    torch.testing.assert_close(sepo_p[~m], onehot[~m])
    sum_s = out[..., :n].exp().sum(-1)
    em1 = torch.expm1(sig_t - sig_s)[:, None]
    torch.testing.assert_close(analytic[..., :n][m], (out[..., :n].exp() * em1[..., None])[m])
    torch.testing.assert_close(analytic[..., n][m], (1 - em1 * sum_s)[m])
    unmask_sedd, unmask_sepo = 1 - analytic[..., n], 1 - sepo_p[..., n]
    torch.testing.assert_close(unmask_sepo[m], ((t - s) / t)[:, None].expand_as(m)[m])
    torch.testing.assert_close(unmask_sedd[m], (unmask_sepo * torch.expm1(sig_t)[:, None] * sum_s)[m])
    assert (unmask_sedd[m] - unmask_sepo[m]).abs().max() > 1e-3  # unnormalised scores: the steps differ
    torch.testing.assert_close((analytic[..., :n] / unmask_sedd[..., None])[m],
                               (sepo_p[..., :n] / unmask_sepo[..., None])[m])

    norm = out.clone()  # real columns at MASK positions shifted so that sum_y s_y = 1 / (e^sigma - 1)
    shift = -torch.expm1(sig_t)[:, None].log() - out[..., :n].logsumexp(-1)
    norm[..., :n] += (shift * m)[..., None]
    analytic = sedd_analytic_probs(norm.exp(), x, sig_t - sig_s)
    euler = sedd_euler_probs(norm.exp(), x, t - s, rate)
    sepo_p = graph.predictor_log_probs(norm, x, noise, t, s).exp()
    torch.testing.assert_close(analytic, sepo_p)
    torch.testing.assert_close(euler, sepo_p)


def test_sepo_sample_never_emits_mask():
    """sepo.sample with a full-vocabulary SEDD whose head favours the MASK column: no MASK (50257) is left."""
    model = tiny(GPT2, std=0.05)
    with torch.no_grad():
        model.output_layer.linear.bias[GPT2] = 50.0
    x = sepo.sample(model, sepo.Masked(GPT2), sepo.LogLinear(), num_samples=2, length=10, steps=4,
                    generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 10) and (x < GPT2).all() and (x >= 0).all()


# --- the loader, on stand-ins in the hub layout ---------------------------------------------------------


def standin_config(hidden: int = 32, blocks: int = 2, heads: int = 4, cond_dim: int = 16) -> dict:
    """A config.json like the hub's: SEDD's whole Hydra config (configs/config.yaml, configs/model/*.yaml)."""
    return {"ngpus": 8, "tokens": GPT2,
            "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "snapshot_freq": 50000,
                         "log_freq": 50, "eval_freq": 100, "snapshot_freq_for_preemption": 10000,
                         "weight": "standard", "snapshot_sampling": True, "ema": 0.9999},
            "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
            "graph": {"type": "absorb", "file": "data", "report_all": False},
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
            "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
            "eval": {"batch_size": 512, "perplexity": True, "perplexity_batch_size": 32},
            "optim": {"weight_decay": 0, "optimizer": "AdamW", "lr": 3e-4, "beta1": 0.9, "beta2": 0.999,
                      "eps": 1e-8, "warmup": 2500, "grad_clip": 1.0},
            "model": {"name": "standin", "type": "ddit", "hidden_size": hidden, "cond_dim": cond_dim,
                      "length": 1024, "n_blocks": blocks, "n_heads": heads, "scale_by_sigma": True,
                      "dropout": 0.1}}


def standin_state(config: dict, seed: int = 0) -> dict[str, Tensor]:
    """Random fp32 weights under the published key names (N(0, 0.05^2); norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_keys(config).items():
        if key == "rotary_emb.inv_freq":
            state[key] = rotary_inv_freq(config["model"]["hidden_size"] // config["model"]["n_heads"])
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05 + (1.0 if "norm" in key else 0.0)
    return state


def write_hub_dir(folder: Path, config: dict, state: dict, weights: str = "safetensors") -> Path:
    """config.json plus model.safetensors and/or pytorch_model.bin (a plain state dict), as on the hub."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights in ("safetensors", "both"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
    if weights in ("bin", "both"):
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def write_sedd_standin(folder, hidden: int = 32, blocks: int = 2, weights: str = "safetensors",
                       heads: int = 4, cond_dim: int = 16, seed: int = 0) -> Path:
    """A whole SEDD checkpoint directory in the hub layout with the full 50258-token vocabulary and random
    weights, loadable by load_sedd like louaaron/sedd-small; weights: 'safetensors', 'bin' or 'both'.
    At the defaults it holds 3.3M parameters (13 MB per weight file) and takes well under a second."""
    if weights not in ("safetensors", "bin", "both"):
        raise ValueError(f"weights must be 'safetensors', 'bin' or 'both', got {weights!r}")
    config = standin_config(hidden, blocks, heads, cond_dim)
    return write_hub_dir(Path(folder), config, standin_state(config, seed), weights)


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> tuple[Path, dict, dict]:
    folder = write_sedd_standin(tmp_path_factory.mktemp("sedd") / "standin", weights="both")
    config = json.loads((folder / "config.json").read_text())
    return folder, config, standin_state(config)


def test_load_both_formats(standin, tmp_path):
    """safetensors and pytorch_model.bin load to the same network: the file's weights, eval mode, no dropout,
    the config on the model; safetensors is preferred when both exist."""
    folder, config, state = standin
    bin_only = write_hub_dir(tmp_path / "bin", config, state, "bin")
    a, b = load_sedd(folder), load_sedd(bin_only)
    for key, t in state.items():
        assert torch.equal(a.state_dict()[key], t) and torch.equal(b.state_dict()[key], t)
    assert not a.training and all(block.dropout == 0 for block in a.blocks)
    assert a.config == config and a.vocab_size == GPT2 + 1 and a.mask_id == GPT2
    assert all(p.requires_grad for p in a.parameters())
    x, sigma = masked_input(GPT2, 2, 16), torch.tensor([0.2, 4.0])
    with torch.no_grad():
        out = a(x, sigma)
        torch.testing.assert_close(b(x, sigma), out, rtol=0, atol=0)
        torch.testing.assert_close(a.train()(x, sigma), out, rtol=0, atol=0)  # no dropout in train mode
    other = {**state, "output_layer.linear.bias": state["output_layer.linear.bias"] + 1}
    write_hub_dir(tmp_path / "bin", config, other, "safetensors")  # now both files, different weights
    assert torch.equal(load_sedd(bin_only).output_layer.linear.bias, other["output_layer.linear.bias"])


def test_load_bf16_and_options(standin):
    folder, _, _ = standin
    ref = load_sedd(folder)
    low = load_sedd(folder, dtype=torch.bfloat16, head_from=3)
    assert low.autocast and low.head_from == 3 and low.blocks[0].attn_qkv.weight.dtype == torch.bfloat16
    assert low.rotary_emb.inv_freq.dtype == torch.float32
    x, sigma = masked_input(GPT2, 2, 8), torch.tensor([0.2, 4.0])
    with torch.no_grad():
        a, b = ref(x, sigma), low(x, sigma)
    assert b.dtype == torch.float32 and (b[:, :3] == 0).all()
    assert (b[:, 3:] - a[:, 3:]).abs().max() < 0.05 * a.abs().max()
    with pytest.raises(ValueError, match="dtype must be"):
        load_sedd(folder, dtype=torch.float16)


def test_bf16_copy_is_the_file_loaded_in_bf16(standin):
    folder, _, _ = standin
    policy = load_sedd(folder, head_from=3, checkpoint=True)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    low = bf16_copy(policy)
    from_file = load_sedd(folder, dtype=torch.bfloat16, head_from=3)
    assert low.state_dict().keys() == from_file.state_dict().keys()
    for key, t in from_file.state_dict().items():  # the same dtypes and bits (inv_freq stays fp32)
        assert low.state_dict()[key].dtype == t.dtype and torch.equal(low.state_dict()[key], t), key
    assert low.autocast and not low.checkpoint and not low.training and low.head_from == 3
    assert not any(p.requires_grad for p in low.parameters())
    x, sigma = masked_input(GPT2, 2, 8), torch.tensor([0.2, 4.0])
    with torch.no_grad():
        torch.testing.assert_close(low(x, sigma), from_file(x, sigma), rtol=0, atol=0)
    # the policy is untouched: fp32, trainable, its own storage
    assert policy.checkpoint
    assert all(p.requires_grad and p.dtype == torch.float32 for p in policy.parameters())
    for key, t in policy.state_dict().items():
        assert torch.equal(t, before[key]), key
    low.blocks[0].attn_qkv.weight.data.zero_()
    assert policy.blocks[0].attn_qkv.weight.abs().sum() > 0


def _renamed(state: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in state.items()}


BAD_STATES = {
    "wrong key": (lambda s: _renamed(s, "blocks.0.attn_qkv.weight", "blocks.0.attn.qkv.weight"),
                  r"missing keys: \['blocks.0.attn_qkv.weight'\]\n"
                  r"  unexpected keys: \['blocks.0.attn.qkv.weight'\]"),
    "missing key": (lambda s: {k: v for k, v in s.items() if k != "output_layer.linear.bias"},
                    r"missing keys: \['output_layer.linear.bias'\]"),
    "extra key": (lambda s: {**s, "blocks.1.attn_qkv.bias": torch.zeros(96)},
                  r"unexpected keys: \['blocks.1.attn_qkv.bias'\]"),
    "wrong shape": (lambda s: {**s, "blocks.1.mlp.0.weight": s["blocks.1.mlp.0.weight"][:64]},
                    r"'blocks.1.mlp.0.weight': expected shape \(128, 32\), found \(64, 32\)"),
    "not fp32": (lambda s: {**s, "sigma_map.mlp.0.weight": s["sigma_map.mlp.0.weight"].half()},
                 r"'sigma_map.mlp.0.weight' is torch.float16, expected torch.float32"),
    "no MASK class": (lambda s: {**s, "output_layer.linear.weight": s["output_layer.linear.weight"][:GPT2]},
                      r"'output_layer.linear.weight' has 50257 classes, expected tokens \+ 1 = 50258"),
    "inv_freq": (lambda s: {**s, "rotary_emb.inv_freq": s["rotary_emb.inv_freq"] * 2},
                 r"'rotary_emb.inv_freq' differs"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_strict_loading_names_file_and_key(standin, tmp_path, case):
    _, config, state = standin
    change, message = BAD_STATES[case]
    folder = write_hub_dir(tmp_path, config, change(state), "bin")
    with pytest.raises(ValueError, match=re.escape(str(folder / "pytorch_model.bin")) + ".*\n  " + message):
        load_sedd(folder)


def test_inv_freq_may_be_absent(standin, tmp_path):
    _, config, state = standin
    folder = write_hub_dir(tmp_path, config, {k: v for k, v in state.items() if k != "rotary_emb.inv_freq"})
    torch.testing.assert_close(load_sedd(folder).rotary_emb.inv_freq, state["rotary_emb.inv_freq"])


BAD_CONFIGS = {
    "graph": (("graph", "type"), "absorbing", r"graph.type 'absorbing' is not one of \('absorb', 'unif"),
    "noise": (("noise", "type"), "cosine", r"noise.type 'cosine' is not one of \('loglinear', 'geometric'\)"),
    "model": (("model", "type"), "dit", r"model.type 'dit' is not 'ddit'"),
    "heads": (("model", "n_heads"), 5, r"need positive sizes and n_heads dividing hidden_size"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_names_file_and_key(standin, tmp_path, case):
    folder, config, _ = standin
    (section, key), value, message = BAD_CONFIGS[case]
    bad = json.loads(json.dumps(config))
    bad[section][key] = value
    (tmp_path / "config.json").write_text(json.dumps(bad))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": " + message):
        load_sedd(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        load_sedd(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(standin_config()))
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or pytorch_model.bin"):
        load_sedd(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"neither a directory .* nor a hub id"):
        load_sedd(tmp_path / "absent")
    torch.save([torch.zeros(1)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: expected a state dict"):
        load_sedd(tmp_path)


def test_hub_id_offline_says_how_to_get_the_files(tmp_path, monkeypatch):
    """A hub id with HF_HUB_OFFLINE=1 and nothing in the cache: a message saying how to download, and no
    connection attempted."""
    attempts = []

    def no_connect(self, *args):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=r"HF_HUB_OFFLINE is set.*huggingface-cli download louaaron/sedd-medium "
                                      r"--local-dir DIR`, then pass DIR"):
        load_sedd("louaaron/sedd-medium", cache_dir=str(tmp_path / "cache"))
    assert attempts == []


def test_hub_id_offline_from_the_cache(standin, tmp_path, monkeypatch):
    """A hub id whose files are in the hub cache loads offline; with no model.safetensors there (as for
    louaaron/sedd-medium) pytorch_model.bin is used."""
    _, config, state = standin
    commit = "0" * 40
    repo = tmp_path / "models--louaaron--sedd-medium"
    write_hub_dir(repo / "snapshots" / commit, config, state, "bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    model = load_sedd("louaaron/sedd-medium", cache_dir=str(tmp_path))
    assert torch.equal(model.vocab_embed.embedding, state["vocab_embed.embedding"])


def test_training_run_checkpoint_uses_ema(standin, tmp_path):
    """A SEDD run directory (.hydra/config.yaml, checkpoints-meta/checkpoint.pth with model, ema, optimizer,
    step): the EMA's shadow_params, in parameter order, replace the weights unless ema=False."""
    import yaml
    _, config, state = standin
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "checkpoints-meta").mkdir()
    params = [k for k in state if k != "rotary_emb.inv_freq"]
    shadow = [state[k] + 0.01 for k in params]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-4)
    torch.save({"optimizer": optimizer.state_dict(), "model": state,
                "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow}, "step": 3},
               tmp_path / "checkpoints-meta" / "checkpoint.pth")
    with_ema, raw = load_sedd(tmp_path), load_sedd(tmp_path, ema=False)
    for key, t in zip(params, shadow, strict=True):
        assert torch.equal(with_ema.state_dict()[key], t) and torch.equal(raw.state_dict()[key], state[key])
    torch.save({"model": state, "ema": {"shadow_params": shadow[:-1]}},
               tmp_path / "checkpoints-meta" / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"pth: 'ema.shadow_params' should list 30 tensors, found 29"):
        load_sedd(tmp_path)
