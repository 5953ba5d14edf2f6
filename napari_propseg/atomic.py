"""The one atomic writer: every output file of the tool goes through :func:`atomic_write`.

A file is written next to its destination under a hidden temporary name, flushed to disk
(``fsync``), checked (non-empty, and by the caller's ``verify`` when given), and only then
renamed over the destination. On any failure the temporary file is removed and an
existing file at the destination is left as it was; the error is one
:class:`~napari_propseg.errors.OutputError` sentence that names the file and the cause
("the disk is full", "the folder is read-only", ...).

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write_text(p, "hello") == p
    True
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError

TMP_PREFIX = ".propseg-tmp-"


def describe_os_error(exc: BaseException) -> str:
    """A short human cause for an OS error ("the disk is full", ...)."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return "the disk is full"
    if code == errno.EROFS:
        return "the folder is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOENT:
        return "the folder does not exist"
    if code == errno.ENAMETOOLONG:
        return "the file name is too long"
    if code == errno.EISDIR:
        return "it is a folder"
    text = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
    return text[0].lower() + text[1:] if text else exc.__class__.__name__


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder``; raises the OSError if it cannot."""
    fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike, *, inputs: tuple = (), what: str = "output") -> Path:
    """Check before any work that ``path`` can be written; returns it as a Path.

    The folder must exist and be writable, ``path`` must not be a folder and must not be
    one of ``inputs`` (the same file under another name included).

    Raises:
        OutputError: one sentence naming the file and what to do.
    """
    p = Path(path).expanduser()
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"Cannot write the {what} {p}: it is a folder; pass a file name.")
    if not folder.is_dir():
        raise OutputError(f"Cannot write the {what} {p}: the folder {folder} does not exist; create it or choose another.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write the {what} {p}: the folder {folder} is not writable; choose another folder.")
    try:
        probe_writable(folder)
    except OSError as exc:
        raise OutputError(f"Cannot write the {what} {p}: {describe_os_error(exc)}; choose another folder.") from exc
    for inp in inputs:
        if inp is None:
            continue
        q = Path(inp).expanduser()
        try:
            same = q.exists() and p.exists() and os.path.samefile(p, q)
        except OSError:
            same = False
        if same or p.resolve() == q.resolve():
            raise OutputError(f"Refusing to write the {what} {p}: it is also an input ({q}); choose another output file.")
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _set_mode(tmp: str, dest: Path) -> None:
    """Give the temporary file the mode of the file it replaces, else the usual
    ``0o666 & ~umask`` (``mkstemp`` creates it 0600, readable by its owner only)."""
    try:
        mode = dest.stat().st_mode & 0o7777 if dest.is_file() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:
        pass


def _advice(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    return "free some space or choose another folder" if code in (errno.ENOSPC, errno.EDQUOT) else "choose another folder"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    *,
    verify: Callable[[Path], None] | None = None,
    suffix: str = "",
    what: str = "file",
    allow_empty: bool = False,
) -> Path:
    """Write ``path`` atomically through ``write(tmp_path)``.

    Args:
        path: destination.
        write: writes the whole content to the temporary path it is given (the temporary
            name ends with ``suffix``, so writers that pick the format by extension work).
        verify: optional check of the written temporary file (e.g. read it back); raise
            any exception to reject it.
        suffix: extension of the temporary file (default: the destination's suffixes).
        what: what the file is, for the error sentence ("label file", "session", ...).
        allow_empty: an empty result is valid (otherwise it is taken for a full disk).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputError: the write, the check or the rename failed; nothing was changed at
            ``path`` and no temporary file is left.
    """
    p = Path(path).expanduser()
    folder = p.parent if str(p.parent) else Path(".")
    suffix = suffix or "".join(p.suffixes[-2:])
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=folder)
        os.close(fd)
        write(Path(tmp))
        size = os.path.getsize(tmp)
        if size == 0 and not allow_empty:
            raise OSError(errno.ENOSPC, "nothing was written")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if verify is not None:
            verify(Path(tmp))
        _set_mode(tmp, p)
        os.replace(tmp, p)
        tmp = None
        _fsync_dir(folder)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"Could not write the {what} {p}: {describe_os_error(exc)}; nothing was changed there, "
                          f"{_advice(exc)}.") from exc
    except Exception as exc:  # the writer's own error or a failed check
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        low = msg.lower()
        cause = "the disk is full" if ("no space" in low or "disk full" in low) else msg
        raise OutputError(f"Could not write the {what} {p}: {cause}; nothing was changed there.") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "file") -> Path:
    """Atomically write ``data``; a short write (full disk) raises :class:`OutputError`."""

    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    def _check(tmp: Path) -> None:
        if os.path.getsize(tmp) != len(data):
            raise OSError(errno.ENOSPC, "short write")

    return atomic_write(path, _w, verify=_check, what=what, allow_empty=not data)


def atomic_write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), what=what)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files a killed writer left in ``folder``; returns how many."""
    n = 0
    f = Path(folder)
    if not f.is_dir():
        return 0
    for p in f.iterdir():
        if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".tmp-") and p.is_file()):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n
