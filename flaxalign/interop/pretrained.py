"""Pretrained weights outside flaxalign as a weights source: `hf:DIR` (a transformers model directory) or
`gguf:FILE` (a llama.cpp file).

`metadata(source)` gives what a stage reads from a run's metadata — the model config, the tokenizer path, the stage —
so `flaxalign.weights` treats runs and pretrained weights alike, and `initializer` creates the weights directly in
the stage's shardings.
"""

import json
import os

import jax

from flaxalign import errors
from flaxalign.interop import hf

KINDS = ("hf", "gguf")
STAGE = "pretrained"  # the `stage` of a pretrained source's metadata


def is_pretrained(source: str) -> bool:
    return source.partition(":")[0] in KINDS


def check_exists(source: str) -> None:
    kind, _, path = source.partition(":")
    if kind == "hf" and not os.path.isdir(path):
        raise errors.ConfigError(f"init_from={source!r}: {path!r} is not a directory (an HF model directory).")
    if kind == "gguf" and not os.path.isfile(path):
        raise errors.ConfigError(f"init_from={source!r}: {path!r} is not a file (a .gguf file).")


def metadata(source: str) -> dict:
    """{"stage": "pretrained", "model": config dict, "tokenizer": path or "", "chat_template": name or "",
    "hf_source": ...} of an `hf:` or `gguf:` source, read without loading the weights. The template is named when the
    directory's tokenizer_config.json holds one of flaxalign's own (`chat.JINJA`, as `convert` exports a run), so that
    runs, `generate` and `eval` on an export use the template the run trained with. `hf_source`
    (`hf.SOURCE_FIELD`: `hf_config.source_fields`) is what an HF export of the model, or of a run started from it
    (runs inherit it: `weights.inherited_metadata`), needs to write the same architecture class, ids and windows."""
    check_exists(source)
    kind, _, path = source.partition(":")
    stage = STAGE
    if kind == "hf":
        hf_config = hf.read_hf_config(path)
        config = hf.model_config_from_hf(hf_config)
        tokenizer = _tokenizer_in(path)
        hf_source = hf.source_fields(hf_config)
        if hf.is_score_model(hf_config):
            stage = "reward"  # a *ForSequenceClassification model: usable as PPO's / GRPO's reward_from
    else:
        # imported here: the gguf package is needed only for GGUF files
        from flaxalign.interop import gguf

        config = gguf.read_model_config(path)
        tokenizer = path  # the vocabulary is in the file's metadata
        hf_source = hf.gguf_source_fields(_gguf_architecture(path))
    return {"stage": stage, "model": config.to_dict(), "tokenizer": tokenizer, "source": source,
            "chat_template": _exported_template(path) if kind == "hf" else "", hf.SOURCE_FIELD: hf_source}


def _gguf_architecture(path: str) -> str:
    """A GGUF file's `general.architecture` (the file is known to be readable: its model config was read)."""
    import gguf  # the package (flaxalign.interop.gguf is not imported under this name here)

    return gguf.GGUFReader(path, "r").get_field("general.architecture").contents()


def _exported_template(directory: str) -> str:
    """The name of the flaxalign chat template whose Jinja is the directory's tokenizer_config.json's, or ""."""
    from flaxalign.data.chat import JINJA

    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            jinja = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return ""
    return next((name for name, text in JINJA.items() if text == jinja), "")


def _tokenizer_in(directory: str) -> str:
    """The tokenizer `load_tokenizer` reads from an HF directory: the directory (tokenizer.json), its SentencePiece
    tokenizer.model, or "" when it has neither."""
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    sentencepiece = os.path.join(directory, "tokenizer.model")
    return sentencepiece if os.path.isfile(sentencepiece) else ""


def load_pretrained(path: str, *, dtype: str = "auto", mesh: jax.sharding.Mesh | None = None,
                    quantizer=None) -> hf.Pretrained:
    """`hf.load_pretrained` of an HF directory, or `gguf.load_gguf` of a path ending in `.gguf` (a llama.cpp file,
    not a directory): the same `hf.Pretrained` either way (see those two for `dtype`, `mesh` and `quantizer`)."""
    if str(path).endswith(".gguf") and not os.path.isdir(path):
        # imported here: the gguf package is needed only for GGUF files
        from flaxalign.interop import gguf

        return gguf.load_gguf(path, dtype=dtype, mesh=mesh, quantizer=quantizer)
    return hf.load_pretrained(path, dtype=dtype, mesh=mesh, quantizer=quantizer)


def initializer(source: str, drop: tuple = ()):
    """`init_base(shardings, quantizer=None) -> params` reading the source's weights (less the top-level params in
    `drop`) straight into `shardings`; with a `quantizer` (`peft.quant.LayerwiseQuantizer`) the layer weights are
    quantized as they are read, one layer at a time."""
    path = source.partition(":")[2]

    def init_base(shardings, quantizer=None):
        mesh = jax.tree.leaves(shardings)[0].mesh
        params = load_pretrained(path, mesh=mesh, quantizer=quantizer).params
        params = {k: v for k, v in params.items() if k not in drop}
        return jax.device_put(params, shardings)

    init_base.quantizes = True
    return init_base


def reward_initializer(source: str, drop: tuple = ()):
    """`init(shardings) -> {"model": backbone, "head": head}` of an `hf:` `*ForSequenceClassification` reward
    model, read once."""
    path = source.partition(":")[2]

    def init(shardings):
        mesh = jax.tree.leaves(shardings)[0].mesh
        loaded = load_pretrained(path, mesh=mesh)
        if loaded.head is None:
            raise errors.ConfigError(f"{source} is a causal LM, not a reward model (*ForSequenceClassification).")
        model = {k: v for k, v in loaded.params.items() if k not in drop}
        return jax.device_put({"model": model, "head": loaded.head}, shardings)

    return init
