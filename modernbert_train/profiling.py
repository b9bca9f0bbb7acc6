"""Where a training step's time goes, from a torch.profiler run: the summary the GPU benchmark
(`benchmarks.bench_gpu --profile`) and a training run's `profile` recipe key both write.

On a GPU only device-side events are ranked: an operator's own device time is that of the kernels it
launched, and inductor records each compiled kernel under the kernel's own name as well, so ranking operators
and kernels together counted much of the step twice (total 172 ms for a 91 ms step on an H200, 2026-12-04).
What the kernels leave of the wall time is the device idling on the host (data, Python, host syncs). On a CPU
the CPU operators are ranked instead.
"""

from typing import Any

# What `.item()` runs as; on a GPU it waits for every kernel queued before it, as the device-to-host copy of
# `.tolist()` or `.cpu()` does (counted from the device's memcpy events).
_HOST_READ = "aten::_local_scalar_dense"


def kernel_kind(name: str) -> str:
    """A device kernel's family, for the profile's summary."""
    low = name.lower()
    if "flash" in low or "fmha" in low or "attention" in low:
        return "attention"
    if any(k in low for k in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "aten::mm", "aten::addmm")):
        return "matmul"
    if low.startswith("triton_"):
        return "fused (triton)"
    if "memcpy" in low or "memset" in low:
        return "memory copy/set"
    return "other"


def summarize(averages, steps: int, wall_us: float, cuda: bool, top: int = 25) -> dict[str, Any]:
    """The profile of `steps` steps taking `wall_us` in all, from `prof.key_averages()`: the device kernels
    (CPU operators on a CPU) that take the most time of their own, each with its share of the total, the total
    by kernel family, the share of the wall time the device idled, and the host reads per step."""
    from torch.autograd import DeviceType

    key = _time_key(averages, cuda)
    if cuda:
        # Kernels only: a record_function range (Optimizer.step#StableAdamW.step) also has a device-side
        # event, spanning the kernels inside it.
        events = [
            e
            for e in averages
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
    else:
        events = list(averages)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total_us = sum(getattr(e, key) for e in events)
    kinds: dict[str, float] = {}
    for event in events:
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + getattr(event, key)
    host_reads = sum(e.count for e in averages if e.key == _HOST_READ and e.device_type == DeviceType.CPU)
    copies_to_host = sum(e.count for e in events if "dtoh" in e.key.lower()) if cuda else None
    share = (lambda us: us / total_us) if total_us else (lambda us: None)
    return {
        "steps": steps,
        "sorted_by": key,
        "counted": "device kernels" if cuda else "CPU operators",
        "total_ms_per_step": total_us / 1e3 / steps,
        # Under the profiler (which slows the host a little): the wall time the kernels do not fill.
        "wall_ms_per_step": wall_us / 1e3 / steps,
        "device_idle_share": max(0.0, 1 - total_us / wall_us) if cuda and wall_us else None,
        # `.item()` calls per step, and (on a GPU) device-to-host copies: each a host sync.
        "host_reads_per_step": host_reads / steps,
        "copies_to_host_per_step": copies_to_host / steps if cuda else None,
        "by_kind": {
            kind: {"ms_per_step": us / 1e3 / steps, "share": share(us)}
            for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
        "top": [
            {
                "name": event.key,
                "kind": kernel_kind(event.key),
                "ms_per_step": getattr(event, key) / 1e3 / steps,
                "share": share(getattr(event, key)),
                "calls_per_step": event.count / steps,
            }
            for event in events[:top]
        ],
    }


def table(averages, cuda: bool, top: int = 25) -> str:
    """torch's own table of the same events, for a log."""
    return averages.table(sort_by=_time_key(averages, cuda), row_limit=top, max_name_column_width=70)


def _time_key(averages, cuda: bool) -> str:
    if not cuda:
        return "self_cpu_time_total"
    # `self_device_time_total` in newer torch, `self_cuda_time_total` in older.
    newer = not len(averages) or hasattr(averages[0], "self_device_time_total")
    return "self_device_time_total" if newer else "self_cuda_time_total"
