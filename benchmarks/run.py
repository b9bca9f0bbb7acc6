"""`make bench`: every benchmark in one run, results printed and saved.

Each benchmark module has a `main() -> dict`. Times on shared machines move by 10% or more between
runs, so each benchmark reports ratios measured in one process (ours vs the reference, alternating)
and medians; the machine is recorded with the figures.
"""

import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

BENCHMARKS = ["bench_model", "bench_shard", "bench_packing"]


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(
            f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr
        )
        return 2
    results = {"date": datetime.date.today().isoformat(), "machine": machine()}
    for name in names:
        print(f"== {name}", flush=True)
        results[name] = importlib.import_module(f"benchmarks.{name}").main()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"cpu-{results['date']}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
