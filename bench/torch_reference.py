"""A plain PyTorch (eager, float32) Llama-family decoder: the baseline of the flaxalign/PyTorch speed ratio.

It computes the same function as `flaxalign.models.CausalLM` for the same `ModelConfig` (RMSNorm, RoPE in the
rotate_half layout with optional Llama-3.1 scaling, grouped-query attention with optional q/k/v biases, SwiGLU,
tied or untied head) and is written the way a PyTorch user would write it: `nn.Linear` layers ([out, in] weights)
and `F.scaled_dot_product_attention`, no transformers, no torch.compile. Module names follow Hugging Face's, so
flaxalign params load through `flaxalign.interop.hf.params_to_hf_state_dict`; `torch_logits` does that, for tests
that check both implementations compute one function.

`bench/clm_step.py` times `TorchTrainer` (eager and `torch.compile`) on the shapes it times flaxalign with.
"""

import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flaxalign.interop import hf
from flaxalign.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """θ^(-2i/d), with Llama-3.1 wavelength-dependent scaling when `rope_scaling_factor` is set."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if not config.rope_scaling_factor:
        return inv_freq
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    original = config.rope_original_max_len
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, smoothed)
    return torch.where(wavelen < original / high, inv_freq, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head n reads n // group
        # no segments: the fused causal path, which is what a PyTorch training loop would use
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_eps)


class TorchCausalLM(nn.Module):
    """Embedding → decoder layers → final norm → LM head; state-dict names equal Hugging Face's Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._init(config.init_std)

    def _init(self, std: float):
        """flaxalign's initialisation: normal(init_std) matrices, zero biases, unit norms."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.ndim == 2:
                nn.init.normal_(param, std=std)

    def forward(self, tokens, positions=None, segment_ids=None):
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t).expand(b, t)
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, Dh]: broadcast over heads
        cos, sin = angles.cos(), angles.sin()
        mask = None
        if segment_ids is not None:
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            mask = (causal & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight
        return F.linear(x, head)


def torch_logits(config: ModelConfig, params_numpy: Any, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """float32 logits [B, T, V] of the torch reference with flaxalign's params (a nested dict of arrays)."""
    model = TorchCausalLM(config)
    state = {name: torch.from_numpy(value) for name, value in hf.params_to_hf_state_dict(config, params_numpy).items()}
    model.load_state_dict(state, strict=True)

    def as_tensor(x):
        return None if x is None else torch.from_numpy(np.asarray(x, np.int64))

    with torch.no_grad():
        return model(as_tensor(tokens), as_tensor(positions), as_tensor(segment_ids)).numpy()


class TorchTrainer:
    """The torch reference's AdamW training step (forward, mean cross-entropy over all B·T next-token targets,
    backward, optimizer step) in float32 on all CPU cores, eager or under `torch.compile` (the whole step: model,
    loss, backward and optimizer, as a PyTorch user would compile it), built once so that its steps can be timed
    in rounds beside flaxalign's."""

    def __init__(self, config: ModelConfig, batch_size: int, seq_len: int, *, compiled: bool = False):
        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        self.model = TorchCausalLM(config).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        data = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
        self.inputs, self.targets, self.vocab = data[:, :-1], data[:, 1:], config.vocab_size
        self.tokens = batch_size * seq_len
        self._step = torch.compile(self._eager_step) if compiled else self._eager_step
        start = time.perf_counter()
        self.loss = self._step()  # compiles when `compiled`
        self.compile_seconds = time.perf_counter() - start

    def _eager_step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(self.inputs)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), self.targets.reshape(-1))
        loss.backward()
        self.optimizer.step()
        return loss

    def seconds_per_step(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.loss = self._step()
        return (time.perf_counter() - start) / max(steps, 1)

