"""Ablation reports: every ``results.json`` below a folder as one table and plot.

Rows are recipes (``quant+stages`` x ``transform``), columns are models; a cell is
the perplexity and its ratio to the same model's dynamic per-token run of the same
stages (same weight and activation formats, ``dynamic: true``, preferably without a
transform). Failed runs are listed with their error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from loguru import logger

__all__ = [
    "RunRow",
    "collect_runs",
    "add_reference_ratios",
    "write_csv",
    "markdown_report",
    "plot_ppl",
    "plot_spike_ratios",
    "write_report",
]

# Quant fields that must match between a run and its dynamic reference.
# RunRow fields kept out of results.csv (tuples and per-layer lists).
_NOT_IN_CSV = (
    "format_key",
    "spike_ratio_before",
    "spike_ratio_after",
    "tasks",
    "correct",
)
_FORMAT_KEYS = (
    "weight_bits",
    "weight_type",
    "weight_strategy",
    "group_size",
    "activation_bits",
    "activation_type",
)


@dataclass
class RunRow:
    """One run, flattened for the report.

    :param model: model spec
    :param recipe: ``quant+stages`` of a composed recipe, else the recipe given
    :param transform: transform name (``-`` for a recipe given as YAML)
    :param status: ``ok`` or ``failed``
    :param ppl: perplexity (``None`` for failed runs)
    :param ratio: ``ppl`` over the reference run's (``None`` without one)
    :param reference: the reference run's ``recipe / transform``
    :param dynamic: whether activations were quantized per token at run time
    :param error: the error of a failed run
    :param path: the ``results.json`` it came from
    :param spike_ratio_before: per decoder layer, the peak token ratio of the
        linears' inputs in the FP model
    :param spike_ratio_after: the same for the quantized linears after oneshot
    :param accuracy: lm-eval zero-shot accuracy, mean over ``tasks``
    :param accuracy_stderr: its standard error, sqrt(sum of the tasks' se^2) / n
    :param tasks: per lm-eval task, ``{"acc": ..., "acc_stderr": ...}``
    :param correct: per task, each document's 0/1 score (paired comparisons)
    :param greedy_agreement: share of greedy tokens equal to the FP model's
    """

    model: str
    recipe: str
    transform: str
    status: str
    ppl: float | None = None
    ratio: float | None = None
    reference: str | None = None
    dynamic: bool | None = None
    quant: str | None = None
    stages: str | None = None
    oneshot_seconds: float | None = None
    eval_seconds: float | None = None
    error: str | None = None
    path: str = ""
    format_key: tuple | None = None
    spike_ratio_before: list[float] | None = None
    spike_ratio_after: list[float] | None = None
    accuracy: float | None = None
    accuracy_stderr: float | None = None
    tasks: dict[str, dict] | None = None
    correct: dict[str, list[int]] | None = None
    greedy_agreement: float | None = None

    @property
    def label(self) -> str:
        return f"{self.recipe} / {self.transform}"


def collect_runs(root: Path) -> list[RunRow]:
    """Every ``results.json`` below ``root`` as rows (a later file of the same
    model and recipe replaces an earlier one, with a warning).

    :param root: a multirun folder (or any folder of runs)
    """
    rows: dict[tuple[str, str, str], RunRow] = {}
    for path in sorted(Path(root).rglob("results.json")):
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning(f"skipping {path}: {error}")
            continue
        row = _row(results, path)
        key = (row.model, row.recipe, row.transform)
        if key in rows:
            logger.warning(
                f"{row.label} on {row.model}: {path} replaces {rows[key].path}"
            )
        rows[key] = row
    if not rows:
        raise FileNotFoundError(f"No results.json below {root}")
    runs = list(rows.values())
    add_reference_ratios(runs)
    return runs


def add_reference_ratios(runs: list[RunRow]) -> None:
    """Set ``ratio`` and ``reference`` of every successful run that has a dynamic
    per-token run of the same model, stages and formats.

    :param runs: rows of :func:`collect_runs`
    """
    references: dict[tuple, RunRow] = {}
    for run in runs:
        if run.status != "ok" or not run.dynamic or run.format_key is None:
            continue
        key = (run.model, run.stages, run.format_key)
        if key not in references or run.transform == "none":
            references[key] = run
    for run in runs:
        reference = references.get((run.model, run.stages, run.format_key))
        if run.status == "ok" and reference is not None and reference.ppl and run.ppl:
            run.ratio = run.ppl / reference.ppl
            run.reference = reference.label


def write_csv(runs: list[RunRow], path: Path) -> None:
    """One line per run, every :class:`RunRow` field.

    :param runs: rows of :func:`collect_runs`
    :param path: the CSV file
    """
    names = [f.name for f in fields(RunRow) if f.name not in _NOT_IN_CSV]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            writer.writerow(asdict(run))


def markdown_report(runs: list[RunRow]) -> str:
    """A Markdown table (rows: recipe / transform, columns: models; cells: PPL,
    ratio to the dynamic per-token reference, oneshot seconds) and the list of
    failed runs.

    :param runs: rows of :func:`collect_runs`
    """
    models = sorted({run.model for run in runs})
    labels = sorted({(run.recipe, run.transform) for run in runs})
    cells = {(run.recipe, run.transform, run.model): run for run in runs}
    lines = [
        "| recipe | transform | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for recipe, transform in labels:
        row = [_cell(cells.get((recipe, transform, model))) for model in models]
        lines.append(f"| {recipe} | {transform} | " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n\nCells: WikiText-2 perplexity (ratio to the same "
    text += "model's dynamic per-token run of the same stages), oneshot wall time.\n"
    failed = [run for run in runs if run.status != "ok"]
    if failed:
        text += "\n## Failed runs\n\n"
        for run in failed:
            text += (
                f"- {run.model} | {run.label}: {_one_line(run.error)} ({run.path})\n"
            )
    return text


def plot_ppl(runs: list[RunRow], path: Path) -> None:
    """Bars of perplexity per recipe, one bar per transform (with / without
    SpikeFree), one panel per model.

    :param runs: rows of :func:`collect_runs`
    :param path: the PNG file
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [run for run in runs if run.status == "ok" and run.ppl]
    models = sorted({run.model for run in runs})
    recipes = sorted({run.recipe for run in runs})
    transforms = sorted({run.transform for run in runs})
    width = 0.8 / max(len(transforms), 1)
    figure, axes = plt.subplots(
        len(models),
        1,
        figsize=(max(6.0, 0.9 * len(recipes) + 2), 3.2 * len(models)),
        squeeze=False,
    )
    for axis, model in zip(axes[:, 0], models, strict=True):
        values = {(r.recipe, r.transform): r.ppl for r in ok if r.model == model}
        for index, transform in enumerate(transforms):
            heights = [values.get((recipe, transform), 0.0) for recipe in recipes]
            positions = [
                i + (index - (len(transforms) - 1) / 2) * width
                for i in range(len(recipes))
            ]
            bars = axis.bar(positions, heights, width, label=transform)
            labels = [f"{height:.4g}" if height else "" for height in heights]
            axis.bar_label(bars, labels=labels, fontsize=6)
        if values and max(values.values()) > 10 * min(values.values()):
            axis.set_yscale("log")
        axis.set_title(model)
        axis.set_ylabel("perplexity")
        axis.set_xticks(range(len(recipes)))
        axis.set_xticklabels(recipes, rotation=30, ha="right", fontsize=8)
        axis.legend(
            title="transform", fontsize=8, loc="upper left", bbox_to_anchor=(1, 1)
        )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_spike_ratios(runs: list[RunRow], path: Path) -> bool:
    """Per decoder layer, the peak token ratio of the quantized linears' inputs:
    the FP model before oneshot, and after it for each transform (its static
    ``w8a8`` RTN run when there is one, else its first static run). One panel per
    model, log scale.

    :param runs: rows of :func:`collect_runs`
    :param path: the PNG file
    :return: whether any run had ratios to plot (no file otherwise)
    """
    measured = [r for r in runs if r.status == "ok" and r.spike_ratio_after]
    if not measured:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({run.model for run in measured})
    figure, axes = plt.subplots(
        len(models), 1, figsize=(8, 3.4 * len(models)), squeeze=False
    )
    for axis, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in measured if r.model == model]
        before = mine[0].spike_ratio_before
        axis.plot(range(len(before)), before, "k-", lw=2, label="FP model (before)")
        for transform in sorted({r.transform for r in mine}):
            candidates = [r for r in mine if r.transform == transform and not r.dynamic]
            if not candidates:
                continue
            preferred = [r for r in candidates if r.recipe == "w8a8_static+rtn"]
            run = (preferred or candidates)[0]
            after = run.spike_ratio_after
            axis.plot(
                range(len(after)),
                after,
                marker="o",
                ms=3,
                label=f"after: {transform} ({run.recipe})",
            )
        axis.axhline(64, color="grey", ls=":", lw=1, label="ratio 64")
        axis.set_yscale("log")
        axis.set_title(model)
        axis.set_xlabel("decoder layer")
        axis.set_ylabel("max token max / median")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(
    root: Path, output_dir: Path | None = None
) -> tuple[list[RunRow], str]:
    """Collect the runs below ``root`` and write ``results.csv``, ``results.md``,
    ``ppl.png`` and (when runs measured them) ``spike_ratio.png`` and the
    zero-shot accuracy table (in ``results.md``) and ``accuracy.png``.

    :param root: a multirun folder
    :param output_dir: where the three files go (default: ``root``)
    :return: the rows and the Markdown text
    """
    output_dir = Path(output_dir or root)
    output_dir.mkdir(parents=True, exist_ok=True)
    from iq_transform.reports.zero_shot import accuracy_markdown, plot_accuracy

    runs = collect_runs(Path(root))
    text = markdown_report(runs)
    if accuracy := accuracy_markdown(runs):
        text += "\n" + accuracy
    write_csv(runs, output_dir / "results.csv")
    (output_dir / "results.md").write_text(f"# Results: {root}\n\n{text}")
    plot_ppl(runs, output_dir / "ppl.png")
    written = "results.csv, results.md, ppl.png"
    if plot_spike_ratios(runs, output_dir / "spike_ratio.png"):
        written += ", spike_ratio.png"
    if plot_accuracy(runs, output_dir / "accuracy.png"):
        written += ", accuracy.png"
    logger.info(f"wrote {written} to {output_dir}")
    return runs, text


def _row(results: dict, path: Path) -> RunRow:
    config = results.get("config") or {}
    composed = results.get("quant") is not None
    quant = config.get("quant") or {}
    return RunRow(
        model=str(results.get("model")),
        recipe=(
            f"{results['quant']}+{results.get('stages')}"
            if composed
            else str(results.get("recipe"))
        ),
        transform=str(results.get("transform")) if composed else "-",
        status=str(results.get("status", "ok")),
        ppl=results.get("ppl"),
        dynamic=quant.get("dynamic") if composed else None,
        quant=results.get("quant"),
        stages=results.get("stages"),
        oneshot_seconds=results.get("oneshot_seconds"),
        eval_seconds=results.get("eval_seconds"),
        error=results.get("error"),
        path=str(path),
        format_key=tuple(quant.get(k) for k in _FORMAT_KEYS) if composed else None,
        spike_ratio_before=results.get("spike_ratio_before"),
        spike_ratio_after=results.get("spike_ratio_after"),
        **_zero_shot_fields(results),
    )


def _zero_shot_fields(results: dict) -> dict:
    zero_shot = results.get("zero_shot") or {}
    generation = results.get("generation") or {}
    return {
        "accuracy": zero_shot.get("average"),
        "accuracy_stderr": zero_shot.get("average_stderr"),
        "tasks": zero_shot.get("tasks"),
        "correct": zero_shot.get("correct"),
        "greedy_agreement": generation.get("agreement"),
    }


def _cell(run: RunRow | None) -> str:
    if run is None:
        return ""
    if run.status != "ok":
        return "failed"
    if run.ppl is None:
        return "?"
    ratio = f" ({run.ratio:.3f}x)" if run.ratio is not None else ""
    seconds = f", {run.oneshot_seconds:.0f} s" if run.oneshot_seconds else ""
    return f"{run.ppl:.3f}{ratio}{seconds}"


def _one_line(text: str | None, limit: int = 300) -> str:
    line = " ".join((text or "unknown error").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
