"""Tests of data/drakes.py, DRAKES's evaluation protocol: each metric against a case worked by hand, a
brute-force computation or pymemesuite's own output (data/golden/)."""
from __future__ import annotations

import itertools
import math
import os
import random

import numpy as np
import pytest
import torch
from pyjaspar import jaspardb
from torch import nn

from data import drakes as D
from data.dna import kmer_counts

Tensor = torch.Tensor

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")
MC = 1.0 - 1e-3  # DRAKES's move chance mc(t) = (1 - 1e-3) t


class Constant(nn.Module):
    """p_theta(. | x_t) = softmax(logits[:4]) at every position whatever x_t; logits[4] is the MASK column."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), sigma.clone()))
        return self.logits.expand(*x.shape, 5)


def tokens(*seqs: str) -> Tensor:
    return torch.tensor([["ACGT".index(c) for c in s] for s in seqs])


# --- 1. The release. ----------------------------------------------------------------------------------------


def write_release(root: str, names: list[str], header: str = "seq,hepg2,k562,sknsh") -> None:
    for name in names:
        path = os.path.join(root, D.RELEASE[name].path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{header}\n{'A' * 200},1.0,2.0,3.0\n" if name == "data" else "stand-in")


def test_release_finder_names_every_missing_file_and_uses_overrides(tmp_path):
    base = str(tmp_path / "DRAKES_data")
    write_release(base, ["pretrained", "ft_oracle", "data"])
    with pytest.raises(FileNotFoundError) as e:
        D.find_release(base)
    msg = str(e.value)
    assert "2 file(s) missing" in msg and "pretrained" not in msg
    for name in ("eval_oracle", "atac"):
        assert f"{name}: {os.path.join(base, D.RELEASE[name].path)}: {D.RELEASE[name].what}" in msg
    elsewhere = str(tmp_path / "eval.ckpt")
    open(elsewhere, "w").close()
    write_release(base, ["atac"])
    found = D.find_release(base, {"eval_oracle": elsewhere, "drakes": None})  # None: no override
    assert found["eval_oracle"] == elsewhere
    assert found["atac"] == os.path.join(base, D.RELEASE["atac"].path)
    assert "drakes" not in found and "drakes_zero" not in found  # optional, absent
    write_release(base, ["drakes"])
    os.makedirs(tmp_path / "__MACOSX")
    found = D.find_release(str(tmp_path), {"eval_oracle": elsewhere})  # the one subfolder holding mdlm/
    assert found["drakes"] == os.path.join(base, D.RELEASE["drakes"].path)
    with pytest.raises(FileNotFoundError, match=r"drakes_zero: .*nowhere.ckpt \(override\)"):
        D.find_release(base, {"eval_oracle": elsewhere, "drakes_zero": str(tmp_path / "nowhere.ckpt")})
    with pytest.raises(ValueError, match="unknown release file"):
        D.find_release(base, {"eval-oracle": elsewhere})
    write_release(str(tmp_path / "copy"), ["pretrained"])
    with pytest.raises(ValueError, match="2 subfolders hold mdlm/"):
        D.find_release(str(tmp_path))
    empty = tmp_path / "empty"  # no mdlm/ anywhere: every required file is reported under it
    first = f"5 file\\(s\\) missing:\n  pretrained: {empty}/mdlm/outputs_gosai/pretrained.ckpt"
    with pytest.raises(FileNotFoundError, match=first):
        D.find_release(str(empty))


def test_data_table_header_is_checked_before_any_work(tmp_path):
    write_release(str(tmp_path), list(D.RELEASE), header="seq,HepG2 ,k562,sknsh")  # names ignore case, spaces
    assert set(D.find_release(str(tmp_path))) == set(D.RELEASE)
    write_release(str(tmp_path), ["data"], header="sequence,k562,sknsh")
    data = os.path.join(str(tmp_path), D.RELEASE["data"].path)
    with pytest.raises(ValueError, match=f"{data}: missing column\\(s\\) hepg2 "):
        D.find_release(str(tmp_path))


# --- 2. The sampler and App-Log-Lik. ------------------------------------------------------------------------


def test_one_sampler_step_follows_the_mdlm_closed_form():
    logits = [0.3, -1.0, 2.0, 0.0, 9.0]
    p = torch.softmax(torch.tensor(logits[:4]), 0)
    x = tokens("ACGTACGT").repeat(2, 1)
    x[0, ::2] = 4
    x[1, :] = 4
    ts = D.drakes_grid(128)
    for i in (0, 64, 126, 127):
        t, s = ts[i].item(), ts[i + 1].item()
        assert abs(s - (t - (1 - 1e-5) / 128)) < 1e-7  # DRAKES: s = t - dt; equal up to float32 rounding
        P = D.step_log_probs(Constant(logits), x, ts[i], ts[i + 1]).exp()
        unmask = (MC * t - MC * s) / (MC * t)  # = dt / t
        want = torch.zeros(2, 8, 5)
        keep = torch.nn.functional.one_hot(x.clamp(max=3), 4).float()
        want[..., :4] = torch.where((x == 4)[..., None], unmask * p, keep)
        want[..., 4] = torch.where(x == 4, s / t, 0.0)
        torch.testing.assert_close(P, want, rtol=2e-5, atol=1e-7)


def test_noise_removal_is_the_argmax_over_the_four_bases():
    class PerPosition(nn.Module):
        def forward(self, x, sigma):
            out = torch.zeros(*x.shape, 5)
            out[..., 4] = 50.0  # MASK has the largest logit everywhere: it must never win
            out[..., :4] = torch.arange(x.shape[1])[:, None].eq(torch.arange(4) * 2).float()  # base k at 2k
            return out
    x = torch.tensor([[4, 1, 4, 3, 4, 2, 4, 0]])
    assert D.remove_noise(PerPosition(), x).tolist() == [[0, 1, 1, 3, 2, 2, 3, 0]]


def test_sampler_draws_the_models_marginals_from_one_seeded_generator():
    logits = [0.0, 1.0, 2.0, -1.0, 5.0]
    model = Constant(logits)
    x = D.drakes_sample(model, num_samples=640, steps=128, batch_size=64, length=50)
    assert x.shape == (640, 50) and x.dtype == torch.long and int(x.max()) <= 3
    freq = torch.bincount(x.flatten(), minlength=4).double() / x.numel()
    # each token is a draw from p, except the ~0.13% still masked at the end, which take its argmax (base 2)
    torch.testing.assert_close(freq, torch.softmax(torch.tensor(logits[:4]), 0).double(), rtol=0, atol=0.012)
    assert torch.equal(x, D.drakes_sample(model, 640, 128, batch_size=64, length=50,
                                          generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(x, D.drakes_sample(model, 640, 128, batch_size=64, length=50, seed=1))


def test_corrector_steps_follow_each_predictor_step_but_the_last():
    model = Constant([0.0, 0.0, 0.0, 0.0, 0.0])
    x = D.drakes_sample(model, num_samples=3, steps=4, corrector_steps=2, length=10)
    assert x.shape == (3, 10) and int(x.max()) <= 3
    sig = D.NOISE(D.drakes_grid(4))[0]
    # predictor at t_0, 2 correctors at t_1, predictor at t_1, ..., predictor at t_3 (no corrector after the
    # last), noise removal at t_4
    want = [sig[0], sig[1], sig[1], sig[1], sig[2], sig[2], sig[2], sig[3], sig[3], sig[3], sig[4]]
    torch.testing.assert_close(torch.stack([s[0] for _, s in model.calls]), torch.stack(want))


def test_likelihood_weights_are_dt_over_t():
    w = D.likelihood_weights(128)
    t = torch.linspace(1, 1e-5, 129, dtype=torch.float64)[:-1]
    dt = (1 - 1e-5) / 128
    torch.testing.assert_close(w, (MC * t - MC * (t - dt)) / (MC * t), rtol=1e-12, atol=0)
    assert w[0].item() == pytest.approx(dt, rel=1e-12)
    assert w[-1].item() == pytest.approx(dt / (1e-5 + dt), rel=1e-9)


def test_app_log_lik_is_the_weighted_sum_over_the_masked_positions_it_drew():
    logits = [0.5, -0.5, 1.5, 0.0, 3.0]
    c = torch.log_softmax(torch.tensor(logits[:4]), 0).double()  # the model's fp32 log-probs
    model = Constant(logits)
    x0 = tokens("ACGTTGCAAC").repeat(6, 1)  # identical rows: the sum over rows does not depend on their order
    steps = 16
    ll = D.drakes_log_likelihood(model, x0, steps=steps, batch_size=3 * steps)
    assert ll.dtype == torch.float64 and ll.shape == (6,)
    sig = D.NOISE(D.drakes_grid(steps)[:-1])[0]
    w, total, seen = D.likelihood_weights(steps), 0.0, torch.zeros(steps)
    for xt, s in model.calls:
        level = (s[:, None] == sig[None, :]).float().argmax(1)
        seen += torch.bincount(level, minlength=steps)
        total += (w[level][:, None] * torch.where(xt == 4, c[x0[0]], 0.0)).sum().item()
    assert seen.tolist() == [6] * steps  # every sequence at every level once
    assert ll.sum().item() == pytest.approx(total, rel=1e-12)


def test_app_log_lik_of_a_constant_model_has_its_closed_form_mean():
    logits = [0.5, -0.5, 1.5, 0.0, 3.0]
    c = torch.log_softmax(torch.tensor(logits[:4], dtype=torch.float64), 0)
    x0 = torch.randint(0, 4, (1, 20), generator=torch.Generator().manual_seed(1)).repeat(2000, 1)
    steps = 16
    ll = D.drakes_log_likelihood(Constant(logits), x0, steps=steps)
    mc = MC * torch.linspace(1, 1e-5, steps + 1, dtype=torch.float64)[:-1]  # P(masked) at each level
    w = D.likelihood_weights(steps)
    mean = (w * mc).sum() * c[x0[0]].sum()  # E = sum_i w_i mc(t_i) sum_l log p(x0_l)
    sd = ((w ** 2 * mc * (1 - mc)).sum() * (c[x0[0]] ** 2).sum()).sqrt() / math.sqrt(len(x0))
    assert abs(ll.mean() - mean) < 4 * sd


# --- 3. Pred-Activity and ATAC-Acc. -------------------------------------------------------------------------


def test_pred_activity_and_atac_acc_read_the_chosen_column():
    preds = torch.tensor([[1.0, 9.0, 0.0], [4.0, 8.0, 0.0], [2.0, 7.0, 0.0], [10.0, 6.0, 0.0]])
    assert D.pred_activity(preds) == 3.0  # HepG2, column 0: (2 + 4) / 2, numpy's median of an even count
    assert D.pred_activity(preds, column=1) == 7.5
    probs = torch.tensor([[0.2, 0.5], [0.7, 0.51], [0.9, 0.1], [0.1, 0.9]])
    assert D.atac_accuracy(probs, column=1) == 50.0  # 0.5 itself is not > 0.5
    assert D.atac_accuracy(probs, column=0) == 50.0
    assert D.atac_accuracy(probs[:3], column=0) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="column 3 does not exist in predictions of shape \\(4, 3\\)"):
        D.pred_activity(preds, column=3)

    class Grelu(nn.Module):  # gReLU's LightningModel returns [B, tasks, 1]
        def forward(self, x):
            return torch.stack([x.sum(1), -x.sum(1)], 1)[..., None].float()
    x = torch.randint(0, 4, (70, 200), generator=torch.Generator().manual_seed(0))
    out = D.oracle_predictions(Grelu(), x, batch_size=32)
    torch.testing.assert_close(out, torch.stack([x.sum(1), -x.sum(1)], 1).double())

    class Bad(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 2, 2)
    with pytest.raises(ValueError, match="Bad returned \\(32, 2, 2\\) for 32 sequences"):
        D.oracle_predictions(Bad(), x, batch_size=32)
    with pytest.raises(ValueError, match="row 2, position 5: token 4 is not in 0..3"):
        bad = x.clone()
        bad[1, 4] = 4
        D.oracle_predictions(Grelu(), bad)


# --- 4. 3-mer Pearson. --------------------------------------------------------------------------------------


def test_reference_set_is_strictly_above_the_quantile():
    assert D.top_quantile_rows(np.arange(1001.0)).tolist() == [1000]  # the quantile is 999: not above itself
    assert D.top_quantile_rows(np.arange(2000.0)).tolist() == [1998, 1999]  # quantile 1997.001
    assert D.top_quantile_rows(np.ones(5000)).tolist() == []


def test_reference_set_reads_the_whole_table_in_float64(tmp_path):
    # 1001 rows: the 0.999 quantile is the 1000th smallest value, 1 + 1e-9; only 1 + 2e-9 lies above it. In
    # float32 both are 1.0 and the set would be empty.
    rng = random.Random(0)
    seqs = ["".join(rng.choice("ACGT") for _ in range(200)) for _ in range(1001)]
    hepg2 = ["0.0"] * 1001
    hepg2[17], hepg2[500] = "1.000000001", "1.000000002"
    path = tmp_path / "gosai_all.csv"
    path.write_text("seq,hepg2,k562,sknsh\n" + "".join(f"{s},{h},0.5,-0.5\n" for s, h in zip(seqs, hepg2)))
    ref = D.load_reference(str(path))
    assert ref.tolist() == [["ACGT".index(ch) for ch in seqs[500]]]


def test_kmer_pearson_by_hand():
    gen, ref = kmer_counts(tokens("AAAAC")), kmer_counts(tokens("AACGT"))
    # 3-mers seen: AAA (gen 2, ref 0), AAC (1, 1), ACG (0, 1), CGT (0, 1): deviations from the means 3/4
    want = (1.25 * -0.75 + 0.25 * 0.25 - 0.75 * 0.25 - 0.75 * 0.25) / math.sqrt(2.75 * 0.75)
    assert D.kmer_pearson(gen, ref) == pytest.approx(want, abs=1e-12)
    over_all_64 = float(np.corrcoef(gen, ref)[0, 1])
    assert D.kmer_pearson(gen, ref) != pytest.approx(over_all_64, abs=1e-3)


# --- 5. JASPAR Spearman: the FIMO scan. ---------------------------------------------------------------------


def test_pvalues_equal_brute_force_enumeration():
    bg = D.pymemesuite_background()
    counts = np.array([[8, 1, 1, 0], [0, 0, 10, 0], [3, 3, 2, 2], [0, 9, 0, 1], [1, 1, 1, 7], [5, 0, 5, 0]])
    S = D.scaled_log_odds(D.with_pseudocount(*D.meme_probabilities(counts), bg), bg)[0]
    pv = D.score_pvalues(S, bg)
    dist = np.zeros(S.shape[0] * D.PSSM_RANGE + 1)
    for word in itertools.product(range(4), repeat=S.shape[0]):
        dist[sum(S[j, a] for j, a in enumerate(word))] += np.prod(bg[list(word)])
    np.testing.assert_allclose(pv, np.minimum(1, np.cumsum(dist[::-1])[::-1]), rtol=1e-12, atol=1e-300)
    assert pv[0] == pytest.approx(1.0) and np.all(np.diff(pv) <= 0)


def brute_scan(x: Tensor, table: D.MotifTable, alpha: float, bg: np.ndarray, last_window: bool) -> Tensor:
    """Hits [2, M] by a loop over every window, scoring both strands and looking the p-value up."""
    hits = torch.zeros(2, len(table), dtype=torch.long)
    for m, S in enumerate(table.scores):
        w, pv = len(S), D.score_pvalues(S, bg)
        for row in x.tolist():
            for o in range(len(row) - w + (1 if last_window else 0)):
                fwd = sum(S[j, row[o + j]] for j in range(w))
                rev = sum(S[w - 1 - j, 3 - row[o + j]] for j in range(w))
                hits[0, m] += int(pv[fwd] < alpha)
                hits[1, m] += int(pv[rev] < alpha)
    return hits


def test_scan_agrees_with_a_window_by_window_loop():
    rng = np.random.default_rng(0)
    counts = [rng.integers(0, 20, (w, 4)) + np.eye(4)[rng.integers(0, 4, w)] * 30 for w in (5, 7, 7, 9)]
    bg = D.pymemesuite_background()
    x = torch.from_numpy(rng.integers(0, 4, (25, 40)))
    for alpha in (1e-3, 3e-2):
        table = D.motif_table(["m1", "m2", "m3", "m4"], ["a", "b", "b", "c"], counts, alpha=alpha)
        for last in (False, True):
            assert torch.equal(D.fimo_strand_hits(x, table, batch_size=7, last_window=last),
                               brute_scan(x, table, alpha, bg, last))


def test_planted_motif_is_found_on_both_strands_but_not_in_the_last_window():
    counts = [np.eye(4)[[2, 0, 3, 3, 0, 1, 0, 2, 0, 3]] * 50]  # GATTACAGAT
    table = D.motif_table(["MA"], ["GATTACAGAT"], counts)
    x = torch.ones(4, 40, dtype=torch.long)  # poly-C: no hit anywhere
    site = tokens("GATTACAGAT")[0]
    x[0, 5:15] = site
    x[1, 20:30] = 3 - site.flip(0)  # the reverse complement ATCTGTAATC
    x[2, 30:40] = site              # ends at the last base
    assert D.fimo_strand_hits(x[:1], table).tolist() == [[1], [0]]
    assert D.fimo_strand_hits(x[1:2], table).tolist() == [[0], [1]]
    assert D.fimo_strand_hits(x[2:3], table).tolist() == [[0], [0]]  # pymemesuite never scores this window
    assert D.fimo_strand_hits(x[2:3], table, last_window=True).tolist() == [[1], [0]]
    assert D.fimo_strand_hits(x[3:], table).tolist() == [[0], [0]]


def test_hit_threshold_is_strict():
    bg = D.pymemesuite_background()
    counts = np.array([[5, 2, 2, 1], [1, 6, 2, 1], [2, 2, 5, 1], [1, 1, 2, 6]])
    S = D.scaled_log_odds(D.with_pseudocount(*D.meme_probabilities(counts), bg), bg)[0]
    pv = D.score_pvalues(S, bg)
    s = int(S[np.arange(4), [0, 1, 2, 3]].sum())  # the score of ACGT
    assert D.hit_threshold(pv, pv[s]) > s  # p = alpha is not a hit
    assert D.hit_threshold(pv, np.nextafter(pv[s], 1.0)) <= s
    x = tokens("ACGT" + "T" * 6)
    at = D.motif_table(["m"], ["m"], [counts], alpha=float(pv[s]))
    above = D.motif_table(["m"], ["m"], [counts], alpha=float(np.nextafter(pv[s], 1.0)))
    assert D.fimo_strand_hits(x, at)[0, 0] + 1 == D.fimo_strand_hits(x, above)[0, 0]


def test_spearman_keeps_only_names_hit_in_both_sets():
    gen, ref = {"a": 1, "b": 2, "c": 3, "only_gen": 5}, {"a": 3, "b": 2, "c": 1, "only_ref": 9}
    assert D.jaspar_spearman(gen, ref) == pytest.approx(-1.0)  # with the absent names as 0 it would not be -1
    # ties share their average rank: ranks (1.5, 1.5, 3) and (1, 2, 3)
    ties = D.jaspar_spearman({"a": 1, "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 3})
    assert ties == pytest.approx(1.5 / math.sqrt(3))
    assert math.isnan(D.jaspar_spearman({"a": 1, "b": 2}, {"a": 1, "c": 2}))
    assert D.hits_by_name(torch.tensor([1, 2, 0, 3]), ["CTCF", "CTCF", "X", "Y"]) == {"CTCF": 3, "Y": 3}


def test_jaspar2022_core_latest_is_drakes_1956_motifs():
    table = D.jaspar2022_table()
    assert len(table) == 1956 and len(set(table.ids)) == 1956 and len(set(table.names)) == 1890
    assert table.ids[:2] == ("MA0004.1", "MA0006.1") and table.names[table.ids.index("MA0139.1")] == "CTCF"
    assert D.jaspar2022_table() is table  # cached per process


def golden_sequences(table: D.MotifTable) -> Tensor:
    """96 random sequences (Python's random, seed 2025: stable across versions) and 8 with planted sites of
    a fixed motif: its best word at offset 0, its reverse complement at offset 90, the word again ending at
    the last base. data/golden/fimo_jaspar2022_hits.tsv holds pymemesuite's hits on them."""
    rng = random.Random(2025)
    seqs = [[rng.randrange(4) for _ in range(200)] for _ in range(104)]
    for k, mid in enumerate(["MA0139.1", "MA0114.4", "MA0046.2", "MA0047.3", "MA0102.4", "MA0004.1",
                             "MA0053.1", "MA1930.1"]):
        best = table.scores[table.ids.index(mid)].argmax(1).tolist()
        w, row = len(best), seqs[96 + k]
        row[:w] = best
        row[90:90 + w] = [3 - b for b in best[::-1]]
        row[200 - w:] = best
    return torch.tensor(seqs)


def read_golden(name: str) -> list[list[str]]:
    with open(os.path.join(GOLDEN, name)) as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")][1:]


def test_scan_reproduces_pymemesuite():
    table = D.jaspar2022_table()
    hits = D.fimo_strand_hits(golden_sequences(table), table)
    rows = read_golden("fimo_jaspar2022_hits.tsv")
    assert [r[0] for r in rows] == list(table.ids)
    assert hits.T.tolist() == [[int(r[1]), int(r[2])] for r in rows]
    bg = D.pymemesuite_background()
    motifs = {m.matrix_id: m for m in jaspardb(release="JASPAR2022").fetch_motifs(collection="CORE")}
    for mid, scale, offset, threshold, score, pvalue in read_golden("fimo_jaspar2022_pvalues.tsv"):
        counts = np.array([motifs[mid].counts[b] for b in "ACGT"]).T
        p = D.with_pseudocount(*D.meme_probabilities(counts), bg)
        S, our_scale, our_offset = D.scaled_log_odds(p, bg)
        assert np.array_equal(S, table.scores[table.ids.index(mid)])
        assert (our_scale, our_offset) == (float(scale), float(offset))
        assert table.thresholds[table.ids.index(mid)] == int(threshold)
        assert D.score_pvalues(S, bg)[int(score)] == float(pvalue)  # to the last bit


# --- 6. The scorer. -----------------------------------------------------------------------------------------


def test_scorer_agrees_with_the_metrics_one_by_one():
    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return torch.nn.functional.one_hot(x, 4).float().mean(1) @ self.w
    g = torch.Generator().manual_seed(3)
    ref, x = torch.randint(0, 4, (12, 200), generator=g), torch.randint(0, 4, (10, 200), generator=g)
    pretrained, oracle = Constant([0.1, 0.2, 0.3, 0.4, 0.0]), Oracle()
    row = D.DrakesScorer(pretrained, oracle, oracle, ref, atac_column=2, steps=8)(x)
    table = D.jaspar2022_table()
    gen_names = D.hits_by_name(D.fimo_strand_hits(x, table).sum(0), table.names)
    ref_names = D.hits_by_name(D.fimo_strand_hits(ref, table).sum(0), table.names)
    preds = oracle(x).double()
    want = {"Pred-Activity": float(np.median(preds[:, 0].detach())),
            "ATAC-Acc %": 100 * (preds[:, 2] > 0.5).double().mean().item(),
            "3-mer Pearson": D.kmer_pearson(kmer_counts(x), kmer_counts(ref)),
            "JASPAR Spearman": D.jaspar_spearman(gen_names, ref_names),
            "App-Log-Lik": float(np.median(D.drakes_log_likelihood(pretrained, x, steps=8).numpy()))}
    assert list(row) == list(D.METRICS)
    for k in D.METRICS:
        assert row[k] == pytest.approx(want[k], rel=1e-12), k
