"""The layering DESIGN §8 asks for, checked on the source: stages never branch on the PEFT method (full, LoRA,
adapters, a quantized base — `policy.TrainableModel` decides), stages are peers that import no other stage, and
`generate`, `convert`, `eval` and `weights` read weights without going through `stages`."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flaxalign")
STAGES_DIR = os.path.join(ROOT, "stages")
STAGE_MODULES = ("clm", "sft", "reward", "dpo", "ppo", "grpo")  # the peers; lm, onpolicy, checks are shared helpers
# Words that name a PEFT method or what it decides; a condition that reads one of them is a method branch.
METHOD_WORDS = ("lora", "adapter", "quant", "frozen_base", "peft")


def _source(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), path)


def _names(node: ast.AST) -> set[str]:
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            out.add(sub.value)
    return out


def _method_branches(tree: ast.Module) -> list[str]:
    """`if` / conditional-expression / comprehension conditions that read a PEFT-method word."""
    found = []
    for node in ast.walk(tree):
        tests = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = node.ifs
        for test in tests:
            words = {w for w in _names(test) for m in METHOD_WORDS if m in w.lower()}
            if words:
                found.append(f"line {test.lineno}: {ast.unparse(test)}")
    return found


@pytest.mark.parametrize("module", sorted(f for f in os.listdir(STAGES_DIR) if f.endswith(".py")))
def test_stages_never_branch_on_the_peft_method(module):
    assert _method_branches(_source(os.path.join(STAGES_DIR, module))) == []


def test_the_branch_detector_finds_a_method_branch():
    tree = ast.parse("if lora_config is not None:\n    pass\nx = a if policy.frozen_base else b\n"
                     "y = [p for p in ps if p.adapter_placement != 'none']\n")
    assert len(_method_branches(tree)) == 3


def _imported_modules(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_stages_are_peers_that_import_no_other_stage(stage):
    imported = _imported_modules(_source(os.path.join(STAGES_DIR, f"{stage}.py")))
    others = {f"flaxalign.stages.{s}" for s in STAGE_MODULES if s != stage}
    assert not imported & others


@pytest.mark.parametrize("module", ["generate.py", "convert.py", "weights.py", "policy.py",
                                    os.path.join("eval", "evaluation.py")])
def test_weights_are_read_without_going_through_stages(module):
    imported = _imported_modules(_source(os.path.join(ROOT, module)))
    assert not [m for m in imported if m == "flaxalign.stages" or m.startswith("flaxalign.stages.")]
