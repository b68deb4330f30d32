"""lm-evaluation-harness through `longred eval`: the shipped local tasks (held-out stdlib documents), scores
equal to a direct `lm_eval` run of the same task on the same model folder, the report's columns and
retention, task-list plumbing, and RULER's niah_single_1 offline (slow)."""

import json
from itertools import islice

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from longred.corpus.split import DocumentSplit  # noqa: E402
from longred.eval import EvalConfig, run_eval  # noqa: E402
from longred.eval.harness import (  # noqa: E402
    LOCAL_TASKS,
    HarnessSettings,
    cloze_questions,
    prepare_local_tasks,
    run_harness,
)
from longred.eval.heldout import heldout_documents  # noqa: E402
from longred.models.loading import load_model, load_tokenizer  # noqa: E402

SPLIT = DocumentSplit(seed=0, heldout_share=0.2)


@pytest.fixture(scope="module")
def include_path(prose_jsonl, tmp_path_factory):
    documents = list(islice(heldout_documents(str(prose_jsonl), field="text", split=SPLIT), 4))
    return prepare_local_tasks(tmp_path_factory.mktemp("tasks"), documents, seed=0, cloze_items=6)


def direct_lm_eval(model_dir, settings: HarnessSettings) -> dict:
    """lm-eval's own path: the hf model built from the folder by lm-eval, the tasks by name."""
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32", "max_length": settings.max_length},
        tasks=list(settings.tasks),
        task_manager=TaskManager(include_path=settings.include_path, include_defaults=False),
        batch_size=settings.batch_size,
        device="cpu",
        bootstrap_iters=0,
        log_samples=False,
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    return results["results"]


def test_scores_equal_a_direct_lm_eval_run(tiny_teacher_dir, include_path):
    settings = HarnessSettings(
        tasks=LOCAL_TASKS, include_path=str(include_path), batch_size=2, max_length=256
    )
    model = load_model(tiny_teacher_dir).requires_grad_(False)
    ours = run_harness(model, load_tokenizer(tiny_teacher_dir), settings)
    direct = direct_lm_eval(tiny_teacher_dir, settings)
    assert set(ours["scores"]) == set(LOCAL_TASKS)
    for task, metrics in ours["scores"].items():
        assert set(metrics) == (
            {"word_perplexity", "byte_perplexity", "bits_per_byte"} if "ppl" in task else {"acc", "acc_norm"}
        )
        for metric, value in metrics.items():
            assert value == pytest.approx(direct[task][f"{metric},none"], abs=1e-6, rel=0), (task, metric)
    assert ours["samples"] == {"longred_heldout_ppl": 4, "longred_cloze": 6}


def test_local_tasks_are_real_heldout_text(prose_jsonl, include_path):
    ppl = [json.loads(line) for line in (include_path / "longred_heldout_ppl.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in prose_jsonl.read_text().splitlines()]
    assert len(ppl) == 4 and all(doc["text"] in corpus for doc in ppl)  # whole documents, verbatim
    questions = [json.loads(line) for line in (include_path / "longred_cloze.jsonl").read_text().splitlines()]
    flat = [" ".join(text.split()) for text in corpus]
    for q in questions:
        answer = q["choices"][q["gold"]]
        assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
        assert any(f"{q['context']} {answer}" in text for text in flat)  # the passage goes on with it
    assert cloze_questions([d["text"] for d in ppl], seed=0, items=6) == questions  # deterministic
    yaml = (include_path / "longred_cloze.yaml").read_text()
    assert "dataset_path: json" in yaml and str(include_path.resolve()) in yaml


def test_longred_eval_puts_lm_eval_beside_its_metrics(tiny_teacher_dir, prose_jsonl, tmp_path):
    config = EvalConfig(
        model=str(tiny_teacher_dir),
        teacher=str(tiny_teacher_dir),
        out=str(tmp_path / "eval"),
        short_corpus=str(prose_jsonl),
        short_len=32,
        short_samples=2,
        long_corpus=str(prose_jsonl),
        long_len=192,
        long_samples=1,
        long_packing="pack",
        passkey_lengths=[192],
        passkey_trials=1,
        heldout_share=0.2,
        lm_eval_tasks="longred_heldout_ppl,longred_cloze",
        lm_eval_limit=3,  # lm-eval's own tasks; the shipped ones are sized here:
        lm_eval_documents=4,
        lm_eval_cloze=16,  # the random model gets some right: retention needs a teacher score > 0
    )
    results = run_eval(config, progress=False)
    harness = results["models"]["tiny-llama"]["lm_eval"]
    assert (
        harness["scores"] == harness["teacher_scores"]
    )  # the model is the teacher: same settings, same scores
    assert harness["summary"]["retention"] == pytest.approx(1.0)
    assert harness["summary"]["tasks"] == {"longred_cloze": "acc"}
    assert harness["samples"] == {"longred_heldout_ppl": 4, "longred_cloze": 16}
    assert "lm_eval --model hf" in harness["command"] and "--include_path" in harness["command"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## lm-evaluation-harness" in report and "| longred_cloze | acc |" in report
    assert "lm_eval.png" in results["files"] and (tmp_path / "eval" / "lm_eval.png").is_file()


def test_unknown_task_names_fail_before_any_model_runs(tiny_teacher_dir):
    settings = HarnessSettings(tasks=("no_such_task_xyz",))
    with pytest.raises(Exception, match="no_such_task_xyz"):
        run_harness(load_model(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir), settings)


@pytest.mark.slow
def test_ruler_niah_single_1_runs_offline_at_two_lengths(tiny_teacher_dir):
    settings = HarnessSettings(
        tasks=("niah_single_1",),
        max_length=1024,
        limit=2,
        ruler_lengths=(512, 1024),
        tokenizer=str(tiny_teacher_dir),
        max_gen_toks=16,
    )
    ours = run_harness(load_model(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir), settings)
    assert set(ours["scores"]["niah_single_1"]) == {"512", "1024"}  # lm-eval's 4096 placeholder dropped
    assert ours["samples"]["niah_single_1"] == 4
