"""Output folders appear whole or not at all: build in a sibling `DIR.tmp-<pid>`, rename at the end.

An interrupted run leaves at most a `.tmp-<pid>` folder, which nothing mistakes for a finished one; with
`--overwrite` the old folder stays in place until the new one is complete.

A URI output (`s3://...`) is built in a local temporary folder (under $TMPDIR) and then uploaded, the files
readers open first (`index.json`, then `modernbert_data.json`, which marks a finished dataset) last: a
reader never sees a half-uploaded dataset, and an interrupted upload is simply redone by the next run.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep.errors import UsageError
from modernbert_train import storage

FINISHED_MARKER = "modernbert_data.json"  # written last by every command that fills an output folder
UPLOADED_LAST = ("index.json", FINISHED_MARKER)


def read_marker(path: str | Path, doing: str, keys: tuple[str, ...]) -> dict:
    """A folder's modernbert_data.json with `keys`; one that is damaged or not ours is a one-line UsageError
    naming it (`doing`: the command, for the message). FileNotFoundError when there is none."""
    try:
        values = json.loads(storage.decode_text(storage.read_bytes(path), path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{doing}: {path} is not a {FINISHED_MARKER} (not JSON: {e.msg})") from None
    missing = [key for key in keys if not isinstance(values, dict) or key not in values]
    if missing:
        raise UsageError(f"{doing}: {path} is not a {FINISHED_MARKER} (no '{missing[0]}')")
    return values


def check_output_free(output: Path | str, overwrite: bool) -> None:
    """Refuse an existing output (an empty folder is fine) unless `--overwrite`.

    A URI is checked (well formed, bucket reachable); there, files of an interrupted upload (no index) are
    replaced, a finished dataset is refused."""
    if storage.is_uri(output):
        storage.check(output, "--output")
        if not overwrite and "index.json" in storage.list_files(output):
            raise UsageError(f"--output {output}: already holds a dataset; pass --overwrite to replace it")
        return
    taken = output.exists() and (not output.is_dir() or any(output.iterdir()))
    if taken and not overwrite:
        raise UsageError(f"--output {output}: already exists; pass --overwrite to replace it")
    # The staging folder goes beside it: its parent must be (or become) a writable folder.
    if (problem := storage.why_not_creatable(output)) is not None:
        raise UsageError(f"--output {output}: cannot create it: {problem}")


@contextmanager
def staged_output(output: Path | str, overwrite: bool) -> Iterator[Path]:
    """Yield the staging folder to write into; on success it becomes `output`."""
    if storage.is_uri(output):
        check_output_free(output, overwrite)
        with tempfile.TemporaryDirectory(prefix="modernbert-data-") as staging:
            yield Path(staging)
            storage.upload_folder(staging, output, last=UPLOADED_LAST)
        return
    output = Path(os.path.abspath(output))
    check_output_free(output, overwrite)
    staging = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    retired = output.with_name(f"{output.name}.old-{os.getpid()}")
    with storage.staged_folder(output, staging, retired) as folder:
        yield folder


def check_output_apart(output: Path | str, inputs: list[str]) -> None:
    """Refuse an output folder that is, holds or lies inside an input: replacing it (--overwrite) would delete
    the input, and an input holding the output would read the output's own files back."""
    if storage.is_uri(output):
        out = str(output).rstrip("/")
        for raw in inputs:
            source = str(raw).rstrip("/")
            if storage.is_uri(raw) and (out == source or out.startswith(source + "/")):
                raise UsageError(f"--output {output}: lies inside --input {raw}; choose an output outside it")
            if storage.is_uri(raw) and source.startswith(out + "/"):
                raise UsageError(
                    f"--output {output}: holds --input {raw}; choose an output outside the input"
                )
        return
    out = Path(output).resolve()
    for raw in inputs:
        if storage.is_uri(raw):
            continue
        source = Path(raw).resolve()
        if out == source or out in source.parents:
            raise UsageError(f"--output {output}: holds --input {raw}; choose an output outside the input")
        if source in out.parents:
            raise UsageError(
                f"--output {output}: lies inside --input {raw}; choose an output outside the input"
            )


def is_finished(output: Path | str) -> bool:
    """Whether `output` holds a complete result (its marker is written, or uploaded, last)."""
    return storage.exists(storage.join(output, FINISHED_MARKER))
