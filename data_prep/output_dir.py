"""Output folders appear whole or not at all: build in a sibling `DIR.tmp-<pid>`, rename at the end.

An interrupted run leaves at most a `.tmp-<pid>` folder, which nothing mistakes for a finished one; with
`--overwrite` the old folder stays in place until the new one is complete.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep.errors import UsageError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse an existing output (an empty folder is fine) unless `--overwrite`."""
    taken = output.exists() and (not output.is_dir() or any(output.iterdir()))
    if taken and not overwrite:
        raise UsageError(f"--output {output}: already exists; pass --overwrite to replace it")


@contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield the staging folder to write into; on success it becomes `output`."""
    output = Path(os.path.abspath(output))
    check_output_free(output, overwrite)
    staging = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    if staging.exists():
        _remove(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists() or output.is_symlink():
        retired = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.replace(output, retired)
        os.replace(staging, output)
        _remove(retired)
    else:
        os.replace(staging, output)
