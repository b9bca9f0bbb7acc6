"""Documents out of a Hugging Face dataset: a hub name, a local builder folder, or a `save_to_disk` folder."""

from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import UsageError
from data_prep.read_report import ReadReport
from data_prep.readers import Document, accept
from data_prep.tokenizer_load import hub_reachable

BATCH_ROWS = 1024


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _offline(load):
    """`load()` with the hub clients in offline mode (their module-level switches, read at each call)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        return load()
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def open_hf_dataset(name: str, split: str, config: str | None, text_field: str):
    """Load the split now, so that a bad name or split fails before any work is done."""
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"--hf-dataset {name}: needs the `datasets` package, which is not installed here "
            "(pip install datasets)"
        ) from None

    folder = Path(name)
    saved_to_disk = folder.is_dir() and any(
        (folder / marker).is_file() for marker in ("state.json", "dataset_dict.json")
    )
    try:
        if saved_to_disk:
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UsageError(f"--hf-split {split}: {name} has the splits {', '.join(dataset)}")
                dataset = dataset[split]
        elif folder.exists() or hub_reachable():
            dataset = datasets.load_dataset(name, config, split=split)
        else:  # only the local cache: the hub client would retry for about half a minute, a line each
            try:
                dataset = _offline(lambda: datasets.load_dataset(name, config, split=split))
            except Exception:
                raise UsageError(
                    f"--hf-dataset {name}: no such local folder, and the hub is unreachable from here (its "
                    f"local cache has no split {split!r} of it either)"
                ) from None
    except UsageError:
        raise
    except Exception as error:  # datasets raises many types (network, missing split, bad files)
        raise UsageError(f"--hf-dataset {name}: cannot load split {split!r}: {_one_line(error)}") from error
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise UsageError(f"--hf-dataset {name}: no column {text_field!r} (columns: {columns})")
    return dataset


def read_hf_documents(
    dataset, origin: str, source: str, text_field: str, report: ReadReport
) -> Iterator[Document]:
    row = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=BATCH_ROWS):
        for value in batch[text_field]:
            row += 1
            if document := accept(value, source, origin, row, report):
                yield document
