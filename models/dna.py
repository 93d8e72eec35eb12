"""The networks of train_dna.py.

The default DNA run's own small networks, trained from scratch on the vendored ENCODE DHS data or a Gosai
table: the MDLM denoiser, the Enformer-architecture oracles and the accessibility classifier of its ATAC-Acc
analogue.

  DilatedCNNDenoiser  p_theta(x_0 | x_t): ids [B, L] (A, C, G, T, MASK = 0..4), sigmabar [B]
                      -> logits [B, L, 4]
  EnformerOracle      ids [B, L] -> [B, n_out]: an enformer-pytorch trunk at small sizes, random init
  AccessibilityCNN    ids [B, L] -> logit [B] of "accessible in HepG2"
  predict             a frozen network's outputs on many sequences, batch by batch

Their state-dict keys are those of the checkpoints earlier runs cached in --out: renaming a submodule
would orphan them. The paper run (--drakes) uses the DRAKES release's networks instead: models/drakes.py.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn



class DilatedCNNDenoiser(nn.Module):
    """MDLM denoiser p_theta(x_0 | x_t): residual dilated 1-d convolutions (the DRAKES DNA layout: stacks of
    dilations 1, 1, 4, 16, 64), time-conditioned on sigmabar by a learned per-layer shift."""

    def __init__(self, hidden: int = 32, stacks: int = 1, kernel: int = 9):
        super().__init__()
        dil = [d for _ in range(stacks) for d in (1, 1, 4, 16, 64)]
        self.embed = nn.Embedding(5, hidden)  # A, C, G, T, MASK
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), 8)), persistent=False)
        self.time = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden * len(dil)))
        self.norms = nn.ModuleList(nn.GroupNorm(1, hidden) for _ in dil)  # channels-first: fast on CPU
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, dilation=d, padding=d * (kernel // 2))
                                   for d in dil)
        self.out = nn.Conv1d(hidden, 4, 1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = torch.log(sigma.float().clamp(min=1e-4))[:, None] * self.freqs  # log sigmabar spans the schedule
        shift = self.time(torch.cat([s.sin(), s.cos()], -1)).view(len(x), len(self.convs), -1, 1)
        h = self.embed(x).transpose(1, 2)  # [B, hidden, L]
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = h + conv(F.gelu(norm(h) + shift[:, i]))
        return self.out(h).transpose(1, 2)  # [B, L, 4] logits over A, C, G, T


class EnformerOracle(nn.Module):
    """Enformer trunk (enformer-pytorch, random init, small dims, no hub weights) + mean pooling + a linear
    head."""

    @staticmethod
    def check(dim: int, heads: int, downsamples: int, given_as: str = "EnformerOracle") -> None:
        """enformer-pytorch's rules for these sizes, checked before anything is built."""
        if (dim // heads) % 6 or dim % heads or downsamples < 3:
            raise ValueError(f"{given_as}: Enformer needs dim a multiple of 6 * heads, downsamples >= 3: "
                             f"{dim=} {heads=} {downsamples=}")

    def __init__(self, n_out: int, dim: int = 48, depth: int = 1, heads: int = 2, downsamples: int = 4):
        super().__init__()
        from enformer_pytorch import Enformer  # imported here: it imports transformers (seconds)
        self.check(dim, heads, downsamples)
        key = max(dim // heads, 8)
        self.trunk = Enformer.from_hparams(dim=dim, depth=depth, heads=heads, attn_dim_key=key,
                                           num_downsamples=downsamples, dim_divisible_by=dim // 4,
                                           target_length=-1, output_heads=dict(human=1), dropout_rate=0.1,
                                           attn_dropout=0.05, pos_dropout=0.01)
        self.head = nn.Linear(2 * dim, n_out)
        # under torchrun enformer-pytorch picks SyncBatchNorm; an oracle is one rank's
        for parent in list(self.modules()):
            for name in [n for n, m in parent.named_children() if isinstance(m, nn.SyncBatchNorm)]:
                setattr(parent, name, nn.BatchNorm1d(getattr(parent, name).num_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(F.one_hot(x, 4).float(), return_only_embeddings=True).mean(1))


class AccessibilityCNN(nn.Module):
    """A plain CNN (deliberately not Enformer) calling 'accessible in HepG2' from sequence: the ATAC-Acc
    analogue."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(4, hidden, 15, padding=7), nn.ReLU(), nn.MaxPool1d(4),
                                 nn.Conv1d(hidden, hidden, 7, padding=3), nn.ReLU(), nn.MaxPool1d(4),
                                 nn.Conv1d(hidden, hidden, 5, padding=2), nn.ReLU(), nn.AdaptiveMaxPool1d(1),
                                 nn.Flatten(), nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(F.one_hot(x, 4).float().transpose(1, 2)).squeeze(-1)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    """model(x) in eval mode, `batch` sequences a call, as float32 on the CPU (empty for no sequences)."""
    if not len(x):
        return torch.empty(0)
    dev = next(model.parameters()).device
    return torch.cat([model.eval()(xb.to(dev)).float().cpu() for xb in x.split(batch)])
