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

from modernbert_train.hf import from_hf, read_hf_config
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

from .data import Examples, FinetuneError, read_examples
from .metrics import classification_scores, regression_scores
from .model import ModernBertForSequenceClassification


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

    def check(self) -> None:
        if self.task not in ("classification", "regression"):
            raise FinetuneError(f"--task must be classification or regression, got {self.task!r}")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise FinetuneError(f"{flag} must be at least 1, got {value}")
        if self.max_length < 4:
            raise FinetuneError(f"--max-length must be at least 4, got {self.max_length}")
        if not self.lr > 0:
            raise FinetuneError(f"--lr must be positive, got {self.lr}")
        if not self.seeds:
            raise FinetuneError("--seeds needs at least one seed")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise FinetuneError(f"{model_dir}: no tokenizer.json (export the model with its tokenizer)")
    return Tokenizer.from_file(str(file))


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


def batches(sequences: list[list[int]], order: np.ndarray, batch_size: int):
    """(flat input_ids, cu_seqlens, max_seqlen, indices) per batch, in `order`."""
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        lengths = [len(sequences[i]) for i in chosen]
        flat = torch.tensor([token for i in chosen for token in sequences[i]], dtype=torch.long)
        cu_seqlens = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        yield flat, cu_seqlens, max(lengths), chosen


def predict(model, sequences, batch_size: int, regression: bool) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for flat, cu_seqlens, max_seqlen, _ in batches(sequences, np.arange(len(sequences)), batch_size):
            logits = model(flat, cu_seqlens, max_seqlen)
            out.append(logits.squeeze(1) if regression else logits.argmax(dim=1))
    return torch.cat(out).float().numpy()


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
    model = build_model(model_dir, num_labels, settings)
    steps = settings.epochs * math.ceil(len(train_ids) / settings.batch_size)
    optimizer, schedule = optimizer_and_schedule(model, settings, steps)
    targets = torch.tensor(train.labels, dtype=torch.float32 if regression else torch.long)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(1, settings.epochs + 1):
        model.train()
        losses = []
        for flat, cu_seqlens, max_seqlen, chosen in batches(
            train_ids, rng.permutation(len(train_ids)), settings.batch_size
        ):
            logits = model(flat, cu_seqlens, max_seqlen)
            batch_targets = targets[torch.from_numpy(chosen)]
            if regression:
                loss = F.mse_loss(logits.squeeze(1), batch_targets)
            else:
                loss = F.cross_entropy(logits, batch_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        predicted = predict(model, eval_ids, settings.batch_size, regression)
        scores = (
            regression_scores(predicted, eval_labels)
            if regression
            else classification_scores(predicted, eval_labels, num_labels)
        )
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **scores})
    return history


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each score's mean and standard deviation over seeds, at the last epoch."""
    finals = [run["epochs"][-1] for run in runs]
    names = [name for name in finals[0] if name not in ("epoch", "train_loss")]
    return {
        name: {
            "mean": float(np.mean([f[name] for f in finals])),
            "std": float(np.std([f[name] for f in finals])),
        }
        for name in names
    }


def finetune(
    model_dir: str | Path, train_file: str | Path, eval_file: str | Path, output: str | Path,
    settings: FinetuneSettings,
) -> dict:  # fmt: skip
    """Fine-tune over settings.seeds; writes and returns output/results.json's content."""
    settings.check()
    model_dir = Path(model_dir)
    regression = settings.task == "regression"
    fields = dict(
        text_field=settings.text_field, label_field=settings.label_field, pair_field=settings.pair_field
    )
    train = read_examples(train_file, regression=regression, **fields)
    evaluation = read_examples(eval_file, regression=regression, label_names=train.label_names, **fields)
    config = read_hf_config(model_dir)
    max_length = min(settings.max_length, config.max_position_embeddings)
    tokenizer = load_tokenizer(model_dir)
    train_ids = encode(tokenizer, train, config, max_length)
    eval_ids = encode(tokenizer, evaluation, config, max_length)
    num_labels = 1 if regression else len(train.label_names)
    eval_labels = np.asarray(evaluation.labels, dtype=np.float64)

    start = time.perf_counter()
    runs = []
    for seed in settings.seeds:
        history = run_seed(model_dir, seed, train_ids, train, eval_ids, eval_labels, num_labels, settings)
        runs.append({"seed": seed, "epochs": history})
    results = {
        "model": str(model_dir),
        "init": "random" if settings.random_init else "pretrained",
        "train": str(train_file),
        "eval": str(eval_file),
        "examples": {"train": len(train_ids), "eval": len(eval_ids)},
        "label_names": train.label_names,
        "settings": asdict(settings),
        "runs": runs,
        "final": summarise(runs),
        "seconds": time.perf_counter() - start,
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
