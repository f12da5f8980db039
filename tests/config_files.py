"""The stage config files (`configs/*.py`) loaded the way `flaxalign train --config=FILE:PRESET` loads them, for
tests that call the stages' own code paths in-process."""

import importlib.util
import os

import ml_collections

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def stage_config(stage: str, values: dict | None = None, preset: str = "tiny") -> ml_collections.ConfigDict:
    """`configs/STAGE.py:PRESET` with `values` ("a.b" keys) set, locked like the CLI's --config (so a misspelt
    field fails instead of adding a field nothing reads)."""
    spec = importlib.util.spec_from_file_location(f"config_{stage}", os.path.join(CONFIGS, f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.lock()
    for key, value in (values or {}).items():
        *parents, leaf = key.split(".")
        block = config
        for parent in parents:
            block = block[parent]
        block[leaf] = value
    return config
