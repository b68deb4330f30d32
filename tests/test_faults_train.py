"""Faults injected into training, evaluation and configs (issue 15): no code run from a file, a diverged
or corrupt run stops by name, a run folder has one writer and may move, errors name what to change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with
from test_train_run import losses, tiny_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from longred.base.config import ConfigError, load_config
from longred.cli import main
from longred.eval.short_text import load_short_texts
from longred.models.loading import load_model
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import CacheCorruptionError
from longred.train import TrainConfig, run_training
from longred.train.checkpoint import load_checkpoint
from longred.train.guards import NonFiniteError
from longred.train.metrics import MetricsLog
from longred.train.run_folder import RunInUseError, RunLock


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir, tmp_path_factory) -> str:
    """8 short texts of 32 tokens (layers 1, 3, final) + 2 held out, 4 s2l texts of 64, bf16."""
    folder = tmp_path_factory.mktemp("faults-train")
    return cache_with(tiny_teacher_dir, folder, "bf16", short_samples=8, heldout=2, s2l_samples=4)


def fast(teacher, cache, out, **changes) -> TrainConfig:
    return tiny_config(teacher, cache, out, **dict(steps=2, save_every=1) | changes)


def yaml_of(config: TrainConfig, path: Path) -> str:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


# 1. a cache object missing behind its record: train and eval stop, naming shard and array ------------
def test_train_and_eval_stop_on_a_missing_cache_object(tiny_teacher_dir, cache, tmp_path, capsys):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache, broken)
    (broken / "short/input_ids/c/0/0").unlink()
    (broken / "short/input_ids/c/2/0").unlink()  # the held-out shard
    config = fast(tiny_teacher_dir, str(broken), tmp_path / "run", save_every=0)
    assert main(["train", "--config", yaml_of(config, tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # progress bars come before it
    assert err.startswith("longred: error: ")
    assert "short shard 0, array short/input_ids: object short/input_ids/c/0/0 is missing" in err
    assert not (tmp_path / "run/checkpoints").exists()
    with pytest.raises(CacheCorruptionError, match="short shard 2, array short/input_ids"):
        load_short_texts(str(broken))


# 2. checkpoint files hold tensors only: a pickled payload is refused without running ----------------
class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("planted", ["rng.pt", "optimizer.pt"])
def test_a_pickled_payload_in_a_checkpoint_is_refused_without_running(tmp_path, planted):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    torch.save(get_optimizer_state_dict(model, optimizer, options=options), tmp_path / "optimizer.pt")
    torch.save([{"cpu": torch.get_rng_state(), "cuda": []}], tmp_path / "rng.pt")
    (tmp_path / "state.json").write_text(json.dumps({"streams": [{}], "step": 1}))
    assert load_checkpoint(tmp_path, model=model, optimizer=optimizer)["step"] == 1  # the real files load
    marker = tmp_path / "pwned"
    torch.save([Payload(marker)], tmp_path / planted)
    with pytest.raises(ValueError, match=rf"{planted} holds more than tensors and plain values; refusing"):
        load_checkpoint(tmp_path, model=model, optimizer=optimizer)
    assert not marker.exists()


# 4. train never deletes a model/ folder it did not write ---------------------------------------------
def test_a_foreign_model_folder_is_refused_not_deleted(tiny_teacher_dir, cache, tmp_path):
    (tmp_path / "run/model").mkdir(parents=True)
    (tmp_path / "run/model/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"run/model holds files this run did not write \(notes.txt\)"):
        run_training(fast(tiny_teacher_dir, cache, tmp_path / "run"), progress=False)
    assert (tmp_path / "run/model/notes.txt").read_text() == "mine"
    assert not (tmp_path / "run/checkpoints").exists()  # refused before any work


# 5. a non-finite loss or weight stops training; the checkpoints on disk stay finite -----------------
def test_a_non_finite_loss_stops_before_its_step_is_applied(tiny_teacher_dir, cache, tmp_path):
    config = fast(tiny_teacher_dir, cache, tmp_path / "run", steps=4, save_every=0, lr=1e30)
    with pytest.raises(
        NonFiniteError, match=r"step 2: non-finite loss or gradient .*Last good checkpoint: none"
    ):
        run_training(config, progress=False)  # step 1 makes the weights huge, step 2's loss is NaN
    assert not (tmp_path / "run/model").exists() and not (tmp_path / "run/checkpoints").exists()
    with pytest.raises(ConfigError, match="lr: expected a finite number, got inf"):
        load_config(TrainConfig, overrides=config.to_dict() | {"lr": float("inf")})


def test_non_finite_weights_are_never_checkpointed(tiny_teacher_dir, cache, tmp_path, monkeypatch):
    from longred.train.trainer import Trainer

    step = Trainer.train_step

    def overflowing_step(self):  # a step whose update overflows one weight (its loss was finite)
        record = step(self)
        with torch.no_grad():
            self.student.model.norm.weight[0] = float("inf")
        return record

    monkeypatch.setattr(Trainer, "train_step", overflowing_step)
    config = fast(tiny_teacher_dir, cache, tmp_path / "run", steps=3, save_every=1)
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite weights \(model.norm.weight\); not saved"):
        run_training(config, progress=False)
    assert not list((tmp_path / "run/checkpoints").glob("step-*"))


# 8. a run is its settings and state, not its path; one writer per run folder ------------------------
def test_a_moved_run_folder_resumes(tiny_teacher_dir, cache, tmp_path):
    run_training(fast(tiny_teacher_dir, cache, tmp_path / "a"), progress=False)
    (tmp_path / "a").rename(tmp_path / "b")
    summary = run_training(fast(tiny_teacher_dir, cache, tmp_path / "b", steps=3), progress=False)
    assert summary["resumed_from"] == str(tmp_path / "b/checkpoints/step-000002")
    assert len(summary["step_times_s"]) == 1 and [r[0] for r in losses(tmp_path / "b")] == [1, 2, 3]


def test_a_second_training_process_on_one_folder_is_refused(tiny_teacher_dir, cache, tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunInUseError, match=rf"run is in use by pid {os.getpid()} on "):
            run_training(fast(tiny_teacher_dir, cache, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run/metrics.jsonl").exists()
    run_training(fast(tiny_teacher_dir, cache, tmp_path / "run"), progress=False)  # released: it runs


# 9. lengths beyond the teacher's trained window ------------------------------------------------------
def test_lengths_beyond_the_teachers_window_are_refused(tiny_teacher_dir, tmp_path, prose_jsonl):
    base = dict(
        out=str(tmp_path / "c.zarr"),
        teacher=str(tiny_teacher_dir),
        corpus=str(prose_jsonl),
        layers=["1", "final"],
    )
    with pytest.raises(ValueError, match="short_len 512 exceeds the teacher's trained window of 256"):
        run_precompute(PrecomputeConfig(**base, short_len=512, s2l_len=128), progress=False)
    with pytest.raises(ValueError, match="s2l_len 1024 exceeds the teacher's trained window of 256"):
        run_precompute(PrecomputeConfig(**base, short_len=32, s2l_len=1024), progress=False)
    online = dict(short_corpus=str(prose_jsonl), teacher_mode="online", layers="1,final", short_len=32)
    config = tiny_config(tiny_teacher_dir, None, tmp_path / "run", s2l_len=1024, extended_len=1024, **online)
    with pytest.raises(ValueError, match="s2l_len 1024 exceeds the teacher's trained window of 256"):
        run_training(config, progress=False)


# 10. errors name the file, the field, the place -------------------------------------------------------
def test_yaml_values_are_converted_per_field_and_every_problem_listed(tmp_path):
    settings = "out: x\nrope: abf:theta=1e6\nlong_len: 64\nlong_corpus: embedded:prose\nmethod: long-cpt\n"
    (tmp_path / "a.yaml").write_text(settings + "lr: 1e-3\nlayers: [1, final]\n")
    config = load_config(TrainConfig, path=str(tmp_path / "a.yaml"))
    assert config.lr == 0.001 and config.layers == ["1", "final"]
    (tmp_path / "b.yaml").write_text(settings + "steps: four\nlong_samples: 64.9\nlr: fast\ncompile: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path=str(tmp_path / "b.yaml"))
    assert str(err.value) == (
        f"{tmp_path / 'b.yaml'}: steps: expected an integer, got 'four'; long_samples: expected an integer, "
        "got 64.9; lr: expected a finite number, got 'fast'; compile: expected true or false, got 1"
    )
    (tmp_path / "c.yaml").write_text(settings + "steps: 4\nsteps: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml: setting 'steps' is given twice \(line 7\)"):
        load_config(TrainConfig, path=str(tmp_path / "c.yaml"))


def test_bad_files_are_named(tiny_teacher_dir, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    (teacher / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{teacher / 'config.json'} is not a valid model config"):
        load_model(teacher)
    with pytest.raises(FileNotFoundError, match=r"Model '.*nowhere': no such folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        MetricsLog(tmp_path / "metrics.jsonl", resume_step=1)


def test_the_cli_has_one_error_path(tmp_path, capsys, monkeypatch):
    import longred.storage

    assert main(["cache", "verify", str(tmp_path / "none.zarr")]) == 2
    assert (
        capsys.readouterr().err
        == f"longred: error: No longred cache at {tmp_path / 'none.zarr'} (no zarr.json).\n"
    )

    def bug(url):
        raise ZeroDivisionError("a bug keeps its traceback")

    monkeypatch.setattr(longred.storage, "cache_info", bug)
    with pytest.raises(ZeroDivisionError):
        main(["cache", "info", str(tmp_path)])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (CI runs as root); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_disk_full_in_train_names_the_checkpoint_then_a_rerun_completes(
    tiny_teacher_dir, cache, small_disk, capsys
):
    config = fast(tiny_teacher_dir, cache, small_disk / "run", steps=4, save_every=2, keep_checkpoints=2)
    assert main(["train", "--config", yaml_of(config, small_disk.parent / "run.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("longred: error: ")
    assert f"writing checkpoint {small_disk}/run/checkpoints/step-0000" in err and "MiB free in" in err
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert main(["train", "--config", yaml_of(config, small_disk.parent / "run.yaml")]) == 0
    assert [r[0] for r in losses(small_disk / "run")] == [1, 2, 3, 4]
    assert (small_disk / "run/model/model.safetensors").is_file()
