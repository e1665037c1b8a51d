"""Zero-shot accuracy in the sweep report: per-task lm-eval accuracy and the
average beside perplexity, with standard errors, paired differences and a plot.

Every run of a sweep scores the same documents, so a difference between two runs is
measured pairwise: per task the mean of the per-document differences and its
standard error (the sample standard deviation of the differences over sqrt(n)),
averaged over tasks like the accuracies (se: sqrt(sum se^2) / number of tasks).
"""

from __future__ import annotations

import math
from pathlib import Path

from iq_transform.reports.sweep import RunRow

__all__ = [
    "accuracy_markdown",
    "paired_difference",
    "plot_accuracy",
    "summarize",
    "zero_shot_rows",
]

FP = "none / -"


def zero_shot_rows(runs: list[RunRow]) -> list[RunRow]:
    """The successful runs that measured lm-eval accuracy."""
    return [run for run in runs if run.status == "ok" and run.accuracy is not None]


def paired_difference(run: RunRow, reference: RunRow) -> tuple[float, float] | None:
    """``run``'s average accuracy minus ``reference``'s on the same documents, and
    the paired standard error; ``None`` when they scored different documents."""
    if not run.correct or not reference.correct:
        return None
    tasks = sorted(run.correct)
    if tasks != sorted(reference.correct):
        return None
    means, variances = [], []
    for task in tasks:
        a, b = run.correct[task], reference.correct[task]
        if len(a) != len(b) or not a:
            return None
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        mean = sum(diffs) / len(diffs)
        spread = sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)
        means.append(mean)
        variances.append(spread / len(diffs))
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(means)


def _references(runs: list[RunRow]) -> dict[str, dict[str, RunRow]]:
    """Per model, rows by label."""
    table: dict[str, dict[str, RunRow]] = {}
    for run in runs:
        table.setdefault(run.model, {})[run.label] = run
    return table


def _fp_row(rows: dict[str, RunRow]) -> RunRow | None:
    return rows.get(FP)


def accuracy_markdown(runs: list[RunRow]) -> str:
    """One table per model: rows are runs; columns perplexity, each task's
    accuracy, the average ± its standard error, the paired difference to the
    dynamic per-token reference and to the FP model (points ± se), and the
    greedy-token agreement with the FP model. Empty when no run measured it."""
    measured = zero_shot_rows(runs)
    if not measured:
        return ""
    by_model = _references(runs)
    text = "## Zero-shot accuracy (lm-eval)\n\n"
    for model in sorted({run.model for run in measured}):
        mine = sorted(
            (run for run in measured if run.model == model),
            key=lambda r: (r.recipe != "none", r.recipe, r.transform),
        )
        tasks = list(mine[0].tasks or {})
        docs = {task: (mine[0].tasks or {})[task].get("num_samples") for task in tasks}
        text += f"### {model}\n\n"
        text += (
            "| recipe | transform | PPL | "
            + " | ".join(tasks)
            + " | average | Δ dynamic | Δ FP | greedy = FP |\n"
        )
        text += "|---|---|---|" + "---|" * (len(tasks) + 4) + "\n"
        fp = _fp_row(by_model[model])
        for run in mine:
            reference = by_model[model].get(run.reference or "")
            cells = [
                f"{100 * (run.tasks or {})[task]['acc']:.1f}"
                if task in (run.tasks or {})
                else ""
                for task in tasks
            ]
            text += (
                f"| {run.recipe} | {run.transform} | "
                + (f"{run.ppl:.2f}" if run.ppl else "")
                + " | "
                + " | ".join(cells)
                + f" | {100 * run.accuracy:.2f} ± {100 * run.accuracy_stderr:.2f}"
                + f" | {_difference(run, reference)} | {_difference(run, fp)} | "
                + (
                    f"{100 * run.greedy_agreement:.0f} %"
                    if run.greedy_agreement is not None
                    else ""
                )
                + " |\n"
            )
        text += (
            "\nDocuments per task: "
            + ", ".join(f"{task} {count}" for task, count in docs.items())
            + ". Accuracy in %, `acc`; average ± sqrt(sum se²)/n over the tasks; "
            "Δ: paired difference in points on the same documents (± its se) to the "
            "dynamic per-token run of the same stages and to the FP model; greedy "
            "= FP: share of greedy tokens (KV cache) equal to the FP model's.\n\n"
        )
    return text


def _difference(run: RunRow, reference: RunRow | None) -> str:
    if reference is None or reference is run:
        return ""
    paired = paired_difference(run, reference)
    if paired is None:
        return ""
    mean, stderr = paired
    return f"{100 * mean:+.2f} ± {100 * stderr:.2f}"


def plot_accuracy(runs: list[RunRow], path: Path) -> bool:
    """Average zero-shot accuracy (± se) per run beside its perplexity, one panel
    per model.

    :return: whether any run measured accuracy (no file otherwise)
    """
    measured = zero_shot_rows(runs)
    if not measured:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({run.model for run in measured})
    figure, axes = plt.subplots(
        len(models), 2, figsize=(12, 0.4 * max(len(measured), 8) + 1), squeeze=False
    )
    for (left, right), model in zip(axes, models, strict=True):
        mine = [run for run in measured if run.model == model]
        labels = [run.label for run in mine]
        positions = range(len(mine))
        left.barh(
            positions,
            [100 * run.accuracy for run in mine],
            xerr=[100 * run.accuracy_stderr for run in mine],
            color="tab:blue",
        )
        left.set_yticks(list(positions))
        left.set_yticklabels(labels, fontsize=7)
        left.set_xlabel("average zero-shot accuracy (%), ± se")
        left.set_title(model)
        right.barh(positions, [run.ppl or 0.0 for run in mine], color="tab:orange")
        right.set_yticks(list(positions))
        right.set_yticklabels([])
        right.set_xlabel("WikiText-2 perplexity")
        if any(run.ppl for run in mine):
            values = [run.ppl for run in mine if run.ppl]
            if max(values) > 10 * min(values):
                right.set_xscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def summarize(root: Path) -> dict:
    """The sweep's zero-shot results as a small JSON-able dict (per model and
    run: perplexity, per-task accuracy with se, the average with se, the paired
    differences, the greedy check)."""
    from iq_transform.reports.sweep import collect_runs

    runs = collect_runs(Path(root))
    by_model = _references(runs)
    summary: dict = {"sweep": str(root), "models": {}}
    for run in zero_shot_rows(runs):
        reference = by_model[run.model].get(run.reference or "")
        fp = _fp_row(by_model[run.model])
        entry = {
            "recipe": run.recipe,
            "transform": run.transform,
            "ppl": run.ppl,
            "ppl_ratio_to_dynamic": run.ratio,
            "reference": run.reference,
            "tasks": {
                task: {
                    key: score.get(key)
                    for key in ("acc", "acc_stderr", "acc_norm", "num_samples")
                }
                for task, score in (run.tasks or {}).items()
            },
            "average": run.accuracy,
            "average_stderr": run.accuracy_stderr,
            "minus_dynamic": _pair(run, reference),
            "minus_fp": _pair(run, fp),
            "greedy_agreement": run.greedy_agreement,
            "oneshot_seconds": run.oneshot_seconds,
            "results": run.path,
        }
        summary["models"].setdefault(run.model, []).append(entry)
    return summary


def _pair(run: RunRow, reference: RunRow | None) -> dict | None:
    if reference is None or reference is run:
        return None
    paired = paired_difference(run, reference)
    if paired is None:
        return None
    return {"mean": paired[0], "stderr": paired[1], "reference": reference.label}
