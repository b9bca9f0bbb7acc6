"""Reading Composer checkpoints, and one-line explanations of why one cannot be loaded.

Composer checkpoints are pickles (`torch.load(weights_only=False)`): load only your own. Weights from
elsewhere come in through `modernbert_train.hf.from_hf` (safetensors).
"""

from pathlib import Path
from typing import Any

import torch

from modernbert_train.model import ModernBertConfig
from modernbert_train.train.run_metadata import metadata_from_checkpoint

# Config fields that change no weight shape: a checkpoint loads fine across them (phase changes).
SHAPE_FREE_FIELDS = {
    "global_rope_theta",
    "local_rope_theta",
    "local_attention",
    "global_attn_every_n_layers",
    "attn_backend",
    "max_position_embeddings",
    "attention_dropout",
    "embedding_dropout",
    "mlp_dropout",
    "initializer_range",
    "initializer_cutoff_factor",
    "norm_eps",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder (a sharded checkpoint); give a .pt file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or not a checkpoint): {reason}"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint.get("state", {}):
        raise CheckpointError(f"checkpoint {path} is not a Composer checkpoint (no state/model)")
    return checkpoint


def model_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ModernBertForMaskedLM's state dict out of a Composer checkpoint of ModernBertMLM."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in checkpoint["state"]["model"].items() if k.startswith(prefix)}


def explain_mismatch(path: str | Path, model: torch.nn.Module, config: ModernBertConfig) -> str | None:
    """Why the checkpoint at `path` does not fit `model` (a ModernBertForMaskedLM), or None if it does."""
    checkpoint = read_checkpoint(path)
    saved_config = (metadata_from_checkpoint(checkpoint) or {}).get("model_config")
    if saved_config:
        differing = [
            f"{k}={saved_config[k]} there, {v} here"
            for k, v in config.to_dict().items()
            if k not in SHAPE_FREE_FIELDS and k in saved_config and saved_config[k] != v
        ]
        if differing:
            return f"checkpoint {path} holds another model: {'; '.join(differing)}"
    weights = model_weights(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        return f"checkpoint {path} lacks weight '{missing[0]}' ({len(missing)} missing in all)"
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        return f"checkpoint {path} has weight '{unexpected[0]}' that this model lacks"
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            return (
                f"checkpoint {path}: weight '{name}' is {list(weights[name].shape)} there but "
                f"{list(tensor.shape)} in this model"
            )
    return None


class PhaseChangeFilter:
    """Composer `load_ignore_keys` for a new phase (load_path with reset_time): the weights and the optimizer
    moments carry over; the data stream, the schedule and the optimizer hyperparameters are this recipe's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state"]
        state.pop("dataset_state", None)
        state.pop("schedulers", None)
        for saved in state.get("optimizers", {}).values():
            for saved_group, group in zip(saved.get("param_groups", []), self.optimizer.param_groups):
                saved_group.update({k: v for k, v in group.items() if k != "params"})
