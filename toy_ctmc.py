"""Exact verification of sepo.py on a tiny state space (docs/math.md §9).

Every law here is a vector over all states (n = 3 tokens, L = 2 positions: 9 clean
states, 16 with MASK), propagated exactly in float64, never sampled, except the
estimators (importance ratios, path gradients) whose bias and spread we measure.
Prints a table of checks, saves a figure, and exits non-zero if any check fails.

    python toy_ctmc.py [--out runs/toy]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
from torch import Tensor, nn

import sepo

N, L = 3, 2
T_SCORE = 0.3  # time at which the gradient identities are checked


def all_states(V: int, length: int) -> Tensor:
    """Every sequence of V^length, in lexicographic order [V^length, length]."""
    return torch.tensor(list(itertools.product(range(V), repeat=length)), dtype=torch.long)


def generator(graph: sepo.Graph, dtype: torch.dtype = torch.float64) -> Tensor:
    """The dense per-token generator Q [V, V] of a graph (math §1); sepo itself never builds it."""
    n, V = graph.n, graph.vocab_size
    if isinstance(graph, sepo.Masked):  # Q(v -> MASK) = 1, Q(v -> v) = -1, MASK absorbing
        Q = torch.zeros(V, V, dtype=dtype)
        Q[:n, n] = 1.0
        return Q - torch.diag(torch.cat([torch.ones(n, dtype=dtype), torch.zeros(1, dtype=dtype)]))
    return torch.full((n, n), 1.0 / n, dtype=dtype) - torch.eye(n, dtype=dtype)  # uniform jumps


class ExactModel(nn.Module):
    """The consistent tabular model: theta = logits of q_0 over the n^L clean states and
    q_t = q_0 exp(sigmabar Q) (per token). Returns exact log scores (Uniform) or the exact
    denoiser logits log p(x_0^l = v | x_t) (Masked), differentiably in theta."""

    def __init__(self, graph: sepo.Graph, theta: Tensor, length: int = L):
        super().__init__()
        self.graph, self.length = graph, length
        self.theta = nn.Parameter(theta.clone())
        self.register_buffer("clean", all_states(graph.n, length))

    def log_p0(self) -> Tensor:
        return self.theta.log_softmax(0)

    def log_lik(self, x: Tensor, sigmabar: Tensor) -> Tensor:
        """log p_{t|0}(x | c) for every clean state c: [B, ..., |clean|] for x [B, ..., L]."""
        V = self.graph.vocab_size
        tokens = torch.arange(V).expand(x.shape[0], V)
        logK = self.graph.transition(tokens, sigmabar).log()  # [B, from, to]
        flat = x.reshape(x.shape[0], -1, self.length)
        out = 0
        for l in range(self.length):
            A = logK[:, self.clean[:, l], :]  # [B, |clean|, V]: row c, column token of x^l
            out = out + A.gather(2, flat[:, None, :, l].expand(-1, A.shape[1], -1)).transpose(1, 2)
        return out.reshape(*x.shape[:-1], -1)

    def log_qt(self, x: Tensor, sigmabar: Tensor) -> Tensor:
        return torch.logsumexp(self.log_p0() + self.log_lik(x, sigmabar), -1)

    def forward(self, x: Tensor, sigmabar: Tensor) -> Tensor:
        B, Lx = x.shape
        V = self.graph.vocab_size
        if isinstance(self.graph, sepo.Masked):
            # -1e4 instead of -inf: exp underflows to exactly 0, and backward stays NaN-free
            joint = (self.log_p0() + self.log_lik(x, sigmabar)).clamp(min=-1e4)  # [B, |clean|]
            same = self.clean.t()[:, None, :] == torch.arange(self.graph.n)[None, :, None]
            pick = torch.where(same, 0.0, -1e4)
            return torch.logsumexp(joint[:, None, None, :] + pick[None], -1)  # [B, L, n]
        nb = x[:, None, None, :].repeat(1, Lx, V, 1)  # neighbours x^{l<-v}
        idx = torch.arange(Lx)
        nb[:, idx, :, idx] = torch.arange(V)
        log_q_nb = self.log_qt(nb, sigmabar)  # [B, L, V]
        return log_q_nb - log_q_nb.gather(-1, x[..., None])  # log s(x)_{l,v}


def one_step_matrix(log_probs: Tensor, S: Tensor) -> Tensor:
    """Exact transition matrix over states from per-position step log-probs [|S|, L, V]:
    P[i, j] = prod_l P(S_j^l | S_i) (tokens move independently given the state)."""
    lp = torch.stack([log_probs[:, l, :][:, S[:, l]] for l in range(S.shape[1])]).sum(0)
    return lp.exp()


def sampler_law(model, graph, noise, steps: int, corrector_steps: int = 0) -> Tensor:
    """Exact law over V^L of the output of sepo.sample (same step functions, propagated)."""
    S = all_states(graph.vocab_size, L)
    mu = torch.zeros(len(S))
    prior = graph.sample_prior((1, L), "cpu")[0]
    if isinstance(graph, sepo.Masked):
        mu[(S == prior).all(1)] = 1.0
    else:
        mu[:] = 1.0 / len(S)
    ts = sepo.time_grid(steps)
    B = len(S)
    for k in range(steps):
        t, s = ts[k].expand(B), ts[k + 1].expand(B)
        mu = mu @ one_step_matrix(sepo.predictor_log_probs(model, graph, noise, S, t, s), S)
        if k < steps - 1:
            for _ in range(corrector_steps):
                mu = mu @ one_step_matrix(sepo.corrector_log_probs(model, graph, noise, S, s, t - s), S)
    return mu


def clean_part(mu: Tensor, graph) -> Tensor:
    """The law restricted to clean states (lexicographic order of n^L); checks no MASK is left."""
    S = all_states(graph.vocab_size, L)
    clean = (S < graph.n).all(1)
    return mu[clean]


def tv(p: Tensor, q: Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def generator_matrix(model, graph, noise, t: float) -> tuple[Tensor, Tensor]:
    """The full generator G_t = sigma(Q + Qbar_theta) over V^L, and the states."""
    S = all_states(graph.vocab_size, L)
    V = graph.vocab_size
    tt = torch.full((len(S),), t)
    sigmabar, sigma = noise(tt)
    out = model(S, sigmabar)
    forward, reverse = graph.log_forward_rate(S, sigma), graph.log_reverse_rate(out, S, sigmabar, sigma)
    log_rate = torch.logaddexp(forward, reverse)
    rate = log_rate.exp()
    G = torch.zeros(len(S), len(S))
    ids = (S * V ** torch.arange(L - 1, -1, -1)).sum(1)
    for l in range(L):
        for v in range(V):
            nb = S.clone()
            nb[:, l] = v
            j = (nb * V ** torch.arange(L - 1, -1, -1)).sum(1)
            moved = j != ids
            G[ids[moved], j[moved]] += rate[moved, l, v]
    G -= torch.diag(G.sum(1))
    return G, S


# ---------------------------------------------------------------------------
# The checks. Each returns rows (name, value, tolerance, passed).
# ---------------------------------------------------------------------------


def setup(graph_name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    graph = sepo.Uniform(N) if graph_name == "uniform" else sepo.Masked(N)
    noise = sepo.Geometric(1e-4, 20.0) if graph_name == "uniform" else sepo.LogLinear(1e-3)
    theta = torch.randn(N ** L, generator=g)
    return graph, noise, ExactModel(graph, theta)


def check_forward() -> list:
    rows = []
    for graph in (sepo.Uniform(N), sepo.Masked(N)):
        V = graph.vocab_size
        tokens = torch.arange(V)[None]
        err, lerr = 0.0, 0.0
        for sb in (0.05, 0.7, 3.0):
            sigmabar = torch.tensor([sb])
            exact = torch.matrix_exp(sb * generator(graph))
            err = max(err, (graph.transition(tokens, sigmabar)[0] - exact).abs().max().item())
            x, y = torch.cartesian_prod(torch.arange(V), torch.arange(V)).t()
            lp = graph.transition_log_prob(x[None], y[None], sigmabar)[0].exp()
            lerr = max(lerr, (lp - exact[x, y]).abs().max().item())
        name = type(graph).__name__
        rows.append((f"1 forward exp(sigmabar Q) vs closed form ({name})", err, 1e-12, err < 1e-12))
        rows.append((f"1 forward transition_log_prob ({name})", lerr, 1e-12, lerr < 1e-12))
    return rows


def check_sampler(results: dict) -> list:
    rows = []
    for name in ("uniform", "masked"):
        graph, noise, model = setup(name)
        p0 = model.log_p0().exp().detach()
        with torch.no_grad():
            for corr in (0, 1):
                tvs = []
                for steps in (4, 16, 64, 256):
                    mu = sampler_law(model, graph, noise, steps, corr)
                    leftover = 1 - clean_part(mu, graph).sum().item()
                    tvs.append(tv(clean_part(mu, graph), p0))
                results[f"tv_{name}_{corr}"] = tvs
                ok = tvs[-1] < 0.02 and tvs[-1] < tvs[0] and abs(leftover) < 1e-12
                label = "with" if corr else "without"
                row = f"2 TV(sampler law, p_0) at 256 steps, {label} corrector ({name})"
                rows.append((row, tvs[-1], 0.02, ok))
    return rows


def _flat_grad(f: Tensor, model) -> Tensor:
    (g,) = torch.autograd.grad(f, model.theta, retain_graph=True)
    return g


def check_gradients() -> list:
    rows = []
    graph, noise, model = setup("uniform", seed=1)
    S = all_states(N, L)
    sigmabar = noise(torch.full((len(S),), T_SCORE))[0]
    log_q = model.log_qt(S[None], sigmabar[:1])[0]  # q_t over all states, differentiable
    # (T1) global: grad log q(x) = - sum_{y != x} q(y) grad log s(x)_y, with log s(x)_y = log q(y) - log q(x)
    err1 = 0.0
    for i in range(len(S)):
        lhs = _flat_grad(log_q[i], model)
        log_s = log_q - log_q[i]
        w = log_q.detach().exp()
        rhs = -_flat_grad((w * log_s).sum() - w[i] * log_s[i], model)
        err1 = max(err1, (lhs - rhs).abs().max().item())
    rows.append(("3 (T1) grad log q = -sum_y q(y) grad log s (uniform, L=2)", err1, 1e-10, err1 < 1e-10))

    # (T2) local, through sepo.log_pi_surrogate: grad psi = grad sum_l log q(x^l | x^{-l})
    psi = sepo.log_pi_surrogate(model, graph, noise, S, T_SCORE)
    err2 = 0.0
    qmat = log_q.view(N, N)  # [x^1, x^2]
    log_pl = (qmat - qmat.logsumexp(0, keepdim=True)) + (qmat - qmat.logsumexp(1, keepdim=True))
    for i, (a, b) in enumerate(S.tolist()):
        err2 = max(err2, (_flat_grad(psi[i], model) - _flat_grad(log_pl[a, b], model)).abs().max().item())
    rows.append(("3 (T2) grad psi = grad log PL (sepo, uniform, L=2)", err2, 1e-10, err2 < 1e-10))

    # L = 1: (T2) is (T1): grad psi = grad log q exactly
    g1 = torch.Generator().manual_seed(2)
    m1 = ExactModel(graph, torch.randn(N, generator=g1), length=1)
    S1 = all_states(N, 1)
    sb1 = noise(torch.full((N,), T_SCORE))[0]
    psi1 = sepo.log_pi_surrogate(m1, graph, noise, S1, T_SCORE)
    lq1 = m1.log_qt(S1[None], sb1[:1])[0]
    err3 = max((_flat_grad(psi1[i], m1) - _flat_grad(lq1[i], m1)).abs().max().item() for i in range(N))
    rows.append(("3 (T2) = (T1) for L=1 (sepo, uniform)", err3, 1e-10, err3 < 1e-10))

    # Masked: psi = sum_l log p_theta(x^l | x^{l<-MASK}) = log PL of q_0
    graph_m, noise_m, model_m = setup("masked", seed=3)
    Sm = all_states(N, L)
    psi_m = sepo.log_pi_surrogate(model_m, graph_m, noise_m, Sm, T_SCORE, positions=L)
    q0 = model_m.log_p0().view(N, N)
    log_pl0 = (q0 - q0.logsumexp(0, keepdim=True)) + (q0 - q0.logsumexp(1, keepdim=True))
    err4 = max((_flat_grad(psi_m[i], model_m) - _flat_grad(log_pl0[a, b], model_m)).abs().max().item()
               for i, (a, b) in enumerate(Sm.tolist()))
    rows.append(("3 (T2) masked: grad psi = grad log PL(q_0) (sepo)", err4, 1e-10, err4 < 1e-10))
    return rows


def check_clipped() -> list:
    """grad of sepo.clipped_surrogate == -grad l_A when psi and r are exact (L = 1)."""
    graph, noise = sepo.Uniform(6), sepo.Geometric()
    g = torch.Generator().manual_seed(4)
    theta_old = torch.randn(6, generator=g)
    model = ExactModel(graph, theta_old + 0.5 * torch.randn(6, generator=g), length=1)
    old = ExactModel(graph, theta_old, length=1)
    x = all_states(6, 1).repeat(2, 1)
    adv = torch.tensor([1.0, -1.0]).repeat_interleave(6) * torch.rand(12, generator=g)
    sb = noise(torch.full((12,), T_SCORE))[0]
    log_r = model.log_qt(x[None], sb[:1])[0] - old.log_qt(x[None], sb[:1])[0].detach()
    r = log_r.exp()
    eps = 0.2
    l_A = torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv).mean()
    psi = sepo.log_pi_surrogate(model, graph, noise, x, T_SCORE)
    loss, clip_frac = sepo.clipped_surrogate(psi, log_r.detach(), adv, eps)
    err = (_flat_grad(loss, model) + _flat_grad(l_A, model)).abs().max().item()
    both = 0 < clip_frac.item() < 1
    return [("4 grad clipped surrogate = -grad l_A (exact r, psi)", err, 1e-10, err < 1e-10 and both)]


def check_snis(results: dict, reps: int = 100) -> list:
    """SNIS estimate of pi_theta(x)/pi_old(x) against the exact ratio of the sampler laws.
    The estimates for each M use the first M of 128 shared paths per repetition."""
    rows = []
    Ms = (1, 2, 4, 8, 32, 128)
    steps = 8
    for name in ("masked", "uniform"):
        graph, noise, old, new = _ratio_models(name)
        S = all_states(N, L)[:: 3]  # three of the nine states keep this under a few seconds
        with torch.no_grad():
            exact = (clean_part(sampler_law(new, graph, noise, steps), graph).log()
                     - clean_part(sampler_law(old, graph, noise, steps), graph).log())[:: 3].exp()
            gen = torch.Generator().manual_seed(7)
            paths = graph.sample_path(S.repeat_interleave(reps * Ms[-1], 0), noise(sepo.time_grid(steps))[0],
                                      generator=gen)
            shape = (len(S), reps, Ms[-1])
            logq = sepo.forward_path_log_prob(graph, noise, paths).view(shape)
            lp_new = sepo.path_log_prob(new, graph, noise, paths, chunk_size=1 << 16).view(shape)
            lp_old = sepo.path_log_prob(old, graph, noise, paths, chunk_size=1 << 16).view(shape)
        rmse, bias, std = [], [], []
        for M in Ms:
            r_hat = sepo.snis_log_ratio(lp_new[..., :M], lp_old[..., :M], logq[..., :M]).exp()  # [|S|, reps]
            err = r_hat - exact[:, None]
            rmse.append(err.pow(2).mean().sqrt().item())
            bias.append(err.mean(1).abs().max().item())
            std.append(r_hat.std(1).mean().item())
        results[f"snis_{name}"] = (Ms, rmse, bias, std)
        # The forward-noising proposal fits the masked sampler's paths well; on the uniform graph
        # its weights are heavy-tailed (ESS ~ M/10), so the spread shrinks slowly there.
        factor = 4 if name == "masked" else 1.1
        ok = rmse[-1] < rmse[0] / factor
        rows.append((f"5 SNIS ratio RMSE, M=1 -> 128 ({name}): {rmse[0]:.3f} ->", rmse[-1],
                     f"< RMSE(1)/{factor}", ok))
        rows.append((f"5 SNIS ratio |bias| max over x, M=1 -> 128 ({name}): {bias[0]:.3f} ->", bias[-1],
                     "< bias(M=1)", bias[-1] < bias[0]))
    return rows


def _ratio_models(name: str):
    """The old and new tabular models of the ratio checks (the same for SNIS and the rollout ratio)."""
    graph, noise, old = setup(name, seed=5)
    shift = 0.4 * torch.randn(N ** L, generator=torch.Generator().manual_seed(6))
    return graph, noise, old, ExactModel(graph, old.theta.detach() + shift)


def check_rollout_ratio(results: dict, rollouts: int = 60_000, steps: int = 8) -> list:
    """The rollout-path ratio P_new(z, x)/P_old(z, x) along the old chain's own paths (math §5) against
    the exact ratio of the sampler laws, without and with one corrector step per predictor step (the
    path then holds the corrector's transitions too). It is unbiased for every x, so the RMSE of the
    mean of R paths falls like 1/sqrt(R); on check_snis's states it sits next to SNIS with M = R paths
    (SNIS costs two path passes per path, old and new; the rollout ratio one). SNIS's paths are the
    predictor's only: with a corrector it converges to the predictor chain's ratio, whose distance to
    the exact one is reported."""
    rows, Ms = [], (1, 2, 4, 8, 32, 128)
    for name in ("masked", "uniform"):
        graph, noise, old, new = _ratio_models(name)
        laws = {}
        for c in (0, 1):
            with torch.no_grad():
                laws[c] = [clean_part(sampler_law(m, graph, noise, steps, c), graph) for m in (new, old)]
                exact = laws[c][0] / laws[c][1]
                roll = sepo.rollout(old, graph, noise, rollouts, L, steps, c,
                                    generator=torch.Generator().manual_seed(8 + c), record=True)
                rho = (sepo.path_log_prob(new, graph, noise, roll.path, chunk_size=1 << 20, corrector_steps=c)
                       - roll.log_prob).exp()
            idx = (roll.x * N ** torch.arange(L - 1, -1, -1)).sum(1)
            per_x = [rho[idx == i] for i in range(N ** L)]
            z = max(((r.mean() - exact[i]) / (r.std() / len(r) ** 0.5)).abs().item()
                    for i, r in enumerate(per_x))
            rmse = [torch.cat([(per_x[i][: len(per_x[i]) // m * m].view(-1, m).mean(1) - exact[i])
                               for i in range(0, N ** L, 3)]).pow(2).mean().sqrt().item() for m in Ms]
            results[f"rollout_{name}_{c}"] = (Ms, rmse)
            label = f"({name}, {'with' if c else 'no'} corrector)"
            row = f"5 rollout ratio RMSE, mean of R = 1 -> 128 paths {label}: {rmse[0]:.3f} ->"
            rows.append((row, rmse[-1], "< RMSE(1)/4", rmse[-1] < rmse[0] / 4))
            row = f"5 rollout ratio max_x |mean - r(x)| / SE, {rollouts} rollouts {label}"
            rows.append((row, z, "< 4", z < 4))
        snis = results.get(f"snis_{name}", (None, [float("nan")] * 6))[1]
        rmse0 = results[f"rollout_{name}_0"][1]
        rows.append((f"5 RMSE: rollout 1 path (cost 1) {rmse0[0]:.3f}, 2 paths {rmse0[1]:.3f} (cost 2) vs "
                     f"SNIS M=1 (cost 2) ({name})", snis[0], "report", True))
        snis_limit = (laws[0][0] / laws[0][1] - laws[1][0] / laws[1][1]).abs().max().item()
        rows.append((f"5 SNIS (predictor paths) at M -> inf vs the exact ratio with a corrector ({name})",
                     snis_limit, "report", True))
    return rows


def check_corrector() -> list:
    rows = []
    for name in ("uniform", "masked"):
        graph, noise, model = setup(name, seed=8)
        t = 0.4
        with torch.no_grad():
            G, S = generator_matrix(model, graph, noise, t)
            q = model.log_qt(S[None], noise(torch.tensor([t]))[0])[0].exp()
        stat = ((q @ G).abs().max() / G.abs().max()).item()
        rows.append((f"6 q_t G_t = 0, corrector leaves q_t invariant ({name})", stat, 1e-12, stat < 1e-12))
        mu = torch.rand(len(S), generator=torch.Generator().manual_seed(9))
        mu /= mu.sum()
        kls, worst_rel = [], 0.0
        for tau in torch.linspace(0, 2, 21):
            m = mu @ torch.matrix_exp(tau * G)
            rho = m / q
            kls.append((m * rho.log()).sum().item())
            dkl = ((m @ G) * rho.log()).sum()  # d/dtau KL
            flux = (rho[None] - rho[:, None]) * (rho[None].log() - rho[:, None].log())
            diss = -0.5 * (q[:, None] * G * flux).sum()
            worst_rel = max(worst_rel, (abs(dkl - diss) / max(abs(diss), 1e-30)).item())
        mono = max(b - a for a, b in zip(kls, kls[1:]))
        rows.append((f"6 KL(mu_tau || q_t) non-increasing, max step ({name})", mono, "<= 1e-14",
                     mono <= 1e-14))
        rows.append((f"6 dKL/dtau = Maas dissipation, rel. err ({name})", worst_rel, 1e-10,
                     worst_rel < 1e-10))
    return rows


def check_finetune(results: dict) -> list:
    """Tabular SEPO (exact expectations) converges to q* ~ q_ref exp(R / alpha)."""
    rows = []
    n, alpha = 6, 0.5
    graph, noise = sepo.Uniform(n), sepo.Geometric()
    g = torch.Generator().manual_seed(10)
    theta_ref = torch.randn(n, generator=g)
    R = torch.rand(n, generator=g) * 2
    model = ExactModel(graph, theta_ref, length=1)
    q_ref = theta_ref.softmax(0)
    q_star = (q_ref.log() + R / alpha).softmax(0)
    x = all_states(n, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    curve = []
    t_eval = 1e-6  # sigmabar ~ sigma_min: q_t ~ q_0
    for it in range(400):
        q = model.log_p0().exp().detach()
        shaped = R - alpha * (q.log() - q_ref.log())  # sequence-level KL as a reward term
        adv = shaped - (q * shaped).sum()
        psi = sepo.log_pi_surrogate(model, graph, noise, x, t_eval)
        # exact expectation over x ~ q of the clipped surrogate (r = 1: on-policy)
        loss, _ = sepo.clipped_surrogate(psi * q * n, torch.zeros(n), adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(tv(model.log_p0().exp().detach(), q_star))
    results["finetune_tv"] = curve
    rows.append(("7 tabular SEPO: TV(q_theta, q*) after 400 steps", curve[-1], 0.01, curve[-1] < 0.01))
    return rows


class TinyNet(nn.Module):
    """A small neural score / denoiser network: not consistent, so the ratio assumption is approximate."""

    def __init__(self, graph: sepo.Graph, width: int = 64):
        super().__init__()
        self.V, self.out = graph.vocab_size, graph.n
        self.net = nn.Sequential(nn.Linear(L * self.V + 1, width), nn.Tanh(), nn.Linear(width, width),
                                 nn.Tanh(), nn.Linear(width, L * self.out))

    def forward(self, x, sigmabar):
        h = torch.cat([nn.functional.one_hot(x, self.V).flatten(1).to(sigmabar), sigmabar.log()[:, None]], 1)
        return self.net(h).view(x.shape[0], L, self.out)


def pretrained_net(graph, noise, p0: Tensor) -> TinyNet:
    """A TinyNet pre-trained on samples of p_0 with sepo.pretrain_loss."""
    torch.manual_seed(0)
    net = TinyNet(graph)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    S = all_states(N, L)
    gen = torch.Generator().manual_seed(12)
    for _ in range(300):
        x0 = S[torch.multinomial(p0, 256, replacement=True, generator=gen)]
        loss = sepo.pretrain_loss(net, graph, noise, x0, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _flat(grads) -> Tensor:
    return torch.cat([g.flatten() for g in grads])


def _cos(a: Tensor, b: Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def _estimator_gradients(model, graph, noise, steps: int, Ms: tuple, paths_per_state: int,
                         rollouts: int) -> dict:
    """The exact gradient of E_{pi_theta}[R] (autograd through the exact sampler law) and the expectation,
    exact over x, of each grad log pi estimator times the advantage (math §3-4):
      pl:        grad psi of sepo.log_pi_surrogate (T2), one pass per x;
      path M:    sum_m wbar_m grad log P(z_m, x), z_m from the forward process, averaged over
                 paths_per_state / M independent draws of M paths (its bias shrinks with M);
      rollout:   grad log P(z, x) along rollout paths z ~ P(z | x) (grouped by x), an exact posterior draw."""
    S = all_states(N, L)
    R = torch.arange(N ** L, dtype=torch.get_default_dtype()) / N ** L
    params = list(model.parameters())
    pi = clean_part(sampler_law(model, graph, noise, steps), graph)
    out = {"exact": _flat(torch.autograd.grad((pi * R).sum(), params))}
    pi = pi.detach()
    adv = pi * (R - (pi * R).sum())  # the exact expectation over x of A(x) * (...)
    psi = sepo.log_pi_surrogate(model, graph, noise, S, 1.0 / steps, positions=L)
    out["pl"] = _flat(torch.autograd.grad((adv * psi).sum(), params))
    gen = torch.Generator().manual_seed(13)
    sigmabars = noise(sepo.time_grid(steps))[0]
    for M in Ms:
        reps = max(1, paths_per_state // M)
        paths = graph.sample_path(S.repeat_interleave(reps * M, 0), sigmabars, generator=gen)
        logq = sepo.forward_path_log_prob(graph, noise, paths).view(len(S), reps, M)
        with torch.no_grad():
            w = torch.softmax(sepo.path_log_prob(model, graph, noise, paths).view(len(S), reps, M) - logq, -1)
        lp = sepo.path_log_prob(model, graph, noise, paths, chunk_size=1 << 20,
                                select=sepo.active_transitions(graph, paths)).view(len(S), reps, M)
        out[f"path {M}"] = _flat(torch.autograd.grad((adv[:, None, None] * w * lp).sum() / reps, params))
    roll = sepo.rollout(model, graph, noise, rollouts, L, steps, generator=gen, record=True)
    idx = (roll.x * N ** torch.arange(L - 1, -1, -1)).sum(1)
    count = torch.bincount(idx, minlength=len(S)).to(pi)
    lp = sepo.path_log_prob(model, graph, noise, roll.path, chunk_size=1 << 20,
                            select=sepo.active_transitions(graph, roll.path))
    out["rollout"] = _flat(torch.autograd.grad((adv[idx] / count[idx] * lp).sum(), params))
    return out


def check_gradient_estimators(results: dict, steps: int = 16) -> list:
    """cos(estimator, exact gradient of E_pi R) for the three grad log pi estimators, for the consistent
    tabular model (only the pseudo-likelihood and Monte-Carlo gaps) and a small neural network
    pre-trained on p_0 (plus the ratio-assumption gap, which only the pseudo-likelihood suffers)."""
    rows, Ms = [], (1, 4, 16, 64)
    for name in ("masked", "uniform"):
        graph, noise, exact = setup(name, seed=11)
        net = pretrained_net(graph, noise, exact.log_p0().exp().detach())
        for kind, model in (("tabular", exact), ("neural", net)):
            g = _estimator_gradients(model, graph, noise, steps, Ms, 1024, 10_000)
            cos = {k: _cos(v, g["exact"]) for k, v in g.items() if k != "exact"}
            results[f"cos_{name}_{kind}"] = cos
            path = [cos[f"path {M}"] for M in Ms]
            rows.append((f"7 cos(pl grad, exact), {kind} ({name}): the paper's estimator", cos["pl"],
                         "> 0 (report)", cos["pl"] > 0))
            label = f"7 cos(path grad, exact), {kind} ({name}), M = " + ", ".join(map(str, Ms)) + ": " \
                + ", ".join(f"{c:.3f}" for c in path)
            if kind == "tabular" or name == "masked":
                rows.append((label + "; at M = 4", path[1], ">= 0.95", path[1] >= 0.95))
            else:  # uniform neural: the forward proposal is poor, the SNIS bias shrinks with M
                inc = all(b > a for a, b in zip(path, path[1:]))
                ok = inc and path[-1] >= 0.8
                rows.append((label + f"; at M = {Ms[-1]}", path[-1], ">= 0.8, increasing", ok))
            rows.append((f"7 cos(rollout-path grad, exact), {kind} ({name}), 10^4 rollouts", cos["rollout"],
                         ">= 0.95", cos["rollout"] >= 0.95))
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for name in ("masked", "uniform"):
        Ms, rmse, bias, std = results[f"snis_{name}"]
        ax[0].loglog(Ms, rmse, "o-", label=f"SNIS, M paths ({name})")
        Ms, rmse = results[f"rollout_{name}_0"]
        ax[0].loglog(Ms, rmse, "s--", label=f"rollout ratio, mean of R paths ({name})")
    ax[0].set(xlabel="M or R (latent paths)", ylabel="RMSE of r_hat", title="importance ratio estimates")
    ax[0].legend(fontsize=7)
    steps = (4, 16, 64, 256)
    for name in ("uniform", "masked"):
        for corr in (0, 1):
            ax[1].loglog(steps, results[f"tv_{name}_{corr}"], "o-" if corr else "s--",
                         label=f"{name}{' + corrector' if corr else ''}")
    ax[1].set(xlabel="sampler steps", ylabel="TV(law, p_0)", title="exact sampler law, exact scores")
    ax[1].legend(fontsize=7)
    ax[2].semilogy(results["finetune_tv"])
    ax[2].set(xlabel="iteration", ylabel="TV(q_theta, q*)", title="tabular SEPO towards q_ref exp(R/alpha)")
    for key in ("cos_masked_neural", "cos_uniform_neural"):
        cos = results[key]
        Ms = [int(k.split()[1]) for k in cos if k.startswith("path")]
        line = ax[3].semilogx(Ms, [cos[f"path {M}"] for M in Ms], "o-", label=f"path, M paths ({key[4:]})")[0]
        ax[3].axhline(cos["pl"], ls=":", color=line.get_color(), label=f"pl ({key[4:]})")
        ax[3].axhline(cos["rollout"], ls="--", color=line.get_color(), label=f"rollout path ({key[4:]})")
    ax[3].set(xlabel="M", ylabel="cos(estimate, exact gradient)",
              title="grad log pi estimators, neural models")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(out: str | None = None) -> list:
    results: dict = {}
    rows = (check_forward() + check_sampler(results) + check_gradients() + check_clipped()
            + check_snis(results) + check_rollout_ratio(results) + check_corrector() + check_finetune(results)
            + check_gradient_estimators(results))
    if out:
        os.makedirs(out, exist_ok=True)
        plot(results, os.path.join(out, "toy_ctmc.png"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/toy", help="folder for the figure (default: runs/toy)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)  # exact checks: everything in float64
    tic = time.perf_counter()
    rows = run_all(args.out)
    width = max(len(r[0]) for r in rows)
    print(f"| {'check':<{width}} | {'measured':>10} | {'tolerance':>14} | ok   |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 16}|------|")
    for name, value, tol, ok in rows:
        print(f"| {name:<{width}} | {value:>10.3g} | {str(tol):>14} | {'pass' if ok else 'FAIL'} |")
    failed = [r for r in rows if not r[3]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed in {time.perf_counter() - tic:.1f} s; "
          f"figure: {os.path.join(args.out, 'toy_ctmc.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
