"""Chunks of the lazy memory file pushed into the kernel's page cache.

Owns :class:`PageCache`: a thread of the FUSE server that hands ranges of
the local cache file to the kernel as the content of the mounted ``memory``
file (libfuse's ``fuse_lowlevel_notify_store``, reached through ctypes:
mfusepy does not bind it). A clone's page fault on a pushed page is served
by the kernel alone — no request reaches the server, and the kernel starts
no readahead around it. The server pushes the chunks a clone is about to
need (the working set) and those whose pages the kernel holds unfilled (a
readahead the server refused, see :mod:`vmfork.lazy.server`).

The pushed pages are clean page cache of the mount: the kernel drops them
under memory pressure and reads them again through the server, which then
has them locally.

The node id of ``memory`` is not given by libfuse's high-level API: the
thread finds it once the file has been looked up (the only node besides the
root, which is 1) by asking the kernel to invalidate its attributes, which
fails for a node it does not know. A push that fails is logged once and
dropped: the page is then read through the server as before.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading

log = logging.getLogger("vmfork.lazy.server")

#: libfuse's ``enum fuse_buf_flags``: the buffer is a file descriptor, read
#: at ``pos``.
_BUF_IS_FD = 1 << 1
_BUF_FD_SEEK = 1 << 2
#: FUSE's root node id; node ids probed for the file after it.
_ROOT = 1
_PROBE = range(2, 66)


class _Buf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int),
                ("mem", ctypes.c_void_p), ("fd", ctypes.c_int), ("pos", ctypes.c_int64),
                # Zeros for fields a later libfuse may append.
                ("_spare", ctypes.c_char * 32)]


class _BufVec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", _Buf * 1)]


def _bind(lib: ctypes.CDLL) -> None:
    lib.fuse_get_session.restype = ctypes.c_void_p
    lib.fuse_get_session.argtypes = [ctypes.c_void_p]
    lib.fuse_lowlevel_notify_store.restype = ctypes.c_int
    lib.fuse_lowlevel_notify_store.argtypes = [ctypes.c_void_p, ctypes.c_uint64,
                                               ctypes.c_int64, ctypes.POINTER(_BufVec),
                                               ctypes.c_int]
    lib.fuse_lowlevel_notify_inval_inode.restype = ctypes.c_int
    lib.fuse_lowlevel_notify_inval_inode.argtypes = [ctypes.c_void_p, ctypes.c_uint64,
                                                     ctypes.c_int64, ctypes.c_int64]


class PageCache:
    """Pushes ranges of file descriptor *fd* (the cache, laid out like the
    mounted file) into the page cache of the mount of libfuse session
    *session*, on a thread of its own, in the order asked."""

    def __init__(self, lib: ctypes.CDLL, session: int, fd: int) -> None:
        _bind(lib)
        self._lib = lib
        self._se = ctypes.c_void_p(session)
        self._fd = fd
        self._ino: int | None = None
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._warned = False
        self.pushed = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="vmfork-lazy-pagecache")
        self._thread.start()

    @classmethod
    def of_mount(cls, lib: ctypes.CDLL, fuse: int, fd: int) -> PageCache:
        """For the libfuse ``struct fuse *`` *fuse* (valid until the file
        system's ``destroy``)."""
        _bind(lib)
        return cls(lib, lib.fuse_get_session(ctypes.c_void_p(fuse)), fd)

    def push(self, offset: int, length: int) -> None:
        with self._cv:
            if not self._closed:
                self._queue.append((offset, length))
                self._cv.notify()

    def close(self, wait: float) -> None:
        """No more pushes: those queued are dropped; waits up to *wait*
        seconds for one in progress (before the session goes away)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        self._thread.join(wait)

    def _node(self) -> int | None:
        for ino in _PROBE:
            if self._lib.fuse_lowlevel_notify_inval_inode(self._se, ino, -1, 0) == 0:
                return ino
        return None

    def _store(self, offset: int, length: int) -> int:
        assert self._ino is not None
        vec = _BufVec(count=1, idx=0, off=0)
        vec.buf[0].size = length
        vec.buf[0].flags = _BUF_IS_FD | _BUF_FD_SEEK
        vec.buf[0].fd = self._fd
        vec.buf[0].pos = offset
        return int(self._lib.fuse_lowlevel_notify_store(self._se, self._ino, offset,
                                                        ctypes.byref(vec), 0))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                offset, length = self._queue.popleft()
            if self._ino is None:
                self._ino = self._node()
            rc = self._store(offset, length) if self._ino is not None else -2
            if rc == -2:  # ENOENT: the kernel forgot the node; find it again
                self._ino = self._node()
                if self._ino is not None:
                    rc = self._store(offset, length)
            if rc == 0:
                self.pushed += length
            elif not self._warned:
                self._warned = True
                log.warning("pushing memory into the page cache failed (%s); "
                            "its pages are read through the server",
                            os.strerror(-rc) if rc < 0 else rc)


__all__ = ["PageCache"]
