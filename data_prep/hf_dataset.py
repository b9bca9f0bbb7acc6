"""Documents out of a Hugging Face dataset: a hub name, a local builder folder, or a `save_to_disk` folder."""

from collections.abc import Iterator
from pathlib import Path

from data_prep.errors import UsageError
from data_prep.read_report import ReadReport
from data_prep.readers import Document, accept

BATCH_ROWS = 1024


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


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
        else:
            dataset = datasets.load_dataset(name, config, split=split)
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
