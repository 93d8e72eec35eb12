"""SEPO: Score Entropy Policy Optimization, in one file.

Policy-gradient fine-tuning of discrete diffusion models against black-box rewards (Zekri & Boulle,
"Fine-Tuning Discrete Diffusion Models with Policy Gradient Methods", NeurIPS 2025, arXiv 2502.01384).
Read top to bottom, in dependency order; docs/math.md derives every formula ("math §n" below):

    1. CTMC graphs (uniform, masked)               math §1 (SEDD, MDLM)
    2. noise schedules                             math §1
    3. samplers: predictor + corrector             math §2, §8 (the corrector: Maas 2011)
    4. pre-training losses and the ELBO            math §1
    5. SEPO pieces: grad log pi                    math §3 (Theorem 3.1; T2) and §4 (path gradients)
                    importance ratios              math §5 (SNIS; the rollout path)
                    clipped objective, advantages  math §6 (Eq. (9))
                    truncated path KL              math §7
    6. the trainer                                 Algorithm 1

Conventions. x: LongTensor[B, L] of token ids. A model is any nn.Module with model(x, sigma) ->
Tensor[B, L, V], where sigma[B] is the total noise sigmabar(t) of each row. Uniform graph: V = n log
concrete scores. Masked graph: V = n or n + 1 denoiser logits (a MASK column is ignored). The first
`n_fixed` positions of a sequence may be a prompt: never noised, never changed, never computed.
Log-probabilities and their sums are fp32 or better whatever the model's dtype. Depends on torch only.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  imported before any init_process_group: docs/design.md, "Exit"
import torch.nn.functional as F
from torch import Tensor, nn

NEG_INF = float("-inf")


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def _col(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1], to broadcast a per-row scalar over [B, L, V]."""
    return v[:, None, None]


# === 1. CTMC graphs (math §1). One class per per-token generator Q, SEDD style. ==================


class Graph:
    """A CTMC on V^L whose tokens are noised independently by a generator Q (Q[i, j]: rate of i -> j).

    Neighbours of x are the Hamming-1 moves x^{l<-v}; per position l the rate methods give a vector over
    the token v of the move x^l -> v, in closed form (nothing of size V^2 is built; toy_ctmc.generator
    is the dense Q). Each graph implements, for x, y [B, L] and sigmabar, sigma, t, s [B]:

      transition(x, sigmabar)             p_{t|0}(v | x^l) = exp(sigmabar Q)[x^l, v]        [B, L, V]
      transition_log_prob(x, y, sigmabar) log exp(sigmabar Q)[x^l, y^l]                     [B, L]
      sample_transition(x, sigmabar)      x_t ~ p_{t|0}(. | x), forward noising             [B, L]
      sample_prior(shape, device)         x_1 from the limit of the forward process         [B, L]
      log_score(out, x, sigmabar)         log s(x, t)_{l,v} = log q_t(x^{l<-v}) / q_t(x); 0 at v = x^l,
                                          -inf where the move has no rate either way        [B, L, V]
      log_reverse_rate(out, x, sigmabar, sigma)  log Qbar(x -> x^{l<-v}) = log[sigma s_{l,v} Q(v -> x^l)]
      log_forward_rate(x, sigma)          log[sigma Q(x^l -> v)], broadcastable to          [B, L, V]
      predictor_log_probs(out, x, noise, t, s, y=None)  log P(x_s^l = v | x_t), one sampler step t -> s
                                          [B, L, V]; given y, only the entries at y         [B, L]

    The rates' entry v = x^l is not a move and is left unspecified (tau-leaping overwrites it).
    """

    n: int           # number of real tokens
    vocab_size: int  # n, or n + 1 with a MASK token
    mask_id: Optional[int] = None
    out_dims: tuple[int, ...]  # accepted last dims of a model output

    def sample_path(self, x: Tensor, sigmabars: Tensor, n_fixed: int = 0, generator=None) -> Tensor:
        """A latent path z_0..z_T [B, T+1, L] of the forward process run backwards from z_T = x on the
        sampler's grid (sigmabars [T+1], decreasing): the SNIS proposal (math §5)."""
        z = [x]
        for k in range(len(sigmabars) - 2, -1, -1):
            dsigma = (sigmabars[k] - sigmabars[k + 1]).expand(x.shape[0])
            zk = self.sample_transition(z[-1], dsigma, generator)
            zk[:, :n_fixed] = x[:, :n_fixed]
            z.append(zk)
        return torch.stack(z[::-1], 1)


class Uniform(Graph):
    """Q = (1/n) 1 1^T - I: a token jumps to a uniformly random token (SEDD uniform)."""

    def __init__(self, n: int):
        self.n, self.vocab_size, self.out_dims = n, n, (n,)

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

    def log_reverse_rate(self, out, x, sigmabar, sigma):
        return out + _col(sigma / self.n).log()  # Q(v -> x^l) = 1/n off the diagonal

    def log_forward_rate(self, x, sigma):
        return _col(sigma / self.n).log()  # a scalar per row: no [B, L, V] tensor of 1/n

    def predictor_log_probs(self, out, x, noise, t, s, y=None):
        # Euler / tau-leaping with the learned reverse rates Qbar(x -> x^{l<-v}) (math §2).
        sigmabar, sigma = noise(t)
        return tau_leap_log_probs(self.log_reverse_rate(out, x, sigmabar, sigma), x, t - s, y)


class Masked(Graph):
    """Absorbing graph: Q(v -> MASK) = 1, Q(v -> v) = -1, MASK (id n) absorbing (MDLM)."""

    def __init__(self, n: int):
        self.n, self.vocab_size, self.mask_id, self.out_dims = n, n + 1, n, (n, n + 1)  # MASK: the last id

    def transition(self, x, sigmabar):
        p = torch.exp(-_col(sigmabar)) * F.one_hot(x, self.vocab_size)  # keep with alpha_t, else MASK
        p[..., self.mask_id] += -torch.expm1(-sigmabar)[:, None]
        return torch.where((x == self.mask_id)[..., None], F.one_hot(x, self.vocab_size).to(p), p)

    def transition_log_prob(self, x, y, sigmabar):
        sb, m = sigmabar[:, None].expand(x.shape), self.mask_id
        lp = torch.where(y == m, torch.log(-torch.expm1(-sb)), -sb)  # masked with 1 - alpha, kept with alpha
        from_real = torch.where((y == x) | (y == m), lp, NEG_INF)
        return torch.where(x == m, torch.where(y == m, 0.0, NEG_INF), from_real)

    def sample_transition(self, x, sigmabar, generator=None):
        drop = torch.rand(x.shape, device=x.device, generator=generator) < -torch.expm1(-sigmabar[:, None])
        return x.masked_fill(drop, self.mask_id)

    def sample_prior(self, shape, device, generator=None):
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    def denoiser_log_probs(self, out: Tensor) -> Tensor:
        """log p_theta(x_0^l = v | x_t) over the n clean tokens [..., n]."""
        return out[..., : self.n].log_softmax(-1)

    def log_score(self, out, x, sigmabar):
        # Masked position: s_{l,v} = alpha/(1-alpha) p_theta(v | x_t) = p_theta / expm1(sigmabar) (math §1).
        # An unmasked position has no reverse move, so its scores are never used: -inf.
        masked = (x == self.mask_id)[..., None]
        unmask = self.denoiser_log_probs(out) - _col(torch.expm1(sigmabar)).log()
        unmask = F.pad(unmask, (0, 1), value=0.0)  # s(x)_{MASK} = 1 at a masked position
        return torch.where(masked, unmask, F.one_hot(x, self.vocab_size).to(out).log())

    def log_reverse_rate(self, out, x, sigmabar, sigma):
        # Q(v -> MASK) = 1 for every real v, and log_score is -inf wherever Q(v -> x^l) = 0 off the diagonal
        return self.log_score(out, x, sigmabar) + _col(sigma).log()

    def log_forward_rate(self, x, sigma):
        is_mask = torch.arange(self.vocab_size, device=x.device) == self.mask_id
        to_mask = (x != self.mask_id)[..., None] & is_mask
        return torch.where(to_mask, _col(sigma).log(), NEG_INF)  # only real token -> MASK, at rate sigma

    @staticmethod
    def step_coefficients(noise, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """(log (a_s - a_t)/(1 - a_t), log (1 - a_s)/(1 - a_t)) [B, 1] of the MDLM step t -> s: unmasking
        to v has probability p_theta(v) times the first, staying masked the second (-inf at s = 0)."""
        sb_t, sb_s = noise(t)[0][:, None], noise(s)[0][:, None]
        log_1m_at = torch.log(-torch.expm1(-sb_t))
        log_unmask = -sb_s + torch.log(-torch.expm1(sb_s - sb_t)) - log_1m_at
        return log_unmask, torch.log(-torch.expm1(-sb_s)) - log_1m_at

    def predictor_log_probs(self, out, x, noise, t, s, y=None):
        # MDLM step (math §2): a masked token becomes v w.p. p_theta(v)(a_s - a_t)/(1 - a_t), stays MASK
        # w.p. (1 - a_s)/(1 - a_t); unmasked tokens are copied (SUBS). The last step (s = 0) unmasks all.
        log_unmask, log_stay = self.step_coefficients(noise, t, s)
        masked = x == self.mask_id
        if y is None:
            step = torch.cat([self.denoiser_log_probs(out) + log_unmask[..., None],
                              log_stay[..., None].expand(*x.shape, 1)], -1)
            step = step.masked_fill(~masked[..., None], NEG_INF)
            return step.scatter_(-1, x[..., None], torch.where(masked, log_stay, 0.0)[..., None])
        # At y only the unmasked positions read the model, through one logsumexp each. With out=None
        # this is the model-free part, exact for a row where no position is unmasked.
        unmask = masked & (y != self.mask_id)
        lp = torch.where(masked, torch.where(unmask, log_unmask, log_stay), torch.where(y == x, 0.0, NEG_INF))
        if out is None or not unmask.any():
            return lp
        o = out[unmask]  # [K, V]: the unmasked positions only
        logp = o.gather(-1, y[unmask][:, None]).squeeze(-1) - o[:, : self.n].logsumexp(-1)
        return lp.masked_scatter(unmask, lp[unmask] + logp)

    def sample_path(self, x, sigmabars, n_fixed=0, generator=None):
        # Forward masking times given "all masked at t = 1", the sampler's start: masked at t_k iff
        # u (1 - alpha_1) <= 1 - alpha_{t_k}, u ~ U(0, 1]. SNIS cancels the conditioning (common to all
        # paths).
        one_m_alpha = -torch.expm1(-sigmabars.to(torch.get_default_dtype()))  # [T+1], 1 - alpha_t
        u = 1.0 - torch.rand(x.shape, device=x.device, generator=generator)
        masked = u[:, None, :] * one_m_alpha[0] <= one_m_alpha[None, :, None]
        masked[:, :, :n_fixed] = False
        masked[:, -1] = False
        return torch.where(masked, self.mask_id, x[:, None, :])


# === 2. Noise schedules (math §1): noise(t) -> (sigmabar(t), sigma(t) = d sigmabar / dt). ========


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


def sampler_schedule(steps: int, corrector_steps: int = 0, device=None) -> tuple[Tensor, Tensor, list[bool]]:
    """The sampler's transitions in order: predictor t_k -> t_{k+1}, then (for k < T - 1)
    `corrector_steps` corrector steps at t_{k+1} of length t_k - t_{k+1}. Returns (t [S], a [S],
    is_corrector [S]) with a = the predictor's target time s or the corrector's dtau."""
    if steps < 1 or corrector_steps < 0:
        raise ValueError(f"need steps >= 1 and corrector_steps >= 0, got {steps} and {corrector_steps}")
    ts, rows = time_grid(steps, device), []
    for k in range(steps):
        rows.append((ts[k], ts[k + 1], False))
        rows += [(ts[k + 1], ts[k] - ts[k + 1], True)] * (corrector_steps if k < steps - 1 else 0)
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), [r[2] for r in rows]


# === 3. Samplers (math §2 and §8). ===============================================================


def model_output(model: nn.Module, graph: Graph, x: Tensor, sigmabar: Tensor) -> Tensor:
    """model(x, sigmabar) in fp32 or better (a bf16 model or autocast never gives bf16 log-probs),
    checked: a wrong shape is an error, never a silent broadcast."""
    out = model(x, sigmabar)
    B, L = x.shape
    if not (isinstance(out, Tensor) and out.dim() == 3 and tuple(out.shape[:2]) == (B, L)
            and out.shape[2] in graph.out_dims):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        want = " or ".join(f"[{B}, {L}, {v}]" for v in graph.out_dims)
        raise ValueError(f"model returned {shape}; {type(graph).__name__}({graph.n}) needs {want}")
    return out.to(torch.promote_types(out.dtype, torch.float32))


LOG_LAM_DT_MAX = 20.0  # lambda dt is capped at e^20 = 4.9e8: P(stay) is 0 in any float beyond (math §2)


def tau_leap_log_probs(log_rate: Tensor, x: Tensor, dt: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """One tau-leaping step per token with total leaving rate lambda = sum_{v != x^l} rate_v:
    P(stay) = exp(-lambda dt), P(x^l -> v) = (1 - exp(-lambda dt)) rate_v / lambda  [B, L, V], or [B, L]
    at y. To first order this is math §2's P = dt * rate; unlike the clamped form it never needs
    renormalising and gives every move a positive probability, which the importance ratios need."""
    log_rate = log_rate.scatter(-1, x[..., None], NEG_INF)
    log_lam = torch.logsumexp(log_rate, -1, keepdim=True)
    u = log_lam + _col(dt).log()
    lam_dt = u.clamp(max=LOG_LAM_DT_MAX).exp()  # never inf: the backward of exp would form 0 * inf = NaN
    # log(1 - e^{-lam dt}), = log(lam dt) where lam dt underflows; clamps keep autograd finite with no move
    log_leave = torch.where(lam_dt < _tiny(u), u.clamp(min=torch.finfo(u.dtype).min),
                            torch.log((-torch.expm1(-lam_dt)).clamp(min=_tiny(u))))
    log_lam = log_lam.clamp(min=torch.finfo(log_lam.dtype).min)  # a token with no move: -inf jumps
    if y is None:
        return (log_rate - log_lam + log_leave).scatter(-1, x[..., None], -lam_dt)
    jump = (log_rate.gather(-1, y[..., None]) - log_lam + log_leave).squeeze(-1)
    return torch.where(y == x, -lam_dt.squeeze(-1), jump)


def predictor_log_probs(model, graph: Graph, noise, x: Tensor, t: Tensor, s: Tensor, n_fixed: int = 0,
                        y: Optional[Tensor] = None) -> Tensor:
    """log P_theta(x_s = . | x_t) of one predictor step (t, s: [B]) at the free positions [B, L - n_fixed, V],
    or its entries at the free part y [B, L - n_fixed]; the n_fixed prefix tokens are copied, never
    computed."""
    out = model_output(model, graph, x, noise(t)[0])
    return graph.predictor_log_probs(out[:, n_fixed:], x[:, n_fixed:], noise, t, s, y)


def corrector_log_probs(model, graph: Graph, noise, x: Tensor, t: Tensor, dtau: Tensor, n_fixed: int = 0,
                        y: Optional[Tensor] = None) -> Tensor:
    """One tau-leaping step of the gradient-flow generator G_t = Q_t + Qbar_theta,t (math §8) at the free
    positions [B, L - n_fixed, V] (or at y, as above). G_t is reversible for q_t^theta, so the step moves
    the samples towards q_t^theta."""
    sigmabar, sigma = noise(t)
    out, x = model_output(model, graph, x, sigmabar)[:, n_fixed:], x[:, n_fixed:]
    return tau_leap_log_probs(torch.logaddexp(graph.log_forward_rate(x, sigma),
                                              graph.log_reverse_rate(out, x, sigmabar, sigma)), x, dtau, y)


def sample_categorical(logp: Tensor, generator=None) -> Tensor:
    """Gumbel-max draw from log-probabilities over the last dim (entries may be -inf)."""
    u = torch.rand(logp.shape, device=logp.device, dtype=logp.dtype, generator=generator)
    return (logp - torch.log(-torch.log(u.clamp(min=_tiny(u))))).argmax(-1)


def _device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


def _prefix_rows(prefix: Optional[Tensor], num_samples: int, graph: Graph, device) -> Optional[Tensor]:
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix, device=device).long()
    prefix = prefix.expand(num_samples, -1) if prefix.dim() == 1 else prefix
    if prefix.dim() != 2 or prefix.shape[0] != num_samples:
        raise ValueError(f"prefix must be [Lp] or [{num_samples}, Lp], got {tuple(prefix.shape)}")
    if prefix.numel() and not 0 <= prefix.min() <= prefix.max() < graph.n:  # a MASK would pass as clean
        raise ValueError(f"prefix ids must be tokens 0..{graph.n - 1}, found {prefix.min().item()}.."
                         f"{prefix.max().item()}")
    return prefix


def _predictor_sample(model, graph: Graph, noise, x: Tensor, t: Tensor, s: Tensor, n_fixed: int,
                      generator) -> tuple[Tensor, Tensor]:
    """One predictor step at the free positions: (x_s [B, L - n_fixed], log P_theta(x_s | x_t) [B])."""
    free = x[:, n_fixed:]
    if not isinstance(graph, Masked):
        logp = predictor_log_probs(model, graph, noise, x, t, s, n_fixed)
        y = sample_categorical(logp, generator)
        return y, logp.gather(-1, y[..., None]).squeeze(-1).sum(-1)
    # MDLM in two exact stages: which masked positions unmask does not depend on the model (probability
    # 1 - (1 - a_s)/(1 - a_t)); only rows where some position unmasks call it, for the new tokens there.
    log_stay = Masked.step_coefficients(noise, t, s)[1]
    unmask = (free == graph.mask_id) & (torch.rand(free.shape, device=x.device, generator=generator)
                                        < -torch.expm1(log_stay))
    y = free.clone()
    rows = unmask.any(1).nonzero().squeeze(1)
    if len(rows):
        out = model_output(model, graph, x[rows], noise(t[rows])[0])[:, n_fixed:]
        sel = unmask[rows]
        new = sample_categorical(graph.denoiser_log_probs(out[sel]), generator)
        y[rows] = free[rows].masked_scatter(sel, new)
    lp = graph.predictor_log_probs(None, free, noise, t, s, y).sum(-1)
    if len(rows):
        lp[rows] = graph.predictor_log_probs(out, free[rows], noise, t[rows], s[rows], y[rows]).sum(-1)
    return y, lp


class Rollout(NamedTuple):
    x: Tensor                # [B, L] the samples x ~ pi_theta
    states: Tensor           # [B, keep_last, L] predictor inputs of the last keep_last steps (path KL)
    path: Optional[Tensor]   # [B, S + 1, L] every state of the chain (record=True), on sampler_schedule
    log_prob: Optional[Tensor]  # [B] log P_theta(path | z_0) (record=True)


@torch.no_grad()
def rollout(model, graph: Graph, noise, num_samples: int, length: int, steps: int = 128,
            corrector_steps: int = 0, prefix: Optional[Tensor] = None, generator=None,
            keep_last: int = 0, record: bool = False) -> Rollout:
    """Run the reverse chain from the prior: `steps` predictor steps, each but the last followed by
    `corrector_steps` gradient-flow corrector steps. record=True keeps the whole latent path and
    its log-probability under the sampler (the rollout estimators, math §4 and §5)."""
    device = _device(model)
    prefix = _prefix_rows(prefix, num_samples, graph, device)
    n_fixed = 0 if prefix is None else prefix.shape[1]
    if n_fixed > length:
        raise ValueError(f"prefix of length {n_fixed} does not fit in length {length}")
    if isinstance(graph, Masked) and noise(torch.zeros(1))[0].item() != 0:  # on the CPU: no device sync
        raise ValueError("the masked graph needs sigmabar(0) = 0 (LogLinear): else the last step leaves "
                         "MASK tokens")
    x = graph.sample_prior((num_samples, length), device, generator)
    if n_fixed:
        x[:, :n_fixed] = prefix
    fixed = x[:, :n_fixed]  # copied through every step; only the free positions are sampled
    t_all, a_all, corr = sampler_schedule(steps, corrector_steps, device)
    kept, path, k = [], [x], 0
    logp = torch.zeros(num_samples, device=device, dtype=torch.get_default_dtype())
    for i, is_corr in enumerate(corr):
        t, a = t_all[i].expand(num_samples), a_all[i].expand(num_samples)
        if is_corr:  # no corrector at t = 0, where the masked scores are infinite
            lq = corrector_log_probs(model, graph, noise, x, t, a, n_fixed)
            y = sample_categorical(lq, generator)
            lp = lq.gather(-1, y[..., None]).squeeze(-1).sum(-1)
        else:
            kept += [x] if k >= steps - keep_last else []
            y, lp = _predictor_sample(model, graph, noise, x, t, a, n_fixed, generator)
            k += 1
        x = torch.cat([fixed, y], 1)
        logp += lp
        path += [x] if record else []
    states = torch.stack(kept, 1) if kept else x.new_empty(num_samples, 0, length)
    return Rollout(x, states, torch.stack(path, 1) if record else None, logp if record else None)


def sample(model, graph: Graph, noise, num_samples: int, length: int, steps: int = 128,
           corrector_steps: int = 0, prefix: Optional[Tensor] = None, generator=None,
           batch_size: Optional[int] = None) -> Tensor:
    """x ~ pi_theta = q_0^theta: `steps` predictor steps, each followed by `corrector_steps`
    gradient-flow corrector steps ("SEPO with GF"). prefix [Lp] or [B, Lp] is kept as is;
    batch_size bounds the sequences sampled at once (the result does not depend on it only when None)."""
    bs = batch_size or max(num_samples, 1)
    prefix = _prefix_rows(prefix, num_samples, graph, _device(model))
    return torch.cat([rollout(model, graph, noise, min(bs, num_samples - i), length, steps, corrector_steps,
                              None if prefix is None else prefix[i:i + bs], generator).x
                      for i in range(0, max(num_samples, 1), bs)])[:num_samples]


# === 4. Pre-training losses (math §1) and the ELBO. ==============================================

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


def score_entropy(graph: Uniform, log_s: Tensor, xt: Tensor, x0: Tensor, sigmabar: Tensor) -> Tensor:
    """Denoising score entropy per position [B, L] (SEDD) of the uniform graph:
    sum_{v != x_t} Q(v -> x_t)[s_v - r_v log s_v + r_v (log r_v - 1)], r_v = p_{t|0}(v|x0)/p_{t|0}(x_t|x0),
    with Q(v -> x_t) = 1/n. Non-negative, zero iff s = r."""
    p = graph.transition(x0, sigmabar)
    r = p / p.gather(-1, xt[..., None])
    terms = log_s.exp() - r * log_s + torch.xlogy(r, r) - r
    return terms.scatter(-1, xt[..., None], 0.0).sum(-1) / graph.n


def _times(batch: int, device, generator=None) -> Tensor:
    # antithetic (stratified) times in [T_MIN, 1]: lower-variance ELBO estimates (MDLM)
    u = (torch.rand((), device=device, generator=generator) + torch.arange(batch, device=device) / batch) % 1
    return T_MIN + (1 - T_MIN) * u.to(torch.get_default_dtype())


def pretrain_loss(model, graph: Graph, noise, x0: Tensor, prefix_len: int = 0, generator=None) -> Tensor:
    """Monte-Carlo NELBO in nats per token: denoising score entropy for Uniform, the MDLM
    weighted cross-entropy (score entropy of the absorbing graph) for Masked."""
    t = _times(x0.shape[0], x0.device, generator)
    nelbo = _nelbo_integrand(model, graph, noise, x0, t, prefix_len, generator)
    return (nelbo.mean() if len(nelbo) else nelbo.sum()) / max(x0.shape[1] - prefix_len, 1)  # empty: 0


@torch.no_grad()
def elbo(model, graph: Graph, noise, x0: Tensor, num_t: int = 16, prefix_len: int = 0,
         generator=None, batch_size: Optional[int] = None) -> Tensor:
    """Evidence lower bound on log pi(x0) in nats per sequence [B], averaged over num_t stratified
    times in [T_MIN, 1] (prior and t < T_MIN terms, both ~0, left out), batch_size rows at a time."""
    parts = []
    for xb in x0.split(batch_size or max(len(x0), 1)):
        t = _times(len(xb) * num_t, x0.device, generator).view(num_t, len(xb))
        parts.append(-torch.stack([_nelbo_integrand(model, graph, noise, xb, tj, prefix_len, generator)
                                   for tj in t]).mean(0))
    return torch.cat(parts) if parts else x0.new_zeros(0, dtype=torch.get_default_dtype())


# === 5. SEPO: the pieces of the policy gradient. =================================================


def pl_positions(batch: int, free: int, positions: int, n_fixed: int = 0, generator=None,
                 device=None) -> Tensor:
    """min(positions, free) distinct random free positions per row [batch, P] (the masked
    pseudo-likelihood)."""
    P = min(positions, free)
    return torch.rand(batch, free, device=device, generator=generator).argsort(-1)[:, :P] + n_fixed


def log_pi_surrogate(model, graph: Graph, noise, x: Tensor, t_eval: float, n_fixed: int = 0,
                     positions: int = 16, generator=None, pos: Optional[Tensor] = None) -> Tensor:
    """psi(x) [B] whose gradient is the SEPO estimate of grad log pi_theta(x): the gradient of the
    log pseudo-likelihood sum_l log q(x^l | x^{-l}) (math §3, (T2): Theorem 3.1 with the global weights
    q(y) replaced by per-position conditionals).

    Uniform: one pass at the clean x, t_eval; with detached w_{l,v} = q(v | x^{-l}) = softmax_v log s,
        psi = - sum_l sum_{v != x^l} w_{l,v} log s_theta(x)_{l,v}.
    Masked: q(v | x^{-l}) is the denoiser at x^{l<-MASK}, so psi = sum_l log p_theta(x^l | x^{l<-MASK});
        P random positions per sample (`pos` [B, P], or `positions` drawn here; one pass each,
        batched) scaled by (L - n_fixed) / P: unbiased.
    """
    B, L = x.shape
    free = L - n_fixed
    if B == 0 or free == 0:
        return x.new_zeros(B, dtype=torch.get_default_dtype())
    sigmabar = noise(torch.full((B,), t_eval, device=x.device, dtype=torch.get_default_dtype()))[0]
    if isinstance(graph, Masked):
        pos = pl_positions(B, free, positions, n_fixed, generator, x.device) if pos is None else pos
        P = pos.shape[1]
        xm = x[:, None, :].repeat(1, P, 1).scatter_(-1, pos[..., None], graph.mask_id)
        out = model_output(model, graph, xm.view(B * P, L), sigmabar.repeat_interleave(P))
        out = out.view(B, P, L, -1).gather(2, pos[..., None, None].expand(B, P, 1, out.shape[-1])).squeeze(2)
        logp = graph.denoiser_log_probs(out)  # [B, P, n]: the denoiser at the masked position only
        return logp.gather(-1, x.gather(1, pos)[..., None]).squeeze(-1).sum(-1) * (free / P)
    log_s = graph.log_score(model_output(model, graph, x, sigmabar), x, sigmabar)[:, n_fixed:]
    w = log_s.detach().softmax(-1)  # includes v = x^l, where log s = 0 carries no gradient
    return -(w * log_s).sum((-1, -2))


def active_transitions(graph: Graph, paths: Tensor) -> Tensor:
    """[N, S] bool: the transitions of paths [N, S+1, L] whose probability depends on theta. Masked graph:
    only those where some position is unmasked (how many stay masked or are re-masked is model-free)."""
    if not isinstance(graph, Masked):
        return torch.ones(paths.shape[0], paths.shape[1] - 1, dtype=torch.bool, device=paths.device)
    return ((paths[:, :-1] == graph.mask_id) & (paths[:, 1:] != graph.mask_id)).any(-1)


def path_log_prob(model, graph: Graph, noise, paths: Tensor, n_fixed: int = 0, chunk_size: int = 1024,
                  corrector_steps: int = 0, select: Optional[Tensor] = None) -> Tensor:
    """log P_theta(z_1..z_S | z_0) = sum_k log P_theta(z_{k+1} | z_k) along paths [N, S+1, L] on
    sampler_schedule(T, corrector_steps)  [N], up to the prior term log p(z_0), which is the same for
    every model (math §5). Masked predictor steps where nothing is unmasked are model-free and are
    computed in closed form, without the model. select [N, S] restricts the sum to some transitions.
    Gradients flow unless the caller disables them."""
    N, S1, L = paths.shape
    c = corrector_steps
    t_all, a_all, corr = sampler_schedule((S1 - 1 + c) // (1 + c), c, paths.device)
    if len(corr) != S1 - 1:
        raise ValueError(f"paths have {S1 - 1} transitions, not a sampler schedule with {c} corrector steps")
    z, y = paths[:, :-1].reshape(-1, L), paths[:, 1:].reshape(-1, L)
    k = torch.arange(S1 - 1, device=paths.device).repeat(N)
    keep = torch.ones_like(k, dtype=torch.bool) if select is None else select.reshape(-1)
    is_corr = torch.tensor(corr, device=paths.device)[k]
    out = torch.zeros(N * (S1 - 1), device=paths.device, dtype=torch.get_default_dtype())
    for kind in (False, True):
        idx = (keep & (is_corr == kind)).nonzero().squeeze(1)
        if not kind and isinstance(graph, Masked) and len(idx):
            zi, yi = z[idx, n_fixed:], y[idx, n_fixed:]
            lp = graph.predictor_log_probs(None, zi, noise, t_all[k[idx]], a_all[k[idx]], yi).sum(-1)
            out = out.index_put((idx,), lp)
            idx = idx[((zi == graph.mask_id) & (yi != graph.mask_id)).any(-1)]  # only these need the model
        for i in range(0, len(idx), chunk_size):  # the entries at the next state only: a gather, a logsumexp
            j = idx[i:i + chunk_size]
            step = corrector_log_probs if kind else predictor_log_probs
            lp = step(model, graph, noise, z[j], t_all[k[j]], a_all[k[j]], n_fixed, y[j, n_fixed:])
            out = out.index_put((j,), lp.sum(-1))
    return out.view(N, S1 - 1).sum(1)


def forward_path_log_prob(graph: Graph, noise, paths: Tensor) -> Tensor:
    """log p_fwd(z_0..z_{T-1} | z_T = x) = sum_k log p(z_k | z_{k+1}) of the forward process  [N]."""
    N, T1, _ = paths.shape
    sb = noise(time_grid(T1 - 1, paths.device))[0]
    d = (sb[:-1] - sb[1:]).repeat(N)
    lp = graph.transition_log_prob(paths[:, 1:].flatten(0, 1), paths[:, :-1].flatten(0, 1), d)
    return lp.sum(-1).view(N, T1 - 1).sum(1)


def snis_log_ratio(logp_new: Tensor, logp_old: Tensor, logq: Tensor) -> Tensor:
    """log r_hat(x) = log sum_m wbar_m P_new(z_m, x)/P_old(z_m, x), wbar ~ P_old(z_m, x)/p_fwd(z_m | x)
    (math §5); inputs [B, M]. Equals LSE_m(logp_new - logq) - LSE_m(logp_old - logq)."""
    return torch.logsumexp(logp_new - logq, -1) - torch.logsumexp(logp_old - logq, -1)


def select_transitions(active: Tensor, steps: Optional[int], generator=None) -> tuple[Tensor, Tensor]:
    """(select [N, S], scale [N]): min(steps, #active) active transitions per row drawn without
    replacement, scale = #active / #drawn, so scale * sum over the drawn ones is unbiased for the sum
    over all active ones (math §4). steps=None keeps every active transition (scale 1)."""
    n_active = active.sum(1)
    if steps is None:
        return active, torch.ones_like(n_active, dtype=torch.get_default_dtype())
    keys = torch.rand(active.shape, device=active.device, generator=generator).masked_fill(~active, 2.0)
    rank = keys.argsort(1).argsort(1)
    drawn = n_active.clamp(max=steps)
    return rank < drawn[:, None], n_active / drawn.clamp(min=1).to(torch.get_default_dtype())


def _mean(r: Tensor, dim: int) -> Tensor:
    """r.mean(dim, keepdim=True), exact where r is constant: a rounded mean, over a ~0 std, would give
    |A| ~ 1."""
    first = r.narrow(dim, 0, 1)
    return torch.where((r == first).all(dim, keepdim=True), first, r.mean(dim, keepdim=True))


def grpo_advantages(reward: Tensor, group_size: int) -> Tensor:
    """A = (R - mean_group) / (std_group + 1e-8) (math §6). Population std: a group of identical rewards
    (or a group of one) gets A = 0 exactly, not NaN."""
    if reward.numel() == 0:
        return reward
    r = reward.view(-1, group_size)
    return ((r - _mean(r, 1)) / (r.std(1, unbiased=False, keepdim=True) + 1e-8)).view(-1)


def ppo_advantages(reward: Tensor, baseline: Optional[float | Tensor] = None,
                   normalize: bool = False) -> Tensor:
    """A = R - b, b = batch mean unless given (a running mean, or a per-sample prompt value, say);
    normalize: whitened over the batch, (A - mean A) / std A, as in PPO implementations (math §6)."""
    if reward.numel() == 0:
        return reward
    adv = reward - (_mean(reward, 0) if baseline is None else baseline)
    return grpo_advantages(adv, len(adv)) if normalize else adv  # whitening: one group of the whole batch


LOG_RATIO_MAX = 20.0  # |log r| is clamped here: r in [2e-9, 5e8], finite in fp32 whatever the estimate


def clip_coefficients(log_ratio: Tensor, adv: Tensor, clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """(coef_b = 1[active_b] A_b r_b, clipped_b), detached: the gradient of the per-sample clipped
    objective (paper Eq. (9), math §6) is mean_b coef_b grad log pi_theta(x_b). Inactive where the min
    picks the clipped branch (A > 0, r > 1 + eps or A < 0, r < 1 - eps). Finite by construction: the
    log ratio is clamped to +-LOG_RATIO_MAX before exp, so A = 0 never meets r = inf (0 * inf = NaN), and
    the clamp changes no coefficient that matters (r > 1 + eps with A > 0 is clipped anyway; an A < 0
    sample at r = 5e8 already dominates the clipped gradient). A NaN log ratio stays NaN (math §6)."""
    ratio = log_ratio.detach().clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX).exp()
    clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
    return torch.where(clipped, 0.0, adv * ratio).detach(), clipped


def clipped_surrogate(psi: Tensor, log_ratio: Tensor, adv: Tensor,
                      clip_eps: float = 0.2) -> tuple[Tensor, Tensor]:
    """L = -mean_b coef_b psi_b, whose gradient is -grad l_A when grad psi_b = grad log pi_theta(x_b)
    (paper Eq. (9), math §6). Returns (loss, fraction clipped)."""
    if psi.numel() == 0:
        return psi.sum(), psi.new_zeros(())
    coef, clipped = clip_coefficients(log_ratio, adv, clip_eps)
    return -(coef * psi).mean(), clipped.to(psi.dtype).mean()


def path_kl(model, ref_model, graph: Graph, noise, states: Tensor, steps: int, n_fixed: int = 0,
            chunk_size: int = 1024) -> Tensor:
    """Path KL between the fine-tuned and reference reverse chains over the last k steps [B] (math §7):
    sum_k sum_l KL(P_theta(. | z_k) || P_ref(. | z_k)) at the rollout states states [B, k, L] (detached).
    Its gradient is sum grad(p) (log p - log q), as sum p grad log p = grad sum p = 0: log p - log q is
    detached, so at theta = ref the gradient is exactly 0, never rounding noise that Adam would amplify."""
    B, k, L = states.shape
    if B * k == 0:
        return states.new_zeros(B, dtype=torch.get_default_dtype())
    ts, z, kl = time_grid(steps, states.device)[-k - 1:], states.flatten(0, 1), []
    t, s = ts[:-1].repeat(B), ts[1:].repeat(B)
    for i in range(0, B * k, chunk_size):
        j = slice(i, i + chunk_size)
        logp = predictor_log_probs(model, graph, noise, z[j], t[j], s[j], n_fixed)
        with torch.no_grad():
            logq = predictor_log_probs(ref_model, graph, noise, z[j], t[j], s[j], n_fixed)
        diff = (logp - logq).masked_fill(~torch.isfinite(logp), 0.0)  # 0 log 0 = 0, NaN-free grads
        kl.append((logp.exp() * diff.detach()).sum((-1, -2)))
    return torch.cat(kl).view(B, k).sum(1)


def check_reward(reward, batch: int, where: str = "") -> Tensor:
    """The reward as a float tensor [batch]; a wrong shape or a NaN/inf is an error naming the culprit."""
    reward = torch.as_tensor(reward).detach().to(torch.get_default_dtype())  # cast first: 1e39 is inf in fp32
    if reward.shape != (batch,):
        raise ValueError(f"{where}reward_fn returned shape {tuple(reward.shape)}, expected [{batch}]")
    bad = (~torch.isfinite(reward)).nonzero().flatten().tolist()
    if bad:
        values = reward[bad[:10]].tolist()
        raise ValueError(f"{where}reward_fn returned non-finite values for samples {bad[:10]}: {values}")
    return reward


# === 6. The trainer: Algorithm 1 (roll out pi_old, reward, advantages, K clipped epochs, KL). ====
# Under torchrun each rank rolls out its own groups; the ranks share statistics and the mean gradient
# (docs/design.md).


@dataclass
class SEPOConfig:
    """Defaults are the paper's DNA settings (math §10); grad="pl", ratio="snis" is the paper's SEPO."""

    lr: float = 1e-4
    batch_size: int = 8          # groups (prompts) per iteration
    group_size: int = 8          # G samples per group; batch_size * group_size sequences per iteration
    epochs: int = 2              # K gradient steps on each batch
    clip_eps: float = 0.2        # eps of the clipped objective
    kl_coef: float = 0.05        # alpha; with kl_target, its value while the KL is within the budget
    kl_target: Optional[float] = None  # a KL budget delta: the path KL is held at or below it (math §7)
    kl_gain: float = 0.5         # kl_target: lambda += kl_gain * min(KL / delta - 1, 1) >= 0 (math §7)
    kl_steps: int = 10           # path KL over the predictor transitions of the last kl_steps steps
    snis_samples: int = 4        # M latent paths per sample (SNIS ratio, grad="path")
    steps: int = 128             # T sampler steps
    corrector_steps: int = 0     # gradient-flow corrector steps after each predictor step
    advantage: str = "grpo"      # "grpo" (group-normalised) or "ppo" (R - baseline)
    baseline: str = "batch"      # ppo baseline: "batch" mean, "running" mean, or "group" (prompt) mean
    baseline_momentum: float = 0.9
    normalize_adv: bool = False  # ppo: whiten A over the batch, (A - mean) / std
    # grad log pi (math §3-4): "pl" (T2, the paper's), "path" (M paths) or "rollout"; importance ratio
    # (math §5): "snis" over M forward paths (the paper's) or "rollout" path. None: by graph, the paper's
    # pl / snis on the masked graph, rollout / rollout on the uniform one, where pl drifts (math §4)
    grad: Optional[str] = None
    ratio: Optional[str] = None
    path_steps: Optional[int] = None  # grad "path"/"rollout": transitions with gradient per path (None: all)
    pl_positions: int = 16       # grad "pl", masked graph: positions per sample
    t_eval: Optional[float] = None  # grad "pl": time of the score pass; None = 1 / steps
    max_grad_norm: float = 1.0
    max_bad_iterations: int = 3  # step() raises after this many iterations in a row with a non-finite update
    kl_reference: str = "pretrained"  # or "previous": the policy at the start of each iteration
    chunk_size: int = 1024       # sequences per batched no-grad forward pass
    micro_batch: Optional[int] = None  # samples per gradient pass (None: all); the update does not change
    amp: str = "none"            # "bf16": autocast the rollout and gradient passes; ratios stay fp32
    seed: int = 0

    def __post_init__(self):
        for name, allowed in (("advantage", ("grpo", "ppo")), ("baseline", ("batch", "running", "group")),
                              ("kl_reference", ("pretrained", "previous")), ("amp", ("none", "bf16")),
                              ("grad", (None, "pl", "path", "rollout")),
                              ("ratio", (None, "snis", "rollout"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "group_size", "epochs", "snis_samples", "steps", "pl_positions",
                     "chunk_size", "micro_batch", "path_steps", "max_bad_iterations"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rules = (("kl_steps", 0 <= self.kl_steps <= self.steps, f"in [0, steps={self.steps}]"),
                 ("clip_eps", self.clip_eps > 0, "> 0"),
                 ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
                 ("lr", self.lr >= 0, ">= 0"),
                 ("kl_coef", self.kl_coef >= 0, ">= 0"),
                 ("kl_target", self.kl_target is None or 0 < self.kl_target < math.inf, "None or > 0"),
                 ("kl_gain", 0 < self.kl_gain < math.inf, "> 0"),
                 ("kl_steps", self.kl_target is None or self.kl_steps > 0, ">= 1 with kl_target"),
                 ("t_eval", self.t_eval is None or 0 < self.t_eval <= 1, "in (0, 1]"),
                 ("baseline_momentum", 0 <= self.baseline_momentum <= 1, "in [0, 1]"))
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")

    def for_graph(self, graph: Graph) -> "SEPOConfig":
        """This config with grad and ratio set where they are None: pl / snis (the paper's) on the masked
        graph; rollout / rollout on the uniform one, where pl has no restoring force and diverges
        (math §4)."""
        masked = isinstance(graph, Masked)
        return replace(self, grad=self.grad or ("pl" if masked else "rollout"),
                       ratio=self.ratio or ("snis" if masked else "rollout"))


def first_nonfinite(**named: Tensor) -> str:
    """The name of the first tensor holding a NaN or an infinity, or ""."""
    return next((name for name, t in named.items() if not torch.isfinite(t).all()), "")


def _finite_mean(t: Tensor) -> float:
    """The mean over the finite entries (NaN if there is none): statistics of an update that was skipped."""
    return t[torch.isfinite(t)].mean().item()


class SEPO:
    """Score Entropy Policy Optimization (Algorithm 1) for a masked or uniform diffusion model.

    reward_fn(x [B, L]) -> [B] is a black box (never differentiated). prompt_fn(num_prompts,
    generator) -> [num_prompts, Lp], optional, gives fixed prefixes; each is shared by the
    group_size samples of one group and is part of the sequences passed to reward_fn. The KL
    reference is a private copy of ref_model (default: of model), so the caller's model is never
    changed; copy_ref=False uses ref_model itself, frozen in place (one copy of its weights less; it
    must not change while SEPO runs). `model` itself is trained in place. A non-finite loss or gradient
    never reaches the weights: that update is skipped and counted (stats["skipped"]; `nonfinite` names
    the quantity), and max_bad_iterations such iterations in a row raise FloatingPointError naming it
    and the iteration.
    """

    def __init__(self, model: nn.Module, graph: Graph, noise, reward_fn: Callable[[Tensor], Tensor],
                 length: int, cfg: Optional[SEPOConfig] = None, ref_model: Optional[nn.Module] = None,
                 prompt_fn: Optional[Callable[[int, torch.Generator], Tensor]] = None, copy_ref: bool = True):
        self.cfg = cfg = (cfg or SEPOConfig()).for_graph(graph)
        if not copy_ref and (ref_model is None or ref_model is model or cfg.kl_reference == "previous"):
            raise ValueError("copy_ref=False needs a ref_model other than model, and kl_reference="
                             "'pretrained' (a 'previous' reference is rewritten every iteration)")
        self.model = model.eval()  # eval: no dropout, so r = 1 at epoch 0
        self.graph, self.noise = graph, noise
        self.reward_fn, self.length, self.prompt_fn = reward_fn, length, prompt_fn
        ref = copy.deepcopy(ref_model if ref_model is not None else model) if copy_ref else ref_model
        self.ref_model = ref.eval().requires_grad_(False)
        self.opt, self.device = torch.optim.Adam(model.parameters(), lr=cfg.lr), _device(model)
        on = dist.is_available() and dist.is_initialized()  # torch.distributed, e.g. under torchrun
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        seed = cfg.seed + 10 ** 9 * self.rank  # every rank its own streams; rank 0 those of cfg.seed
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.prompt_gen = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.running_baseline = None  # the ppo "running" mean
        self.kl_coef = cfg.kl_coef  # alpha in use: kl_coef + lambda (math §7)
        self.bad_streak = 0  # iterations in a row with a skipped update
        self.nonfinite = ""  # what was not finite in the last iteration's skipped update ("": none)
        if self.world > 1:  # every rank starts from rank 0's weights, as DDP does
            for t in itertools.chain(model.state_dict().values(), self.ref_model.state_dict().values()):
                dist.broadcast(t, 0)

    def step(self) -> dict:
        """One iteration of Algorithm 1; returns its statistics."""
        cfg, model, graph, noise = self.cfg, self.model, self.graph, self.noise
        B, tic = cfg.batch_size * cfg.group_size, time.perf_counter()  # B: this rank's samples
        if cfg.kl_reference == "previous":
            self.ref_model.load_state_dict(model.state_dict())

        # 1. Roll out pi_old (the current weights) and score the samples. The rollout ratio compares
        #    fp32 passes with the rollout's own log-probability, so that rollout stays in fp32.
        prefix = self._prefix()
        n_fixed = 0 if prefix is None else prefix.shape[1]
        with self._autocast(cfg.ratio != "rollout"):
            roll = rollout(model, graph, noise, B, self.length, cfg.steps, cfg.corrector_steps, prefix,
                           self.gen, keep_last=cfg.kl_steps, record="rollout" in (cfg.grad, cfg.ratio))
        x = roll.x
        reward = self.reward_fn(x.clone())  # a clone: reward_fn may edit it
        reward = check_reward(reward, B, f"iteration {self.iteration + 1}: ").to(self.device)
        adv = self._advantages(reward)
        t_sample = time.perf_counter() - tic

        # 2. M latent paths from the forward process (math §5), shared by old and new (common random
        #    numbers): for the SNIS ratio of the epochs after the first, and for grad="path".
        paths, logq, logp_old = self._latent_paths(x, n_fixed)

        # 3. K epochs of the clipped objective. An update whose ratio, surrogate, KL or gradient is not
        #    finite is skipped (math §6): the weights and the optimizer state stay as they were. With a KL
        #    budget, an update that leaves it is pulled back onto it at once (math §7).
        skipped, culprit, shrink, kl_update = 0, "", 1.0, math.nan
        for epoch in range(cfg.epochs):
            logp, log_ratio = self._log_ratio(epoch, roll, paths, logp_old, logq, n_fixed)
            coef, clipped = clip_coefficients(log_ratio, adv, cfg.clip_eps)
            psi_fn = self._surrogate(x, roll, paths, logp, logq, n_fixed)
            loss, kl, bad = self._backward(coef, psi_fn, roll.states, n_fixed)
            grad_norm, bad = self._update(first_nonfinite(ratio=log_ratio) or bad)
            if bad:  # nothing was applied: the statistics say so with a zero loss and gradient
                skipped += 1
                culprit = culprit or bad
                loss, grad_norm = 0.0, torch.zeros(())
            if cfg.kl_target is not None:
                beta, kl_update = self._project_to_budget(roll.states, n_fixed)
                shrink = min(shrink, beta)

        # 4. Statistics over every rank, and the KL budget's multiplier: its dual step (math §7).
        per_sample = torch.stack([reward, kl, clipped.to(reward), log_ratio])
        reward, kl, clip, log_ratio = self._gather(per_sample)
        kl_coef = self.kl_coef
        if cfg.kl_target is not None:
            self._dual_step(kl_update)  # the KL the last update reached, before its pull-back
        self.iteration += 1
        self._count_bad(skipped, culprit)
        ratio = log_ratio.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX).exp()
        return {"iteration": self.iteration, "reward_mean": reward.mean().item(),
                "reward_std": reward.std(unbiased=False).item(), "kl": _finite_mean(kl), "kl_coef": kl_coef,
                "kl_shrink": shrink, "clip_frac": clip.mean().item(),
                "loss": sum(self._all_ranks(loss)) / self.world, "ratio_mean": _finite_mean(ratio),
                "ratio_max": ratio.nan_to_num(1.0).max().item(),
                "ratio_min": ratio.nan_to_num(1.0).min().item(),
                "grad_norm": float(grad_norm), "skipped": skipped, "time_sample": t_sample,
                "time": time.perf_counter() - tic}

    # --- the pieces of step(), in its order ---------------------------------------------------------------

    def _prefix(self) -> Optional[Tensor]:
        if self.prompt_fn is None:
            return None
        B = self.cfg.batch_size
        prompts = torch.as_tensor(self.prompt_fn(B, self.prompt_gen)).long().to(self.device)
        if prompts.dim() != 2 or prompts.shape[0] != B or prompts.shape[1] >= self.length:
            raise ValueError(f"prompt_fn returned {tuple(prompts.shape)}, expected [{B}, Lp] with Lp < "
                             f"length = {self.length}: a response to learn")
        return prompts.repeat_interleave(self.cfg.group_size, 0)

    def _advantages(self, reward: Tensor) -> Tensor:
        cfg = self.cfg
        if cfg.advantage == "grpo":
            return grpo_advantages(reward, cfg.group_size)  # a group never spans ranks
        reward, baseline = self._gather(reward), None  # batch and running baselines, whitening: every rank's
        if cfg.baseline == "group":  # Monte-Carlo value of the group's prompt; A = R - V(prompt)
            baseline = _mean(reward.view(-1, cfg.group_size), 1).repeat_interleave(cfg.group_size)
        elif cfg.baseline == "running":
            m, mean = cfg.baseline_momentum, _mean(reward, 0).item()
            baseline = self.running_baseline if self.running_baseline is not None else mean
            self.running_baseline = baseline + (1 - m) * (mean - baseline)  # stays put on a constant reward
        return ppo_advantages(reward, baseline, cfg.normalize_adv).view(self.world, -1)[self.rank]

    def _latent_paths(self, x: Tensor, n_fixed: int) -> tuple:
        """(paths [B * M, T + 1, L], log p_fwd [B, M], log P_old [B, M]), or Nones where nothing needs
        them."""
        cfg, B, M = self.cfg, len(x), self.cfg.snis_samples
        if not (cfg.grad == "path" or (cfg.ratio == "snis" and cfg.epochs > 1)):
            return None, None, None
        sigmabars = self.noise(time_grid(cfg.steps, self.device))[0]
        paths = self.graph.sample_path(x.repeat_interleave(M, 0), sigmabars, n_fixed, self.gen)
        logq = forward_path_log_prob(self.graph, self.noise, paths).view(B, M)
        with torch.no_grad():
            logp_old = path_log_prob(self.model, self.graph, self.noise, paths, n_fixed, cfg.chunk_size)
        logp_old = logp_old.view(B, M)
        return paths, logq, logp_old

    @torch.no_grad()
    def _log_ratio(self, epoch: int, roll: Rollout, paths, logp_old, logq, n_fixed: int) -> tuple:
        """(log P_theta of the M paths or None, log r [B]): r = 1 at epoch 0, where theta == theta_old."""
        cfg, model, graph, noise = self.cfg, self.model, self.graph, self.noise
        if epoch == 0:
            return logp_old, torch.zeros(len(roll.x), device=self.device, dtype=torch.get_default_dtype())
        logp = None if paths is None else path_log_prob(model, graph, noise, paths, n_fixed, cfg.chunk_size)
        logp = None if logp is None else logp.view(len(roll.x), -1)
        if cfg.ratio == "snis":
            return logp, snis_log_ratio(logp, logp_old, logq)
        lp = path_log_prob(model, graph, noise, roll.path, n_fixed, cfg.chunk_size, cfg.corrector_steps)
        return logp, lp - roll.log_prob

    def _backward(self, coef: Tensor, psi_fn: Callable[[slice], Tensor], states: Tensor,
                  n_fixed: int) -> tuple[float, Tensor, str]:
        """Back-propagate alpha * KL - mean_b coef_b psi_b micro-batch by micro-batch: the coefficients are
        known before any gradient pass, so the gradient is the same (math §6).
        -> (loss, KL [B], the first non-finite quantity or "")."""
        cfg, B = self.cfg, len(coef)
        self.opt.zero_grad(set_to_none=True)
        loss, kls, bad = 0.0, [], ""
        for i in range(0, B, cfg.micro_batch or B):
            j = slice(i, i + (cfg.micro_batch or B))
            with self._autocast():
                psi = psi_fn(j)
                kl = path_kl(self.model, self.ref_model, self.graph, self.noise, states[j], cfg.steps,
                             n_fixed, cfg.chunk_size)
            bad = bad or first_nonfinite(surrogate=psi, KL=kl)
            part = (self.kl_coef * kl.sum() - (coef[j] * psi).sum()) / B
            part.backward()
            loss += part.item()
            kls.append(kl.detach())
        return loss, torch.cat(kls), bad

    def _update(self, bad: str) -> tuple[Tensor, str]:
        """Average the gradient over ranks, clip it and take the Adam step, unless something was not finite
        on some rank; then no rank steps and the gradient is dropped. -> (gradient norm, non-finite)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1:  # the mean over ranks, as DDP: the union batch's gradient
            used = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
            dist.all_reduce(used, op=dist.ReduceOp.MAX)  # one no rank used keeps grad None: Adam skips it
            for p in itertools.compress(params, used.tolist()):
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad)
                p.grad /= self.world
        grad_norm = nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        bad = next((b for b in self._all_ranks(bad or first_nonfinite(gradient=grad_norm)) if b), "")
        if bad:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
        return grad_norm, bad

    @torch.no_grad()
    def _project_to_budget(self, states: Tensor, n_fixed: int) -> tuple[float, float]:
        """If the updated policy's path KL at this batch's states exceeds kl_target = delta, pull the weights
        back along the segment to the reference, theta <- theta_ref + beta (theta - theta_ref), with beta such
        that the KL lands on delta, where the multiplier alone would react iterations late (math §7). Called
        after every update. -> (beta (1: the weights are untouched), the KL before the pull-back)."""
        kl = self._budget_kl(states, n_fixed)
        delta = self.cfg.kl_target
        if not kl > delta:  # within the budget (or no finite estimate): nothing to do
            return 1.0, kl
        # KL(beta) ~ KL beta^power, power = 2 near the reference; one more pass fits power farther out
        beta = math.sqrt(delta / kl)
        self._pull_back(beta)
        landed = self._budget_kl(states, n_fixed)
        if 0 < landed < kl:
            power = math.log(kl / landed) / math.log(1 / beta)
            fitted = (delta / kl) ** (1 / power)
            self._pull_back(fitted / beta)  # along the same segment: out if it landed short, in if beyond
            beta = fitted
        return beta, kl

    def _budget_kl(self, states: Tensor, n_fixed: int) -> float:
        """The path KL at the batch's states, averaged over every rank's samples."""
        cfg = self.cfg
        with self._autocast():
            kl = path_kl(self.model, self.ref_model, self.graph, self.noise, states, cfg.steps, n_fixed,
                         cfg.chunk_size)
        return _finite_mean(self._gather(kl))

    def _pull_back(self, beta: float) -> None:
        """theta <- theta_ref + beta (theta - theta_ref)."""
        for p, p_ref in zip(self.model.parameters(), self.ref_model.parameters()):
            p.lerp_(p_ref.to(p.dtype), 1 - beta)  # a reference may be stored in bf16

    def _dual_step(self, kl: float) -> None:
        """Projected dual ascent on the multiplier lambda >= 0 of KL <= delta: alpha = kl_coef + lambda
        (math §7)."""
        cfg = self.cfg
        if math.isfinite(kl):
            lam = self.kl_coef - cfg.kl_coef + cfg.kl_gain * min(kl / cfg.kl_target - 1, 1.0)
            self.kl_coef = cfg.kl_coef + max(lam, 0.0)

    def _count_bad(self, skipped: int, culprit: str) -> None:
        """Count iterations in a row with a skipped update; raise after max_bad_iterations of them."""
        self.bad_streak = self.bad_streak + 1 if skipped else 0
        self.nonfinite = culprit
        n = self.bad_streak
        if n >= self.cfg.max_bad_iterations:
            raise FloatingPointError(
                f"SEPO iteration {self.iteration}: non-finite {culprit} in {n} iterations in a row "
                f"({self.iteration - n + 1} to {self.iteration}); their updates were skipped, so the model "
                f"holds the weights of iteration {self.iteration - n}. Lower lr, or on the uniform graph use "
                f"grad='rollout' (math §4, §6).")

    def _surrogate(self, x: Tensor, roll: Rollout, paths, logp, logq,
                   n_fixed: int) -> Callable[[slice], Tensor]:
        """psi restricted to a slice of the batch, grad psi_b estimating grad log pi_theta(x_b) (math §3-4).
        Its random draws are made here, for the whole batch, so the micro-batching cannot change them."""
        cfg, model, graph, noise = self.cfg, self.model, self.graph, self.noise
        if cfg.grad == "pl":
            t_eval = cfg.t_eval if cfg.t_eval is not None else 1.0 / cfg.steps
            pos = (pl_positions(len(x), x.shape[1] - n_fixed, cfg.pl_positions, n_fixed, self.gen, x.device)
                   if isinstance(graph, Masked) else None)
            return lambda j: log_pi_surrogate(model, graph, noise, x[j], t_eval, n_fixed, cfg.pl_positions,
                                              pos=None if pos is None else pos[j])
        # Fisher's identity: grad log pi(x) = E_{z ~ P_theta(z | x)} grad log P_theta(z, x). "path": the
        # self-normalised posterior weights of the M forward paths; "rollout": the rollout's own path,
        # an exact posterior draw under theta_old. Model-free transitions carry no gradient: skipped.
        z, c = (paths, 0) if cfg.grad == "path" else (roll.path, cfg.corrector_steps)
        select, scale = select_transitions(active_transitions(graph, z), cfg.path_steps, self.gen)
        k = cfg.snis_samples if cfg.grad == "path" else 1
        w = torch.softmax(logp - logq, -1) if cfg.grad == "path" else torch.ones(len(x), 1, device=x.device)

        def psi(j: slice) -> Tensor:
            rows = slice(j.start * k, min(j.stop, len(x)) * k)
            lp = path_log_prob(model, graph, noise, z[rows], n_fixed, cfg.chunk_size, c, select[rows])
            return (w[j] * (scale[rows] * lp).view(-1, k)).sum(1)
        return psi

    # --- plumbing: precision, ranks, state --------------------------------------------------------------

    def _autocast(self, on: bool = True):
        bf16 = on and self.cfg.amp == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def _all_ranks(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] ([obj] alone): each rank's random streams, its statistics."""
        objs = [obj] * self.world
        if self.world > 1:
            dist.all_gather_object(objs, obj)
        return objs

    def _gather(self, x: Tensor) -> Tensor:
        """x [..., B] of every rank, concatenated in rank order [..., world * B]: the global batch (alone:
        x)."""
        return torch.cat([part.to(x.device) for part in self._all_ranks(x.cpu())], -1)

    def state_dict(self) -> dict:
        """All an exact resume needs. Its tensors are live, as nn.Module's: save it before the next step().
        Under a process group every rank must call it (it gathers each rank's random streams); rank 0
        saves."""
        streams = self._all_ranks((self.gen.get_state(), self.prompt_gen.get_state()))
        return {"model": self.model.state_dict(), "ref_model": self.ref_model.state_dict(),
                "optimizer": self.opt.state_dict(), "iteration": self.iteration, "kl_coef": self.kl_coef,
                "running_baseline": self.running_baseline, "bad_streak": self.bad_streak,
                "cfg": asdict(self.cfg), "generators": streams}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["generators"]) != self.world:
            raise ValueError(f"the state is of {len(sd['generators'])} ranks: resume it on as many, "
                             f"not {self.world}")
        for key, obj in (("model", self.model), ("ref_model", self.ref_model), ("optimizer", self.opt)):
            obj.load_state_dict(sd[key])
        self.iteration, self.kl_coef = sd["iteration"], sd["kl_coef"]
        self.running_baseline = sd["running_baseline"]
        self.bad_streak = sd.get("bad_streak", 0)  # absent from states saved before it existed
        gen_state, prompt_state = sd["generators"][self.rank]
        self.gen.set_state(gen_state)
        self.prompt_gen.set_state(prompt_state)
