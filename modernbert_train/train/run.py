"""Wires a TrainConfig into a Composer Trainer: model, data, optimizer, schedule, callbacks, loggers.

Each component is built by its own package; this file only connects them and chooses Composer's options.
"""

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from composer import Trainer
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Evaluator, Time, TimeUnit
from composer.loggers import WandBLogger
from composer.utils import FSDP2Config, collect_env, dist, reproducibility
from torch.distributed.checkpoint.api import CheckpointException

from modernbert_train import storage
from modernbert_train.data.tokens import IDENTITY_PARTS, tokenizer_identity
from modernbert_train.hf import HFCheckpointError, check_data_tokenizer, from_hf, read_hf_config
from modernbert_train.model import ModernBertConfig, pad_vocab_size
from modernbert_train.model.attention import resolve_backend
from modernbert_train.optim import build_optimizer
from modernbert_train.train.checkpoint import CheckpointError, PhaseChange, explain_mismatch
from modernbert_train.train.checkpoint_files import METRICS, AtomicCheckpointSaver
from modernbert_train.train.composer_model import ModernBertMLM, data_spec
from modernbert_train.train.config import ConfigError, to_dict, to_yaml
from modernbert_train.train.data import TrainData, build_data, device_microbatch_size
from modernbert_train.train.data_state import ObserveDataState
from modernbert_train.train.data_wait import DataWaitMonitor
from modernbert_train.train.export import export_trainer_model
from modernbert_train.train.fsdp_grads import average_fsdp_gradients
from modernbert_train.train.jsonl_logger import JSONLLogger
from modernbert_train.train.nonfinite_guard import NonFiniteGuard
from modernbert_train.train.periodic_export import periodic_export
from modernbert_train.train.preemption import SaveOnSigterm
from modernbert_train.train.profiler import BatchProfiler
from modernbert_train.train.run_lock import BucketRunLock, RunLock
from modernbert_train.train.run_metadata import RunMetadata
from modernbert_train.train.schedulers import build_scheduler
from modernbert_train.train.schema import TrainConfig
from modernbert_train.train.start import RunStart, StartKind, decide_start

log = logging.getLogger(__name__)


class StepTrainer(Trainer):
    """Composer's Trainer, stepping the optimizer after the micro-batches rather than through a closure.

    Composer's closure returns the batch's loss as a Python float: a host read between the backward and the
    optimizer step, so on a GPU the optimizer's launches wait for the whole backward to run, and the device
    idles while they are made (optimi's Triton step: an 8 ms launch span per step for base, measured on an
    H200). Without it, nothing reads the device before the step (the non-finite guard hands its verdict to
    the optimizer on the device, see NonFiniteGuard). Our optimizer needs no closure: the same forward,
    backward and step run in the same order; amp_fp16's loss scaler steps without one either way.
    """

    def _use_closures(self) -> bool:
        return False


@functools.cache
def _cpu_model_from_proc(ask_cpuinfo: Callable[[], str]) -> str:
    """The host CPU's name as the Linux kernel gives it (the brand string py-cpuinfo also reads); where
    /proc/cpuinfo has no "model name" line (ARM hosts) or no such file, py-cpuinfo's answer."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return ask_cpuinfo()


def cpu_model_without_a_subprocess() -> None:
    """Composer's Trainer and every checkpoint it writes record the host CPU's name
    (collect_env.get_composer_env_dict), which py-cpuinfo finds by running a Python subprocess: 1.1 s of
    every rank's start, an eighth of a tiny CPU run (measured here). Read from /proc/cpuinfo instead, where
    it is; with a Composer without that function, nothing changes."""
    ask_cpuinfo = getattr(collect_env, "get_cpu_model", None)
    if ask_cpuinfo is None or getattr(ask_cpuinfo, "func", None) is _cpu_model_from_proc:
        return  # no such function, or replaced already
    collect_env.get_cpu_model = functools.partial(_cpu_model_from_proc, ask_cpuinfo)


@dataclass
class Run:
    trainer: Trainer
    model: ModernBertMLM
    config: TrainConfig
    data: TrainData
    reset_time: bool
    preemption: SaveOnSigterm

    def fit(self) -> int:
        """Train, and export when training completed; the command's exit code (see train/preemption.py)."""
        self.trainer.fit(reset_time=self.reset_time)
        self.preemption.check_lock(self.trainer.state)
        exit_code = self.preemption.exit_code()
        if self.config.export.hf_dir and exit_code == 0:
            export_trainer_model(self.model, self.config.export.hf_dir, self.data.tokenizer_file)
            log.info("exported the model to %s", self.config.export.hf_dir)
        self.trainer.close()
        return exit_code


def model_config(
    config: TrainConfig, data: TrainData, pretrained: ModernBertConfig | None
) -> ModernBertConfig:
    """The preset, with vocabulary and special ids from the data's tokenizer, then the recipe's overrides.

    With `model.init_from_hf`, the pretrained model's config instead of the preset: its vocabulary and
    special ids must then be the data's, or the embeddings would mean other tokens.
    """
    info = data.tokenizer_info
    if pretrained is not None:
        check_tokenizer_fits(pretrained, info, config.model.init_from_hf, data.tokenizer_file)
        values = {**pretrained.to_dict(), "attn_backend": config.model.attn_backend, **config.model.overrides}
        return ModernBertConfig.from_dict(values)
    from_tokenizer = dict(
        vocab_size=pad_vocab_size(info.vocab_size),
        pad_token_id=info.pad_id,
        cls_token_id=info.cls_id,
        sep_token_id=info.sep_id,
        mask_token_id=info.mask_id,
        attn_backend=config.model.attn_backend,
    )
    return ModernBertConfig.from_preset(config.model.preset, **{**from_tokenizer, **config.model.overrides})


def check_tokenizer_fits(pretrained: ModernBertConfig, info, path: str, tokenizer_file) -> None:
    """The data's tokenizer is the checkpoint's (or extends it): its special ids, its size, then its
    tokenizer.json, compared with the one beside the checkpoint where there is one."""
    ids = {"pad_token_id": info.pad_id, "cls_token_id": info.cls_id, "sep_token_id": info.sep_id,
           "mask_token_id": info.mask_id}  # fmt: skip
    for name, data_id in ids.items():
        if getattr(pretrained, name) != data_id:
            raise ConfigError(
                f"model.init_from_hf: {path} has {name}={getattr(pretrained, name)} but the data's tokenizer "
                f"has {data_id}; shard the data with the checkpoint's tokenizer"
            )
    if info.vocab_size > pretrained.vocab_size:
        raise ConfigError(
            f"model.init_from_hf: {path} has vocab_size={pretrained.vocab_size}, smaller than the data's "
            f"tokenizer ({info.vocab_size}); shard the data with the checkpoint's tokenizer"
        )
    try:
        check_data_tokenizer(path, tokenizer_file)
    except HFCheckpointError as e:
        raise ConfigError(f"model.init_from_hf: {e}") from None


def load_pretrained(model: ModernBertMLM, pretrained: torch.nn.Module, path: str) -> None:
    try:
        model.model.load_state_dict(pretrained.state_dict())
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"model.init_from_hf: {path} does not fit the configured model: {detail}") from None


def precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "amp_bf16" if torch.cuda.is_available() else "fp32"


def progress_bar(config: TrainConfig) -> bool:
    return config.progress_bar if config.progress_bar is not None else sys.stderr.isatty()


def save_resolved_config(config: TrainConfig) -> None:
    if config.save_folder and dist.get_global_rank() == 0:
        storage.write_text(storage.join(config.save_folder, "config.yaml"), to_yaml(config))


def parallelism(config: TrainConfig) -> dict | None:
    """FSDP2 when the recipe asks for FSDP (Composer would otherwise pick its legacy FSDP1); else DDP."""
    if config.parallelism.fsdp is None:
        return None
    return {"fsdp": FSDP2Config(**asdict(config.parallelism.fsdp))}


def loggers(
    config: TrainConfig, lock_lost: Callable[[], str | None] = lambda: None, start: RunStart | None = None
) -> list:
    destinations = []
    if config.save_folder:
        every = Time.from_timestring(config.log_interval)
        every_n = int(every.value) if every.unit == TimeUnit.BATCH else 1
        metrics = storage.join(config.save_folder, METRICS)
        destinations.append(JSONLLogger(metrics, every_n, config.save_interval, lock_lost))
    wandb = config.loggers.wandb
    if wandb is not None:
        init_kwargs = {}
        if wandb.mode:
            init_kwargs["mode"] = wandb.mode
        run_id = wandb_run_id_for(config, start)
        if run_id is not None:  # W&B creates it where it has no run of that id
            init_kwargs.update(id=run_id, resume="allow")
            if start is not None and run_id == start.wandb_run_id and dist.get_global_rank() == 0:
                print(
                    f"modernbert-train: continuing W&B run {run_id} of checkpoint {start.checkpoint}",
                    file=sys.stderr,
                )
        destinations.append(
            RecipeWandBLogger(
                to_dict(config),
                project=wandb.project,
                entity=wandb.entity,
                group=wandb.group,
                name=wandb.name or config.run_name,
                tags=list(wandb.tags),
                log_artifacts=wandb.log_artifacts,
                init_kwargs=init_kwargs,
            )
        )
    return destinations


class RecipeWandBLogger(WandBLogger):
    """Composer's W&B logger, logging the resolved recipe as the run's config, where a value may change: a
    continued W&B run holds the config of its earlier starts, and a resume may change a value (max_duration,
    the ranks per node, the node's name in Composer's own hyperparameters), which `wandb.config.update`
    refuses (a ConfigError traceback while the Trainer is built)."""

    def __init__(self, recipe: dict, **kwargs):
        super().__init__(**kwargs)
        self._recipe = recipe

    def init(self, state, logger) -> None:
        super().init(state, logger)
        self.log_hyperparameters(self._recipe)

    def log_hyperparameters(self, hyperparameters: dict) -> None:
        if self._enabled:
            import wandb

            wandb.config.update(hyperparameters, allow_val_change=True)


def wandb_run_id_for(config: TrainConfig, start: RunStart | None) -> str | None:
    """The W&B run to log to: the recipe's `loggers.wandb.id`; else WANDB_RUN_ID; else, for a resume or a
    clock-continuing load, the one its checkpoint logged to, so restarts after a crash or preemption continue
    one run; else None: W&B creates a new one. Any of them is opened with resume="allow" (created where
    there is none), so every start with the same id logs to one run."""
    if config.loggers.wandb.id:
        return config.loggers.wandb.id
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return None if start is None else start.wandb_run_id


# What eval_subset_num_batches=-1 (the whole eval split) passes to Composer: a count no split reaches (a
# million batches per rank is hours of evaluation) that its console logger can still lay out.
WHOLE_EVAL_SPLIT = 1_000_000


LOADS = (StartKind.LOAD, StartKind.PHASE_CHANGE)


def _check_warmup_start(config: TrainConfig, start: RunStart, data: TrainData) -> None:
    """A batch-size warmup whose start is below one micro-batch per rank starts at that instead: refused for a
    run that starts its clock anew (fix the recipe), a warning on a resume or load (its start is fixed)."""
    problem = data.train_loader.dataset.schedule.start_below_a_micro_batch()
    if problem is None:
        return
    if start.kind in (StartKind.FRESH, StartKind.PHASE_CHANGE):
        raise ConfigError(f"data.{problem}")
    if dist.get_global_rank() == 0:
        print(f"modernbert-train: warning: data.{problem}", file=sys.stderr)


def evaluation_batches(config: TrainConfig) -> int:
    """Composer's eval_subset_num_batches. Its -1 is refused for a loader without a length, and ours has none
    (its batch count depends on the packing); the eval split is finite, so it ends before the count."""
    return config.eval_subset_num_batches if config.eval_subset_num_batches > 0 else WHOLE_EVAL_SPLIT


def _check_tokenizer(start: RunStart, tokenizer_file: Path) -> None:
    """A resume, load or phase change trains on with the checkpoint's embeddings: the tokenizer must be the
    one it was trained with: its path may have moved and its file be reformatted, its ids may not change
    (`tokenizer_identity`, the rule the shard checks and export follow)."""
    kinds = (StartKind.RESUME, StartKind.LOAD, StartKind.PHASE_CHANGE)
    if start.tokenizer_identity is None or start.kind not in kinds:
        return
    if tokenizer_identity(Path(tokenizer_file).read_text()) != start.tokenizer_identity:
        raise CheckpointError(
            f"tokenizer {tokenizer_file} is not the one checkpoint {start.checkpoint} was trained with (its "
            f"{IDENTITY_PARTS} differ); use that tokenizer and data sharded with it, or "
            "start a new run"
        )


def _why_not_loaded(load_path: str, model: ModernBertMLM) -> str | None:
    """Why the Trainer could not load `load_path` (a checkpoint of another model, or none there), in one
    line; None when it is not the checkpoint's fault (the Trainer's own error is then raised). A bucket's
    checkpoint (a file, or a sharded one's folder) is fetched to compare; a sharded folder's shapes are
    read from its .metadata."""
    if storage.is_uri(load_path):
        if storage.exists(load_path):
            fetch = storage.local_file
        elif storage.list_files(load_path):
            fetch = storage.local_folder
        else:
            return f"checkpoint not found: {load_path}"
        with fetch(load_path) as local:
            try:
                return explain_mismatch(local, model.model, model.config, shown=load_path)
            except CheckpointError as e:  # unreadable: named as the bucket's, not the download's
                return str(e).replace(str(local), load_path)
    if Path(load_path).exists():
        return explain_mismatch(load_path, model.model, model.config)
    return f"checkpoint not found: {load_path}"


def build_run(
    config: TrainConfig, start: RunStart | None = None, lock: RunLock | BucketRunLock | None = None
) -> Run:
    """The Trainer for `config`, starting as `start` says (decided here when not given). `lock`: the save
    folder's lock, held by rank 0 (train/main.py); once it is lost the run stops and writes nothing more
    there."""
    start = start or decide_start(config)
    # The data is checked first (every stream's index and shards, the tokenizer): a bad dataset is one line,
    # with no log lines before it. build_data draws nothing from the global RNGs.
    data = build_data(config)
    _check_tokenizer(start, data.tokenizer_file)
    _check_warmup_start(config, start, data)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    reproducibility.seed_all(config.seed)  # before the model exists: its initial weights follow the seed
    init_from = config.model.init_from_hf
    model = ModernBertMLM(model_config(config, data, read_hf_config(init_from) if init_from else None))
    # A forced backend that cannot train on this device is refused now, not at the first forward.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = precision(config) != "fp32"
    resolve_backend(model.config.attn_backend, device, model.config.attention_dropout > 0, True, half)
    # The released weights only start a run: a resumed or loaded checkpoint replaces them.
    if init_from and start.kind is StartKind.FRESH:
        load_pretrained(model, from_hf(init_from), init_from)
    if config.model.compile:
        # The unpadding and sparse head around the layers have data-dependent shapes that would break one
        # whole-model graph.
        model.model.model.compile_layers()
    optimizer = build_optimizer(
        model.model,
        lr=config.optimizer.lr,
        betas=tuple(config.optimizer.betas),
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
        decouple_lr=config.optimizer.decouple_lr,
        impl=config.optimizer.impl,
        compile=config.optimizer.compile,
        **({"no_decay": config.optimizer.no_decay} if config.optimizer.no_decay is not None else {}),
    )
    scheduler = build_scheduler({k: v for k, v in to_dict(config)["scheduler"].items() if v is not None})

    lock_lost = lock.lost if lock is not None else lambda: None
    sigterm = SaveOnSigterm(config.save_interval, saves=bool(config.save_folder), lock_lost=lock_lost)
    destinations = loggers(config, lock_lost, start)
    callbacks = [
        SpeedMonitor(window_size=config.speed_window),
        LRMonitor(),
        ObserveDataState(),
        DataWaitMonitor(),
        NonFiniteGuard(config.max_nonfinite_batches, config.grad_clip_norm),
        RunMetadata(model.config.to_dict(), str(data.tokenizer_file), to_dict(config)),
        sigterm,
    ]
    callbacks += [d.writer_before_save() for d in destinations if isinstance(d, JSONLLogger)]
    if config.save_folder:
        overwrite = not config.autoresume
        keep = config.save_num_checkpoints_to_keep
        callbacks.append(
            AtomicCheckpointSaver(config.save_folder, sigterm.save_interval, overwrite, keep, lock_lost)
        )
    if config.export.interval:
        callbacks.append(
            periodic_export(
                config.export.interval, config.export.hf_dir, model, data.tokenizer_file, lock_lost
            )
        )
    phase_change = PhaseChange() if start.kind is StartKind.PHASE_CHANGE else None
    if phase_change:
        callbacks.append(phase_change)
    if config.profile.start_batch is not None:
        profile = config.profile
        callbacks.append(
            BatchProfiler(profile.start_batch, profile.batches, config.save_folder, profile.trace)
        )
    evaluators = []
    if data.eval_loader is not None:
        evaluators.append(
            Evaluator(
                label="eval",
                dataloader=data_spec(data.eval_loader),
                metric_names=list(model.eval_metrics),
                device_eval_microbatch_size=data.eval_batch_size,
            )
        )
    save_resolved_config(config)
    resume = start.kind is StartKind.RESUME
    trainer_kwargs = dict(
        model=model,
        train_dataloader=data_spec(data.train_loader),
        eval_dataloader=evaluators or None,
        eval_interval=config.eval_interval,
        eval_subset_num_batches=evaluation_batches(config),
        max_duration=config.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        callbacks=callbacks,
        loggers=destinations,
        run_name=config.run_name,
        progress_bar=progress_bar(config),
        log_to_console=not progress_bar(config),
        console_log_interval=config.log_interval,
        precision=precision(config),
        device_train_microbatch_size=device_microbatch_size(config),
        accumulate_train_batch_on_tokens=True,  # a mean over labelled tokens (composer_model.token_counts)
        seed=config.seed,
        save_folder=config.save_folder,
        save_interval=sigterm.save_interval,
        save_num_checkpoints_to_keep=config.save_num_checkpoints_to_keep,
        save_overwrite=not config.autoresume,
        # Never Composer's autoresume: a resume loads the checkpoint decide_start found, like a load_path.
        # Composer's would ask every logger for a `latest` checkpoint (W&B's fails offline, or searches the
        # project's artifacts), and on several nodes every node's first rank writes, then removes, one signal
        # file of the same name in a shared save_folder: the second removal fails, so no multi-node run
        # could resume.
        autoresume=False,
        # The checkpoint decide_start chose: a resume's, or the one load_path names (the newest of another
        # run's save_folder).
        load_path=start.checkpoint if resume or start.kind in LOADS else None,
        load_weights_only=config.load_weights_only and not resume,
        load_ignore_keys=phase_change.ignore_keys if phase_change else None,
        parallelism_config=parallelism(config),
        dist_timeout=config.dist_timeout,
    )
    load_path = start.checkpoint
    cpu_model_without_a_subprocess()
    try:
        trainer = StepTrainer(**trainer_kwargs)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        if load_path is None:
            raise
        problem = _why_not_loaded(load_path, model)
        if problem is None:
            raise
        raise CheckpointError(problem) from e
    average_fsdp_gradients(trainer.state.model)  # the Trainer sharded it
    return Run(trainer, model, config, data, reset_time=start.reset_time, preemption=sigterm)
