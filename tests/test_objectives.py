"""Student-side parity: the states the student's objectives distil are `output_hidden_states` of the same
model at every layer name, with skipped position ids too (the teacher side is tests/test_capture.py)."""

import pytest
import torch

from longred.ops.inputs import model_inputs
from longred.train.objectives import StudentObjectives

LAYERS = ("0", "1", "2", "final")


@pytest.fixture(scope="module")
def student(small_llama):
    return small_llama


def reference(student, ids_BT, positions_BT):
    with torch.no_grad():
        out = student.model(**model_inputs(ids_BT, position_ids_BT=positions_BT), output_hidden_states=True)
    states = dict(zip(LAYERS[:-1], out.hidden_states[:3], strict=True))
    return states | {"final": out.last_hidden_state}


@pytest.mark.parametrize("skipped", [False, True])
def test_student_states_are_output_hidden_states(student, skipped):
    """A hook one block off, on the wrong module, or reading the input instead of the output fails here."""
    objectives = StudentObjectives(student, layers=LAYERS, chunk_tokens=8, s2l_kl_weight=0.0)
    ids_BT = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    positions_BT = torch.arange(12).expand(2, 12).clone()
    if skipped:
        positions_BT[:, 4:] += 40  # head | jump | tail, as an s2l sample
    expected = reference(student, ids_BT, positions_BT)
    with torch.no_grad():
        got = objectives.hidden_states(ids_BT, positions_BT, layers=LAYERS)
    for name in LAYERS:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"layer {name}")
    # the loss reads exactly those states: distilling onto them gives zero
    with torch.no_grad():
        loss = objectives(ids_BT, positions_BT, objective="short", targets={"hidden": expected})
    assert abs(float(loss)) < 1e-5
    # and a neighbouring block's states do not
    shifted = {**expected, "1": expected["2"]}
    with torch.no_grad():
        off = objectives(ids_BT, positions_BT, objective="short", targets={"hidden": shifted})
    assert float(off) > 1e-3
