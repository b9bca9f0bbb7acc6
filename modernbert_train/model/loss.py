"""Cross-entropy of a linear layer's output (the decoder's), computed in chunks of rows.

`linear_cross_entropy(hidden, weight, bias, targets)` equals
`F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`, loss and gradients,
without ever holding the whole [rows, vocab] logits: for ModernBERT-base's 29.5k masked tokens a step those
are 5.9 GB in fp32, written and read several times by the plain softmax, log and their backward.

Each chunk's gradients are taken in the forward pass, while its logits are at hand: d(loss)/d(logits) is
softmax - one_hot, which feeds two matmuls, into the rows of d(hidden) and into an fp32 sum for d(weight).
The backward pass only scales what was kept (the size of hidden and of weight, nothing vocabulary-by-token).
The decoder's matmuls are the same as the plain path's.

Between the matmuls, a chunk's softmax, loss and gradient (`softmax_terms`) are elementwise work and row
reductions over [rows, vocab]. On a GPU that work is memory traffic, so it runs compiled: one pass or two
over the logits instead of about eight eager ones (ModernBERT-base: ~54 GB a step in eager fp32). On a CPU
it runs eager, in place where it can, and needs no compiler.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as
`F.linear(...).float()` would; the weight's gradient is summed over chunks in fp32.
"""

import functools

import torch
import torch.nn.functional as F

# Rows per chunk: the three matmuls of a chunk stay large (4096 x 768 x 50368 is 0.3 TFLOP each) and each
# chunk adds one read-modify-write of the [V, H] weight gradient, so smaller chunks only cost (measured
# on a CPU too); the chunk's fp32 logits are 0.8 GB at ModernBERT's vocabulary.
CHUNK_ROWS = 4096


# On a CPU, glibc hands blocks this large back to the OS when they are freed, so each step would page-fault
# fresh logits in (with the other [rows, V] and [V, H] buffers, a tenth of a CPU step here): the eager
# path keeps one logits buffer per dtype and reuses it. GPUs have PyTorch's caching allocator.
_cpu_logits: dict[torch.dtype, torch.Tensor] = {}


def cpu_logits_buffer(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused [rows, vocab] CPU buffer, grown in steps of 256 rows as batches need."""
    buffer = _cpu_logits.get(dtype)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab:
        buffer = _cpu_logits[dtype] = torch.empty(-(-rows // 256) * 256, vocab, dtype=dtype)
    return buffer[:rows]


def softmax_terms(
    logits: torch.Tensor, target: torch.Tensor, softmax_dtype: torch.dtype, grad: bool, in_place: bool = False
):
    """For one chunk of logits [rows, V] and target [rows, 1]: the summed cross-entropy, and with `grad`,
    d(loss)/d(logits) = softmax - one_hot in the logits' dtype and its column sums (the bias gradient) in
    softmax_dtype. in_place: the logits may be overwritten (eager only: compiled code would copy back)."""
    if in_place and logits.dtype == softmax_dtype:
        # log_softmax reduces each row before it writes it, so it may write over its input.
        log_probs = torch.log_softmax(logits, dim=-1, out=logits)
    else:
        log_probs = torch.log_softmax(logits.to(softmax_dtype), dim=-1)
    loss = -log_probs.gather(1, target).sum()
    if not grad:
        return loss, None, None
    # softmax - one_hot, written over the log-probabilities.
    grad_logits = log_probs.exp_().scatter_add_(1, target, log_probs.new_full(target.shape, -1.0))
    return loss, grad_logits.to(logits.dtype), grad_logits.sum(dim=0)


@functools.cache
def compiled_softmax_terms():
    """softmax_terms through torch.compile, made at its first use: torch.compile imports inductor, about 2 s
    of every process's start (4 s where nothing else imports dynamo), which a CPU run never needs. Rows vary
    from chunk to chunk and batch to batch: dynamic from the first call, so it compiles once."""
    return torch.compile(softmax_terms, dynamic=True)


def chunk_logits_on_cpu(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear(h, w, b) written into the reused CPU buffer."""
    out = cpu_logits_buffer(h.shape[0], w.shape[0], h.dtype)
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int = CHUNK_ROWS,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` [N, V] against `targets` [N] (class indices,
    every one valid: select the labelled rows first). Returns a scalar in fp32 (fp64 for fp64 inputs).

    compiled: run each chunk's softmax terms through torch.compile (default: on CUDA devices)."""
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    if compiled is None:
        compiled = device_type == "cuda"
    # Its forward runs without grad mode whatever the caller's, so it is told whether gradients are wanted.
    grad_mode = torch.is_grad_enabled()
    # The function casts for itself; autocast inside it would also cast the fp32 accumulations.
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, chunk_rows, compute_dtype, grad_mode, compiled
        )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, compute_dtype, grad_mode, compiled):
        want_hidden, want_weight, want_bias = (grad_mode and wanted for wanted in ctx.needs_input_grad[:3])
        training = want_hidden or want_weight or want_bias
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        # The softmax runs in fp32 at least (fp64 stays fp64, so the tests can compare exactly).
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
        total = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=softmax_dtype) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=softmax_dtype) if want_bias else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            target = targets[rows, None]
            if compiled:
                loss, grad, column_sums = compiled_softmax_terms()(
                    F.linear(h, w, b), target, softmax_dtype, training
                )
            else:
                logits = F.linear(h, w, b) if h.device.type != "cpu" else chunk_logits_on_cpu(h, w, b)
                loss, grad, column_sums = softmax_terms(
                    logits, target, softmax_dtype, training, in_place=True
                )
            total += loss
            if not training:
                continue
            if want_bias:
                grad_bias += column_sums
            if want_hidden:
                grad_hidden[rows] = grad @ w
            if want_weight:
                if compute_dtype == softmax_dtype:
                    grad_weight.addmm_(grad.t(), h)  # accumulates in place, no [V, H] temporary
                else:
                    grad_weight += grad.t() @ h
        ctx.grads = (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # The loss is linear in the kept gradients' scale: a scaled or averaged loss rescales them, in
        # place (they are the size of the weight). Handing them over without keeping a reference lets
        # autograd add the tied embedding's gradient into the weight's in place too.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients are used up")
        scaled = (None if grad is None else grad.mul_(grad_total) for grad in grads)
        return *scaled, None, None, None, None, None
