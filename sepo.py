"""SEPO: Score Entropy Policy Optimization, in one file.

Policy-gradient fine-tuning of discrete diffusion models against black-box
rewards (Zekri & Boulle, "Fine-Tuning Discrete Diffusion Models with Policy
Gradient Methods", NeurIPS 2025). Read top to bottom, in dependency order:

    1. CTMC graphs (uniform, masked)          SEPO_MATH.md section 1
    2. noise schedules                        section 1
    3. samplers: predictor + corrector        sections 2 and 7
    4. pre-training losses and the ELBO       section 1
    5. SEPO pieces: gradient of log pi        section 3 (T2)
                    SNIS importance ratio     section 4
                    clipped objective, advantages  section 5
                    truncated path KL         section 6
    6. the trainer (Algorithm 1)              sections 5, 6, 10

"section n" / "(Tn)" below point at SEPO_MATH.md. Depends on torch only.

Conventions. x: LongTensor[B, L] of token ids. A model is any nn.Module with
model(x, sigma) -> Tensor[B, L, V], where sigma[B] is the total noise
sigmabar(t) of each row. Uniform graph: V = n log concrete scores. Masked
graph: V = n or n + 1 denoiser logits (a MASK column is ignored). The first
`n_fixed` positions of a sequence may be a prompt: never noised, never changed.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = float("-inf")


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def _col(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1], to broadcast a per-row scalar over [B, L, V]."""
    return v[:, None, None]


# ---------------------------------------------------------------------------
# 1. CTMC graphs (section 1). One class per per-token generator Q, SEDD style.
# ---------------------------------------------------------------------------


class Graph:
    """A CTMC on V^L whose tokens are noised independently by a generator Q.

    Q[i, j] is the rate of the jump i -> j (rows sum to zero). Neighbours of x
    are the Hamming-1 moves x^{l<-v}; every method below returns, for each
    position l, a vector over the token v of the move x^l -> v.
    """

    n: int           # number of real tokens
    vocab_size: int  # n, or n + 1 with a MASK token
    mask_id: Optional[int] = None
    out_dims: tuple[int, ...]  # accepted last dims of a model output

    def generator(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Q, the per-token generator [V, V]."""
        raise NotImplementedError

    def rate_out(self, x: Tensor) -> Tensor:
        """Q(x^l -> v), zero at v = x^l: forward rates [..., V]."""
        return self._offdiag(self.generator(torch.get_default_dtype()).to(x.device)[x], x)

    def rate_in(self, x: Tensor) -> Tensor:
        """Q(v -> x^l), zero at v = x^l: the factor of the reverse rate [..., V]."""
        Q = self.generator(torch.get_default_dtype()).to(x.device)
        return self._offdiag(Q.t()[x], x)

    @staticmethod
    def _offdiag(r: Tensor, x: Tensor) -> Tensor:
        return r.scatter(-1, x[..., None], 0.0)

    def transition(self, x: Tensor, sigmabar: Tensor) -> Tensor:
        """p_{t|0}(v | x^l) = exp(sigmabar Q)[x^l, v]  [B, L, V]; sigmabar [B]."""
        raise NotImplementedError

    def transition_log_prob(self, x: Tensor, y: Tensor, sigmabar: Tensor) -> Tensor:
        """log exp(sigmabar Q)[x^l, y^l] per position [B, L]."""
        raise NotImplementedError

    def sample_transition(self, x: Tensor, sigmabar: Tensor, generator=None) -> Tensor:
        """x_t ~ p_{t|0}(. | x) (forward noising), sigmabar [B]."""
        raise NotImplementedError

    def sample_prior(self, shape: tuple[int, int], device, generator=None) -> Tensor:
        """x_1 from the limit of the forward process."""
        raise NotImplementedError

    def log_score(self, out: Tensor, x: Tensor, sigmabar: Tensor) -> Tensor:
        """log s(x, t)_{l,v} = log q_t(x^{l<-v}) / q_t(x)  [B, L, V]; 0 at v = x^l,
        -inf where the move has no rate in either direction."""
        raise NotImplementedError

    def log_reverse_rate(self, out: Tensor, x: Tensor, sigmabar: Tensor, sigma: Tensor) -> Tensor:
        """log Qbar(x -> x^{l<-v}) = log[sigma s(x)_{l,v} Q(v -> x^l)]  (section 1); -inf at v = x^l."""
        return _col(sigma).log() + self.log_score(out, x, sigmabar) + self.rate_in(x).log()

    def log_forward_rate(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log[sigma Q(x^l -> v)], -inf at v = x^l."""
        return _col(sigma).log() + self.rate_out(x).log()

    def predictor_log_probs(self, out, x, noise, t, s) -> Tensor:
        """log P(x_s^l = v | x_t) of one predictor step t -> s < t  [B, L, V]."""
        raise NotImplementedError

    def sample_path(self, x: Tensor, sigmabars: Tensor, n_fixed: int = 0, generator=None) -> Tensor:
        """A latent path z_0..z_T [B, T+1, L] of the forward process run backwards from
        z_T = x on the sampler's grid (sigmabars [T+1], decreasing): the SNIS proposal."""
        z = [x]
        for k in range(len(sigmabars) - 2, -1, -1):
            d = (sigmabars[k] - sigmabars[k + 1]).expand(x.shape[0])
            zk = self.sample_transition(z[-1], d, generator)
            zk[:, :n_fixed] = x[:, :n_fixed]
            z.append(zk)
        return torch.stack(z[::-1], 1)


class Uniform(Graph):
    """Q = (1/n) 1 1^T - I: a token jumps to a uniformly random token (SEDD uniform)."""

    def __init__(self, n: int):
        self.n = self.vocab_size = n
        self.mask_id = None
        self.out_dims = (n,)

    def generator(self, dtype=torch.float64) -> Tensor:
        return torch.full((self.n, self.n), 1.0 / self.n, dtype=dtype) - torch.eye(self.n, dtype=dtype)

    def rate_out(self, x: Tensor) -> Tensor:
        r = torch.full((*x.shape, self.n), 1.0 / self.n, device=x.device, dtype=torch.get_default_dtype())
        return self._offdiag(r, x)

    rate_in = rate_out  # Q is symmetric

    def transition(self, x, sigmabar):
        keep = torch.exp(-_col(sigmabar))  # e^{-sigmabar}: keep the token ...
        return -torch.expm1(-_col(sigmabar)) / self.n + keep * F.one_hot(x, self.n)  # ... else uniform

    def transition_log_prob(self, x, y, sigmabar):
        sb = sigmabar[:, None]
        jump = torch.log(-torch.expm1(-sb)) - math.log(self.n)
        return torch.where(x == y, torch.logaddexp(-sb, jump), jump.expand(x.shape))

    def sample_transition(self, x, sigmabar, generator=None):
        keep = torch.rand(x.shape, device=x.device, generator=generator) < torch.exp(-sigmabar[:, None])
        return torch.where(keep, x, self.sample_prior(x.shape, x.device, generator))

    def sample_prior(self, shape, device, generator=None):
        return torch.randint(self.n, shape, device=device, generator=generator)

    def log_score(self, out, x, sigmabar):
        return out.scatter(-1, x[..., None], 0.0)  # s(x)_{x^l} = 1 by definition

    def predictor_log_probs(self, out, x, noise, t, s):
        # Euler / tau-leaping with the learned reverse rates Qbar(x -> x^{l<-v}) (section 2).
        sigmabar, sigma = noise(t)
        return tau_leap_log_probs(self.log_reverse_rate(out, x, sigmabar, sigma), x, t - s)


class Masked(Graph):
    """Absorbing graph: Q(v -> MASK) = 1, Q(v -> v) = -1, MASK (id n) absorbing (MDLM)."""

    def __init__(self, n: int):
        self.n = n
        self.vocab_size = n + 1
        self.mask_id = n
        self.out_dims = (n, n + 1)

    def generator(self, dtype=torch.float64) -> Tensor:
        Q = torch.zeros(self.n + 1, self.n + 1, dtype=dtype)
        Q[: self.n, self.n] = 1.0
        Q[: self.n, : self.n] -= torch.eye(self.n, dtype=dtype)
        return Q

    def transition(self, x, sigmabar):
        alpha = torch.exp(-_col(sigmabar))  # keep with alpha_t, else MASK
        p = alpha * F.one_hot(x, self.vocab_size)
        p[..., self.mask_id] += -torch.expm1(-sigmabar)[:, None]
        return torch.where((x == self.mask_id)[..., None], F.one_hot(x, self.vocab_size).to(p), p)

    def transition_log_prob(self, x, y, sigmabar):
        sb = sigmabar[:, None].expand(x.shape)
        m = self.mask_id
        lp = torch.where(y == m, torch.log(-torch.expm1(-sb)), -sb)
        lp = torch.where(x == m, torch.where(y == m, 0.0, NEG_INF), torch.where((y == x) | (y == m), lp, NEG_INF))
        return lp

    def sample_transition(self, x, sigmabar, generator=None):
        drop = torch.rand(x.shape, device=x.device, generator=generator) < -torch.expm1(-sigmabar[:, None])
        return x.masked_fill(drop, self.mask_id)

    def sample_prior(self, shape, device, generator=None):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def denoiser_log_probs(self, out: Tensor) -> Tensor:
        """log p_theta(x_0^l = v | x_t) over the n clean tokens [B, L, n]."""
        return out[..., : self.n].log_softmax(-1)

    def log_score(self, out, x, sigmabar):
        # Masked position: s_{l,v} = alpha/(1-alpha) p_theta(v | x_t) = p_theta / expm1(sigmabar) (section 1).
        # An unmasked position has no reverse move, so its scores are never used: -inf.
        masked = (x == self.mask_id)[..., None]
        unmask = self.denoiser_log_probs(out) - _col(torch.expm1(sigmabar)).log()
        unmask = F.pad(unmask, (0, 1), value=0.0)  # s(x)_{MASK} = 1 at a masked position
        return torch.where(masked, unmask, F.one_hot(x, self.vocab_size).to(out).log())

    def predictor_log_probs(self, out, x, noise, t, s):
        # MDLM step (section 2): a masked token becomes v w.p. p_theta(v)(a_s - a_t)/(1 - a_t),
        # stays MASK w.p. (1 - a_s)/(1 - a_t); unmasked tokens are copied (SUBS).
        sb_t, sb_s = _col(noise(t)[0]), _col(noise(s)[0])
        log_1m_at = torch.log(-torch.expm1(-sb_t))
        log_unmask = -sb_s + torch.log(-torch.expm1(sb_s - sb_t)) - log_1m_at
        log_stay = torch.log(-torch.expm1(-sb_s)) - log_1m_at  # -inf at s = 0: the last step unmasks all
        step = torch.cat([self.denoiser_log_probs(out) + log_unmask, log_stay.expand(*x.shape, 1)], -1)
        masked = x == self.mask_id
        step = step.masked_fill(~masked[..., None], NEG_INF)
        return step.scatter_(-1, x[..., None], torch.where(masked[..., None], log_stay, 0.0))

    def sample_path(self, x, sigmabars, n_fixed=0, generator=None):
        # Forward masking times conditioned on "all masked at t = 1", the sampler's start: a
        # position is masked at time t_k iff u (1 - alpha_1) <= 1 - alpha_{t_k}, u ~ U(0, 1].
        # Conditioning changes p_fwd by a factor common to all paths, which SNIS cancels.
        one_m_alpha = -torch.expm1(-sigmabars.to(torch.get_default_dtype()))  # [T+1], 1 - alpha_t
        u = 1.0 - torch.rand(x.shape, device=x.device, generator=generator)
        masked = u[:, None, :] * one_m_alpha[0] <= one_m_alpha[None, :, None]
        masked[:, :, :n_fixed] = False
        masked[:, -1] = False
        return torch.where(masked, self.mask_id, x[:, None, :])


# ---------------------------------------------------------------------------
# 2. Noise schedules (section 1): noise(t) -> (sigmabar(t), sigma(t) = d sigmabar / dt).
# ---------------------------------------------------------------------------


class LogLinear:
    """sigmabar(t) = -log(1 - (1 - eps) t), i.e. alpha_t = 1 - (1 - eps) t (MDLM, DNA)."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        c = 1.0 - self.eps
        return -torch.log1p(-c * t), c / (1.0 - c * t)


class Geometric:
    """sigmabar(t) = sigma_min^{1-t} sigma_max^t (SEDD uniform)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigmabar = self.sigma_min ** (1 - t) * self.sigma_max ** t
        return sigmabar, sigmabar * math.log(self.sigma_max / self.sigma_min)


def time_grid(steps: int, device=None) -> Tensor:
    """t_0 = 1 > t_1 > ... > t_T = 0, uniform: the sampler's grid."""
    return torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.get_default_dtype())


# ---------------------------------------------------------------------------
# 3. Samplers (sections 2 and 7).
# ---------------------------------------------------------------------------


def model_output(model: nn.Module, graph: Graph, x: Tensor, sigmabar: Tensor) -> Tensor:
    """model(x, sigmabar), checked: a wrong shape is an error, never a silent broadcast."""
    out = model(x, sigmabar)
    B, L = x.shape
    if not (isinstance(out, Tensor) and out.dim() == 3 and tuple(out.shape[:2]) == (B, L)
            and out.shape[2] in graph.out_dims):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = " or ".join(f"[{B}, {L}, {v}]" for v in graph.out_dims)
        raise ValueError(f"model returned {shape}; {type(graph).__name__}({graph.n}) needs {want}")
    return out


def tau_leap_log_probs(log_rate: Tensor, x: Tensor, dt: Tensor) -> Tensor:
    """One tau-leaping step per token with total leaving rate lambda = sum_v rate_v:
    P(stay) = exp(-lambda dt), P(x^l -> v) = (1 - exp(-lambda dt)) rate_v / lambda.
    To first order this is section 2's P = dt * rate; unlike the clamped form it never needs
    renormalising and gives every move a positive probability, which SNIS (section 4) needs."""
    log_rate = log_rate.scatter(-1, x[..., None], NEG_INF)
    log_lam = torch.logsumexp(log_rate, -1, keepdim=True)
    lam_dt = (log_lam + _col(dt).log()).exp()
    # log(1 - e^{-lam dt}); the clamp keeps autograd finite where a token has no move at all
    log_leave = torch.log((-torch.expm1(-lam_dt)).clamp(min=_tiny(lam_dt)))
    log_jump = log_rate - log_lam.clamp(min=torch.finfo(log_lam.dtype).min)  # a token with no move: -inf
    return (log_jump + log_leave).scatter(-1, x[..., None], -lam_dt)


def predictor_log_probs(model, graph: Graph, noise, x: Tensor, t: Tensor, s: Tensor,
                        n_fixed: int = 0) -> Tensor:
    """log P_theta(x_s = . | x_t) of one predictor step (t, s: [B]) at the free positions
    [B, L - n_fixed, V]; the n_fixed prefix tokens are copied, so they are never computed."""
    out = model_output(model, graph, x, noise(t)[0])
    return graph.predictor_log_probs(out[:, n_fixed:], x[:, n_fixed:], noise, t, s)


def corrector_log_probs(model, graph: Graph, noise, x: Tensor, t: Tensor, dtau: Tensor,
                        n_fixed: int = 0) -> Tensor:
    """One tau-leaping step of the gradient-flow generator G_t = Q_t + Qbar_theta,t (section 7)
    at the free positions [B, L - n_fixed, V]. G_t is reversible for q_t^theta, so the step
    moves the samples towards q_t^theta."""
    sigmabar, sigma = noise(t)
    out, x = model_output(model, graph, x, sigmabar)[:, n_fixed:], x[:, n_fixed:]
    log_rate = torch.logaddexp(graph.log_forward_rate(x, sigma), graph.log_reverse_rate(out, x, sigmabar, sigma))
    return tau_leap_log_probs(log_rate, x, dtau)


def sample_categorical(logp: Tensor, generator=None) -> Tensor:
    """Gumbel-max draw from log-probabilities over the last dim (entries may be -inf)."""
    u = torch.rand(logp.shape, device=logp.device, dtype=logp.dtype, generator=generator)
    return (logp - torch.log(-torch.log(u.clamp(min=_tiny(u))))).argmax(-1)


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    if p is None:
        p = next(iter(model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _prefix_rows(prefix: Optional[Tensor], num_samples: int, device) -> Optional[Tensor]:
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix, device=device).long()
    if prefix.dim() == 1:
        prefix = prefix.expand(num_samples, -1)
    if prefix.dim() != 2 or prefix.shape[0] != num_samples:
        raise ValueError(f"prefix must be [Lp] or [{num_samples}, Lp], got {tuple(prefix.shape)}")
    return prefix


@torch.no_grad()
def rollout(model, graph: Graph, noise, num_samples: int, length: int, steps: int = 128,
            corrector_steps: int = 0, prefix: Optional[Tensor] = None, generator=None,
            keep_last: int = 0) -> tuple[Tensor, Tensor]:
    """Run the reverse chain from the prior; returns (x_0 [B, L], the predictor's input
    states of the last `keep_last` steps [B, keep_last, L], for the path KL)."""
    device = _device(model)
    prefix = _prefix_rows(prefix, num_samples, device)
    n_fixed = 0 if prefix is None else prefix.shape[1]
    if n_fixed > length:
        raise ValueError(f"prefix of length {n_fixed} does not fit in length {length}")
    x = graph.sample_prior((num_samples, length), device, generator)
    if n_fixed:
        x[:, :n_fixed] = prefix
    fixed = x[:, :n_fixed]  # copied through every step; only the free positions are sampled
    ts, kept = time_grid(steps, device), []
    for k in range(steps):
        t, s = ts[k].expand(num_samples), ts[k + 1].expand(num_samples)
        if k >= steps - keep_last:
            kept.append(x)
        x = torch.cat([fixed, sample_categorical(predictor_log_probs(model, graph, noise, x, t, s, n_fixed),
                                                 generator)], 1)
        if k < steps - 1:  # no corrector at t = 0, where the masked scores are infinite
            for _ in range(corrector_steps):
                x = torch.cat([fixed, sample_categorical(
                    corrector_log_probs(model, graph, noise, x, s, t - s, n_fixed), generator)], 1)
    states = torch.stack(kept, 1) if kept else x.new_empty(num_samples, 0, length)
    return x, states


def sample(model, graph: Graph, noise, num_samples: int, length: int, steps: int = 128,
           corrector_steps: int = 0, prefix: Optional[Tensor] = None, generator=None) -> Tensor:
    """x ~ pi_theta = q_0^theta: `steps` predictor steps, each followed by `corrector_steps`
    gradient-flow corrector steps ("SEPO with GF"). prefix [Lp] or [B, Lp] is kept as is."""
    return rollout(model, graph, noise, num_samples, length, steps, corrector_steps, prefix, generator)[0]


# ---------------------------------------------------------------------------
# 4. Pre-training losses (section 1) and the ELBO.
# ---------------------------------------------------------------------------

T_MIN = 1e-3  # lowest training time: the masked weight 1/t and the uniform ratios blow up at 0


def _nelbo_integrand(model, graph: Graph, noise, x0: Tensor, t: Tensor, prefix_len: int,
                     generator=None) -> Tensor:
    """Per-sequence integrand of the negative ELBO at times t [B] (nats per unit time)."""
    sigmabar, sigma = noise(t)
    xt = graph.sample_transition(x0, sigmabar, generator)
    xt[:, :prefix_len] = x0[:, :prefix_len]
    out = model_output(model, graph, xt, sigmabar)
    if isinstance(graph, Masked):
        # MDLM: sigma alpha/(1 - alpha) * sum over masked l of -log p_theta(x0^l | x_t)
        nll = -graph.denoiser_log_probs(out).gather(-1, x0[..., None]).squeeze(-1)
        per_tok = nll * (xt == graph.mask_id)
        weight = sigma / torch.expm1(sigmabar)
    else:
        per_tok = score_entropy(graph, graph.log_score(out, xt, sigmabar), xt, x0, sigmabar)
        weight = sigma
    return weight * per_tok[:, prefix_len:].sum(-1)


def score_entropy(graph: Graph, log_s: Tensor, xt: Tensor, x0: Tensor, sigmabar: Tensor) -> Tensor:
    """Denoising score entropy per position [B, L] (SEDD):
    sum_{v != x_t} Q(v -> x_t)[s_v - r_v log s_v + r_v (log r_v - 1)], r_v = p_{t|0}(v|x0)/p_{t|0}(x_t|x0).
    Non-negative, zero iff s = r."""
    p = graph.transition(x0, sigmabar)
    r = p / p.gather(-1, xt[..., None])
    w = graph.rate_in(xt)
    terms = log_s.exp() - r * log_s + torch.xlogy(r, r) - r
    return torch.where(w > 0, w * terms, 0.0).sum(-1)


def _times(batch: int, device, generator=None) -> Tensor:
    # antithetic (stratified) times in [T_MIN, 1]: lower-variance ELBO estimates (MDLM)
    u = (torch.rand((), device=device, generator=generator) + torch.arange(batch, device=device) / batch) % 1
    return T_MIN + (1 - T_MIN) * u.to(torch.get_default_dtype())


def pretrain_loss(model, graph: Graph, noise, x0: Tensor, prefix_len: int = 0, generator=None) -> Tensor:
    """Monte-Carlo NELBO in nats per token: denoising score entropy for Uniform, the MDLM
    weighted cross-entropy (score entropy of the absorbing graph) for Masked."""
    t = _times(x0.shape[0], x0.device, generator)
    nelbo = _nelbo_integrand(model, graph, noise, x0, t, prefix_len, generator)
    return nelbo.mean() / max(x0.shape[1] - prefix_len, 1)


@torch.no_grad()
def elbo(model, graph: Graph, noise, x0: Tensor, num_t: int = 16, prefix_len: int = 0,
         generator=None) -> Tensor:
    """Evidence lower bound on log pi(x0) in nats per sequence [B], averaged over num_t
    stratified times in [T_MIN, 1] (prior and t < T_MIN terms, both ~0, left out)."""
    B = x0.shape[0]
    t = _times(B * num_t, x0.device, generator).view(num_t, B)
    return -torch.stack([_nelbo_integrand(model, graph, noise, x0, tj, prefix_len, generator)
                         for tj in t]).mean(0)


# ---------------------------------------------------------------------------
# 5. SEPO: the pieces of the policy gradient.
# ---------------------------------------------------------------------------


def log_pi_surrogate(model, graph: Graph, noise, x: Tensor, t_eval: float, n_fixed: int = 0,
                     positions: int = 16, generator=None) -> Tensor:
    """psi(x) [B] whose gradient is the SEPO estimate of grad log pi_theta(x): the gradient of the
    log pseudo-likelihood sum_l log q(x^l | x^{-l}) (section 3, T2).

    Uniform: one pass at the clean x, t_eval; with detached w_{l,v} = q(v | x^{-l}) = softmax_v log s,
        psi = - sum_l sum_{v != x^l} w_{l,v} log s_theta(x)_{l,v}.
    Masked: q(v | x^{-l}) is the denoiser at x^{l<-MASK}, so psi = sum_l log p_theta(x^l | x^{l<-MASK});
        `positions` random positions per sample (one pass each, batched) scaled by L / P: unbiased.
    """
    B, L = x.shape
    free = L - n_fixed
    if B == 0 or free == 0:
        return x.new_zeros(B, dtype=torch.get_default_dtype())
    t = torch.full((B,), t_eval, device=x.device, dtype=torch.get_default_dtype())
    sigmabar = noise(t)[0]
    if isinstance(graph, Masked):
        P = min(positions, free)
        pos = torch.rand(B, free, device=x.device, generator=generator).argsort(-1)[:, :P] + n_fixed
        xm = x[:, None, :].repeat(1, P, 1)
        xm.scatter_(-1, pos[..., None], graph.mask_id)
        out = model_output(model, graph, xm.view(B * P, L), sigmabar.repeat_interleave(P))
        out = out.view(B, P, L, -1).gather(2, pos[..., None, None].expand(B, P, 1, out.shape[-1])).squeeze(2)
        logp = graph.denoiser_log_probs(out)  # [B, P, n]: the denoiser at the masked position only
        return logp.gather(-1, x.gather(1, pos)[..., None]).squeeze(-1).sum(-1) * (free / P)
    log_s = graph.log_score(model_output(model, graph, x, sigmabar), x, sigmabar)[:, n_fixed:]
    w = log_s.detach().softmax(-1)  # includes v = x^l, where log s = 0 carries no gradient
    return -(w * log_s).sum((-1, -2))


def path_log_prob(model, graph: Graph, noise, paths: Tensor, n_fixed: int = 0,
                  chunk_size: int = 1024) -> Tensor:
    """log P_theta(z_0..z_T) = sum_k log P_theta(z_{k+1} | z_k) under the predictor  [N], no grad,
    up to the prior term, which is the same for every path and model (section 4)."""
    N, T1, L = paths.shape
    T = T1 - 1
    ts = time_grid(T, paths.device)
    z, z_next = paths[:, :-1].reshape(N * T, L), paths[:, 1:].reshape(N * T, L)
    t, s = ts[:-1].repeat(N), ts[1:].repeat(N)
    out = torch.empty(N * T, device=paths.device, dtype=torch.get_default_dtype())
    with torch.no_grad():
        for i in range(0, N * T, chunk_size):
            j = slice(i, i + chunk_size)
            logp = predictor_log_probs(model, graph, noise, z[j], t[j], s[j], n_fixed)
            out[j] = logp.gather(-1, z_next[j][:, n_fixed:, None]).squeeze(-1).sum(-1)
    return out.view(N, T).sum(1)


def forward_path_log_prob(graph: Graph, noise, paths: Tensor) -> Tensor:
    """log p_fwd(z_0..z_{T-1} | z_T = x) = sum_k log p(z_k | z_{k+1}) of the forward process  [N]."""
    N, T1, _ = paths.shape
    sb = noise(time_grid(T1 - 1, paths.device))[0]
    d = (sb[:-1] - sb[1:]).repeat(N)
    lp = graph.transition_log_prob(paths[:, 1:].flatten(0, 1), paths[:, :-1].flatten(0, 1), d)
    return lp.sum(-1).view(N, T1 - 1).sum(1)


def snis_log_ratio(logp_new: Tensor, logp_old: Tensor, logq: Tensor) -> Tensor:
    """log r_hat(x) = log sum_m wbar_m P_new(z_m, x)/P_old(z_m, x), wbar ~ P_old(z_m, x)/p_fwd(z_m | x)
    (section 4); inputs [B, M]. Equals LSE_m(logp_new - logq) - LSE_m(logp_old - logq)."""
    return torch.logsumexp(logp_new - logq, -1) - torch.logsumexp(logp_old - logq, -1)


def grpo_advantages(reward: Tensor, group_size: int) -> Tensor:
    """A = (R - mean_group) / (std_group + 1e-8) (section 5). Population std: a zero-spread group
    (or a group of one) gets A = 0, not NaN."""
    if reward.numel() == 0:
        return reward
    r = reward.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-8)).view(-1)


def ppo_advantages(reward: Tensor, baseline: Optional[float | Tensor] = None, normalize: bool = False) -> Tensor:
    """A = R - b, b = batch mean unless given (a running mean, or a per-sample prompt value, say);
    optionally A / std (section 5)."""
    if reward.numel() == 0:
        return reward
    adv = reward - (reward.mean() if baseline is None else baseline)
    if normalize:
        adv = adv / (adv.std(unbiased=False) + 1e-8)
    return adv


def clipped_surrogate(psi: Tensor, log_ratio: Tensor, adv: Tensor, clip_eps: float = 0.2
                      ) -> tuple[Tensor, Tensor]:
    """Per-sample PPO clipping (paper Eq. 9, section 5) as a loss whose gradient is -grad l_A:
        L = -mean_b 1[active_b] A_b r_b psi_b,  grad psi_b = grad log pi_theta(x_b),
    r_b detached; inactive where the min picks the clipped branch (A > 0, r > 1 + eps or
    A < 0, r < 1 - eps). Returns (loss, fraction clipped)."""
    if psi.numel() == 0:
        return psi.sum(), psi.new_zeros(())
    ratio = log_ratio.detach().exp()
    clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
    loss = -(torch.where(clipped, 0.0, adv * ratio) * psi).mean()
    return loss, clipped.to(psi.dtype).mean()


def path_kl(model, ref_model, graph: Graph, noise, states: Tensor, steps: int, n_fixed: int = 0,
            chunk_size: int = 1024) -> Tensor:
    """Path KL between the fine-tuned and reference reverse chains over the last k steps [B]
    (section 6): sum_k sum_l KL(P_theta(. | z_k) || P_ref(. | z_k)) at the rollout states
    states [B, k, L] (detached), with the gradient through P_theta only."""
    B, k, L = states.shape
    if B * k == 0:
        return states.new_zeros(B, dtype=torch.get_default_dtype())
    ts = time_grid(steps, states.device)[-k - 1:]
    z = states.flatten(0, 1)
    t, s = ts[:-1].repeat(B), ts[1:].repeat(B)
    kl = []
    for i in range(0, B * k, chunk_size):
        j = slice(i, i + chunk_size)
        logp = predictor_log_probs(model, graph, noise, z[j], t[j], s[j], n_fixed)
        with torch.no_grad():
            logq = predictor_log_probs(ref_model, graph, noise, z[j], t[j], s[j], n_fixed)
        diff = (logp - logq).masked_fill(~torch.isfinite(logp), 0.0)  # 0 log 0 = 0, NaN-free grads
        kl.append((logp.exp() * diff).sum((-1, -2)))
    return torch.cat(kl).view(B, k).sum(1)


def check_reward(reward, batch: int) -> Tensor:
    """The reward as a float tensor [batch]; a wrong shape or a NaN/inf is an error naming the culprit."""
    reward = torch.as_tensor(reward).detach()
    if reward.shape != (batch,):
        raise ValueError(f"reward_fn returned shape {tuple(reward.shape)}, expected [{batch}]")
    bad = (~torch.isfinite(reward)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward_fn returned non-finite values for samples {bad[:10]}"
                         f"{' ...' if len(bad) > 10 else ''}: {reward[bad[:10]].tolist()}")
    return reward.to(torch.get_default_dtype())


# ---------------------------------------------------------------------------
# 6. The trainer: Algorithm 1 (sample from pi_old, reward, advantages, K epochs of the
#    clipped objective with SNIS ratios, KL to the reference, update old).
# ---------------------------------------------------------------------------


@dataclass
class SEPOConfig:
    """Defaults are the paper's DNA settings (SEPO_MATH section 10)."""

    lr: float = 1e-4
    batch_size: int = 8          # groups (prompts) per iteration
    group_size: int = 8          # G samples per group; batch_size * group_size sequences per iteration
    epochs: int = 2              # K gradient steps on each batch
    clip_eps: float = 0.2        # eps of the clipped objective
    kl_coef: float = 0.05        # alpha
    kl_steps: int = 10           # path KL over the last kl_steps sampler steps
    snis_samples: int = 4        # M latent paths per sample for the importance ratio
    steps: int = 128             # T sampler steps
    corrector_steps: int = 0     # gradient-flow corrector steps after each predictor step
    advantage: str = "grpo"      # "grpo" (group-normalised) or "ppo" (R - baseline)
    baseline: str = "batch"      # ppo baseline: "batch" mean, "running" mean, or "group" (prompt) mean
    baseline_momentum: float = 0.9
    normalize_adv: bool = False  # ppo: divide A by its batch std
    pl_positions: int = 16       # masked graph: positions per sample in grad log pi (section 3)
    t_eval: Optional[float] = None  # time of the score pass in grad log pi; None = 1 / steps
    max_grad_norm: float = 1.0
    kl_reference: str = "pretrained"  # or "previous": the policy at the start of each iteration
    chunk_size: int = 1024       # sequences per batched no-grad forward pass
    seed: int = 0

    def __post_init__(self):
        if self.advantage not in ("grpo", "ppo"):
            raise ValueError(f"advantage must be 'grpo' or 'ppo', got {self.advantage!r}")
        if self.baseline not in ("batch", "running", "group"):
            raise ValueError(f"baseline must be 'batch', 'running' or 'group', got {self.baseline!r}")
        if self.kl_reference not in ("pretrained", "previous"):
            raise ValueError(f"kl_reference must be 'pretrained' or 'previous', got {self.kl_reference!r}")
        for name in ("batch_size", "group_size", "epochs", "snis_samples", "steps", "pl_positions", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.kl_steps <= self.steps:
            raise ValueError(f"kl_steps must be in [0, steps={self.steps}], got {self.kl_steps}")


class SEPO:
    """Score Entropy Policy Optimization (Algorithm 1) for a masked or uniform diffusion model.

    reward_fn(x [B, L]) -> [B] is a black box (never differentiated). prompt_fn(num_prompts,
    generator) -> [num_prompts, Lp], optional, gives fixed prefixes; each is shared by the
    group_size samples of one group and is part of the sequences passed to reward_fn.
    """

    def __init__(self, model: nn.Module, graph: Graph, noise, reward_fn: Callable[[Tensor], Tensor],
                 length: int, cfg: Optional[SEPOConfig] = None, ref_model: Optional[nn.Module] = None,
                 prompt_fn: Optional[Callable[[int, torch.Generator], Tensor]] = None):
        self.cfg = cfg = cfg or SEPOConfig()
        self.model, self.graph, self.noise = model.eval(), graph, noise  # eval: no dropout, so r = 1 at epoch 0
        self.reward_fn, self.length, self.prompt_fn = reward_fn, length, prompt_fn
        self.ref_model = (ref_model if ref_model is not None else copy.deepcopy(model)).eval().requires_grad_(False)
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.device = _device(model)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)
        self.prompt_gen = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0
        self.running_baseline: Optional[float] = None

    def _advantages(self, reward: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.advantage == "grpo":
            return grpo_advantages(reward, cfg.group_size)
        baseline = None
        if cfg.baseline == "group":  # Monte-Carlo value of the group's prompt; A = R - V(prompt)
            baseline = reward.view(-1, cfg.group_size).mean(1).repeat_interleave(cfg.group_size)
        elif cfg.baseline == "running":
            m, mean = cfg.baseline_momentum, reward.mean().item()
            baseline = self.running_baseline if self.running_baseline is not None else mean
            self.running_baseline = m * baseline + (1 - m) * mean
        return ppo_advantages(reward, baseline, cfg.normalize_adv)

    def step(self) -> dict:
        """One iteration of Algorithm 1; returns its statistics."""
        cfg, model, graph, noise = self.cfg, self.model, self.graph, self.noise
        B, M = cfg.batch_size * cfg.group_size, cfg.snis_samples
        tic = time.perf_counter()
        if cfg.kl_reference == "previous":
            self.ref_model.load_state_dict(model.state_dict())

        # 1. Roll out pi_old (the current weights) and score the samples.
        prefix = None
        if self.prompt_fn is not None:
            prompts = torch.as_tensor(self.prompt_fn(cfg.batch_size, self.prompt_gen)).long().to(self.device)
            if prompts.dim() != 2 or prompts.shape[0] != cfg.batch_size:
                raise ValueError(f"prompt_fn returned {tuple(prompts.shape)}, expected [{cfg.batch_size}, Lp]")
            prefix = prompts.repeat_interleave(cfg.group_size, 0)
        n_fixed = 0 if prefix is None else prefix.shape[1]
        x, states = rollout(model, graph, noise, B, self.length, cfg.steps, cfg.corrector_steps,
                            prefix, self.gen, keep_last=cfg.kl_steps)
        reward = check_reward(self.reward_fn(x), B).to(self.device)
        adv = self._advantages(reward)
        t_sample = time.perf_counter() - tic

        # 2. Latent paths for the SNIS ratio (section 4), shared by old and new (common random
        #    numbers). Only epochs after the first need a ratio.
        if cfg.epochs > 1:
            sigmabars = noise(time_grid(cfg.steps, self.device))[0]
            paths = graph.sample_path(x.repeat_interleave(M, 0), sigmabars, n_fixed, self.gen)
            logq = forward_path_log_prob(graph, noise, paths).view(B, M)
            logp_old = path_log_prob(model, graph, noise, paths, n_fixed, cfg.chunk_size).view(B, M)
        t_eval = cfg.t_eval if cfg.t_eval is not None else 1.0 / cfg.steps

        # 3. K epochs of the clipped objective.
        for epoch in range(cfg.epochs):
            if epoch == 0:
                log_ratio = torch.zeros_like(reward)  # theta == theta_old: r = 1 exactly
            else:
                logp_new = path_log_prob(model, graph, noise, paths, n_fixed, cfg.chunk_size).view(B, M)
                log_ratio = snis_log_ratio(logp_new, logp_old, logq)
            psi = log_pi_surrogate(model, graph, noise, x, t_eval, n_fixed, cfg.pl_positions, self.gen)
            pg_loss, clip_frac = clipped_surrogate(psi, log_ratio, adv, cfg.clip_eps)
            kl = path_kl(model, self.ref_model, graph, noise, states, cfg.steps, n_fixed, cfg.chunk_size)
            loss = pg_loss + cfg.kl_coef * kl.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            self.opt.step()

        self.iteration += 1
        ratio = log_ratio.exp()
        return {
            "iteration": self.iteration,
            "reward_mean": reward.mean().item(),
            "reward_std": reward.std(unbiased=False).item(),
            "kl": kl.mean().item(),
            "clip_frac": clip_frac.item(),
            "loss": loss.item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_max": ratio.max().item(),
            "ratio_min": ratio.min().item(),
            "grad_norm": float(grad_norm),
            "time_sample": t_sample,
            "time": time.perf_counter() - tic,
        }

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: weights, reference, optimizer, RNG streams."""
        return {
            "model": self.model.state_dict(),
            "ref_model": self.ref_model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "iteration": self.iteration,
            "running_baseline": self.running_baseline,
            "gen": self.gen.get_state(),
            "prompt_gen": self.prompt_gen.get_state(),
            "cfg": asdict(self.cfg),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.ref_model.load_state_dict(sd["ref_model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.iteration = sd["iteration"]
        self.running_baseline = sd["running_baseline"]
        self.gen.set_state(sd["gen"])
        self.prompt_gen.set_state(sd["prompt_gen"])
