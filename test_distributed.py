"""Data-parallel SEPO under torch.distributed: 2 CPU processes (gloo) against one process holding their union.

    python -m pytest -q test_distributed.py
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sepo
import train_common
from test_sepo import count_threes, make, small_cfg, two_token_prompts

WORLD = 2
# no random draw after the rollout (no SNIS paths, every pl position), so the union's draws are the ranks'
CASES = {
    "grpo, uniform, pl": ("uniform", dict(grad="pl", ratio="rollout", micro_batch=3, kl_coef=0.1), False),
    "ppo batch baseline, masked, pl": ("masked", dict(grad="pl", ratio="rollout", pl_positions=6,
                                                      advantage="ppo", baseline="batch"), False),
    "ppo running + whitened, masked, rollout, KL budget, prompts": (
        "masked", dict(grad="rollout", ratio="rollout", advantage="ppo", baseline="running",
                       normalize_adv=True, kl_coef=0.5, kl_target=1e-3, micro_batch=2), True),
}
STATS = ("reward_mean", "reward_std", "kl", "kl_coef", "kl_shrink", "clip_frac", "loss", "ratio_mean",
         "ratio_max", "ratio_min", "grad_norm", "skipped")


@pytest.fixture(autouse=True)
def float64():
    """float64 here, as in the ranks: the union is compared to 1e-6 (restored afterwards)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def trainer_for(case: str, seed: int, batch_size: int = 2) -> sepo.SEPO:
    name, kw, prompts = CASES[case]
    graph, noise, model = make(name, seed=seed)
    cfg = small_cfg(batch_size=batch_size, lr=1e-2, **kw)
    prompt_fn = two_token_prompts if prompts else None
    return sepo.SEPO(model.double(), graph, noise, count_threes, 6, cfg, prompt_fn=prompt_fn)


def weights(trainer: sepo.SEPO) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def _worker(rank: int, store: str, out: str, case: str, job: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rolls, real = [], sepo.rollout
        sepo.rollout = lambda *a, **k: rolls.append(real(*a, **k)) or rolls[-1]  # record each rank's rollouts
        trainer = trainer_for(case, seed=rank)  # rank 1 starts elsewhere: SEPO takes rank 0's weights
        result = {"init": weights(trainer)}
        if job == "union":
            result["stats"] = [trainer.step() for _ in range(2)]
        else:  # resume: a copy of the state after one step, in a fresh trainer, gives the same next step
            trainer.step()
            state = copy.deepcopy(trainer.state_dict())
            trainer.step()
            again = trainer_for(case, seed=123)
            again.load_state_dict(state)
            again.step()
            result["resumed"] = weights(again)
        result.update(weights=weights(trainer), rolls=rolls)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, case: str, job: str) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), case, job), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_holding_their_union(tmp_path, monkeypatch, case):
    """Advantages, the gradient average, the loss scaling, micro-batches, the KL weight and every statistic:
    two ranks of 2 groups each take exactly the steps one process takes on the 4 groups of both."""
    ranks = run_ranks(tmp_path, case, "union")
    assert torch.equal(ranks[0]["init"], ranks[1]["init"])  # rank 0's weights everywhere
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # and the same update on every rank
    assert not torch.equal(ranks[0]["rolls"][0].x, ranks[1]["rolls"][0].x)  # each rank its own samples
    def joined(i: int) -> sepo.Rollout:  # iteration i's rollouts of both ranks, as one batch
        fields = zip(*(r["rolls"][i] for r in ranks))
        return sepo.Rollout(*(None if f[0] is None else torch.cat(f) for f in fields))
    union = [joined(i) for i in range(2)]
    monkeypatch.setattr(sepo, "rollout", lambda *a, **k: union.pop(0))
    one = trainer_for(case, seed=0, batch_size=2 * WORLD)
    init = weights(one)
    stats = [one.step() for _ in range(2)]
    moved = (weights(one) - init).norm()
    assert moved > 0 and (weights(one) - ranks[0]["weights"]).norm() <= 1e-6 * moved
    for mine, theirs in zip(stats, ranks[0]["stats"]):
        for key in STATS:  # a sum over ranks instead of the mean doubles grad_norm and loss
            assert theirs[key] == pytest.approx(mine[key], rel=1e-6, abs=1e-12), key
    if "KL budget" in case:  # the multiplier and the pull-back onto the budget, from the global batch's KL
        assert any(s["kl_shrink"] < 1 for s in stats) and any(s["kl_coef"] > 0.5 for s in stats)


@pytest.mark.slow
def test_a_two_rank_state_resumes_exactly_and_only_on_two_ranks(tmp_path):
    case = "ppo running + whitened, masked, rollout, KL budget, prompts"
    ranks = run_ranks(tmp_path, case, "resume")
    for r in ranks:  # each rank resumes its own random streams (with rank 0's, rank 1 would sample others)
        assert torch.equal(r["resumed"], r["weights"])
    assert not torch.equal(ranks[0]["rolls"][1].x, ranks[1]["rolls"][1].x)
    trainer = trainer_for(case, seed=0)  # a 2-rank state does not load into a process alone
    state = {**trainer.state_dict(), "generators": [trainer.state_dict()["generators"][0]] * WORLD}
    with pytest.raises(ValueError, match="state is of 2 ranks: resume it on as many, not 1"):
        trainer.load_state_dict(state)


class Gated(torch.nn.Module):
    """A model with a bias `extra` that takes part in the passes only while `use` is True."""

    def __init__(self, base: torch.nn.Module, n: int):
        super().__init__()
        self.base = base
        self.extra = torch.nn.Parameter(torch.zeros(n))
        self.use = True

    def forward(self, x, sigma):
        out = self.base(x, sigma)
        return out + self.extra if self.use else out


def gated_steps(seed: int, batch_size: int) -> float:
    """How far `extra` moves in a second step that does not use it, after a first that does."""
    graph, noise, base = make("uniform", seed=seed)
    model = Gated(base, graph.n).double()
    cfg = small_cfg(grad="rollout", ratio="rollout", epochs=1, kl_steps=0, lr=1e-2, batch_size=batch_size)
    trainer = sepo.SEPO(model, graph, noise, count_threes, 6, cfg)
    trainer.step()
    before = model.extra.detach().clone()
    model.use = False
    trainer.step()
    return (model.extra.detach() - before).abs().max().item()


def _gated_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(gated_steps(seed=rank, batch_size=2), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_parameter_no_rank_used_is_not_moved_as_alone(tmp_path):
    """Alone, a parameter with no gradient keeps grad None and Adam leaves it; on two ranks it once got a zero
    gradient, and Adam moved it by its momentum (6.7e-3 here)."""
    assert gated_steps(seed=0, batch_size=4) == 0.0
    mp.spawn(_gated_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)] == [0.0, 0.0]


def _exit_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    trainer_for(next(iter(CASES)), seed=rank)  # its Adam imports torch.distributed.nn unless done already
    functional = importlib.import_module("torch.distributed.nn.functional")
    defaults = [d for f in vars(functional).values() for d in getattr(f, "__defaults__", None) or ()]
    held = [d for d in defaults if isinstance(d, dist.ProcessGroup)]
    assert not held, "torch.distributed.nn holds the group"
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_rank_that_used_sepo_can_release_its_process_group(tmp_path):
    """torch.distributed.nn.functional's default arguments are group.WORLD as it was at import: imported first
    after init_process_group (Adam's constructor does so), they hold the group past destroy_process_group, and
    about half of such pairs of processes abort at exit (SIGABRT, "terminate called without an active
    exception"). sepo imports it first, so no default holds a group."""
    mp.spawn(_exit_worker, args=(str(tmp_path / "store"),), nprocs=WORLD)


# ---------------------------------------------------------------------------- the drivers under torchrun
HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(*argv: str) -> str:
    """python -m torch.distributed.run --nproc_per_node 2 argv (gloo on the CPU); its output, or the
    failure's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def driver_args(driver: str, tmp_path) -> list[str]:
    if driver == "train_text":
        from test_train_text import TINY
        return TINY
    import test_train_dna as TD
    from data import dna as D
    rows = [(f"chr{c}", i, D.CELL_TYPES[i % 4], float(i), "train", TD.rand_seq())
            for c in range(1, 7) for i in range(12)]
    data = TD.write_encode(tmp_path / "toy.tsv.gz", rows)
    return ["--data", data, *TD.TOY, "--corrector-steps", "0"]  # one SEPO run


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["train_dna", "train_text"])
def test_a_two_rank_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, driver):
    """--batch is the global batch (2 groups per rank here); rank 0 alone prints and writes; a run stopped
    after one iteration and continued under torchrun ends with the weights and history of one that never
    stopped."""
    argv = [*driver_args(driver, tmp_path), "--batch", "4"]
    ckpt = "sepo.pt" if driver == "train_dna" else "sepo_steps4.pt"
    log = torchrun(f"{driver}.py", *argv, "--out", str(tmp_path / "straight"), "--iters", "2")
    assert log.count(" 1/2 reward") == 1  # one progress line per iteration: rank 0's
    torchrun(f"{driver}.py", *argv, "--out", str(tmp_path / "resumed"), "--iters", "1")
    torchrun(f"{driver}.py", *argv, "--out", str(tmp_path / "resumed"), "--iters", "2")
    a, b = (torch.load(tmp_path / d / ckpt, weights_only=False) for d in ("straight", "resumed"))
    assert a["settings"]["world_size"] == WORLD and a["settings"]["batch_size"] == 2  # groups per rank
    assert len(a["trainer"]["generators"]) == WORLD  # every rank's streams, written by rank 0
    assert all(torch.equal(v, b["trainer"]["model"][k]) for k, v in a["trainer"]["model"].items())
    assert [h["reward_mean"] for h in a["history"]] == [h["reward_mean"] for h in b["history"]]
    results = "results.json" if driver == "train_dna" else "results_steps4.json"
    report = json.loads((tmp_path / "straight" / results).read_text())
    assert report["config"]["batch"] == 4  # rank 0's report


@pytest.mark.parametrize("driver", ["train_dna", "train_text"])
def test_a_global_batch_not_divisible_by_the_processes_is_an_error_before_any_work(tmp_path, monkeypatch,
                                                                                  driver):
    module = __import__(driver)
    for where in (module, train_common):  # as torchrun --nproc_per_node 2 sets it
        monkeypatch.setattr(where, "WORLD", 2)
    with pytest.raises(ValueError, match="--batch 3 is the groups of all 2 processes together: "
                                         "make it divisible by 2"):
        module.main(["--batch", "3", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
