"""Before/after benches (`grpo_step.py`, `generate_ab.py`): the trees run in turns and the best round of each counts,
since this CPU's speed swings between minutes."""


def best_of_rounds(trees: dict, rounds: int, run, key: str) -> dict:
    """{name: the result of `run(name, tree, round_)` with the smallest `result[key]`}, over `rounds` rounds in each
    of which every tree of `trees` ({name: path}) runs once, in order."""
    best = {}
    for round_ in range(rounds):
        for name, tree in trees.items():
            result = run(name, tree, round_)
            if name not in best or result[key] < best[name][key]:
                best[name] = result
    return best
