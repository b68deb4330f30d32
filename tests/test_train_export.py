"""The final student as other tools read it: the window never shrinks below the original's, use_cache
is the original's, the RoPE is also written as transformers 4.x's legacy keys, and model/ carries a model
card and the run's settings; transformers loads it and generates."""

import json

import torch
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_run import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longred.train import run_training
from longred.train.export import legacy_rope_keys


def test_exported_student(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    # a 64-token training window on a 256-token teacher: the saved window stays 256, not 64
    config = tiny_config(
        tiny_teacher_dir, None, out, method="long-cpt", steps=1, long_len=64, extended_len=None
    )
    run_training(config, progress=False)
    model_dir = out / "model"
    written = json.loads((model_dir / "config.json").read_text())
    teacher = json.loads((tiny_teacher_dir / "config.json").read_text())
    assert written["max_position_embeddings"] == teacher["max_position_embeddings"] == 256
    assert written["use_cache"] == teacher.get("use_cache", True)
    # transformers 4.x reads rope_theta / rope_scaling and ignores rope_parameters
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 1e6
    assert written["rope_scaling"] is None
    assert json.loads((model_dir / "training_args.json").read_text())["rope"] == "abf:theta=1000000"
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "long-cpt" in card and "abf:theta" in card

    assert AutoConfig.from_pretrained(model_dir).rope_parameters["rope_theta"] == 1e6
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


def test_legacy_rope_keys():
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 5e5}) == {
        "rope_theta": 5e5,
        "rope_scaling": None,
    }
    yarn = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 8192}
    assert legacy_rope_keys(yarn) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    }
