"""The non-finite guard: a bad batch skips its optimizer step, K in a row stop the run with one line and the
last good checkpoint as latest; the gradient norm it logs is the whole model's, also over FSDP2's shards."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import REPO, compiled_halves_unprobed, free_port, read_metrics, run_env
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert_train.train.nonfinite_guard import clip_gradients, grad_norm

# The real CLI, with one extra callback that turns the listed batches' loss infinite before backward, as an
# overflowing batch would.
POISONED_MAIN = textwrap.dedent(
    """
    import sys

    from composer.core import Callback

    import modernbert_train.train.run as run_module
    from modernbert_train.train.main import main

    class PoisonLoss(Callback):
        def after_loss(self, state, logger):
            if int(state.timestamp.batch) + 1 in {BATCHES}:
                state.loss = state.loss * float("inf")

    build_run = run_module.build_run

    def build_poisoned_run(config, start=None, lock=None):
        run = build_run(config, start, lock)
        run.trainer.state.callbacks.insert(0, PoisonLoss())  # before the guard sees the loss
        return run

    run_module.build_run = build_poisoned_run
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["optimi", "foreach"])  # the verdict read before the step / on the device
def test_bad_batches_are_skipped_and_too_many_in_a_row_stop_the_run(write_recipe, tmp_path, impl):
    script = tmp_path / "poisoned_main.py"
    script.write_text(POISONED_MAIN.replace("{BATCHES}", "{3, 6, 7}"))
    recipe = write_recipe(
        max_duration="12ba", save_interval="4ba", max_nonfinite_batches=2, data={"eval": []},
        optimizer={"impl": impl},
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), str(recipe)], cwd=REPO, env=run_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    folder = tmp_path / "run"

    # batch 3 skipped; 4 and 5 good; 6 and 7 bad: the second in a row stops the run before any later save
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("modernbert-train: error:")]
    assert len(errors) == 1 and "2 batches in a row (the last: batch 7)" in errors[0], done.stderr[-3000:]
    assert "batch 3: non-finite loss" in done.stderr and "batch 6: non-finite loss" in done.stderr
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    assert not (folder / "ep0-ba8-rank0.pt").exists()

    checkpoint = torch.load(folder / "ep0-ba4-rank0.pt", map_location="cpu", weights_only=False)
    optimizer = checkpoint["state"]["optimizers"]["StableAdamW"]
    assert [int(group["step"]) for group in optimizer["param_groups"]] == [3, 3]  # 4 batches, 1 skipped
    assert all(torch.isfinite(w).all() for w in checkpoint["state"]["model"].values())

    rows = {row["batch"]: row for row in read_metrics(folder / "metrics.jsonl")}
    for batch in (1, 2, 4, 5):
        assert 0 < rows[batch]["train/grad_norm"] < float("inf"), rows[batch]
    assert [rows[batch]["train/skipped_steps"] for batch in (2, 3, 4, 5, 6, 7)] == [0, 1, 1, 1, 2, 3]
    # Every bad batch has its row, the one that stopped the run too, with the value named as non-finite.
    for batch in (3, 6, 7):
        assert (
            rows[batch]["loss/train/total"] in ("inf", "nan")
            and "loss/train/total" in rows[batch]["non_finite"]
        )
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7]


def sharded_grad_norm(rank: int, port: int, out) -> None:
    """Rank `rank` of 2: a small model sharded with FSDP2, one backward over this rank's half of a batch; the
    guard's norm from the shards, and the norm of the whole gradients gathered."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    inputs = torch.randn(4, 7)
    for module in (model[0], model[2], model):
        fully_shard(module)
    model(inputs[2 * rank : 2 * rank + 2]).pow(2).mean().backward()
    parameters = list(model.parameters())
    assert all(isinstance(p.grad, DTensor) for p in parameters)
    whole = torch.cat([p.grad.full_tensor().flatten() for p in parameters]).norm().item()
    # Both ways to sum the squares: the loop (CPU's default) and the multi-tensor kernels (a GPU's).
    both = [grad_norm(parameters, foreach=foreach).item() for foreach in (False, True)]
    (out / f"rank{rank}").write_text(f"{both[0]} {both[1]} {whole}")
    torch_dist.destroy_process_group()


def test_grad_norm_over_fsdp2_shards_is_the_whole_models(tmp_path):
    mp.spawn(sharded_grad_norm, args=(free_port(), tmp_path), nprocs=2)
    (guard0, foreach0, whole0), (guard1, foreach1, whole1) = [
        map(float, (tmp_path / f"rank{rank}").read_text().split()) for rank in (0, 1)
    ]
    assert guard0 == guard1 == pytest.approx(whole0, rel=1e-6) and whole0 == whole1 > 0
    assert foreach0 == foreach1 == pytest.approx(whole0, rel=1e-6)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])]
)  # fmt: skip
def test_grad_norm_of_whole_gradients_both_ways(device):
    """Mixed shapes and dtypes, some parameters without a gradient: the multi-tensor path (a GPU's default)
    and the loop agree with a float64 sum; on CUDA at base's largest tensor too."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (64,), (3, 4, 5), (1,)] + ([(50368, 768)] if device == "cuda" else [])
    dtypes = [torch.bfloat16 if i == 1 else torch.float32 for i in range(len(shapes))]
    parameters = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=d)) for s, d in zip(shapes, dtypes)]
    for param in parameters:
        param.grad = torch.randn(param.shape, generator=generator).to(device, param.dtype)
    parameters.append(torch.nn.Parameter(torch.zeros(3, device=device)))  # no gradient
    exact = sum(p.grad.double().pow(2).sum() for p in parameters if p.grad is not None).sqrt().item()
    for foreach in (False, True):
        assert grad_norm(parameters, foreach=foreach).item() == pytest.approx(exact, rel=1e-6)
    assert grad_norm(parameters).item() == pytest.approx(exact, rel=1e-6)


def test_clipping_scales_to_the_norm_and_leaves_a_smaller_gradient_alone():
    parameters = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
    for param, scale in zip(parameters, (3.0, 4.0)):
        param.grad = torch.full(param.shape, scale)
    norm = grad_norm(parameters)
    clip_gradients(parameters, norm, max_norm=1.0)
    assert grad_norm(parameters).item() == pytest.approx(1.0, rel=1e-5)
    assert parameters[0].grad[0, 0] / parameters[1].grad[0] == pytest.approx(3 / 4)  # one scale for all
    before = [p.grad.clone() for p in parameters]
    clip_gradients(parameters, grad_norm(parameters), max_norm=10.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(parameters, before))


def test_the_logged_gradient_norm_is_the_gradients_own_and_the_step_gets_it_clipped(write_recipe, tmp_path):
    """Composer's GradientClipping ran before the guard measured: train/grad_norm read grad_clip_norm
    whenever clipping engaged, hiding every spike."""
    from modernbert_train.train.config import load_config
    from modernbert_train.train.run import build_run

    logged, stepped = {}, {}
    for clip in (None, 1e-3):
        folder = tmp_path / f"clip-{clip}"
        folder.mkdir()
        recipe = write_recipe(folder / "recipe.yaml", max_duration="2ba", data={"eval": []},
                              grad_clip_norm=clip, save_folder=str(folder / "run"))  # fmt: skip
        run = build_run(load_config(recipe))
        optimizer, parameters = run.trainer.state.optimizers[0], list(run.model.parameters())
        plain_step, norms = optimizer.step, []

        def step(*args, plain_step=plain_step, parameters=parameters, norms=norms, **kwargs):
            norms.append(grad_norm(parameters).item())  # what the optimizer is given
            return plain_step(*args, **kwargs)

        optimizer.step = step
        run.trainer.fit()
        run.trainer.close()
        logged[clip] = [row["train/grad_norm"] for row in read_metrics(folder / "run" / "metrics.jsonl")]
        stepped[clip] = norms
    # The first batch's gradient is the same in both runs (same weights, same data): logged unclipped.
    assert logged[1e-3][0] == pytest.approx(logged[None][0], rel=1e-5) and logged[1e-3][0] > 1e-2
    assert stepped[None][0] == pytest.approx(logged[None][0], rel=1e-5)
    assert stepped[1e-3] == pytest.approx([1e-3, 1e-3], rel=1e-3)  # clipped before the step


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's value back to the host (on a GPU each waits for every kernel before it):
    item/bool/int/float (aten._local_scalar_dense), nonzero, and tolist, which on a CPU dispatches nothing and
    is counted by a patch. `host_tensors()` are read freely: they stay on the host on a GPU too."""

    def __init__(self, host_tensors=lambda: ()):
        super().__init__()
        self.reads: list[str] = []
        self.host_tensors = host_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        host = any(args[0] is tensor for tensor in self.host_tensors())
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero", "equal") and not host:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        reads, tolist = self.reads, self._tolist

        def counted(tensor):
            reads.append("tolist")
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


@pytest.mark.parametrize("impl", ["foreach", "optimi", pytest.param("compiled", marks=pytest.mark.slow)])
def test_nothing_is_read_back_between_the_loss_and_the_optimizer_step(write_recipe, impl, monkeypatch):
    """On a GPU a host read before the optimizer step makes its launches wait for the whole backward. In a
    real Composer batch under `foreach`, nothing from the loss to the end of the optimizer step reads a value
    back (Composer's closure would read the loss; the guard hands its verdict over on the device); optimi's
    step (a per-tensor loop on a CPU, and the guard's verdict read before it) does, which shows the probe
    sees them."""
    from composer.core import Callback

    from modernbert_train.optim import stable_adamw
    from modernbert_train.train.config import load_config
    from modernbert_train.train.run import build_run

    monkeypatch.setattr(stable_adamw, "_compiled_halves", compiled_halves_unprobed())
    optimizer = {"impl": "auto", "compile": True} if impl == "compiled" else {"impl": impl}
    recipe = write_recipe(max_duration="3ba", data={"eval": []}, optimizer=optimizer, grad_clip_norm=0.5)
    run = build_run(load_config(recipe))  # clipping too: on the device, with the guard's norm
    optimizer = run.trainer.state.optimizers[0]
    probe, reads = HostReads(lambda: [group.get("step") for group in optimizer.param_groups]), []

    class Probe(Callback):
        def after_loss(self, state, logger):
            probe.reads.clear()
            probe.__enter__()

    plain_step = optimizer.step

    def step(*args, **kwargs):
        result = plain_step(*args, **kwargs)
        probe.__exit__(None, None, None)
        reads.append(list(probe.reads))
        return result

    optimizer.step = step
    run.trainer.state.callbacks.insert(0, Probe())
    run.trainer.fit()
    run.trainer.close()
    assert len(reads) == 3 and [int(g["step"]) for g in optimizer.param_groups] == [3, 3]
    if impl != "optimi":
        assert reads == [[], [], []]
    else:
        assert all("tolist" in batch for batch in reads), reads  # the guard's verdict


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_batch_waits_for_nothing_from_its_forward_to_its_optimizer_step(write_recipe):
    """On CUDA (`optimizer.impl` auto: our multi-tensor step), from each batch's forward to the end of its
    optimizer step nothing waits for the device (a read back, or a copy from pageable host memory): torch's
    sync debug mode raises on any operation that would. The first batch, whose step creates the optimizer's
    state, is left out."""
    from composer.core import Callback

    from modernbert_train.train.config import load_config
    from modernbert_train.train.run import build_run

    recipe = write_recipe(max_duration="3ba", data={"eval": []}, grad_clip_norm=0.5)  # clipping too
    run = build_run(load_config(recipe))
    optimizer = run.trainer.state.optimizers[0]
    assert next(run.model.parameters()).is_cuda and optimizer.skips_on_device()
    modes = []

    class Probe(Callback):
        def before_forward(self, state, logger):
            if int(state.timestamp.batch) >= 1:
                torch.cuda.set_sync_debug_mode("error")

    plain_step = optimizer.step

    def step(*args, **kwargs):
        try:
            return plain_step(*args, **kwargs)
        finally:
            modes.append(torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode("default")

    optimizer.step = step
    run.trainer.state.callbacks.insert(0, Probe())
    try:
        run.trainer.fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        run.trainer.close()
    assert modes == [0, 2, 2]  # the window was watched in batches 2 and 3 (2: "error")
