"""Tests of train_dna.py: data validators, the chromosome split, each metric against a hand
computation, the whole pipeline at toy size (cached, resumable, reproducible), and the --drakes run on a
stand-in DRAKES release written by test_drakes_models.write_drakes_release. CPU, seconds."""
import gzip
import hashlib
import shutil
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

import train_dna as T
from data import dna as D

RNG = np.random.default_rng(0)


def rand_seq(n: int = 200) -> str:
    return "".join(RNG.choice(list("ACGT"), n))


def write_encode(path, rows) -> str:
    with gzip.open(path, "wt") as f:
        f.write("chrom\tsummit\tcell_type\tsignal\tsplit\tsequence\n")
        for r in rows:
            f.write("\t".join(map(str, r)) + "\n")
    return str(path)


def write_gosai(path, header, rows) -> str:
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(map(str, r)) + "\n")
    return str(path)


# ---------------------------------------------------------------------------- data validators


def test_encode_sequences_maps_acgt_and_lowercase():
    x = D.encode_sequences(["ACGT", "acgt"], length=4)
    assert x.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert D.decode_sequences(x) == ["ACGT", "ACGT"]


def test_encode_sequences_bad_letter_names_row_and_position():
    with pytest.raises(ValueError, match=r"row 2: invalid base 'N' at position 3"):
        D.encode_sequences(["ACGT", "ACNT"], length=4)


def test_encode_sequences_wrong_length_names_row():
    with pytest.raises(ValueError, match=r"row 3: sequence has length 5, expected 4"):
        D.encode_sequences(["ACGT", "ACGT", "ACGTA"], length=4)


def test_load_encode_good_and_bad(tmp_path):
    good = [("chr1", 10, "HepG2", 2.5, "test", rand_seq()), ("chr3", 20, "K562", 1.0, "train", rand_seq())]
    d = D.load_encode(write_encode(tmp_path / "ok.tsv.gz", good))
    assert d.x.shape == (2, 200) and d.y.tolist() == [1, 2] and d.chrom.tolist() == ["chr1", "chr3"]
    assert d.signal.tolist() == [2.5, 1.0]
    bad_label = good + [("chr4", 1, "Liver", 1.0, "train", rand_seq())]
    with pytest.raises(ValueError, match=r"row 3: unknown cell_type 'Liver'"):
        D.load_encode(write_encode(tmp_path / "b1.tsv.gz", bad_label))
    bad_base = good + [("chr4", 1, "HepG2", 1.0, "train", "N" + rand_seq(199))]
    with pytest.raises(ValueError, match=r"row 3: invalid base 'N' at position 1"):
        D.load_encode(write_encode(tmp_path / "b2.tsv.gz", bad_base))
    short = good + [("chr4", 1, "HepG2", 1.0, "train", rand_seq(150))]
    with pytest.raises(ValueError, match=r"row 3: sequence has length 150, expected 200"):
        D.load_encode(write_encode(tmp_path / "b3.tsv.gz", short))
    bad_split = good + [("chr4", 1, "HepG2", 1.0, "holdout", rand_seq())]
    with pytest.raises(ValueError, match=r"row 3: unknown split 'holdout'"):
        D.load_encode(write_encode(tmp_path / "b4.tsv.gz", bad_split))


def test_vendored_file_loads_and_matches_its_provenance():
    d = D.load_encode()
    assert len(d) == 47872 and d.x.shape == (47872, 200)
    assert torch.bincount(d.y).tolist() == [11968] * 4  # 12k per cell type, balanced
    assert set(np.unique(d.chrom)) >= {"chr1", "chr2", "chrX"}
    # chrom_name() leaves its names as they are written: 24 chromosomes, the same counts, the same hash
    names, counts = np.unique(d.chrom, return_counts=True)
    assert set(names) == {f"chr{k}" for k in range(1, 23)} | {"chrX", "chrY"}
    per_chromosome = dict(zip(names, counts.tolist()))
    assert per_chromosome["chr1"] == 4565 and per_chromosome["chrY"] == 39
    assert D.load_data("").sha256 == "8b5649f6f32e2dcb"


HEADER = ["seq", "hepg2", "k562", "sknsh", "chr"]


@pytest.mark.parametrize("name", ["gosai_all.csv", "gosai_all.csv.gz"])
def test_gosai_file_without_a_chromosome_column_gets_a_fixed_split(tmp_path, name):
    """The DRAKES file has exactly the header seq,hepg2,k562,sknsh: ten seeded pseudo-chromosomes."""
    rows = [(rand_seq(), RNG.normal(), RNG.normal(), RNG.normal()) for _ in range(300)]
    path = str(tmp_path / name)
    with (gzip.open if name.endswith(".gz") else open)(path, "wt") as f:
        f.write("seq,hepg2,k562,sknsh\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    a, b = D.load_data(path), D.load_data(path)
    assert a.kind == "gosai" and len(a) == 300 and (a.chrom == b.chrom).all()  # reproducible
    with open(path, "rb") as f:  # the cached stages' key: the file's hash, kept by every subset
        assert a.sha256 == hashlib.sha256(f.read()).hexdigest()[:16] == a.subset(a.chrom == "chr1").sha256
    names, counts = np.unique(a.chrom, return_counts=True)
    assert set(names) == {f"chr{k}" for k in range(1, 11)} and counts.min() > 10  # about 30 each
    halves = D.oracle_chromosomes(a.chrom, "chr1", "chr2")
    assert set(halves[0]) | set(halves[1]) == {f"chr{k}" for k in range(3, 11)}


def test_gosai_loader_good(tmp_path):
    rows = [(rand_seq(), 1.5, -0.2, 0.3, "chr1"), (rand_seq(), -1.0, 2.0, 0.0, "7"),
            (rand_seq(), 0, 0, 0, "Chr7"), (rand_seq(), 0, 0, 0, "2.0"), (rand_seq(), 0, 0, 0, "chrX")]
    d = D.load_data(write_gosai(tmp_path / "g.csv", HEADER, rows))
    assert d.kind == "gosai" and d.x.shape == (5, 200)
    assert torch.allclose(d.y[:3], torch.tensor([[1.5, -0.2, 0.3], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
    # bare numbers get the chr prefix, any case of it is chr, and a number written as a float (2.0) is a
    # number
    assert d.chrom.tolist() == ["chr1", "chr7", "chr7", "chr2", "chrX"]
    assert d.signal.tolist() == [1.5, -1.0, 0.0, 0.0, 0.0]  # top set ranked by HepG2 activity


@pytest.mark.parametrize("header,rows,msg", [
    (["seq", "hepg2", "k562", "chr"], [("A" * 200, 1, 2, "chr1")], r"missing column 'sknsh'"),
    (HEADER, [("A" * 200, 1, 2, 3, "chr1"), ("A" * 200, "high", 2, 3, "chr1")],
     r"row 2: column 'hepg2' is not a number"),
    (HEADER, [("A" * 200, 1, 2, "nan", "chr1")], r"row 1: column 'sknsh' is not finite"),
    (HEADER, [("A" * 200, 1, 2, 3, "chr1"), ("A" * 200, 1, 2, "chr1")],
     r"row 2 has 4 fields, the header has 5"),
    (HEADER, [("A" * 199 + "X", 1, 2, 3, "chr1")], r"row 1: invalid base 'X' at position 200"),
    (HEADER, [("A" * 200, 1, 2, 3, "chr1"), ("ACGT", 1, 2, 3, "chr1")], r"row 2: sequence has length 4"),
    (HEADER, [("A" * 200, 1, 2, 3, "chr1"), ("A" * 200, 1, 2, 3, "")], r"row 2: no chromosome"),
    (HEADER, [("A" * 200, 1, 2, 3, "nan")], r"row 1: no chromosome \('nan'\)"),
])
def test_gosai_loader_malformed(tmp_path, header, rows, msg):
    with pytest.raises(ValueError, match=msg):
        D.load_gosai(write_gosai(tmp_path / "bad.csv", header, rows))


def random_gosai_rows(n: int = 6) -> list:
    return [(rand_seq(), 0.1 * i, 0.0, 0.0, f"chr{1 + i % 3}") for i in range(n)]


@pytest.mark.parametrize("header", [["seq", "hepg2", "k562", "sknsh", c]
                                    for c in ("Chr", "CHROM", "Chromosome")]
                         + [["SEQ", "HepG2", "K562", " SKNSH", "chrom "]])
def test_gosai_column_names_ignore_case_and_spaces(tmp_path, header):
    """Before, a chromosome column spelled Chr / CHROM / Chromosome was silently missed: the rows got random
    pseudo-chromosomes (and HepG2 was a missing column)."""
    rows = random_gosai_rows()
    d = D.load_data(write_gosai(tmp_path / "g.csv", header, rows))
    assert d.chrom.tolist() == [r[4] for r in rows]
    assert d.y[:, 0].tolist() == pytest.approx([r[1] for r in rows])


def test_gosai_utf8_bom_before_the_first_column(tmp_path):
    """Excel's 'CSV UTF-8' starts with a BOM: before, it hid the first column's name ('chr' here)."""
    rows = random_gosai_rows()
    path = tmp_path / "bom.csv"
    with open(path, "w", encoding="utf-8-sig") as f:
        f.write("chr,seq,hepg2,k562,sknsh\n" + "".join(f"{r[4]},{r[0]},{r[1]},{r[2]},{r[3]}\n" for r in rows))
    assert D.load_data(str(path)).chrom.tolist() == [r[4] for r in rows]


def test_a_column_named_twice_in_different_case_is_an_error(tmp_path):
    rows = [(*r, "chr9") for r in random_gosai_rows()]
    with pytest.raises(ValueError, match=r"bad.csv: column 'chr' appears more than once"):
        D.load_data(write_gosai(tmp_path / "bad.csv", [*HEADER, "Chr"], rows))


NAMES = {"chr1": "chr1", "1": "chr1", "Chr1": "chr1", "CHR01": "chr1", "01": "chr1", "2.0": "chr2",
         "chr2": "chr2", "X": "chrX", "chrx": "chrX", "x": "chrX", "mt": "chrMT", "ChrM": "chrM",
         "chr3": "chr3", "chr4": "chr4"}


def test_chromosome_names_are_normalised_alike_in_both_formats(tmp_path):
    """Before, the ENCODE reader kept names as written (1, Chr1 were not chr1: they trained the models while
    chr1 was the test set) and the Gosai reader kept x / chrx apart from X and 01 apart from 1."""
    rows = [(c, 0, "HepG2", 1.0, "train", rand_seq()) for c in NAMES]
    enc = D.load_data(write_encode(tmp_path / "e.tsv.gz", rows))
    gos = D.load_data(write_gosai(tmp_path / "g.csv", HEADER, [(rand_seq(), 0, 0, 0, c) for c in NAMES]))
    assert enc.chrom.tolist() == gos.chrom.tolist() == list(NAMES.values())
    s = D.split_by_chromosome(enc, "1", "Chr2")  # the flags' names are normalised too: 1 means chr1
    assert len(s["test"]) == 5 and len(s["val"]) == 2 and not {"chr1", "chr2"} & set(s["train"].chrom)
    assert T.parse_args(["--test-chrom", "01", "--val-chrom", "x"]).test_chrom == "chr1"
    with pytest.raises(ValueError, match=r"test chromosome: no chromosome \('chr'\)"):
        D.split_by_chromosome(enc, "chr", "chr2")
    with pytest.raises(ValueError, match="must differ, both are chrX"):
        D.split_by_chromosome(enc, "chrX", "x")
    blank = [("chr1", 0, "HepG2", 1.0, "train", rand_seq()), (" ", 0, "HepG2", 1.0, "train", rand_seq())]
    with pytest.raises(ValueError, match=r"b.tsv.gz: row 2: no chromosome \(''\)"):
        D.load_data(write_encode(tmp_path / "b.tsv.gz", blank))


# ---------------------------------------------------------------------------- oracle split


def test_oracle_split_is_chromosome_disjoint_on_the_real_data():
    d = D.load_encode()
    ft, ev = D.oracle_chromosomes(d.chrom, "chr1", "chr2")
    assert not set(ft) & set(ev)
    assert set(ft) | set(ev) == set(np.unique(d.chrom)) - {"chr1", "chr2"}
    n_ft, n_ev = np.isin(d.chrom, ft).sum(), np.isin(d.chrom, ev).sum()
    assert abs(n_ft - n_ev) < 0.05 * (n_ft + n_ev)  # balanced halves
    # and no sequence is in both oracles' training sets
    assert not (np.isin(d.chrom, ft) & np.isin(d.chrom, ev)).any()


def test_test_and_validation_chromosomes_must_differ(tmp_path):
    # otherwise the validation loss (and early stopping on it) would read the test chromosome
    rows = [(rand_seq(), 0, 0, 0, f"chr{k}") for k in (1, 2, 3)]
    d = D.load_data(write_gosai(tmp_path / "g.csv", HEADER, rows))
    with pytest.raises(ValueError, match="must differ, both are chr1"):
        D.split_by_chromosome(d, "chr1", "chr1")


def test_oracle_split_needs_two_training_chromosomes():
    with pytest.raises(ValueError, match="at least two training chromosomes"):
        D.oracle_chromosomes(np.array(["chr1", "chr2", "chr3"]), "chr1", "chr2")


def test_chromosome_split_partitions_the_rows_and_needs_test_and_validation():
    chrom = np.array(["chr1", "chr2", "chr3", "chr3", "chr1", "chr4"])
    d = D.DnaData(torch.arange(6)[:, None].repeat(1, D.SEQ_LEN) % 4, chrom, torch.tensor([1, 0, 1, 2, 1, 3]),
                  torch.arange(6.0), "encode")
    s = D.split_by_chromosome(d, "chr1", "chr2")
    assert [len(s[k]) for k in ("train", "val", "test")] == [3, 1, 2]
    assert set(s["train"].chrom) == {"chr3", "chr4"} and set(s["test"].chrom) == {"chr1"}
    with pytest.raises(ValueError, match="test \\(chr9\\)"):
        D.split_by_chromosome(d, "chr9", "chr2")
    # the reference set: HepG2 rows (class 1) by signal, highest first
    assert D.top_hepg2(d, 2).equal(d.x[[4, 2]])


# ---------------------------------------------------------------------------- metrics (hand-computed)


def test_kmer_counts_by_hand():
    x = D.encode_sequences(["ACGTA", "AAAAA"], length=5)
    c = D.kmer_counts(x, 3)
    # ACG = 0*16+1*4+2 = 6, CGT = 16+8+3 = 27, GTA = 32+12+0 = 44, AAA = 0 (three times)
    expect = torch.zeros(64)
    expect[[6, 27, 44]] = 1
    expect[0] = 3
    assert torch.equal(c, expect)


def test_pearson_and_spearman_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    # centred: (-1, 0, 1) . (-1, 1, 0) = 1; norms sqrt(2) each -> 0.5
    assert D.pearson(a, b) == pytest.approx(0.5)
    # ranks of (10, 20, 20, 40) are (1, 2.5, 2.5, 4); of (1, 2, 3, 4) themselves
    # centred (-1.5, 0, 0, 1.5) . (-1.5, -0.5, 0.5, 1.5) = 4.5; norms sqrt(4.5), sqrt(5)
    rho = D.spearman(torch.tensor([10.0, 20, 20, 40]), torch.tensor([1.0, 2, 3, 4]))
    assert rho == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_pearson_of_a_constant_is_nan_whatever_the_dtype():
    """Before, a constant float64 input gave ~0 or +-1: its mean is not always exactly the constant."""
    c, n = 0.00010490011715303971, 924
    a = torch.full((n,), c, dtype=torch.float64)
    assert math.isnan(D.pearson(a, torch.randn(n, dtype=torch.float64)))
    assert math.isnan(D.pearson(torch.randn(n, dtype=torch.float64), a))
    assert math.isnan(D.pearson(a, torch.full((n,), 0.18905338179353307, dtype=torch.float64)))
    assert math.isnan(D.pearson(a.float(), torch.randn(n)))
    assert math.isnan(D.spearman(a, torch.randn(n, dtype=torch.float64)))
    assert math.isnan(D.pearson(torch.zeros(0), torch.zeros(0)))


def test_motif_hits_by_hand_both_strands():
    # rows A, C, G, T; consensus "AC" scores 4, the worst window -2; the reverse-complement motif has
    # consensus "GT"
    pwm = torch.tensor([[2.0, -1.0], [-1.0, 2.0], [-1.0, -1.0], [-1.0, -1.0]])
    x = D.encode_sequences(["ACGT", "CCCA"], length=4)
    # threshold 1 (score 4 only): ACGT has AC (forward) and GT (reverse strand); CCCA none -> 2
    assert D.motif_hits(x, [pwm], 1.0).tolist() == [2.0]
    # threshold 0.5 (score >= -2 + 0.5 * 6 = 1): forward AC=4 in ACGT, CC=1 twice in CCCA; reverse GT=4 in
    # ACGT; every other window (CG, GT fwd, CA; AC, CG, CC, CA rev) scores -2 -> 4
    assert D.motif_hits(x, [pwm], 0.5).tolist() == [4.0]
    # a window that would run past the end never counts: a 2-wide motif on a 1-base sequence
    assert D.motif_hits(D.encode_sequences(["A"], length=1), [pwm], 0.0).tolist() == [0.0]


def test_hepg2_score_and_auroc_by_hand():
    # ENCODE: log-odds = logit_HepG2 - logsumexp(other logits); HepG2 is class 1
    even = D.hepg2_score(torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]]), "encode").item()
    assert even == pytest.approx(0.0, abs=1e-6)
    low = D.hepg2_score(torch.tensor([[2.0, 0, 0, 0]]), "encode").item()
    assert low == pytest.approx(-math.log(math.e ** 2 + 2))
    assert D.hepg2_score(torch.tensor([[1.5, 9.0, 9.0]]), "gosai").item() == 1.5
    # AUROC: positives scored 0.9, 0.4; negatives 0.5, 0.1 -> 3 of the 4 pairs ordered right
    assert D.auroc(torch.tensor([0.9, 0.4, 0.5, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(0.75)


def test_jaspar_motifs_load_offline():
    names, pwms = D.load_jaspar_pwms()
    assert len(pwms) > 500 and all(p.shape[0] == 4 for p in pwms)
    # log2-odds of a probability vector: 2^pwm / 4 sums to one per column
    assert torch.allclose((2 ** pwms[0] / 4).sum(0), torch.ones(pwms[0].shape[1]), atol=1e-5)


# ---------------------------------------------------------------------------- the pipeline at toy size


TOY = ["--threads", "1", "--hidden", "8", "--pretrain-steps", "4", "--pretrain-batch", "8",  # toy sizes
       "--val-every", "2", "--oracle-dim", "12", "--oracle-downsamples", "3", "--oracle-epochs", "1",
       "--access-epochs", "1", "--oracle-batch", "16", "--iters", "2", "--batch", "2", "--group", "2",
       "--steps", "3", "--kl-steps", "2", "--pl-positions", "2", "--ckpt-every", "1", "--n-eval", "6",
       "--bon-max", "2", "--elbo-t", "2"]


def docs_script(name: str):
    """A script of docs/ (they are not a package) as a module."""
    path = os.path.join(os.path.dirname(__file__), "docs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return write_encode(tmp_path_factory.mktemp("data") / "toy.tsv.gz", toy_rows())


def toy_rows() -> list:
    """Twelve rows on each of chr1..chr6, the four cell types in turn."""
    return [(f"chr{c}", i, D.CELL_TYPES[i % 4], float(i), "train", rand_seq())
            for c in range(1, 7) for i in range(12)]


def run(out, data, *extra):
    return T.main(["--data", data, "--out", str(out), *TOY, *extra])


@pytest.mark.slow
def test_pipeline_smoke_cached_and_reproducible(tmp_path, toy_data, capsys):
    toy_data = str(shutil.copy(toy_data, tmp_path / "toy.tsv.gz"))  # this test changes the file at the end
    res = run(tmp_path / "a", toy_data, "--iters", "2")  # best-of-N budget: 1 + ceil(2 * 2 * 2 / 6) = 3
    assert set(res) == {"Pre-trained", "SEPO", "SEPO with GF", "Best-of-3 (ft oracle)", "Data (chr1, HepG2)"}
    for r in res.values():
        for k in ("Pred-Activity", "ATAC-Acc %", "3-mer corr", "App-Log-Lik", "Reward (ft oracle)"):
            assert math.isfinite(r[k]), k
        assert 0 <= r["ATAC-Acc %"] <= 100 and r["App-Log-Lik"] < 0
    for f in ("results.md", "results.json", "curves.png", "pretrain.pt",
              "ft_oracle.pt", "eval_oracle.pt", "access.pt", "sepo.pt", "sepo_gf.pt", "samples_sepo.txt"):
        assert os.path.getsize(tmp_path / "a" / f) > 0, f
    assert not [f for f in os.listdir(tmp_path / "a") if ".tmp" in f]  # atomic writes leave no temp files
    table = (tmp_path / "a" / "results.md").read_text()
    assert len([l for l in table.splitlines() if l.startswith("| ")]) == 1 + 5 and "| SEPO with GF |" in table
    samples = (tmp_path / "a" / "samples_pre-trained.txt").read_text().split()
    assert len(samples) == 6 and all(len(s) == 200 and set(s) <= set("ACGT") for s in samples)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [h["iteration"] for h in saved["runs"]["SEPO"]["history"]] == [1, 2]
    assert [p["iteration"] for p in saved["runs"]["SEPO"]["probes"]] == [1, 2]  # ckpt_every 1: a probe each
    tradeoff = docs_script("dna_tradeoff")
    tradeoff.main(*[str(tmp_path / "a")] * 2, out=str(tmp_path / "tradeoff.png"))  # the run twice: + a point
    assert os.path.getsize(tmp_path / "tradeoff.png") > 1000
    assert [b["N"] for b in saved["best_of_n"]] == [1, 2]
    weak = {k for k, r in saved["oracles"].items()
            if k != "agreement" and any(m.endswith("auroc") and v < 0.6 for m, v in r.items())}
    log = capsys.readouterr().out
    warned = {k for k in saved["oracles"] if f"WARNING: {k} is near chance" in log}
    assert warned == weak  # a warning per weak model
    docs_script("frontier").main("dna", [str(tmp_path / "a")], out=str(tmp_path / "frontier.png"))
    table = capsys.readouterr().out.splitlines()
    # the budget of best-of-N is 1 + ceil(2 * 2 * 2 / 6) = 3
    sepo_row = next(l for l in table if l.startswith("| pl/snis | alpha 0.2 | 3 |"))
    assert f"| {res['SEPO']['Pred-Activity']:.3f} | " in sepo_row
    assert os.path.getsize(tmp_path / "frontier.png") > 1000
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in table if l.startswith("| best-of-")]
    assert [c[2] for c in cells] == ["1", "2"]  # N, its sampling budget
    assert cells[0][3] == "<= 0.00"  # KL <= log N - ...
    # second run: every stage comes from the cache and the numbers are identical
    again = run(tmp_path / "a", toy_data, "--iters", "2")
    log = capsys.readouterr().out
    assert "[pretrain] cached" in log and "[ft_oracle] cached" in log and "[sepo] cached" in log
    assert "[sepo] it" not in log
    for name in res:
        for k, v in res[name].items():
            if k != "pred":
                assert again[name][k] == pytest.approx(v, nan_ok=True), (name, k)
    # a checkpoint made with other settings is refused, not silently reused
    with pytest.raises(ValueError, match="other settings"):
        run(tmp_path / "a", toy_data, "--iters", "2", "--pretrain-lr", "0.1")
    # a shorter run is not the 2-iteration model
    with pytest.raises(ValueError, match="holds 2 iterations, more than --iters 1"):
        run(tmp_path / "a", toy_data, "--iters", "1")
    # another --access-epochs concerns the accessibility CNN only: the Enformer oracles stay cached
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"access.pt was made with other settings \{'access_epochs'"):
        run(tmp_path / "a", toy_data, "--iters", "2", "--access-epochs", "2")
    assert "[ft_oracle] cached" in capsys.readouterr().out
    # retrained oracles (deleted, other --oracle-lr) never meet a SEPO checkpoint made against the old ones
    for f in ("ft_oracle.pt", "eval_oracle.pt", "access.pt"):
        os.remove(tmp_path / "a" / f)
    with pytest.raises(ValueError, match=r"sepo.pt was made with other settings \{'oracle_lr'"):
        run(tmp_path / "a", toy_data, "--iters", "2", "--oracle-lr", "0.01")
    # the data file changed in place (same path, other content): no stage is reused
    write_encode(toy_data, toy_rows())
    with pytest.raises(ValueError, match=r"pretrain.pt was made with other settings \{'data_sha256'"):
        run(tmp_path / "a", toy_data, "--iters", "2")


def seeds_used(monkeypatch, main, *argv) -> set:
    """Every seed main(argv) gives torch.manual_seed or a torch.Generator (test_train_text.py uses it too)."""
    seen = set()

    class Generator(torch.Generator):
        def manual_seed(self, seed):
            seen.add(seed)
            return super().manual_seed(seed)
    with monkeypatch.context() as m:
        m.setattr(torch, "Generator", Generator)
        m.setattr(torch, "manual_seed", lambda seed, f=torch.manual_seed: seen.add(seed) or f(seed))
        main(list(argv))
    return seen


@pytest.mark.slow
def test_seeds_share_no_random_stream(tmp_path, toy_data, monkeypatch):
    """Stage k seeds its streams with 1000 * --seed + k. Before, it was --seed + k: --seed 1's fine-tuning
    oracle (1 + 10) started where --seed 0's evaluation oracle (0 + 11) did, and its plain SEPO run drew
    --seed 0's corrector run's stream."""
    used = []
    for s in "01":
        argv = ["--data", toy_data, "--out", str(tmp_path / s), *TOY, "--seed", s, "--iters", "1"]
        used.append(seeds_used(monkeypatch, T.main, *argv))
    assert len(used[0]) >= 10 and not used[0] & used[1]


@pytest.mark.slow
def test_sepo_resume_is_exact(tmp_path, toy_data):
    flags = ("--corrector-steps", "0", "--ckpt-every", "2", "--bon-max", "3")  # best-of-N curve: N = 1, 2, 3
    straight = run(tmp_path / "s", toy_data, "--iters", "2", *flags)
    run(tmp_path / "r", toy_data, "--iters", "1", *flags)  # stop after one iteration ...
    resumed = run(tmp_path / "r", toy_data, "--iters", "2", *flags)  # ... and continue
    assert set(straight) == {"Pre-trained", "SEPO", "Best-of-3 (ft oracle)", "Data (chr1, HepG2)"}
    saved = [json.loads((tmp_path / d / "results.json").read_text()) for d in "sr"]
    assert [b["N"] for b in saved[0]["best_of_n"]] == [1, 2, 3]
    a, b = (s["runs"]["SEPO"] for s in saved)
    assert [p["iteration"] for p in b["probes"]] == [p["iteration"] for p in a["probes"]] == [2]  # not [1, 2]
    a, b = a["history"], b["history"]
    assert [h["reward_mean"] for h in a] == [h["reward_mean"] for h in b]
    assert [h["kl"] for h in a] == pytest.approx([h["kl"] for h in b])
    assert resumed["SEPO"]["Pred-Activity"] == pytest.approx(straight["SEPO"]["Pred-Activity"])


def test_pretrain_validation_rows_are_a_fixed_random_subset(tmp_path, monkeypatch):
    """Before, the validation loss read val.x[:2048]: the vendored file is sorted by cell type, so only two of
    its four were measured. Now 2048 rows drawn with the seed: every class, the same rows at each check, and
    the pre-trained weights do not depend on the validation set."""
    def data(x, cls):
        return D.DnaData(x, np.array(["chr2"] * len(x)), cls, torch.zeros(len(x)), "encode")
    cls = torch.arange(4).repeat_interleave(1024)  # sorted by class, as the vendored file
    xval = torch.randint(4, (len(cls), D.SEQ_LEN), generator=torch.Generator().manual_seed(0))
    xval[:, 0] = cls  # the first base tells the class
    xtrain = torch.randint(4, (64, D.SEQ_LEN), generator=torch.Generator().manual_seed(1))
    train = data(xtrain, torch.zeros(64).long())
    seen, loss = [], T.sepo.pretrain_loss

    def spy(model, graph, noise, x, **kw):
        if not model.training:
            seen.append(x.cpu())
        return loss(model, graph, noise, x, **kw)
    monkeypatch.setattr(T.sepo, "pretrain_loss", spy)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = T.parse_args([*TOY, "--out", str(tmp_path / "a")])  # validation at steps 2 and 4
    model = T.pretrain(cfg, train, data(xval, cls), torch.device("cpu"))
    rows = torch.cat(seen)
    assert len(rows) == 2 * 2048 and rows[:2048].equal(rows[2048:])
    assert len(torch.unique(rows[:2048], dim=0)) == 2048
    assert set(rows[:, 0].tolist()) == {0, 1, 2, 3}  # before: {0, 1}
    cfg_b = T.parse_args([*TOY, "--out", str(tmp_path / "b")])
    other = T.pretrain(cfg_b, train, data(xval.flip(0), cls), "cpu")
    assert all(p.equal(q) for p, q in zip(model.parameters(), other.parameters()))


def test_data_row_is_the_top_hepg2_set_of_the_test_chromosome(tmp_path, monkeypatch):
    """Before, the Data row took the first n_eval HepG2 rows in file order; now top_hepg2(), the way the
    3-mer / JASPAR reference set is chosen: the highest signal among the HepG2 DHS."""
    signal = torch.tensor([float(i) for i in range(8)] + [100.0 + i for i in range(6)] + [1000.0] * 6)
    cls = torch.tensor([1] * 14 + [2] * 6)  # low-signal HepG2 first, then high-signal HepG2, then K562
    x = torch.randint(4, (20, D.SEQ_LEN), generator=torch.Generator().manual_seed(0))
    test = D.DnaData(x, np.array(["chr1"] * 20), cls, signal, "encode")

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4, 4)

        def forward(self, x):
            return self.emb(x).mean(1)
    no_sampler = lambda cfg, model, n, gf, seed: torch.randint(4, (n, D.SEQ_LEN))
    monkeypatch.setattr(T, "draw", no_sampler)
    cfg = T.parse_args([*TOY, "--out", str(tmp_path)])
    results, _ = T.evaluate(cfg, lambda x: {"x": x}, None, {}, {"ft_oracle": Oracle()}, test)
    assert results["Data (chr1, HepG2)"]["x"].equal(x[[13, 12, 11, 10, 9, 8]])
    assert D.top_hepg2(test, 6).equal(x[8:14].flip(0))


def test_a_data_row_shorter_than_n_eval_is_said_in_the_note(tmp_path, capsys):
    """A small test chromosome has fewer HepG2 DHS than --n-eval (chr21: 134 of 640): the table's note said
    every row had n_eval samples."""
    cfg = T.parse_args([*TOY, "--out", str(tmp_path)])
    cols = ["Pred-Activity", "ATAC-Acc %", "3-mer corr", "JASPAR corr", "App-Log-Lik", "Reward (ft oracle)"]
    row = dict.fromkeys(cols, 0.0)
    for n, said in ((6, "6 samples per row, 3 sampler steps"),
                    (4, "6 samples per row (Data (chr21, HepG2): 4, all there are), 3 sampler steps")):
        results = {"Pre-trained": {**row, "n": 6}, "Data (chr21, HepG2)": {**row, "n": n}}
        T.report(cfg, results, [], {}, {"agreement": 0.5}, {"total": 1.0})
        assert said in capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in T.dataclasses.fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert type(f.default).__name__ == f.type, f"{f.name}: the flag parses as its default's type"


def test_paper_preset_and_overrides():
    c = T.parse_args(["--preset", "paper"])
    settings = (c.steps, c.batch, c.group, c.epochs, c.snis, c.clip_eps, c.kl_coef, c.kl_steps, c.lr,
                c.n_eval)
    assert settings == (128, 8, 8, 2, 4, 0.2, 0.05, 10, 1e-4, 640)
    assert T.parse_args(["--preset", "paper", "--steps", "64"]).steps == 64
    assert T.parse_args([]).steps == T.Config().steps


def test_bad_settings_fail_before_any_work(tmp_path, capsys):
    for bad in (["--grad", "pathh"], ["--preset", "huge"], ["--amp", "fp16"]):
        with pytest.raises(SystemExit):
            T.main([*bad, "--out", str(tmp_path / "x")])
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        T.main(["--group", "0", "--out", str(tmp_path / "x")])
    for flag, value, rule in (("--ckpt-every", "0", "> 0"), ("--pretrain-steps", "0", "> 0"),
                              ("--kl-coef", "nan", ">= 0"), ("--corrector-steps", "-1", ">= 0")):
        with pytest.raises(ValueError, match=f"{flag} must be {rule}, got"):  # before: late, or silently
            T.main([flag, value, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_enformer_shape_flags_fail_before_any_work(tmp_path):
    """--oracle-dim / --oracle-heads / --oracle-downsamples that EnformerOracle refuses: before, an error
    only after pre-training; now at parse time, naming the flags."""
    for bad in (["--oracle-dim", "50"], ["--oracle-dim", "48", "--oracle-heads", "3"],
                ["--oracle-downsamples", "2"]):
        message = r"--oracle-dim, --oracle-heads, --oracle-downsamples: Enformer needs dim a multiple of 6 \*"
        with pytest.raises(ValueError, match=message):
            T.parse_args(bad)
    good = T.parse_args(["--oracle-dim", "36", "--oracle-heads", "3", "--oracle-downsamples", "3"])
    assert (good.oracle_dim, good.oracle_heads, good.oracle_downsamples) == (36, 3, 3)
    with pytest.raises(ValueError, match="Enformer needs"):
        T.main(["--oracle-dim", "50", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_settings_under_which_sepo_learns_nothing_fail_before_any_work(tmp_path):
    """--group 1 under GRPO (every advantage 0) and --lr 0 ran SEPO as a silent no-op; now errors from
    train_common.sepo_settings and parse_args (--lr among the positive numbers), before any work."""
    with pytest.raises(ValueError, match=r"--group 1: under GRPO every advantage is 0"):
        T.sepo_config(T.parse_args(["--group", "1"]), 0)
    with pytest.raises(ValueError, match=r"--lr must be > 0, got 0\.0"):
        T.sepo_config(T.parse_args(["--lr", "0"]), 0)
    for bad, msg in ((["--group", "1"], "--group 1"), (["--lr", "0"], "--lr must be > 0"),
                     (["--drakes", "DIR", "--group", "1"], "--group 1")):
        with pytest.raises(ValueError, match=msg):
            T.main([*bad, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    assert T.sepo_config(T.parse_args(["--group", "2", "--lr", "1e-6"]), 0).group_size == 2


def test_flags_the_run_does_not_read_are_errors():
    """Before, --reward-oracle eval without --drakes was ignored and results.json recorded it; the default
    run's own flags were ignored under --drakes. Now either is an error naming the flags."""
    with pytest.raises(ValueError, match=r"^--reward-oracle: the DRAKES run's \(--drakes\), not read by"):
        T.parse_args(["--reward-oracle", "eval"])
    with pytest.raises(ValueError, match=r"^--atac-column, --eval-steps: the DRAKES run's"):
        T.parse_args(["--atac-column", "0", "--eval-steps", "4"])
    with pytest.raises(ValueError, match=r"^--hidden, --oracle-lr, --bon-max: the default run's, not read by "
                                         r"the DRAKES run \(--drakes\)"):
        T.parse_args(["--drakes", "DIR", "--hidden", "64", "--oracle-lr", "0.1", "--bon-max", "4"])
    with pytest.raises(ValueError, match=r"^--test-chrom: the default run's"):
        T.parse_args(["--drakes-pretrained", "p.ckpt", "--test-chrom", "chr3"])
    drakes = T.parse_args(["--drakes", "DIR", "--reward-oracle", "eval", "--atac-column", "0",
                           "--eval-steps", "4"])
    assert (drakes.reward_oracle, drakes.atac_column, drakes.eval_steps) == ("eval", 0, 4)
    assert T.parse_args(["--hidden", "64", "--bon-max", "4"]).hidden == 64


def test_corrector_steps_that_would_share_the_evaluations_stream_are_refused():
    """SEPO with GF seeds stream_seed + 30 + --corrector-steps: 70 would be the Pre-trained row's + 100."""
    with pytest.raises(ValueError, match=r"--corrector-steps must be < 70, got 70"):
        T.parse_args(["--corrector-steps", "70"])
    cfg = T.parse_args(["--corrector-steps", "69"])
    assert T.sepo_config(cfg, cfg.corrector_steps).seed == cfg.stream_seed + 99


@pytest.mark.slow
def test_data_path_spelling_resumes_a_run_and_the_hint_keeps_the_docs_figure(tmp_path, toy_data, monkeypatch,
                                                                             capsys):
    """The checkpoints are keyed on the data file's hash, not the path as typed: the same file given relative
    then absolute resumes from every cache, another file is refused. The closing hint writes the trade-off
    figure into the run's folder, not over the committed docs/dna_tradeoff.png."""
    import subprocess
    import sys
    shutil.copy(toy_data, tmp_path / "toy.tsv.gz")
    monkeypatch.chdir(tmp_path)
    flags = ["--out", "run", *TOY, "--iters", "1", "--corrector-steps", "0"]
    T.main(["--data", "toy.tsv.gz", *flags])
    hint = capsys.readouterr().out.splitlines()[-1]
    T.main(["--data", str(tmp_path / "toy.tsv.gz"), *flags])
    log = capsys.readouterr().out
    assert "[pretrain] cached" in log and "[access] cached" in log and "[sepo] cached" in log
    write_encode(tmp_path / "other.tsv.gz", toy_rows())
    with pytest.raises(ValueError, match=r"pretrain.pt was made with other settings \{'data_sha256'"):
        T.main(["--data", "other.tsv.gz", *flags])
    assert hint == "[done] trade-off figure: python docs/dna_tradeoff.py run"
    docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs")
    before = os.stat(os.path.join(docs, "dna_tradeoff.png")).st_mtime_ns
    command = hint.split(": ", 1)[1].split()
    subprocess.run([sys.executable, os.path.join(docs, "dna_tradeoff.py"), *command[2:]], check=True)
    assert os.path.getsize(tmp_path / "run" / "tradeoff.png") > 1000
    assert os.stat(os.path.join(docs, "dna_tradeoff.png")).st_mtime_ns == before


def test_the_drivers_shared_evaluation_helpers():
    """train_common's best-of-N pieces and table, which both drivers' tables rest on."""
    import train_common as C

    class Cfg:
        iters, batch, group = 40, 4, 8
    # 1 + ceil(40 * 4 * 8 / n): the DNA default's best-of-3 for n = 640
    assert C.sampling_budget(Cfg, 640) == 3 and C.sampling_budget(Cfg, 6) == 1 + 214
    assert C.bon_sizes(8) == [1, 2, 4, 8] and C.bon_sizes(6) == [1, 2, 4, 6] and C.bon_sizes(0) == []
    pool = torch.arange(12).view(2, 3, 2)  # 2 outputs, 3 draws of 2 tokens each
    reward = torch.tensor([[0.0, 5.0, 9.0], [3.0, 3.0, 1.0]])
    assert C.best_of(pool, reward, 2).tolist() == [[2, 3], [6, 7]]  # a tie: the first draw
    assert C.best_of(pool, reward, 3).tolist() == [[4, 5], [6, 7]]
    assert C.markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_train_loop_resumes_exactly_metrics_included(tmp_path):
    """Interrupted after its step-2 checkpoint and run again, train_loop (train_common's, which the driver
    uses) ends where a straight run does: the same weights and the same smoothed training loss."""
    train_loop = T.train_loop
    x, y = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), torch.randn(64)

    def fit(folder, stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)

        def loss_fn(i, g):
            fit.calls += 1
            if fit.calls == stop_at:
                raise KeyboardInterrupt
            return ((model(x[i]).squeeze(-1) - y[i]) ** 2).mean()
        fit.calls = 0
        path = str(tmp_path / f"{folder}.pt")
        return train_loop("t", model, loss_fn, 64, 6, 8, 0.1, path, {"k": 1}, 0, every=2), model

    straight, m1 = fit("a")
    with pytest.raises(KeyboardInterrupt):
        fit("b", stop_at=4)  # after the step-2 checkpoint
    resumed, m2 = fit("b")
    assert torch.equal(m1.weight, m2.weight) and resumed == straight


def test_bf16_error_script():
    """docs/bf16_error.py: bf16 autocast changes the path log-probs a little, nowhere near a nat."""
    out = docs_script("bf16_error").main([*TOY, "--warmup", "1", "--out", "/nonexistent"])
    assert 0 < out["path_lp_err"] < 1 and 0 <= out["log_r_err"] < 1 and 0 < out["log_r"] < 10


def test_bench_runs_one_step_per_variant(capsys):
    T.main([*TOY, "--bench"])
    out = capsys.readouterr().out
    assert out.count("one trainer.step()") == 2 and "corrector_steps=1" in out


@pytest.mark.slow
def test_pipeline_on_a_gosai_csv(tmp_path):
    rows = [(rand_seq(), RNG.normal(), RNG.normal(), RNG.normal(), f"chr{c}")
            for c in range(1, 7) for _ in range(10)]
    data = write_gosai(tmp_path / "gosai.csv", HEADER, rows)
    res = T.main(["--data", data, "--out", str(tmp_path / "g"), *TOY, "--iters", "1", "--corrector-steps",
                  "0"])
    assert "SEPO" in res and "Data (chr1, HepG2)" in res
    rep = json.loads((tmp_path / "g" / "results.json").read_text())["oracles"]
    assert "test_hepg2_pearson" in rep["ft_oracle"] and "test_hepg2_pearson" in rep["eval_oracle"]
    assert "predicted HepG2 MPRA activity" in (tmp_path / "g" / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["train_dna", "train_text"])
def test_a_seeded_run_is_bit_identical_twice_and_resumed(tmp_path, toy_data, driver):
    """One machine, one seed: a tiny run made twice in one process, and once stopped after its first SEPO
    iteration and resumed, gives bit-identical SEPO weights, samples and table (docs/dna.md, docs/text.md)."""
    module = importlib.import_module(driver)
    if driver == "train_dna":
        argv, ckpt = ["--data", toy_data, *TOY], "sepo.pt"
        outputs = ["samples_sepo.txt", "samples_pre-trained.txt"]
    else:
        from test_train_text import TINY
        argv, ckpt, outputs = TINY, "sepo_steps4.pt", ["examples_steps4.txt"]
    rows = {name: module.main([*argv, "--out", str(tmp_path / name), "--iters", iters])
            for name, iters in (("a", "2"), ("b", "2"), ("c", "1"), ("c", "2"))}  # c: the resumed run's table
    untimed = lambda history: [{k: v for k, v in h.items() if not k.startswith("time")} for h in history]
    ref = torch.load(tmp_path / "a" / ckpt, weights_only=False)
    for other in "bc":
        got = torch.load(tmp_path / other / ckpt, weights_only=False)
        weights = got["trainer"]["model"]
        assert all(torch.equal(v, weights[k]) for k, v in ref["trainer"]["model"].items()), other
        assert untimed(got["history"]) == untimed(ref["history"])
        assert (rows[other] if driver == "train_dna" else rows[other]["rows"]) == (
            rows["a"] if driver == "train_dna" else rows["a"]["rows"])
        for f in outputs:
            assert (tmp_path / other / f).read_text() == (tmp_path / "a" / f).read_text(), (other, f)


# ---------------------------------------------------------------------------- the default run's networks


def test_default_networks_keep_the_state_dict_keys_of_cached_checkpoints():
    """models/dna.py holds the networks train_dna.py used to define: renaming a submodule would orphan the
    pretrain.pt / oracle checkpoints earlier runs cached in --out."""
    from models.dna import AccessibilityCNN, DilatedCNNDenoiser, EnformerOracle
    per_layer = [f"{m}.{i}.{p}" for m in ("norms", "convs") for i in range(5) for p in ("weight", "bias")]
    want = ["embed.weight", "time.0.weight", "time.0.bias", "time.2.weight", "time.2.bias", *per_layer,
            "out.weight", "out.bias"]
    assert sorted(DilatedCNNDenoiser(8, 1).state_dict()) == sorted(want)
    convs_and_linear = [f"net.{i}.{p}" for i in (0, 3, 6, 11) for p in ("weight", "bias")]
    assert list(AccessibilityCNN().state_dict()) == convs_and_linear
    keys = list(EnformerOracle(4, 12, 1, 2, 3).state_dict())
    assert keys[-2:] == ["head.weight", "head.bias"] and all(k.startswith("trunk.") for k in keys[:-2])


def test_grad_and_ratio_auto_leave_the_choice_to_sepo():
    cfg = T.sepo_config(T.parse_args(["--grad", "auto", "--ratio", "auto"]), 0)
    assert (cfg.grad, cfg.ratio) == (None, None)
    resolved = cfg.for_graph(T.GRAPH)
    assert (resolved.grad, resolved.ratio) == ("pl", "snis")  # the masked graph's: the paper's
    assert (T.Config().grad, T.Config().ratio) == ("pl", "snis")  # the default run's, unchanged


# ---------------------------------------------------------------------------- --drakes: the DRAKES release

DRAKES_TINY = ["--threads", "1", "--iters", "2", "--batch", "2", "--group", "2", "--steps", "3", "--kl-steps",
               "2", "--pl-positions", "2", "--ckpt-every", "1", "--n-eval", "6", "--eval-steps", "4"]
ROWS = {"Pre-trained": "pre-trained", "DRAKES (finetuned.ckpt)": "drakes",
        "DRAKES without KL (zero_alpha.ckpt)": "drakes_without_kl", "SEPO": "sepo",
        "SEPO with GF": "sepo_with_gf", "Best-of-3 (ft oracle)": "best-of-3"}  # row: its samples file
# best-of-N at SEPO's sampling budget: N = 1 + ceil(iters * batch * group / n_eval) = 1 + ceil(8 / 6) = 3


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from test_drakes_models import write_drakes_release
    base = tmp_path_factory.mktemp("release")
    return base, write_drakes_release(base)


def drakes_run(release_dir, out, *extra):
    return T.main(["--drakes", str(release_dir), "--out", str(out), *DRAKES_TINY, *extra])


def read_samples(path) -> torch.Tensor:
    return D.encode_sequences(path.read_text().split(), length=D.SEQ_LEN)


@pytest.mark.slow
def test_drakes_run_is_drakes_protocol_end_to_end_and_resumes(release, tmp_path, capsys):
    """The whole --drakes run on a stand-in release: every row in the table and the published block below
    it; each row's scores are DrakesScorer's on the saved samples, which are DRAKES's sampler's draws of the
    models (the SEPO rows of the checkpointed weights; best-of-N the fine-tuning oracle's pick of seeds
    0..2). A run interrupted after one iteration and resumed writes the same table."""
    from data import drakes as DR
    from models.drakes import CNNModel, load_drakes_mdlm, load_grelu_oracle
    base, files = release
    res = drakes_run(base, tmp_path / "a")
    log = capsys.readouterr().out
    assert "tasks ['GM12878', 'HepG2'" in log and "ATAC-Acc reads column 1 (HepG2)" in log  # the task names
    assert "train_n_seqs" in log and "grelu-1.0.2" in log and log.count("[release] ") >= 8
    table = (tmp_path / "a" / "results_drakes.md").read_text()
    assert list(res) == list(ROWS) and all(f"| {row} | " in table for row in ROWS)
    own, published = table.split("Published numbers (not computed by this run")
    assert "| Model | Pred-Activity | ATAC-Acc % | 3-mer Pearson | JASPAR Spearman | App-Log-Lik |" in own
    assert "trained on the fine-tuning oracle (DRAKES's protocol)" in own and "column 1 (HepG2)" in own
    assert "Published: DRAKES eval.ipynb" in published and "| DRAKES w/o KL | 6.434 | 81.25 |" in published
    saved = json.loads((tmp_path / "a" / "results_drakes.json").read_text())
    assert [h["iteration"] for h in saved["runs"]["SEPO with GF"]["history"]] == [1, 2]
    # the rows, recomputed from the release's files by data/drakes.py and models/drakes.py directly
    pretrained, oracle = load_drakes_mdlm(files["pretrained"]), load_grelu_oracle(files["ft_oracle"])
    eval_oracle, atac = load_grelu_oracle(files["eval_oracle"]), load_grelu_oracle(files["atac"])
    reference = DR.load_reference(str(files["data"]))
    scorer = DR.DrakesScorer(pretrained, eval_oracle, atac, reference, atac_column=1, steps=4)
    samples = {row: read_samples(tmp_path / "a" / f"samples_{tag}.txt") for row, tag in ROWS.items()}
    for row, x in samples.items():
        assert saved["rows"][row] == pytest.approx(scorer(x), rel=0, abs=0, nan_ok=True), row
    pool = torch.stack([DR.drakes_sample(pretrained, 6, 4, seed=s) for s in range(3)])
    pick = DR.oracle_predictions(oracle, pool.flatten(0, 1))[:, 0].view(3, 6).argmax(0)
    assert samples["Pre-trained"].equal(pool[0])
    assert samples["Best-of-3 (ft oracle)"].equal(pool[pick, range(6)])
    assert samples["DRAKES (finetuned.ckpt)"].equal(DR.drakes_sample(load_drakes_mdlm(files["drakes"]), 6, 4))
    for row, ckpt, gf in (("SEPO", "sepo.pt", 0), ("SEPO with GF", "sepo_gf.pt", 1)):
        model = CNNModel(16, 1)
        model.load_state_dict(torch.load(tmp_path / "a" / ckpt, weights_only=True)["trainer"]["model"])
        assert samples[row].equal(DR.drakes_sample(model, 6, 4, corrector_steps=gf)), row
    # interrupted after one SEPO iteration, then resumed: the same table
    drakes_run(base, tmp_path / "b", "--iters", "1")
    assert drakes_run(base, tmp_path / "b", "--iters", "2") == res == drakes_run(base, tmp_path / "a")
    log = capsys.readouterr().out
    assert "[sepo] resuming: " in log and "[sepo] cached: " in log and "[sepo] it 2/2" in log


@pytest.mark.slow
def test_drakes_reward_oracle_eval_atac_column_and_absent_rows(tmp_path, capsys):
    """--reward-oracle eval trains on the evaluation oracle (the SEPO reference code's choice) and says so;
    --atac-column picks the column ATAC-Acc reads (the stand-in's column 5 is below 0.5 for every sequence,
    its columns 0-4 above); without zero_alpha.ckpt there is no row for it."""
    from test_drakes_models import write_drakes_release
    files = write_drakes_release(tmp_path / "rel", zero_alpha=False)
    res = drakes_run(tmp_path / "rel", tmp_path / "out", "--reward-oracle", "eval", "--corrector-steps", "0",
                     "--atac-column", "5")
    assert list(res) == ["Pre-trained", "DRAKES (finetuned.ckpt)", "SEPO", "Best-of-3 (eval oracle)"]
    assert [r["ATAC-Acc %"] for r in res.values()] == [0.0] * 4
    assert "WARNING: column 5 is not named HepG2" in capsys.readouterr().out
    table = (tmp_path / "out" / "results_drakes.md").read_text()
    assert "trained on the evaluation oracle (as the SEPO reference code)" in table
    assert "column 5 (A549)" in table and "zero_alpha" not in table
    settings = torch.load(tmp_path / "out" / "sepo.pt", weights_only=True)["settings"]
    assert settings["reward_oracle"] == "eval"
    assert settings["reward_sha256"] == D.file_sha256(files["eval_oracle"])


def test_drakes_missing_files_are_one_error_before_any_work(tmp_path, monkeypatch):
    from test_drakes_models import write_drakes_release
    files = write_drakes_release(tmp_path / "rel", zero_alpha=False, atac=False)
    os.remove(files["eval_oracle"])
    import models.drakes  # load_release (models/drakes.py) loads the networks once every file is found
    loaded = lambda *a, **k: pytest.fail("a network was loaded")
    monkeypatch.setattr(models.drakes, "load_release_networks", loaded)
    missing = r"2 file\(s\) missing:\n  eval_oracle: .*_eval.ckpt: the evaluation oracle.*\n  atac: .*_atac_"
    with pytest.raises(FileNotFoundError, match=missing):
        drakes_run(tmp_path / "rel", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"atac: .*nowhere.ckpt \(override\)"):  # the flag's path
        drakes_run(tmp_path / "rel", tmp_path / "out", "--drakes-atac", str(tmp_path / "nowhere.ckpt"),
                   "--drakes-eval-oracle", str(files["ft_oracle"]))
    assert not (tmp_path / "out").exists()  # nothing written


def test_drakes_checks_its_flags_and_the_atac_column_before_any_work(release, tmp_path):
    base, _ = release
    with pytest.raises(ValueError, match="--data is the default run's table; the DRAKES run reads --drakes-"):
        T.parse_args(["--drakes", str(base), "--data", "x.csv"])
    with pytest.raises(ValueError, match=r"--atac-column 7: .*atac_cell_lines.ckpt has 7 columns \['GM"):
        drakes_run(base, tmp_path / "out", "--atac-column", "7")
    assert not (tmp_path / "out").exists()


def test_drakes_paper_preset_is_the_sepo_reference_trainers():
    c = T.parse_args(["--drakes", "DIR", "--preset", "paper"])
    settings = (c.iters, c.lr, c.batch, c.group, c.epochs, c.clip_eps, c.snis, c.steps, c.kl_coef, c.kl_steps)
    assert settings == (1000, 1e-4, 16, 8, 5, 0.2, 2, 128, 1e-4, 50)
    assert (c.micro_batch, c.eval_steps, c.n_eval, c.atac_column, c.reward_oracle, c.out) == \
        (16, 128, 640, 1, "ft", "runs/drakes")
    assert T.sepo_config(c, 0).max_grad_norm == 1.0
    assert T.parse_args(["--drakes-pretrained", "p.ckpt"]).release and not T.parse_args([]).release
    assert T.parse_args(["--preset", "paper"]).kl_coef == 0.05  # the default run's paper preset is its own


def test_drakes_bench_times_the_release_networks(release, capsys):
    base, _ = release
    out = T.main(["--drakes", str(base), "--bench", *DRAKES_TINY, "--grad", "auto", "--ratio", "auto"])
    log = capsys.readouterr().out
    assert set(out) == {"step_s_gf0", "step_s_gf1"} and "random weights" not in log
    assert log.count("0.01M-parameter denoiser") == 2 and "grad=pl, ratio=snis" in log  # the stand-in's CNN


def test_release_networks_are_described_with_what_their_files_say(release, tmp_path):
    """describe() prints the layout, tasks and train_n_seqs (which half of the data trained an oracle) of a
    gReLU checkpoint in either layout, and what a Lightning pretrained.ckpt says about its run."""
    from models.drakes import describe
    from models.drakes import load_drakes_mdlm, load_grelu_oracle
    _, files = release
    ckpt = torch.load(files["ft_oracle"], weights_only=True)
    ckpt["hyper_parameters"]["data_params"]["train_n_seqs"] = 367578
    torch.save(ckpt, tmp_path / "old.ckpt")
    ckpt["data_params"] = ckpt["hyper_parameters"].pop("data_params")
    ckpt["data_params"]["train_n_seqs"] = 305113
    torch.save(ckpt, tmp_path / "new.ckpt")
    old, new = (describe(load_grelu_oracle(tmp_path / f)) for f in ("old.ckpt", "new.ckpt"))
    assert "gReLU grelu-1.0.2 regression, tasks ['hepg2', 'k562', 'sknsh']" in old
    assert "train_n_seqs 367578" in old
    assert "gReLU grelu>=1.0.5 regression" in new and "train_n_seqs 305113" in new
    text = describe(load_drakes_mdlm(files["pretrained"]))
    assert "DRAKES CNN (lightning), hidden 16, 1 stacks" in text and "global_step 3" in text
