"""The `profile` recipe key: torch.profiler over a few whole batches of the run, on rank 0.

A batch is profiled from the moment the Trainer asks for its data to the moment it asks for the next batch's,
so everything Composer does per batch counts (data wait, forward, backward, the optimizer, callbacks, logging,
host syncs), not the model's step alone as `benchmarks.bench_gpu --profile` times it. The gap between the two
is what the training loop costs. The summary (`modernbert_train.profiling.summarize`: top kernels, kernel
families, the device's idle share, host reads per batch) goes to `<save_folder>/profile.json` and the log;
`profile.trace` also writes the Chrome trace.
"""

import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from modernbert_train import storage
from modernbert_train.profiling import summarize, table

log = logging.getLogger(__name__)

SUMMARY, TRACE = "profile.json", "profile-trace.json"


class BatchProfiler(Callback):
    def __init__(self, start_batch: int, batches: int, folder: str | None, trace: bool = False):
        self.first = start_batch
        self.last = start_batch + batches - 1
        self.folder = folder
        self.trace = trace
        self._profiler: torch.profiler.profile | None = None
        self._cuda = False
        self._began = 0.0
        self._done = dist.get_global_rank() != 0

    def fit_start(self, state: State, logger: Logger) -> None:
        resumed_at = int(state.timestamp.batch) + 1
        if not self._done and resumed_at > self.first:
            log.info(
                "profile: not profiled, the run goes on from batch %d, after profile.start_batch=%d",
                resumed_at,
                self.first,
            )
            self._done = True

    def before_dataloader(self, state: State, logger: Logger) -> None:
        if self._done:
            return
        batch = int(state.timestamp.batch) + 1  # the batch whose data is asked for now
        if self._profiler is None and batch == self.first:
            self._start(state)
        elif self._profiler is not None and batch > self.last:
            self._stop(state, batch - self.first)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._profiler is not None:  # the run ended inside the window
            self._stop(state, int(state.timestamp.batch) + 1 - self.first)

    def _start(self, state: State) -> None:
        self._cuda = any(p.is_cuda for p in state.model.parameters())
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()
        self._began = time.perf_counter()

    def _stop(self, state: State, batches: int) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - self._began) * 1e6
        profiler, self._profiler, self._done = self._profiler, None, True
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages()
        summary = summarize(averages, batches, wall_us, self._cuda)
        last = self.first + batches - 1
        result = {
            "batches": [self.first, last],
            "device": torch.cuda.get_device_name() if self._cuda else "cpu",
            "torch": torch.__version__,
            **summary,
        }
        idle = summary["device_idle_share"]
        log.info(
            "profile of batches %d-%d: %.1f ms per batch, of which %s; %.1f host reads per batch\n%s",
            self.first,
            last,
            summary["wall_ms_per_step"],
            f"the device idled {idle:.0%}" if idle is not None else "CPU operators below",
            summary["host_reads_per_step"],
            table(averages, self._cuda),
        )
        if self.folder:
            self._write(json.dumps(result, indent=2) + "\n", profiler)

    def _write(self, text: str, profiler: torch.profiler.profile) -> None:
        """Diagnostics: a folder that cannot take them is a warning, never the run's end."""
        target = storage.join(self.folder, SUMMARY)
        try:
            storage.write_text(target, text)
            if self.trace:
                trace = storage.join(self.folder, TRACE)
                if storage.is_uri(self.folder):
                    with tempfile.TemporaryDirectory() as staging:
                        local = Path(staging, TRACE)
                        profiler.export_chrome_trace(str(local))
                        storage.upload_file(local, trace)
                else:
                    profiler.export_chrome_trace(str(trace))
        except (OSError, storage.StorageError) as e:
            log.warning("profile: cannot write to %s: %s", storage.display(self.folder), e)
            return
        log.info("profile: written to %s", storage.display(target))
