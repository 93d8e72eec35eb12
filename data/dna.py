"""The DNA data of train_dna.py: reading, validating and splitting a table, the sequence statistics its
evaluation compares (k-mer counts, JASPAR motif hits, correlations, AUROC), and DnaScorer, the default run's
table metrics (the DRAKES run's are data/drakes.py's DrakesScorer).

    python data/dna.py                    # check the vendored ENCODE DHS file, print the splits
    python data/dna.py gosai_all.csv      # the same for a Gosai MPRA table (.csv or .csv.gz)

train_dna.py reads --data with load_data(); run this first to check a file of your own: every error
names the row (and the position, for a sequence). UTF-8 text (a leading BOM is dropped), column names
matched case-insensitively. Two formats:
  ENCODE (.tsv[.gz]): chrom, summit, cell_type, signal, split, sequence (the vendored file, README.md);
  Gosai (.csv[.gz]): seq, hepg2, k562, sknsh and, optionally, chr / chrom / chromosome. The DRAKES file
      gosai_all.csv has no chromosome column: its rows then get ten pseudo-chromosomes chr1..chr10 at
      random (numpy seed 0, independent of --seed), so --test-chrom chr1 and --val-chrom chr2 hold out
      a fixed, reproducible 10% each.
Chromosome names, in both formats and in --test-chrom / --val-chrom, go through chrom_name(): 1, 01, 1.0,
Chr1 and chr1 are all chr1; x and chrx are chrX.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import math
import os
import re
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "encode_dhs_200bp.tsv.gz")
BASES, SEQ_LEN = "ACGT", 200
CELL_TYPES = ("GM12878", "HepG2", "K562", "hESCT0")  # ENCODE file; the HepG2 class is the target
GOSAI_TARGETS = ("hepg2", "k562", "sknsh")            # Gosai CSV; hepg2 is the target


@dataclass
class DnaData:
    x: Tensor              # [N, 200] long, A, C, G, T = 0..3
    chrom: np.ndarray      # [N] str
    y: Tensor              # oracle target: ENCODE cell-type index [N]; Gosai activity (hepg2, k562, sknsh)
    #                        [N, 3]
    signal: Tensor         # [N] ranking score of the top-HepG2 set (DHS signal, or HepG2 activity)
    kind: str              # "encode" or "gosai"
    sha256: str = ""       # first 16 hex digits of the source file's sha256: the key of the cached stages

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, mask: np.ndarray) -> "DnaData":
        t = torch.as_tensor(np.flatnonzero(mask))
        return replace(self, x=self.x[t], chrom=self.chrom[t.numpy()], y=self.y[t], signal=self.signal[t])

    def hepg2(self) -> Tensor:
        """Which rows count as HepG2 (ENCODE: HepG2 DHS; Gosai: HepG2 activity above the median)."""
        return self.y == 1 if self.kind == "encode" else self.y[:, 0] > self.y[:, 0].median()


_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _b in enumerate(BASES):
    _LUT[ord(_b)] = _LUT[ord(_b.lower())] = _i


def encode_sequences(seqs: list[str], length: int = SEQ_LEN) -> Tensor:
    """ACGT strings (any case) -> LongTensor[N, length]; a wrong length or another letter is an error
    naming the 1-based row and the position."""
    for i, s in enumerate(seqs):
        if len(s) != length:
            raise ValueError(f"row {i + 1}: sequence has length {len(s)}, expected {length}")
    codes = _LUT[np.frombuffer("".join(seqs).encode("latin-1", "replace"), np.uint8)]
    codes = codes.reshape(len(seqs), length)
    bad = np.argwhere(codes == 255)
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"row {i + 1}: invalid base {seqs[i][j]!r} at position {j + 1} "
                         "(only A, C, G, T allowed)")
    return torch.from_numpy(codes.astype(np.int64))


def decode_sequences(x: Tensor) -> list[str]:
    return ["".join(BASES[v] for v in row) for row in x.tolist()]


def _read_rows(path: str, delimiter: str, header_only: bool = False) -> list[list[str]]:
    try:  # utf-8-sig drops the BOM of Excel's "CSV UTF-8", which would otherwise hide the first column's name
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8-sig", newline="") as f:
            rows = list(itertools.islice(csv.reader(f, delimiter=delimiter), 1 if header_only else None))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty file")
    return rows


def _header(names: list[str]) -> dict:
    """{lower-cased column name: index, or None if the name repeats}: Chr, CHROM, HepG2 name chr, chrom,
    hepg2."""
    names = [h.strip().lower() for h in names]
    return {n: j if names.count(n) == 1 else None for j, n in enumerate(names)}


def table_header(path: str, delimiter: str = ",") -> dict:
    """The header of a table as _read_table sees it, reading only its first line (a cheap check)."""
    return _header(_read_rows(path, delimiter, header_only=True)[0])


def _read_table(path: str, delimiter: str) -> tuple[dict, list[list[str]]]:
    """({lower-cased column name: index, or None if the name repeats}, data rows)."""
    rows = _read_rows(path, delimiter)
    for i, r in enumerate(rows[1:], 1):
        if len(r) != len(rows[0]):
            raise ValueError(f"{path}: row {i} has {len(r)} fields, the header has {len(rows[0])}")
    return _header(rows[0]), rows[1:]


def _column(path: str, header: dict, rows: list, *names: str, number: bool = False, required: bool = True,
            dtype: torch.dtype = torch.float32):
    name = next((n for n in names if n in header), None)
    if name is None and required:
        raise ValueError(f"{path}: missing column {' or '.join(map(repr, names))} (header: {list(header)})")
    if name is not None and header[name] is None:  # e.g. chr and Chr: which one is meant?
        raise ValueError(f"{path}: column {name!r} appears more than once in the header (names ignore case)")
    vals = None if name is None else [r[header[name]].strip() for r in rows]
    for i, v in enumerate(vals if number else [], 1):
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            raise ValueError(f"{path}: row {i}: column {name!r} is not a number: {v!r}") from None
        if not ok:
            raise ValueError(f"{path}: row {i}: column {name!r} is not finite: {v!r}")
    return torch.tensor([float(v) for v in vals], dtype=dtype) if number else vals


def chrom_name(name: str, where: str = "") -> str:
    """The one chromosome name of both formats and of --test-chrom / --val-chrom: a 'chr' prefix in any case
    is dropped, a number becomes its integer (1, 01, 1.0, Chr1: chr1), anything else is upper-cased (x, chrx:
    chrX; mt: chrMT). An empty name (or nan, na, none) is an error that starts with `where` (file and row)."""
    n = name.strip()
    n = n[3:].strip() if n.lower().startswith("chr") else n
    if n.lower() in ("", "nan", "na", "none"):
        raise ValueError(f"{where}no chromosome ({name!r})")
    # a numeric column saved as floats (2.0, as pandas may write it) or zero-padded (02): chr2
    return "chr" + (str(int(n.split(".")[0])) if re.fullmatch(r"\d+(\.0*)?", n) else n.upper())


def _chroms(path: str, names: list[str]) -> np.ndarray:
    return np.array([chrom_name(c, f"{path}: row {i}: ") for i, c in enumerate(names, 1)])


def load_encode(path: str = DEFAULT_DATA) -> DnaData:
    """The vendored ENCODE DHS table (chrom, summit, cell_type, signal, split, sequence; tab-separated)."""
    header, rows = _read_table(path, "\t")
    for col, known in (("cell_type", CELL_TYPES), ("split", ("train", "validation", "test"))):
        for i, v in enumerate(_column(path, header, rows, col), 1):
            if v not in known:
                raise ValueError(f"{path}: row {i}: unknown {col} {v!r} (known: {', '.join(known)})")
    y = torch.tensor([CELL_TYPES.index(v) for v in _column(path, header, rows, "cell_type")])
    return DnaData(encode_sequences(_column(path, header, rows, "sequence")),
                   _chroms(path, _column(path, header, rows, "chrom")), y,
                   _column(path, header, rows, "signal", number=True), "encode")


def read_gosai(path: str) -> tuple[Tensor, Tensor, list[str] | None]:
    """The columns of a Gosai/DRAKES MPRA CSV: (sequences [N, 200], activity (hepg2, k562, sknsh) [N, 3] as
    float64, exactly as written, the chromosome column (chr/chrom/chromosome, in any case) or None)."""
    header, rows = _read_table(path, ",")
    y = torch.stack([_column(path, header, rows, n, number=True, dtype=torch.float64)
                     for n in GOSAI_TARGETS], 1)
    x = encode_sequences(_column(path, header, rows, "seq", "sequence"))
    return x, y, _column(path, header, rows, "chr", "chrom", "chromosome", required=False)


def load_gosai(path: str, split_seed: int = 0) -> DnaData:
    """A Gosai/DRAKES MPRA CSV (read_gosai). Without a chromosome column (the DRAKES file gosai_all.csv)
    every row gets one of ten pseudo-chromosomes chr1..chr10 uniformly at random with numpy seed split_seed:
    a fixed, reproducible 10% test / 10% validation / 80% training split that does not depend on --seed."""
    x, y, chrom = read_gosai(path)
    y = y.float()  # rounds each value as torch.tensor(floats) would: the default run's numbers are unchanged
    if chrom is None:
        chrom = [f"chr{k}" for k in np.random.default_rng(split_seed).integers(1, 11, len(x))]
    return DnaData(x, _chroms(path, chrom), y, y[:, 0].clone(), "gosai")


def load_data(path: str) -> DnaData:
    """The table at path ('' = the vendored ENCODE file), its format told by the extension, with its hash."""
    path = path or DEFAULT_DATA
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} not found")
    data = load_gosai(path) if path.endswith((".csv", ".csv.gz")) else load_encode(path)
    return replace(data, sha256=file_sha256(path))


def file_sha256(path: str) -> str:
    """The first 16 hex digits of a file's sha256: what keys a cached stage on the file it read."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def split_by_chromosome(data: DnaData, test_chrom: str, val_chrom: str) -> dict[str, DnaData]:
    """{"train": all other chromosomes, "val": val_chrom, "test": test_chrom}; an empty val or test is an
    error. The names go through chrom_name() as the data's do: 1 means chr1."""
    test_chrom = chrom_name(test_chrom, "test chromosome: ")
    val_chrom = chrom_name(val_chrom, "validation chromosome: ")
    if test_chrom == val_chrom:  # the validation loss (early stopping) would be measured on the test set
        raise ValueError(f"the test and validation chromosomes must differ, both are {test_chrom}")
    split = {"train": data.subset(~np.isin(data.chrom, [test_chrom, val_chrom])),
             "val": data.subset(data.chrom == val_chrom), "test": data.subset(data.chrom == test_chrom)}
    if not (len(split["val"]) and len(split["test"])):
        raise ValueError(f"no sequences on the validation ({val_chrom}) or test ({test_chrom}) chromosome")
    return split


def top_hepg2(data: DnaData, n: int = 1000) -> Tensor:
    """The n sequences of highest HepG2 signal [n, 200] (ENCODE: among the HepG2 DHS): the reference set
    of the 3-mer and JASPAR correlations."""
    pool = data.subset(data.hepg2().numpy()) if data.kind == "encode" else data
    return pool.x[pool.signal.argsort(descending=True)[:n]]


def oracle_chromosomes(chrom: np.ndarray, test_chrom: str, val_chrom: str) -> tuple[list[str], list[str]]:
    """Split the training chromosomes (all but test and validation) into two disjoint halves of about
    equal size (greedy, largest first): (fine-tuning oracle's, evaluation oracle's)."""
    test_chrom, val_chrom = chrom_name(test_chrom), chrom_name(val_chrom)
    names, counts = np.unique(chrom, return_counts=True)
    halves, sizes = ([], []), [0, 0]
    for c, n in sorted(((c, n) for n, c in zip(names, counts) if n not in (test_chrom, val_chrom)),
                       key=lambda t: (-t[0], t[1])):
        k = int(sizes[1] < sizes[0])
        halves[k].append(n)
        sizes[k] += c
    if not halves[0] or not halves[1]:
        raise ValueError(f"need at least two training chromosomes besides {test_chrom} and {val_chrom}")
    return sorted(halves[0]), sorted(halves[1])


def hepg2_score(logits: Tensor, kind: str) -> Tensor:
    """The oracle's HepG2 score: ENCODE, log-odds of the HepG2 class; Gosai, predicted HepG2 activity."""
    if kind == "gosai":
        return logits[:, 0]
    return logits[:, 1] - torch.logsumexp(logits[:, [0, 2, 3]], 1)


def held_out_metrics(name: str, pred: Tensor, test: DnaData) -> dict:
    """A network's metrics on the test chromosome from its predictions there: the accessibility CNN's
    ("access") AUROC of the HepG2 rows; an oracle's AUROC of them by its HepG2 score (ENCODE) or its Pearson
    correlation with the measured HepG2 activity (Gosai)."""
    if name == "access":
        return {"test_auroc": auroc(pred, test.hepg2())}
    if test.kind == "encode":
        return {"test_hepg2_auroc": auroc(hepg2_score(pred, test.kind), test.hepg2())}
    return {"test_hepg2_pearson": pearson(pred[:, 0], test.y[:, 0])}


def kmer_counts(x: Tensor, k: int = 3) -> Tensor:
    """Counts of the 4^k k-mers over all windows of all sequences [4^k] (index = base-4 number, A = 0)."""
    if x.shape[1] < k:
        return torch.zeros(4 ** k)
    code = sum(x[:, i:x.shape[1] - k + 1 + i] * 4 ** (k - 1 - i) for i in range(k))
    return torch.bincount(code.flatten(), minlength=4 ** k).float()


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation; NaN if either input is constant (or empty). Tested on max == min, not on the
    centred norm: the mean of n equal doubles need not equal them, which left a ~1e-16 'signal'."""
    if not (len(a) and len(b)) or a.max() == a.min() or b.max() == b.min():
        return float("nan")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.norm() * b.norm()).item()  # 0 only if the squares underflow (values near 1e-160)
    return float((a @ b).item() / den) if den > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the ranks (ties share their average rank)."""
    from scipy.stats import rankdata
    return pearson(torch.as_tensor(rankdata(a.numpy())), torch.as_tensor(rankdata(b.numpy())))


def auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata
    pos = positive.bool().numpy()
    n1, n0 = pos.sum(), (~pos).sum()
    r = rankdata(score.numpy())
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def load_jaspar_pwms(release: str = "JASPAR2024") -> tuple[list[str], list[Tensor]]:
    """Human CORE vertebrate motifs from pyjaspar's offline database as log2-odds PWMs [4, w]
    (pseudocount 0.8 spread over the bases, uniform background)."""
    from pyjaspar import jaspardb
    db = jaspardb(release=release)
    motifs = db.fetch_motifs(collection="CORE", tax_group=["vertebrates"], species=["9606"])
    pwms = [torch.tensor([list(m.counts[b]) for b in BASES], dtype=torch.float64) for m in motifs]
    pwms = [torch.log2((c + 0.2) / (c.sum(0, keepdim=True) + 0.8) / 0.25).float() for c in pwms]
    if not pwms:
        raise RuntimeError(f"pyjaspar returned no human CORE motifs for {release}")
    return [f"{m.matrix_id} {m.name}" for m in motifs], pwms


def motif_hits(x: Tensor, pwms: list[Tensor], rel_threshold: float = 0.85) -> Tensor:
    """Hits per motif, summed over sequences and both strands [num_motifs]: a window is a hit when its PWM
    score s satisfies (s - min) / (max - min) >= rel_threshold (min, max: the motif's extreme scores).
    The default run's statistic; DRAKES's JASPAR correlation counts FIMO hits at p < 1e-3 (data/drakes.py)."""
    N, L = x.shape
    both = pwms + [p.flip(0).flip(1) for p in pwms]  # reverse complement: A<->T, C<->G is the flip of ACGT
    wmax = max(p.shape[1] for p in pwms)
    W = torch.stack([F.pad(p, (0, wmax - p.shape[1])) for p in both])
    lo, hi = (torch.stack([f(p, 0).values.sum() for p in both]) for f in (torch.min, torch.max))
    thr = (lo + rel_threshold * (hi - lo))[None, :, None] - 1e-5
    valid = torch.arange(L)[None, :] <= L - torch.tensor([p.shape[1] for p in both])[:, None]  # window fits
    total = torch.zeros(len(both))
    for xb in x.split(256):
        onehot = F.pad(F.one_hot(xb, 4).float().transpose(1, 2), (0, wmax - 1))
        total += (F.conv1d(onehot, W) >= thr).logical_and(valid).sum((0, 2)).float()
    return total[: len(pwms)] + total[len(pwms):]


class DnaScorer:
    """The default run's metrics of samples x [N, 200], a dict of one table row (docs/dna.md compares them
    with DRAKES's): medians of the oracles' HepG2 scores, the accessibility CNN's share of calls, the 3-mer
    and JASPAR correlations with a reference set, App-Log-Lik. The reference set: the 1000 training sequences
    of highest HepG2 signal (ENCODE: among the HepG2 DHS); JASPAR hits at relative PWM score >= 0.85 on either
    strand. oracles: {"ft_oracle", "eval_oracle", "access"} of train_dna.py; App-Log-Lik is the ELBO of
    pretrained under graph and noise with elbo_t times per sequence, every row drawing the same noise (seed):
    the rows are paired."""

    def __init__(self, oracles: dict, pretrained: torch.nn.Module, graph, noise, train: DnaData, elbo_t: int,
                 seed: int):
        self.oracles = oracles
        self.pretrained = pretrained
        self.graph = graph
        self.noise = noise
        self.kind = train.kind
        self.elbo_t = elbo_t
        self.seed = seed
        top = top_hepg2(train, 1000)
        self.pwms = load_jaspar_pwms()[1]
        self.top_kmers = kmer_counts(top)
        self.top_motifs = motif_hits(top, self.pwms)

    def median_hepg2(self, oracle: str, x: Tensor) -> float:
        from models.dna import predict  # here, as sepo below: `python data/dna.py` has data/ as its path
        return hepg2_score(predict(self.oracles[oracle], x), self.kind).median().item()

    def __call__(self, x: Tensor) -> dict:
        import sepo
        from models.dna import predict
        device = next(self.pretrained.parameters()).device
        g = torch.Generator(device).manual_seed(self.seed)
        ll = sepo.elbo(self.pretrained, self.graph, self.noise, x.to(device), self.elbo_t, generator=g,
                       batch_size=256)
        return {"Pred-Activity": self.median_hepg2("eval_oracle", x),
                "ATAC-Acc %": 100 * (predict(self.oracles["access"], x) > 0).float().mean().item(),
                "3-mer corr": pearson(kmer_counts(x), self.top_kmers),
                "JASPAR corr": spearman(motif_hits(x, self.pwms), self.top_motifs),
                "App-Log-Lik": ll.median().item(),
                "Reward (ft oracle)": self.median_hepg2("ft_oracle", x)}


if __name__ == "__main__":
    d = load_data(sys.argv[1] if len(sys.argv) > 1 else "")
    names, counts = np.unique(d.chrom, return_counts=True)
    print(f"{len(d)} sequences ({d.kind}), {len(names)} chromosomes: "
          + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
    halves = oracle_chromosomes(d.chrom, "chr1", "chr2")
    print("oracle halves (test chr1, validation chr2):", *map(" ".join, halves), sep="\n  ")
