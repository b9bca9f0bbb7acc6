"""What the GPU benchmark and the device check both need to know about a machine, without importing torch."""

import importlib.metadata
import re

# Dense bf16 peak FLOP/s by device name; MFU is reported against these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results file's name."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
