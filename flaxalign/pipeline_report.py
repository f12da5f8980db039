"""The pipeline's `report.md`: per-stage cost, plots, the evaluation of base/SFT/PPO/DPO and the PPO-vs-DPO table
(the textbook's §5.4.4 summary, with measured numbers: mean ± std over seeds)."""

import json
import math
import os

from flaxalign.train import plots, report

# eval.json `metrics` keys (flaxalign/eval/evaluation.py)
WIN_RATE, SCORE, KL = "win_rate/win_rate_ties_half", "reward/score_mean", "kl/mean"
# (row label, eval.json key, format) of the per-policy evaluation table, in order.
EVAL_ROWS = (
    ("RM win rate vs SFT (ties ½)", WIN_RATE, "{:.3f}"),
    ("RM wins / ties / losses vs SFT", ("win_rate/win_rate", "win_rate/tie_rate", "win_rate/loss_rate"),
     "{:.2f} / {:.2f} / {:.2f}"),
    ("RM score (normalised)", SCORE, "{:.3f}"),
    ("KL to SFT (nats / response)", KL, "{:.2f}"),
    ("response length (tokens)", "policy/response_tokens_mean", "{:.1f}"),
    ("EOS rate", "policy/eos_rate", "{:.2f}"),
    ("distinct-2", "diversity/distinct_2", "{:.3f}"),
    ("self-BLEU", "diversity/self_bleu", "{:.3f}"),
    ("exact-answer accuracy", "exact_match/accuracy", "{:.3f}"),
    ("perplexity (held-out text)", "perplexity/perplexity", "{:.1f}"),
    ("multiple-choice accuracy", "mc/acc", "{:.3f}"),
)


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


def _eval_metrics(path: str) -> dict:
    """The numeric `metrics` of an eval.json ({} when the evaluation has not run); null (non-finite) values left out."""
    result = _read_json(path) or {}
    return {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, int | float)}


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


def write_pipeline_report(workdir: str, seeds: int) -> str:
    names = {"ppo": [f"ppo_s{s}" for s in range(seeds)], "dpo": [f"dpo_s{s}" for s in range(seeds)]}
    summaries = {name: report.read_summary(os.path.join(workdir, name)) or {}
                 for name in ["clm", "sft", "reward", *names["ppo"], *names["dpo"]]}
    evals = {name: _eval_metrics(os.path.join(workdir, "eval", name, "eval.json"))
             for name in ["clm", "sft", *names["ppo"], *names["dpo"]]}
    metrics = {name: _metrics(os.path.join(workdir, name)) for name in summaries}
    figures = _figures(workdir, metrics, evals, names)

    lines = ["# flaxalign pipeline report", "",
             (f"Workdir `{os.path.abspath(workdir)}`; PPO and DPO ran with {seeds} seed(s) from the same SFT "
              "checkpoint; every policy is evaluated on the same held-out prompts against SFT's responses, judged by "
              "the pipeline's reward model."), "", "## Stages", "",
             "| stage | steps | wall-clock (s) | model FLOPs | peak RSS (MB) | final train loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, summary in summaries.items():
        losses = [r["loss"] for r in metrics[name] if "loss" in r]
        lines.append(f"| {name} | {summary.get('final_step', '—')} | {summary.get('seconds', math.nan):.0f} | "
                     f"{summary.get('flops', math.nan):.3g} | {summary.get('peak_rss_mb', math.nan):.0f} | "
                     + (f"{losses[-1]:.4f} |" if losses else "— |"))

    lines += ["", "## Evaluation (held-out prompts; reference = SFT)", "",
              "| metric | base (CLM) | SFT | PPO | DPO |", "|---|---:|---:|---:|---:|"]
    for label, key, fmt in EVAL_ROWS:
        row = [_cell(evals["clm"], key, fmt), _cell(evals["sft"], key, fmt)]
        for method in ("ppo", "dpo"):
            if isinstance(key, tuple):
                row.append(_cell(evals[names[method][0]], key, fmt) + (" (seed 0)" if seeds > 1 else ""))
            else:
                row.append(_pm([evals[n].get(key) for n in names[method]], fmt))
        lines.append(f"| {label} | " + " | ".join(row) + " |")

    lines += ["", "## PPO vs DPO (§5.4.4, measured)", "", "| aspect | PPO (RLHF) | DPO |", "|---|---|---|",
              "| uses a reward model | yes (scores every rollout) | no (only to evaluate here) |",
              "| policy rollouts during training | yes | no |",
              "| optimisation | clipped policy gradient + value model | direct likelihood (logistic loss) |"]
    for label, key, fmt in (("RM win rate vs SFT (ties ½)", WIN_RATE, "{:.3f}"),
                            ("RM score (normalised)", SCORE, "{:.3f}"),
                            ("KL to SFT (nats / response)", KL, "{:.2f}")):
        lines.append(f"| {label} | " + " | ".join(
            _pm([evals[n].get(key) for n in names[m]], fmt) for m in ("ppo", "dpo")) + " |")
    for label, key, fmt in (("wall-clock (s)", "seconds", "{:.0f}"), ("model FLOPs", "flops", "{:.3g}"),
                            ("peak memory (RSS, MB)", "peak_rss_mb", "{:.0f}")):
        lines.append(f"| {label} | " + " | ".join(
            _pm([summaries[n].get(key) for n in names[m]], fmt) for m in ("ppo", "dpo")) + " |")
    spread = []
    for m in ("ppo", "dpo"):
        rates = [evals[n].get(WIN_RATE) for n in names[m]]
        rates = [r for r in rates if r is not None]
        spread.append(f"{max(rates) - min(rates):.3f} (min {min(rates):.3f}, max {max(rates):.3f})" if rates else "—")
    lines.append(f"| stability: win-rate spread over {seeds} seed(s) | {spread[0]} | {spread[1]} |")

    lines += ["", "## Plots", ""] + [f"![{title}]({os.path.basename(path)})" for title, path in figures]
    lines += ["", "Per-stage reports: `*/report.md`; logs: `logs/`; evaluation results: `eval/*/eval.json`.", ""]
    out = os.path.join(workdir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return out


def _figures(workdir: str, metrics: dict, evals: dict, names: dict) -> list[tuple[str, str]]:
    figures = []

    def add(title, path):
        if path:
            figures.append((title, path))

    add("loss curves", plots.plot_runs(
        os.path.join(workdir, "loss_curves.png"),
        {n: metrics[n] for n in ("clm", "sft", "reward", names["dpo"][0]) if metrics.get(n)},
        ["loss"], title="training loss per stage (DPO: seed 0)"))
    add("PPO reward and KL", plots.plot_runs(
        os.path.join(workdir, "ppo_reward_kl.png"), {n: metrics[n] for n in names["ppo"]},
        [("score (train / held-out)", "score"), ("KL to SFT", "kl"), ("rlhf_reward", "rlhf_reward")],
        title="PPO"))
    add("DPO margins and accuracy", plots.plot_runs(
        os.path.join(workdir, "dpo_margins.png"), {n: metrics[n] for n in names["dpo"]},
        [("reward margin", "rewards/margins"), ("preference accuracy", "rewards/accuracies"), ("KL", "kl")],
        title="DPO"))
    series = {}
    for method in ("ppo", "dpo"):
        points = [(evals[n][KL], evals[n][SCORE]) for n in names[method] if KL in evals[n] and SCORE in evals[n]]
        if points:
            series[f"{method.upper()} (one point per seed)"] = ([p[0] for p in points], [p[1] for p in points])
    joined = {label: False for label in series}
    for name in names["ppo"]:
        points = [(r["eval_kl"], r["eval_score"]) for r in metrics.get(name, [])
                  if "eval_kl" in r and "eval_score" in r]
        if points:
            series[f"{name} during training"] = ([p[0] for p in points], [p[1] for p in points])
    for name, label in (("sft", "SFT"), ("clm", "base (CLM)")):
        if KL in evals[name] and SCORE in evals[name]:
            series[label] = ([evals[name][KL]], [evals[name][SCORE]])
            joined[label] = False
    if series:
        add("reward vs KL frontier", plots.plot_xy(
            os.path.join(workdir, "frontier.png"), series, xlabel="KL(policy ‖ SFT), nats / response",
            ylabel="RM score (normalised)", title="reward-vs-KL frontier",
            lines={label: joined.get(label, True) for label in series}))
    return figures
