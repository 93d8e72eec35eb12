"""Tests of models/drakes.py, models/grelu.py and models/safe_load.py: the DRAKES denoiser and the gReLU
oracle network against the upstream networks' own outputs (models/golden/), their key lists at the release
sizes, stand-in release files in the real formats, strict-loading errors, and malicious pickles.

`write_drakes_release(base_dir, ...)` writes a whole stand-in DRAKES release (tiny networks, a small
gosai_all.csv) at the release's paths, for other tests: `from test_drakes_models import write_drakes_release`.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import os
import pickletools
import re
import sys
import types
import typing
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.drakes import BASE_DILATIONS, CNNModel, _enformer_args, load_drakes_mdlm, load_grelu_oracle
from models.grelu import EnformerModel
from models.safe_load import (CheckpointError, Pickled, UnsafeCheckpointError, load_checkpoint, load_strict,
                              to_plain)

GOLDEN = Path(__file__).resolve().parent / "models" / "golden"
TINY_ENFORMER = {"n_conv": 3, "channels": 384, "n_transformers": 1, "n_heads": 8, "key_len": 8, "crop_len": 0,
                 "final_act_func": None, "final_pool_func": "avg"}  # about 2.5M parameters
ORACLE_TASKS = ["hepg2", "k562", "sknsh"]
ATAC_TASKS = ["GM12878", "HepG2", "K562", "HUVEC", "MCF-7", "A549", "SK-N-SH"]  # stand-in names
RELEASE_PATHS = {
    "pretrained": "mdlm/outputs_gosai/pretrained.ckpt",
    "ft_oracle": "mdlm/outputs_gosai/lightning_logs/reward_oracle_ft.ckpt",
    "eval_oracle": "mdlm/outputs_gosai/lightning_logs/reward_oracle_eval.ckpt",
    "atac": "mdlm/gosai_data/binary_atac_cell_lines.ckpt",
    "data": "mdlm/gosai_data/processed_data/gosai_all.csv",
    "drakes": "mdlm/reward_bp_results_final/finetuned.ckpt",
    "drakes_zero": "mdlm/reward_bp_results_final/zero_alpha.ckpt",
}


# === weights by the golden files' recipe (models/golden/README.md) ========================================


def fill_by_recipe(module: nn.Module, std: float, salt: int = 0) -> nn.Module:
    """Every floating tensor of the state dict from a generator seeded by crc32(key) + salt: running
    variances uniform in [0.75, 1.25], the rest normal with this std; integer buffers kept."""
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + salt)
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + 0.75)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g) * std)
    return module


def tiny_cnn(hidden: int = 16, stacks: int = 1, seed: int = 0) -> CNNModel:
    """The stand-in pretrained denoiser: upstream's own initialisation, seeded."""
    torch.manual_seed(seed)
    return CNNModel(hidden, stacks)


def perturbed(model: nn.Module, scale: float, seed: int) -> dict[str, Tensor]:
    """model's state dict with every floating tensor moved by N(0, scale^2) noise: a 'fine-tuned' copy."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def tiny_oracle(n_tasks: int, salt: int) -> EnformerModel:
    """A stand-in gReLU oracle network: the fact sheet's tiny Enformer, recipe weights (std 0.15)."""
    return fill_by_recipe(EnformerModel(n_tasks, **TINY_ENFORMER), 0.15, salt).eval()


def oracle_reference(net: EnformerModel, x: Tensor, binary: bool) -> Tensor:
    """What gReLU's LightningModel.forward returns, squeezed: activation(net(one_hot(x)^T))[:, :, 0]."""
    with torch.no_grad():
        y = net.eval()(F.one_hot(x, 4).float().transpose(1, 2))[:, :, 0]
    return torch.sigmoid(y) if binary else y


# === stand-in release files in the real formats ============================================================


@contextlib.contextmanager
def fake_omegaconf() -> Iterator[dict[str, type]]:
    """Classes registered as omegaconf.dictconfig.DictConfig, omegaconf.listconfig.ListConfig,
    omegaconf.base.ContainerMetadata and .Metadata, and omegaconf.nodes.AnyNode while the block runs, so
    that a pickle written inside it names the real globals, in omegaconf's own layout (NEWOBJ, then BUILD
    with the object's __dict__). The modules are removed (or the real ones restored) afterwards."""
    where = {"DictConfig": "omegaconf.dictconfig", "ListConfig": "omegaconf.listconfig",
             "ContainerMetadata": "omegaconf.base", "Metadata": "omegaconf.base",
             "AnyNode": "omegaconf.nodes"}
    modules = {name: types.ModuleType(name) for name in ["omegaconf", *where.values()]}
    classes = {}
    for cls, module in where.items():
        classes[cls] = type(cls, (), {"__module__": module})
        setattr(modules[module], cls, classes[cls])
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield classes
    finally:
        for name, old in saved.items():
            if old is None:
                del sys.modules[name]
            else:
                sys.modules[name] = old


def omegaconf_tree(value: Any, classes: dict[str, type], key: Any = None, parent: Any = None) -> Any:
    """A plain dict / list / value as the object tree omegaconf 2.x pickles: containers holding _metadata,
    _parent and _content, AnyNode leaves holding _metadata, _parent and _val."""
    def metadata(kind: str, object_type: Any, **extra: Any) -> Any:
        m = classes[kind]()
        m.__dict__.update(ref_type=typing.Any, object_type=object_type, optional=True, key=key, flags={},
                          flags_root=False, resolver_cache=defaultdict(dict), **extra)
        return m
    if isinstance(value, dict):
        node = classes["DictConfig"]()
        meta = metadata("ContainerMetadata", dict, key_type=typing.Any, element_type=typing.Any)
        node.__dict__.update(_metadata=meta, _parent=parent, _content={})
        node._content.update({k: omegaconf_tree(v, classes, k, node) for k, v in value.items()})
        return node
    if isinstance(value, list):
        node = classes["ListConfig"]()
        meta = metadata("ContainerMetadata", list, key_type=int, element_type=typing.Any)
        node.__dict__.update(_metadata=meta, _parent=parent, _content=[])
        node._content.extend(omegaconf_tree(v, classes, i, node) for i, v in enumerate(value))
        return node
    node = classes["AnyNode"]()
    node.__dict__.update(_metadata=metadata("Metadata", None), _parent=parent, _val=value)
    return node


def drakes_config(hidden: int, stacks: int) -> dict:
    """A DRAKES-like Hydra config (configs_gosai/config_gosai.yaml with model/dnaconv.yaml), interpolations
    unresolved as the checkpoint keeps them."""
    batch = "${div_up:${.global_batch_size}, ${eval:${trainer.devices} * ${trainer.num_nodes}}}"
    workers = "${eval:\"len(__import__('os').sched_getaffinity(0))\"}"
    model = {"name": "dnaconv", "type": "cnn", "length": 200, "hidden_dim": hidden, "num_cnn_stacks": stacks,
             "dropout": 0.0, "clean_data": False, "cls_free_guidance": False}
    return {"mode": "train", "diffusion": "absorbing_state", "backbone": "cnn", "parameterization": "subs",
            "time_conditioning": False, "T": 0, "subs_masking": False, "seed": 1,
            "loader": {"global_batch_size": 512, "batch_size": batch, "num_workers": workers},
            "model": model,
            "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
            "sampling": {"predictor": "ddpm", "steps": 128, "noise_removal": True},
            "training": {"ema": 0.9999, "antithetic_sampling": True, "sampling_eps": 1e-3},
            "trainer": {"devices": "${device_count:}", "num_nodes": 1, "precision": "bf16"},
            "wandb": {"project": "gosai-dna", "notes": None, "tags": ["${noise.type}"]}}


def write_lightning_mdlm(path: Path, model: CNNModel, config: dict) -> None:
    """DRAKES's pretrained.ckpt layout (Lightning 2.x dump_checkpoint and Diffusion.on_save_checkpoint): raw
    weights under 'backbone.', a pickled omegaconf DictConfig in hyper_parameters, an EMA that differs."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = {"current": {"completed": 3}}
    loops = {"fit_loop": {"epoch_progress": progress, "epoch_loop.batch_progress": progress}}
    with fake_omegaconf() as classes:
        torch.save({"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.3.3",
                    "state_dict": {"backbone." + k: v for k, v in model.state_dict().items()}, "loops": loops,
                    "callbacks": {}, "optimizer_states": [torch.optim.AdamW(trainable).state_dict()],
                    "lr_schedulers": [], "hparams_name": "kwargs",
                    "hyper_parameters": {"config": omegaconf_tree(config, classes), "eval": False},
                    "ema": {"decay": 0.9999, "num_updates": 3,
                            "shadow_params": [p.detach() + 0.01 * torch.randn_like(p) for p in trainable]},
                    "sampler": {"random_state": torch.get_rng_state()}}, path)


def write_grelu_checkpoint(path: Path, net: EnformerModel, task: str, names: Optional[list[str]],
                           layout: str = "1.0.2") -> None:
    """A gReLU LightningModel checkpoint: a 'model.'-prefixed state dict, hyper_parameters with model_params
    and train_params (gReLU's defaults filled in), and data_params in hyper_parameters (gReLU 1.0.2) or at
    the top level next to 'performance', which holds numpy arrays (gReLU >= 1.0.5)."""
    n_tasks = net.head.n_tasks
    train_params = {"task": task, "loss": "mse" if task == "regression" else "bce", "lr": 1e-4,
                    "logger": "wandb", "batch_size": 512, "num_workers": 4, "devices": [0],
                    "save_dir": "mdlm/outputs_gosai", "optimizer": "adam", "max_epochs": 10,
                    "checkpoint": True, "clip": 0, "pos_weight": None, "class_weights": None,
                    "total_weight": None, "name": "2024_26_07_10_00"}
    data_params = {"tasks": {"name": names}} if names is not None else {}
    data_params.update(train_seq_len=200, train_n_tasks=n_tasks, train_rc=False, train_chroms=None)
    hparams = {"model_params": {"model_type": "EnformerModel", "n_tasks": n_tasks, **TINY_ENFORMER},
               "train_params": train_params}
    ckpt = {"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.3.3", "loops": {},
            "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": hparams, "state_dict": {"model." + k: v for k, v in net.state_dict().items()}}
    if layout == "1.0.2":
        hparams["data_params"] = data_params
    elif layout == "1.0.5":
        ckpt["data_params"] = data_params
        ckpt["performance"] = {"val": {"val_mse": np.linspace(0.1, 0.3, n_tasks, dtype=np.float32)}}
    else:
        raise ValueError(f"grelu_layout must be '1.0.2' or '1.0.5', found {layout!r}")
    torch.save(ckpt, path)


def write_gosai_csv(path: Path, rows: int, seed: int) -> None:
    """rows random 200-bp sequences with activities (hepg2, k562, sknsh); 1% of them with HepG2 above 7."""
    rng = np.random.default_rng(seed)
    seqs = ["".join(s) for s in rng.choice(list("ACGT"), size=(rows, 200))]
    y = rng.normal(0.5, 1.0, size=(rows, 3))
    high = rng.choice(rows, max(1, rows // 100), replace=False)
    y[high, 0] = rng.uniform(7.0, 9.0, size=len(high))  # distinct: the top 0.1% (strictly above) is not empty
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seq", "hepg2", "k562", "sknsh"])
        out.writerows([s, *(f"{v:.4f}" for v in row)] for s, row in zip(seqs, y))


def write_drakes_release(base_dir: str | os.PathLike, *, finetuned: bool = True, zero_alpha: bool = True,
                         atac: bool = True, grelu_layout: str = "1.0.2",
                         atac_task_names: Optional[list[str]] = ATAC_TASKS, rows: int = 300, hidden: int = 16,
                         stacks: int = 1, seed: int = 0) -> dict[str, Path]:
    """A stand-in DRAKES release under base_dir (which then holds mdlm/), in the real formats with tiny
    networks: the Lightning pretrained.ckpt (CNNModel(hidden, stacks), an omegaconf config), the fine-tuned
    state dicts (finetuned, zero_alpha), two regression oracles (hepg2, k562, sknsh), the binary ATAC oracle
    (atac; named by atac_task_names, or unnamed if None) and gosai_all.csv with `rows` rows. grelu_layout:
    '1.0.2' (DRAKES's) or '1.0.5' (data_params at the top level). Deterministic in seed; about a second.
    Returns the paths written, by the names of RELEASE_PATHS."""
    wanted = {"drakes": finetuned, "drakes_zero": zero_alpha, "atac": atac}
    paths = {name: Path(base_dir) / rel for name, rel in RELEASE_PATHS.items() if wanted.get(name, True)}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_cnn(hidden, stacks, seed)
    write_lightning_mdlm(paths["pretrained"], model, drakes_config(hidden, stacks))
    for name, scale in (("drakes", 0.05), ("drakes_zero", 0.1)):
        if name in paths:
            state = perturbed(model, scale, seed + 1)
            torch.save({"backbone." + k: v for k, v in state.items()}, paths[name])
    for name, salt in (("ft_oracle", 1), ("eval_oracle", 2)):
        net = tiny_oracle(3, seed + salt)
        write_grelu_checkpoint(paths[name], net, "regression", ORACLE_TASKS, grelu_layout)
    if atac:
        net = tiny_oracle(7, seed + 3)
        write_grelu_checkpoint(paths["atac"], net, "binary", atac_task_names, grelu_layout)
    write_gosai_csv(paths["data"], rows, seed)
    return paths


# === the upstream networks' own outputs, and the key lists of the published networks =======================


def test_cnn_matches_drakes_golden_output() -> None:
    """DRAKES's CNNModel(16, 2) logits for recipe weights, to 1e-4; sigma is ignored, as DRAKES ignores it."""
    g = torch.load(GOLDEN / "drakes_cnn_tiny.pt", weights_only=True)
    config = dict(item.split("=") for item in g["config"].replace(" ", "").strip(",").split(","))
    assert config["alphabet_size"] == "5"
    model = CNNModel(int(config["hidden_dim"]), int(config["num_cnn_stacks"]))
    fill_by_recipe(model, float(g["std"])).eval()
    with torch.no_grad():
        out = model(g["x"])
        out_sigma = model(g["x"], torch.tensor([0.1, 1.0, 5.0]))
    assert (out.double() - g["output"]).abs().max() <= 1e-4 * g["output"].abs().max()
    assert torch.equal(out, out_sigma)


def test_enformer_matches_grelu_golden_output() -> None:
    """gReLU 1.1.0's EnformerModel (the tiny config), eval mode, for recipe weights, to 1e-4."""
    g = torch.load(GOLDEN / "grelu_enformer_tiny.pt", weights_only=True)
    model = fill_by_recipe(EnformerModel(**ast.literal_eval(g["config"])), float(g["std"])).eval()
    with torch.no_grad():
        out = model(F.one_hot(g["x"], 4).float().transpose(1, 2))
    assert out.shape == g["output"].shape
    assert (out.double() - g["output"]).abs().max() <= 1e-4 * g["output"].abs().max()


def read_key_list(name: str) -> tuple[list[tuple[str, list[int], str]], str]:
    """The (key, shape, dtype) rows of a key list in models/golden/, and its header comment."""
    lines = (GOLDEN / name).read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    header = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    return [(key, ast.literal_eval(shape), dtype) for key, shape, dtype in rows], header


def key_rows(module: nn.Module) -> list[tuple[str, list[int], str]]:
    return [(k, list(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in module.state_dict().items()]


def test_cnn_keys_match_the_release() -> None:
    """CNNModel(128, 4): the 129 keys, shapes and dtypes of pretrained.ckpt, in order; the trainable
    parameter count of the key list's header; the dilations [1, 1, 4, 16, 64][i // stacks]."""
    rows, header = read_key_list("drakes_cnn_pretrained_keys.txt")
    model = CNNModel(128, 4)
    assert key_rows(model) == rows and len(rows) == 129
    trainable = int(re.search(r"(\d+) trainable parameters", header).group(1))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert [conv.dilation[0] for conv in model.convs] == [BASE_DILATIONS[i // 4] for i in range(20)]
    assert [conv.padding[0] for conv in model.convs] == [4 * BASE_DILATIONS[i // 4] for i in range(20)]


@pytest.mark.parametrize("name, n_tasks", [("grelu_enformer_oracle_3tasks_keys.txt", 3),
                                           ("grelu_enformer_atac_7tasks_keys.txt", 7)])
def test_enformer_keys_match_the_release(name: str, n_tasks: int) -> None:
    """EnformerModel at EnformerPretrainedModel's size, on the meta device: every key, shape and dtype of
    the published oracles, in order, and the parameter count of the key list's header."""
    rows, header = read_key_list(name)
    with torch.device("meta"):
        model = EnformerModel(n_tasks)
    assert key_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == int(re.search(r"(\d+) parameters", header).group(1))


# === the denoiser's options ================================================================================


def test_time_conditioning_feeds_the_masking_probability() -> None:
    """time_conditioning=True feeds t = 1 - e^{-sigma}: at sigma = 0 the unconditioned model's output
    exactly, at sigma > 0 another; without sigma an error; one extra state-dict entry, the marker."""
    torch.manual_seed(0)
    plain = CNNModel(16, 1).eval()
    timed = CNNModel(16, 1, time_conditioning=True).eval()
    timed.load_state_dict({**plain.state_dict(), "time_conditioned": torch.tensor(True)})
    x = torch.randint(5, (2, 200))
    sigma = torch.tensor([0.3, 2.0])
    with torch.no_grad():
        assert torch.equal(timed(x, torch.zeros(2)), plain(x))
        assert (timed(x, sigma) - plain(x)).abs().max() > 1e-3
    assert torch.allclose(timed.time_input(sigma, 2), 1 - torch.exp(-sigma))
    with pytest.raises(ValueError, match=r"needs sigma of shape \(2,\), found None"):
        timed(x)
    assert set(timed.state_dict()) - set(plain.state_dict()) == {"time_conditioned"}


def test_float_inputs_as_upstream() -> None:
    """A one-hot float [B, L, 5] gives the ids' output; a soft input runs; another last dim is refused."""
    model = tiny_cnn().eval()
    x = torch.randint(5, (2, 200))
    with torch.no_grad():
        assert torch.equal(model(F.one_hot(x, 5).float()), model(x))
        soft = model(torch.softmax(torch.randn(2, 200, 5), -1))
    assert soft.shape == (2, 200, 5) and torch.isfinite(soft).all()
    with pytest.raises(ValueError, match=r"must be \[B, L, 5\] \(one-hot or soft\), found \(2, 200, 4\)"):
        model(torch.rand(2, 200, 4))


# === stand-in release files ================================================================================


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_drakes_release(tmp_path_factory.mktemp("release"))


def globals_named(path: Path) -> set[str]:
    """The GLOBAL opcodes' arguments in a torch.save file's pickle, read with pickletools (nothing runs)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(name for name in z.namelist() if name.endswith("data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_release_layout_and_formats(release: dict[str, Path]) -> None:
    """Every file at its release path; pretrained.ckpt's pickle names omegaconf's real classes and the
    protocol-2 builtins, and torch.load(weights_only=True) refuses it; no omegaconf module is left behind;
    gosai_all.csv has the release's columns, 200-bp ACGT rows, and 1% of rows with HepG2 above 7."""
    base = release["pretrained"].parents[2]
    assert {name: path.relative_to(base).as_posix() for name, path in release.items()} == RELEASE_PATHS
    assert all(path.is_file() for path in release.values())
    named = globals_named(release["pretrained"])
    assert {"omegaconf.dictconfig DictConfig", "omegaconf.listconfig ListConfig", "omegaconf.nodes AnyNode",
            "omegaconf.base ContainerMetadata", "omegaconf.base Metadata", "typing Any",
            "collections defaultdict", "__builtin__ dict", "__builtin__ list"} <= named
    assert "omegaconf.dictconfig" not in sys.modules
    with pytest.raises(Exception, match="omegaconf"):
        torch.load(release["pretrained"], weights_only=True)
    with open(release["data"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["seq", "hepg2", "k562", "sknsh"] and len(rows) == 301
    assert all(len(row[0]) == 200 and set(row[0]) <= set("ACGT") for row in rows[1:])
    assert sum(float(row[1]) > 7 for row in rows[1:]) == 3


def test_pretrained_lightning_checkpoint(release: dict[str, Path]) -> None:
    """load_drakes_mdlm on the Lightning file: the raw weights (the EMA differs), eval mode, and in info
    the config as plain dicts (model group, a list, interpolations) and the Lightning version."""
    model = load_drakes_mdlm(release["pretrained"])
    x = torch.randint(5, (3, 200))
    with torch.no_grad():
        assert torch.equal(model(x), tiny_cnn().eval()(x))
    assert not model.training and not model.time_conditioning
    assert model.info["format"] == "lightning" and model.info["lightning_version"] == "2.3.3"
    assert model.info["config"] == drakes_config(16, 1)


def test_real_lightning_and_omegaconf_file() -> None:
    """models/golden/drakes_pretrained_tiny.ckpt, written by Lightning 2.6.6 and omegaconf 2.4.0 for
    DRAKES's own CNNModel(8, 1) with recipe weights: its state dict is the recipe's, its config reads back."""
    path = GOLDEN / "drakes_pretrained_tiny.ckpt"
    assert "omegaconf.dictconfig DictConfig" in globals_named(path)
    with pytest.raises(Exception, match="omegaconf"):
        torch.load(path, weights_only=True)
    model = load_drakes_mdlm(path)
    want = fill_by_recipe(CNNModel(8, 1), 0.15)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in want.state_dict().items())
    assert model.info["lightning_version"] == "2.6.6" and model.info["config"]["model"]["hidden_dim"] == 8
    workers = model.info["config"]["loader"]["num_workers"]  # an unresolved interpolation, never evaluated
    assert workers == "${eval:\"len(__import__('os').sched_getaffinity(0))\"}"


@pytest.mark.parametrize("name, scale", [("drakes", 0.05), ("drakes_zero", 0.1)])
def test_finetuned_state_dicts(release: dict[str, Path], name: str, scale: float, tmp_path: Path) -> None:
    """finetuned.ckpt and zero_alpha.ckpt ('backbone.' keys), and our own save of state_dict() (no prefix)."""
    model = load_drakes_mdlm(release[name])
    assert model.info["format"] == "state_dict"
    want = perturbed(tiny_cnn(), scale, 1)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in want.items())
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    again = load_drakes_mdlm(tmp_path / "ours.pt")
    x = torch.randint(5, (2, 200))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_time_conditioned_save_round_trip(tmp_path: Path) -> None:
    """A saved time-conditioned CNNModel comes back conditioned, with the same outputs."""
    torch.manual_seed(1)
    model = CNNModel(16, 1, time_conditioning=True).eval()
    torch.save(model.state_dict(), tmp_path / "timed.pt")
    again = load_drakes_mdlm(tmp_path / "timed.pt")
    x = torch.randint(5, (2, 200))
    sigma = torch.tensor([0.5, 3.0])
    assert again.time_conditioning
    with torch.no_grad():
        assert torch.equal(again(x, sigma), model(x, sigma))


@pytest.mark.parametrize("layout", ["1.0.2", "1.0.5"])
def test_grelu_oracles_both_layouts(tmp_path: Path, layout: str) -> None:
    """Regression (3 tasks, identity) and binary (7 tasks, sigmoid) oracles in gReLU 1.0.2's layout and
    in >= 1.0.5's (top-level data_params; numpy arrays in 'performance'): gReLU's forward, the task names
    read back, [B, n_tasks] at B = 1, eval mode after .train(), frozen parameters."""
    paths = write_drakes_release(tmp_path, finetuned=False, zero_alpha=False, grelu_layout=layout)
    x = torch.randint(4, (5, 200))
    for name, salt, n_tasks, binary, names in (("ft_oracle", 1, 3, False, ORACLE_TASKS),
                                               ("eval_oracle", 2, 3, False, ORACLE_TASKS),
                                               ("atac", 3, 7, True, ATAC_TASKS)):
        oracle = load_grelu_oracle(paths[name])
        assert oracle.task_names == names and oracle.n_tasks == n_tasks
        assert oracle.task == ("binary" if binary else "regression")
        assert oracle.info["layout"] == ("grelu-1.0.2" if layout == "1.0.2" else "grelu>=1.0.5")
        want = oracle_reference(tiny_oracle(n_tasks, salt), x, binary)
        assert torch.allclose(oracle(x), want, rtol=1e-5, atol=1e-6)
        assert oracle(x[:1]).shape == (1, n_tasks)
        oracle.train()
        assert not any(module.training for module in oracle.modules())
        assert torch.allclose(oracle(x), want, rtol=1e-5, atol=1e-6)
        assert not any(p.requires_grad for p in oracle.parameters())
    if layout == "1.0.5":
        assert isinstance(load_checkpoint(paths["atac"])["performance"]["val"]["val_mse"], np.ndarray)


def test_grelu_unnamed_tasks_and_depth_from_keys(tmp_path: Path) -> None:
    """No names in data_params: task_names None. The depth comes from the transformer_tower.blocks.* keys;
    model_params stating another one is noted in info, and gReLU 1.1.0's extra keys (dtype) are ignored."""
    paths = write_drakes_release(tmp_path, finetuned=False, zero_alpha=False, atac_task_names=None)
    assert load_grelu_oracle(paths["atac"]).task_names is None
    ckpt = load_checkpoint(paths["ft_oracle"])
    params = {**ckpt["hyper_parameters"]["model_params"], "n_transformers": 2, "dtype": "float32"}
    hparams = {**ckpt["hyper_parameters"], "model_params": params}
    oracle = load_grelu_oracle(save(tmp_path, {**ckpt, "hyper_parameters": hparams}, "depth.ckpt"))
    assert oracle.info["notes"] == ["1 transformer blocks in the state dict, model_params imply 2: "
                                    "built with 1"]
    x = torch.randint(4, (3, 200))
    assert torch.allclose(oracle(x), oracle_reference(tiny_oracle(3, 1), x, False), rtol=1e-5, atol=1e-6)


def test_enformer_pretrained_model_is_the_fixed_trunk() -> None:
    """'EnformerPretrainedModel' is built as the key list's header says gReLU builds it (n_conv 7, channels
    1536, 8 heads, key length 64, 11 blocks unless stated), whatever other dims model_params hold."""
    _, header = read_key_list("grelu_enformer_oracle_3tasks_keys.txt")
    stated = re.search(r"EnformerModel\(n_tasks=3, (.*?)\), the architecture of EnformerPretrainedModel\(",
                       header).group(1)
    pairs = (item.split("=") for item in stated.split(", "))
    published = {key: ast.literal_eval(value) for key, value in pairs}
    args = _enformer_args({"model_type": "EnformerPretrainedModel", "n_tasks": 3, "channels": 384}, "f")
    assert {key: args[key] for key in published} == published
    shallow = _enformer_args({"model_type": "EnformerPretrainedModel", "n_transformers": 4}, "f")
    assert shallow["n_transformers"] == 4


# === strict loading: clear errors before anything is loaded ================================================


def save(tmp_path: Path, obj: Any, name: str = "bad.ckpt") -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_cnn_architecture_missing_and_leftover_keys(tmp_path: Path) -> None:
    good = {"backbone." + k: v for k, v in tiny_cnn(16, 2).state_dict().items()}
    extra_conv = {**good, "backbone.convs.10.weight": torch.zeros(16, 16, 9),
                  "backbone.convs.10.bias": torch.zeros(16)}
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: 11 conv layers .* has 5 per stack"):
        load_drakes_mdlm(save(tmp_path, extra_conv))
    wrong_shape = {**good, "backbone.convs.3.weight": torch.zeros(16, 16, 5)}
    with pytest.raises(CheckpointError, match=r"'convs\.3\.weight': expected shape \[16, 16, 9\], found "
                                              r"\[16, 16, 5\]"):
        load_drakes_mdlm(save(tmp_path, wrong_shape))
    missing = {k: v for k, v in good.items() if k != "backbone.norms.2.bias"}
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: does not match CNNModel:\n  missing key "
                                              r"'norms\.2\.bias'"):
        load_drakes_mdlm(save(tmp_path, missing))
    with pytest.raises(CheckpointError, match=r"unexpected key 'cls_head\.0\.weight'"):
        load_drakes_mdlm(save(tmp_path, {**good, "backbone.cls_head.0.weight": torch.zeros(16, 16)}))
    with pytest.raises(CheckpointError, match=r"key 'noise\.sigma_max' lacks the 'backbone\.' prefix"):
        load_drakes_mdlm(save(tmp_path, {**good, "noise.sigma_max": torch.tensor(20.0)}))
    with pytest.raises(CheckpointError, match=r"no 'linear\.weight' of shape \[hidden, 5, 9\]"):
        load_drakes_mdlm(save(tmp_path, {"backbone.embed.weight": torch.zeros(5, 16)}))
    with pytest.raises(CheckpointError, match=r"neither a Lightning checkpoint .* \('step' holds a int\)"):
        load_drakes_mdlm(save(tmp_path, {"step": 3, "model": good}))


def test_config_must_describe_the_weights(tmp_path: Path) -> None:
    write_lightning_mdlm(tmp_path / "pretrained.ckpt", tiny_cnn(16, 1), drakes_config(32, 1))
    with pytest.raises(CheckpointError, match=r"config's model\.hidden_dim is 32, but the weights have 16"):
        load_drakes_mdlm(tmp_path / "pretrained.ckpt")
    others = {"diffusion": "uniform", "parameterization": "sedd", "noise": {"type": "geometric"}}
    for name, value in others.items():
        write_lightning_mdlm(tmp_path / "other.ckpt", tiny_cnn(16, 1), {**drakes_config(16, 1), name: value})
        stated = value["type"] if isinstance(value, dict) else value
        message = rf"other\.ckpt: the config's {name}(\.type)? is '{stated}', not DRAKES's"
        with pytest.raises(CheckpointError, match=message):
            load_drakes_mdlm(tmp_path / "other.ckpt")


def test_truncated_and_non_checkpoint_files(release: dict[str, Path], tmp_path: Path) -> None:
    data = release["drakes"].read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: not a readable torch checkpoint"):
        load_drakes_mdlm(tmp_path / "truncated.ckpt")
    with pytest.raises(CheckpointError, match=r"gosai_all\.csv: not a readable torch checkpoint"):
        load_grelu_oracle(release["data"])
    with pytest.raises(FileNotFoundError, match=r"nowhere\.ckpt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nowhere.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict at the top level, found list"):
        load_checkpoint(save(tmp_path, [torch.zeros(1)], "list.pt"))


def test_grelu_errors(tmp_path: Path) -> None:
    paths = write_drakes_release(tmp_path, finetuned=False, zero_alpha=False, atac=False)
    ckpt = load_checkpoint(paths["ft_oracle"])

    def variant(name: str, **changes: Any) -> Path:
        params = {**ckpt["hyper_parameters"]["model_params"], **changes}
        hparams = {**ckpt["hyper_parameters"], "model_params": params}
        return save(tmp_path, {**ckpt, "hyper_parameters": hparams}, name)
    with pytest.raises(CheckpointError, match=r"tasks\.ckpt: model_params\['n_tasks'\] is 7, but the head "
                                              r"has 3 outputs"):
        load_grelu_oracle(variant("tasks.ckpt", n_tasks=7))
    with pytest.raises(CheckpointError, match=r"model_params\['model_type'\] is 'BorzoiModel'"):
        load_grelu_oracle(variant("type.ckpt", model_type="BorzoiModel"))
    with pytest.raises(CheckpointError, match=r"model_params\['crop_len'\] is 2"):
        load_grelu_oracle(variant("crop.ckpt", crop_len=2))
    first = (r"'embedding\.conv_tower\.blocks\.0\.0\.weight': expected shape \[384, 4, 15\], "
             r"found \[192, 4, 15\]")
    with pytest.raises(CheckpointError, match=rf"channels\.ckpt: does not match EnformerModel:\n  {first}"
                                              r"(\n  .*){11}\n  \.\.\. and \d+ more$"):
        load_grelu_oracle(variant("channels.ckpt", channels=768))
    state = {k: v for k, v in ckpt["state_dict"].items() if "running_mean" not in k}
    with pytest.raises(CheckpointError, match=r"missing key 'embedding\.conv_tower\.blocks\.0\.1\.norm\."
                                              r"layer\.running_mean'"):
        load_grelu_oracle(save(tmp_path, {**ckpt, "state_dict": state}, "bn.ckpt"))
    hparams = {**ckpt["hyper_parameters"], "data_params": {"tasks": {"name": ["hepg2"]}}}
    with pytest.raises(CheckpointError, match=r"lists 1 names for 3 tasks"):
        load_grelu_oracle(save(tmp_path, {**ckpt, "hyper_parameters": hparams}, "names.ckpt"))
    with pytest.raises(CheckpointError, match=r"plain\.ckpt: not a gReLU LightningModel checkpoint"):
        load_grelu_oracle(save(tmp_path, {"model.head.weight": torch.ones(1)}, "plain.ckpt"))
    with pytest.raises(ValueError, match=r"ids must be 0\.\.3 \(A, C, G, T\), found 0\.\.4"):
        load_grelu_oracle(paths["ft_oracle"])(torch.tensor([[0, 4]]))


def test_an_oracle_given_for_the_wrong_role_is_refused(tmp_path: Path) -> None:
    """The reward and Pred-Activity read column 0 of a regression oracle as HepG2; ATAC-Acc reads a binary
    classifier's probabilities. A release file given for another role fails before any work."""
    from models.drakes import load_release_networks
    paths = write_drakes_release(tmp_path, finetuned=False, zero_alpha=False)
    release = {name: str(paths[name]) for name in ("pretrained", "ft_oracle", "eval_oracle", "atac")}
    assert set(load_release_networks(release)) == {"pretrained", "ft_oracle", "eval_oracle", "atac"}
    wrong_kind = (r"reward_oracle_ft\.ckpt: given as atac \(the ATAC .*\), but it is a regression "
                  r"model, not binary")
    with pytest.raises(CheckpointError, match=wrong_kind):
        load_release_networks({**release, "atac": release["ft_oracle"]})
    wrong_kind = (r"binary_atac_cell_lines\.ckpt: given as eval_oracle .* but it is a binary model, "
                  r"not regression")
    with pytest.raises(CheckpointError, match=wrong_kind):
        load_release_networks({**release, "eval_oracle": release["atac"]})
    swapped = tmp_path / "swapped.ckpt"
    write_grelu_checkpoint(swapped, tiny_oracle(3, 5), "regression", ["k562", "hepg2", "sknsh"], "1.0.2")
    not_hepg2 = r"swapped\.ckpt: given as ft_oracle .* column 0 is read as HepG2, but its tasks are \['k562'"
    with pytest.raises(CheckpointError, match=not_hepg2):
        load_release_networks({**release, "ft_oracle": str(swapped)})
    unnamed = tmp_path / "unnamed.ckpt"
    write_grelu_checkpoint(unnamed, tiny_oracle(3, 5), "regression", None, "1.0.2")
    assert load_release_networks({"ft_oracle": str(unnamed)})["ft_oracle"].task_names is None


def test_load_strict_lists_every_problem() -> None:
    module = nn.Linear(3, 2)
    problems = r"missing key 'bias' \(shape \[2\]\)\n  'weight' is torch\.int64, expected torch\.float32$"
    with pytest.raises(CheckpointError, match=rf"src: does not match Linear:\n  {problems}"):
        load_strict(module, {"weight": torch.zeros(2, 3, dtype=torch.long)}, "src")
    source = {"weight": torch.ones(2, 3, dtype=torch.float64), "bias": torch.zeros(2)}
    load_strict(module, source, "src")
    assert module.weight.dtype == torch.float32 and module.weight.sum().item() == 6
    source["bias"].add_(1)  # the module holds copies
    assert module.bias.sum().item() == 0


# === nothing in a file may run =============================================================================


class RunsACommand:
    """Pickles as a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


class EvaluatesCode:
    """Pickles as a call of eval (protocol 2 names it __builtin__.eval)."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self) -> tuple:
        return eval, (self.code,)


def test_malicious_pickles_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    save(tmp_path, {"state_dict": {}, "hyper_parameters": {"x": RunsACommand(f"touch {marker}")}}, "a.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"a\.ckpt: refused, nothing was run: its pickle names "
                                                    r"posix\.system, which could run code"):
        load_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        load_drakes_mdlm(tmp_path / "a.ckpt")
    save(tmp_path, {"x": EvaluatesCode(f"open({str(marker)!r}, 'w')")}, "b.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"b\.ckpt: .* names builtins\.eval"):
        load_grelu_oracle(tmp_path / "b.ckpt")
    assert not marker.exists()


def test_stand_ins_are_inert_and_allow_is_exact(release: dict[str, Path]) -> None:
    """omegaconf's classes come back as Pickled stand-ins holding plain data; with allow={} the same file
    is refused, naming the globals it would need."""
    config = load_checkpoint(release["pretrained"])["hyper_parameters"]["config"]
    assert isinstance(config, Pickled) and config.name == "omegaconf.dictconfig.DictConfig"
    assert to_plain(config) == drakes_config(16, 1)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.dict, .*omegaconf\.dictconfig\.DictConfig"):
        load_checkpoint(release["pretrained"], allow={})


def test_load_release_warns_when_the_data_table_is_not_the_releases(tmp_path, monkeypatch, capsys) -> None:
    """A gosai_all.csv far smaller than DRAKES's (here 300 rows) gives another reference set: a warning names
    it; a table of the release's size (GOSAI_ROWS set to these 300 rows) prints none."""
    import models.drakes as MD
    files = write_drakes_release(tmp_path)
    MD.load_release(str(tmp_path), {}, atac_column=1, eval_steps=4)
    log = capsys.readouterr().out
    assert f"[release] reference set: {len(MD.load_reference(str(files['data'])))} sequences" in log
    assert "WARNING: DRAKES's gosai_all.csv (about 673,000 rows) gives about 673 reference sequences" in log
    monkeypatch.setattr(MD, "GOSAI_ROWS", 300)
    MD.load_release(str(tmp_path), {}, atac_column=1, eval_steps=4)
    log = capsys.readouterr().out
    assert "[release] reference set:" in log and "WARNING" not in log
