"""Fine-tune one encoder on one task over several seeds; score the eval split after every epoch."""

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from modernbert_train import storage
from modernbert_train.hf import HFCheckpointError, check_vocabulary, from_hf, read_hf_config
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

from .data import Examples, FinetuneError, read_examples
from .metrics import classification_scores, regression_scores
from .model import ModernBertForSequenceClassification

RESULTS_FILE = "results.json"


@dataclass
class FinetuneSettings:
    task: str = "classification"  # classification | regression
    text_field: str = "text"
    pair_field: str | None = None
    label_field: str = "label"
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 512
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    dropout: float = 0.1
    random_init: bool = False  # the same architecture with fresh weights: the baseline pretraining must beat
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda; on cuda in bf16 autocast

    def check(self) -> None:
        if self.task not in ("classification", "regression"):
            raise FinetuneError(f"--task must be classification or regression, got {self.task!r}")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise FinetuneError(f"{flag} must be at least 1, got {value}")
        if self.max_length < 4:
            raise FinetuneError(f"--max-length must be at least 4, got {self.max_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"--lr must be a positive finite number, got {self.lr}")
        if not self.seeds:
            raise FinetuneError("--seeds needs at least one seed")
        if any(seed < 0 for seed in self.seeds):
            raise FinetuneError(f"--seeds must be non-negative integers, got {self.seeds}")
        for flag, value, fits, wanted in (
            ("--dropout", self.dropout, 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("--warmup-ratio", self.warmup_ratio, 0.0 <= self.warmup_ratio <= 1.0, "in [0, 1]"),
            (
                "--weight-decay",
                self.weight_decay,
                0.0 <= self.weight_decay < math.inf,
                "finite and at least 0",
            ),
        ):
            if not fits:  # NaN fails every comparison
                raise FinetuneError(f"{flag} must be {wanted}, got {value}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise FinetuneError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FinetuneError("--device cuda: no CUDA device is available here")

    def torch_device(self) -> torch.device:
        return torch.device(
            "cuda"
            if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )


def load_tokenizer(model_dir: Path, config: ModernBertConfig) -> Tokenizer:
    """model_dir's tokenizer.json, checked to fit the model's vocabulary (as hf.py checks an export's)."""
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise FinetuneError(f"{model_dir}: no tokenizer.json (export the model with its tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises its own Exception type for a damaged file
        raise FinetuneError(f"{file}: not a tokenizer.json the tokenizers library reads ({error})") from None
    try:
        check_vocabulary(tokenizer.get_vocab_size(with_added_tokens=True), config)
    except HFCheckpointError as error:  # ids past the embedding table: an IndexError deep in training
        raise FinetuneError(f"{model_dir}: {error}") from None
    return tokenizer


def encode(
    tokenizer: Tokenizer, examples: Examples, config: ModernBertConfig, max_length: int
) -> list[list[int]]:
    """[CLS] text [SEP] (or [CLS] a [SEP] b [SEP]), the longer side cut first to fit max_length."""
    cls, sep = config.cls_token_id, config.sep_token_id

    def ids(texts):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    firsts = ids(examples.texts)
    if examples.pairs is None:
        return [[cls, *a[: max_length - 2], sep] for a in firsts]
    out = []
    for a, b in zip(firsts, ids(examples.pairs)):
        budget = max_length - 3
        while len(a) + len(b) > budget:
            if len(a) >= len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        out.append([cls, *a, sep, *b, sep])
    return out


def batches(sequences: list[list[int]], order: np.ndarray, batch_size: int, device: torch.device):
    """(flat input_ids, cu_seqlens, max_seqlen, indices) per batch, in `order`, on `device`."""
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        lengths = [len(sequences[i]) for i in chosen]
        flat = torch.tensor([token for i in chosen for token in sequences[i]], dtype=torch.long)
        cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        yield flat.to(device), cu_seqlens.to(device), max(lengths), chosen


def autocast(device: torch.device):
    """bf16 autocast on a GPU (its attention kernels want half precision); fp32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def predict(model, sequences, batch_size: int, device: torch.device) -> np.ndarray:
    """The model's outputs (examples x labels) in float32: the caller checks them before taking argmax,
    which would make NaN logits class 0."""
    model.eval()
    out = []
    with torch.no_grad(), autocast(device):
        for flat, cu_seqlens, max_seqlen, _ in batches(
            sequences, np.arange(len(sequences)), batch_size, device
        ):
            out.append(model(flat, cu_seqlens, max_seqlen).float())
    return torch.cat(out).cpu().numpy()


def diverged(where: str, what: str, settings: FinetuneSettings) -> FinetuneError:
    return FinetuneError(
        f"{where}: {what} (training diverged; no results written); try a lower --lr than {settings.lr:g}"
    )


def build_model(model_dir: Path, num_labels: int, settings: FinetuneSettings):
    masked_lm = (
        ModernBertForMaskedLM(read_hf_config(model_dir)) if settings.random_init else from_hf(model_dir)
    )
    return ModernBertForSequenceClassification(masked_lm, num_labels, settings.dropout)


def optimizer_and_schedule(model, settings: FinetuneSettings, steps: int):
    # Norm weights and biases are left undecayed, as BERT fine-tuning has always done.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    warmup = max(1, math.ceil(settings.warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    return optimizer, schedule


def run_seed(model_dir, seed, train_ids, train, eval_ids, eval_labels, num_labels, settings) -> list[dict]:
    torch.manual_seed(seed)  # the random init (baseline), the classifier and dropout follow the seed
    regression = settings.task == "regression"
    device = settings.torch_device()
    model = build_model(model_dir, num_labels, settings).to(device)
    steps = settings.epochs * math.ceil(len(train_ids) / settings.batch_size)
    optimizer, schedule = optimizer_and_schedule(model, settings, steps)
    targets = torch.tensor(train.labels, dtype=torch.float32 if regression else torch.long, device=device)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        losses = []
        for flat, cu_seqlens, max_seqlen, chosen in batches(
            train_ids, rng.permutation(len(train_ids)), settings.batch_size, device
        ):
            with autocast(device):
                logits = model(flat, cu_seqlens, max_seqlen).float()
            batch_targets = targets[torch.from_numpy(chosen).to(device)]
            if regression:
                loss = F.mse_loss(logits.squeeze(1), batch_targets)
            else:
                loss = F.cross_entropy(logits, batch_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        # Checked once an epoch (one host sync, which the mean below needs anyway): a diverged run is an
        # error, never a score (NaN logits would all be class 0).
        epoch_losses = torch.stack(losses).double()
        train_loss = float(epoch_losses.mean())
        if not math.isfinite(train_loss):
            bad = torch.nonzero(~torch.isfinite(epoch_losses)).flatten().tolist()
            step = f", step {bad[0] + 1} of {len(losses)}" if bad else ""
            raise diverged(
                f"seed {seed}, epoch {epoch}{step}", f"the training loss is {train_loss}", settings
            )
        logits = predict(model, eval_ids, settings.batch_size, device)
        if not np.isfinite(logits).all():
            raise diverged(
                f"seed {seed}, epoch {epoch}", "the model's outputs on --eval are not finite", settings
            )
        scores = (
            regression_scores(logits[:, 0], eval_labels)
            if regression
            else classification_scores(logits.argmax(axis=1), eval_labels, num_labels)
        )
        history.append({"epoch": epoch, "train_loss": train_loss, **scores})
    return history


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each score's mean and sample standard deviation (ddof=1; 0 for one seed) over seeds, at the last
    epoch. A score that is NaN for any seed (a correlation of constant predictions) makes both NaN."""
    finals = [run["epochs"][-1] for run in runs]
    names = [name for name in finals[0] if name not in ("epoch", "train_loss")]
    summary = {}
    for name in names:
        values = [f[name] for f in finals]
        spread = float(np.std(values, ddof=1)) if len(values) >= 2 else 0.0
        summary[name] = {"mean": float(np.mean(values)), "std": spread}
    return summary


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def json_text(value) -> str:
    """Indented JSON. JSON has no NaN or infinity: such a number is written as the string "nan", "inf" or
    "-inf" (which float() reads back), as metrics.jsonl writes them."""
    return json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n"


def check_output(output: str) -> str:
    """Where results.json will go, checked before any work: a folder (local or a URI), not a file."""
    if storage.is_uri(output):
        storage.check(output, "--output")
        return storage.join(output, RESULTS_FILE)
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"--output {output}: is a file; name a folder for {RESULTS_FILE}")
    # Created when the results are written: a run refused for its input leaves no empty folder behind.
    if (problem := storage.why_not_creatable(folder / RESULTS_FILE)) is not None:
        raise FinetuneError(f"--output {output}: cannot create it: {problem}")
    return str(folder / RESULTS_FILE)


def finetune(
    model_dir: str | Path, train_file: str | Path, eval_file: str | Path, output: str | Path,
    settings: FinetuneSettings,
) -> dict:  # fmt: skip
    """Fine-tune over settings.seeds; writes and returns output/results.json's content (a NaN score is a
    float here, "nan" in the file). MODEL_DIR, the files and the output may be local or URIs. A run whose
    training diverges is a FinetuneError and writes nothing."""
    settings.check()
    results_path = check_output(str(output))
    regression = settings.task == "regression"
    fields = dict(
        text_field=settings.text_field, label_field=settings.label_field, pair_field=settings.pair_field
    )
    train = read_examples(train_file, regression=regression, **fields)
    evaluation = read_examples(eval_file, regression=regression, label_names=train.label_names, **fields)
    if storage.is_uri(model_dir):
        for name in ("config.json", "tokenizer.json"):
            if not storage.exists(storage.join(model_dir, name)):
                raise FinetuneError(f"{model_dir}: no {name} (expected an exported ModernBERT folder)")
    with storage.local_folder(str(model_dir)) as local_model:
        config = read_hf_config(local_model)
        max_length = min(settings.max_length, config.max_position_embeddings)
        tokenizer = load_tokenizer(local_model, config)
        train_ids = encode(tokenizer, train, config, max_length)
        eval_ids = encode(tokenizer, evaluation, config, max_length)
        num_labels = 1 if regression else len(train.label_names)
        eval_labels = np.asarray(evaluation.labels, dtype=np.float64)

        start = time.perf_counter()
        runs = []
        for seed in settings.seeds:
            history = run_seed(
                local_model, seed, train_ids, train, eval_ids, eval_labels, num_labels, settings
            )
            runs.append({"seed": seed, "epochs": history})
    results = {
        "model": str(model_dir),
        "init": "random" if settings.random_init else "pretrained",
        "train": str(train_file),
        "eval": str(eval_file),
        "examples": {"train": len(train_ids), "eval": len(eval_ids)},
        "label_names": train.label_names,
        "settings": asdict(settings),
        "device": str(settings.torch_device()),
        "runs": runs,
        "final": summarise(runs),
        "seconds": time.perf_counter() - start,
    }
    storage.write_text(results_path, json_text(results))  # whole: staged, then renamed
    return results
