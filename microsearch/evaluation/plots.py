"""Plotly figures, written as self-contained HTML. plotly is imported lazily: nothing else needs it."""

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path


def sweep_figure(rows: list[dict]):
    """Accuracy vs pruning ratio and accuracy vs audited score, one line per method."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs pruning ratio", "accuracy vs score"))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for i, (method, points) in enumerate(sorted(by_method.items())):
        points = sorted(points, key=lambda r: r["ratio"])
        color = _PALETTE[i % len(_PALETTE)]
        common = {"name": method, "legendgroup": method, "mode": "lines+markers", "line": {"color": color}}
        fig.add_scatter(x=[p["ratio"] for p in points], y=[p["val_acc"] for p in points], row=1, col=1, **common)
        fig.add_scatter(
            x=[p["score"] for p in points],
            y=[p["val_acc"] for p in points],
            text=[f"ratio {p['ratio']:.2f}" for p in points],
            showlegend=False,
            row=1,
            col=2,
            **common,
        )
    fig.update_xaxes(title_text="pruning ratio", row=1, col=1)
    fig.update_xaxes(title_text="score (lower is better)", row=1, col=2)
    fig.update_yaxes(title_text="validation accuracy", tickformat=".0%")
    fig.update_layout(title="Pruning sweep", template="plotly_white", height=480)
    return fig


def write_html(fig, path: str | Path) -> Path:
    """Write ``fig`` as one HTML file that needs no network (plotly.js embedded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def export_html(html: str | Path, out: str | Path, width: int = 1280, height: int = 720) -> Path:
    """Render ``html`` in headless Chromium (the system's ``chromium``) to ``out``: a PDF when it
    ends in .pdf, else a PNG screenshot of ``width`` x ``height`` pixels. For readers without a
    browser at hand; plotly.js runs before the page is captured."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise RuntimeError("exporting to PDF or PNG needs Chromium on the PATH (apt-get install chromium)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    target = f"--print-to-pdf={out}" if out.suffix == ".pdf" else f"--screenshot={out}"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-pdf-header-footer"]
    args += [f"--window-size={width},{height}", "--virtual-time-budget=10000", target, Path(html).resolve().as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"Chromium could not export {html}: {done.stderr.strip()[-300:]}")
    return out


_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]


def pareto_figure(
    points: list[dict], target: float, title: str, trial_target: float | None = None, final: dict | None = None
):
    """Accuracy vs score of every completed trial, the target lines, the feasible front highlighted.

    Each point: ``number``, ``score``, ``val_acc``, ``feasible`` and a ``text`` shown on hover.
    ``trial_target``: what a trial must reach at its short budget (its own line where it differs
    from ``target``, the final model's). ``final``: the retrained final model (``score``,
    ``val_acc``, ``text``), drawn apart from the trials it came from.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for feasible, name, color in ((True, "feasible", "#1f77b4"), (False, "infeasible", "#bbbbbb")):
        group = [p for p in points if p["feasible"] == feasible]
        fig.add_scatter(
            x=[p["score"] for p in group],
            y=[p["val_acc"] for p in group],
            mode="markers",
            name=name,
            marker={"color": color, "size": 9},
            text=[p["text"] for p in group],
            hovertemplate="%{text}<extra></extra>",
        )
    front = pareto_front(points)
    fig.add_scatter(
        x=[p["score"] for p in front],
        y=[p["val_acc"] for p in front],
        mode="lines+markers",
        name="feasible Pareto front",
        line={"color": "#d62728", "shape": "hv"},
        marker={"color": "#d62728", "size": 11, "symbol": "star"},
        text=[p["text"] for p in front],
        hovertemplate="%{text}<extra></extra>",
    )
    if final is not None:
        fig.add_scatter(
            x=[final["score"]],
            y=[final["val_acc"]],
            mode="markers",
            name="final model (retrained)",
            marker={"color": "#ff7f0e", "size": 16, "symbol": "diamond", "line": {"color": "black", "width": 1}},
            text=[final["text"]],
            hovertemplate="%{text}<extra></extra>",
        )
    if trial_target is not None and trial_target != target:
        fig.add_hline(
            y=trial_target,
            line_dash="dot",
            line_color="#9467bd",
            annotation_text=f"trial target {trial_target:.0%} (trial budget)",
            annotation_position="bottom right",
        )
        label = f"final target {target:.0%} (retrained model)"
    else:
        label = f"target {target:.0%}"
    fig.add_hline(y=target, line_dash="dash", line_color="#2ca02c", annotation_text=label)
    fig.update_layout(
        title=title,
        xaxis_title="score (lower is better)",
        yaxis_title="validation accuracy",
        yaxis_tickformat=".0%",
        template="plotly_white",
        height=560,
    )
    return fig


def pareto_front(points: list[dict]) -> list[dict]:
    """Feasible points that no other feasible point beats on both score and accuracy."""
    front, best_acc = [], -1.0
    for p in sorted((p for p in points if p["feasible"]), key=lambda p: (p["score"], -p["val_acc"])):
        if p["val_acc"] > best_acc:
            front.append(p)
            best_acc = p["val_acc"]
    return front
