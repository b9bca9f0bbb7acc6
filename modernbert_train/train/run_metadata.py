"""Keeps what export and later phases need inside every checkpoint: model config, tokenizer, recipe."""

from pathlib import Path
from typing import Any

from composer.core import Callback


class RunMetadata(Callback):
    """Composer saves each callback's `state_dict` under `state/callbacks/RunMetadata` in the checkpoint.

    Loading a checkpoint never overwrites this run's own metadata (a phase change may set a new RoPE
    theta); what the checkpoint held is kept in `loaded`.
    """

    def __init__(self, model_config: dict[str, Any], tokenizer_file: str, recipe: dict[str, Any]):
        # The tokenizer itself travels too (a few MB at most), so export works wherever the checkpoint goes.
        self.metadata = {
            "model_config": model_config,
            "tokenizer": tokenizer_file,
            "tokenizer_json": Path(tokenizer_file).read_text(),
            "recipe": recipe,
        }
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(self.metadata)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def metadata_from_checkpoint(checkpoint: dict) -> dict[str, Any] | None:
    return checkpoint.get("state", {}).get("callbacks", {}).get(RunMetadata.__qualname__)
