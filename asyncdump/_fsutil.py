"""File-system helpers shared by the worker (numpy + cv2 only) and the parent.

Temporary names: every temporary file asyncdump creates is named by ``temp_name``, and
``is_temp_name`` recognises exactly those names (what ``--resume`` may delete). Folders:
``Folders`` opens each sub-folder of a root once, never through a symlink, so that a write
cannot leave the root whatever is swapped in later.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat

NAME_MAX_BYTES = 255  # bytes in one path component on Linux file systems (ext4, xfs, tmpfs)
TEMP_STAMP = "asyncdump"
_TEMP_SUFFIX = ".tmp"
# ".<base>.asyncdump-<unique>.tmp": only names made by temp_name match.
_TEMP_NAME = re.compile(r"^\..+\." + TEMP_STAMP + r"-[0-9A-Za-z-]+" + re.escape(_TEMP_SUFFIX) + "$",
                        re.DOTALL)
_UNIQUE = re.compile(r"[0-9A-Za-z-]+")


def temp_name(base: str, unique: str) -> str:
    """The hidden temporary name for a file named ``base``, distinguished by ``unique``
    (digits, letters and "-"). At most ``NAME_MAX_BYTES`` bytes: ``base`` is shortened (in
    bytes, at a character boundary) when needed."""
    if not _UNIQUE.fullmatch(unique):
        raise ValueError(f"unique part of a temp name must be [0-9A-Za-z-]+, got {unique!r}")
    tail = f".{TEMP_STAMP}-{unique}{_TEMP_SUFFIX}"
    budget = NAME_MAX_BYTES - 1 - len(tail)
    raw = os.fsencode(base)
    if len(raw) > budget:
        cut = budget
        while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # never split a UTF-8 sequence
            cut -= 1
        base = os.fsdecode(raw[:cut])
    return f".{base}{tail}"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a file name, no folder) is one ``temp_name`` makes."""
    return _TEMP_NAME.match(name) is not None


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``folder`` durable (fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | os.PathLike[str], dir_fd: int | None = None) -> None:
    """Remove ``path`` if it exists; errors are ignored (used on cleanup paths)."""
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # root may be a symlink
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW


class Folders:
    """File descriptors of ``root`` and of folders below it, each opened once.

    ``root`` itself may be a symlink (it is opened once, following it); every folder below it
    is opened component by component with ``O_NOFOLLOW``, relative to its parent's descriptor,
    and created when missing. A sub-folder that is a symlink is refused (``OSError`` ELOOP),
    and one swapped for a symlink after it was opened does not redirect later writes.
    """

    def __init__(self, root: str, limit: int = 64):
        self.root = root
        self._limit = limit
        self._fds: dict[str, int] = {}  # relative folder ("" for root) -> fd

    def fd(self, folder: str) -> int:
        """The descriptor of ``folder`` (relative to root, "/"-separated, "" for root)."""
        fd = self._fds.get(folder)
        if fd is None:
            fd = self._open(folder)
        return fd

    def forget(self, folder: str) -> None:
        """Drop a cached descriptor (its folder was removed: the next ``fd`` opens it again)."""
        fd = self._fds.pop(folder, None)
        if fd is not None:
            os.close(fd)
        if not folder:  # the root was removed: every folder below it went with it
            self.close()

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _open(self, folder: str) -> int:
        if "" not in self._fds:
            try:
                self._fds[""] = os.open(self.root, _ROOT_FLAGS)
            except FileNotFoundError:  # removed since the sink started: made again, as before
                os.makedirs(self.root, exist_ok=True)
                self._fds[""] = os.open(self.root, _ROOT_FLAGS)
        if not folder:
            return self._fds[""]
        if len(self._fds) > self._limit:  # e.g. one folder per image: keep the root only
            for name in [f for f in self._fds if f]:
                os.close(self._fds.pop(name))
        parts = folder.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"folder {folder!r} has an empty, '.' or '..' component")
        parent = self._fds[""]
        fd = -1
        try:
            for part in parts:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=parent)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o777, dir_fd=parent)
                    except FileExistsError:
                        pass
                    child = os.open(part, _DIR_FLAGS, dir_fd=parent)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(part, parent):
                        raise OSError(errno.ELOOP, f"{self.root}/{folder}: a folder on the way is a "
                                      "symlink; asyncdump never writes through a symlinked "
                                      "sub-folder of root") from None
                    raise
                if fd >= 0:
                    os.close(fd)
                fd = parent = child
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self._fds[folder] = fd
        return fd


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


RENAME_NOREPLACE = 1
_renameat2 = None
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc >= 2.28: link + unlink below
    _renameat2 = None


def rename_noreplace(src: str, dst: str, dir_fd: int) -> None:
    """Rename ``src`` to ``dst`` (both in the folder ``dir_fd``) unless ``dst`` exists:
    ``FileExistsError`` then, decided atomically by the kernel."""
    if _renameat2 is not None:
        if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the fs cannot: link
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)
