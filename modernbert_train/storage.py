"""Every path the user gives: a local path, or an object-store URI (`s3://bucket/key`, `gs://`, ...).

The one place that parses URIs. `s3://` goes through boto3 with the endpoint from `S3_ENDPOINT_URL` (as
streaming and Composer read it); the other schemes streaming has clients for go through those clients.
Anything else that looks like `scheme://` is an unsupported-scheme error, never a local folder named `s3:`.
Errors are one-line `StorageError`s naming the URI.
"""

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
# `s3:/bucket/key`: a URI with a slash missing (Composer would read it as s3 with no bucket), not a local
# folder named `s3:`. Two letters at least, so that no drive letter looks like one.
ONE_SLASH_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)(.*)", re.DOTALL)
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Schemes streaming's uploader and downloader speak besides s3 (credentials as their clients read them).
STREAMING_SCHEMES = ("gs", "oci", "azure", "azure-dl", "dbfs")
SUPPORTED_SCHEMES = ("s3", *STREAMING_SCHEMES)


class StorageError(ValueError):
    """A path or URI that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class Uri:
    scheme: str
    bucket: str
    key: str  # without a leading or trailing slash; "" for the bucket's root

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def child(self, name: str) -> "Uri":
        return Uri(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for anything of the form `scheme://...` or `scheme:/...`, supported or not (never mistaken for a
    local path; `parse` says what is wrong with it)."""
    return path is not None and (URI.fullmatch(str(path)) or ONE_SLASH_URI.fullmatch(str(path))) is not None


def parse(uri: str, what: str = "") -> Uri:
    """`s3://bucket/a/b` -> Uri('s3', 'bucket', 'a/b'); a one-line error for a malformed or unknown one."""
    label = f"{what} {uri}".strip()
    match = URI.fullmatch(str(uri))
    one_slash = ONE_SLASH_URI.fullmatch(str(uri))
    if not match and one_slash:
        scheme = one_slash[1]
        raise StorageError(f"{label}: one slash after '{scheme}:'; a URI is {scheme}://bucket/path")
    if not match:
        raise StorageError(f"{label}: not a URI (expected scheme://bucket/path)")
    scheme, rest = match[1].lower(), match[2]
    if scheme not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"{label}: unsupported scheme '{scheme}://' (supported: "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)}, or a local path)"
        )
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{label}: no bucket name after '{scheme}://'")
    if scheme == "s3" and not S3_BUCKET.fullmatch(bucket):
        raise StorageError(f"{label}: '{bucket}' is not a valid S3 bucket name")
    if "//" in key.rstrip("/"):
        raise StorageError(f"{label}: empty path segment ('//')")
    return Uri(scheme, bucket, key.strip("/"))


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a URI or a local path."""
    if is_uri(base):
        uri = parse(str(base))
        for name in names:
            uri = uri.child(name.strip("/"))
        return str(uri)
    return str(Path(base, *names))


def expand_home(path: str | None) -> str | None:
    """`~/x` (or `~user/x`) as the shell would expand it, for a path the shell never saw: a recipe's value, an
    override `save_folder=~/run`, a flag `--output=~/x`. Else a folder literally named `~` is made."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def why_not_creatable(path: str | os.PathLike) -> str | None:
    """Why a local file or folder at `path` could not be created: its nearest existing ancestor is a file, or
    a folder this process cannot write into. None when it could (a URI: the bucket's check says)."""
    if is_uri(path):
        return None
    absolute = Path(os.path.abspath(path))
    existing = next(p for p in absolute.parents if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def file_in(path: str | os.PathLike, name: str) -> str | Path:
    """The file `path` names where it may name a file or the folder holding `name` (a tokenizer.json, say):
    a local folder's `name`, a URI's `name` below it unless the URI ends in name's suffix; else itself."""
    if is_uri(path):
        uri = str(path).rstrip("/")
        return uri if uri.endswith(Path(name).suffix) else join(uri, name)
    return Path(path, name) if Path(path).is_dir() else Path(path)


def display(path: str | os.PathLike) -> str:
    return str(parse(str(path))) if is_uri(path) else str(path)


# -- s3 through boto3 --------------------------------------------------------------------------------------
# How long an S3 request may go without a byte from the endpoint, and how many times it is tried: an endpoint
# that accepts connections and never answers is reported in about S3_TRIES x the wait, not after minutes.
S3_READ_TIMEOUT_DEFAULT = 30.0
S3_TRIES = 3


def s3_read_timeout() -> float:
    """`S3_READ_TIMEOUT` (seconds, > 0) or the default."""
    text = os.environ.get("S3_READ_TIMEOUT", "").strip()
    if not text:
        return S3_READ_TIMEOUT_DEFAULT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise StorageError(f"S3_READ_TIMEOUT={text}: must be a number of seconds above 0")
    return seconds


@cache
def _s3_client(endpoint: str | None, read_timeout: float):
    import boto3
    from botocore.config import Config

    # botocore's standard retry mode counts the first try in max_attempts.
    config = Config(
        connect_timeout=5, read_timeout=read_timeout, retries={"max_attempts": S3_TRIES, "mode": "standard"}
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _s3():
    endpoint, read_timeout = os.environ.get("S3_ENDPOINT_URL") or None, s3_read_timeout()
    try:
        return _s3_client(endpoint, read_timeout)
    except ValueError as e:  # botocore's "Invalid endpoint", raised while the client is built
        raise StorageError(
            f"S3_ENDPOINT_URL={endpoint}: not an endpoint URL ({' '.join(str(e).split())})"
        ) from None


def _s3_error(uri: Uri, error: Exception, doing: str) -> StorageError:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "") or code
        if code in ("NoSuchBucket",) or (code == "404" and doing == "check"):
            return StorageError(f"{uri}: bucket '{uri.bucket}' does not exist")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied while trying to {doing} ({message})")
        return StorageError(f"{uri}: cannot {doing}: {message}")
    from botocore.exceptions import ReadTimeoutError

    endpoint = os.environ.get("S3_ENDPOINT_URL") or "the default AWS endpoint"
    reason = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ReadTimeoutError):
        wait = f"no answer within {s3_read_timeout():g} s, {S3_TRIES} tries"
        reason += f" ({wait}; S3_READ_TIMEOUT sets the wait)"
    return StorageError(f"{uri}: cannot {doing} at {endpoint}: {reason}")


def _missing(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in (
        "404",
        "NoSuchKey",
        "NotFound",
    )


def _s3_call(uri: Uri, doing: str, call, **kwargs):
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call(**kwargs)
    except (ClientError, BotoCoreError) as e:
        if _missing(e) and doing != "check":
            raise FileNotFoundError(str(uri)) from None
        raise _s3_error(uri, e, doing) from None
    except (
        S3UploadFailedError,
        S3TransferFailedError,
    ) as e:  # the transfer manager's, wrapping a ClientError
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ClientError | BotoCoreError):
            raise _s3_error(uri, cause, doing) from None
        raise StorageError(f"{uri}: cannot {doing}: {' '.join(str(e).split())}") from None


# -- the other schemes through streaming's clients -------------------------------------------------------
def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def _streaming_client(uri: Uri, folder: Uri, doing: str) -> Iterator[tuple]:
    """streaming's client for `folder` (its scheme's) and a local staging folder for it, removed after; the
    client's own errors (no credentials, no network, its package missing) as one-line StorageErrors about
    `uri`. Nothing of ours is left in /tmp, refused or not."""
    staging = tempfile.mkdtemp(prefix="modernbert-upload-")
    try:
        from streaming.base.storage.upload import CloudUploader

        yield CloudUploader.get((staging, str(folder)), keep_local=True), staging
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"{uri}: cannot {doing}: {_one_line(e)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _streaming_list(uri: Uri) -> list[str]:
    """The object names under `uri` through streaming's client for its scheme."""
    with _streaming_client(uri, Uri(uri.scheme, uri.bucket, ""), "list it") as (client, _):
        return list(client.list_objects(uri.key))


# -- conditional writes (s3 only): what a lock in a bucket is built on ------------------------------------
def supports_conditional_writes(path: str | os.PathLike) -> bool:
    return is_uri(path) and parse(str(path)).scheme == "s3"


def put_if(path: str | os.PathLike, data: bytes, etag: str | None = None) -> str | None:
    """Write the object at `path` only if there is none (etag None) or it is still the version `etag`: the
    new version's etag, or None when that did not hold (another writer came first). s3:// only."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = parse(str(path))
    if uri.scheme != "s3":
        raise StorageError(f"{uri}: conditional writes need an s3:// path")
    condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
    try:
        response = _s3().put_object(Bucket=uri.bucket, Key=uri.key, Body=data, **condition)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or _missing(e):
            return None
        raise _s3_error(uri, e, "write") from None
    except BotoCoreError as e:
        raise _s3_error(uri, e, "write") from None
    return response["ETag"]


def read_versioned(path: str | os.PathLike) -> tuple[bytes, str, float] | None:
    """The object's bytes, its version's etag and its age in seconds by the server's clock (so hosts whose
    clocks differ agree on it); None when there is none. s3:// only."""
    from email.utils import parsedate_to_datetime

    uri = parse(str(path))
    if uri.scheme != "s3":
        raise StorageError(f"{uri}: versioned reads need an s3:// path")
    try:
        response = _s3_call(uri, "read", _s3().get_object, Bucket=uri.bucket, Key=uri.key)
    except FileNotFoundError:
        return None
    now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    age = max(0.0, (now - response["LastModified"]).total_seconds())
    return response["Body"].read(), response["ETag"], age


# -- operations ----------------------------------------------------------------------------------------------
def check(path: str | os.PathLike, what: str) -> None:
    """Before any work: a URI is well formed and its bucket reachable; a one-line error naming it if not."""
    if not is_uri(path):
        return
    uri = parse(str(path), what)
    try:
        if uri.scheme == "s3":
            _s3_call(uri, "check", _s3().head_bucket, Bucket=uri.bucket)
        else:
            _streaming_list(uri)
    except StorageError as e:
        raise StorageError(f"{what} {e}") from None
    except Exception as e:  # the other clients' own errors (credentials, network)
        raise StorageError(f"{what} {uri}: cannot reach it: {_one_line(e)}") from None


def list_files(folder: str | os.PathLike) -> list[str]:
    """The files below `folder`, as sorted relative names (`a/b.json`); [] when there is none."""
    return sorted(list_sizes(folder))


def list_sizes(folder: str | os.PathLike) -> dict[str, int | None]:
    """The files below `folder` (relative names, as `list_files`) and their sizes in bytes, from the one
    listing; a size is None where the scheme's client does not list it (the streaming schemes)."""
    if not is_uri(folder):
        root = Path(folder)
        if not root.is_dir():
            return {}
        return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    uri = parse(str(folder))
    prefix = f"{uri.key}/" if uri.key else ""
    if uri.scheme != "s3":
        return {name[len(prefix) :]: None for name in _streaming_list(uri) if name.startswith(prefix)}
    sizes = {}
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix)
    for page in _s3_call(uri, "list", lambda: list(pages)):
        sizes.update((item["Key"][len(prefix) :], item["Size"]) for item in page.get("Contents", []))
    return sizes


def exists(path: str | os.PathLike) -> bool:
    """Whether a file (not a folder) is at `path`."""
    if not is_uri(path):
        return Path(path).is_file()
    uri = parse(str(path))
    if uri.scheme != "s3":
        return uri.key in _streaming_list(uri)
    try:
        _s3_call(uri, "read", _s3().head_object, Bucket=uri.bucket, Key=uri.key)
        return True
    except FileNotFoundError:
        return False


def download_file(path: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy the file at `path` to `local` (its folder is created); FileNotFoundError when there is none."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if not is_uri(path):
        shutil.copyfile(path, local)
        return local
    uri = parse(str(path))
    partial = local.with_name(f"{local.name}.part-{os.getpid()}")  # ranks may fetch the same file
    if uri.scheme == "s3":
        _s3_call(uri, "read", _s3().download_file, Bucket=uri.bucket, Key=uri.key, Filename=str(partial))
    else:
        from streaming.base.storage import CloudDownloader

        try:
            CloudDownloader.direct_download(str(uri), str(partial), timeout=600)
        except FileNotFoundError:
            raise FileNotFoundError(str(uri)) from None
        except Exception as e:  # the scheme's client: no credentials, no network, its package missing
            raise StorageError(f"{uri}: cannot read: {_one_line(e)[:300]}") from None
    partial.replace(local)
    return local


def upload_file(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the local file to `path` (a URI, or a local path: written whole, then renamed into place)."""
    if not is_uri(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(local, partial)
            partial.replace(target)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk or a kill leaves nothing half-written behind
            raise
        return
    uri = parse(str(path))
    if uri.scheme == "s3":
        _s3_call(uri, "write", _s3().upload_file, Filename=str(local), Bucket=uri.bucket, Key=uri.key)
        return
    parent, _, name = uri.key.rpartition("/")
    with _streaming_client(uri, Uri(uri.scheme, uri.bucket, parent), "write") as (client, staging):
        shutil.copyfile(local, Path(staging, name))
        client.upload_file(name)


def move(path: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a file: locally in one step; in an s3 bucket as a server-side copy, then a delete."""
    if not is_uri(path) and not is_uri(target):
        os.replace(path, target)
        return
    uri, destination = parse(str(path)), parse(str(target))
    if uri.scheme != "s3" or destination.scheme != "s3":
        raise StorageError(f"{uri}: cannot move it to {destination}: only local and s3:// files can be moved")
    source = {"Bucket": uri.bucket, "Key": uri.key}
    client = _s3()
    _s3_call(
        uri, "copy", client.copy_object, CopySource=source, Bucket=destination.bucket, Key=destination.key
    )
    _s3_call(uri, "delete", client.delete_object, **source)


def removable(path: str | os.PathLike) -> bool:
    """Whether `remove` can delete files at `path`: local paths and s3:// objects."""
    return not is_uri(path) or parse(str(path)).scheme == "s3"


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder (locally), or an object (in an s3 bucket); nothing there is no error."""
    if not is_uri(path):
        local = Path(path)
        if local.exists() or local.is_symlink():
            _remove_path(local)
        return
    uri = parse(str(path))
    if not removable(uri):
        raise StorageError(f"{uri}: cannot delete it: only local and s3:// files can be deleted")
    _s3_call(uri, "delete", _s3().delete_object, Bucket=uri.bucket, Key=uri.key)


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    uri = parse(str(path))
    if uri.scheme == "s3":
        return _s3_call(uri, "read", _s3().get_object, Bucket=uri.bucket, Key=uri.key)["Body"].read()
    with tempfile.TemporaryDirectory(prefix="modernbert-download-") as staging:
        return download_file(uri, Path(staging, "file")).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def decode_text(data: bytes, path: str | os.PathLike, byte_order_mark: bool = False) -> str:
    """A file's bytes as UTF-8 text (with `byte_order_mark`, a leading one dropped, as spreadsheets write);
    otherwise a one-line StorageError naming the file, the line and the byte."""
    try:
        return data.decode("utf-8-sig" if byte_order_mark else "utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise StorageError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x})") from None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    if is_uri(path) and parse(str(path)).scheme == "s3":
        uri = parse(str(path))
        _s3_call(uri, "write", _s3().put_object, Bucket=uri.bucket, Key=uri.key, Body=data)
        return
    with tempfile.TemporaryDirectory(prefix="modernbert-upload-") as staging:
        local = Path(staging, "file")
        local.write_bytes(data)
        upload_file(local, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def upload_folder(local: str | os.PathLike, path: str | os.PathLike, last: Iterable[str] = ()) -> None:
    """Every file below `local` to the folder `path`; the names in `last` after all the others, in that
    order, so a reader that waits for them (an index) never sees a half-uploaded folder."""
    last = list(last)
    names = list_files(local)
    for name in [n for n in names if n not in last] + [n for n in last if n in names]:
        upload_file(Path(local, name), join(path, name))


def download_folder(path: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Every file below the folder `path` into `local`; FileNotFoundError when it holds none."""
    names = list_files(path)
    if not names:
        raise FileNotFoundError(display(path))
    for name in names:
        download_file(join(path, name), Path(local, name))
    return Path(local)


def scratch_folder(prefix: str) -> Path:
    """A new local temporary folder for what a process needs until it exits, deleted at its exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@contextmanager
def local_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder with the contents of `path`: itself when local, else a temporary download."""
    if not is_uri(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="modernbert-download-") as staging:
        yield download_folder(path, staging)


@contextmanager
def local_file(path: str | os.PathLike) -> Iterator[Path]:
    """A local copy of the file at `path`: itself when local, else a temporary download."""
    if not is_uri(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="modernbert-download-") as staging:
        yield download_file(path, Path(staging, parse(str(path)).key.rpartition("/")[2] or "file"))


@contextmanager
def staged_folder(target: Path, staging: Path, retired: Path) -> Iterator[Path]:
    """`staging`, fresh, to write into; once the block completes it replaces the local folder `target` (the
    old one moved to `retired`, then removed), so a reader sees the old folder or the new one, never half of
    one. A failed block removes `staging` and leaves `target` as it was."""
    if staging.exists() or staging.is_symlink():
        _remove_path(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() or target.is_symlink():
        os.replace(target, retired)
        os.replace(staging, target)
        _remove_path(retired)
    else:
        os.replace(staging, target)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
