"""The short markdown report written at the end of every run."""

import json
import os
import resource

from flaxalign.train import plots


def write_report(workdir: str, config, result, seconds: float) -> str:
    rows = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval_") for k in r)]
    throughput = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec") is not None]
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    lines = [f"# flaxalign {config.stage} run", "",
             f"- workdir: `{os.path.abspath(workdir)}`",
             f"- steps: {result.final_step} of {config.steps}" + (" (stopped by SIGTERM)" if result.preempted else ""),
             f"- wall-clock: {seconds:.1f} s"]
    if train_rows:
        lines.append(f"- train loss: {_number(train_rows[0]['loss'])} (step {train_rows[0]['step']}) → "
                     f"{_number(train_rows[-1]['loss'])} (step {train_rows[-1]['step']})")
    if eval_rows and "eval_loss" in eval_rows[-1]:
        last = eval_rows[-1]
        perplexity = f", perplexity {_number(last['eval_perplexity'], '.2f')}" if "eval_perplexity" in last else ""
        lines.append(f"- eval loss: {_number(last['eval_loss'])}{perplexity} (step {last['step']})")
    if throughput:
        mfu = f", MFU {100 * sorted(mfus)[len(mfus) // 2]:.1f}% (median)" if mfus else ""
        lines.append(f"- throughput: {sorted(throughput)[len(throughput) // 2]:,.0f} tokens/s (median){mfu}")
    if eval_rows:
        lines += eval_table(eval_rows[0], eval_rows[-1])
    files = "`metrics.jsonl`, `tensorboard/`, `checkpoints/`, `config.json`"
    curves = plots.plot_curves(os.path.join(workdir, "curves.png"), rows,
                               plots.STAGE_PANELS.get(config.stage, ("loss",)),
                               title=f"{config.stage}: {os.path.basename(os.path.abspath(workdir))}")
    if curves:
        lines += ["", "![training curves](curves.png)"]
        files += ", `curves.png`"
    lines += ["", f"Files: {files}.", ""]
    out = os.path.join(workdir, "report.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    return out


SUMMARY_FILE = "run_summary.json"


def write_summary(workdir: str, config, result, seconds: float, flops_per_step: float) -> dict:
    """`run_summary.json`: whether the run reached `config.steps`, its wall-clock (summed over resumed invocations),
    FLOPs (flops_per_step × steps, the model FLOPs of the whole run) and this process's peak resident memory."""
    path = os.path.join(workdir, SUMMARY_FILE)
    previous = read_summary(workdir) or {}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    summary = {"stage": config.stage, "final_step": result.final_step, "steps": config.steps,
               "finished": result.final_step >= config.steps and not result.preempted,
               "seconds": previous.get("seconds", 0.0) + seconds, "flops": flops_per_step * result.final_step,
               "peak_rss_mb": max(previous.get("peak_rss_mb", 0.0), peak_mb)}
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return summary


def read_summary(workdir: str) -> dict | None:
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def eval_table(first: dict, last: dict) -> list[str]:
    """Every held-out metric at the first and the last evaluation, as a markdown table."""
    names = [k for k in last if k.startswith("eval_")]
    lines = ["", f"| held-out metric | step {first['step']} | step {last['step']} |", "|---|---:|---:|"]
    for name in names:
        before = _number(first[name]) if name in first else "—"
        lines.append(f"| {name[5:]} | {before} | {_number(last[name])} |")
    return lines


def _number(value, spec: str = ".4f") -> str:
    """A metric for the report; metrics.jsonl holds non-finite values as null."""
    return "non-finite" if value is None else format(value, spec)
