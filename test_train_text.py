"""Tests of train_text.py (CPU, seconds): HH-RLHF loader, prompt encoding, gold judge,
reward model, prefix-conditioned sampling, and the whole pipeline at toy size."""
import gzip
import importlib.util
import json
import math
import os

import numpy as np

import pytest
import torch

import train_text as T
from data import text as D

torch.set_num_threads(1)  # tiny models: threads only add overhead (and the CI box is shared)


def hh(prompt_turns, response):
    return D.to_hh(prompt_turns, response)


def write_jsonl(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


GOOD = [
    json.dumps({"chosen": hh([("Human", "How do I bake bread?")], "Mix flour, water and yeast, then bake it."),
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
    (json.dumps({"chosen": hh([("Human", "  ")], "yo"), "rejected": hh([("Human", "  ")], "no")}), "empty prompt"),
    (json.dumps({"chosen": "preamble" + hh([("Human", "hi")], "yo"), "rejected": hh([("Human", "hi")], "no")}),
     "before the first"),
    # valid JSON, but an unpaired surrogate is not text (the tokenizer would fail later, naming nothing)
    (json.dumps({"chosen": hh([("Human", "hi")], "yo"), "rejected": hh([("Human", "hi")], "no")}).replace("no", "n\\ud83d"),
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
def tok(tmp_path_factory):
    texts = ["[H] hello there [A] hi, how are you?", "[H] thank you [A] you are welcome"] * 20
    return D.train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


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
    # markers are word prefixes, each counted once: "thanks" is "thank" and "thanks" (+0.5), "hopeless" is "hope"
    vader = D._VADER.polarity_scores
    assert D.gold_score("Thanks for asking me that") == pytest.approx(vader("Thanks for asking me that")["compound"] + 0.5)
    assert D.gold_score("It is hopeless for me") == pytest.approx(vader("It is hopeless for me")["compound"] + 0.25)


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
    args = T.parse_args(["--preset", "tiny", "--policy-pairs", "3"])
    torch.manual_seed(0)
    graph, noise, model = T.make_diffusion(args, tok.get_vocab_size(), "cpu")
    # a random sampler over the tokenizer's real tokens (not its [UNUSED] padding): varied responses
    real = [i for t, i in tok.get_vocab().items() if not t.startswith("[") and i < tok.get_vocab_size()]
    model.head.weight.data.normal_()
    model.head.bias.data[real] = 5.0
    data = D.TextData(tok, None, None, [], None, None, None)
    prompts, _ = D.encode_prompts(tok, [[("Human", "hello there")], [("Human", "thank you")]], args.prompt_len)
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
    args = T.parse_args(["--preset", "tiny", "--graph", graph])
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
    with pytest.raises(ValueError, match="kl_steps must be in"):
        T.main(["--kl-steps", "-1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_bootstrap_interval_over_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    lo, hi = T.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = T.bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5  # ~ 1 / sqrt(number of prompts)
    assert T.bootstrap_ci(np.full(7, 0.5)) == (0.5, 0.5)


TINY = ["--preset", "tiny", "--threads", "1"]


def test_bench_times_one_step_and_writes_nothing(tmp_path, capsys):
    out = T.main([*TINY, "--bench", "--micro-batch", "2", "--out", str(tmp_path / "b")])
    log = capsys.readouterr().out
    assert 0 < out["step_s"] < 60 and "one trainer.step()" in log and "micro_batch=2" in log
    assert not (tmp_path / "b").exists()  # a benchmark leaves no run folder behind


@pytest.mark.slow
def test_pipeline_smoke_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    res = T.main([*TINY, "--out", out])
    names = set(os.listdir(out))
    for f in ["tokenizer.json", "pretrain.pt", "policy_pairs_steps4.pt", "reward_model_steps4.pt", "sepo_steps4.pt",
              "curves_steps4.png", "results_steps4.md", "results_steps4.json", "examples_steps4.txt"]:
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
    assert "[sepo] iter 2/2 reward" in log and "KL" in log and "clip" in log
    # docs/text_tradeoff.py: the figure and table over runs, from the runs' results files
    spec = importlib.util.spec_from_file_location("text_tradeoff", os.path.join(os.path.dirname(__file__), "docs",
                                                                                 "text_tradeoff.py"))
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    fig.main([out], out=str(tmp_path / "tradeoff.png"))
    table, sepo_row = capsys.readouterr().out, rows["SEPO (4 steps)"]
    assert os.path.getsize(tmp_path / "tradeoff.png") > 1000
    assert f"| 0.1 | {sepo_row['rm_score']:.3f} | {sepo_row['gold_win']:.3f} [" in table
    assert f"| pre-trained | {rows['pre-trained']['rm_score']:.3f} |" in table
    # a second run with more iterations reuses every cached stage and resumes SEPO
    T.main([*TINY, "--out", out, "--iters", "3"])
    log = capsys.readouterr().out
    assert "[pretrain] cached" in log and "[reward] cached" in log and "gold-labelled" not in log
    assert "[sepo] resuming" in log and "iter 3/3" in log and "iter 1/3" not in log
    # a stage made with other settings is refused, not silently reused
    with pytest.raises(ValueError, match="other settings"):
        T.main([*TINY, "--out", out, "--d-model", "48"])
    with pytest.raises(ValueError, match="holds 3 iterations, more than --iters 2"):  # not the 3-iteration model
        T.main([*TINY, "--out", out, "--iters", "2"])


@pytest.mark.slow
def test_pipeline_on_a_real_format_file_and_the_uniform_graph(tmp_path):
    """--data reads an HH-RLHF file of your own (here a small .jsonl.gz); the uniform graph runs end to end."""
    rng = np.random.default_rng(1)
    words = ["good", "fine", "thanks", "sorry", "bad", "no", "sure", "great", "maybe", "ok"]
    lines = []
    for i in range(60):
        prompt = [("Human", f"question {i} " + " ".join(rng.choice(words, 2)))]
        a, b = (" ".join(rng.choice(words, 4)) for _ in range(2))
        lines.append(json.dumps({"chosen": D.to_hh(prompt, a), "rejected": D.to_hh(prompt, b)}))
    path = str(tmp_path / "hh.jsonl.gz")
    write_jsonl(path, lines)
    res = T.main([*TINY, "--data", path, "--graph", "uniform", "--out", str(tmp_path / "u"), "--prompt-len", "24"])
    assert res["info"]["data"]["pairs"] == 60 and res["info"]["data"]["skipped_long_prompts"] == 0
    assert "accuracy_samples" not in res["info"]  # a real file: no gold-labelled policy pairs
    assert all(math.isfinite(r["nll_per_token"]) for r in res["rows"])
    # the file changed in place (same path, other pairs): the tokenizer is retrained and no stage is reused
    write_jsonl(path, lines[::-1][:50])
    with pytest.raises(ValueError, match=r"pretrain.pt was made with other settings \{'data_sha256'"):
        T.main([*TINY, "--data", path, "--graph", "uniform", "--out", str(tmp_path / "u"), "--prompt-len", "24"])
