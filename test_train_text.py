"""Tests of train_text.py (CPU, seconds): HH-RLHF loader, prompt encoding, gold judge,
reward model, prefix-conditioned sampling, and the whole pipeline at toy size."""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

import train_text as T
from data import text as D

ROOT = Path(__file__).resolve().parent
torch.set_num_threads(1)  # tiny models: threads only add overhead (and the CI box is shared)

# toy sizes: the whole pipeline in seconds. TINY adds one gold-labelled policy pair per prompt; with --data
# the driver's default is none (a real file has real labels), which TINY_SIZES leaves in place.
TINY_SIZES = ["--threads", "1", "--vocab", "300", "--prompt-len", "12", "--response-len", "8",
              "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--pretrain-steps", "20",
              "--pretrain-batch", "16", "--rm-d-model", "32", "--rm-layers", "1", "--rm-heads", "2",
              "--rm-epochs", "0.05", "--rm-batch", "32", "--steps", "4", "--iters", "2", "--batch", "2",
              "--group", "2", "--lr", "1e-4", "--epochs", "1", "--kl-steps", "2", "--snis", "2",
              "--pl-positions", "4", "--ckpt-every", "1", "--eval-prompts", "8", "--eval-samples", "2",
              "--elbo-t", "2"]
TINY = [*TINY_SIZES, "--policy-pairs", "1"]


def hh(prompt_turns, response):
    return D.to_hh(prompt_turns, response)


def write_jsonl(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


GOOD = [
    json.dumps({"chosen": hh([("Human", "How do I bake bread?")],
                             "Mix flour, water and yeast, then bake it."),
                "rejected": hh([("Human", "How do I bake bread?")], "No idea.")}),
    "",  # blank lines are allowed
    json.dumps({"chosen": hh([("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Thanks for the help")],
                             "You are welcome, glad to help."),
                "rejected": hh([("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Thanks for the help")],
                               "Whatever.")}),
]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_hh_loader_good_lines(tmp_path, name):
    path = str(tmp_path / name)
    write_jsonl(path, GOOD)
    pairs = D.load_hh(path)
    assert len(pairs) == 2
    assert pairs[0].prompt == [("Human", "How do I bake bread?")]
    assert pairs[0].chosen == "Mix flour, water and yeast, then bake it."
    assert pairs[0].rejected == "No idea."
    assert pairs[0].line == 1 and pairs[1].line == 3
    assert pairs[1].prompt == [("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Thanks for the help")]
    assert pairs[1].chosen == "You are welcome, glad to help."
    # the prompt block text marks the turns and ends with the Assistant marker
    assert D.prompt_text(pairs[1].prompt) == "[H] Hi [A] Hello! [H] Thanks for the help [A]"


@pytest.mark.parametrize("bad, message", [
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": ', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    (json.dumps({"chosen": hh([("Human", "hi")], "yo")}), "'rejected'"),
    (json.dumps({"chosen": hh([("Human", "hi")], "yo"), "rejected": 3}), "'rejected'"),
    (json.dumps({"chosen": "Human: hi Assistant: yo", "rejected": "Human: hi Assistant: no"}), "expected"),
    (json.dumps({"chosen": hh([("Human", "  ")], "yo"), "rejected": hh([("Human", "  ")], "no")}),
     "empty prompt"),
    (json.dumps({"chosen": "preamble" + hh([("Human", "hi")], "yo"),
                 "rejected": hh([("Human", "hi")], "no")}),
     "before the first"),
    # valid JSON, but an unpaired surrogate is not text (the tokenizer would fail later, naming nothing)
    (json.dumps({"chosen": hh([("Human", "hi")], "yo"),
                 "rejected": hh([("Human", "hi")], "no")}).replace("no", "n\\ud83d"),
     "unpaired surrogate"),
])
def test_hh_loader_malformed_lines_name_the_line(tmp_path, bad, message):
    path = str(tmp_path / "bad.jsonl")
    write_jsonl(path, [GOOD[0], bad])
    with pytest.raises(ValueError) as e:
        D.load_hh(path)
    assert f"{path}:2" in str(e.value)
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_a_line_that_is_not_utf8_is_an_error_naming_it(tmp_path, name):
    path = str(tmp_path / name)
    body = (GOOD[0] + "\n").encode() + b'{"chosen": "caf\xe9", "rejected": "x"}\n'
    with (gzip.open if name.endswith(".gz") else open)(path, "wb") as f:
        f.write(body)
    with pytest.raises(ValueError, match=rf"{name}:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        D.load_hh(path)


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_corrupt_gzip_file_is_an_error_naming_it(tmp_path, damage):
    path = str(tmp_path / "pairs.jsonl.gz")
    write_jsonl(path, [GOOD[0]] * 200)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncated" else b"\n".join([GOOD[0].encode()] * 3))
    with pytest.raises(ValueError, match=r"pairs.jsonl.gz:\d+: cannot read the file"):
        D.load_hh(path)


@pytest.mark.slow
def test_vendored_preference_file_is_rebuilt_byte_for_byte(tmp_path):
    D.build_default_pairs(str(tmp_path / "pairs.jsonl.gz"))
    assert (tmp_path / "pairs.jsonl.gz").read_bytes() == open(D.DEFAULT_PAIRS, "rb").read()
    assert len(D.load_hh(D.DEFAULT_PAIRS)) == 3740


def test_empty_file_is_an_error(tmp_path):
    path = str(tmp_path / "empty.jsonl")
    write_jsonl(path, [""])
    with pytest.raises(ValueError, match="no preference pairs"):
        D.load_hh(path)


@pytest.fixture(scope="module")
def tok():
    texts = ["[H] hello there [A] hi, how are you?", "[H] thank you [A] you are welcome"] * 20
    return D.train_tokenizer(texts, 300)


def test_tokenizer_specials_and_roundtrip(tok):
    assert tok.get_vocab_size() == 300
    assert [tok.token_to_id(s) for s in D.SPECIALS] == [D.PAD, D.HUMAN, D.ASSISTANT]
    r = D.encode_responses(tok, ["you are welcome"], 8)
    assert r.shape == (1, 8) and r[0, -1] == D.PAD
    assert D.decode(tok, r) == ["you are welcome"]


def test_prompts_left_padded_and_too_long_prompt_is_an_error(tok):
    x, kept = D.encode_prompts(tok, [[("Human", "hello")]], 10)
    assert x.shape == (1, 10) and kept == [0]
    assert x[0, 0] == D.PAD and x[0, -1] == D.ASSISTANT and x[0, 1] == D.PAD
    long = [("Human", "hello there " * 20)]
    with pytest.raises(ValueError, match=r"data.jsonl:7: prompt is \d+ tokens, longer than the prompt block"):
        D.encode_prompts(tok, [[("Human", "hi")], long], 10, lines=[3, 7], source="data.jsonl")
    x, kept = D.encode_prompts(tok, [[("Human", "hi")], long], 10, long="skip")
    assert kept == [0] and x.shape == (1, 10)


def test_gold_judge_is_the_documented_rule():
    polite = D.gold_score("Thank you, I am glad to help you with that today.")
    rude = D.gold_score("I hate this stupid question, it is terrible.")
    assert polite > 0.5 > 0 > rude
    assert D.gold_score("") == -2.0
    # length penalty: a bare "Yes" loses 3 * 0.15 against a neutral 4-word answer
    assert D.gold_score("Yes") < D.gold_score("It is a computer")
    # markers are word prefixes, each counted once: "thanks" is "thank" and "thanks" (+0.5), "hopeless" is
    # "hope"
    vader = D._VADER.polarity_scores
    thanks, hopeless = "Thanks for asking me that", "It is hopeless for me"
    assert D.gold_score(thanks) == pytest.approx(vader(thanks)["compound"] + 0.5)
    assert D.gold_score(hopeless) == pytest.approx(vader(hopeless)["compound"] + 0.25)


def test_reward_model_loss_decreases_on_separable_pairs():
    torch.manual_seed(0)
    V, L, N = 20, 10, 64
    base = torch.randint(5, V, (N, L))
    base[:, -3:] = D.PAD  # ragged right padding
    chosen, rejected = base.clone(), base.clone()
    chosen[:, 4], rejected[:, 4] = 3, 4  # the only difference: token 3 is "good", token 4 is "bad"
    rm = T.RewardModel(V, L, d_model=32, n_layers=1, n_heads=2)
    opt = torch.optim.Adam(rm.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = -torch.nn.functional.logsigmoid(rm(chosen) - rm(rejected)).mean()  # Bradley-Terry
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)
    assert losses[-1] < 0.1 * losses[0]
    assert (rm.reward(chosen) > rm.reward(rejected)).all()
    r = rm.reward(chosen)
    assert torch.all((r > 0) & (r < 1))


def test_reward_model_ignores_where_the_pads_are():
    torch.manual_seed(0)
    rm = T.RewardModel(20, 8, d_model=16, n_layers=1, n_heads=2).eval()
    a = torch.tensor([[0, 0, 5, 6, 7, 0, 0, 0]])
    b = torch.tensor([[5, 0, 6, 0, 7, 0, 0, 0]])
    c = torch.tensor([[5, 6, 8, 0, 0, 0, 0, 0]])
    assert torch.allclose(rm.reward(a), rm.reward(b), atol=1e-6)
    assert not torch.allclose(rm.reward(a), rm.reward(c))


def test_policy_pairs_are_ordered_by_the_gold_judge(tok):
    # RLHF-style labels on model samples: same prompt on both sides, chosen >= rejected + 0.05
    args = T.parse_args([*TINY, "--policy-pairs", "3"])
    torch.manual_seed(0)
    graph, noise, model = T.make_diffusion(args, tok.get_vocab_size(), "cpu")
    # a random sampler over the tokenizer's real tokens (not its [UNUSED] padding): varied responses
    real = [i for t, i in tok.get_vocab().items() if not t.startswith("[") and i < tok.get_vocab_size()]
    model.head.weight.data.normal_()
    model.head.bias.data[real] = 5.0
    data = D.TextData(tok, None, None, [], None, None, None)
    dialogues = [[("Human", "hello there")], [("Human", "thank you")]]
    prompts, _ = D.encode_prompts(tok, dialogues, args.prompt_len)
    chosen, rejected = T.policy_pairs(args, data, graph, noise, model.eval(), prompts, seed=0)
    assert 0 < len(chosen) <= 2 * 3 and chosen.shape == rejected.shape
    P = args.prompt_len
    assert torch.equal(chosen[:, :P], rejected[:, :P])
    assert all(any(torch.equal(c[:P], p) for p in prompts) for c in chosen)
    g_c = [D.gold_score(t) for t in D.decode(tok, chosen[:, P:])]
    g_r = [D.gold_score(t) for t in D.decode(tok, rejected[:, P:])]
    assert all(a >= b + 0.05 for a, b in zip(g_c, g_r))


@pytest.mark.parametrize("graph", ["uniform", "masked"])
def test_prefix_tokens_unchanged_by_sampling(graph):
    import sepo
    args = T.parse_args([*TINY, "--graph", graph])
    g, noise, model = T.make_diffusion(args, 50, "cpu")
    model.eval()
    Lp, L = args.prompt_len, args.prompt_len + args.response_len
    prefix = torch.randint(0, 50, (6, Lp))
    prefix[:, :3] = D.PAD
    x = sepo.sample(model, g, noise, 6, L, steps=5, prefix=prefix,
                    generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, L)
    assert torch.equal(x[:, :Lp], prefix)
    assert int(x.max()) < 50  # no MASK left in the response


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    text = capsys.readouterr().out
    for f in T.dataclasses.fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert type(f.default).__name__ == f.type, f"{f.name}: the flag parses as its default's type"
    for preset in T.PRESETS.values():
        assert set(preset) <= {f.name for f in T.dataclasses.fields(T.Config)}


def test_presets_and_policy_pairs_with_a_real_file():
    assert T.parse_args([]).steps == 16 and T.parse_args(["--preset", "paper"]).steps == 128
    assert T.parse_args(["--preset", "paper", "--group", "2"]).group == 2
    assert T.parse_args(["--data", "x.jsonl"]).policy_pairs == 0  # real labels: the judge only evaluates
    assert T.parse_args(["--data", "x.jsonl", "--policy-pairs", "2"]).policy_pairs == 2


def test_bad_settings_fail_before_any_work(tmp_path, capsys):
    for bad in (["--graph", "unifrom"], ["--baseline", "mean"], ["--long-prompts", "cut"]):
        with pytest.raises(SystemExit):
            T.main([*bad, "--out", str(tmp_path / "x")])
        assert "invalid choice" in capsys.readouterr().err
    # 0 pre-training steps: a division by zero in the lr schedule; before, these failed after the pipeline
    for flag, value, rule in (("--kl-steps", "-1", ">= 0"), ("--kl-coef", "nan", ">= 0"),
                              ("--eval-samples", "0", "> 0"), ("--pretrain-steps", "0", "> 0")):
        with pytest.raises(ValueError, match=f"{flag} must be {rule}, got"):
            T.main([flag, value, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_bootstrap_interval_over_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    lo, hi = D.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = D.bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5  # ~ 1 / sqrt(number of prompts)
    assert D.bootstrap_ci(np.full(7, 0.5)) == (0.5, 0.5)


def test_bench_times_one_step_and_writes_nothing(tmp_path, capsys):
    out = T.main([*TINY, "--bench", "--micro-batch", "2", "--out", str(tmp_path / "b")])
    log = capsys.readouterr().out
    assert 0 < out["step_s"] < 60 and "one trainer.step()" in log and "micro_batch=2" in log
    assert "GPU memory" not in log and math.isnan(out["peak_gib"])  # on a CPU: no peak to report
    assert not (tmp_path / "b").exists()  # a benchmark leaves no run folder behind


@pytest.mark.slow
def test_pipeline_smoke_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    res = T.main([*TINY, "--out", out])
    names = set(os.listdir(out))
    for f in ["tokenizer.json", "pretrain.pt", "policy_pairs_steps4.pt", "reward_model_steps4.pt",
              "sepo_steps4.pt", "curves_steps4.png", "results_steps4.md", "results_steps4.json",
              "examples_steps4.txt"]:
        assert f in names, f
    assert not [f for f in names if f.endswith(".tmp")]  # atomic writes leave no temp files
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"pre-trained", "SEPO (4 steps)", "chosen replies (data)"}
    for r in rows.values():
        for k in ["rm_score", "gold_mean", "gold_win", "nll_per_token", "distinct_1", "distinct_2"]:
            assert math.isfinite(r[k]), (r["model"], k)
        assert 0 < r["rm_score"] < 1 and r["gold_win_ci"][0] <= r["gold_win"] <= r["gold_win_ci"][1]
    assert 0 <= res["info"]["accuracy_data"] <= 1 and 0 <= res["info"]["accuracy_samples"] <= 1
    assert res["examples"] and all(e["prompt"].endswith("[A]") for e in res["examples"])
    log = capsys.readouterr().out
    assert "[sepo] it 2/2 reward" in log and " kl " in log and "clip" in log
    # docs/text_tradeoff.py: the figure and table over runs, from the runs' results files
    path = os.path.join(os.path.dirname(__file__), "docs", "text_tradeoff.py")
    spec = importlib.util.spec_from_file_location("text_tradeoff", path)
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    fig.main([out], out=str(tmp_path / "tradeoff.png"))
    table, sepo_row = capsys.readouterr().out, rows["SEPO (4 steps)"]
    assert os.path.getsize(tmp_path / "tradeoff.png") > 1000
    committed = {f: (ROOT / "docs" / f).read_bytes() for f in ("text_tradeoff.png", "text_frontier.png")}
    cli = subprocess.run([sys.executable, path, out], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0 and f"wrote {os.path.join(out, 'tradeoff.png')}" in cli.stdout  # by default
    assert f"| 0.1 | {sepo_row['rm_score']:.3f} | {sepo_row['gold_win']:.3f} [" in table
    assert f"| pre-trained | {rows['pre-trained']['rm_score']:.3f} |" in table
    # --bon-max: best-of-N by the reward model, a row at SEPO's budget (1 + ceil(2 * 2 * 2 / 16) = 2) and the
    # curve
    res = T.main([*TINY, "--out", out, "--bon-max", "3"])
    assert [c["N"] for c in res["best_of_n"]] == [1, 2, 3] and res["rows"][-1]["model"] == "best-of-2 (RM)"
    assert res["best_of_n"][1]["rm_score"] == pytest.approx(res["rows"][-1]["rm_score"])  # the same samples
    assert res["best_of_n"][2]["rm_score"] >= res["best_of_n"][0]["rm_score"]  # picked by that score
    path = os.path.join(os.path.dirname(__file__), "docs", "frontier.py")
    spec = importlib.util.spec_from_file_location("frontier", path)
    frontier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(frontier)
    capsys.readouterr()
    frontier.main("text", [out], out=str(tmp_path / "frontier.png"))
    table = capsys.readouterr().out
    assert "| pl/snis | alpha 0.1 | 2 | " in table and "| best-of-3 | | 3 |" in table
    assert os.path.getsize(tmp_path / "frontier.png") > 1000
    frontier.main("text", [out])  # by default beside the first run, never over the committed figures
    assert f"wrote {os.path.join(out, 'frontier.png')}" in capsys.readouterr().out
    assert committed == {f: (ROOT / "docs" / f).read_bytes() for f in committed}
    # a second run with more iterations reuses every cached stage and resumes SEPO
    T.main([*TINY, "--out", out, "--iters", "3"])
    log = capsys.readouterr().out
    assert "[pretrain] cached" in log and "[reward] cached" in log and "gold-labelled" not in log
    assert "[sepo] resuming" in log and "it 3/3" in log and "it 1/3" not in log
    # a stage made with other settings is refused, not silently reused
    with pytest.raises(ValueError, match="other settings"):
        T.main([*TINY, "--out", out, "--d-model", "48"])
    # a shorter run is not the 3-iteration model
    with pytest.raises(ValueError, match="holds 3 iterations, more than --iters 2"):
        T.main([*TINY, "--out", out, "--iters", "2"])


@pytest.mark.slow
def test_seeds_share_no_random_stream(tmp_path, monkeypatch):
    """Stage k seeds its streams with 1000 * --seed + k. Before, it was --seed + k: --seed 1 pre-trained from
    --seed 0's reward-model stream (0 + 1) and split its data with it."""
    from test_train_dna import seeds_used
    used = [seeds_used(monkeypatch, T.main, *TINY, "--seed", s, "--iters", "1", "--out", str(tmp_path / s))
            for s in "01"]
    assert len(used[0]) >= 6 and not used[0] & used[1]


@pytest.mark.slow
def test_pipeline_on_a_real_format_file_and_the_uniform_graph(tmp_path):
    """--data reads an HH-RLHF file of your own (here a small .jsonl.gz); the uniform graph runs end to
    end."""
    rng = np.random.default_rng(1)
    words = ["good", "fine", "thanks", "sorry", "bad", "no", "sure", "great", "maybe", "ok"]
    lines = []
    for i in range(60):
        prompt = [("Human", f"question {i} " + " ".join(rng.choice(words, 2)))]
        a, b = (" ".join(rng.choice(words, 4)) for _ in range(2))
        lines.append(json.dumps({"chosen": D.to_hh(prompt, a), "rejected": D.to_hh(prompt, b)}))
    path = str(tmp_path / "hh.jsonl.gz")
    write_jsonl(path, lines)
    argv = [*TINY_SIZES, "--data", path, "--graph", "uniform", "--out", str(tmp_path / "u"), "--prompt-len",
            "24"]
    res = T.main(argv)
    assert res["info"]["data"]["pairs"] == 60 and res["info"]["data"]["skipped_long_prompts"] == 0
    assert "accuracy_samples" not in res["info"]  # a real file: no gold-labelled policy pairs
    assert all(math.isfinite(r["nll_per_token"]) for r in res["rows"])
    # the file changed in place (same path, other pairs): the tokenizer is retrained and no stage is reused
    write_jsonl(path, lines[::-1][:50])
    with pytest.raises(ValueError, match=r"pretrain.pt was made with other settings \{'data_sha256'"):
        T.main(argv)


# ---------------------------------------------------------------------------- review fixes: split, metrics,
# encoding
def write_pairs(tmp_path, n=40):
    """A small HH-format file: n one-turn prompts x 2 pairs, chosen and rejected never equal."""
    rng = np.random.default_rng(0)
    words = ["good", "fine", "thanks", "sorry", "bad", "sure", "great", "maybe", "ok"]
    ask = lambda i: [("Human", f"question {i}")]
    lines = [json.dumps({"chosen": D.to_hh(ask(i), "sure " + " ".join(rng.choice(words, 3))),
                         "rejected": D.to_hh(ask(i), "no " + " ".join(rng.choice(words, 3)))})
             for i in range(n) for _ in range(2)]
    write_jsonl(tmp_path / "hh.jsonl", lines)
    return str(tmp_path / "hh.jsonl")


def test_reward_model_held_out_pairs_are_on_held_out_prompts_only(tmp_path):
    d = D.prepare_data(write_pairs(tmp_path), vocab=300, prompt_len=12, response_len=8)
    held = {tuple(x) for x in d.test_prompts.tolist()}
    assert len(d.rm_test[0]) > 0
    assert all(tuple(x) in held for x in d.rm_test[0][:, :12].tolist())  # was 3/4 training
    assert not any(tuple(x) in held for x in d.rm_train[0][:, :12].tolist())
    # the reward model's training data are unchanged: a random half of the training prompts' pairs
    assert len(d.rm_train[0]) == (d.info["pairs"] - len(d.rm_test[0])) // 2


def test_reward_model_accuracy_counts_a_tie_as_half(tmp_path, tok):
    cfg = T.parse_args([*TINY, "--policy-pairs", "0", "--out", str(tmp_path)])
    shape = (2, 64, cfg.prompt_len + cfg.response_len)
    a, b = torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(0))
    data = D.TextData(tok, None, None, [], None, (a, b), (a, a), {"sha256": "-", "tokenizer_sha256": "-"})
    _, info = T.train_reward_model(cfg, data, None, None, None, "cpu")
    assert info["accuracy_data"] == 0.5  # equal rows score equal: neither right nor wrong (was 0.0)
    # a cached reward model is re-measured on the current held-out pairs (0 or 1 here)
    data.rm_test = (a[:1], b[:1])
    rm, info = T.train_reward_model(cfg, data, None, None, None, "cpu")
    assert info["accuracy_data"] == D.pair_accuracy(rm.reward(a[:1]), rm.reward(b[:1])) in (0.0, 1.0)


def test_pairs_equal_after_the_cut_are_dropped_and_counted(tmp_path):
    lines = []
    for i in range(40):  # odd i: the replies differ only after --response-len tokens
        p = [("Human", f"question number {i}")]
        sorry = "I am sorry, I cannot help with that, "
        c, r = ((sorry + "but here is a good idea", sorry + "you are on your own") if i % 2
                else ("Sure, glad to help", "No."))
        lines.append(json.dumps({"chosen": D.to_hh(p, c), "rejected": D.to_hh(p, r)}))
    write_jsonl(tmp_path / "cut.jsonl", lines)
    d = D.prepare_data(str(tmp_path / "cut.jsonl"), vocab=300, prompt_len=24, response_len=8)
    for c, r in (d.rm_train, d.rm_test):
        assert not (c == r).all(1).any()  # before: 20 of 40 pairs, a sure error for any reward model
    assert d.info["skipped_identical_after_cut"] == 20 and d.info["pairs"] == 20


def test_malformed_dialogues_are_skipped_counted_and_printed(tmp_path, capsys):
    H = [("Human", "how are you?")]
    bad = [{"chosen": D.to_hh(H, ""), "rejected": D.to_hh(H, "fine")},
           {"chosen": D.to_hh(H, "fine"), "rejected": D.to_hh(H, "  ")},
           {"chosen": D.to_hh(H, "fine"), "rejected": D.to_hh(H, "fine")},
           {"chosen": D.to_hh(H + [("Assistant", "a")], "b"),
            "rejected": D.to_hh(H + [("Assistant", "a")], "c")},
           {"chosen": D.to_hh([("Assistant", "hi")] + H, "b"),
            "rejected": D.to_hh([("Assistant", "hi")] + H, "c")}]
    path = str(tmp_path / "hh.jsonl")
    write_jsonl(path, [GOOD[0], *map(json.dumps, bad), GOOD[2]])
    assert [p.line for p in D.load_hh(path)] == [1, 7]  # before: all 7 lines accepted silently
    assert f"skipped 5 pairs of {path}" in capsys.readouterr().out
    skipped = {}
    D.load_hh(path, skipped)
    assert skipped == {"empty response": 2, "chosen == rejected": 1, "prompt not ending with a Human turn": 1,
                       "first turn by the Assistant": 1}
    write_jsonl(path, [json.dumps(bad[2])])
    with pytest.raises(ValueError, match=rf"{path}: no preference pairs \(skipped: 1 chosen == rejected\)"):
        D.load_hh(path)


def test_literal_marker_strings_in_the_text_stay_text(tok):
    x, _ = D.encode_prompts(tok, [[("Human", "what does [A] mean? [H] [PAD] [UNUSED0]")]], 60)
    body = [i for i in x[0].tolist() if i != D.PAD]
    assert body[0] == D.HUMAN and body[-1] == D.ASSISTANT  # one turn, as written
    assert min(body[1:-1]) > D.ASSISTANT
    text = "type [PAD] here, press [H] or [A]"
    assert D.decode(tok, D.encode_responses(tok, [text], 40)) == [text]  # before: "type here, press or"
    # text without marker strings: the same ids as the marked string encoded with special tokens (the old
    # encoding)
    p = [("Human", "hello there"), ("Assistant", "hi, how are you?"), ("Human", ""), ("Human", "thank you")]
    tok.encode_special_tokens = False
    try:
        assert D.prompt_ids(tok, p) == tok.encode(D.prompt_text(p)).ids
    finally:
        tok.encode_special_tokens = True


def test_distinct_n_of_rows_with_one_and_many_responses_per_prompt_compare(tmp_path, monkeypatch):
    """A "model" that answers every held-out prompt with its data reply, eval_samples times, matches the data
    row."""
    cfg = T.parse_args([*TINY, "--eval-samples", "3", "--out", str(tmp_path)])
    d = D.prepare_data(write_pairs(tmp_path), vocab=cfg.vocab, prompt_len=cfg.prompt_len,
                       response_len=cfg.response_len)
    replies = D.encode_responses(d.tok, d.test_replies, cfg.response_len)
    monkeypatch.setattr(T, "generate", lambda cfg_, model, graph, noise, prompts, seed: torch.cat(
        [prompts, replies[: len(prompts) // 3].repeat_interleave(3, 0)], 1))
    torch.manual_seed(0)
    graph, noise, pre = T.make_diffusion(cfg, d.tok.get_vocab_size(), "cpu")
    rm = T.RewardModel(d.tok.get_vocab_size(), cfg.prompt_len + cfg.response_len, 16, 1, 2).eval()
    rows, _, _, _ = T.evaluate(cfg, d, graph, noise, pre.eval(), pre, rm)
    assert [r["n"] for r in rows] == [3 * rows[2]["n"]] * 2 + [rows[2]["n"]]
    for r in rows[:2]:  # before: 1/3 of the data row's distinct-1, for the same texts
        data_row = (rows[2]["distinct_1"], rows[2]["distinct_2"])
        assert (r["distinct_1"], r["distinct_2"]) == pytest.approx(data_row)
    # the slices [a b, a b] and [c d, e f]
    assert D.distinct_n(["a b", "c d", "a b", "e f"], 1, per_prompt=2) == 0.75


def test_a_refused_run_leaves_the_folders_tokenizer_alone(tmp_path, monkeypatch):
    import hashlib
    from tokenizers import Tokenizer

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop  # after pre-training: tokenizer.json and pretrain.pt are written
    out, folder_tok = str(tmp_path / "run"), tmp_path / "run" / "tokenizer.json"
    monkeypatch.setattr(T, "train_reward_model", stop)
    with pytest.raises(Stop):
        T.main([*TINY, "--out", out])
    saved = folder_tok.read_bytes()
    with pytest.raises(ValueError, match="pretrain.pt was made with other settings"):
        T.main([*TINY, "--out", out, "--vocab", "400"])
    assert folder_tok.read_bytes() == saved  # before: replaced by the refused run's 400-id tokenizer
    settings = torch.load(os.path.join(out, "pretrain.pt"), weights_only=False)["settings"]
    assert hashlib.sha256(Tokenizer.from_file(str(folder_tok)).to_str().encode()).hexdigest()[:16] == \
        settings["tokenizer_sha256"]


# ---------------------------------------------------------------------------- the SEDD path (--sedd)
from models import gpt2 as G  # noqa: E402
from models.text import TextReward, end_at_eot, load_networks, load_policy  # noqa: E402
from test_sedd import write_sedd_standin  # noqa: E402
from test_text_models import (minchatgpt_state, write_causal_lm, write_hf_reward_model,  # noqa: E402
                              write_minchatgpt_checkpoint)

TINY_SEDD = ["--threads", "1", "--prompt-len", "24", "--response-len", "8", "--rm-d-model", "32",
             "--rm-layers", "1", "--rm-heads", "2", "--rm-epochs", "0.5", "--rm-batch", "16", "--steps", "4",
             "--iters", "2", "--batch", "2", "--group", "2", "--epochs", "2", "--kl-steps", "2",
             "--snis", "2",
             "--pl-positions", "4", "--ckpt-every", "1", "--eval-prompts", "4", "--eval-samples", "2",
             "--elbo-t", "2", "--micro-batch", "2", "--chunk-size", "8", "--eval-batch", "8", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def sedd_files(tmp_path_factory):
    """A SEDD stand-in in the hub layout, a small HH-RLHF file with short prompts, and a reward model of each
    format: transformers (also a second one, the judge), minChatGPT (LoRA, width 64: 4 heads; a block of 64
    tokens, not 1024, for speed), and a causal LM."""
    root = tmp_path_factory.mktemp("sedd_path")
    rng = np.random.default_rng(0)
    reply = lambda start: start + " ".join(rng.choice(["good", "fine", "thanks", "sorry", "bad", "great"], 3))
    ask = lambda i: [("Human", f"question {i}?")]
    pairs = [{"chosen": D.to_hh(ask(i), reply("sure, ")), "rejected": D.to_hh(ask(i), reply("no. "))}
             for i in range(40)]
    lines = [json.dumps(p) for p in pairs]
    write_jsonl(root / "hh.jsonl", lines)
    return {"sedd": str(write_sedd_standin(root / "sedd")), "data": str(root / "hh.jsonl"),
            "transformers": write_hf_reward_model(str(root / "hf_rm")),
            "judge": write_hf_reward_model(str(root / "hf_judge"), seed=1),
            "minchatgpt": write_minchatgpt_checkpoint(str(root / "rm_final.pt"), minchatgpt_state(block=64)),
            "lm": write_causal_lm(str(root / "lm"))}


def sedd_run(files, out, *flags):
    return T.main(["--sedd", files["sedd"], "--data", files["data"], *TINY_SEDD, "--out", str(out), *flags])


def test_a_bf16_reference_reads_the_checkpoint_once(tmp_path, sedd_files, monkeypatch):
    """Under amp bf16 the KL reference is the loaded policy rounded to bf16 (models/sedd.py: bf16_copy): the
    same tensors as a second read of the file would give, without that read."""
    import models.sedd as S
    reads, read = [], S._read_weights
    monkeypatch.setattr(S, "_read_weights", lambda path: reads.append(path) or read(path))
    cfg = T.parse_args(["--sedd", sedd_files["sedd"], "--data", sedd_files["data"], *TINY_SEDD,
                        "--out", str(tmp_path)])
    nets = load_networks(cfg, "cpu", "bf16", evaluation=False)
    assert len(reads) == 1
    again = S.load_sedd(sedd_files["sedd"], dtype=torch.bfloat16, head_from=cfg.prompt_len)
    ref, policy = nets["ref"].state_dict(), nets["policy"].state_dict()
    for key, t in again.state_dict().items():
        assert ref[key].dtype == t.dtype and torch.equal(ref[key], t), key
        assert policy[key].dtype == torch.float32, key
    assert nets["ref"].autocast and not nets["policy"].autocast


REWARD_FLAGS = {"transformers": lambda f: ["--reward-model", f["transformers"]],
                "minchatgpt": lambda f: ["--reward-model", f["minchatgpt"], "--lora-merges", "1",
                                         "--reward-heads", "4"]}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["transformers", "minchatgpt"])
def test_a_sedd_run_with_a_given_reward_model_scores_its_saved_samples(tmp_path, sedd_files, fmt):
    """A whole --sedd run on the stand-in, its reward model of each format, a judge and a perplexity LM: the
    table's RM score is sigmoid(the reward model's own score) of the saved samples, the judge column the
    judge's own score of them, and the generative perplexity SEDD's protocol on them (models/gpt2.py,
    loaded independently)."""
    res = sedd_run(sedd_files, tmp_path / fmt, *REWARD_FLAGS[fmt](sedd_files), "--judge", sedd_files["judge"],
                   "--ppl-model", sedd_files["lm"])
    samples = torch.load(tmp_path / fmt / "samples_steps4.pt", weights_only=True)
    table = (tmp_path / fmt / "results_steps4.md").read_text()
    rm = G.load_reward_model(*REWARD_FLAGS[fmt](sedd_files)[1:2], **({"lora_merges": 1, "n_heads": 4}
                                                                     if fmt == "minchatgpt" else {}))
    judge, lm = G.load_reward_model(sedd_files["judge"]), G.load_causal_lm(sedd_files["lm"])
    names = {"pre-trained", "SEPO (4 steps)", "chosen replies (data)"}
    assert set(samples) == {r["model"] for r in res["rows"]} == names
    for row in res["rows"]:
        x = samples[row["model"]]
        assert row["rm_score"] == pytest.approx(torch.sigmoid(rm(x)).mean().item(), rel=1e-6)
        assert row["gold_mean"] == pytest.approx(judge(x).mean().item(), rel=1e-6)
        ppl = G.generative_perplexity(lm, x, prompt_len=24, until_eot=True)[0]
        assert row["gen_perplexity"] == pytest.approx(ppl)
        assert f"| {row['model']} | {len(x)} | {row['rm_score']:.3f} | {row['gold_mean']:.3f} |" in table
        eot = (x[:, 24:] == D.EOT).int().cumsum(1) > 0
        assert (x[:, 24:][eot] == D.EOT).all()  # read up to the first EOT: nothing after it but EOT
    assert f"judge {sedd_files['judge']} win rate" in table and "not GPT-2 large" in table
    assert f"generative perplexity ({sedd_files['lm']})" in table
    assert res["info"]["data"]["reward_sha256"] and 0 <= res["info"]["accuracy_data"] <= 1


@pytest.mark.slow
def test_a_sedd_run_trains_our_reward_model_and_its_checkpoint_reproduces_the_run(tmp_path, sedd_files,
                                                                                    capsys):
    """Without --reward-model the run trains ours on the pairs (GPT-2 ids, EOT the pad); given back as
    --reward-model, that checkpoint (format c) gives the same SEPO iterations and the same table. Then
    resume."""
    own = sedd_run(sedd_files, tmp_path / "own")
    for f in ["reward_model_steps4.pt", "sepo_steps4.pt", "samples_steps4.pt", "results_steps4.md",
              "curves_steps4.png"]:
        assert (tmp_path / "own" / f).exists(), f
    assert "pretrain.pt" not in os.listdir(tmp_path / "own") and own["info"]["data"]["pairs"] == 40
    path = str(tmp_path / "own" / "reward_model_steps4.pt")
    rm = G.load_reward_model(path)
    x = torch.load(tmp_path / "own" / "samples_steps4.pt", weights_only=True)["SEPO (4 steps)"]
    assert rm.format == "sepo" and rm.pad_id == D.EOT
    assert own["rows"][1]["rm_score"] == pytest.approx(torch.sigmoid(rm(x)).mean().item(), rel=1e-6)
    given = sedd_run(sedd_files, tmp_path / "given", "--reward-model", path)
    strip = lambda h: [{k: v for k, v in s.items() if not k.startswith("time")} for s in h]
    assert strip(given["history"]) == strip(own["history"]) and given["rows"] == own["rows"]
    capsys.readouterr()
    sedd_run(sedd_files, tmp_path / "own", "--iters", "3")
    log = capsys.readouterr().out
    assert "[reward] cached" in log and "[sepo] resuming" in log and "it 3/3" in log and "it 1/3" not in log
    with pytest.raises(ValueError, match="other settings"):
        sedd_run(sedd_files, tmp_path / "own", "--iters", "3", "--response-len", "6")


@pytest.mark.parametrize("flags, error, message", [
    (["--sedd", "louaaron/sedd-small"], OSError, "huggingface-cli download louaaron/sedd-small --local-dir"),
    (["--reward-model", "nobody/no-such-reward-model"], ValueError, "offline, download the model first"),
    (["--reward-model", "{sedd}"], ValueError, r"sedd: a SEDD diffusion model \(its config.json is SEDD's"),
    (["--ppl-model", "{sedd}"], ValueError, "SEDD diffusion model .*, not a transformers AutoModelForCausal"),
    (["--reward-model", "{tmp}/garbage.pt"], ValueError, r"not a checkpoint torch.load\(weights_only=True\)"),
    (["--reward-model", "{tmp}/bpe_rm.pt"], ValueError, "ids of train_text.py's BPE, not over GPT-2's 50257"),
    (["--reward-model", "{tmp}/short_rm.pt"], ValueError,
     r"short_rm.pt: our reward model has 28 positions, fewer than --prompt-len \+ --response-len = 32"),
    (["--reward-model", "{minchatgpt}"], ValueError, "holds LoRA weights: pass lora_merges"),
    (["--reward-model", "{transformers}", "--judge", "{transformers}"], ValueError, "a judge must be"),
    (["--sedd", "random:small"], ValueError, r"random weights only time an iteration \(--bench\)"),
])
def test_a_wrong_sedd_path_file_is_a_clear_error_before_any_work(tmp_path, monkeypatch, sedd_files, flags,
                                                                 error, message):
    from test_text_models import write_sepo_reward_model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    write_sepo_reward_model(str(tmp_path / "bpe_rm.pt"))  # the default run's reward model: 300 BPE ids
    write_sepo_reward_model(str(tmp_path / "short_rm.pt"), vocab=D.GPT2_VOCAB)  # 28 positions < 24 + 8
    flags = [f.format(tmp=tmp_path, **sedd_files) for f in flags]
    argv = ["--sedd", sedd_files["sedd"], *TINY_SEDD, "--out", str(tmp_path / "out"), *flags]
    with pytest.raises(error, match=message):
        T.main(argv)
    assert not (tmp_path / "out").exists()


def test_sedd_only_flags_need_sedd_and_the_presets(tmp_path):
    for flags in (["--reward-model", "x"], ["--judge", "x"], ["--ppl-model", "x"],
                  ["--long-prompts", "truncate"]):
        with pytest.raises(ValueError, match="is for the SEDD path"):
            T.main([*flags, "--out", str(tmp_path / "x")])
    paper = T.parse_args(["--sedd", "d", "--preset", "paper"])
    assert (paper.steps, paper.prompt_len, paper.response_len) == (128, 256, 128)
    assert (paper.batch, paper.group) == (8, 8)
    assert (paper.snis, paper.kl_coef, paper.kl_steps, paper.epochs) == (4, 0.05, 10, 2)
    assert (paper.micro_batch, paper.chunk_size, paper.amp) == (1, 4, "auto")
    assert paper.checkpointing and paper.baseline == "group" and paper.policy_pairs == 0
    assert T.parse_args(["--sedd", "d", "--preset", "paper", "--steps", "1024"]).steps == 1024
    assert T.parse_args(["--preset", "paper"]).prompt_len == 64  # without --sedd: the from-scratch preset
    cfg = T.parse_args(["--grad", "auto", "--ratio", "auto"])
    assert (T.sepo_config(cfg, "none").grad, T.sepo_config(cfg, "none").ratio) == (None, None)
    defaults = T.sepo_config(T.parse_args([]), "none")
    assert (defaults.grad, defaults.ratio) == ("pl", "snis")  # the default run: the paper's, as before


def test_grad_and_ratio_auto_pick_by_graph(capsys):
    T.main([*TINY, "--bench", "--graph", "uniform", "--grad", "auto", "--ratio", "auto"])
    T.main([*TINY, "--bench", "--grad", "auto", "--ratio", "auto"])
    log = capsys.readouterr().out.splitlines()
    assert "grad=rollout, ratio=rollout" in log[0] and "grad=pl, ratio=snis" in log[1]


def test_bench_times_a_sedd_iteration(sedd_files, capsys):
    out = T.main(["--sedd", sedd_files["sedd"], *TINY_SEDD, "--bench"])
    assert 0 < out["step_s"] < 60 and f"SEDD {sedd_files['sedd']} LM" in capsys.readouterr().out


def test_random_sedd_configurations_have_the_published_sizes():
    with torch.device("meta"):  # no memory, no initialisation work
        sizes = {n: sum(p.numel() for p in load_policy(f"random:{n}", "meta", 16).parameters())
                 for n in ("small", "medium")}
    assert sizes == {"small": 169_627_218, "medium": 424_477_010}  # louaaron/sedd-small, sedd-medium
    with pytest.raises(ValueError, match="random weights of"):
        load_policy("random:large", "cpu", 16)


def test_end_at_eot_reads_a_response_up_to_its_first_eot():
    E = D.EOT
    x = torch.tensor([[E, 5, 6, 7, E, 8, E, 9], [E, E, 5, 5, 6, 7, 8, 9]])
    y = end_at_eot(x, 3)
    assert y.tolist() == [[E, 5, 6, 7, E, E, E, E], [E, E, 5, 5, 6, 7, 8, 9]] and x[0, 5] == 8  # x unchanged
    decode = D.gpt2_tokenizer().decode
    assert D.gpt2_response_texts(y[:, 3:]) == [decode([7]), decode([5, 6, 7, 8, 9])]
    rm = G.RewardModel(D.GPT2_VOCAB, 8, 16, 1, 2, D.EOT).eval()
    wrapped = TextReward(rm, 3)
    torch.testing.assert_close(wrapped.score(x), rm(y).detach(), rtol=0, atol=0)  # reads y, not x
    torch.testing.assert_close(wrapped.reward(x), torch.sigmoid(rm(y)).detach(), rtol=0, atol=0)


def test_gpt2_data_split_by_prompt_or_by_the_folders_files(tmp_path, sedd_files):
    d = D.prepare_gpt2_data(sedd_files["data"], 24, 8, seed=0)
    held = {tuple(p) for p in d.test_prompts.tolist()}
    assert d.gpt2 and len(held) == 6 and d.info["split"] == "by prompt, 15% held out"  # 15% of 40 prompts
    assert not any(tuple(p) in held for p in d.train_prompts.tolist())
    assert not any(tuple(r[:24]) in held for r in d.rm_train[0].tolist())
    assert len(d.rm_train[0]) == 34  # all the training pairs (the default run takes half)
    folder = tmp_path / "hh" / "helpful-base"
    folder.mkdir(parents=True)
    lines = open(sedd_files["data"]).read().splitlines()
    write_jsonl(folder / "train.jsonl", lines[:30])
    write_jsonl(folder / "test.jsonl", lines[30:] + lines[:2])  # two test prompts also in train: held out
    f = D.prepare_gpt2_data(str(tmp_path / "hh"), 24, 8)
    assert f.info["split"] == "the folder's train/test files"
    assert len(f.test_prompts) == 12 and len(f.rm_train[0]) == 28 and len(f.rm_test[0]) == 14  # 2 moved
    held_out = D.load_hh(str(folder / "train.jsonl"))[:2] + D.load_hh(str(folder / "test.jsonl"))
    assert sorted(D.gpt2_response_texts(f.rm_test[0][:, 24:])) == sorted(" " + p.chosen for p in held_out)


class Garbage(torch.nn.Module):
    """SEDD with large random outputs wherever the input is not MASK (never trained), or everywhere."""

    def __init__(self, model, everywhere: bool = False):
        super().__init__()
        self.model = model
        self.everywhere = everywhere

    def forward(self, x, sigma):
        out = self.model(x, sigma)
        noise = 50 * torch.randn(out.shape, generator=torch.Generator().manual_seed(int(x.sum())))
        return torch.where((x == D.MASK)[..., None] & (not self.everywhere), out, noise)


@pytest.mark.slow
@pytest.mark.parametrize("grad, ratio, corrector", [("pl", "snis", 0), ("path", "snis", 0),
                                                    ("rollout", "rollout", 1)])
def test_sepo_never_reads_sedds_outputs_at_clean_positions(sedd_files, grad, ratio, corrector):
    """SEDD trains its scores at MASK positions only. Garbage at every clean position changes nothing: the
    same rewards, ratios, KL and loss, the same weights after two iterations, the same ELBO, bit for bit;
    garbage at the MASK positions too changes them (the test can fail)."""
    import sepo
    from models.sedd import load_sedd
    graph, noise = sepo.Masked(D.GPT2_VOCAB), sepo.LogLinear(1e-3)
    prompts = torch.randint(0, D.EOT, (4, 6), generator=torch.Generator().manual_seed(0))
    x0 = torch.cat([prompts, torch.randint(0, D.EOT, (4, 8), generator=torch.Generator().manual_seed(1))], 1)
    cfg = sepo.SEPOConfig(batch_size=2, group_size=2, epochs=2, steps=4, kl_steps=2, snis_samples=2,
                          pl_positions=3, corrector_steps=corrector, grad=grad, ratio=ratio, advantage="ppo",
                          lr=1e-2)
    reward = lambda x: (x[:, 6:] % 7 == 0).float().mean(1)  # a black box of the response
    runs = []
    for wrap, steps in ((lambda m: m, 2), (Garbage, 2), (lambda m: Garbage(m, everywhere=True), 1)):
        policy = load_sedd(sedd_files["sedd"], head_from=6)
        trainer = sepo.SEPO(wrap(policy), graph, noise, reward, 14, cfg, prompt_fn=lambda k, g: prompts[:k])
        stats = [{k: v for k, v in trainer.step().items() if not k.startswith("time")} for _ in range(steps)]
        elbo = sepo.elbo(wrap(policy), graph, noise, x0, 3, 6, torch.Generator().manual_seed(2))
        runs.append((stats, policy.state_dict(), elbo))
    (s0, w0, e0), (s1, w1, e1), (s2, w2, e2) = runs
    assert s0 == s1 and s0[1]["kl"] > 0  # the policy moved, identically
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(e0, e1)
    assert s2[0] != s0[0] and not torch.equal(e2, e0)


def test_sedd_policy_pairs_are_read_up_to_the_first_eot():
    """--sedd --policy-pairs: the judge labels a sample's text up to its first EOT and TextReward reads it
    so (end_at_eot); the reward model trains on the same rows. Before, it trained on the tokens after the
    first EOT too ("good text EOT bad text")."""
    P, R = 8, 12
    cfg = T.parse_args(["--sedd", "d", "--prompt-len", str(P), "--response-len", str(R),
                        "--policy-pairs", "1"])
    prompt = torch.tensor([[D.EOT] * (P - 3) + D.gpt2_encode("Hi there:")[:3]])

    def row(before, after):
        ids = (D.gpt2_encode(" " + before) + [D.EOT] + D.gpt2_encode(" " + after) + [D.EOT] * R)[:R]
        return torch.cat([prompt[0], torch.tensor(ids)])
    raw = torch.stack([row("Thank you, glad to help", "you are an idiot"), row("No", "thank you so much")])
    data = D.TextData(D.gpt2_tokenizer(), None, None, [], None, None, None, gpt2=True)
    fake = lambda cfg, model, graph, noise, prompts, seed: raw.clone()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(T, "generate", fake)
        chosen, rejected = T.policy_pairs(cfg, data, None, None, None, prompt, 0)
    assert torch.equal(chosen, end_at_eot(raw[:1], P)) and torch.equal(rejected, end_at_eot(raw[1:], P))
    assert not torch.equal(chosen, raw[:1])  # the raw row holds text after its first EOT


def test_flags_the_run_would_not_read_are_errors_before_any_work():
    for flags, message in ((["--rm-d-model", "30"], "--rm-d-model 30 must be divisible by --rm-heads 4"),
                           (["--d-model", "34"], "--d-model 34 must be divisible by --n-heads 4")):
        with pytest.raises(ValueError, match=message):
            T.parse_args(flags)
    # --sedd fine-tunes SEDD: the default run's LM flags were ignored, yet written into results.json
    for flag, value in (("--graph", "uniform"), ("--vocab", "300"), ("--d-model", "64"), ("--n-layers", "2"),
                        ("--n-heads", "2"), ("--pretrain-steps", "5")):
        with pytest.raises(ValueError, match=rf"^{flag}: the default run's own LM, not read with --sedd"):
            T.parse_args(["--sedd", "d", flag, value])
    assert T.parse_args(["--sedd", "d", "--preset", "paper"]).graph == "masked"  # not given: no error
    assert T.parse_args(["--graph", "uniform", "--vocab", "300"]).vocab == 300  # without --sedd: read


def test_a_resume_knows_the_data_file_by_its_hash_not_by_how_its_path_is_spelt(tmp_path, monkeypatch, capsys):
    """The same --data as an absolute and as a relative path resumes (before: refused, 'other settings');
    another file is still refused."""
    path = write_pairs(tmp_path)
    (tmp_path / "other").mkdir()
    other = write_pairs(tmp_path / "other", n=41)

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(T, "train_reward_model", stop)  # the pre-training stage is enough
    monkeypatch.chdir(tmp_path)
    run = lambda data: T.main([*TINY_SIZES, "--data", data, "--out", str(tmp_path / "run")])
    with pytest.raises(Stop):
        run(path)
    capsys.readouterr()
    with pytest.raises(Stop):
        run("hh.jsonl")
    assert "[pretrain] cached" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        run(other)
