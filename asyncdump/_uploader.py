"""The uploader process of a dataset on an object store: tar parts and manifest parts.

    python -m asyncdump._uploader SOCKET_FD PARENT_PID

Started by ``_store_uploads.StoreUploader``. Over its SOCK_SEQPACKET socket it receives the
store's ``StoreSpec`` (pickled), then one message per object: ``(upload_id, url, size, data)``,
either with a tar part's unnamed spool file attached as a descriptor (SCM_RIGHTS; uploaded by
``_stores._multipart.upload_file``) or with the object's bytes as ``data`` (one PUT). It
answers ``(upload_id, None)`` or ``(upload_id, error text)``, in order. It exits when the
parent closes the socket, or dies with it (PR_SET_PDEATHSIG). Imports fsspec and its plugin,
never torch or cv2.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys

from asyncdump._child import leave_ctrl_c_to_the_parent, signal_on_parent_death
from asyncdump._store_uploads import MAX_MESSAGE


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    leave_ctrl_c_to_the_parent()  # the parent kills us when Ctrl-C must stop an upload
    if not signal_on_parent_death(signal.SIGKILL, int(argv[2])):
        return 0
    from asyncdump._stores import open_store
    from asyncdump._stores._multipart import upload_file

    first = sock.recv(MAX_MESSAGE)
    if not first:
        return 0
    store = open_store(pickle.loads(first))
    while True:
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message:
            return 0  # the parent closed the socket: nothing more to upload
        upload_id, url, size, data = pickle.loads(message)
        error = None
        try:
            if data is not None:
                store.put(url, data, True)
            else:
                upload_file(store, url, fds[0], size)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(pickle.dumps((upload_id, error)))
        except OSError:
            return 0  # the parent is gone


if __name__ == "__main__":
    os._exit(main(sys.argv))
