"""Keeps what export and later phases need inside every checkpoint: model config, tokenizer, recipe, and the
W&B run it logged to (a resume continues that run)."""

import json
import sys
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class RunMetadata(Callback):
    """Composer saves each callback's `state_dict` under `state/callbacks/RunMetadata` in the checkpoint.

    Loading a checkpoint never overwrites this run's own metadata (a phase change may set a new RoPE
    theta); what the checkpoint held is kept in `loaded`. The state is one JSON string: a sharded checkpoint's
    load (torch.distributed.checkpoint) needs every key of this run's state in the checkpoint, so nested
    recipe keys would fail the resume of any checkpoint saved before a recipe key was added.
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

    def fit_start(self, state: State, logger: Logger) -> None:
        # Composer's WandBLogger starts the W&B run on rank 0 only (at INIT, before this). Its id goes to
        # every rank, so all save the same metadata: a sharded save writes this state once, from one rank.
        run_id = [wandb_run_id() if dist.get_global_rank() == 0 else None]
        dist.broadcast_object_list(run_id, src=0)
        if run_id[0] is not None:
            self.metadata["wandb_run_id"] = run_id[0]

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.metadata)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = decode(state)


def decode(state: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a RunMetadata state (checkpoints before the JSON string held the dict itself)."""
    return json.loads(state["json"]) if set(state) == {"json"} else state


def metadata_from_checkpoint(checkpoint: dict) -> dict[str, Any] | None:
    state = checkpoint.get("state", {}).get("callbacks", {}).get(RunMetadata.__qualname__)
    return decode(state) if state is not None else None


def wandb_run_id() -> str | None:
    """The id of the W&B run this process logs to; None without one (wandb is not imported to ask)."""
    run = getattr(sys.modules.get("wandb"), "run", None)
    return run.id if run is not None and not getattr(run, "disabled", False) else None
