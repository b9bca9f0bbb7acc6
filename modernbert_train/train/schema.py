"""The training config schema: every key a recipe may set, its type and its default.

Top-level names follow Composer's Trainer arguments where Composer has one. Durations and intervals are
Composer time strings (`100ba`, `3e9tok`, `0.1dur`).
"""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    preset: str = "tiny"  # ModernBertConfig.from_preset name: tiny | mini | base | large
    overrides: dict[str, Any] = field(default_factory=dict)  # ModernBertConfig fields, e.g. global_rope_theta
    attn_backend: str = "auto"  # auto | sdpa | flex | varlen | flash
    compile: bool = False  # torch.compile each encoder layer (the unpadding around them stays eager)
    # A transformers ModernBERT folder to start from (continued pretraining): its config replaces the
    # preset (overrides still apply), its weights are the initial ones unless a checkpoint is resumed.
    init_from_hf: str | None = None


@dataclass
class DataSourceConfig:
    """One MDS folder of a mixture (streaming's Stream arguments); at most one of proportion/repeat/choose."""

    local: str | None = None  # a local MDS folder, or the cache folder for `remote`
    remote: str | None = None  # a remote URI streaming understands (s3://, gs://, ...)
    name: str | None = None
    split: str | None = None
    proportion: float | None = None  # share of the mixture's documents (not tokens: see `plan`)
    repeat: float | None = None  # times to repeat this source per epoch
    choose: int | None = None  # samples to draw from this source per epoch


@dataclass
class BatchSizeWarmupConfig:
    start: int = 0  # global sequences per batch at step 0; 0 turns the warmup off
    tokens: str = "0tok"  # ramps linearly up to global_train_batch_size over this many row slots


@dataclass
class DataConfig:
    train: list[DataSourceConfig] = MISSING
    eval: list[DataSourceConfig] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer.json or its folder; default: the first train source's
    max_seq_len: int = 1024
    # The training masking ratio: a number, or a schedule over the run applied per batch (Composer time
    # strings; tok counts row slots, as batch_size_warmup does), e.g. through a decay phase:
    #   {schedule: linear, start: 0.3, end: 0.15, t_start: 0ba, t_end: 1dur}
    #   {schedule: step, values: [0.3, 0.15], milestones: [0.9dur]}
    mlm_probability: Any = 0.3
    eval_mlm_probability: float = 0.15
    num_workers: int = 0
    lookahead: int = 1024  # chunks the best-fit packer buffers; each row starts with a random one
    shuffle: bool = True
    eval_batch_size: int | None = None  # per device; default: device_train_microbatch_size or 8
    batch_size_warmup: BatchSizeWarmupConfig = field(default_factory=BatchSizeWarmupConfig)
    # Remote streams' local cache (streaming's): bytes kept before the least recently used shards are
    # evicted (e.g. 200gb; default: no limit), and samples per worker downloaded ahead of use.
    cache_limit: str | None = None
    predownload: int | None = None


@dataclass
class OptimizerConfig:
    """StableAdamW (modernbert_train.optim.build_optimizer); defaults are ModernBERT-base's."""

    lr: float = 8e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5
    decouple_lr: bool = True  # weight decay follows the schedule's multiplier, not the raw lr
    no_decay: str | None = None  # comma list of norms,biases,embeddings; default: all three
    # auto | optimi (its Triton kernels on a GPU) | foreach (ours, multi-tensor, no host reads); auto takes
    # foreach on a GPU and for FSDP-sharded weights (the non-finite guard's verdict then stays on the
    # device), optimi on a CPU. The state is the same: a run may change it on resume.
    impl: str = "auto"
    # The foreach step through torch.compile: about three passes over the optimizer state where the
    # multi-tensor ops make about ten, for a compilation at the first steps. Implies foreach (under auto too).
    compile: bool = False


@dataclass
class SchedulerConfig:
    """modernbert_train.train.schedulers.build_scheduler; null keys take the named scheduler's default."""

    name: str = "wsd"  # wsd (warmup_stable_decay) | constant | linear | cosine
    t_warmup: str | None = None
    t_decay: str | None = None  # wsd: the tail of t_max that decays; 0tok keeps the lr constant
    decay_shape: str | None = None  # 1-sqrt | linear | cosine
    alpha_f: float | None = None  # final lr as a fraction of the peak
    t_max: str | None = None  # default 1dur: the end of max_duration
    warmup_start: float | None = None


@dataclass
class WandbConfig:
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # default: run_name
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; default: WANDB_MODE or online
    log_artifacts: bool = False  # upload checkpoints as W&B artifacts
    # The W&B run to log to (created or continued). Default: a resume or clock-continuing load goes on with
    # the run its checkpoint logged to; any other start gets a new one (or WANDB_RUN_ID's).
    id: str | None = None


@dataclass
class LoggersConfig:
    wandb: WandbConfig | None = None


@dataclass
class FSDPConfig:
    """Composer's FSDP2 (torch's fully_shard per layer); these are FSDP2Config's settable fields."""

    reshard_after_forward: bool = True  # False keeps gathered weights until backward (ZeRO-2 like)
    state_dict_type: str = "sharded"  # sharded: one file per rank; full: one file, gathered on rank 0
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    load_monolith_rank0_only: bool = False
    mixed_precision: str = "DEFAULT"  # DEFAULT | PURE | FULL
    verbose: bool = False


@dataclass
class ParallelismConfig:
    fsdp: FSDPConfig | None = None  # null: DDP when several ranks run


@dataclass
class ExportConfig:
    hf_dir: str | None = None  # written at the end of training (rank 0)
    interval: str | None = None  # e.g. 500ba: also a transformers folder every N batches, at <hf_dir>-ba<N>


@dataclass
class ProfileConfig:
    """torch.profiler over a few batches on rank 0 (train/profiler.py): where their time goes, written to
    <save_folder>/profile.json and the log, as `benchmarks.bench_gpu --profile` reports a step."""

    start_batch: int | None = None  # the first profiled batch (1: the first, compilation included); null: off
    batches: int = 3  # batches profiled, from the start of one to the start of the next (data wait included)
    trace: bool = False  # also <save_folder>/profile-trace.json, a Chrome trace (chrome://tracing; large)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    run_name: str | None = None  # required for autoresume
    seed: int = 17
    max_duration: str = MISSING
    global_train_batch_size: int = MISSING  # sequences (packed rows) per optimizer step, all ranks
    device_train_microbatch_size: int | None = None  # rows per forward; default: the whole device batch
    precision: str = "auto"  # auto (amp_bf16 on GPU, fp32 on CPU) | fp32 | amp_bf16 | amp_fp16
    grad_clip_norm: float | None = None
    max_nonfinite_batches: int = 3  # non-finite batches (step skipped) in a row that stop the run

    eval_interval: str = "1000ba"
    eval_subset_num_batches: int = -1  # batches per rank each evaluation; -1: the whole eval split
    log_interval: str = "10ba"  # console lines and metrics.jsonl rows
    progress_bar: bool | None = None  # default: on when stderr is a terminal
    speed_window: int = 10  # batches SpeedMonitor averages throughput over
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    save_folder: str | None = None
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    autoresume: bool = False
    # Without autoresume, a save_folder holding an earlier run's checkpoints or metrics.jsonl is refused;
    # save_overwrite=true deletes them first. (With autoresume the run continues them; this is not read.)
    save_overwrite: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    reset_time: bool = False  # start the clock (and schedule) at zero after load_path: phase changes
    # A resume (or load without reset_time) whose max_duration or scheduler gives another lr at the resumed
    # batch than the checkpoint's recipe did is refused (the lr would jump); true allows it on purpose.
    allow_schedule_change: bool = False

    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    dist_timeout: float = 300.0
    export: ExportConfig = field(default_factory=ExportConfig)
