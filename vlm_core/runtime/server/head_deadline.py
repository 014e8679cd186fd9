"""A deadline on each request head: uvicorn's h11 protocol with a timer from the connection's opening (or the end of
the previous response) until the request's headers are complete.

uvicorn times a connection out only while it is idle *between* requests (timeout_keep_alive, armed once a response
is done): a client that connects and sends nothing, or sends its headers a byte at a time (slowloris), holds its
connection, one of --max-connections, for as long as it likes. With this protocol such a client gets a 408
(or, if it sent nothing at all, a plain close) when --header-timeout runs out, logged as one line.

    uvicorn.Config(app, http=head_deadline_protocol(10.0), ...)
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger("vlm_core.runtime.server")


def _timeout_reply(timeout: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request headers did not arrive within {timeout:g} s "
                                            f"(--header-timeout)", "type": "invalid_request_error", "param": None,
                                 "code": "timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def head_deadline_protocol(timeout: float):
    """uvicorn's H11Protocol with a `timeout`-second deadline on every request head (a class for Config(http=))."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_bytes = 0  # bytes of the request head in progress
            self.head_timer = None
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self.head_bytes = 0
            self.head_timer = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def data_received(self, data: bytes) -> None:
            if self.head_timer is not None:
                self.head_bytes += len(data)
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # a whole head arrived: the request runs
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # kept alive: the next request's head has its own deadline
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _expired(self) -> None:
            self.head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.head_bytes:  # a head begun and never finished: say why before closing
                client = "%s:%d" % tuple(self.client[:2]) if self.client else "a client"
                log.warning("%s sent %d bytes of request headers in %g s (--header-timeout); closing its connection",
                            client, self.head_bytes, timeout)
                self.transport.write(_timeout_reply(timeout))
            self.transport.close()

    return HeadDeadlineProtocol
