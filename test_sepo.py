"""Tests of sepo.py: exact identities (via toy_ctmc), estimator behaviour, input checks,
resumption, and end-to-end fine-tuning that must raise the reward.

    python -m pytest -q
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sepo
import toy_ctmc

GRAPHS = {
    "uniform": lambda n: (sepo.Uniform(n), sepo.Geometric()),
    "masked": lambda n: (sepo.Masked(n), sepo.LogLinear()),
}


class TinyScoreNet(nn.Module):
    """MLP over the whole (short) sequence, conditioned on log sigmabar."""

    def __init__(self, graph: sepo.Graph, length: int, width: int = 64, out_dim: int | None = None):
        super().__init__()
        self.V, self.L = graph.vocab_size, length
        self.out = out_dim or graph.n
        self.net = nn.Sequential(nn.Linear(length * self.V + 1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, length * self.out))

    def forward(self, x, sigma):
        h = torch.cat([nn.functional.one_hot(x, self.V).flatten(1).float(), sigma.float().log()[:, None]], 1)
        return self.net(h).view(x.shape[0], self.L, self.out)


def make(name: str, n: int = 4, length: int = 6, seed: int = 0, **kw):
    torch.manual_seed(seed)
    graph, noise = GRAPHS[name](n)
    return graph, noise, TinyScoreNet(graph, length, **kw)


# --- graphs, schedules, samplers ---------------------------------------------------------


@pytest.mark.parametrize("name", GRAPHS)
def test_shapes_and_dtypes(name):
    graph, noise, model = make(name)
    x = torch.randint(graph.n, (5, 6))
    sb = torch.full((5,), 0.7)
    assert graph.transition(x, sb).shape == (5, 6, graph.vocab_size)
    assert graph.sample_transition(x, sb).dtype == torch.long
    out = sepo.model_output(model, graph, x, sb)
    assert graph.log_score(out, x, sb).shape == (5, 6, graph.vocab_size)
    t, s = torch.full((5,), 0.5), torch.full((5,), 0.4)
    lp = sepo.predictor_log_probs(model, graph, noise, x, t, s)
    assert lp.shape == (5, 6, graph.vocab_size) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5, 6))
    lc = sepo.corrector_log_probs(model, graph, noise, x, s, t - s)
    torch.testing.assert_close(lc.exp().sum(-1), torch.ones(5, 6))
    assert sepo.pretrain_loss(model, graph, noise, x).shape == ()
    assert sepo.elbo(model, graph, noise, x, num_t=2).shape == (5,)


@pytest.mark.parametrize("name", GRAPHS)
def test_forward_marginals_match_closed_form(name):
    graph, _, _ = make(name)
    V = graph.vocab_size
    for sb in (0.1, 1.0, 4.0):
        exact = torch.matrix_exp(sb * graph.generator(torch.float32))
        tokens = torch.arange(V)[None]
        torch.testing.assert_close(graph.transition(tokens, torch.tensor([sb]))[0], exact, atol=1e-6, rtol=0)
        # empirical frequencies of the forward sampler, 4 standard errors
        x = torch.arange(V).repeat(20000)[None]
        xt = graph.sample_transition(x, torch.tensor([sb]), torch.Generator().manual_seed(0))[0]
        freq = torch.stack([torch.bincount(xt[x[0] == i], minlength=V) for i in range(V)]).float() / 20000
        assert (freq - exact).abs().max() < 4 * (0.25 / 20000) ** 0.5


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_sampler_output_valid_and_prefix_untouched(name, corrector_steps):
    graph, noise, model = make(name, length=8)
    prefix = torch.tensor([3, 1, 2])
    x = sepo.sample(model, graph, noise, 16, 8, steps=12, corrector_steps=corrector_steps, prefix=prefix,
                    generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 8) and x.dtype == torch.long
    assert ((x >= 0) & (x < graph.n)).all(), "no MASK (or out-of-range token) may be left"
    assert (x[:, :3] == prefix).all()
    per_row = torch.randint(graph.n, (16, 2))
    x2 = sepo.sample(model, graph, noise, 16, 8, steps=5, prefix=per_row)
    assert (x2[:, :2] == per_row).all()


@pytest.mark.parametrize("name", GRAPHS)
def test_step_log_probs_with_a_prefix_are_the_free_positions(name):
    # a prefix is copied, not computed: the step at the free positions equals the full step there
    graph, noise, model = make(name, length=6)
    x = graph.sample_prior((5, 6), "cpu", torch.Generator().manual_seed(1))
    x[:, :2] = torch.randint(graph.n, (5, 2))
    t, s = torch.full((5,), 0.5), torch.full((5,), 0.4)
    for f, a in [(sepo.predictor_log_probs, s), (sepo.corrector_log_probs, t - s)]:
        full, free = f(model, graph, noise, x, t, a), f(model, graph, noise, x, t, a, n_fixed=2)
        assert free.shape == (5, 4, graph.vocab_size)
        torch.testing.assert_close(free, full[:, 2:])


def test_sampler_is_reproducible_with_a_generator():
    graph, noise, model = make("masked")
    a = sepo.sample(model, graph, noise, 4, 6, steps=8, generator=torch.Generator().manual_seed(3))
    b = sepo.sample(model, graph, noise, 4, 6, steps=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_bad_prefix_is_an_error():
    graph, noise, model = make("masked")
    with pytest.raises(ValueError, match="does not fit"):
        sepo.sample(model, graph, noise, 2, 6, steps=2, prefix=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix must be"):
        sepo.sample(model, graph, noise, 2, 6, steps=2, prefix=torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("name", GRAPHS)
def test_wrong_model_output_shape_is_an_error(name):
    graph, noise, _ = make(name)
    bad = TinyScoreNet(graph, 6, out_dim=graph.n + 2)
    with pytest.raises(ValueError, match=r"model returned \(2, 6, 6\)"):
        sepo.sample(bad, graph, noise, 2, 6, steps=2)
    with pytest.raises(ValueError, match="model returned"):
        sepo.pretrain_loss(bad, graph, noise, torch.zeros(2, 6, dtype=torch.long))


def test_masked_model_may_output_a_mask_column():
    graph, noise, model = make("masked", out_dim=5)
    x = sepo.sample(model, graph, noise, 3, 6, steps=4)
    assert (x < 4).all()


# --- losses ------------------------------------------------------------------------------


def test_score_entropy_is_zero_at_the_true_ratio_and_positive_elsewhere():
    graph = sepo.Uniform(5)
    x0 = torch.randint(5, (3, 4))
    sb = torch.tensor([0.3, 1.0, 2.0])
    xt = graph.sample_transition(x0, sb)
    p = graph.transition(x0, sb)
    log_r = (p / p.gather(-1, xt[..., None])).log()
    assert sepo.score_entropy(graph, log_r, xt, x0, sb).abs().max() < 1e-5
    assert (sepo.score_entropy(graph, log_r + 0.3 * torch.randn_like(log_r), xt, x0, sb) > 0).all()


@pytest.mark.parametrize("name", ["masked", "uniform"])
def test_elbo_with_exact_scores_recovers_log_likelihood(name):
    """With the exact scores of a tabular model the reverse process is exact, so the ELBO is tight:
    its Monte-Carlo mean must match log p_0(x) within the Monte-Carlo error."""
    torch.set_default_dtype(torch.float64)
    try:
        graph, noise, model = toy_ctmc.setup(name, seed=3)
        S = toy_ctmc.all_states(toy_ctmc.N, toy_ctmc.L)
        reps = 3000
        e = sepo.elbo(model, graph, noise, S.repeat(reps, 1), num_t=8,
                      generator=torch.Generator().manual_seed(0)).view(reps, len(S))
        err = e.mean(0) - model.log_p0().detach()
        stderr = e.std(0) / reps ** 0.5
        assert (err.abs() < 4 * stderr + 1e-3).all(), (err, stderr)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", GRAPHS)
def test_pretraining_lowers_the_loss(name):
    graph, noise, model = make(name, length=4)
    data = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]).repeat(64, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = sepo.pretrain_loss(model, graph, noise, data, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20


# --- exact identities on the toy CTMC (SEPO_MATH section 8) ---------------------------------

TOY_CHECKS = {
    "forward": lambda r: toy_ctmc.check_forward(),
    "sampler": toy_ctmc.check_sampler,
    "gradients": lambda r: toy_ctmc.check_gradients(),
    "clipped": lambda r: toy_ctmc.check_clipped(),
    "snis": toy_ctmc.check_snis,
    "corrector": lambda r: toy_ctmc.check_corrector(),
    "finetune": toy_ctmc.check_finetune,
    "neural": toy_ctmc.check_neural,
}


@pytest.mark.parametrize("check", TOY_CHECKS)
def test_toy_ctmc(check):
    torch.set_default_dtype(torch.float64)
    try:
        rows = TOY_CHECKS[check]({})
    finally:
        torch.set_default_dtype(torch.float32)
    failed = [r for r in rows if not r[3]]
    assert rows and not failed, failed


# --- SEPO pieces ---------------------------------------------------------------------------


def test_grpo_advantages_zero_spread_group_and_empty_batch():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 4.0])
    adv = sepo.grpo_advantages(r, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    torch.testing.assert_close(adv[3:], (r[3:] - 2.0) / (r[3:].std(unbiased=False) + 1e-8))
    assert sepo.grpo_advantages(torch.tensor([5.0]), 1).item() == 0.0  # a group of one: no NaN
    assert sepo.grpo_advantages(torch.zeros(0), 4).numel() == 0
    assert sepo.ppo_advantages(torch.zeros(0)).numel() == 0
    torch.testing.assert_close(sepo.ppo_advantages(torch.tensor([1.0, 3.0])), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(sepo.ppo_advantages(torch.tensor([1.0, 3.0]), baseline=0.0), torch.tensor([1.0, 3.0]))
    per_prompt = torch.tensor([1.0, 3.0, 10.0, 10.0]).view(2, 2).mean(1).repeat_interleave(2)
    torch.testing.assert_close(sepo.ppo_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0]), per_prompt),
                               torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_clipped_surrogate_masks_the_clipped_branch_and_handles_empty():
    psi = torch.ones(4, requires_grad=True)
    log_r = torch.tensor([0.5, -0.5, 0.5, -0.5])  # r = 1.65, 0.61, 1.65, 0.61
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, frac = sepo.clipped_surrogate(psi, log_r, adv, 0.2)
    loss.backward()
    r = log_r.exp()
    expected = torch.tensor([0.0, 0.0, 1.0 * r[2], -1.0 * r[3]]) / 4  # first two clipped
    torch.testing.assert_close(psi.grad, expected)
    assert frac.item() == 0.5
    empty, frac0 = sepo.clipped_surrogate(torch.zeros(0, requires_grad=True), torch.zeros(0), torch.zeros(0))
    assert empty.item() == 0.0 and frac0.item() == 0.0


def test_masked_position_subsampling_is_unbiased():
    """The P-position gradient estimate averages to the all-position gradient; its error shrinks with draws."""
    graph, noise, model = make("masked", length=8)
    x = torch.randint(4, (3, 8))
    full = torch.autograd.grad(sepo.log_pi_surrogate(model, graph, noise, x, 0.1, positions=8).sum(),
                               list(model.parameters()))
    full = torch.cat([g.flatten() for g in full])
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for draws in (4, 256):
        acc = torch.zeros_like(full)
        for _ in range(draws):
            g = torch.autograd.grad(sepo.log_pi_surrogate(model, graph, noise, x, 0.1, positions=2, generator=gen)
                                    .sum(), list(model.parameters()))
            acc += torch.cat([gi.flatten() for gi in g])
        errors[draws] = ((acc / draws - full).norm() / full.norm()).item()
    assert errors[256] < 0.2 and errors[256] < errors[4] / 3, errors


@pytest.mark.parametrize("name", GRAPHS)
def test_snis_ratio_is_one_for_identical_models(name):
    graph, noise, model = make(name)
    x = sepo.sample(model, graph, noise, 4, 6, steps=10)
    paths = graph.sample_path(x.repeat_interleave(3, 0), noise(sepo.time_grid(10))[0])
    lp = sepo.path_log_prob(model, graph, noise, paths).view(4, 3)
    logq = sepo.forward_path_log_prob(graph, noise, paths).view(4, 3)
    assert torch.isfinite(lp).all() and torch.isfinite(logq).all()
    torch.testing.assert_close(sepo.snis_log_ratio(lp, lp, logq), torch.zeros(4))


@pytest.mark.parametrize("name", GRAPHS)
def test_path_kl_is_zero_at_reference_and_positive_after_a_change(name):
    graph, noise, model = make(name)
    _, states = sepo.rollout(model, graph, noise, 5, 6, steps=10, keep_last=3)
    assert states.shape == (5, 3, 6)
    ref = copy.deepcopy(model)
    assert sepo.path_kl(model, ref, graph, noise, states, 10).abs().max() < 1e-6
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    kl = sepo.path_kl(model, ref, graph, noise, states, 10)
    assert (kl >= 0).all() and kl.sum() > 0 and torch.isfinite(kl).all()  # 0 where nothing was left to unmask
    kl.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- the trainer ---------------------------------------------------------------------------


def count_threes(x: torch.Tensor) -> torch.Tensor:
    return (x == 3).float().mean(1)


def small_cfg(**kw) -> sepo.SEPOConfig:
    base = dict(lr=3e-3, batch_size=4, group_size=4, steps=10, kl_steps=3, snis_samples=2, pl_positions=3)
    base.update(kw)
    return sepo.SEPOConfig(**base)


def test_config_validation():
    with pytest.raises(ValueError, match="advantage"):
        sepo.SEPOConfig(advantage="a2c")
    with pytest.raises(ValueError, match="kl_steps"):
        sepo.SEPOConfig(steps=8, kl_steps=9)
    assert sepo.SEPOConfig().steps == 128 and sepo.SEPOConfig().snis_samples == 4  # paper defaults


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reward_is_rejected_naming_the_sample(bad):
    graph, noise, model = make("masked")

    def reward(x):
        r = count_threes(x)
        r[5] = bad
        return r

    trainer = sepo.SEPO(model, graph, noise, reward, 6, small_cfg())
    with pytest.raises(ValueError, match=r"non-finite values for samples \[5\]"):
        trainer.step()


def test_wrong_reward_shape_is_rejected():
    graph, noise, model = make("masked")
    trainer = sepo.SEPO(model, graph, noise, lambda x: count_threes(x)[:3], 6, small_cfg())
    with pytest.raises(ValueError, match=r"expected \[16\]"):
        trainer.step()


@pytest.mark.parametrize("name", GRAPHS)
def test_resume_from_state_dict_gives_the_same_next_step(name):
    graph, noise, model = make(name)
    cfg = small_cfg(advantage="ppo", baseline="running")
    a = sepo.SEPO(model, graph, noise, count_threes, 6, cfg)
    a.step()
    saved = copy.deepcopy(a.state_dict())
    expected = a.step()
    _, _, fresh = make(name, seed=123)  # different initial weights: everything must come from the checkpoint
    b = sepo.SEPO(fresh, graph, noise, count_threes, 6, cfg)
    b.load_state_dict(saved)
    got = b.step()
    for key in ("iteration", "reward_mean", "kl", "clip_frac", "loss", "ratio_mean"):
        assert got[key] == expected[key], key
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_prompts_are_shared_by_a_group_and_kept():
    graph, noise, model = make("uniform", length=6)
    seen = []

    def prompt_fn(k, gen):
        return torch.randint(4, (k, 2), generator=gen)

    def reward(x):
        seen.append(x.clone())
        return count_threes(x)

    cfg = small_cfg(kl_steps=0, advantage="ppo", baseline="group")  # A = R - mean of its prompt group
    trainer = sepo.SEPO(model, graph, noise, reward, 6, cfg, prompt_fn=prompt_fn)
    stats = trainer.step()
    x = seen[0].view(4, 4, 6)
    assert (x[:, :, :2] == x[:, :1, :2]).all()  # one prompt per group of 4
    assert stats["kl"] == 0.0


@pytest.mark.parametrize("name", GRAPHS)
def test_fine_tuning_raises_the_reward(name):
    """End to end: pre-train on uniform random tokens, then SEPO towards more 3s."""
    torch.manual_seed(0)
    graph, noise, model = make(name, length=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = sepo.pretrain_loss(model, graph, noise, torch.randint(4, (128, 6), generator=gen), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = small_cfg(batch_size=4, group_size=8, lr=1e-2, kl_coef=0.01, steps=16, kl_steps=4)
    trainer = sepo.SEPO(model, graph, noise, count_threes, 6, cfg)
    before = count_threes(sepo.sample(model, graph, noise, 512, 6, steps=16)).mean().item()
    for _ in range(30):
        stats = trainer.step()
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    after = count_threes(sepo.sample(trainer.model, graph, noise, 512, 6, steps=16)).mean().item()
    assert after > before + 0.25, (before, after)


def test_single_epoch_needs_no_ratio():
    graph, noise, model = make("masked")
    stats = sepo.SEPO(model, graph, noise, count_threes, 6, small_cfg(epochs=1)).step()
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
