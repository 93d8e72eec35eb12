"""DRAKES's DNA evaluation protocol, exactly: the release layout, the 128-step sampler, App-Log-Lik and the
five metrics of its enhancer table (Wang et al., "Fine-Tuning Discrete Diffusion Models via Reward
Optimization with Applications to DNA and Protein Design", ICLR 2025: drakes_dna/eval.ipynb), on the
masked diffusion language model (MDLM) of Sahoo et al., "Simple and Effective Masked Diffusion Language
Models", NeurIPS 2024. docs/dna.md reads it metric by metric ("The DRAKES release").

    python -m data.drakes BASE_DIR     # check a release: its files, the data table, the reference set

  1. the release: its files, where they are, the data table's header
  2. the evaluation sampler and App-Log-Lik (the MDLM/DDPM step on DRAKES's grid; sepo's pieces)
  3. Pred-Activity and ATAC-Acc (the oracles' columns)
  4. 3-mer Pearson (the top-0.1% HepG2 reference set)
  5. JASPAR Spearman: FIMO (Grant, Bailey & Noble 2011) as pymemesuite runs it for gReLU 1.0.2, on the
     JASPAR 2022 CORE collection (Castro-Mondragon et al. 2022)
  6. the samples and the scorer of the table's rows, and the published numbers

Sequences are LongTensor[N, 200] over A, C, G, T = 0..3 (DRAKES's DNA_ALPHABET), MASK = 4. Run as a module
from the repository root: it imports sepo.py and data/dna.py.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sepo
from data.dna import SEQ_LEN, kmer_counts, pearson, read_gosai, spearman, table_header

# === 1. The release (DRAKES_data.zip, unzipped: a folder holding mdlm/). ==========================


@dataclass(frozen=True)
class ReleaseFile:
    path: str              # relative to the folder that holds mdlm/
    what: str
    required: bool = True


RELEASE = {
    "pretrained": ReleaseFile("mdlm/outputs_gosai/pretrained.ckpt", "the pre-trained MDLM (DRAKES's CNN)"),
    "ft_oracle": ReleaseFile("mdlm/outputs_gosai/lightning_logs/reward_oracle_ft.ckpt",
                             "the fine-tuning reward oracle (gReLU Enformer: hepg2, k562, sknsh)"),
    "eval_oracle": ReleaseFile("mdlm/outputs_gosai/lightning_logs/reward_oracle_eval.ckpt",
                               "the evaluation oracle of Pred-Activity (gReLU Enformer: hepg2, k562, sknsh)"),
    "atac": ReleaseFile("mdlm/gosai_data/binary_atac_cell_lines.ckpt",
                        "the ATAC accessibility classifier (gReLU Enformer, binary, 7 cell lines)"),
    "data": ReleaseFile("mdlm/gosai_data/processed_data/gosai_all.csv",
                        "the Gosai MPRA table (seq, hepg2, k562, sknsh)"),
    "drakes": ReleaseFile("mdlm/reward_bp_results_final/finetuned.ckpt",
                          "DRAKES fine-tuned with KL weight 1e-3 (optional)", required=False),
    "drakes_zero": ReleaseFile("mdlm/reward_bp_results_final/zero_alpha.ckpt",
                               "DRAKES fine-tuned without KL (optional)", required=False),
}
GOSAI_COLUMNS = (("seq", "sequence"), ("hepg2",), ("k562",), ("sknsh",))  # what dna.read_gosai reads
# About the rows of DRAKES's gosai_all.csv: its config trains 100 epochs in 131,500 steps of 512 sequences
GOSAI_ROWS = 673_000


def release_root(base_dir: str) -> str:
    """The folder holding mdlm/: base_dir itself, or the one subfolder of base_dir that holds it (the archive
    unzipped into a folder of its own; a __MACOSX/ beside it is ignored); base_dir when none does (every file
    is then reported missing under it). Two subfolders holding mdlm/ are an error: which one is meant?"""
    if os.path.isdir(os.path.join(base_dir, "mdlm")):
        return base_dir
    subs = [e.path for e in os.scandir(base_dir) if e.is_dir()] if os.path.isdir(base_dir) else []
    found = sorted(d for d in subs if os.path.isdir(os.path.join(d, "mdlm")))
    if len(found) > 1:
        raise ValueError(f"{base_dir}: {len(found)} subfolders hold mdlm/ ({', '.join(found)}); "
                         "pass one of them")
    return found[0] if found else base_dir


def check_gosai_header(path: str) -> None:
    """The data table's header has the columns DRAKES's GosaiDataset reads (seq, hepg2, k562, sknsh; names
    ignore case), checked on its first line only: an error names the file and the missing columns."""
    header = table_header(path, ",")
    missing = [" or ".join(names) for names in GOSAI_COLUMNS if not any(n in header for n in names)]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (header: {list(header)})")


def find_release(base_dir: Optional[str], overrides: Optional[dict[str, Optional[str]]] = None
                 ) -> dict[str, str]:
    """{name: path} of the release's files (RELEASE), each at its release path under base_dir (or the folder
    release_root finds) unless overrides[name] gives a path (None: no override). Optional files that are
    absent are left out. Every missing file is named in ONE error, with where it was expected and what it
    is; the data table's header is then checked (check_gosai_header), all before any work starts."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(RELEASE))
    if unknown:
        raise ValueError(f"unknown release file(s) {unknown}; known: {', '.join(RELEASE)}")
    root = release_root(base_dir) if base_dir else None
    paths, missing = {}, []
    for name, f in RELEASE.items():
        path = overrides.get(name) or (os.path.join(root, f.path) if root else None)
        if path is not None and os.path.isfile(path):
            paths[name] = path
        elif f.required or name in overrides:
            where = f"{path} (override)" if name in overrides else path or f"<no base dir>/{f.path}"
            missing.append(f"  {name}: {where}: {f.what}")
    if missing:
        head = f"DRAKES release ({base_dir or 'no base dir'}): {len(missing)} file(s) missing:"
        raise FileNotFoundError("\n".join([head] + missing))
    check_gosai_header(paths["data"])
    return paths


# === 2. The evaluation sampler and App-Log-Lik (MDLM's DDPM sampler, as DRAKES runs it). ===========

GRAPH = sepo.Masked(4)        # A, C, G, T = 0..3, MASK = 4 (DRAKES: mask_index = 4)
NOISE = sepo.LogLinear(1e-3)  # MDLM's LogLinearNoise, eps 1e-3: mc(t) = 1 - e^{-sigma(t)} = (1 - 1e-3) t
T_END = 1e-5                  # the grid's last time (MDLM's `_sample(eps=1e-5)`); never 0: mc(0) = 0


def check_tokens(x: Tensor, what: str, vocab: int = 4) -> None:
    """x is a LongTensor[N, L] over 0..vocab-1; else an error naming the first bad row and position."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype != torch.long:
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a LongTensor [N, L] of tokens 0..{vocab - 1}, got {desc}")
    bad = ((x < 0) | (x >= vocab)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"{what}: row {i + 1}, position {j + 1}: token {x[i, j].item()} "
                         f"is not in 0..{vocab - 1}")


def drakes_grid(steps: int = 128, device=None) -> Tensor:
    """t_i = linspace(1, 1e-5, steps + 1) [steps + 1]: the times of the sampler and of App-Log-Lik
    (DRAKES diffusion_gosai_update.py `_sample`, `get_likelihood`; dt = (1 - 1e-5) / steps)."""
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    return torch.linspace(1.0, T_END, steps + 1, device=device, dtype=torch.get_default_dtype())


def step_log_probs(model: nn.Module, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """log P(x_s = . | x_t) [B, L, 5] of one MDLM/DDPM step t -> s (DRAKES `_ddpm_update`): a masked
    position becomes v w.p. p_theta(v | x_t) (mc(t) - mc(s)) / mc(t), stays masked w.p. mc(s) / mc(t); an
    unmasked one is kept. With mc(t) = 1 - alpha_t this is sepo's masked predictor step on LogLinear(1e-3)."""
    B = len(x)
    return sepo.predictor_log_probs(model, GRAPH, NOISE, x, t.expand(B), s.expand(B))


def remove_noise(model: nn.Module, x: Tensor, t: float = T_END) -> Tensor:
    """The final noise removal at t (DRAKES `_sample`, noise_removal=True): every position still masked
    becomes the argmax of p_theta over the four bases (the MASK column never wins); the others are kept."""
    out = sepo.model_output(model, GRAPH, x, NOISE(torch.full((len(x),), t, device=x.device))[0])
    return torch.where(x == GRAPH.mask_id, out[..., :4].argmax(-1), x)


@torch.no_grad()
def drakes_sample(model: nn.Module, num_samples: int = 640, steps: int = 128, corrector_steps: int = 0,
                  generator: Optional[torch.Generator] = None, batch_size: int = 64, seed: int = 0,
                  length: int = SEQ_LEN) -> Tensor:
    """x ~ the model [num_samples, length] by DRAKES's evaluation sampler: from all MASK, `steps` MDLM steps
    t_i -> t_{i+1} on drakes_grid (step_log_probs; DRAKES steps to t_i - dt, the same time up to float
    rounding), then remove_noise. corrector_steps > 0 inserts that many gradient-flow corrector steps at
    t_{i+1} of length t_i - t_{i+1} after each predictor step but the last, as sepo.rollout does ("SEPO with
    GF"). Batches of batch_size (DRAKES: 10 x 64) are drawn one after the other from one generator (default:
    seeded with `seed`, on the model's device), consumed in a fixed order."""
    if num_samples < 0 or batch_size < 1 or corrector_steps < 0:
        raise ValueError(f"need num_samples >= 0, batch_size >= 1, corrector_steps >= 0; "
                         f"got {num_samples}, {batch_size}, {corrector_steps}")
    device = sepo._device(model)
    generator = generator or torch.Generator(device).manual_seed(seed)
    ts = drakes_grid(steps, device)
    out = []
    for b in range(0, num_samples, batch_size):
        x = GRAPH.sample_prior((min(batch_size, num_samples - b), length), device)
        for i in range(steps):
            x = sepo.sample_categorical(step_log_probs(model, x, ts[i], ts[i + 1]), generator)
            for _ in range(corrector_steps if i < steps - 1 else 0):
                t, dtau = ts[i + 1].expand(len(x)), (ts[i] - ts[i + 1]).expand(len(x))
                logp = sepo.corrector_log_probs(model, GRAPH, NOISE, x, t, dtau)
                x = sepo.sample_categorical(logp, generator)
        out.append(remove_noise(model, x, T_END))
    return torch.cat(out) if out else torch.zeros(0, length, dtype=torch.long, device=device)


def likelihood_weights(steps: int = 128) -> Tensor:
    """App-Log-Lik's weights [steps], float64: w_i = (mc(t_i) - mc(t_i - dt)) / mc(t_i) = dt / t_i."""
    t = torch.linspace(1.0, T_END, steps + 1, dtype=torch.float64)[:-1]
    return (1.0 - T_END) / steps / t


@torch.no_grad()
def drakes_log_likelihood(model: nn.Module, x0: Tensor, steps: int = 128,
                          generator: Optional[torch.Generator] = None, batch_size: int = 2048,
                          seed: int = 0) -> Tensor:
    """App-Log-Lik's single-draw estimate per sequence [N], float64 (DRAKES `get_likelihood(num_steps=128,
    n_samples=1)`): sum_i w_i sum_l [x_t^(i)_l = MASK] log p_theta(x0_l | x_t^(i)), with x_t^(i) a fresh
    masking of x0 (each position iid w.p. mc(t_i)) at each time t_i of drakes_grid but the last, and w_i =
    dt / t_i (likelihood_weights). An unmasked position adds log 1 = 0 (SUBS). DRAKES takes the median over
    the samples, always under the pre-trained model. The `steps` times of a sequence go through the model
    together, batch_size (sequence, time) rows a pass; the masks come from one generator (default: seeded
    with `seed`, on the model's device)."""
    check_tokens(x0, "x0")
    device = sepo._device(model)
    generator = generator or torch.Generator(device).manual_seed(seed)
    sigma = NOISE(drakes_grid(steps, device)[:-1])[0]
    w = likelihood_weights(steps).to(device)
    per = max(1, batch_size // steps)
    out = []
    for xb in x0.to(device).split(per):
        rows = xb.repeat_interleave(steps, 0)  # row j * steps + i: sequence j at time t_i
        sig = sigma.repeat(len(xb))
        xt = GRAPH.sample_transition(rows, sig, generator)
        logp = GRAPH.denoiser_log_probs(sepo.model_output(model, GRAPH, xt, sig))
        logp = logp.gather(-1, rows[..., None]).squeeze(-1).double()
        per_level = torch.where(xt == GRAPH.mask_id, logp, 0.0).sum(-1).view(len(xb), steps)
        out.append(per_level @ w)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


# === 3. Pred-Activity and ATAC-Acc. ================================================================

HEPG2 = 0  # the oracles' outputs follow their training labels (hepg2, k562, sknsh): HepG2 is column 0


@torch.no_grad()
def oracle_predictions(oracle: nn.Module, x: Tensor, batch_size: int = 64) -> Tensor:
    """oracle(x) [N, T] in float64 on the CPU, batch_size sequences a call (an oracle is called on
    LongTensor[B, 200]; a gReLU [B, T, 1] output loses its last axis); a wrong shape is an error."""
    check_tokens(x, "sequences")
    device, out = sepo._device(oracle), []
    for xb in x.split(batch_size):
        y = oracle(xb.to(device))
        y = y[..., 0] if isinstance(y, Tensor) and y.dim() == 3 and y.shape[-1] == 1 else y
        if not (isinstance(y, Tensor) and y.dim() == 2 and len(y) == len(xb)):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{type(oracle).__name__} returned {shape} for {len(xb)} sequences; "
                             f"need [{len(xb)}, T]")
        out.append(y.double().cpu())
    return torch.cat(out)


def _column_values(preds: Tensor, column: int, what: str) -> np.ndarray:
    if preds.dim() != 2 or not 0 <= column < preds.shape[1]:
        raise ValueError(f"{what}: column {column} does not exist in predictions of shape "
                         f"{tuple(preds.shape)}")
    return preds[:, column].double().cpu().numpy()


def pred_activity(preds: Tensor, column: int = HEPG2) -> float:
    """Pred-Activity: the median over the samples of the evaluation oracle's HepG2 column (eval.ipynb:
    np.median of cal_gosai_pred_new(...)[:, 0]; numpy's median of an even count: the two middle values'
    mean)."""
    return float(np.median(_column_values(preds, column, "Pred-Activity")))


def atac_accuracy(probs: Tensor, column: int = 1) -> float:
    """ATAC-Acc in %: the share of samples whose ATAC probability in `column` is > 0.5 (strictly). DRAKES
    reads column 1, the SEPO reference code column 0: print the checkpoint's task names to see which is
    HepG2."""
    return float(100.0 * np.mean(_column_values(probs, column, "ATAC-Acc") > 0.5))


# === 4. 3-mer Pearson. =============================================================================


def top_quantile_rows(values: np.ndarray, q: float = 0.999) -> np.ndarray:
    """Indices of the values strictly above numpy's default (linear) q-quantile (DRAKES cal_highexp_kmers:
    HepG2 > np.quantile(hepg2, 0.999), 6.27 on gosai_all.csv)."""
    values = np.asarray(values, dtype=np.float64)
    return np.flatnonzero(values > np.quantile(values, q))


def load_reference(path: str, q: float = 0.999) -> Tensor:
    """The reference set of the 3-mer and JASPAR correlations [n_ref, 200]: the rows of the WHOLE data table
    (DRAKES trains on all of it) whose HepG2 activity, read in float64, is above its q-quantile."""
    check_gosai_header(path)
    x, y, _ = read_gosai(path)
    return x[torch.from_numpy(top_quantile_rows(y[:, 0].numpy(), q))]


def kmer_pearson(gen_counts: Tensor, ref_counts: Tensor) -> float:
    """3-mer Pearson: scipy.stats.pearsonr of the generated and the reference set's overlapping k-mer
    counts (data.dna.kmer_counts, L - k + 1 windows a sequence) over the k-mers seen in either set, a k-mer
    absent from one counting 0 there (eval.ipynb compare_kmer; its scaling of the reference counts by
    n_gen / n_ref cannot change a Pearson). NaN if either vector is constant, as pearsonr."""
    seen = (gen_counts > 0) | (ref_counts > 0)
    return pearson(gen_counts[seen], ref_counts[seen])


# === 5. JASPAR Spearman: a FIMO scan as pymemesuite runs it. =======================================
# DRAKES counts, for each set, the hits of gReLU 1.0.2's scan_sequences(seqs, "jaspar"): pymemesuite's
# MotifFile reads the MEME file JASPAR2022_CORE_non-redundant_pfms_meme.txt, and its FIMO(both_strands=True,
# threshold=1e-3).score_motif(motif, seqs, motif_file.background) scans each motif. Every step below
# reproduces pymemesuite 0.1.0a2-a4 (MEME suite 5.4.1 code): the integer score matrices and p-value tables
# are bit-identical for all 1956 motifs, and so are the hit counts (docs/dna.md).

NRDB_DNA = (0.281774, 0.222020, 0.228876, 0.267330)  # MEME's get_nrdb_frequencies, DNA (A, C, G, T)
PSSM_RANGE = 1000       # MEME's PSSM_RANGE: a position's log-odds are scaled to integers in [0, 1000]
MOTIF_PSEUDO = 0.1      # MotifFile(pseudocount=0.1), FIMO's --motif-pseudo default
FIMO_THRESHOLD = 1e-3   # gReLU's pthresh: a hit has p < 1e-3 (strictly)
MAX_STORED = 100_000    # pymemesuite keeps at most this many hits per motif, dropping the least significant
DEFAULT_SITES = 20      # MEME's DEFAULT_SITE_COUNT, for a motif without nsites
COMPLEMENT = [3, 2, 1, 0]  # A <-> T, C <-> G on A, C, G, T


def pymemesuite_background(freqs: tuple[float, ...] = NRDB_DNA) -> np.ndarray:
    """The background pymemesuite uses for the pseudocounts, the log-odds and the p-values [4], float64:
    MotifFile sets no background source, so MEME picks its NRDB frequencies (not the file's uniform one) and
    normalises them with MEME's normalize_frequencies(freqs, 5e-7); sums in MEME's order, for equal bits."""
    total = 5e-7 * len(freqs)
    for f in freqs:
        total += f
    out = [(f + 5e-7) / total for f in freqs]
    total = 0.0
    for f in out:
        total += f
    return np.array(out if total == 1.0 else [f / total for f in out])


def meme_probabilities(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """A JASPAR count matrix [w, 4] as the MEME file lists it: (letter probabilities count / column total,
    printed with six decimals, [w, 4]; nsites = the first column's total, truncated). Checked against gReLU
    1.0.2's JASPAR2022_CORE_non-redundant_pfms_meme.txt: equal for all 1956 motifs."""
    counts = np.asarray(counts, dtype=np.float64)
    p = np.char.mod("%.6f", counts / counts.sum(1, keepdims=True)).astype(np.float64)
    return p, int(counts[0].sum())


def with_pseudocount(p: np.ndarray, nsites: int, bg: np.ndarray, pseudo: float = MOTIF_PSEUDO) -> np.ndarray:
    """MEME's reading of a motif (motif-in.c post_process_motif): a row off 1 by more than 1e-5 is
    renormalised, then apply_pseudocount_to_motif: (p nsites + pseudo bg) / (nsites + pseudo)."""
    tot = p.sum(1, keepdims=True)
    p = np.where(np.abs(tot - 1.0) > 1e-5, p / tot, p)
    sites = nsites if nsites > 0 else DEFAULT_SITES
    return (p * sites + pseudo * bg) / (sites + pseudo)


def scaled_log_odds(p: np.ndarray, bg: np.ndarray, score_range: int = PSSM_RANGE
                    ) -> tuple[np.ndarray, float, float]:
    """FIMO's integer score matrix (MEME pssm.c build_motif_pssm, scale_score_matrix): (S [w, 4] int64,
    scale, offset). Log-odds lo = log2(p / bg) with MEME's log2 = ln * 1.44269504; offset = floor(min lo),
    scale = floor(range / (max lo - offset)); S = round-half-up((lo - offset) scale), so a window scores in
    [0, w range] and its raw score is S_sum / scale + w offset."""
    lo = np.log(p / bg) * 1.44269504
    small, large = lo.min(), lo.max()
    small = large - 1.0 if large == small else small
    offset = math.floor(small)
    scale = math.floor(score_range / (large - offset))
    return np.floor((lo - offset) * scale + 0.5).astype(np.int64), float(scale), float(offset)


def score_pvalues(S: np.ndarray, bg: np.ndarray, score_range: int = PSSM_RANGE) -> np.ndarray:
    """pv[s] = P(S(X) >= s) for s = 0..w range [w range + 1], X iid from the background, exactly (MEME pssm.c
    get_pv_lookup): the score's distribution by dynamic programming over positions, then the upper tail
    sums. Adds in MEME's order, for equal bits."""
    w = len(S)
    pdf = np.zeros(w * score_range + 1)
    pdf[0] = 1.0
    for i in range(w):
        new = np.zeros_like(pdf)
        top = i * score_range + 1  # scores reachable after i positions: 0 .. i range
        for a in range(4):
            new[S[i, a]:S[i, a] + top] += pdf[:top] * bg[a]
        pdf = new
    return np.minimum(1.0, np.cumsum(pdf[::-1])[::-1])


def hit_threshold(pv: np.ndarray, alpha: float = FIMO_THRESHOLD) -> int:
    """The least integer score s with pv[s] < alpha (pv never increases): a window is a hit iff its score is
    >= this; len(pv) (beyond every score) when no score is that rare."""
    below = np.flatnonzero(pv < alpha)
    return int(below[0]) if len(below) else len(pv)


@dataclass(frozen=True)
class MotifTable:
    """Motifs ready to scan: ids, names (the MEME alt name, what gReLU counts hits by), integer score matrices
    S_m [w_m, 4], hit thresholds, and per motif width the stacked weights of both strands."""
    ids: tuple[str, ...]
    names: tuple[str, ...]
    scores: tuple[np.ndarray, ...]
    thresholds: tuple[int, ...]
    groups: tuple[tuple[int, Tensor, Tensor, Tensor], ...]  # (w, indices [n], weights [2n, 4, w], thr [2n])

    def __len__(self) -> int:
        return len(self.ids)


def motif_table(ids: list[str], names: list[str], counts: list[np.ndarray],
                background: Optional[np.ndarray] = None, pseudocount: float = MOTIF_PSEUDO,
                alpha: float = FIMO_THRESHOLD) -> MotifTable:
    """A MotifTable of count matrices [w, 4] (A, C, G, T), read as pymemesuite reads their MEME file
    (meme_probabilities, with_pseudocount) and scored as its FIMO scores (scaled_log_odds, score_pvalues)."""
    bg = pymemesuite_background() if background is None else np.asarray(background, dtype=np.float64)
    scores, thresholds = [], []
    for c in counts:
        c = np.asarray(c, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != 4 or len(c) < 1 or (c < 0).any() or (c.sum(1) <= 0).any():
            raise ValueError(f"motif {ids[len(scores)]}: need a count matrix [w, 4] with positive column "
                             "totals")
        S = scaled_log_odds(with_pseudocount(*meme_probabilities(c), bg, pseudocount), bg)[0]
        scores.append(S)
        thresholds.append(hit_threshold(score_pvalues(S, bg), alpha))
    groups = []
    for w in sorted({len(S) for S in scores}):
        idx = [m for m, S in enumerate(scores) if len(S) == w]
        fwd = [torch.from_numpy(scores[m].T.astype(np.float32)) for m in idx]
        rev = [torch.from_numpy(scores[m][::-1][:, COMPLEMENT].T.astype(np.float32)) for m in idx]
        thr = torch.tensor([thresholds[m] for m in idx] * 2, dtype=torch.float32)
        groups.append((w, torch.tensor(idx), torch.stack(fwd + rev), thr))
    return MotifTable(tuple(ids), tuple(names), tuple(scores), tuple(thresholds), tuple(groups))


@functools.lru_cache(maxsize=4)
def jaspar2022_table(pseudocount: float = MOTIF_PSEUDO, alpha: float = FIMO_THRESHOLD) -> MotifTable:
    """DRAKES's 1956 motifs, cached per process: pyjaspar's offline JASPAR2022 database, CORE collection,
    latest version of each matrix, all taxa (= gReLU 1.0.2's JASPAR2022 CORE non-redundant MEME file, in its
    order), read and thresholded as pymemesuite does. About 1.2 s on one CPU core."""
    from pyjaspar import jaspardb
    motifs = jaspardb(release="JASPAR2022").fetch_motifs(collection="CORE", all_versions=False)
    counts = [np.array([m.counts[b] for b in "ACGT"], dtype=np.float64).T for m in motifs]
    ids, names = [m.matrix_id for m in motifs], [m.name for m in motifs]
    return motif_table(ids, names, counts, None, pseudocount, alpha)


def fimo_strand_hits(x: Tensor, table: MotifTable, batch_size: int = 128, last_window: bool = False
                     ) -> Tensor:
    """Hits per strand and motif [2, M] (+ then -), int64: the windows (sequence, offset, strand) whose
    integer score is >= the motif's threshold, i.e. p < alpha. The - strand scores the reverse complement of
    the window against the + strand's p-values (pymemesuite's PSSM.reverse_complement keeps the table); a
    palindromic site counts once on each strand. pymemesuite scans offsets 0..L-w-1 (`for offset in
    range(length - width)`): the window ending at the last base is never scored; last_window=True scores it
    too. One conv1d per motif width, on the CPU: float32 sums of integers below 2^24 are exact, and a margin
    of 0.5 would absorb any rounding."""
    check_tokens(x, "sequences")
    x = x.cpu()
    hits = torch.zeros(2, len(table), dtype=torch.long)
    for xb in x.split(batch_size):
        onehot = F.one_hot(xb, 4).float().transpose(1, 2)
        for w, idx, weights, thr in table.groups:
            n_windows = xb.shape[1] - w + (1 if last_window else 0)
            if n_windows <= 0:
                continue
            s = F.conv1d(onehot, weights)[..., :n_windows]  # [B, 2n, windows]
            hits[:, idx] += (s >= thr[None, :, None] - 0.5).sum((0, 2)).view(2, len(idx))
    if (hits.sum(0) > MAX_STORED).any():
        warnings.warn(f"a motif has more than {MAX_STORED} hits: pymemesuite would have kept only the "
                      f"{MAX_STORED} most significant, so DRAKES's count would be lower")
    return hits


def hits_by_name(hits: Tensor, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """{motif name: hits} summed over the motifs of one name (gReLU's hit table names a motif by its MEME
    alt name, pymemesuite's Motif.name: 4 matrices are CTCF; DRAKES takes value_counts of it); names without
    a hit are left out."""
    out: dict[str, int] = {}
    for name, h in zip(names, hits.tolist()):
        out[name] = out.get(name, 0) + int(h)
    return {k: v for k, v in out.items() if v > 0}


def jaspar_spearman(gen: dict[str, int], ref: dict[str, int]) -> float:
    """JASPAR Spearman: the Spearman correlation (average ranks for ties) of the hit counts per motif name
    over the names hit in BOTH sets: the pairwise NaN drop of pandas' pd.concat([ref, gen], axis=1)
    .corr(method="spearman") excludes a name absent from either set rather than counting it 0. NaN with
    fewer than two such names."""
    common = sorted(set(gen) & set(ref))
    if len(common) < 2:
        return float("nan")
    a = torch.tensor([gen[k] for k in common], dtype=torch.float64)
    b = torch.tensor([ref[k] for k in common], dtype=torch.float64)
    return spearman(a, b)


# === 6. The table's rows (samples, scorer), and the published numbers. =============================

METRICS = ("Pred-Activity", "ATAC-Acc %", "3-mer Pearson", "JASPAR Spearman", "App-Log-Lik")


class DrakesScorer:
    """The five metrics of one row of DRAKES's table for samples x [N, 200] (eval.ipynb): Pred-Activity
    (evaluation oracle, HepG2 median), ATAC-Acc % (column atac_column), 3-mer Pearson and JASPAR Spearman
    against the reference set (its statistics computed once, here), App-Log-Lik (median under the
    pre-trained model; each call draws its masks from a generator seeded with `seed`, so rows share them)."""

    def __init__(self, pretrained: nn.Module, eval_oracle: nn.Module, atac: nn.Module, reference: Tensor,
                 atac_column: int = 1, steps: int = 128, seed: int = 0, batch_size: int = 64):
        check_tokens(reference, "reference set")
        self.pretrained, self.eval_oracle, self.atac = pretrained, eval_oracle, atac
        self.atac_column, self.steps, self.seed, self.batch_size = atac_column, steps, seed, batch_size
        self.table = jaspar2022_table()
        self.ref_kmers = kmer_counts(reference.cpu())
        self.ref_motifs = hits_by_name(fimo_strand_hits(reference, self.table).sum(0), self.table.names)

    def __call__(self, x: Tensor) -> dict[str, float]:
        check_tokens(x, "samples")
        gen_motifs = hits_by_name(fimo_strand_hits(x, self.table).sum(0), self.table.names)
        ll = drakes_log_likelihood(self.pretrained, x, self.steps, seed=self.seed)
        atac = oracle_predictions(self.atac, x, self.batch_size)
        return {"Pred-Activity": pred_activity(oracle_predictions(self.eval_oracle, x, self.batch_size)),
                "ATAC-Acc %": atac_accuracy(atac, self.atac_column),
                "3-mer Pearson": kmer_pearson(kmer_counts(x.cpu()), self.ref_kmers),
                "JASPAR Spearman": jaspar_spearman(gen_motifs, self.ref_motifs),
                "App-Log-Lik": float(np.median(ll.cpu().numpy()))}


def table_samples(pretrained: nn.Module, models: dict, reward_fn, n_eval: int = 640, steps: int = 128,
                  n_best: int = 1, best_row: str = "Best-of-N") -> dict[str, Tensor]:
    """Each row's samples [n_eval, 200] as DRAKES's evaluation draws them (drakes_sample: from seed 0, `steps`
    steps, then its argmax): the pre-trained model's ("Pre-trained"), then those of models {row: (model,
    corrector steps)}, then best_row, the best-of-n_best baseline of the SEPO paper: per output, reward_fn's
    favourite of n_best pre-trained draws (seeds 0..n_best-1, seed 0's being the Pre-trained row)."""
    sample = lambda model, seed=0, gf=0: drakes_sample(model, n_eval, steps, gf, seed=seed).cpu()
    pool = torch.stack([sample(pretrained, seed) for seed in range(n_best)])  # [n_best, n_eval, 200]
    rows = {"Pre-trained": pool[0]}
    rows.update({name: sample(model, 0, gf) for name, (model, gf) in models.items()})
    reward = reward_fn(pool.flatten(0, 1)).view(n_best, n_eval)
    rows[best_row] = pool[reward.argmax(0), torch.arange(n_eval)]  # the first of equal rewards, as argmax
    return rows


def _row(*values: Optional[float]) -> dict[str, Optional[float]]:
    return dict(zip(METRICS, values))


# Published numbers; None: not reported. ATAC-Acc in %.
PUBLISHED: dict[str, dict[str, dict[str, Optional[float]]]] = {
    # DRAKES drakes_dna/eval.ipynb outputs (ChenyuWang-Monica/DRAKES 2d030ee): one seed-0 run of 640 samples
    # each, ATAC column 1; JASPAR: the `top_data` column of its Spearman table.
    "DRAKES eval.ipynb (seed 0, 640 samples, ATAC column 1)": {
        "Pre-trained": _row(0.246, 0.78, 0.005, 0.325, -262.33),
        "DRAKES (KL weight 1e-3)": _row(5.560, 91.9, 0.886, 0.910, -264.49),
        "DRAKES w/o KL": _row(6.434, 81.25, 0.314, 0.535, -281.09),
        "CFG (w = 10)": _row(4.936, 90.8, 0.737, 0.855, -264.62),
        "CG (scale 3e5)": _row(3.320, 0.0, -0.065, 0.176, -265.88),
        "SMC (alpha 0.5)": _row(4.722, 41.6, 0.821, 0.823, -258.89),
        "TDS (alpha 0.5, guidance 1000)": _row(4.467, 52.8, 0.839, 0.875, -258.88),
    },
    # The DRAKES paper's DNA table, means over 3 seeds, as quoted by later work (not re-read from the paper);
    # it reports no JASPAR correlation for SMC and TDS.
    "DRAKES paper (mean of 3 seeds)": {
        "Pre-trained": _row(0.17, 1.5, -0.061, 0.249, -261.0),
        "DRAKES (KL weight 1e-3)": _row(5.61, 92.5, 0.887, 0.911, -264.0),
        "DRAKES w/o KL": _row(6.44, 82.5, 0.307, 0.557, -281.0),
        "CFG (w = 10)": _row(5.04, 92.1, 0.746, 0.864, -265.0),
        "CG (scale 3e5)": _row(3.30, 0.0, -0.065, 0.212, -266.0),
        "SMC (alpha 0.5)": _row(4.15, 39.9, 0.840, None, -259.0),
        "TDS (alpha 0.5, guidance 1000)": _row(4.64, 45.3, 0.848, None, -257.0),
    },
    # SEPO (Zekri & Boulle, NeurIPS 2025): the paper's headline, and its reference code's eval_plots.ipynb
    # (ozekri/SEPO 4a4a40f), both with ATAC column 0 and a SEPO trained on the evaluation oracle.
    "SEPO paper (ATAC column 0)": {
        "SEPO": _row(7.64, 99.9, None, None, None),
    },
    "SEPO eval_plots.ipynb (ATAC column 0)": {
        "Pre-trained": _row(0.135, 0.47, None, None, None),
        "DRAKES (KL weight 1e-3)": _row(5.535, 93.1, None, None, None),
        "SEPO": _row(7.593, 99.5, None, None, None),
        "SEPO with GF": _row(7.645, 100.0, None, None, None),
    },
}


def published_table() -> str:
    """PUBLISHED as markdown tables, one per source, for a driver to print apart from its own results."""
    lines = []
    for source, rows in PUBLISHED.items():
        lines += [f"Published: {source}", "| Model | " + " | ".join(METRICS) + " |"]
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for model, r in rows.items():
            cells = ["-" if r[m] is None else f"{r[m]:g}" for m in METRICS]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    found = find_release(sys.argv[1] if len(sys.argv) > 1 else ".")
    for key, p in found.items():
        print(f"{key:12s} {p}")
    ref = load_reference(found["data"])
    print(f"reference set (HepG2 above its 0.999 quantile): {len(ref)} sequences")
