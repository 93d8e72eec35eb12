"""Tests of train_common.py, the plumbing both drivers share: the flags (parse_config), the files it writes
(save_atomic) and the SEPO settings it builds (sepo_settings). CPU, seconds."""
import os
import subprocess
import sys

import pytest

import train_common as C
import train_text as TT

HERE = os.path.dirname(os.path.abspath(__file__))


def test_an_explicit_no_flag_wins_over_a_presets_true():
    """Bool flags were store_true only: the --sedd paper preset's checkpointing=True could not be turned off,
    though an explicit flag wins over --preset. Now --no-checkpointing exists and wins."""
    off = TT.parse_args(["--sedd", "x", "--preset", "paper", "--no-checkpointing"])
    assert off.checkpointing is False
    assert TT.parse_args(["--sedd", "x", "--preset", "paper"]).checkpointing is True
    assert TT.parse_args(["--sedd", "x", "--checkpointing"]).checkpointing is True
    assert TT.parse_args([]).checkpointing is False  # the field's default


def test_save_atomic_writes_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C (no UTF-8 mode, no locale coercion) the locale's encoding is ASCII: Path.write_text
    died on the text run's tokenizer.json and examples. save_atomic now writes UTF-8 always."""
    text = "naïve café → ✓ 日本\n"
    path = tmp_path / "t.txt"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": HERE, "PYTHONIOENCODING": "utf-8"}
    code = ("import locale, sys, train_common; print(locale.getpreferredencoding(False)); "
            f"train_common.save_atomic({ascii(text)}, sys.argv[1])")  # ascii(): \u escapes, any locale
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")  # the test's premise
    assert path.read_bytes() == text.encode("utf-8")
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]  # no temporary file left


def test_save_atomic_syncs_the_file_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """A crash right after os.replace must not leave a renamed but unwritten file: fsync comes first."""
    import torch
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd, f=os.fsync: events.append("fsync") or f(fd))
    monkeypatch.setattr(os, "replace", lambda a, b, f=os.replace: events.append("replace") or f(a, b))
    C.save_atomic("text\n", str(tmp_path / "a.txt"))
    C.save_atomic({"w": torch.arange(3)}, str(tmp_path / "b.pt"))
    assert events == ["fsync", "replace", "fsync", "replace"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "text\n"
    assert torch.load(tmp_path / "b.pt", weights_only=True)["w"].tolist() == [0, 1, 2]


def test_text_settings_under_which_sepo_learns_nothing_fail_before_any_work(tmp_path):
    """--group 1 under --baseline group (A = R - the group's mean = 0), one sample in all under --baseline
    batch, and --lr 0 ran SEPO as a silent no-op; now parse_args (--lr) and sepo_settings refuse them, and
    train_text.main calls it before any work."""
    def check(*argv):
        return TT.sepo_config(TT.parse_args(list(argv)), "none")
    with pytest.raises(ValueError, match=r"--group 1: under --baseline group every advantage is 0"):
        check("--group", "1")
    with pytest.raises(ValueError, match=r"--batch 1 --group 1: the batch baseline"):
        check("--group", "1", "--baseline", "batch", "--batch", "1")
    with pytest.raises(ValueError, match=r"--lr must be > 0, got 0\.0"):
        check("--lr", "0")
    assert check("--group", "1", "--baseline", "batch", "--batch", "2").group_size == 1  # a batch mean of 2
    assert check("--group", "1", "--baseline", "running").baseline == "running"
    for bad, msg in ((["--group", "1"], "--group 1"), (["--lr", "0"], "--lr must be > 0")):
        with pytest.raises(ValueError, match=msg):
            TT.main([*bad, "--threads", "1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
