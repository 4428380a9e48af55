"""A plain-PyTorch Llama (no transformers), gpt-fast style, with every size a parameter:
the random small models the property tests draw, and a model.py that is not a transformers model."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Args:
    vocab: int = 128
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden: int = 128
    bias: bool = False
    tie: bool = False
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, base):  # x [B, H, S, D], pos [B, S]
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None, :, None].float() * inv  # [B, 1, S, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.a = a
        self.wq = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.bias)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.bias)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.bias)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.w1 = nn.Linear(a.dim, a.hidden, bias=False)
        self.w3 = nn.Linear(a.dim, a.hidden, bias=False)
        self.w2 = nn.Linear(a.hidden, a.dim, bias=False)
        self.n1, self.n2 = RMSNorm(a.dim), RMSNorm(a.dim)

    def forward(self, x, pos):  # x [B, S, dim]
        a = self.a
        B, S, _ = x.shape
        h = self.n1(x)
        q = self.wq(h).view(B, S, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.wk(h).view(B, S, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, S, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = rope(q, pos, a.rope_base), rope(k, pos, a.rope_base)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, S, -1))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PlainLlama(nn.Module):
    def __init__(self, a: Args):
        super().__init__()
        self.tok = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim)
        self.out = nn.Linear(a.dim, a.vocab, bias=False)
        if a.tie:
            self.out.weight = self.tok.weight

    def forward(self, input_ids, position_ids):  # [B, S] -> [B, S, vocab]
        x = self.tok(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids)
        return self.out(self.norm(x))


def build(a: Args, seed: int = 0) -> PlainLlama:
    torch.manual_seed(seed)
    m = PlainLlama(a).eval()
    with torch.no_grad():  # norms away from 1 so that they matter
        for mod in m.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.uniform_(0.5, 1.5)
    return m
