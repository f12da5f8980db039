"""One module per algorithm: its loss wiring, its pure train step, its batches and its eval.

`STAGES` maps `config.stage` to its `description.Stage`: `describe(config, mesh)`, the stage before data (what
`flaxalign plan` compiles), and `build_task(config, workdir, mesh)`, the same with its data (what training runs).
"""

from flaxalign.stages import clm, distill, dpo, grpo, online_dpo, ppo, reward, sft
from flaxalign.stages.description import Stage

STAGES = {name: Stage(module.describe, module.build_task) for name, module in (
    ("clm", clm), ("sft", sft), ("reward", reward), ("dpo", dpo), ("ppo", ppo), ("grpo", grpo),
    ("online_dpo", online_dpo), ("distill", distill))}
