"""PNG curves of a run's `metrics.jsonl` (matplotlib, Agg backend: no display needed).

A figure has one panel per metric name `m`; a panel draws every series present among `m` (training),
`eval_m`, `eval_m_sampled` and `eval_m_greedy` against the step.
"""

import math

# The panels each stage's report shows, in order; names a run did not log are skipped.
STAGE_PANELS = {
    "clm": ("loss", "grad_norm"),
    "sft": ("loss", "grad_norm"),
    "reward": ("loss", "accuracy", "margin"),
    "dpo": ("loss", "rewards/margins", "rewards/accuracies", "kl"),
    "ppo": ("score", "kl", "rlhf_reward", "response_length", "policy_loss", "value_loss"),
    "grpo": ("reward", "response_length", "kl", "policy_loss", "frac_reward_zero_std"),
}


def panel_series(rows: list[dict], name: str) -> dict[str, tuple[list, list]]:
    """{series label: (steps, values)} of the panel for metric `name` (empty when the run logged none of them)."""
    series = {}
    for key in (name, f"eval_{name}", f"eval_{name}_sampled", f"eval_{name}_greedy"):
        points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if points:
            series[key] = ([s for s, _ in points], [v for _, v in points])
    return series


def plot_curves(path: str, rows: list[dict], panels, title: str = "") -> str | None:
    """Writes a PNG with one panel per metric name in `panels` that the rows have; returns the path, or None when
    there is nothing to draw."""
    return plot_runs(path, {"": rows}, panels, title)


def plot_runs(path: str, runs: dict[str, list[dict]], panels, title: str = "") -> str | None:
    """Like `plot_curves` for several runs at once (e.g. one per seed): each panel overlays every run's series,
    labelled "run: series"; a panel is `(title, metric name)` with the run names as keys of `runs`, `(title, metric
    name, run names)` to draw only those runs, or just a metric name. Returns the path, or None when there is
    nothing to draw."""
    drawn = []
    for panel in panels:
        panel_title, name, *only = panel if isinstance(panel, tuple) else (panel, panel)
        series = {}
        for run, rows in runs.items():
            if only and run not in only[0]:
                continue
            for label, points in panel_series(rows, name).items():
                series[f"{run}: {label}" if run else label] = points
        if series:
            drawn.append((panel_title, series))
    if not drawn:
        return None
    plt = _pyplot()
    columns = min(3, len(drawn))
    grid_rows = math.ceil(len(drawn) / columns)
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.2 * columns, 3.2 * grid_rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, drawn, strict=False):
        for label, (steps, values) in series.items():
            ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_xy(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
            lines: bool | dict = True) -> str:
    """One panel of named (x, y) series, e.g. a reward-vs-KL frontier; `lines` False draws points only (a dict
    {label: bool} chooses per series)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, (xs, ys) in series.items():
        joined = lines.get(label, True) if isinstance(lines, dict) else lines
        ax.plot(xs, ys, marker="o", markersize=4 if joined else 7, linestyle="-" if joined else "none", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot
