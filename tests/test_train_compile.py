"""`model.compile: true` compiles each encoder layer in place: same losses as eager, same checkpoint names."""

import pytest
from conftest import losses_by_batch, run_train

from modernbert_train.train.checkpoint import model_weights, read_checkpoint

pytestmark = pytest.mark.slow


def test_compiled_layers_train_like_eager(tmp_path, write_recipe):
    losses = {}
    for compiled in (False, True):
        folder = tmp_path / f"compile_{compiled}"
        recipe = write_recipe(
            tmp_path / f"compile_{compiled}.yaml",
            max_duration="3ba",
            save_folder=str(folder),
            save_interval="3ba",
            data={"eval": []},
            model={"compile": compiled},
        )
        run_train(recipe, timeout=480)
        losses[compiled] = losses_by_batch(folder / "metrics.jsonl")
    assert losses[True].keys() == losses[False].keys() == {1, 2, 3}
    for batch, eager in losses[False].items():
        assert losses[True][batch] == pytest.approx(eager, rel=1e-4), batch
    weights = model_weights(read_checkpoint(tmp_path / "compile_True" / "ep0-ba3-rank0.pt"))
    assert not any("_orig_mod" in name for name in weights)  # loads into an eager model as it is
