"""gReLU's EnformerModel in plain torch, with gReLU's parameter names: the network of DRAKES's oracles.

gReLU: Lal et al., "gReLU: a comprehensive framework for DNA sequence modeling and design", Nature
Methods 2024; code Genentech/gReLU (grelu/model/models.py EnformerModel, trunks/enformer.py,
blocks.py, layers.py, heads.py; the same network and keys in 1.0.2 and 1.1.0). Enformer: Avsec et al.,
"Effective gene expression prediction from sequence by integrating long-range interactions", Nature
Methods 2021. gReLU builds its attention, attention pooling and GELU from enformer-pytorch
(lucidrains/enformer-pytorch, modeling_enformer.py), and so does this file; the rest is rewritten
here, so that neither gReLU nor Lightning is needed.

x [B, 4, L] one-hot (channels A, C, G, T) -> y [B, n_tasks, 1] (before the task's activation: identity
for regression, sigmoid for a binary model, applied by whoever wraps the network), in this order:

  embedding (EnformerTrunk)
    conv_tower.blocks.0      stem Conv1d(4 -> C/2, k 15), then ConvBlock(C/2, k 1, residual, attention pool 2)
    conv_tower.blocks.i      i = 1..n_conv-1: ConvBlock(f[i-1] -> f[i], k 5), then ConvBlock(f[i], k 1,
                             residual, attention pool 2), f = [C/2] + exponential_linspace_int(C/2, C,
                             n_conv - 1, divisible_by=128); each ConvBlock is BatchNorm -> GELU -> Conv
                             (gReLU's order "NACDR"), plus its input if residual, then the pool
    transformer_tower        n_transformers x [x + Dropout(MHA(LayerNorm(x))); x + FFN(x)], with
                             FFN = LayerNorm -> Linear(C, 2C) -> Dropout -> ReLU -> Linear(2C, C) -> Dropout
                             and MHA enformer-pytorch's Attention with relative positions
    pointwise_conv           ConvBlock(C -> 2C, k 1)
    act                      GELU (Enformer's: x sigmoid(1.702 x))
  head (ConvHead)
    channel_transform        Conv1d(2C -> n_tasks, k 1), then final_act_func
    pool                     average (or max) over the remaining positions -> [B, n_tasks, 1]

A 200-bp input leaves 200 / 2^n_conv positions rounded up at each pool: 2 at n_conv = 7, so gReLU's crop
must be 0 (crop_len > 0 is refused here). gReLU's EnformerPretrainedModel is this network at C = 1536,
n_conv 7, 8 heads, key length 64 (value length C / heads), n_transformers <= 11, with the Enformer human
trunk's weights and a new head.
"""
from __future__ import annotations

from typing import Optional

from enformer_pytorch.modeling_enformer import GELU, Attention, AttentionPool, exponential_linspace_int
from torch import Tensor, nn

# gReLU's Activation names (grelu/model/layers.py) for the head's final_act_func
ACTIVATIONS = {None: nn.Identity, "relu": nn.ReLU, "elu": nn.ELU, "softplus": nn.Softplus, "gelu": nn.GELU,
               "gelu_enformer": GELU}
POOLS = {"avg": nn.AdaptiveAvgPool1d, "max": nn.AdaptiveMaxPool1d}


class Layer(nn.Module):
    """One module held as `.layer`, as gReLU's Norm, Pool and ChannelTransform wrappers hold theirs, so
    that the keys read e.g. `norm.layer.weight`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class ConvBlock(nn.Module):
    """gReLU's ConvBlock in the order "NACDR" of Enformer's towers: BatchNorm(in) -> GELU -> Conv1d
    ('same' padding) -> (+ input, if residual; in = out) -> attention pool of width 2 (if pool).
    Its dropout is Identity wherever Enformer uses this block."""

    def __init__(self, c_in: int, c_out: int, kernel: int, residual: bool = False, pool: bool = False):
        super().__init__()
        self.norm = Layer(nn.BatchNorm1d(c_in))
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding="same")
        self.act = GELU()
        self.residual = residual
        self.pool = Layer(AttentionPool(c_out, pool_size=2)) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.act(self.norm(x)))
        if self.residual:
            y = y + x
        return self.pool(y)


class EnformerConvTower(nn.Module):
    """The stem and n_conv - 1 pairs of conv blocks, each halving the length (gReLU EnformerConvTower)."""

    def __init__(self, n_blocks: int, channels: int):
        super().__init__()
        half = channels // 2
        filters = [half] + exponential_linspace_int(half, channels, num=n_blocks - 1, divisible_by=128)
        stem = nn.Sequential(nn.Conv1d(4, half, 15, padding="same"), ConvBlock(half, half, 1, True, True))
        self.blocks = nn.ModuleList([stem])
        for i in range(1, n_blocks):
            self.blocks.append(nn.Sequential(ConvBlock(filters[i - 1], filters[i], 5),
                                             ConvBlock(filters[i], filters[i], 1, residual=True, pool=True)))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class LinearBlock(nn.Module):
    """gReLU's LinearBlock: LayerNorm (if norm) -> Linear -> Dropout -> activation (ReLU or none)."""

    def __init__(self, d_in: int, d_out: int, norm: bool, relu: bool, dropout: float):
        super().__init__()
        self.norm = Layer(nn.LayerNorm(d_in)) if norm else nn.Identity()
        self.linear = nn.Linear(d_in, d_out)
        self.dropout = nn.Dropout(dropout)
        self.act = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dropout(self.linear(self.norm(x))))


class FeedForwardBlock(nn.Module):
    """gReLU's FeedForwardBlock: LinearBlock(C -> 2C, LayerNorm, ReLU) then LinearBlock(2C -> C)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.dense1 = LinearBlock(dim, 2 * dim, norm=True, relu=True, dropout=dropout)
        self.dense2 = LinearBlock(2 * dim, dim, norm=False, relu=False, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.dense1(x))


class EnformerTransformerBlock(nn.Module):
    """x + Dropout(MHA(LayerNorm(x))), then + FFN: gReLU's EnformerTransformerBlock on [B, L, C], with
    enformer-pytorch's relative-position Attention (value length C / heads, C / heads positional
    features, TF gamma off)."""

    def __init__(self, dim: int, n_heads: int, key_len: int, attn_dropout: float, pos_dropout: float,
                 ff_dropout: float):
        super().__init__()
        self.norm = Layer(nn.LayerNorm(dim))
        self.mha = Attention(dim, heads=n_heads, dim_key=key_len, dim_value=dim // n_heads,
                             num_rel_pos_features=dim // n_heads, dropout=attn_dropout,
                             pos_dropout=pos_dropout, use_tf_gamma=False)
        self.dropout = nn.Dropout(ff_dropout)
        self.ffn = FeedForwardBlock(dim, ff_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.mha(self.norm(x)))
        return x + self.ffn(x)


class EnformerTransformerTower(nn.Module):
    """n_blocks transformer blocks over the positions: [B, C, L] -> [B, C, L]."""

    def __init__(self, dim: int, n_blocks: int, n_heads: int, key_len: int, attn_dropout: float,
                 pos_dropout: float, ff_dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(EnformerTransformerBlock(dim, n_heads, key_len, attn_dropout, pos_dropout,
                                                             ff_dropout) for _ in range(n_blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return x.transpose(1, 2)


class EnformerTrunk(nn.Module):
    """Conv tower -> transformer tower -> pointwise ConvBlock(C -> 2C) -> GELU: [B, 4, L] -> [B, 2C, L']."""

    def __init__(self, n_conv: int, channels: int, n_transformers: int, n_heads: int, key_len: int,
                 attn_dropout: float, pos_dropout: float, ff_dropout: float):
        super().__init__()
        self.conv_tower = EnformerConvTower(n_conv, channels)
        self.transformer_tower = EnformerTransformerTower(channels, n_transformers, n_heads, key_len,
                                                          attn_dropout, pos_dropout, ff_dropout)
        self.pointwise_conv = ConvBlock(channels, 2 * channels, 1)  # gReLU's dropout ff_dropout // 8 is 0
        self.act = GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.pointwise_conv(self.transformer_tower(self.conv_tower(x))))


class ChannelTransformBlock(nn.Module):
    """The head's 1x1 convolution (kept as `conv.layer`, gReLU's ChannelTransform) and its activation."""

    def __init__(self, c_in: int, c_out: int, act_func: Optional[str]):
        super().__init__()
        self.conv = Layer(nn.Conv1d(c_in, c_out, 1))
        self.act = ACTIVATIONS[act_func]()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class ConvHead(nn.Module):
    """gReLU's ConvHead without norm: 1x1 conv to n_tasks channels, activation, pooling over positions."""

    def __init__(self, n_tasks: int, c_in: int, act_func: Optional[str], pool_func: str):
        super().__init__()
        self.n_tasks = n_tasks
        self.channel_transform = ChannelTransformBlock(c_in, n_tasks, act_func)
        self.pool = Layer(POOLS[pool_func](1))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.channel_transform(x))


class EnformerModel(nn.Module):
    """gReLU's EnformerModel (its defaults; the arguments keep gReLU's names): [B, 4, L] one-hot
    (A, C, G, T) -> [B, n_tasks, 1] before the task's activation. Only crop_len 0 is supported."""

    def __init__(self, n_tasks: int, n_conv: int = 7, channels: int = 1536, n_transformers: int = 11,
                 n_heads: int = 8, key_len: int = 64, attn_dropout: float = 0.05, pos_dropout: float = 0.01,
                 ff_dropout: float = 0.4, crop_len: int = 0, final_act_func: Optional[str] = None,
                 final_pool_func: str = "avg"):
        super().__init__()
        if crop_len != 0:
            raise ValueError(f"crop_len={crop_len}: only 0 is supported (a 200-bp input leaves 2 positions)")
        if n_conv < 3 or channels % 128 or channels % (6 * n_heads):
            raise ValueError(f"EnformerModel needs n_conv >= 3 (the filter schedule), channels a multiple "
                             f"of 128 (its last filter) and of 6 n_heads (the positional features): got "
                             f"{n_conv=}, {channels=}, {n_heads=}")
        if final_act_func not in ACTIVATIONS or final_pool_func not in POOLS:
            raise ValueError(f"final_act_func must be one of {list(ACTIVATIONS)} and final_pool_func one of "
                             f"{list(POOLS)}: got {final_act_func!r}, {final_pool_func!r}")
        self.embedding = EnformerTrunk(n_conv, channels, n_transformers, n_heads, key_len, attn_dropout,
                                       pos_dropout, ff_dropout)
        self.head = ConvHead(n_tasks, 2 * channels, final_act_func, final_pool_func)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embedding(x))

