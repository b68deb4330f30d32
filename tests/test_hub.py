"""Hub ids resolve offline from a Hugging Face cache laid out as huggingface_hub lays it out, and the
cache fingerprint then names the teacher by its id and commit, not by the snapshot folder's hash."""

import shutil
from pathlib import Path

import pytest

from longred.models.hub import hub_source, resolve_model
from longred.models.identity import teacher_identity
from longred.models.loading import resolve_teacher

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "a" * 40


@pytest.fixture
def hub_cache(tiny_teacher_dir, tmp_path, monkeypatch) -> Path:
    """An HF cache holding the tiny teacher as REPO at COMMIT (refs/main -> COMMIT), HF_HUB_OFFLINE set."""
    repo = tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(tiny_teacher_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


def test_hub_id_resolves_from_the_cache(hub_cache):
    assert resolve_teacher(REPO) == hub_cache
    assert resolve_model(f"{REPO}@{COMMIT}") == hub_cache
    assert hub_source(hub_cache) == {"hub_id": REPO, "revision": COMMIT}
    identity = teacher_identity(hub_cache)
    assert (identity["name"], identity["revision"]) == (REPO, COMMIT)


def test_uncached_hub_id_offline_says_so(hub_cache):
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_teacher("HuggingFaceTB/not-downloaded")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_model(f"{REPO}@{'b' * 40}")


def test_local_folder_is_not_a_hub_id(tiny_teacher_dir, tmp_path):
    assert resolve_model(tiny_teacher_dir) == tiny_teacher_dir
    assert hub_source(tiny_teacher_dir) is None
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model(tmp_path / "missing" / "folder" / "x")
