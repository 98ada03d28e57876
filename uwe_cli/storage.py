"""Where data lives: local paths and URLs (s3://, gs://, az://, http(s)://, file://) behind one API.

Every path uwe reads or writes goes through these functions, so a URL works wherever a path does.
Remote filesystems come from fsspec and its optional packages (extras `s3`, `gcs`, `az`, `http`);
credentials and endpoints come from the usual places (environment, ~/.aws, `AWS_ENDPOINT_URL`),
and `--storage-option KEY=VALUE` passes anything else. Remote failures become one-line
StorageErrors naming the URL: missing bucket or key, refused credentials, an unreachable endpoint,
a filesystem package that is not installed.

Object stores have no rename, so remote outputs are written with `autocommit=False` and committed
only when complete: a failed or killed run leaves no object at the final key.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from uwe_cli.errors import OutputError, StorageError, UweError

Location = str | os.PathLike[str]
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
    "adl": "az",
    "http": "http",
    "https": "http",
}
_options: dict[str, Any] = {}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
NEW_FILE_MODE = 0o666 & ~_UMASK


def strerror(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "", option: str = "--out") -> Iterator[Path]:
    """A temporary path beside `target` that replaces it only if the block succeeds (umask permissions).

    For writers that need a path of their own (Parquet, PNG). Parent folders are created.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {option} {target}: {strerror(exc)}") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            os.chmod(tmp_path, NEW_FILE_MODE)
            os.replace(tmp_path, target)
        except OSError as exc:
            raise OutputError(f"cannot write {option} {target}: {strerror(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def is_url(location: Location) -> bool:
    """True for a URL with a scheme other than file:// (those are read through fsspec)."""
    match = _SCHEME.match(os.fspath(location))
    return bool(match) and match.group(1).lower() != "file"


def local_path(location: Location) -> Path:
    """A local location as a Path (file:// URLs unwrapped)."""
    text = os.fspath(location)
    return Path(text[len("file://") :] if text.lower().startswith("file://") else text)


def as_location(location: Location) -> str | Path:
    """URLs stay strings (a Path would collapse '//'); everything else becomes a Path."""
    return os.fspath(location) if is_url(location) else local_path(location)


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values are read as JSON when they parse (true, 3, {"a": 1}), else as strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option takes KEY=VALUE, got '{pair}'")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def configure(options: dict[str, Any]) -> None:
    """Storage options for every remote filesystem this process opens (set once by the CLI, and by
    each Ray worker from `options()` of the driver)."""
    _options.clear()
    _options.update(options)


def options() -> dict[str, Any]:
    """A copy of this process's storage options, to hand to worker processes."""
    return dict(_options)


def _scheme(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; a missing package is a one-line error."""
    import fsspec

    scheme = _scheme(url)
    try:
        return fsspec.core.url_to_fs(url, **_options)
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'uwe-cli[{extra}]'" if extra else "install the fsspec filesystem for it"
        raise StorageError(f"{url}: {scheme}:// needs an optional package: {hint}") from None
    except (ValueError, TypeError) as exc:
        raise StorageError(f"{url}: {exc}" + (" (check --storage-option)" if _options else "")) from None


def describe_error(url: str, exc: BaseException) -> str:
    """One line saying what went wrong with a remote location, whatever library raised it."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError):
        detail = "bucket does not exist" if "bucket" in text.lower() else "not found"
        return f"{url}: {detail}"
    if isinstance(exc, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"{url}: access denied ({text or name}); check the credentials"
    if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ConnectionError"):
        return f"{url}: cannot reach the storage endpoint ({text or name})"
    if _options and isinstance(exc, TypeError) and "keyword" in text:  # an option it cannot take
        return f"{url}: the filesystem refused the --storage-option values ({text or name})"
    return f"{url}: {name}: {text}" if text else f"{url}: {name}"


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Turn any exception of a remote call into a one-line StorageError naming the URL."""
    try:
        yield
    except UweError:  # already one line naming its culprit
        raise
    except Exception as exc:
        raise StorageError(describe_error(url, exc)) from None


def _remote(location: Location, call: Callable[[Any, str], Any]) -> Any:
    """`call(filesystem, path)` for a URL, any failure a one-line StorageError naming the URL."""
    url = os.fspath(location)
    fs, path = filesystem(url)
    with remote_errors(url):
        return call(fs, path)


def join(base: Location, *parts: str) -> str | Path:
    if is_url(base):
        return "/".join([os.fspath(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return local_path(base).joinpath(*parts)


def parent(location: Location) -> str | Path:
    if is_url(location):
        text = os.fspath(location).rstrip("/")
        return text.rsplit("/", 1)[0]
    return local_path(location).parent


def name(location: Location) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


def exists(location: Location) -> bool:
    if not is_url(location):
        return local_path(location).exists()
    return bool(_remote(location, lambda fs, path: fs.exists(path)))


def isdir(location: Location) -> bool:
    if not is_url(location):
        return local_path(location).is_dir()
    return bool(_remote(location, lambda fs, path: fs.isdir(path)))


def stamp(info: dict[str, Any]) -> tuple[int, int | str] | None:
    """(size, version) of a remote object from its listing: ETag, else modification time."""
    size = info.get("size")
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    if size is None:
        return None
    return int(size), str(version) if version is not None else 0


def stamps(urls: Sequence[str], workers: int = 16) -> dict[str, tuple[int, int | str] | None]:
    """`stamp` of remote objects (one metadata request each, a few at a time): what a resumed
    extraction compares to redo objects changed since. An object whose metadata cannot be read gets
    None (it is reported when read, if it cannot be read either), so a listing or metadata right the
    reader lacks does not stop the run."""
    from concurrent.futures import ThreadPoolExecutor

    def one(url: str) -> tuple[int, int | str] | None:
        try:
            fs, path = filesystem(url)
            return stamp(fs.info(path))
        except Exception:  # any failure only means "no stamp"
            return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(urls, pool.map(one, urls), strict=True))


def find(prefix: str, suffixes: Iterable[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Objects below a remote prefix whose name ends in one of `suffixes` (case-insensitive), skipping
    hidden path components: (url, path relative to the prefix, info), sorted by relative path."""
    fs, root = filesystem(prefix)
    wanted = tuple(s.lower() for s in suffixes)
    with remote_errors(prefix):
        listing = fs.find(root, detail=True)
    root = root.rstrip("/")
    found = []
    for path, info in listing.items():
        rel = path[len(root) :].lstrip("/")
        if info.get("type") == "directory" or not rel.lower().endswith(wanted):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        found.append((join(prefix, rel), rel, info))
    return sorted(found, key=lambda t: t[1])


def open_input(location: Location, mode: str = "rb") -> IO[Any]:
    """A readable file object (local or remote)."""
    if not is_url(location):
        return open(local_path(location), mode)
    return _remote(location, lambda fs, path: fs.open(path, mode))


def read_text_file(location: Location, what: str, error: type[Exception]) -> str:
    """A small UTF-8 text file (ID list, batch file, labels), local or remote; a one-line `error` naming
    `what` when it is missing, unreadable or not UTF-8."""
    location = as_location(location)
    if not is_url(location) and not Path(location).is_file():
        raise error(f"{what} not found: {location}")
    try:
        return read_bytes(location).decode("utf-8-sig")
    except StorageError as exc:
        raise error(f"{what} {exc}") from None
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text: {location}") from None
    except OSError as exc:
        raise error(f"{what} {location} cannot be read: {exc.strerror}") from None


def csv_rows(text: str, what: str, error: type[Exception]) -> list[list[str]]:
    """Every row of a CSV text (quoted commas, quotes and newlines kept); `error` when it does not parse."""
    try:
        return list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise error(f"{what}: not a readable CSV file ({exc})") from None


def read_bytes(location: Location) -> bytes:
    if not is_url(location):
        return local_path(location).read_bytes()
    return _remote(location, lambda fs, path: fs.cat_file(path))


def read_text(location: Location, encoding: str = "utf-8") -> str:
    return read_bytes(location).decode(encoding)


@contextlib.contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local file holding the location's bytes (the location itself when it is local)."""
    if not is_url(location):
        yield local_path(location)
        return
    data = read_bytes(location)
    with tempfile.TemporaryDirectory(prefix="uwe-") as folder:
        path = Path(folder) / (name(location) or "download")
        path.write_bytes(data)
        yield path


@contextlib.contextmanager
def atomic_remote(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write an object that appears at `url` only if the block succeeds (upload committed at the end)."""
    fs, path = filesystem(url)
    with remote_errors(url):
        handle = fs.open(path, mode, autocommit=False)
    try:
        yield handle
        with remote_errors(url):
            handle.close()
            handle.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            handle.discard()
        with contextlib.suppress(Exception):
            handle.closed = True  # close()/__del__ must not flush a discarded buffer
        raise


def write_bytes(location: Location, data: bytes) -> None:
    """Write a whole object/file atomically (temp + rename locally, one committed upload remotely)."""
    if is_url(location):
        with atomic_remote(os.fspath(location)) as fh:
            fh.write(data)
        return
    with atomic_path(local_path(location)) as tmp:
        tmp.write_bytes(data)


def glob(pattern: Location) -> list[str | Path]:
    """Sorted matches of a glob pattern (local or remote)."""
    if not is_url(pattern):
        folder = local_path(pattern)
        return sorted(folder.parent.glob(folder.name))
    return _remote(pattern, lambda fs, path: sorted(fs.unstrip_protocol(m) for m in fs.glob(path)))


def remove_tree(location: Location) -> None:
    """Delete a folder (or prefix) and everything in it; missing is fine."""
    if not is_url(location):
        import shutil

        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    _remote(location, lambda fs, path: fs.exists(path) and fs.rm(path, recursive=True))


def remove(location: Location) -> None:
    """Delete a file or object; missing is fine."""
    if not is_url(location):
        local_path(location).unlink(missing_ok=True)
        return

    def rm(fs: Any, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # inside remote_errors, which would wrap it
            fs.rm(path)

    _remote(location, rm)


def save_png(location: Location, image: Any) -> None:
    """A PIL image as a PNG file or object, written atomically (folders created for local paths)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    if not is_url(location):
        local_path(location).parent.mkdir(parents=True, exist_ok=True)
    write_bytes(location, buffer.getvalue())
