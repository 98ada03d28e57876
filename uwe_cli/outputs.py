"""Every file a command writes goes through here, so the guarantees hold for all of them.

- `-` streams to stdout. An existing FIFO or character device (a pipe, /dev/null) is opened and
  streamed into; it is never replaced by a regular file. Block devices, sockets and directories
  are refused.
- A regular file (or a new path) is written to a temporary file beside it and renamed over it only
  when complete, so an interrupted run never leaves a partial output. The file gets the permissions
  a new file gets under the user's umask (mkstemp alone would give 0600).
- An output that resolves to one of the command's inputs (the same file, a hard link or symlink to
  it, or a path inside an input folder) is refused before any work.
- Write failures (disk full, permission denied, read-only file system) are one-line OutputErrors.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from uwe_cli import storage
from uwe_cli.errors import OutputError, StdoutClosed
from uwe_cli.storage import atomic_path, strerror

STDOUT = "-"
_MAX_NAME_BYTES = 200


@dataclass(frozen=True)
class Output:
    """A checked output: `stdout`, an existing `stream` node (FIFO, character device), a `file`, a `dir`,
    or, for URLs, a `remote` object or `remote-dir` prefix (then `path` is the URL string)."""

    option: str
    kind: str
    path: Path | str | None
    given: str | None = None  # the path as the user wrote it, when `path` is where it leads (a symlink)

    @property
    def is_regular(self) -> bool:
        """True for a file or object written whole at the end (where side files such as reports can live)."""
        return self.kind in ("file", "remote")

    def __str__(self) -> str:
        return STDOUT if self.path is None else (self.given or str(self.path))


def _existing_ancestor(path: Path, option: str) -> Path:
    """The nearest existing ancestor of a path to be created; files must be creatable in it."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {option} {path}: {parent} is not a directory")
    _probe(parent, option, path)
    return parent


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and remove a file in `folder`: permission bits (and root, which ignores them) cannot tell
    whether a file system takes new files (read-only mounts, /sys, /proc), and the work must not run first."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".uwe-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {option} {path}: {strerror(exc)} in {folder}") from None
    os.close(fd)
    os.unlink(name)


def resolve_output(
    value: str | os.PathLike[str],
    option: str = "--out",
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    input_keys: Iterable[tuple[int, int]] = (),
    directory: bool = False,
    allow_stdout: bool = True,
) -> Output:
    """Check an output path before any work: what it is, that it can be written, that it is no input.

    `inputs` are the command's input files and folders; `input_keys` are (st_dev, st_ino) of input
    files already stat'ed elsewhere (e.g. every image of a manifest), to catch hard links cheaply.
    `directory=True` is for outputs that are folders (shard directories, heatmap folders).
    """
    text = os.fspath(value)
    if text.strip() == "":
        raise OutputError(f"{option} is empty; give a file name")
    if text == STDOUT:
        if not allow_stdout or directory:
            raise OutputError(f"{option} - (stdout) is not possible here; give a path")
        return Output(option, "stdout", None)
    if not directory and text.endswith(("/", os.sep)):
        raise OutputError(f"{option} {text} ends with '/', a folder; give a file name")
    if storage.is_url(text):
        return _resolve_remote(text, option, inputs, directory)
    path = storage.local_path(text).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"cannot write {option} {path}: {strerror(exc)}") from None
    if st is None:
        if path.is_symlink():
            raise OutputError(f"{option} {path} is a dangling symlink; remove it or give another path")
        _existing_ancestor(path, option)
        kind = "dir" if directory else "file"
    elif stat.S_ISDIR(st.st_mode):
        if not directory:
            raise OutputError(f"{option} {path} is a directory; give a file name")
        kind = "dir"
        _probe(path, option, path)
    elif directory:
        raise OutputError(f"{option} {path} is a file; give a directory")
    elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        kind = "stream"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {option} {path}: permission denied")
        _probe(Path(os.path.realpath(path)).parent, option, path)  # the new file is renamed over it
    else:
        raise OutputError(f"{option} {path} is a special file (not a regular file, FIFO or character device)")
    check_not_input(path, option, inputs, input_keys)
    if kind == "file" and st is not None:
        real = Path(os.path.realpath(path))  # write through a symlink, keep the link
        return Output(option, kind, real, None if real == path else str(path))
    return Output(option, kind, path)


def _resolve_remote(
    url: str, option: str, inputs: Iterable[str | os.PathLike[str]], directory: bool
) -> Output:
    """A URL output: its bucket must exist, it must not be a prefix (unless a folder is wanted), and it
    must not be, or lie under, a remote input."""
    fs, path = storage.filesystem(url)
    bucket = path.strip("/").split("/")[0]
    with storage.remote_errors(url):
        try:
            fs.info(bucket)  # unlike exists(), tells a missing bucket from one we may not see
        except FileNotFoundError:
            raise OutputError(f"cannot write {option} {url}: bucket '{bucket}' does not exist") from None
        is_prefix = fs.isdir(path)
    if is_prefix and not directory:
        raise OutputError(f"{option} {url} is a folder (prefix); give an object name")
    _check_not_remote_input(url, option, inputs)
    return Output(option, "remote-dir" if directory else "remote", url)


def _check_not_remote_input(url: str, option: str, inputs: Iterable[str | os.PathLike[str]]) -> None:
    own = url.rstrip("/")
    for raw in inputs:
        given = os.fspath(raw)
        if not storage.is_url(given):
            continue
        source = given.rstrip("/")
        if own == source:
            raise OutputError(f"{option} {url} is the input {given}; write to another object")
        if own.startswith(source + "/"):
            raise OutputError(f"{option} {url} is inside the input folder {given}; write elsewhere")


def refuse_inputs(out: Output, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """The input check of `resolve_output` for inputs known only later (the images a batch names)."""
    if out.kind == "file":
        check_not_input(Path(str(out.path)), out.option, inputs)
    elif out.kind == "remote":
        _check_not_remote_input(str(out.path), out.option, inputs)


def check_not_input(
    path: Path,
    option: str,
    inputs: Iterable[str | os.PathLike[str]],
    input_keys: Iterable[tuple[int, int]] = (),
) -> None:
    """Refuse an output that is an input file (same path, symlink or hard link) or lies in an input folder."""
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real)
        key: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        key = None
    for raw in inputs:
        if storage.is_url(raw):
            continue
        given = Path(raw)
        source = Path(os.path.realpath(given))
        try:
            in_st = os.stat(source)
        except OSError:
            continue
        if stat.S_ISDIR(in_st.st_mode):
            if real == source or source in real.parents:
                raise OutputError(f"{option} {path} is inside the input folder {given}; write elsewhere")
        elif real == source or (key is not None and key == (in_st.st_dev, in_st.st_ino)):
            raise OutputError(f"{option} {path} is the input {given}; write to another file")
    if key is not None:
        keys = set(input_keys)
        if key in keys:
            raise OutputError(f"{option} {path} is one of the input images; write to another file")


@contextlib.contextmanager
def open_output(out: Output, binary: bool = False) -> Iterator[IO[Any]]:
    """A stream to write an output into: stdout, the FIFO/device itself, or a temp file renamed at the end.

    Write errors of the stream (ENOSPC on /dev/full, EPIPE, EACCES) become one-line OutputErrors; on
    any error a regular-file target is left as it was.
    """
    mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    newline = None if binary else ""
    where = str(out)
    try:
        if out.kind == "remote":
            with storage.atomic_remote(str(out.path)) as raw:
                if binary:
                    yield raw
                else:
                    text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                    yield text
                    text.flush()
                    text.detach()
        elif out.kind == "stdout":
            stream = sys.stdout.buffer if binary else sys.stdout
            yield stream
            stream.flush()
        elif out.kind == "stream":
            assert out.path is not None
            with open(out.path, mode, encoding=encoding, newline=newline) as fh:
                yield fh
        elif out.kind == "file":
            assert out.path is not None
            with (
                atomic_path(out.path, option=out.option) as tmp,
                open(tmp, mode, encoding=encoding, newline=newline) as fh,
            ):
                yield fh
        else:
            raise OutputError(f"{out.option} {where} is a directory; give a file name")
    except BrokenPipeError:
        if out.kind == "stdout" or (out.kind == "stream" and is_stdout(out.path)):
            raise StdoutClosed(f"{out.option} {where}: stdout was closed by its reader") from None
        raise OutputError(f"cannot write {out.option} {where}: its reader closed it") from None
    except OSError as exc:
        raise OutputError(f"cannot write {out.option} {where}: {strerror(exc)}") from None


def is_stdout(path: object) -> bool:
    """Whether a path is this process's stdout by another name (/dev/stdout, or the file stdout is
    redirected to)."""
    try:
        a, b = os.stat(str(path)), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that flushing what is left at exit raises no second error."""
    try:
        target = sys.stdout.fileno()
    except (ValueError, AttributeError, io.UnsupportedOperation):
        return
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(fd, target)
    finally:
        os.close(fd)


def file_name_for_id(unit_id: str, suffix: str) -> str:
    """A file name for a unit's side output (heatmap, drawing) that is injective and never leaves its folder.

    '%', '/', '\\' and control characters are percent-encoded, so `a/pwn`, `../a/pwn` and `./a/pwn`
    get three different names in the same folder. Very long IDs are shortened with a hash suffix.
    """
    import hashlib

    name = "".join(f"%{ord(c):02X}" if c in "%/\\" or ord(c) < 32 or ord(c) == 127 else c for c in unit_id)
    if len(name.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256(unit_id.encode()).hexdigest()[:16]
        head = name.encode()[: _MAX_NAME_BYTES - 20].decode(errors="ignore")
        name = f"{head}~{digest}"
    return name + suffix
