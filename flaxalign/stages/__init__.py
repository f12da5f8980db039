"""One module per algorithm: its loss wiring, its pure train step, its batches and its eval.

`STAGES` maps `config.stage` to a `build_task(config, workdir, mesh) -> Task` function.
"""

from flaxalign.stages import clm, distill, dpo, grpo, online_dpo, ppo, reward, sft

STAGES = {"clm": clm.build_task, "sft": sft.build_task, "reward": reward.build_task, "dpo": dpo.build_task,
          "ppo": ppo.build_task, "grpo": grpo.build_task, "online_dpo": online_dpo.build_task,
          "distill": distill.build_task}
