"""Reading the files the tool is given, and writing a set of result files that appear together or not at all.

Every reader of a file named by the user or found in a results folder goes through here, so that

* a URL whose fsspec protocol is unknown (or needs a package that is not installed) is one :class:`InputError`
  naming it (:func:`filesystem`);
* only regular files are read: a FIFO (which would block the reader forever), a device such as ``/dev/zero``
  (endless), a socket or a folder is refused before a byte is read. Local files are opened with ``O_NONBLOCK``
  and checked with ``fstat`` on the open descriptor, so a FIFO put in place between a check and the open cannot
  hang the reader either (:func:`open_regular`, :func:`read_regular`, :func:`check_regular`);
* a file larger than its reader's limit is refused before it is read;
* JSON is decoded with a nesting limit and must have the expected top-level type (:func:`read_json`,
  :func:`parse_json`).

:func:`write_files_together` writes several result files (``cpcluster aggregate``'s outputs): every file goes to a
temporary name first, and only when all of them are written and flushed are they renamed into place; a failure
before that (a full disk) removes the temporaries and leaves the folder as it was.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cpcluster.util.errors import InputError

MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 64


def _label(url: str, what: str) -> str:
    return f"{what} {url}" if what else str(url)


def filesystem(url: str, what: str = ""):
    """``(fsspec filesystem, path)`` of ``url``; an unknown or unavailable protocol is an :class:`InputError`."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:  # "Protocol not known: foo", "Install s3fs to access S3"
        raise InputError(f"{_label(url, what)}: unsupported location ({e}); give a local path or a URL of an "
                         "installed fsspec filesystem") from None


def is_local_fs(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def process_local(url: str, what: str = "") -> bool:
    """True when files under ``url`` live in this process's memory only (fsspec ``memory://``, also behind a
    caching wrapper such as ``simplecache::memory://``): another process never sees them, and they are gone when
    this one exits."""
    from fsspec.implementations.memory import MemoryFileSystem

    fs, seen = filesystem(url, what)[0], 0
    while fs is not None and seen < 8:
        if isinstance(fs, MemoryFileSystem):
            return True
        fs, seen = getattr(fs, "fs", None), seen + 1
    return False


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an fsspec URL."""
    return "/".join([base.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    """Whether ``url`` is on the local filesystem (a path or ``file://``)."""
    return is_local_fs(filesystem(url)[0])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(url: str, what: str, kind: str):
    raise InputError(f"{_label(url, what)}: is {kind}, not a regular file; give the path of a regular file")


def _os_error(url: str, what: str, e: OSError):
    if isinstance(e, FileNotFoundError):
        raise InputError(f"{_label(url, what)}: no such file") from None
    if isinstance(e, IsADirectoryError):
        _refuse(url, what, "a folder")
    raise InputError(f"{_label(url, what)}: cannot read ({e.strerror or e})") from None


def _check_size(url: str, what: str, size, max_bytes: int | None) -> None:
    if max_bytes is not None and size is not None and int(size) > max_bytes:
        raise InputError(f"{_label(url, what)}: {int(size)} bytes is more than the {max_bytes} bytes such a file "
                         "may have; is it the right file?")


def open_regular(url: str, what: str = "", max_bytes: int | None = None):
    """A binary file object for reading the regular file ``url`` (local path or fsspec URL).

    Raises :class:`InputError` naming ``url`` when it does not exist, is not a regular file, is larger than
    ``max_bytes`` (when given) or cannot be opened.
    """
    fs, path = filesystem(url, what)
    if is_local_fs(fs):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            _os_error(url, what, e)
        try:
            st = os.fstat(fd)
            kind = _not_regular(st.st_mode)
            if kind:
                _refuse(url, what, kind)
            _check_size(url, what, st.st_size, max_bytes)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb")
    try:
        info = fs.info(path)
        if info.get("type") != "file":
            _refuse(url, what, "a folder" if info.get("type") == "directory" else f"of type {info.get('type')!r}")
        _check_size(url, what, info.get("size"), max_bytes)
        return fs.open(path, "rb")
    except OSError as e:
        _os_error(url, what, e)


def read_regular(url: str, what: str = "", max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``url`` (see :func:`open_regular`); never more than ``max_bytes``."""
    with open_regular(url, what, max_bytes) as fh:
        try:
            raw = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
        except OSError as e:
            _os_error(url, what, e)
    _check_size(url, what, len(raw), max_bytes)  # a file that grew after the check
    return raw


def check_regular(url: str, what: str = "") -> int:
    """Size in bytes of the regular file ``url``; :class:`InputError` otherwise (for readers that open by path)."""
    with open_regular(url, what) as fh:
        if hasattr(fh, "fileno"):
            try:
                return os.fstat(fh.fileno()).st_size
            except (OSError, io.UnsupportedOperation):
                pass
        return int(fh.size) if getattr(fh, "size", None) is not None else -1


def _depth(value) -> int:
    """Nesting depth of a decoded JSON value (1 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_json(raw, where: str, kind: type | None = dict):
    """Decode JSON text or UTF-8 bytes; :class:`InputError` naming ``where`` for anything else.

    Refused: invalid UTF-8 or JSON, nesting deeper than :data:`MAX_JSON_DEPTH`, and (when ``kind`` is given) a
    top-level value of another type.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({type(e).__name__})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InputError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if kind is not None and not isinstance(value, kind):
        names = {dict: "a JSON object", list: "a JSON list"}
        raise InputError(f"{where}: expected {names.get(kind, kind.__name__)}, found {type(value).__name__}")
    return value


def canonical_json(config: dict) -> str:
    """The one serialization that :func:`config_hash` is taken over (sorted keys, no spaces)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def config_hash(config: dict) -> str:
    """Hex sha256 of ``canonical_json(config)`` in UTF-8: equal hashes mean the same configuration."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def read_json(url: str, what: str = "", kind: type | None = dict, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in the regular file ``url`` (at most ``max_bytes``), of type ``kind`` when given."""
    return parse_json(read_regular(url, what, max_bytes), _label(url, what), kind)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(url: str, payload: bytes) -> None:
    """Write ``payload`` to ``url`` so that readers see the old state or the whole new file, never a part."""
    fs, path = filesystem(url)
    if is_local_fs(fs):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any written file
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as fh:
        fh.write(payload)
    fs.mv(tmp, path)


def write_files_together(folder: str, files: dict) -> list[str]:
    """Write ``{name: bytes}`` into ``folder`` so that they appear together: temporaries first, renames last.

    Returns the URLs written, in name order. An ``OSError`` while writing the temporaries (a full disk, a
    read-only folder) removes them, leaves every existing file in ``folder`` untouched, and is raised as an
    :class:`InputError` naming the folder, the file and the cause.
    """
    fs, root = filesystem(folder, "--out")
    local = is_local_fs(fs)
    names = sorted(files)
    temps: dict[str, str] = {}
    try:
        if local:
            os.makedirs(root, exist_ok=True)
        else:
            fs.makedirs(root, exist_ok=True)
        for name in names:
            if local:
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
                temps[name] = tmp
                os.fchmod(fd, 0o666 & ~_umask())
                with os.fdopen(fd, "wb") as fh:
                    fh.write(files[name])
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                tmp = f"{root.rstrip('/')}/.{name}.tmp"
                temps[name] = tmp
                with fs.open(tmp, "wb") as fh:
                    fh.write(files[name])
    except OSError as e:
        for tmp in temps.values():
            try:
                os.remove(tmp) if local else fs.rm(tmp)
            except (OSError, FileNotFoundError):
                pass
        current = next((n for n in reversed(names) if n in temps), names[0] if names else "")
        raise InputError(f"--out {folder}: cannot write {current} ({e.strerror or e}); nothing was replaced "
                         "there") from None
    for name in names:
        if local:
            os.replace(temps[name], os.path.join(root, name))
        else:
            fs.mv(temps[name], f"{root.rstrip('/')}/{name}")
    return [folder.rstrip("/") + "/" + name for name in names]
