"""StableAdamW through build_optimizer against plain torch math, and the weight-decay param groups."""

import datetime
import math

import pytest
import torch
import transformers
from conftest import compiled_halves_unprobed, free_port
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert_train.optim import build_optimizer, param_groups, split_by_weight_decay, stable_adamw

BETAS = (0.9, 0.98)
EPS = 1e-6


def reference_stable_adamw(
    params, grads_per_step, lrs, *, weight_decay, decay_mask, decouple_lr, max_lr, clip
):
    """Adam with bias correction, per-tensor update clipping by RMS(g / sqrt(v_hat)), decoupled decay.

    Returns the final parameters and the largest RMS seen, in float64.
    """
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    largest_rms = 0.0
    for step, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * g
            v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * g * g
            m_hat = m[i] / (1 - BETAS[0] ** step)
            v_hat = v[i] / (1 - BETAS[1] ** step)
            rms = math.sqrt((g * g / torch.clamp(v_hat, min=EPS**2)).mean().item())
            largest_rms = max(largest_rms, rms)
            step_lr = lr / max(1.0, rms) if clip else lr
            if decay_mask[i]:
                p.mul_(1 - (step_lr / max_lr if decouple_lr else step_lr) * weight_decay)
            p.sub_(step_lr * m_hat / (v_hat.sqrt() + EPS))
    return params, largest_rms


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)


def gradient_steps(net, seed=0):
    """Three small gradients, then one 300x larger.

    Its RMS against v_hat, which already holds it, approaches sqrt((1 - b2^t) / (1 - b2)): 1.97 at step 4.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = [1e-3, 2e-3, 1e-3, 0.3, 1e-3]
    return [[torch.randn(p.shape, generator=gen) * s for p in net.parameters()] for s in scales]


IMPLS = ["optimi", "foreach"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("decouple_lr", [False, True])
def test_stable_adamw_matches_reference(decouple_lr, impl):
    torch.manual_seed(0)
    net = TinyNet()
    start = [p.detach().clone() for p in net.parameters()]
    lr, weight_decay = 1e-2, (5e-4 if decouple_lr else 0.1)
    opt = build_optimizer(
        net, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, decouple_lr=decouple_lr, impl=impl
    )
    steps = gradient_steps(net)
    lrs = [lr, lr, lr / 2, lr / 2, lr / 4]  # as a scheduler would set them, to exercise max_lr
    for grads, step_lr in zip(steps, lrs):
        for group in opt.param_groups:
            group["lr"] = step_lr
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        opt.step()

    decay_mask = [True, False, False, False]  # proj.weight; proj.bias, norm.weight, norm.bias
    kwargs = dict(weight_decay=weight_decay, decay_mask=decay_mask, decouple_lr=decouple_lr, max_lr=lr)
    expected, largest_rms = reference_stable_adamw(start, steps, lrs, clip=True, **kwargs)
    unclipped, _ = reference_stable_adamw(start, steps, lrs, clip=False, **kwargs)

    assert largest_rms > 1.9  # the clipping branch ran
    assert max((e - u).abs().max().item() for e, u in zip(expected, unclipped)) > 1e-3
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach().double(), want, rtol=0, atol=1e-6)


def tiny_hf_modernbert(layers: int = 2):
    config = transformers.ModernBertConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        global_attn_every_n_layers=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    return transformers.ModernBertForMaskedLM(config)


def test_modernbert_groups_by_module():
    model = tiny_hf_modernbert()
    decayed, not_decayed = split_by_weight_decay(model, "norms,biases,embeddings")
    assert set(decayed) == {
        "head.dense.weight",
        *(
            f"model.layers.{i}.{w}.weight"
            for i in range(2)
            for w in ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
        ),
    }
    assert set(not_decayed) == {
        "model.embeddings.tok_embeddings.weight",
        "model.embeddings.norm.weight",
        "model.layers.1.attn_norm.weight",  # layer 0's attn_norm is an Identity
        "model.layers.0.mlp_norm.weight",
        "model.layers.1.mlp_norm.weight",
        "model.final_norm.weight",
        "head.norm.weight",
        "decoder.bias",
    }
    # The decoder weight is the token embedding: counted once, under the embedding's name.
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))

    decayed, not_decayed = split_by_weight_decay(model, ["norms", "biases"])  # ModernBERT's own choice
    assert "model.embeddings.tok_embeddings.weight" in decayed
    decayed, not_decayed = split_by_weight_decay(model, "")
    assert not not_decayed


def test_decay_reaches_only_the_decayed_group():
    """With zero gradients the Adam step is zero, so one step shows the weight decay alone."""
    model = tiny_hf_modernbert()
    model.model.layers[0].mlp.Wo.weight.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weight_decay = 1e-4
    opt = build_optimizer(model, lr=8e-4, weight_decay=weight_decay)  # decouple_lr: w *= 1 - wd at peak lr
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    decayed, _ = split_by_weight_decay(model)
    assert "model.layers.0.mlp.Wo.weight" not in decayed  # frozen: not in any group
    for name, p in model.named_parameters():
        factor = 1 - weight_decay if name in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-9)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("impl", IMPLS)
def test_a_step_without_gradients_changes_nothing(impl):
    """A skipped batch (the non-finite guard drops its gradients): the step after it is the step the
    optimizer would have taken had that batch never come: same step count, same moments, same weights."""
    grads = gradient_steps(TinyNet())

    def train(skip_after: int | None) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        net = TinyNet()
        opt = build_optimizer(net, lr=1e-2, weight_decay=1e-4, impl=impl)
        for i, step_grads in enumerate(grads):
            for p, g in zip(net.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()
            if i == skip_after:
                opt.zero_grad(set_to_none=True)
                assert opt.step(closure=lambda: 7.0) == 7.0  # the closure still runs
        return [p.detach().clone() for p in net.parameters()], opt.state_dict()

    straight, straight_state = train(None)
    skipped, skipped_state = train(1)
    for a, b in zip(straight, skipped):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [int(g["step"]) for g in skipped_state["param_groups"]] == [len(grads)] * 2
    for key, state in straight_state["state"].items():
        torch.testing.assert_close(state["exp_avg"], skipped_state["state"][key]["exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])]
)  # fmt: skip
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kahan", [False, True])
def test_a_step_skipped_by_a_device_flag_changes_nothing(impl, kahan, device):
    """The non-finite guard's verdict handed over unread (`skip_next_step_if`): a batch whose gradients are
    non-finite, flagged, moves no weight, moment or Kahan compensation, and once settled its step is not
    counted: the run then goes on as if that batch had never come. A flag that is false changes nothing
    either. `foreach` reads no value back for it (optimi's kernels take no mask: there the flag is read)."""
    grads = gradient_steps(TinyNet())
    dtype = torch.bfloat16 if kahan else torch.float32

    def train(bad_after: int | None, flag_every_step: bool):
        torch.manual_seed(0)
        net = TinyNet().to(device, dtype)
        opt = build_optimizer(net, lr=1e-2, weight_decay=1e-4, impl=impl, kahan_sum=None if kahan else False)
        reads = FloatReads()
        for i, step_grads in enumerate(grads):
            batches = [(step_grads, False)]
            if i == bad_after:
                poison = [torch.full_like(g, float("nan")) if j % 2 else torch.full_like(g, float("inf"))
                          for j, g in enumerate(step_grads)]  # fmt: skip
                batches.append((poison, True))
            for batch_grads, bad in batches:
                for p, g in zip(net.parameters(), batch_grads):
                    p.grad = g.clone().to(device, dtype)
                if flag_every_step or bad:
                    opt.skip_next_step_if(torch.tensor(bad, device=device))
                    with reads:
                        opt.step()
                    assert opt.settle_skip() is (bad if impl == "foreach" else None)  # optimi: read at once
                else:
                    opt.step()
        state = opt.state_dict()
        return [p.detach().clone() for p in net.parameters()], state, reads.count

    unflagged, _, _ = train(None, flag_every_step=False)
    for flag_every_step in (False, True):
        straight, straight_state, _ = train(None, flag_every_step)
        skipped, skipped_state, reads = train(1, flag_every_step)
        if impl == "foreach":
            assert reads == 0
        for a, b, c in zip(straight, skipped, unflagged):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            # A flag's masked arithmetic rounds otherwise (m(1 - w) + wg for lerp): bf16 moments by an ulp.
            torch.testing.assert_close(a, c, rtol=1e-2 if kahan else 1e-6, atol=0)
        assert [int(g["step"]) for g in skipped_state["param_groups"]] == [len(grads)] * 2
        for key, state in straight_state["state"].items():
            for name in ("exp_avg", "exp_avg_sq") + (("kahan_comp",) if kahan else ()):
                want, got = state[name], skipped_state["state"][key][name]
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_parameters_use_kahan_summation(impl):
    """Steps of 1e-3 vanish against a bf16 weight of 1.0 (spacing 2^-7) unless compensated."""
    steps, lr = 100, 1e-3

    def train(kahan_sum):
        net = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
        nn.init.ones_(net.weight)
        opt = build_optimizer(net, lr=lr, weight_decay=0.0, kahan_sum=kahan_sum, impl=impl)
        for _ in range(steps):
            net.weight.grad = torch.ones_like(net.weight)  # Adam's step is then exactly lr
            opt.step()
        return net.weight.float()

    assert torch.all(train(kahan_sum=False) == 1.0)
    torch.testing.assert_close(train(kahan_sum=None), torch.full((4, 4), 1 - steps * lr), rtol=0, atol=4e-3)


def test_bad_optimizer_arguments_name_themselves():
    net = TinyNet()
    with pytest.raises(ValueError, match=r"^no_decay: unknown category 'bias'; choose from"):
        param_groups(net, 0.1, "norms,bias")
    with pytest.raises(ValueError, match=r"^optimizer betas=\[0.9\]: expected two values"):
        build_optimizer(net, lr=1e-3, betas=[0.9])
    with pytest.raises(ValueError, match=r"^optimizer lr=0: must be positive"):
        build_optimizer(net, lr=0)
    with pytest.raises(ValueError, match=r"^optimizer impl='triton': choose from auto, optimi, foreach$"):
        build_optimizer(net, lr=1e-3, impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("triton, impl", [(False, "optimi"), (None, "optimi"), (None, "foreach")])
def test_cuda_matches_reference(triton, impl):
    torch.manual_seed(0)
    net = TinyNet().cuda()
    start = [p.detach().cpu().clone() for p in net.parameters()]
    lr, weight_decay = 1e-2, 5e-4
    opt = build_optimizer(net, lr=lr, weight_decay=weight_decay, triton=triton, impl=impl)
    steps = gradient_steps(net)
    for grads in steps:
        for p, g in zip(net.parameters(), grads):
            p.grad = g.cuda()
        opt.step()
    expected, _ = reference_stable_adamw(
        start,
        steps,
        [lr] * len(steps),
        weight_decay=weight_decay,
        decay_mask=[True, False, False, False],
        decouple_lr=True,
        max_lr=lr,
        clip=True,
    )
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=0, atol=1e-5)


class FloatReads(TorchDispatchMode):
    """Counts floating-point values read back to the host (.item(), float()): each a sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and args[0].is_floating_point():
            self.count += 1
        return func(*args, **(kwargs or {}))


def _sharded_steps(
    rank: int, world_size: int, port: int, out_file: str, start, steps, lrs, compile: bool = False
) -> None:
    """One gloo rank: TinyNet's parameters sharded on dim 0 (5 rows over 2 ranks: 3 and 2) but one replicated,
    stepped."""
    # A timeout so a lost peer fails the test instead of hanging it.
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    mesh = init_device_mesh("cpu", (world_size,))
    net = TinyNet()
    # norm.bias replicated: a second layout in the group, whose sums must not be added over the ranks.
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()]]
    for module, name, value, placement in zip(
        [net.proj, net.proj, net.norm, net.norm], ["weight", "bias", "weight", "bias"], start, placements
    ):
        setattr(module, name, nn.Parameter(distribute_tensor(value.clone(), mesh, placement)))
    opt = build_optimizer(net, lr=lrs[0], betas=BETAS, eps=EPS, weight_decay=5e-4, compile=compile)
    stable_adamw._compiled_halves = compiled_halves_unprobed()  # this child's, under the probe below
    reads = FloatReads()
    for grads, step_lr in zip(steps, lrs):
        for group in opt.param_groups:
            group["lr"] = step_lr
        for p, g, placement in zip(net.parameters(), grads, placements):
            p.grad = distribute_tensor(g.clone(), mesh, placement)
        with reads:
            opt.step()
    full = [p.detach().full_tensor() for p in net.parameters()]
    if rank == 0:
        torch.save({"params": full, "float_reads": reads.count}, out_file)
    # No destroy_process_group(): with DTensors over gloo (torch 2.7) it hung on one rank in about 1 run of 6,
    # whatever came before it (a barrier, every collective waited); the process exits anyway.


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sharded_parameters_clip_by_the_whole_tensors_rms(tmp_path, compile):
    """FSDP2 shards as DTensors over gloo (no AVG all-reduce): the same weights as on one device, also with
    the compiled step (its halves on each rank's shards, the sums reduced between them)."""
    torch.manual_seed(0)
    net = TinyNet()
    start = [p.detach().clone() for p in net.parameters()]
    steps = gradient_steps(net)
    lrs = [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3]
    out_file = tmp_path / "params.pt"
    torch.multiprocessing.spawn(
        _sharded_steps, args=(2, free_port(), str(out_file), start, steps, lrs, compile), nprocs=2
    )
    kwargs = dict(weight_decay=5e-4, decay_mask=[True, False, False, False], decouple_lr=True, max_lr=1e-2)
    expected, largest_rms = reference_stable_adamw(start, steps, lrs, clip=True, **kwargs)
    assert largest_rms > 1.9  # a per-shard RMS would clip differently
    result = torch.load(out_file)
    for got, want in zip(result["params"], expected):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # The clipping RMS stays on the device: no value comes back to the host (a GPU sync per tensor).
    assert result["float_reads"] == 0


class Dispatched(TorchDispatchMode):
    """Counts the tensor operations dispatched (each one or more kernel launches on a GPU), but the per-tensor
    sums a CPU takes where a GPU takes one multi-tensor norm (stable_adamw._sums)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ != "sum"
        return func(*args, **(kwargs or {}))


def test_foreach_steps_a_whole_model_as_optimi_does_in_a_fixed_number_of_operations():
    """A tiny ModernBERT (fp32 weights and one bf16 Kahan-compensated tensor, both groups, the tied decoder
    once), stepped by both implementations from the same gradients: the same weights and moments; ours
    dispatches as many operations for a model with twice the tensors, and reads no value back."""

    def train(impl: str, layers: int = 2):
        torch.manual_seed(0)
        net = tiny_hf_modernbert(layers)
        net.model.final_norm.weight.data = net.model.final_norm.weight.data.bfloat16()
        opt = build_optimizer(net, lr=1e-2, weight_decay=1e-2, no_decay="norms,biases", impl=impl)
        gen = torch.Generator().manual_seed(1)
        counts, reads = [], FloatReads()
        for scale in (1e-3, 2e-3, 0.3, 1e-3):
            for p in net.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
            dispatched = Dispatched()
            with dispatched, reads:
                opt.step()
            counts.append(dispatched.count)
        return net, opt, counts, reads.count

    ours, ours_opt, counts, reads = train("foreach")
    theirs, theirs_opt, _, _ = train("optimi")
    for (name, got), want in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    for p_ours, p_theirs in zip(ours.parameters(), theirs.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours_opt.state[p_ours][key], theirs_opt.state[p_theirs][key])
    assert "kahan_comp" in ours_opt.state[ours.model.final_norm.weight]
    assert [int(g["step"]) for g in ours_opt.param_groups] == [4, 4]
    assert reads == 0
    deeper, _, deeper_counts, _ = train("foreach", layers=4)
    assert len(list(deeper.parameters())) > len(list(ours.parameters())) + 10
    assert deeper_counts[1:] == counts[1:]  # after the first step, which creates the state


@pytest.mark.parametrize("first, then", [("optimi", "foreach"), ("foreach", "optimi")])
def test_a_checkpoint_resumes_under_the_other_implementation(first, then):
    """The state is optimi's under both: 2 steps, a state_dict round trip into a new optimizer of the other
    implementation, 2 more; the same as 4 steps under `first`."""
    grads = gradient_steps(TinyNet())[:4]

    def fresh(impl):
        torch.manual_seed(0)
        net = TinyNet()
        return net, build_optimizer(net, lr=1e-2, weight_decay=1e-3, impl=impl)

    def steps(net, opt, which):
        for step_grads in which:
            for p, g in zip(net.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()

    straight, straight_opt = fresh(first)
    steps(straight, straight_opt, grads)
    net, opt = fresh(first)
    steps(net, opt, grads[:2])
    saved = opt.state_dict()
    resumed_opt = build_optimizer(net, lr=1e-2, weight_decay=1e-3, impl=then)
    resumed_opt.load_state_dict(saved)
    steps(net, resumed_opt, grads[2:])
    for got, want in zip(net.parameters(), straight.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    assert [int(g["step"]) for g in resumed_opt.param_groups] == [4, 4]


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])]
)  # fmt: skip
def test_auto_takes_the_step_that_skips_on_the_device_on_a_gpu(device):
    """`auto`: our multi-tensor step on a GPU (the guard's verdict then needs no host read before the step),
    optimi's loop on a CPU; an explicit choice is kept."""
    net = TinyNet().to(device)
    assert build_optimizer(net, lr=1e-3).skips_on_device() is (device == "cuda")
    assert build_optimizer(net, lr=1e-3, impl="optimi").skips_on_device() is False
    assert build_optimizer(net, lr=1e-3, impl="foreach").skips_on_device() is True
    assert build_optimizer(net, lr=1e-3, compile=True).skips_on_device() is True  # compile implies foreach
    with pytest.raises(ValueError, match="compiles the foreach step, not optimi's"):
        build_optimizer(net, lr=1e-3, impl="optimi", compile=True)


@pytest.mark.slow  # compiling both halves for both groups, masked and not: ~15 s on 2 cores
def test_the_compiled_step_is_the_multi_tensor_step(monkeypatch):
    """`compile=True`: the same weights, moments and step counts as the eager multi-tensor step, with and
    without the guard's flag, a flagged bad batch skipped exactly; after the first steps nothing compiles
    again (the scalars that change every step are tensors) and no value is read back."""
    grads = gradient_steps(TinyNet())
    monkeypatch.setattr(stable_adamw, "_compiled_halves", compiled_halves_unprobed())

    def train(compile: bool, flagged: bool):
        torch.manual_seed(0)
        net = TinyNet()
        opt = build_optimizer(net, lr=1e-2, weight_decay=1e-3, impl="foreach", compile=compile)
        reads = FloatReads()
        for i, step_grads in enumerate(grads):
            poisoned = [torch.full_like(g, float("nan")) for g in step_grads]
            for batch_grads in [step_grads] + ([poisoned] if i == 1 else []):
                for p, g in zip(net.parameters(), batch_grads):
                    p.grad = g.clone()
                bad = not torch.isfinite(batch_grads[0]).all()
                if flagged or bad:
                    opt.skip_next_step_if(torch.tensor(bad))
                # Every graph (both groups, masked or not) is made in the first two steps. config.patch,
                # not monkeypatch: on torch 2.7 monkeypatch's undo hid the key, and every later compile in
                # the process failed reading the config.
                with reads, torch._dynamo.config.patch(error_on_recompile=i >= 2):
                    opt.step()
                opt.settle_skip()
        return net, opt, reads.count

    for flagged in (False, True):
        eager, eager_opt, _ = train(False, flagged)
        compiled, compiled_opt, reads = train(True, flagged)
        assert reads == 0
        for got, want in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
        for p_got, p_want in zip(compiled.parameters(), eager.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(compiled_opt.state[p_got][key], eager_opt.state[p_want][key])
        assert [int(g["step"]) for g in compiled_opt.param_groups] == [len(grads)] * 2
