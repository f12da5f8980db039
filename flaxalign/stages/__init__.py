"""One module per algorithm: its loss wiring, its pure train step, its batches and its eval.

`STAGES` maps `config.stage` to a `build_task(config, workdir, mesh) -> Task` function.
"""

from flaxalign.stages import clm, sft

STAGES = {"clm": clm.build_task, "sft": sft.build_task}
