"""pynetdicom's association server with a socket that reads each PDU in bulk.

pynetdicom reads a PDU body 4 KiB at a time (`AssociationSocket.recv`), appending each
piece to a growing bytearray: some 130 `recv` calls, each one releasing and retaking the
GIL, for every 512×512 CT slice. On two cores, beside the threads that store what
arrives, that loop is a large share of the time per instance. `BulkReadSocket.recv` reads
the same bytes into one buffer of the requested size (`recv_into`, as much as the kernel
holds per call), with pynetdicom's behaviour otherwise unchanged: the bytes read so far are
returned when the peer closes the connection, and errors propagate as before.

`start_server` is `AE.start_server(block=False)` with this socket in every accepted
association (plain TCP and TLS alike).
"""

from __future__ import annotations

import threading
from datetime import datetime

from pynetdicom import AE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer


class BulkReadSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` (fewer only when the peer closed the connection)."""
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        while nr_read < nr_bytes:
            got = self.socket.recv_into(view[nr_read:], nr_bytes - nr_read)  # type: ignore[union-attr]
            if not got:
                view.release()
                del buffer[nr_read:]
                return buffer
            nr_read += got
        view.release()
        return buffer


class BulkReadRequestHandler(RequestHandler):
    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = BulkReadSocket  # same state, bulk `recv`
        return assoc


def start_server(ae: AE, address: tuple[str, int], **kwargs) -> ThreadedAssociationServer:
    """Start a non-blocking association server whose associations read PDUs in bulk."""
    server = ae.make_server(
        address, server_class=ThreadedAssociationServer, request_handler=BulkReadRequestHandler, **kwargs
    )
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() stops it too
    return server
