"""Algorithm math as small pure functions (equations in the docstrings)."""

from flaxalign.losses.lm import chunked_token_kl, chunked_token_logps, sequence_logps, token_cross_entropy
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
from flaxalign.losses.rl import (
    GRPO_LOSS_TYPES,
    gae_advantages,
    grpo_advantages,
    grpo_policy_loss,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    rloo_advantages,
)

__all__ = [
    "chunked_token_kl",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "bradley_terry_loss",
    "chunked_token_logps",
    "cpo_loss",
    "dpo_loss",
    "gae_advantages",
    "grpo_advantages",
    "grpo_policy_loss",
    "kl_penalty",
    "kto_kl",
    "kto_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_rewards",
    "ppo_value_loss",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
    "token_cross_entropy",
]
