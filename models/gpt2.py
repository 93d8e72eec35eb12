"""The GPT-2 family of the text path (SEPO, Section 4.1): reward models and the generative-perplexity judge.

    rm = load_reward_model("runs/rm_x/rm_x_final.pt", lora_merges=0)  # or a transformers folder, or ours
    scores = rm(torch.cat([prompts, responses], 1))                   # GPT-2 ids (data/text.py) -> [B]
    mean, per_sample = generative_perplexity(load_causal_lm("path/to/gpt2-large"), samples)

Three reward-model formats, each called on GPT-2 ids laid out as data/text.py's gpt2_pairs lays them out (a
prompt left-padded with EOT, a response followed by EOT up to the end), the format in `.format`:
  transformers  a sequence-classification model with one output and its own tokenizer (our ids are decoded
                to text and re-encoded);
  minchatgpt    a reward checkpoint of minChatGPT (github.com/ethanyanjiali/minChatGPT, src/gpt.py), the
                GPT-2 reward model SEPO's code credits, scored as minChatGPT scores it;
  sepo          a checkpoint of RewardModel, the reward model train_text.py trains.
The fluency judge is SEDD's generative perplexity (Lou et al. 2024, run_train.py): a causal LM's perplexity
of each sample, averaged over the samples.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.text import EOT, GPT2_VOCAB, MASK, PAD, gpt2_encode, gpt2_text_ids, gpt2_tokenizer

GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # GPT-2 small, medium, large, xl: 64 dimensions per head


# ---------------------------------------------------------------------------- our reward model
class RewardModel(nn.Module):
    """GPT-2 architecture from a config (random init, no hub) + a scalar head. Reads (prompt | response) with
    the pads squeezed out (GPT-2 has absolute positions, so the text starts at position 0) and scores the
    hidden state of the last real token; R(x) = sigmoid(score) in (0, 1). pad_id: the id squeezed out,
    wherever it is (data.text.PAD for train_text.py's tokenizer, EOT for GPT-2 ids)."""

    format = "sepo"

    def __init__(self, vocab: int, n_positions: int, d_model: int, n_layers: int, n_heads: int,
                 pad_id: int = PAD):
        super().__init__()
        from transformers import GPT2Config, GPT2Model
        self.pad_id = pad_id
        self.gpt = GPT2Model(GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d_model,
                                        n_layer=n_layers, n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=pad_id, eos_token_id=pad_id))
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: Tensor) -> Tensor:
        real = x != self.pad_id
        order = torch.sort((~real).int(), dim=1, stable=True).indices  # real tokens first, in order
        ids, mask = x.gather(1, order), real.gather(1, order)
        h = self.gpt(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        last = (mask.sum(1) - 1).clamp_min(0)
        return self.head(h[torch.arange(len(x), device=x.device), last]).squeeze(-1)

    @torch.no_grad()
    def reward(self, x: Tensor, batch: int = 256) -> Tensor:
        """sigmoid(score) in fp32 whatever the caller's autocast (train_text.py evaluates under it)."""
        with torch.autocast(self.head.weight.device.type, enabled=False):
            return torch.cat([torch.sigmoid(self(x[i:i + batch])) for i in range(0, len(x), batch)])


def reward_model_from_state(state: dict, n_heads: int, pad_id: int | None = None,
                            where: str = "") -> RewardModel:
    """A RewardModel holding `state` (strictly), its sizes read from the shapes (but for n_heads, which
    they do not hold). pad_id None: data.text.PAD for a vocabulary smaller than GPT-2's (train_text.py's
    BPE), else EOT."""
    if "gpt.wte.weight" not in state or "gpt.wpe.weight" not in state:
        raise ValueError(f"{where}: not a RewardModel state dict (no gpt.wte.weight, gpt.wpe.weight)")
    vocab, d_model = state["gpt.wte.weight"].shape
    n_layers = len({m.group(1) for k in state for m in [re.match(r"gpt\.h\.(\d+)\.", k)] if m})
    if pad_id is None:
        pad_id = PAD if vocab < GPT2_VOCAB else EOT
    rm = RewardModel(vocab, state["gpt.wpe.weight"].shape[0], d_model, n_layers, n_heads, pad_id)
    try:
        rm.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: does not match RewardModel ({e})") from None
    return rm


# ---------------------------------------------------------------------------- minChatGPT's reward model
class MinChatGPTAttention(nn.Module):
    """Causal self-attention as minChatGPT's MaskedMultiheadSelfAttention (src/gpt.py): scores
    q k^T / sqrt(hd), -inf above the diagonal, then (1 - attention_mask) * finfo.min added on the keys.
    finfo.min, not -inf: a query whose allowed keys are all pads gets the same ~finfo.min for each (finfo.min
    absorbs the scores), so it attends uniformly to them instead of producing NaN."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # nn.Linear, [out, in]: HF's Conv1D holds the transpose
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        B, T, C = x.shape
        hd = C // self.n_heads
        q, k, v = (t.view(B, T, self.n_heads, hd).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        att = (q @ k.transpose(2, 3)) * (1.0 / math.sqrt(hd))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = att + (1.0 - keep[:, None, None, :].to(att.dtype)) * torch.finfo(att.dtype).min
        y = att.softmax(dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GPT-2's feed-forward: c_proj(tanh-GELU(c_fc(x))), width 4 d (minChatGPT's FeedForwardNetworks)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class MinChatGPTBlock(nn.Module):
    """Pre-LN GPT-2 block (minChatGPT's TransformerDecoderBlock): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = MinChatGPTAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), keep)
        return x + self.mlp(self.ln_2(x))


class MinChatGPTRewardModel(nn.Module):
    """minChatGPT's GPTRewardModel (src/gpt.py) with its LoRA folded (load_minchatgpt): GPT-2 with learned
    positions and a final LayerNorm, a value head (no bias) at every position, and the score the MEAN over
    all `block` positions, pads included, as minChatGPT trains it (its input: the text, "<|endoftext|>",
    then EOT pads with attention mask 0, exactly `block` tokens). An unbounded scalar."""

    format = "minchatgpt"

    def __init__(self, vocab: int, block: int, d_model: int, n_layers: int, n_heads: int,
                 batch_size: int = 8):
        super().__init__()
        self.block = block
        self.batch_size = batch_size
        self.lora_merges = 0  # times LoRA's B A was added to the stored weights (load_minchatgpt)
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(block, d_model)
        self.h = nn.ModuleList([MinChatGPTBlock(d_model, n_heads) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.value_head = nn.Linear(d_model, 1, bias=False)

    def score(self, ids: Tensor, keep: Tensor) -> Tensor:
        """minChatGPT's forward on its own input: ids [B, T], attention mask keep [B, T] (1 real) -> [B]."""
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x, keep)
        return self.value_head(self.ln_f(x)).mean(dim=1).squeeze(-1)

    def inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Our ids [B, L] -> minChatGPT's input (ids, keep), each [B, block]: the text of each row
        (data.text.gpt2_text_ids), decoded and re-encoded so that its GPT-2 tokens are the canonical ones
        minChatGPT trained on (a sample may spell a word with other tokens), + EOT, cut to `block` tokens
        (minChatGPT's truncation: the end is lost), then EOT pads with keep 0."""
        rows = [gpt2_encode(gpt2_tokenizer().decode(gpt2_text_ids(r))) + [EOT] for r in x.tolist()]
        rows = [r[: self.block] for r in rows]
        ids = torch.tensor([r + [EOT] * (self.block - len(r)) for r in rows], dtype=torch.long)
        keep = torch.tensor([[1] * len(r) + [0] * (self.block - len(r)) for r in rows], dtype=torch.long)
        return ids.reshape(-1, self.block), keep.reshape(-1, self.block)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        ids, keep = self.inputs(x)
        device = self.wte.weight.device
        chunks = zip(ids.split(self.batch_size), keep.split(self.batch_size))
        return torch.cat([self.score(i.to(device), k.to(device)) for i, k in chunks]).float().to(x.device)


MINCHATGPT_PREFIX = "backbone.transformer."
# minChatGPT's module names -> HF GPT-2's (the names of our modules above)
MINCHATGPT_NAMES = {"token_embedding_layer": "wte", "postion_embedding_layer": "wpe", "decoder_blocks": "h",
                    "ln1": "ln_1", "ln2": "ln_2", "mmsa": "attn", "qkv_projection": "c_attn",
                    "output_projection": "c_proj", "ffn": "mlp", "fc1": "c_fc", "fc2": "c_proj", "ln": "ln_f"}
LORA_LINEARS = ("mmsa.qkv_projection", "mmsa.output_projection", "ffn.fc1", "ffn.fc2")


def minchatgpt_keys(n_layers: int, lora: bool) -> set[str]:
    """Every key of minChatGPT's GPTRewardModel state dict (its lm_head is nn.Identity, so it has none)."""
    top = ("token_embedding_layer.weight", "postion_embedding_layer.weight", "ln.weight", "ln.bias")
    keys = {MINCHATGPT_PREFIX + k for k in top} | {"value_head.weight"}
    params = ("weight", "bias", "lora_A", "lora_B") if lora else ("weight", "bias")
    for i in range(n_layers):
        block = f"{MINCHATGPT_PREFIX}decoder_blocks.{i}."
        keys |= {block + k for k in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "mmsa.mask")}
        keys |= {f"{block}{linear}.{p}" for linear in LORA_LINEARS for p in params}
    return keys


def load_minchatgpt(checkpoint: dict, lora_merges: int | None, n_heads: int | None = None,
                    batch_size: int = 8, where: str = "") -> MinChatGPTRewardModel:
    """A minChatGPT reward checkpoint ({'step', 'model_state_dict', 'optimizer_state_dict'}) as a
    MinChatGPTRewardModel, every key accounted for; n_heads None: GPT-2's for the width (GPT2_HEADS).

    LoRA (loralib 0.1.1: W x + s B A x with s = alpha / r, alpha = 1) is folded into W lora_merges times:
    W + lora_merges * s * B @ A. The hazard: loralib adds B A into W when a model is put in eval() mode,
    and minChatGPT saves its final checkpoint right after eval(), lora_A and lora_B included; loading that
    into a fresh (train-mode) model and calling eval(), as minChatGPT's PPO does, adds B A a second time.
    Which count gives the trained model depends on how the file was written, so the caller says:
      0  W as stored: a file saved after eval() (minChatGPT's *_final.pt), B A already inside;
      1  W + B A: a file saved in train mode (minChatGPT's *_step{N}.pt), or what minChatGPT's own loading
         makes of a *_final.pt (the double fold its PPO stage scored with);
      2  W + 2 B A: for measuring a file of unknown history: the count with the best held-out accuracy
         tells which of the above it is.
    The mask buffers (causal, tril) are checked and dropped; the optimizer state is not read."""
    state = checkpoint.get("model_state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{where}: no 'model_state_dict' dict (minChatGPT saves step, model_state_dict, "
                         f"optimizer_state_dict); top-level keys: {sorted(map(str, checkpoint))[:8]}")
    lora = any(k.endswith(".lora_A") for k in state)
    if lora and lora_merges not in (0, 1, 2):
        raise ValueError(f"{where}: holds LoRA weights: pass lora_merges=0, 1 or 2 (how many times B A is "
                         f"added to the stored weights; see load_minchatgpt), got {lora_merges!r}")
    if not lora and lora_merges not in (None, 0):
        raise ValueError(f"{where}: holds no LoRA weights, so lora_merges={lora_merges} cannot apply")
    block_key = re.compile(rf"{re.escape(MINCHATGPT_PREFIX)}decoder_blocks\.(\d+)\.")
    n_layers = len({m.group(1) for k in state for m in [block_key.match(k)] if m})
    expected = minchatgpt_keys(n_layers, lora)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"{where}: not minChatGPT's reward model with {n_layers} blocks: missing keys "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected keys {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    vocab, d_model = state[MINCHATGPT_PREFIX + "token_embedding_layer.weight"].shape
    block = state[MINCHATGPT_PREFIX + "postion_embedding_layer.weight"].shape[0]
    if n_heads is None and d_model not in GPT2_HEADS:
        raise ValueError(f"{where}: width {d_model} is not a GPT-2 size {sorted(GPT2_HEADS)}: pass n_heads")
    n_heads = GPT2_HEADS[d_model] if n_heads is None else n_heads
    if d_model % n_heads:
        raise ValueError(f"{where}: width {d_model} is not divisible by n_heads={n_heads}")
    causal = torch.ones(block, block).tril().view(1, 1, block, block)
    ours = {}
    for key, value in state.items():
        value = value.float()  # fp32 whatever the file holds
        if key.endswith(".mmsa.mask"):
            if not torch.equal(value, causal):
                raise ValueError(f"{where}: {key} is not the causal mask tril(ones({block}, {block}))")
            continue
        if key.endswith((".lora_A", ".lora_B")):
            continue
        stem = key.removesuffix(".weight")
        if stem + ".lora_A" in state:
            a, b = state[stem + ".lora_A"].float(), state[stem + ".lora_B"].float()
            value = value + lora_merges * (b @ a) / a.shape[0]  # s = alpha / r, alpha = 1
        name = key.removeprefix(MINCHATGPT_PREFIX)
        ours[".".join(MINCHATGPT_NAMES.get(part, part) for part in name.split("."))] = value
    model = MinChatGPTRewardModel(vocab, block, d_model, n_layers, n_heads, batch_size)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: shapes do not match GPT-2 of width {d_model} ({e})") from None
    model.lora_merges = lora_merges or 0
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- transformers reward models
class TransformersRewardModel(nn.Module):
    """A transformers sequence-classification model with one output, on our GPT-2 ids. Each row's text
    (data.text.gpt2_text_ids) is decoded and re-encoded with the model's own tokenizer (its special tokens
    added); a text longer than the model's maximum length is cut from the LEFT (the start of the dialogue
    is lost, the response kept); a batch is padded with the model's pad id on its tokenizer's side (left
    padding with position ids counted from the first real token, for a model that takes position_ids, so
    that padding moves no position); the logit is the score. A model with no pad id scores one text at a
    time."""

    format = "transformers"

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.truncation_side = "left"
        limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**6]  # tokenizers say 1e30 for none
        self.max_length = min(limits, default=None)
        pad = model.config.pad_token_id  # the id the model skips (GPT-2's pools the last token not pad)
        self.batch_size = batch_size if pad is not None else 1
        if pad is not None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(pad)
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def encode(self, texts: list[str]) -> dict:
        enc = self.tokenizer(texts, padding=True, truncation=self.max_length is not None,
                             max_length=self.max_length, return_tensors="pt")
        if self.tokenizer.padding_side == "left" and self.takes_positions:
            enc["position_ids"] = (enc["attention_mask"].cumsum(1) - 1).clamp_min(0)
        return enc

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        texts = [gpt2_tokenizer().decode(gpt2_text_ids(r)) for r in x.tolist()]
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = {k: v.to(device) for k, v in self.encode(texts[i:i + self.batch_size]).items()}
            out.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(out).to(x.device)


def _hub_id(name: str) -> bool:
    """Whether a name that is no local path reads as a Hugging Face hub id ('org/name' or 'name')."""
    looks_like_file = name.startswith(".") or name.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors"))
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not looks_like_file


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars and notes off while we load, restored after: the loaders print nothing, and
    what its notes warn of (weights left random) is an error here."""
    from transformers.utils import logging
    bars = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _from_pretrained(cls, path_or_id: str, local_files_only: bool, **kwargs):
    """cls.from_pretrained, with an error that says what was looked for: a local folder, or a hub id, which is
    downloaded only because the caller named it (and fails offline)."""
    try:
        with _quiet_transformers():
            return cls.from_pretrained(path_or_id, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as e:
        local = os.path.isdir(path_or_id)
        where = "the local folder" if local else "the Hugging Face hub id (no such local path)"
        reason = str(e).strip().splitlines()[0].rstrip(".")
        if reason.startswith("Unrecognized model"):  # its first line lists every model type: ~5000 characters
            reason = "its config.json names no transformers model_type"
            if local and _is_sedd_config(os.path.join(path_or_id, "config.json")):
                raise ValueError(f"{path_or_id}: a SEDD diffusion model (its config.json is SEDD's: graph, "
                                 f"noise, model), not a transformers {cls.__name__}") from None
        hint = "" if local else "; offline, download the model first and pass its folder"
        reason = reason[:300]
        raise ValueError(f"{path_or_id}: cannot load {cls.__name__} from {where} ({reason}){hint}") from None


def _is_sedd_config(path: str) -> bool:
    """Whether a config.json is a SEDD checkpoint's: one that models/sedd.py's architecture() accepts."""
    from .sedd import architecture
    try:
        with open(path, encoding="utf-8") as f:
            architecture(json.load(f))
    except (OSError, ValueError, TypeError, KeyError):  # unreadable, no JSON, or no SEDD config
        return False
    return True


def load_transformers_reward_model(path_or_id: str, batch_size: int = 8,
                                   local_files_only: bool = False) -> TransformersRewardModel:
    """AutoModelForSequenceClassification + AutoTokenizer from a folder (or a hub id the caller named). One
    output, and every weight in the files (a missing classification head would be random), or an error."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model, info = _from_pretrained(AutoModelForSequenceClassification, path_or_id, local_files_only,
                                   output_loading_info=True)
    if model.config.num_labels != 1:
        raise ValueError(f"{path_or_id}: a reward model has one output, this one has "
                         f"num_labels={model.config.num_labels}")
    if info.get("missing_keys"):
        raise ValueError(f"{path_or_id}: weights missing from the files (would be random): "
                         f"{sorted(info['missing_keys'])[:6]}")
    tokenizer = _from_pretrained(AutoTokenizer, path_or_id, local_files_only)
    return TransformersRewardModel(model, tokenizer, batch_size)


# ---------------------------------------------------------------------------- one loader for the three
def load_reward_model(path_or_id: str, *, lora_merges: int | None = None, n_heads: int | None = None,
                      pad_id: int | None = None, batch_size: int = 8,
                      local_files_only: bool = False) -> nn.Module:
    """A reward model called on GPT-2 ids [B, L] (data.text.gpt2_pairs's layout) -> scores [B], in eval mode,
    its format in `.format`:
      a folder, or a hub id (downloaded only when named) -> transformers (load_transformers_reward_model);
      a file, read with torch.load(weights_only=True):
        with 'model_state_dict' -> minchatgpt (load_minchatgpt; lora_merges required if it holds LoRA,
          n_heads if its width is no GPT-2 size);
        a RewardModel state dict, or train_text.py's checkpoint ('model', 'settings') -> sepo
          (reward_model_from_state; n_heads from settings['rm_heads'] or the argument). It reads the ids it
          was trained on as they are (its pad_id squeezed out wherever it is).
    An option the detected format has no use for is an error, not ignored."""
    if lora_merges not in (None, 0, 1, 2):
        raise ValueError(f"lora_merges must be 0, 1 or 2, got {lora_merges!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if os.path.isdir(path_or_id) or (not os.path.exists(path_or_id) and _hub_id(path_or_id)):
        unused = dict(lora_merges=lora_merges, n_heads=n_heads, pad_id=pad_id)
        unused = sorted(k for k, v in unused.items() if v is not None)
        if unused:
            raise ValueError(f"{path_or_id}: a transformers reward model takes no {unused}")
        return load_transformers_reward_model(path_or_id, batch_size, local_files_only)
    if not os.path.isfile(path_or_id):
        raise FileNotFoundError(f"{path_or_id}: no such file or folder")
    try:
        ck = torch.load(path_or_id, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that would run code, a truncated file, no torch file at all
        raise ValueError(f"{path_or_id}: not a checkpoint torch.load(weights_only=True) reads "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path_or_id}: expected a dict checkpoint, got {type(ck).__name__}")
    if "model_state_dict" in ck:
        if pad_id is not None:
            raise ValueError(f"{path_or_id}: a minChatGPT checkpoint takes no pad_id (its pad is EOT)")
        return load_minchatgpt(ck, lora_merges, n_heads, batch_size, path_or_id)
    if "model" in ck or "gpt.wte.weight" in ck:
        if lora_merges is not None:
            raise ValueError(f"{path_or_id}: a RewardModel checkpoint has no LoRA, lora_merges={lora_merges}")
        saved = ck.get("settings", {}).get("rm_heads")
        if n_heads is not None and saved is not None and n_heads != saved:
            raise ValueError(f"{path_or_id}: n_heads={n_heads}, but the checkpoint says rm_heads={saved}")
        if n_heads is None and saved is None:
            raise ValueError(f"{path_or_id}: a RewardModel state dict without settings: pass n_heads")
        rm = reward_model_from_state(ck.get("model", ck), n_heads or saved, pad_id, path_or_id)
        return rm.eval().requires_grad_(False)
    raise ValueError(f"{path_or_id}: neither a minChatGPT checkpoint ('model_state_dict') nor a RewardModel "
                     f"one ('model' or 'gpt.wte.weight'); top-level keys: {sorted(map(str, ck))[:8]}")


# ---------------------------------------------------------------------------- generative perplexity
class CausalLM(nn.Module):
    """A transformers causal LM and its tokenizer. gpt2_ids: it reads GPT-2 ids as they are (its vocabulary
    holds GPT-2's tokens at GPT-2's ids); otherwise generative_perplexity re-encodes the text."""

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        vocab = {} if tokenizer is None else tokenizer.get_vocab()
        same = all(vocab.get(t) == i for t, i in gpt2_tokenizer().get_vocab().items())
        self.gpt2_ids = tokenizer is None or (same and model.config.vocab_size >= GPT2_VOCAB)
        limits = [getattr(model.config, k, None) for k in ("n_positions", "max_position_embeddings")]
        self.max_length = min([n for n in limits if isinstance(n, int)], default=None)


def load_causal_lm(path_or_id: str, local_files_only: bool = False) -> CausalLM:
    """AutoModelForCausalLM + AutoTokenizer from a folder (e.g. a downloaded gpt2-large, SEDD's judge), or a
    hub id, downloaded only because the caller named it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not os.path.isdir(path_or_id) and not _hub_id(path_or_id):
        raise FileNotFoundError(f"{path_or_id}: no such folder (and no hub id)")
    model = _from_pretrained(AutoModelForCausalLM, path_or_id, local_files_only)
    return CausalLM(model, _from_pretrained(AutoTokenizer, path_or_id, local_files_only))


def _inputs(lm: CausalLM, ids: Tensor, prompt_len: int, until_eot: bool) -> tuple[Tensor, Tensor, Tensor]:
    """What lm reads: (input ids [B, T], attention mask [B, T], scored [B, T]: True where token j is scored
    from the logits at j - 1)."""
    if lm.gpt2_ids:
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, max(1, prompt_len):] = True
        if until_eot:  # nothing after the response's first EOT is scored (that EOT is)
            eot = (ids[:, prompt_len:] == EOT).int()
            scored[:, prompt_len:] &= eot.cumsum(1) - eot == 0
        return ids, torch.ones_like(ids), scored
    tok, gpt2, rows = lm.tokenizer, gpt2_tokenizer(), []
    for r in ids.tolist():  # GPT-2's EOT is no text for another LM: dropped (until_eot: the response ends)
        response = r[prompt_len:]
        if until_eot and EOT in response:
            response = response[: response.index(EOT)]
        prompt = tok.encode(gpt2.decode([i for i in r[:prompt_len] if i != EOT]), add_special_tokens=False)
        response = tok.encode(gpt2.decode([i for i in response if i != EOT]), add_special_tokens=False)
        rows.append((prompt, response))
    T = max(len(p) + len(r) for p, r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # right padding: masked out, never scored
    x = torch.tensor([p + r + [pad] * (T - len(p) - len(r)) for p, r in rows], dtype=torch.long)
    attention = torch.tensor([[int(j < len(p) + len(r)) for j in range(T)] for p, r in rows])
    scored = torch.tensor([[max(1, len(p)) <= j < len(p) + len(r) for j in range(T)] for p, r in rows])
    return x, attention, scored


@torch.no_grad()
def generative_perplexity(lm: CausalLM | nn.Module, ids: Tensor, batch_size: int = 8, prompt_len: int = 0,
                          until_eot: bool = False) -> tuple[float, Tensor]:
    """SEDD's generative perplexity (Lou et al. 2024, run_train.py) of GPT-2 ids [B, L]: per sample
    PPL_i = exp(mean over the scored tokens j of CE(logits_{j-1}, s_j)), no BOS added, log-softmax in fp32,
    the LM run in its own precision with any autocast of the caller's turned off (SEDD's judge runs in fp32).
    Returns (the MEAN of the PPL_i, not exp of the mean NLL; the PPL_i [B], float64). Scored: every token
    from position max(1, prompt_len) on, EOTs inside a sample included (SEDD scores the whole 1024-token
    sample); until_eot: nothing after the response's first EOT. A model with GPT-2's vocabulary reads the
    ids as they are; another (CausalLM.gpt2_ids False) reads the decoded prompt and response, EOTs dropped,
    each re-encoded by its tokenizer without special tokens. A bare transformers model reads GPT-2 ids."""
    lm = lm if isinstance(lm, CausalLM) else CausalLM(lm)
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a LongTensor [B, L], got {ids.dtype} of shape {tuple(ids.shape)}")
    if ((ids < 0) | (ids >= GPT2_VOCAB)).any():
        raise ValueError(f"ids hold values outside GPT-2's vocabulary 0..{GPT2_VOCAB - 1} (MASK = {MASK}?)")
    if not 0 <= prompt_len < ids.shape[1] or batch_size < 1:
        raise ValueError(f"need 0 <= prompt_len < L = {ids.shape[1]} and batch_size >= 1, got prompt_len "
                         f"{prompt_len}, batch_size {batch_size}")
    x, attention, scored = _inputs(lm, ids, prompt_len, until_eot)
    empty = (~scored.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty[:8]} have no token to score")
    if lm.max_length is not None and x.shape[1] > lm.max_length:
        raise ValueError(f"sequences of {x.shape[1]} tokens are longer than the model's {lm.max_length} "
                         "positions")
    device = next(lm.model.parameters()).device
    ppl = []
    for xb, ab, sb in zip(x.split(batch_size), attention.split(batch_size), scored.split(batch_size)):
        xb, mask = xb.to(device), sb[:, 1:].to(device)
        with torch.autocast(device.type, enabled=False):  # the LM's own precision, whatever the caller's
            logits = lm.model(input_ids=xb, attention_mask=ab.to(device)).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), xb[:, 1:], reduction="none").double()  # fp32 log-softmax
        ppl.append(((ce * mask).sum(1) / mask.sum(1)).exp().cpu())
    per_sample = torch.cat(ppl)
    return float(per_sample.mean()), per_sample
