"""Run curves: which series a panel draws, and that the PNG is written (or not, when there is nothing to draw)."""

import math
import types

from flaxalign.train import plots, report

ROWS = [
    {"step": 0, "eval_score": 0.1, "eval_kl": 0.0},
    {"step": 1, "loss": 2.0, "score": 0.5},
    {"step": 2, "loss": 1.5, "score": math.nan},
    {"step": 2, "eval_score": 0.4, "eval_kl": 1.5, "eval_reward_sampled": 0.2, "eval_reward_greedy": 0.3},
]


def test_panel_series_collects_train_eval_and_sampling_series_and_drops_non_finite():
    assert plots.panel_series(ROWS, "score") == {"score": ([1], [0.5]), "eval_score": ([0, 2], [0.1, 0.4])}
    assert plots.panel_series(ROWS, "reward") == {"eval_reward_sampled": ([2], [0.2]),
                                                  "eval_reward_greedy": ([2], [0.3])}
    assert plots.panel_series(ROWS, "value_loss") == {}


def test_plot_curves_writes_a_png_only_when_a_panel_has_data(tmp_path):
    path = plots.plot_curves(str(tmp_path / "c.png"), ROWS, ("score", "kl", "missing"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_curves(str(tmp_path / "none.png"), ROWS, ("missing",)) is None
    assert not (tmp_path / "none.png").exists()


def test_report_links_the_curves(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    config = types.SimpleNamespace(stage="sft", steps=2)
    result = types.SimpleNamespace(final_step=2, preempted=False)
    with open(report.write_report(str(tmp_path), config, result, 1.0)) as f:
        text = f.read()
    assert "![training curves](curves.png)" in text and (tmp_path / "curves.png").exists()
