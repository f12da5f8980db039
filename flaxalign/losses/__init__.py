"""Algorithm math as small pure functions (equations in the docstrings)."""

from flaxalign.losses.lm import chunked_token_logps, sequence_logps, token_cross_entropy
from flaxalign.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "bradley_terry_loss",
    "chunked_token_logps",
    "cpo_loss",
    "dpo_loss",
    "kto_kl",
    "kto_loss",
    "orpo_loss",
    "sequence_logps",
    "simpo_loss",
    "token_cross_entropy",
]
