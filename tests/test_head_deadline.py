"""A deadline on request heads (issue 20's header timeout): a client that sends its headers byte by byte, or never
finishes them, gets a 408 and a closed connection within --header-timeout; one that sends nothing is closed; every
ordinary and keep-alive request is answered as before. One warning line per slow client, no traceback.

A bare Starlette app (no model) behind the server's protocol, with a 0.5 s deadline.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inprocess_server import InProcessServer, LogRecords  # noqa: E402

TIMEOUT = 0.5  # the head deadline under test
CEILING = 20.0  # how long a test waits for the server at most (a generous bound, never the thing waited for)
HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"


@pytest.fixture(scope="module")
def server():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from vlm_core.runtime.server.head_deadline import head_deadline_protocol

    async def echo(request):
        return JSONResponse({"got": (await request.body()).decode()})

    records = LogRecords()
    loggers = [logging.getLogger(name) for name in ("vlm_core", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(records)
    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    with InProcessServer(app, http=head_deadline_protocol(TIMEOUT)) as running:
        running.port = int(running.url.rsplit(":", 1)[1])
        running.records = records
        yield running
    for logger in loggers:
        logger.removeHandler(records)


def _read_until_closed(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_an_unfinished_head_is_a_408_and_closed(server):
    seen = len(server.records.records)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=CEILING) as sock:
        sock.sendall(HEAD[:30])  # and nothing more
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply, reply
    assert time.monotonic() - start < CEILING
    logged = server.records.records[seen:]
    assert [r.levelno for r in logged] == [logging.WARNING] and "--header-timeout" in logged[0].getMessage()
    assert not any(r.exc_info for r in logged)


def test_a_head_sent_byte_by_byte_is_cut_off(server):
    """A slowloris: one byte of its headers every 50 ms, which would take 4 s for the whole head; the server
    answers 408 and closes once the deadline passes, before the head is complete."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=CEILING) as sock:
        sock.setblocking(True)
        try:
            while sent < len(HEAD) - 1:  # never the last byte: the head stays unfinished
                sock.sendall(HEAD[sent:sent + 1])
                sent += 1
                time.sleep(0.05)  # the hostile client's pace, not a wait for the server
        except OSError:
            pass  # the server closed while it was still sending
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert sent < len(HEAD) - 1  # cut off before it could finish


def test_a_silent_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=CEILING) as sock:
        assert _read_until_closed(sock) == b""


def test_ordinary_and_keep_alive_requests_are_answered(server):
    seen = len(server.records.records)
    with socket.create_connection(("127.0.0.1", server.port), timeout=CEILING) as sock:
        for _ in range(3):  # one connection, three requests, each head on time
            sock.sendall(HEAD + b"{}")
            reply = b""
            while b'"got":"{}"' not in reply:
                chunk = sock.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply
    assert server.records.records[seen:] == []
