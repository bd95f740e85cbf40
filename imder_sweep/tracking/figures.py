"""The pictures a sweep logs, drawn from arrays with matplotlib's object API (no pyplot state, so
trials in threads or Ray processes cannot draw into each other's figures).

- `embed_recovered` + `recovered_vs_true_figure`: t-SNE of recovered vs true pooled features per
  missing modality (paper Fig. 3).
- `sentiment_figure`: the recovered features coloured by the 7 sentiment classes, one row per
  model (conditional vs unconditional recovery, paper Fig. 4).
- `history_figure`, `importance_figure`: a study's Optuna history and parameter importances.
- `sampler_curve_figure`: validation metric against NFE per solver after training.
- `pareto_figure`: a multi-objective search's trials on its first two objectives, the Pareto
  set joined and labelled with each point's searched values, the chosen point starred.
- `metric_vs_mr_figure`, `metrics_vs_mr_figure`: a metric (or Acc2 / F1 / Acc7 side by side)
  against the missing rate, one line per configuration (the chosen one and its variants), mean
  over seeds with a band of ± one std as the tables compute them.
- `robustness_figure`: per configuration, a heat map of a test metric, trained at each study
  (rows) and tested at each test MR (columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from imder_sweep.metrics import sentiment_classes
from imder_sweep.modalities import MODALITIES, MODALITY_NAMES
from imder_sweep.stats import mean_std

# Points per t-SNE embedding, recovered and true together: t-SNE is quadratic-ish, and 500
# points embed in about 2 s on one core.
MAX_TSNE_POINTS = 500
TSNE_SEED = 0
# Below this many samples per side t-SNE has nothing to show (perplexity must stay < n).
MIN_TSNE_SAMPLES = 4
SENTIMENT_CLASSES = tuple(range(-3, 4))
PANEL_INCHES = 4.0
DPI = 100
TABLE_METRICS = {"acc2": "Acc2", "f1": "F1", "acc7": "Acc7"}  # key -> the tables' name
METRIC_NAMES = {**TABLE_METRICS, "mae": "MAE", "corr": "Corr"}  # TABLE_METRICS in percent
_RECOVERED, _TRUE = "tab:orange", "tab:blue"


@dataclass(frozen=True)
class Embedding:
    """2-D t-SNE coordinates of one missing modality's recovered (n, 2) and true (n, 2) pooled
    features, row for row the same samples, with their sentiment labels (n,)."""

    recovered: np.ndarray
    true: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class SummaryPoint:
    """One method at one missing rate: per-seed test scores as fractions, e.g.
    {"acc2": [0.78, 0.79], ...} (a `imder_sweep.sweep.tables.Row`'s `test`)."""

    method: str
    mr: float
    values: Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class RobustnessMatrix:
    """One configuration's test metric (fractions), trained at each of `trained` (rows: the
    studies' labels) and tested at each of `test_mrs` (columns); NaN where nothing ran."""

    trained: Sequence[str]
    test_mrs: Sequence[float]
    values: np.ndarray  # (len(trained), len(test_mrs))


def _tsne(points: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One OpenMP thread: on a shared 2-core machine sklearn's spinning threads made a 1000-point
    # embedding 8x slower than a single thread.
    with threadpool_limits(limits=1):
        return TSNE(
            n_components=2,
            perplexity=float(min(30.0, (len(points) - 1) / 3)),
            init="pca",
            random_state=TSNE_SEED,
        ).fit_transform(points)


def embed_recovered(table: pa.Table, max_points: int = MAX_TSNE_POINTS) -> dict[str, Embedding]:
    """One joint t-SNE of recovered and true pooled features per missing modality of a
    recovered-features table (`imder_sweep.consistency.write_recovered_parquet`). At most
    `max_points` / 2 samples per modality, drawn with a fixed seed; modalities with fewer than
    `MIN_TSNE_SAMPLES` samples are left out."""
    modality = np.asarray(table.column("modality").to_pylist())
    labels = table.column("label").to_numpy()
    pooled = {
        side: np.asarray(table.column(f"{side}_pooled").to_pylist(), dtype=np.float64)
        for side in ("recovered", "true")
    }
    rng = np.random.default_rng(TSNE_SEED)
    out = {}
    for m in MODALITIES:
        rows = np.flatnonzero(modality == m)
        if len(rows) < MIN_TSNE_SAMPLES:
            continue
        if len(rows) > max_points // 2:
            rows = np.sort(rng.choice(rows, max_points // 2, replace=False))
        xy = _tsne(np.concatenate([pooled["recovered"][rows], pooled["true"][rows]]))
        out[m] = Embedding(recovered=xy[: len(rows)], true=xy[len(rows) :], labels=labels[rows])
    return out


def _panel_title(m: str, n: int) -> str:
    return f"{MODALITY_NAMES[m]} missing (n={n})"


def recovered_vs_true_figure(embeddings: Mapping[str, Embedding], title: str) -> Figure:
    """Paper Fig. 3: per missing modality, recovered and true features in one t-SNE plane."""
    fig = Figure(
        figsize=(PANEL_INCHES * max(len(embeddings), 1), PANEL_INCHES + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    if not embeddings:
        fig.text(0.5, 0.5, "no missing modality with enough samples", ha="center")
        return fig
    for ax, (m, emb) in zip(
        fig.subplots(1, len(embeddings), squeeze=False)[0], embeddings.items(), strict=True
    ):
        ax.scatter(*emb.true.T, s=8, c=_TRUE, alpha=0.7, label="true")
        ax.scatter(*emb.recovered.T, s=8, c=_RECOVERED, alpha=0.7, label="recovered")
        ax.set_title(_panel_title(m, len(emb.labels)))
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[0].legend(loc="best", fontsize="small")
    return fig


def sentiment_figure(sources: Mapping[str, Mapping[str, Embedding]], title: str) -> Figure:
    """Paper Fig. 4: recovered features coloured by sentiment class, one row per model (e.g.
    "conditional", "unconditional"), one column per missing modality."""
    modalities = [m for m in MODALITIES if any(m in emb for emb in sources.values())]
    fig = Figure(
        figsize=(PANEL_INCHES * max(len(modalities), 1), PANEL_INCHES * max(len(sources), 1) + 0.8),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    if not modalities:
        fig.text(0.5, 0.5, "no missing modality with enough samples", ha="center")
        return fig
    cmap = _class_colours()
    axes = fig.subplots(len(sources), len(modalities), squeeze=False)
    for row, (source, embeddings) in zip(axes, sources.items(), strict=True):
        for ax, m in zip(row, modalities, strict=True):
            ax.set_xticks([])
            ax.set_yticks([])
            if m not in embeddings:
                ax.set_title(f"{MODALITY_NAMES[m]} missing: too few samples")
                continue
            emb = embeddings[m]
            classes = sentiment_classes(emb.labels)  # Acc7's 7 classes
            for k in SENTIMENT_CLASSES:
                picked = classes == k
                if picked.any():
                    ax.scatter(*emb.recovered[picked].T, s=10, color=cmap[k])
            ax.set_title(_panel_title(m, len(classes)))
        row[0].set_ylabel(source, fontsize="large")
    handles = [
        Line2D([], [], marker="o", linestyle="", color=cmap[k], label=f"{k:+d}")
        for k in SENTIMENT_CLASSES
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(SENTIMENT_CLASSES), title="sentiment"
    )
    return fig


def _class_colours() -> dict[int, tuple[float, ...]]:
    import matplotlib

    ramp = matplotlib.colormaps["coolwarm"].resampled(len(SENTIMENT_CLASSES))
    return {k: ramp(i) for i, k in enumerate(SENTIMENT_CLASSES)}


def history_figure(
    numbers: Sequence[int], values: Sequence[float], *, direction: str, metric: str, title: str
) -> Figure:
    """Objective value per finished trial and the best value so far (Optuna's history plot)."""
    fig = Figure(figsize=(7.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    order = np.argsort(numbers)
    x = np.asarray(numbers)[order]
    y = np.asarray(values, dtype=float)[order]
    best = np.minimum.accumulate(y) if direction == "minimize" else np.maximum.accumulate(y)
    ax.scatter(x, y, s=18, label=metric)
    ax.step(x, best, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


def importance_figure(importances: Mapping[str, float], *, metric: str, title: str) -> Figure:
    """Horizontal bars of parameter importances (fANOVA), most important on top."""
    names = sorted(importances, key=importances.__getitem__)
    fig = Figure(figsize=(7.0, 1.2 + 0.4 * len(names)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel(f"importance for {metric}")
    ax.set_title(title)
    return fig


def _metric_vs_mr(ax: Axes, points: Sequence[SummaryPoint], metric: str) -> None:
    """One line per method, in the order the points name them: the mean over seeds and a band
    of ± one std (`imder_sweep.stats.mean_std`, the tables' rule: no band for a single seed,
    no point where a seed has no value)."""
    scale = 100.0 if metric in TABLE_METRICS else 1.0
    for method in dict.fromkeys(p.method for p in points):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.mr)
        stats = scale * np.asarray([mean_std(p.values.get(metric, [])) for p in mine])  # (M, 2)
        x = [p.mr for p in mine]
        (line,) = ax.plot(x, stats[:, 0], marker="o", label=method)
        low, high = stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1]
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    unit = " (%)" if metric in TABLE_METRICS else ""
    ax.set_xlabel("missing rate")
    ax.set_ylabel(f"{METRIC_NAMES[metric]}{unit}")
    ax.set_title(METRIC_NAMES[metric])
    ax.grid(alpha=0.3)


def metric_vs_mr_figure(points: Sequence[SummaryPoint], metric: str, title: str) -> Figure:
    """One metric against the missing rate, one line per method with its seed band."""
    fig = Figure(figsize=(PANEL_INCHES + 2.0, PANEL_INCHES + 0.4), dpi=DPI, layout="constrained")
    fig.suptitle(title)
    ax = fig.subplots()
    _metric_vs_mr(ax, points, metric)
    ax.legend(loc="best")
    return fig


def metrics_vs_mr_figure(points: Sequence[SummaryPoint], title: str) -> Figure:
    """Acc2 / F1 / Acc7 (%) against the missing rate side by side, as `metric_vs_mr_figure`."""
    fig = Figure(
        figsize=(PANEL_INCHES * len(TABLE_METRICS), PANEL_INCHES + 0.4),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    for ax, metric in zip(fig.subplots(1, len(TABLE_METRICS)), TABLE_METRICS, strict=True):
        _metric_vs_mr(ax, points, metric)
    fig.axes[0].legend(loc="best")
    return fig


def robustness_figure(
    matrices: Mapping[str, RobustnessMatrix], metric: str, title: str, xlabel: str = "test MR"
) -> Figure:
    """One heat map per configuration (trained at the rows, tested at the columns: `xlabel`,
    the test MR or another protocol's parameter), on one colour scale so configurations
    compare by colour; each cell annotated with its value."""
    scale = 100.0 if metric in TABLE_METRICS else 1.0
    grids = {name: scale * m.values for name, m in matrices.items()}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()] or [np.empty(0)])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    first = next(iter(matrices.values()))
    width = 1.2 + 0.7 * len(first.test_mrs)
    fig = Figure(
        figsize=(width * len(matrices) + 1.0, 1.6 + 0.45 * len(first.trained)),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    image = None
    for ax, (name, m) in zip(axes, matrices.items(), strict=True):
        image = ax.imshow(grids[name], cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        for (i, j), v in np.ndenumerate(grids[name]):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize="small", color="w")
        ax.set_xticks(range(len(m.test_mrs)), [f"{mr:g}" for mr in m.test_mrs])
        ax.set_yticks(range(len(m.trained)), list(m.trained))
        ax.set_xlabel(xlabel)
        ax.set_title(name)
    axes[0].set_ylabel("trained at")
    fig.colorbar(image, ax=list(axes), label=METRIC_NAMES[metric])
    return fig


@dataclass(frozen=True)
class ParetoPanel:
    """One study of a multi-objective search, at each trial's best epoch."""

    study: str
    names: tuple[str, str]  # the first two objectives
    points: Sequence[tuple[float, float]]  # every finished trial
    front: Sequence[tuple[float, float, str]]  # the Pareto set: x, y, its searched values
    chosen: tuple[float, float] | None


def pareto_figure(panels: Sequence[ParetoPanel], title: str) -> Figure:
    """Each study: every trial on (first, second objective), the Pareto set as a line with its
    parameters beside each point, the configuration the final stage retrains as a star."""
    fig = Figure(
        figsize=((PANEL_INCHES + 1.5) * max(len(panels), 1), PANEL_INCHES + 0.8),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=False):
        if panel.points:
            ax.scatter(*zip(*panel.points, strict=True), s=14, c="0.6", label="trials")
        front = sorted(panel.front)
        if front:
            xs, ys = [p[0] for p in front], [p[1] for p in front]
            ax.plot(xs, ys, "o-", c="tab:blue", ms=5, label="Pareto set")
            for x, y, text in front:
                ax.annotate(text, (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
        if panel.chosen is not None:
            ax.plot(*panel.chosen, "*", c="tab:red", ms=14, label="final.pick")
        ax.set_title(panel.study)
        ax.set_xlabel(panel.names[0])
        ax.set_ylabel(panel.names[1])
        ax.legend(loc="best", fontsize=7)
    return fig


def sampler_curve_figure(choices: Mapping[str, Mapping], title: str) -> Figure:
    """Per study (a `sweep.sampler_choice` record): the validation metric against NFE per
    sample, one line per solver with the seed sd as error bars, the training sampler as a
    square and the pick as a star."""
    fig = Figure(
        figsize=((PANEL_INCHES + 1.0) * max(len(choices), 1), PANEL_INCHES + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    fig.suptitle(title)
    axes = fig.subplots(1, max(len(choices), 1), squeeze=False)[0]
    for ax, (study, choice) in zip(axes, choices.items(), strict=False):
        for solver in dict.fromkeys(p["solver"] for p in choice["grid"]):
            pts = [p for p in choice["grid"] if p["solver"] == solver]
            sds = [p["sd"] if p["sd"] == p["sd"] else 0.0 for p in pts]
            ax.errorbar([p["nfe_per_sample"] for p in pts], [p["mean"] for p in pts], yerr=sds,
                        marker="o", ms=4, capsize=2, label=solver)  # fmt: skip
        for role, marker in (("training", "s"), ("picked", "*")):
            p = choice[role]
            ax.plot(p["nfe_per_sample"], p["mean"], marker, c="k", ms=10 if marker == "*" else 7,
                    mfc="none" if marker == "s" else "gold",
                    label=f"{role}: {p['solver']} x {p['steps']}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(study)
        ax.set_xlabel("NFE per sample (log)")
        ax.set_ylabel(choice["metric"])
        ax.legend(loc="best", fontsize=7)
    return fig
