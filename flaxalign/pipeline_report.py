"""The pipeline's `report.md`: per-stage cost, the evaluation of base / SFT / every method against SFT judged by the
gold judges (the exact-answer checker, a gold reward model) beside the proxy reward model PPO optimised, the methods
table (the textbook's §5.4.4 summary, with measured numbers: mean ± std over seeds), example answers, and plots."""

import json
import math
import os

from flaxalign.train import plots, report

# eval.json `metrics` keys (flaxalign/eval/evaluation.py)
WIN_RATE, SCORE, KL = "win_rate/win_rate_ties_half", "reward/score_mean", "kl/mean"
GREEDY, SAMPLED = "exact_match/greedy_accuracy", "exact_match/accuracy"
EXACT_WIN, GOLD_WIN, GOLD_SCORE = "exact_match/win_win_rate_ties_half", "gold_win_rate/win_rate_ties_half", \
    "gold/score_mean"
# (row label, eval.json key, format) of the per-policy evaluation table, in order: the gold judges first.
EVAL_ROWS = (
    ("**exact-answer accuracy, greedy** (gold)", GREEDY, "{:.3f}"),
    ("**exact-answer accuracy, sampled** (gold)", SAMPLED, "{:.3f}"),
    ("exact-answer win rate vs SFT (gold, ties ½)", EXACT_WIN, "{:.3f}"),
    ("gold RM win rate vs SFT (ties ½)", GOLD_WIN, "{:.3f}"),
    ("proxy RM win rate vs SFT (ties ½)", WIN_RATE, "{:.3f}"),
    ("proxy RM wins / ties / losses vs SFT", ("win_rate/win_rate", "win_rate/tie_rate", "win_rate/loss_rate"),
     "{:.2f} / {:.2f} / {:.2f}"),
    ("proxy RM score (normalised)", SCORE, "{:.3f}"),
    ("gold RM score (normalised)", GOLD_SCORE, "{:.3f}"),
    ("KL to SFT (nats / response)", KL, "{:.2f}"),
    ("response length (tokens)", "policy/response_tokens_mean", "{:.1f}"),
    ("EOS rate", "policy/eos_rate", "{:.2f}"),
    ("distinct-2", "diversity/distinct_2", "{:.3f}"),
    ("self-BLEU", "diversity/self_bleu", "{:.3f}"),
    ("perplexity of the eval preset's text_files (tiny: the CLM's own text)", "perplexity/perplexity", "{:.1f}"),
    ("multiple-choice accuracy", "mc/acc", "{:.3f}"),
)
# What a method is, for the methods table: (its reward signal, rollouts while training, how it optimises)
METHOD_FACTS = {
    "ppo": ("the proxy reward model scores every rollout", "yes", "clipped policy gradient + value model, KL penalty"),
    "dpo": ("none (the pairs themselves)", "no", "logistic loss on log-ratio margins (+ chosen NLL with RPO)"),
    "grpo": ("the exact-answer checker", "yes (a group per prompt)", "clipped policy gradient, group-relative "
             "advantages"),
}
# (title, metric) of a method's training-curve panel
METHOD_CURVES = {"ppo": ("proxy RM score (train / eval)", "score"), "dpo": ("DPO loss", "loss"),
                 "grpo": ("exact-answer accuracy", "exact_answer")}


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _eval(path: str) -> tuple[dict, list]:
    """The numeric `metrics` and the `examples` of an eval.json ({}, [] when the evaluation has not run); null
    (non-finite) values left out."""
    result = _read_json(path) or {}
    metrics = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, int | float)}
    return metrics, result.get("examples", [])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _pm(values: list[float], fmt: str = "{:.3f}") -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "—"
    return f"{fmt.format(mean)} ± {fmt.format(std)}" if len(values) > 1 else fmt.format(mean)


def _cell(result: dict, key, fmt: str) -> str:
    keys = key if isinstance(key, tuple) else (key,)
    if not all(k in result for k in keys):
        return "—"
    return fmt.format(*(result[k] for k in keys))


def _label(method: str) -> str:
    return method.upper()


def write_pipeline_report(workdir: str, seeds: int, methods, judges=("reward", "gold_reward"),
                          base: str = "clm") -> str:
    """Writes W/report.md (and its plots) from the runs and evaluations under W; returns its path. `judges`: the
    reward models the pipeline trained ("reward" = the proxy, "gold_reward"); `base`: the base model's run name,
    "clm" (pretrained by the pipeline) or "base" (pretrained weights, evaluated only)."""
    names = {m: [f"{m}_s{s}" for s in range(seeds)] for m in methods}
    policies = [n for m in methods for n in names[m]]
    trained = [base] if base == "clm" else []
    summaries = {name: report.read_summary(os.path.join(workdir, name)) or {}
                 for name in [*trained, "sft", *judges, *policies]}
    evals, examples = {}, {}
    for name in [base, "sft", *policies]:
        evals[name], examples[name] = _eval(os.path.join(workdir, "eval", name, "eval.json"))
    metrics = {name: _metrics(os.path.join(workdir, name)) for name in summaries}
    figures = _figures(workdir, metrics, evals, names, trained + ["sft", *judges])
    columns = ["base (CLM)" if base == "clm" else "base (pretrained)", "SFT"] + [_label(m) for m in methods]
    gold = ", a gold reward model trained on pairs drawn with another seed" if "gold_reward" in judges else ""
    proxy = " and by the proxy reward model that PPO optimised" if "reward" in judges else ""
    lines = ["# flaxalign pipeline report", "",
             (f"Workdir `{os.path.abspath(workdir)}`; {', '.join(_label(m) for m in methods)} ran with {seeds} "
              "seed(s) from the same SFT checkpoint; every policy answers the same evaluation prompts, and its answers "
              f"are judged against SFT's by the gold judges (the exact-answer checker{gold}){proxy}."
              + (" Where the proxy's verdict rises and the gold judges' does not, the policy learnt the proxy's blind "
                 "spots (reward over-optimisation)." if proxy else "")),
             "", "## Stages", "",
             "| stage | steps | wall-clock (s) | model FLOPs | peak RSS (MB) | final train loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, summary in summaries.items():
        losses = [r["loss"] for r in metrics[name] if "loss" in r]
        lines.append(f"| {name} | {summary.get('final_step', '—')} | {summary.get('seconds', math.nan):.0f} | "
                     f"{summary.get('flops', math.nan):.3g} | {summary.get('peak_rss_mb', math.nan):.0f} | "
                     + (f"{losses[-1]:.4f} |" if losses else "— |"))

    lines += ["", "## Evaluation (evaluation prompts; reference = SFT; mean ± std over seeds)", "",
              "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, key, fmt in EVAL_ROWS:
        row = [_cell(evals[base], key, fmt), _cell(evals["sft"], key, fmt)]
        for method in methods:
            if isinstance(key, tuple):
                row.append(_cell(evals[names[method][0]], key, fmt) + (" (seed 0)" if seeds > 1 else ""))
            else:
                row.append(_pm([evals[n].get(key) for n in names[method]], fmt))
        if all(cell.startswith("—") for cell in row):
            continue  # a judge or metric this pipeline did not have
        lines.append(f"| {label} | " + " | ".join(row) + " |")

    lines += ["", "## Gain over SFT on the ground truth (exact-answer accuracy, points)", "",
              "| method | greedy: mean ± std | greedy: mean − std | sampled: mean ± std | sampled: mean − std |",
              "|---|---:|---:|---:|---:|"]
    for method in methods:
        cells = []
        for key in (GREEDY, SAMPLED):
            gains = [100 * (evals[n][key] - evals["sft"][key]) for n in names[method]
                     if key in evals[n] and key in evals["sft"]]
            mean, std = mean_std(gains)
            cells += ["—", "—"] if math.isnan(mean) else [f"{mean:+.1f} ± {std:.1f}", f"{mean - std:+.1f}"]
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + " |")

    lines += _methods_table(methods, names, evals, summaries, metrics, seeds)
    lines += _examples_table(methods, names, examples)
    lines += ["", "## Plots", ""] + [f"![{title}]({os.path.basename(path)})" for title, path in figures]
    lines += ["", "Per-stage reports: `*/report.md`; logs: `logs/`; evaluation results: `eval/*/eval.json`.", ""]
    out = os.path.join(workdir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return out


def _methods_table(methods, names, evals, summaries, metrics, seeds) -> list[str]:
    lines = ["", "## " + " vs ".join(_label(m) for m in methods) + " (§5.4.4, measured)", "",
             "| aspect | " + " | ".join(_label(m) for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for i, label in enumerate(("reward signal", "policy rollouts during training", "optimisation")):
        lines.append(f"| {label} | " + " | ".join(METHOD_FACTS.get(m, ("—",) * 3)[i] for m in methods) + " |")
    for label, key, fmt in (("exact-answer accuracy, greedy (gold)", GREEDY, "{:.3f}"),
                            ("gold RM win rate vs SFT (ties ½)", GOLD_WIN, "{:.3f}"),
                            ("proxy RM win rate vs SFT (ties ½)", WIN_RATE, "{:.3f}"),
                            ("KL to SFT (nats / response)", KL, "{:.2f}")):
        cells = [_pm([evals[n].get(key) for n in names[m]], fmt) for m in methods]
        if any(cell != "—" for cell in cells):  # a judge this pipeline did not have
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    held_out = [_pm([_last(metrics[n], "eval_rewards/accuracies") for n in names[m]]) for m in methods]
    if any(cell != "—" for cell in held_out):
        lines.append("| held-out pair accuracy (implicit reward, the run's last evaluation) | " + " | ".join(held_out)
                     + " |")
    for label, key, fmt in (("wall-clock (s)", "seconds", "{:.0f}"), ("model FLOPs", "flops", "{:.3g}"),
                            ("peak memory (RSS, MB)", "peak_rss_mb", "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(
            _pm([summaries[n].get(key) for n in names[m]], fmt) for m in methods) + " |")
    spread = []
    for m in methods:
        values = [evals[n][GREEDY] for n in names[m] if GREEDY in evals[n]]
        spread.append(f"{max(values) - min(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"
                      if values else "—")
    lines.append(f"| stability: greedy-accuracy spread over {seeds} seed(s) | " + " | ".join(spread) + " |")
    return lines


def _last(rows: list[dict], key: str):
    """The last logged value of `key` in a run's metrics rows, or None."""
    return next((row[key] for row in reversed(rows) if key in row), None)


def _examples_table(methods, names, examples) -> list[str]:
    """Each evaluation prompt's expected answer, SFT's answer and each method's (seed 0), as sampled in evaluation."""
    shown = examples["sft"]
    if not shown:
        return []
    lines = ["", "## Example answers (sampled; seed 0)", "",
             "| prompt | answer | SFT | " + " | ".join(_label(m) for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    def text(name, i):
        rows = examples.get(name) or []
        return cell(rows[i]["response"]) if i < len(rows) else "—"

    for i, example in enumerate(shown):
        lines.append(f"| {cell(example['prompt'])} | {cell(example.get('answer', '—'))} | {text('sft', i)} | "
                     + " | ".join(text(names[m][0], i) for m in methods) + " |")
    return lines


def _figures(workdir: str, metrics: dict, evals: dict, names: dict, stages: list[str]) -> list[tuple[str, str]]:
    """The report's plots: `stages` are the trained runs before the methods (clm?, sft, the reward models)."""
    figures = []

    def add(title, path):
        if path:
            figures.append((title, path))

    panels = [panel for panel in (("CLM loss", "loss", ["clm"]), ("SFT loss", "loss", ["sft"]),
                                  ("reward model loss", "loss", ["reward"]),
                                  ("reward model accuracy", "accuracy", ["reward"])) if panel[2][0] in stages]
    for m in names:
        title, metric = METHOD_CURVES.get(m, ("loss", "loss"))
        panels.append((f"{_label(m)}: {title}", metric, names[m]))
    runs = [n for n in stages if n != "gold_reward"] + [n for m in names for n in names[m]]
    add("training curves, one panel per stage (methods: every seed)", plots.plot_runs(
        os.path.join(workdir, "stage_curves.png"), {n: metrics.get(n, []) for n in runs}, panels))
    if "ppo" in names:
        add("PPO reward and KL", plots.plot_runs(
            os.path.join(workdir, "ppo_reward_kl.png"), {n: metrics[n] for n in names["ppo"]},
            [("score (train / held-out)", "score"), ("KL to SFT", "kl"), ("rlhf_reward", "rlhf_reward")],
            title="PPO"))
    if "dpo" in names:
        add("DPO margins and accuracy", plots.plot_runs(
            os.path.join(workdir, "dpo_margins.png"), {n: metrics[n] for n in names["dpo"]},
            [("reward margin", "rewards/margins"), ("preference accuracy", "rewards/accuracies"), ("KL", "kl")],
            title="DPO"))
    for path, key, ylabel, title in (
            ("frontier.png", None, "RM score (normalised)", "reward vs KL: proxy and gold RM"),
            ("accuracy_frontier.png", GREEDY, "exact-answer accuracy (greedy)", "ground truth vs KL")):
        series = _frontier(evals, names, key)
        if series:
            add(title, plots.plot_xy(os.path.join(workdir, path), series, xlabel="KL(policy ‖ SFT), nats / response",
                                     ylabel=ylabel, title=title, lines=False))
    return figures


def _frontier(evals: dict, names: dict, key) -> dict:
    """{label: (KLs, values)}: one point per seed of each method, and SFT; `key` None = the proxy and gold RM scores
    (two series per policy), else that metric. The base model is left out: its KL to SFT (tens of nats) would squeeze
    the policies into one corner."""
    keys = [(SCORE, "proxy RM"), (GOLD_SCORE, "gold RM")] if key is None else [(key, "")]
    groups = {_label(m): names[m] for m in names} | {"SFT": ["sft"]}
    series = {}
    for label, runs in groups.items():
        for metric, judge in keys:
            points = [(evals[n][KL], evals[n][metric]) for n in runs if KL in evals[n] and metric in evals[n]]
            if points:
                series[f"{label} {judge}".strip()] = ([p[0] for p in points], [p[1] for p in points])
    return series
