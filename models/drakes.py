"""The DRAKES DNA release: the pretrained masked-diffusion model's denoiser, and the gReLU oracles.

DRAKES: Wang et al., "Fine-Tuning Discrete Diffusion Models via Reward Optimization with Applications to
DNA and Protein Design", ICLR 2025; code ChenyuWang-Monica/DRAKES (drakes_dna/), weights and data in its
DRAKES_data.zip. The DNA task: 200-bp enhancers over A, C, G, T = 0..3 (MASK = 4); the reward is an
oracle's predicted HepG2 activity.

  CNNModel            DRAKES's denoiser (models/dnaconv.py: the dilated CNN of Dirichlet flow matching,
                      Stark et al. 2024) under an MDLM (Sahoo et al. 2024) absorbing-state diffusion:
                      ids [B, L] -> logits [B, L, 5]. Called as sepo's models are, model(x, sigma);
                      sepo.Masked(4) reads the first four columns and ignores the MASK column.
  load_drakes_mdlm    mdlm/outputs_gosai/pretrained.ckpt (a Lightning checkpoint), and the plain state
                      dicts of DRAKES's fine-tuned models (finetuned.ckpt, zero_alpha.ckpt) or of a CNNModel.
  load_release_networks, describe, release_shaped: the release's networks loaded together (each oracle
                      checked for its role: check_roles), described in a line each, and random weights of
                      their shapes (train_dna.py --drakes, --bench)
  load_release, bench_networks: what a --drakes run loads before any work (networks, DRAKES's scorer), and
                      what its --bench times
  load_grelu_oracle   a gReLU LightningModel checkpoint of an Enformer network (models/grelu.py): DRAKES's
                      reward_oracle_ft.ckpt and reward_oracle_eval.ckpt (regression; outputs hepg2, k562,
                      sknsh) and binary_atac_cell_lines.ckpt (7 accessibility probabilities).

The loaders read files with models.safe_load.load_checkpoint (nothing in a file can run), infer the
architecture from the state dict, check every key and shape before loading anything, and keep what a file
says about itself in `model.info`. They print nothing; load_release, a run's assembly, prints what it
found.

Two facts of the release a reader might not expect:
  - DRAKES never feeds time to the CNN: MDLM's _process_sigma gives zeros when time_conditioning is False,
    its setting, so the time path sees t = 0 (a learned constant) whatever sigma is. CNNModel does the
    same by default; CNNModel(time_conditioning=True) is our variant for a time-conditioned denoiser.
  - DRAKES uses the pretrained model's raw weights, not its EMA: Diffusion.load_from_checkpoint restores
    `state_dict`, and the EMA shadow is swapped in only inside Lightning's validation loop. So does
    load_drakes_mdlm.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.drakes import GOSAI_ROWS, HEPG2, RELEASE, DrakesScorer, find_release, load_reference
from .safe_load import CheckpointError, load_checkpoint, load_strict, to_plain

BASES = "ACGT"
MASK = 4  # DRAKES's mask_index
VOCAB = 5  # A, C, G, T, MASK
BASE_DILATIONS = (1, 1, 4, 16, 64)  # dnaconv.py's five base layers, each repeated `stacks` times in a row


# === the denoiser ==========================================================================================


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a time t: [sin(2 pi t W), cos(2 pi t W)] with W ~ N(0, 30^2) of size
    dim / 2, fixed (a Parameter without gradient, saved in the state dict as upstream saves it). From
    score-based SDEs (Song et al. 2021), as dnaconv.py uses it."""

    def __init__(self, dim: int, scale: float = 30.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(dim // 2) * scale, requires_grad=False)

    def forward(self, t: Tensor) -> Tensor:
        angle = t[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class Dense(nn.Module):
    """A Linear(dim, dim) kept as `.dense`, the key upstream's time layers have."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class CNNModel(nn.Module):
    """DRAKES's dilated-CNN denoiser: dnaconv.py's CNNModel with alphabet 5, no classifier, no class guidance.

    With H = hidden, S = stacks and N = 5 S layers, conv_i a Conv1d(H, H, 9) of dilation
    BASE_DILATIONS[i // S] that preserves the length, the forward pass is (dnaconv.py, CNNModel.forward)

        time_emb = ReLU(time_embedder(t))                              [B, H]
        feat = ReLU(linear(one_hot(x)))                                [B, H, L], linear a Conv1d(5, H, 9)
        for i < N:
            h = LayerNorm_i(Dropout(feat) + time_layers_i(time_emb))   (the norm over channels)
            feat = feat + ReLU(conv_i(h))
        logits = final_conv(feat)                                      Conv1d(H, H, 1), ReLU, Conv1d(H, 5, 1)

    t = 0, as DRAKES runs it (time_conditioning False). With time_conditioning=True, t = 1 - e^{-sigma}:
    the probability that the forward process has masked a token by total noise sigma, which is (1 - eps) t
    under MDLM's log-linear schedule and lies in [0, 1), the range the Fourier features (scale 30) are made
    for; sigma itself spans [0, ~7] and would alias them. Such a model registers a buffer
    `time_conditioned`, so that its state dict tells load_drakes_mdlm to rebuild it conditioned."""

    def __init__(self, hidden: int = 128, stacks: int = 4, dropout: float = 0.0,
                 time_conditioning: bool = False):
        super().__init__()
        self.hidden = hidden
        self.stacks = stacks
        self.time_conditioning = time_conditioning
        dilations = [d for d in BASE_DILATIONS for _ in range(stacks)]
        self.linear = nn.Conv1d(VOCAB, hidden, kernel_size=9, padding=4)
        self.time_embedder = nn.Sequential(GaussianFourierProjection(hidden), nn.Linear(hidden, hidden))
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, 9, dilation=d, padding=4 * d) for d in dilations)
        self.time_layers = nn.ModuleList(Dense(hidden) for _ in dilations)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in dilations)
        self.final_conv = nn.Sequential(nn.Conv1d(hidden, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, VOCAB, 1))
        self.dropout = nn.Dropout(dropout)
        if time_conditioning:
            self.register_buffer("time_conditioned", torch.tensor(True))

    def time_input(self, sigma: Optional[Tensor], batch: int) -> Tensor:
        """The time t [B] the Fourier features see (fp32): 0, or 1 - e^{-sigma} if time-conditioned."""
        if not self.time_conditioning:
            return torch.zeros(batch, device=self.linear.weight.device)
        if sigma is None or sigma.shape != (batch,):
            found = None if sigma is None else tuple(sigma.shape)
            raise ValueError(f"a time-conditioned CNNModel needs sigma of shape ({batch},), found {found}")
        return -torch.expm1(-sigma.float())

    def forward(self, x: Tensor, sigma: Optional[Tensor] = None) -> Tensor:
        """x: LongTensor [B, L] of ids 0..4, or a float [B, L, 5] (one-hot or soft, as upstream accepts);
        sigma: [B] total noise, read only if time-conditioned. Returns logits [B, L, 5], MASK last."""
        if x.is_floating_point() and (x.ndim != 3 or x.shape[-1] != VOCAB):
            raise ValueError(f"a float input must be [B, L, {VOCAB}] (one-hot or soft), found "
                             f"{tuple(x.shape)}")
        onehot = x if x.is_floating_point() else F.one_hot(x, VOCAB)
        dtype = self.linear.weight.dtype
        time_emb = F.relu(self.time_embedder(self.time_input(sigma, len(x)).to(dtype)))
        feat = F.relu(self.linear(onehot.to(dtype).transpose(1, 2)))
        for conv, dense, norm in zip(self.convs, self.time_layers, self.norms):
            h = self.dropout(feat) + dense(time_emb)[:, :, None]
            h = norm(h.transpose(1, 2)).transpose(1, 2)
            feat = feat + F.relu(conv(h))
        return self.final_conv(feat).transpose(1, 2)


# === the denoiser's loader =================================================================================


def _strip_prefix(state: Mapping, prefix: str, source: str, required: bool) -> dict:
    """state with `prefix` taken off its keys, which all must carry (required), or all or none may carry."""
    for key in state:
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state dict keys must be strings, found {key!r}")
    lacking = [key for key in state if not key.startswith(prefix)]
    if lacking and (required or len(lacking) < len(state)):
        raise CheckpointError(f"{source}: key '{lacking[0]}' lacks the '{prefix}' prefix"
                              + ("" if required else " that other keys have"))
    return {key if lacking else key[len(prefix):]: value for key, value in state.items()}


def _model_state(ckpt: Mapping, source: str) -> tuple[Mapping, bool]:
    """(state dict, is a Lightning checkpoint) of a Lightning checkpoint or of a plain state dict."""
    if "state_dict" in ckpt:
        if not isinstance(ckpt["state_dict"], Mapping):
            found = type(ckpt["state_dict"]).__name__
            raise CheckpointError(f"{source}: 'state_dict' holds a {found}, not a dict")
        return ckpt["state_dict"], True
    for key, value in ckpt.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: neither a Lightning checkpoint (no 'state_dict') nor a state "
                                  f"dict ('{key}' holds a {type(value).__name__})")
    return ckpt, False


def _lightning_info(ckpt: Mapping) -> dict:
    """What any Lightning checkpoint says about its run."""
    return {"lightning_version": ckpt.get("pytorch-lightning_version"), "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step")}


# DRAKES's MDLM setup, the one sepo.Masked and sepo.LogLinear sample: a file of another setup is refused
DRAKES_SETUP = {"diffusion": "absorbing_state", "parameterization": "subs", "noise.type": "loglinear"}


def _check_config(config: Any, hidden: int, stacks: int, source: str) -> None:
    """The Hydra config DRAKES built the network from must describe these weights."""
    if not isinstance(config, Mapping):
        return
    if config.get("time_conditioning") is True:
        raise CheckpointError(f"{source}: the config's time_conditioning is True: DRAKES would feed sigma "
                              "itself to the time path, which CNNModel does not reproduce")
    noise = config.get("noise") if isinstance(config.get("noise"), Mapping) else {}
    setup = {"diffusion": config.get("diffusion"), "parameterization": config.get("parameterization"),
             "noise.type": noise.get("type")}
    for name, ours in DRAKES_SETUP.items():
        if setup[name] not in (None, ours):
            raise CheckpointError(f"{source}: the config's {name} is {setup[name]!r}, not DRAKES's {ours!r} "
                                  "(MDLM's absorbing SUBS diffusion, which sepo.Masked and LogLinear sample)")
    group = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    for name, found in (("hidden_dim", hidden), ("num_cnn_stacks", stacks)):
        stated = group.get(name)
        if isinstance(stated, int) and stated != found:
            raise CheckpointError(f"{source}: the config's model.{name} is {stated}, but the weights have "
                                  f"{found}")


def load_drakes_mdlm(path: str | os.PathLike, device: str | torch.device = "cpu") -> CNNModel:
    """DRAKES's CNN denoiser from `path`: the Lightning pretrained.ckpt (its raw `state_dict`, keys prefixed
    'backbone.'; not its EMA), or a plain state dict with or without that prefix (finetuned.ckpt,
    zero_alpha.ckpt, CNNModel.state_dict()).

    hidden is read from linear.weight [H, 5, 9], stacks from the number of convs.*.weight / 5, time
    conditioning from a `time_conditioned` buffer; every key and shape is checked before loading. Returns
    the model in eval mode on `device`; `model.info` holds the file's format and, for a Lightning
    checkpoint, its Lightning version, epoch, step and Hydra config (plain dicts; interpolations are left
    unresolved)."""
    source = os.fspath(path)
    ckpt = load_checkpoint(source, mmap=True)  # the optimizer states and the EMA are never read
    state, lightning = _model_state(ckpt, source)
    state = _strip_prefix(state, "backbone.", source, required=lightning)
    stem = state.get("linear.weight")
    if not isinstance(stem, Tensor) or stem.ndim != 3:
        raise CheckpointError(f"{source}: no 'linear.weight' of shape [hidden, {VOCAB}, 9]: not DRAKES's CNN")
    n_convs = sum(re.fullmatch(r"convs\.\d+\.weight", key) is not None for key in state)
    if n_convs == 0 or n_convs % len(BASE_DILATIONS):
        raise CheckpointError(f"{source}: {n_convs} conv layers (convs.*.weight), but DRAKES's CNN has "
                              f"{len(BASE_DILATIONS)} per stack")
    hidden = stem.shape[0]
    stacks = n_convs // len(BASE_DILATIONS)
    info: dict[str, Any] = {"source": source, "format": "lightning" if lightning else "state_dict",
                            "hidden": hidden, "stacks": stacks}
    if lightning:
        hparams = ckpt.get("hyper_parameters")
        config = to_plain(hparams.get("config")) if isinstance(hparams, Mapping) else None
        _check_config(config, hidden, stacks, source)
        info.update(_lightning_info(ckpt), config=config)
    with torch.device("meta"):  # shapes only: load_strict fills in the file's tensors
        model = CNNModel(hidden, stacks, time_conditioning="time_conditioned" in state)
    load_strict(model, state, source)
    model.info = info
    return model.to(device).eval()


# === the oracles' loader ===================================================================================


def _activation(task: str, loss: str, source: str) -> Callable[[Tensor], Tensor]:
    """What gReLU's LightningModel.forward applies to the network's output (initialize_activation)."""
    if task == "regression" and loss == "mse":
        return nn.Identity()
    if task == "regression" and loss in ("poisson", "poisson_multinomial"):
        return torch.exp
    if task == "binary":
        return torch.sigmoid
    if task == "multiclass":
        return nn.Softmax(dim=1)
    raise CheckpointError(f"{source}: train_params task {task!r} with loss {loss!r} is not one of gReLU's")


class GReluOracle(nn.Module):
    """A gReLU LightningModel's prediction, frozen: ids [B, L] (A, C, G, T = 0..3) -> one-hot [B, 4, L] ->
    the network -> the task's activation (identity for MSE regression, sigmoid for binary) -> [B, n_tasks].

    Always in eval mode (BatchNorm's running statistics, no dropout) whatever .train() asks, and its
    parameters need no gradient. `task_names` names the outputs (None where the file has no names)."""

    def __init__(self, model: nn.Module, activation: Callable[[Tensor], Tensor], task: str,
                 task_names: Optional[list[str]], info: dict):
        super().__init__()
        self.model = model  # LightningModel's name for it: our state_dict() keys read 'model.*' as its do
        self.activation = activation
        self.task = task
        self.n_tasks = model.head.n_tasks
        self.task_names = task_names
        self.info = info
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "GReluOracle":
        return super().train(False)  # a reward: never train-mode BatchNorm or dropout

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.is_floating_point():
            raise ValueError(f"expected a LongTensor [B, L] of ids 0..3 (A, C, G, T), found {x.dtype} "
                             f"{tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() > 3):
            raise ValueError(f"ids must be 0..3 (A, C, G, T), found {x.min().item()}..{x.max().item()}")
        dtype = self.model.head.channel_transform.conv.layer.weight.dtype
        return self.activation(self.model(F.one_hot(x, 4).to(dtype).transpose(1, 2))[:, :, 0])


# gReLU's EnformerModel defaults, and the fixed trunk of its EnformerPretrainedModel (grelu/model/models.py)
ENFORMER_DEFAULTS = {"n_conv": 7, "channels": 1536, "n_transformers": 11, "n_heads": 8, "key_len": 64,
                     "attn_dropout": 0.05, "pos_dropout": 0.01, "ff_dropout": 0.4, "crop_len": 0,
                     "final_act_func": None, "final_pool_func": "avg"}
PRETRAINED_FIXED = {"n_conv": 7, "channels": 1536, "n_heads": 8, "key_len": 64, "final_act_func": None}
PRETRAINED_OPTIONS = ("n_transformers", "crop_len", "final_pool_func")


def _enformer_args(params: Mapping, source: str) -> dict:
    """EnformerModel's arguments from gReLU's model_params; keys it does not take (dtype and device in
    gReLU 1.1.0, say) are ignored."""
    kind = params.get("model_type")
    if kind == "EnformerModel":
        args = {name: params.get(name, default) for name, default in ENFORMER_DEFAULTS.items()}
    elif kind == "EnformerPretrainedModel":
        options = {name: params.get(name, ENFORMER_DEFAULTS[name]) for name in PRETRAINED_OPTIONS}
        args = {**ENFORMER_DEFAULTS, **options, **PRETRAINED_FIXED}
    else:
        raise CheckpointError(f"{source}: model_params['model_type'] is {kind!r}; supported: 'EnformerModel' "
                              "and 'EnformerPretrainedModel'")
    if args["crop_len"] != 0:
        raise CheckpointError(f"{source}: model_params['crop_len'] is {args['crop_len']}, but a 200-bp input "
                              "leaves 2 positions: only 0 is supported")
    if args["final_pool_func"] not in ("avg", "max"):
        raise CheckpointError(f"{source}: model_params['final_pool_func'] is {args['final_pool_func']!r}; "
                              "supported: 'avg' and 'max' (one output per task)")
    return args


def _data_params(ckpt: Mapping, hparams: Mapping) -> Any:
    """data_params, at the top level (gReLU >= 1.0.5) or in hyper_parameters (1.0.2)."""
    return ckpt["data_params"] if "data_params" in ckpt else hparams.get("data_params")


def _task_names(ckpt: Mapping, hparams: Mapping, n_tasks: int, source: str) -> Optional[list[str]]:
    """data_params['tasks']['name'] (_data_params)."""
    data_params = _data_params(ckpt, hparams)
    tasks = data_params.get("tasks") if isinstance(data_params, Mapping) else None
    names = tasks.get("name") if isinstance(tasks, Mapping) else None
    if names is None:
        return None
    names = [str(name) for name in names]
    if len(names) != n_tasks:
        raise CheckpointError(f"{source}: data_params['tasks']['name'] lists {len(names)} names for "
                              f"{n_tasks} tasks")
    return names


def load_grelu_oracle(path: str | os.PathLike, device: str | torch.device = "cpu") -> GReluOracle:
    """A gReLU LightningModel checkpoint of an Enformer network as a frozen GReluOracle on `device`:
    LongTensor [B, L] -> [B, n_tasks]. Both layouts: gReLU 1.0.2's (DRAKES's oracles; data_params in
    hyper_parameters) and >= 1.0.5's (data_params at the top level).

    model_params give the architecture ('EnformerModel' and its dims, or 'EnformerPretrainedModel', the
    fixed Enformer trunk) and n_tasks, checked against the head; the depth is the number of
    transformer_tower.blocks.* in the state dict (a disagreement with model_params is noted in
    info['notes']). train_params give the task, hence the activation (gReLU's defaults 'binary' and 'bce'
    where absent); data_params['tasks']['name'] gives task_names. Every key and shape is checked first."""
    from .grelu import EnformerModel  # imported here: enformer-pytorch imports transformers (seconds)

    source = os.fspath(path)
    ckpt = load_checkpoint(source, mmap=True)  # the optimizer states (twice the weights) are never read
    hparams = ckpt.get("hyper_parameters")
    state = ckpt.get("state_dict")
    if not isinstance(hparams, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: not a gReLU LightningModel checkpoint (which has "
                              "'hyper_parameters' and 'state_dict')")
    params = hparams.get("model_params")
    if not isinstance(params, Mapping):
        raise CheckpointError(f"{source}: no model_params in hyper_parameters: not a gReLU LightningModel")
    args = _enformer_args(params, source)
    state = _strip_prefix(state, "model.", source, required=True)
    head = state.get("head.channel_transform.conv.layer.weight")
    n_tasks = params.get("n_tasks")
    if not isinstance(head, Tensor) or head.ndim != 3:
        raise CheckpointError(f"{source}: no 'model.head.channel_transform.conv.layer.weight' of shape "
                              "[n_tasks, 2C, 1]")
    if not isinstance(n_tasks, int) or n_tasks != head.shape[0]:
        raise CheckpointError(f"{source}: model_params['n_tasks'] is {n_tasks!r}, but the head has "
                              f"{head.shape[0]} outputs")
    pattern = re.compile(r"embedding\.transformer_tower\.blocks\.(\d+)\.")
    depth = len({m.group(1) for key in state if (m := pattern.match(key))})
    notes = []
    if depth != args["n_transformers"]:
        notes.append(f"{depth} transformer blocks in the state dict, model_params imply "
                     f"{args['n_transformers']}: built with {depth}")
    args["n_transformers"] = depth
    train_params = hparams.get("train_params") if isinstance(hparams.get("train_params"), Mapping) else {}
    task = str(train_params.get("task", "binary")).lower()
    activation = _activation(task, str(train_params.get("loss", "bce")).lower(), source)
    names = _task_names(ckpt, hparams, n_tasks, source)
    with torch.device("meta"):  # shapes only: 230M parameters at the release size
        model = EnformerModel(n_tasks, **args)
    load_strict(model, state, source)
    info = {"source": source, "layout": "grelu>=1.0.5" if "data_params" in ckpt else "grelu-1.0.2",
            **_lightning_info(ckpt), "model_params": to_plain(dict(params)),
            "train_params": to_plain(train_params), "data_params": to_plain(_data_params(ckpt, hparams)),
            "built": {"n_tasks": n_tasks, **args}, "notes": notes}
    return GReluOracle(model, activation, task, names, info).to(device)


# === the release's networks together (train_dna.py --drakes) =============================================

DENOISERS = ("pretrained", "drakes", "drakes_zero")  # DRAKES's CNN: pretrained.ckpt, finetuned, zero_alpha
ORACLES = ("ft_oracle", "eval_oracle", "atac")        # gReLU Enformer checkpoints
ROLE_TASK = {"ft_oracle": "regression", "eval_oracle": "regression", "atac": "binary"}  # what each role reads


def load_release_networks(paths: Mapping[str, str], device: str | torch.device = "cpu"
                          ) -> dict[str, nn.Module]:
    """{name: network} for the names of DENOISERS and ORACLES in paths (find_release's {name: path}; the
    optional fine-tuned models only where present), each read without running anything in the file and
    loaded strictly (models/drakes.py), on device, in eval mode."""
    nets = {name: load_drakes_mdlm(paths[name], device) for name in DENOISERS if name in paths}
    nets.update({name: load_grelu_oracle(paths[name], device) for name in ORACLES if name in paths})
    check_roles(nets, paths)
    return nets


def check_roles(nets: Mapping[str, nn.Module], paths: Mapping[str, str]) -> None:
    """Each oracle is of the kind its role reads: the reward and Pred-Activity read column HEPG2 of a
    regression oracle, ATAC-Acc thresholds a binary classifier's sigmoid probabilities at 0.5. A file given
    for another role (the ATAC model as the reward, say) would load and score silently wrong numbers."""
    for name, task in ROLE_TASK.items():
        if name not in nets:
            continue
        net = nets[name]
        role = f"{paths[name]}: given as {name} ({RELEASE[name].what})"
        if net.task != task:
            raise CheckpointError(f"{role}, but it is a {net.task} model, not {task}")
        if task == "regression" and net.task_names and "hepg2" not in net.task_names[HEPG2].lower():
            raise CheckpointError(f"{role}, whose column {HEPG2} is read as HepG2, but its tasks are "
                                  f"{net.task_names}")


def _train_n_seqs(info: dict) -> Optional[int]:
    """data_params['train_n_seqs'] (which half of the data trained an oracle), or None."""
    params = info.get("data_params")
    return params.get("train_n_seqs") if isinstance(params, Mapping) else None


def describe(model: nn.Module) -> str:
    """One line of what a release network's file says about itself (model.info, models/drakes.py)."""
    info = model.info
    stated = [k for k in ("lightning_version", "epoch", "global_step") if info.get(k) is not None]
    run = ", ".join(f"{k} {info[k]}" for k in stated)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    if isinstance(model, GReluOracle):
        what = (f"gReLU {info['layout']} {model.task}, tasks {model.task_names}, "
                f"{info['built']['n_transformers']} transformer blocks, "
                f"train_n_seqs {_train_n_seqs(info)}" + "".join(f"; {n}" for n in info["notes"]))
    else:
        what = f"DRAKES CNN ({info['format']}), hidden {info['hidden']}, {info['stacks']} stacks"
    return f"{info['source']}: {what}; {millions:.2f}M parameters" + (f"; {run}" if run else "")


def release_shaped(n_tasks: int = 3) -> tuple[CNNModel, GReluOracle]:
    """(denoiser, oracle) with random weights in the release's shapes: DRAKES's CNN (128 channels, 4 stacks:
    3.3M parameters) and gReLU's EnformerPretrainedModel trunk with an n_tasks regression head (230M)."""
    from .grelu import EnformerModel  # imports enformer-pytorch (seconds)
    oracle = GReluOracle(EnformerModel(n_tasks, **ENFORMER_DEFAULTS), nn.Identity(), "regression", None, {})
    return CNNModel(128, 4), oracle


# === a --drakes run's networks (train_dna.py) ===========================================================

def load_release(base_dir: Optional[str], overrides: Mapping[str, Optional[str]], atac_column: int,
                 eval_steps: int, device: str | torch.device = "cpu") -> dict:
    """Before any work: every release file found at its release path or its override's (one error naming all
    that are missing: data/drakes.py find_release), the networks loaded strictly and safely and described,
    the ATAC column checked, the reference set of the 3-mer and JASPAR correlations read.
    -> {name: network, "scorer": DRAKES's five metrics (data/drakes.py DrakesScorer), "paths": {name: path},
    "atac_task": the name of the ATAC column read}"""
    paths = find_release(base_dir, overrides)
    nets = load_release_networks(paths, device)
    for name, model in nets.items():
        print(f"[release] {name}: {describe(model)}")
    atac = nets["atac"].task_names or ["unnamed"] * nets["atac"].n_tasks
    if not 0 <= atac_column < len(atac):
        raise ValueError(f"--atac-column {atac_column}: {paths['atac']} has {len(atac)} columns {atac}")
    print(f"[release] ATAC-Acc reads column {atac_column} ({atac[atac_column]}) of {atac}")
    if "hepg2" not in atac[atac_column].lower():
        print(f"[release] WARNING: column {atac_column} is not named HepG2; --atac-column picks another")
    reference = load_reference(paths["data"])
    print(f"[release] reference set: {len(reference)} sequences of {paths['data']} (HepG2 > 0.999 quantile)")
    if len(reference) < GOSAI_ROWS // 2000:  # a table of under half the rows: not the release's
        print(f"[release] WARNING: DRAKES's gosai_all.csv (about {GOSAI_ROWS:,} rows) gives about "
              f"{GOSAI_ROWS // 1000} reference sequences: the 3-mer and JASPAR columns are not DRAKES's")
    scorer = DrakesScorer(nets["pretrained"], nets["eval_oracle"], nets["atac"], reference, atac_column,
                          eval_steps)
    return {**nets, "scorer": scorer, "paths": paths, "atac_task": atac[atac_column]}


def bench_networks(base_dir: Optional[str], overrides: Mapping[str, Optional[str]], reward_oracle: str,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """--bench's (denoiser, reward oracle) on device: the release's ("ft" or "eval" oracle), or random weights
    of their shapes (release_shaped) when a file is missing: an iteration's time depends on shapes only."""
    oracle = f"{reward_oracle}_oracle"
    try:
        paths = find_release(base_dir, overrides)
        nets = load_release_networks({k: paths[k] for k in ("pretrained", oracle)})
        model, reward = nets["pretrained"], nets[oracle]
    except FileNotFoundError as missing:
        print(f"[bench] {missing}\n[bench] timing random weights of the release's shapes instead")
        model, reward = release_shaped()
    return model.to(device), reward.to(device)
