"""Model hyper-parameters and the preset registry.

A preset is a plain dict of `ModelConfig` fields so that configs can put it into an `ml_collections.ConfigDict`
(`config.model`) where every field can be overridden from the command line (`--config.model.n_layers=4`).
"""

import dataclasses
import re
from typing import Any

from flaxalign import errors


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder: `family` picks the module (`models.families`: "llama" for Llama 2/3,
    Mistral, Qwen2, Qwen3, SmolLM; "gemma" for Gemma 2 and 3), the other fields are shared by all families."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int = 0  # 0 = d_model // n_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # Llama-3.1 style frequency scaling; 0 factor = off.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3, Gemma 3)
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype ("auto": bfloat16 on GPU/TPU, float32 on CPU); params are float32
    # How the frozen base of LoRA / adapters is stored: "auto" = the compute dtype (bfloat16 on GPU/TPU halves it,
    # as PEFT users load it), or float32 / bfloat16 / float16. A checkpoint's frozen part is cast as it is read.
    # Not affected: trained params, optimizer state, full fine-tuning's reference copy (float32) and a QLoRA base
    # (quantization.base: its codes, with float32 embedding, LM head and norms).
    frozen_dtype: str = "auto"
    attention: str = "auto"  # auto | xla | blockwise | splash | cudnn (`flaxalign.models.attention`)
    remat: str = "minimal"  # what a layer keeps for the backward pass: `models.remat` (none, minimal, full, dots_*)
    scan_layers: bool = True  # False unrolls the layer loop (longer compile; see BUILD_NOTES for when it is faster)
    # Sliding-window attention (Mistral, Qwen2, Gemma local layers): each query sees itself and the window − 1 keys
    # before it; 0 = full causal attention. Layers listed in `full_attention_layers` attend in full anyway.
    sliding_window: int = 0
    full_attention_layers: tuple[int, ...] = ()
    attn_softcap: float = 0.0  # > 0: attention logits soft-capped, s ← c·tanh(s / c) (Gemma 2)
    final_softcap: float = 0.0  # > 0: output logits soft-capped the same way (Gemma 2; `models.lm_head.LMHead`)
    # The module family (`models.families`); what a family does differently is implied by it (Gemma: (1 + w)
    # norms, post-sub-layer norms, GeGLU, √d embedding scale), not stated by more flags.
    family: str = "llama"
    # Scores q·k / √query_pre_attn_scalar; 0 = head_dim (the usual 1/√head_dim; a value equal to head_dim is stored
    # as 0, so both spellings are one config). Gemma.
    query_pre_attn_scalar: float = 0.0
    # The RoPE base of windowed layers (unscaled); 0 = rope_theta (stored as 0 when equal). Gemma 3's local layers.
    rope_local_theta: float = 0.0
    # Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020; `flaxalign.models.adapters`). The defaults
    # build exactly the plain model.
    adapter_placement: str = "none"  # "none", "houlsby" (after attention and after MLP) or "pfeiffer" (after MLP)
    adapter_reduction: int = 16  # bottleneck width = d_model // adapter_reduction
    adapter_activation: str = "relu"  # "relu" (as in the papers), "silu" or "gelu" (exact erf form)
    adapter_names: tuple[str, ...] = ()  # named adapter sets in one parameter tree (one per task)
    active_adapter: str = ""  # the set that runs; "" = none: the base model (the reference, no copy)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise errors.ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}.")
        if self.attention not in ATTENTION_IMPLEMENTATIONS + tuple(LEGACY_ATTENTION):
            raise errors.ConfigError(
                f"model.attention must be one of {list(ATTENTION_IMPLEMENTATIONS)}, not {self.attention!r}.")
        self._check_windows()
        self._check_family()
        if self.remat not in REMAT_POLICIES:
            raise errors.ConfigError(f"model.remat must be one of {sorted(REMAT_POLICIES)}, not {self.remat!r}.")
        if self.dtype == "auto":
            import jax
            object.__setattr__(self, "dtype", "float32" if jax.default_backend() == "cpu" else "bfloat16")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise errors.ConfigError(
                f"model.dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}.")
        if self.frozen_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise errors.ConfigError(
                f"model.frozen_dtype must be auto, float32, bfloat16 or float16, not {self.frozen_dtype!r}.")
        self._check_adapters()

    def _check_windows(self):
        object.__setattr__(self, "full_attention_layers", tuple(int(i) for i in self.full_attention_layers))
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise errors.ConfigError(f"model.sliding_window must be 0 (off) or a positive number of tokens, not "
                                     f"{self.sliding_window!r}.")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.n_layers]
        if bad:
            raise errors.ConfigError(f"model.full_attention_layers {bad} are not layer indices of a model with "
                                     f"{self.n_layers} layers.")
        for name in ("attn_softcap", "final_softcap"):
            if not getattr(self, name) >= 0:
                raise errors.ConfigError(f"model.{name} must be >= 0 (0 = off), not {getattr(self, name)}.")

    def _check_family(self):
        if self.family not in FAMILIES:
            raise errors.ConfigError(f"model.family must be one of {list(FAMILIES)}, not {self.family!r}.")
        for name in ("query_pre_attn_scalar", "rope_local_theta"):
            if not getattr(self, name) >= 0:
                raise errors.ConfigError(f"model.{name} must be >= 0 (0 = the default), not {getattr(self, name)}.")
        # one config per function: the value that means the default is stored as the default
        if self.query_pre_attn_scalar == self.head_dim:
            object.__setattr__(self, "query_pre_attn_scalar", 0.0)
        if self.rope_local_theta == self.rope_theta:
            object.__setattr__(self, "rope_local_theta", 0.0)

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's attention window (0 = full causal attention)."""
        return tuple(0 if i in self.full_attention_layers else self.sliding_window for i in range(self.n_layers))

    def _check_adapters(self):
        if isinstance(self.adapter_names, str):
            raise errors.ConfigError(
                f"model.adapter_names must be a tuple of names, not the string {self.adapter_names!r}.")
        # JSON metadata and ConfigDicts hand back lists; a tuple keeps the config hashable.
        object.__setattr__(self, "adapter_names", tuple(self.adapter_names))
        names, placement = self.adapter_names, self.adapter_placement
        if placement not in ADAPTER_SITES:
            raise errors.ConfigError(
                f"model.adapter_placement must be one of {sorted(ADAPTER_SITES)}, not {placement!r}.")
        if self.adapter_activation not in ADAPTER_ACTIVATIONS:
            raise errors.ConfigError(f"model.adapter_activation must be one of {list(ADAPTER_ACTIVATIONS)}, "
                                     f"not {self.adapter_activation!r}.")
        bad = [n for n in names if not isinstance(n, str) or not _ADAPTER_NAME.fullmatch(n)]
        if bad:
            raise errors.ConfigError(
                f"model.adapter_names entries {bad} must use only letters, digits, '_' and '-'.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise errors.ConfigError(f"model.adapter_names lists {duplicates} more than once.")
        if placement == "none" and names:
            raise errors.ConfigError(
                f"model.adapter_names={list(names)} needs model.adapter_placement 'houlsby' or 'pfeiffer'.")
        if placement != "none" and not names:
            raise errors.ConfigError(
                f"model.adapter_placement={placement!r} needs at least one name in model.adapter_names.")
        if self.active_adapter and self.active_adapter not in names:
            raise errors.ConfigError(f"model.active_adapter={self.active_adapter!r} is not one of "
                                     f"model.adapter_names={list(names)} ('' runs the base model).")
        # The reduction only matters when adapters exist: a plain model of any width stays valid.
        reduction = self.adapter_reduction
        if placement != "none" and (not isinstance(reduction, int) or reduction < 1 or self.d_model % reduction):
            raise errors.ConfigError(f"model.adapter_reduction={reduction!r} must be a positive divisor of "
                                     f"model.d_model={self.d_model}.")

    @property
    def adapter_sites(self) -> tuple[str, ...]:
        """The sub-layers whose output goes through an adapter: ("attn", "mlp"), ("mlp",) or ()."""
        return ADAPTER_SITES[self.adapter_placement]

    @property
    def adapter_dim(self) -> int:
        """Bottleneck width d_model / reduction."""
        return self.d_model // self.adapter_reduction

    @classmethod
    def from_dict(cls, values: Any) -> "ModelConfig":
        return cls(**errors.dataclass_fields(cls, values, "model config"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def frozen_storage_dtype(self) -> str:
        """The dtype a frozen base is stored in (`frozen_dtype`, "auto" = the compute dtype)."""
        return self.dtype if self.frozen_dtype == "auto" else self.frozen_dtype

    def checkpoint_identity(self) -> dict[str, Any]:
        """The fields that define the function the params compute: a checkpoint restores only into a model with
        the same identity. Compute settings (dtype, attention kernel, remat, scan, active adapter) may change
        between runs. Without adapters the adapter fields are left out, and so are later fields at their defaults
        (windows, soft cap), so identities (and checkpoints) from before they existed still match; tuples become
        lists, as they come back from the JSON metadata."""
        identity = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in self.to_dict().items() if k not in COMPUTE_ONLY_FIELDS}
        if self.adapter_placement == "none":
            identity = {k: v for k, v in identity.items() if k not in ADAPTER_FIELDS}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in identity.items() if not (k in LATER_FIELDS and getattr(self, k) == defaults[k])}

    def without_adapters(self) -> "ModelConfig":
        """The same model with no bottleneck adapters: the base a run with adapters was built on."""
        return dataclasses.replace(self, **{f.name: f.default for f in dataclasses.fields(self)
                                            if f.name in ADAPTER_FIELDS})

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, h, k, hd = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
        attn = (d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.qkv_bias else 0)
                + (2 * hd if self.qk_norm else 0))
        per_layer = attn + 3 * d * f + (4 if self.family == "gemma" else 2) * d  # Gemma: post-sub-layer norms too
        total = self.n_layers * per_layer + d
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += self.vocab_size * d  # the LM head is a matmul like any other
        return total + self.num_adapter_params()

    def num_adapter_params(self) -> int:
        """All adapter sets: L · sets · sites · (2·D·D/r + D/r + D) (down and up matrices and their biases)."""
        if not self.adapter_sites:  # the reduction is not validated without adapters
            return 0
        d, b = self.d_model, self.adapter_dim
        return self.n_layers * len(self.adapter_names) * len(self.adapter_sites) * (2 * d * b + b + d)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight (q, k, v, o, gate, up, down and the LM head; forward 2 +
        backward 4) plus causal attention 12·T·H·Dh per layer (scores and values, counted in full: the PaLM
        convention), with T the window instead where a layer's window is shorter. The active adapter's down and up
        matrices count like the other weights."""
        d, hd = self.d_model, self.head_dim
        per_layer = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * self.d_ff
        if self.active_adapter:
            per_layer += len(self.adapter_sites) * 2 * d * self.adapter_dim
        matmul_weights = self.n_layers * per_layer + d * self.vocab_size
        context = sum(min(seq_len, window) if window else seq_len for window in self.layer_windows())
        attention = 12 * context * self.n_heads * hd
        return 6.0 * matmul_weights + attention


# `active_adapter` picks which adapter set runs: outputs change, the parameter tree does not.
COMPUTE_ONLY_FIELDS = ("dtype", "frozen_dtype", "attention", "remat", "scan_layers", "active_adapter")
# `flaxalign.models.attention`; the names of earlier versions are still read from old checkpoints' configs.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
LEGACY_ATTENTION = {"jnp": "xla", "dot_product": "xla"}
# Fields added after checkpoints existed: left out of the identity at their defaults.
LATER_FIELDS = ("sliding_window", "full_attention_layers", "attn_softcap", "qk_norm", "family",
                "query_pre_attn_scalar", "rope_local_theta", "final_softcap")
# The module families; `models.families.FAMILIES` maps each to its module, HF tensor table and config mapping.
FAMILIES = ("llama", "gemma", "phi3")
ADAPTER_FIELDS = ("adapter_placement", "adapter_reduction", "adapter_activation", "adapter_names", "active_adapter")
# placement -> the sub-layers (in layer order) whose output passes through an adapter before the residual add
ADAPTER_SITES = {"none": (), "houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
ADAPTER_ACTIVATIONS = ("relu", "silu", "gelu")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# `models.remat.POLICIES` plus "none", spelled here so that reading a config needs no JAX (a test checks they agree)
REMAT_POLICIES = ("none", "minimal", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: each jit compiles in seconds.
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256,
                 tie_embeddings=True),
    # Benchmarks on CPU.
    "small": dict(vocab_size=8000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=1536, max_seq_len=1024),
    # Real shapes (HF config.json values).
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                         max_seq_len=8192, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True,
                         init_std=0.041666666666666664),
    # Llama-3.2-1B shapes (HF config.json values): the ~1B accelerator benchmark model.
    "llama3_2_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                        max_seq_len=131072, rope_theta=500000.0, rms_eps=1e-5, tie_embeddings=True,
                        rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                      max_seq_len=8192, rope_theta=500000.0, rms_eps=1e-5),
    "llama3_1_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                        max_seq_len=131072, rope_theta=500000.0, rms_eps=1e-5, rope_scaling_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192),
    # Qwen3 shapes (HF config.json values): q/k RMSNorm, head_dim 128 ≠ d_model / n_heads on the 0.6B.
    "qwen3_0_6b": dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=3072,
                       head_dim=128, max_seq_len=40960, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=True,
                       qk_norm=True),
    "qwen3_8b": dict(vocab_size=151936, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=12288,
                     head_dim=128, max_seq_len=40960, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True),
    # Gemma 3 shapes (HF config.json values, google/gemma-3-270m and -1b): MQA, head_dim 256, windows of 512 on
    # five layers of six (every 6th global), RoPE 1e6 global / 1e4 local, query_pre_attn_scalar 256 (= head_dim).
    "gemma3_270m": dict(family="gemma", vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
                        d_ff=2048, head_dim=256, max_seq_len=32768, rope_theta=1000000.0, rope_local_theta=10000.0,
                        rms_eps=1e-6, tie_embeddings=True, qk_norm=True, query_pre_attn_scalar=256.0,
                        sliding_window=512, full_attention_layers=(5, 11, 17)),
    "gemma3_1b": dict(family="gemma", vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                      d_ff=6912, head_dim=256, max_seq_len=32768, rope_theta=1000000.0, rope_local_theta=10000.0,
                      rms_eps=1e-6, tie_embeddings=True, qk_norm=True, query_pre_attn_scalar=256.0,
                      sliding_window=512, full_attention_layers=(5, 11, 17, 23)),
    # Gemma 2 shapes (config.json values of google/gemma-2-2b and -9b, from memory; see BUILD_NOTES): no q/k norms,
    # one RoPE base, windows of 4096 on the even layers (odd ones global), soft caps 50 (attention) / 30 (logits).
    "gemma2_2b": dict(family="gemma", vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                      d_ff=9216, head_dim=256, max_seq_len=8192, rope_theta=10000.0, rms_eps=1e-6,
                      tie_embeddings=True, query_pre_attn_scalar=256.0, sliding_window=4096,
                      full_attention_layers=tuple(range(1, 26, 2)), attn_softcap=50.0, final_softcap=30.0),
    "gemma2_9b": dict(family="gemma", vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8,
                      d_ff=14336, head_dim=256, max_seq_len=8192, rope_theta=10000.0, rms_eps=1e-6,
                      tie_embeddings=True, query_pre_attn_scalar=256.0, sliding_window=4096,
                      full_attention_layers=tuple(range(1, 42, 2)), attn_softcap=50.0, final_softcap=30.0),
    # Phi-3-mini-4k-instruct shapes (its config.json, from memory; = Phi3Config's defaults): MHA, a 2047-token
    # window on every layer, fused qkv / gate_up tensors in HF files (`models.phi3`).
    "phi3_mini": dict(family="phi3", vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=8192, max_seq_len=4096, rope_theta=10000.0, rms_eps=1e-5, sliding_window=2047),
    "qwen2_7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                     max_seq_len=32768, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True),
}


def preset(name: str) -> dict[str, Any]:
    """The field values of a named preset, as a new dict."""
    if name not in PRESETS:
        raise errors.ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name])
