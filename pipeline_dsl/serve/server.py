"""uvicorn, as `agp serve` runs it: a header read timeout, and a drain that tells the truth.

- `HeaderTimeoutH11` closes a connection whose request line and headers have not all
  arrived `header_timeout` seconds after its first byte (or after it opened): half-sent
  requests do not hold connections for ever. (The body has its own limit in the app.)
- `AgpServer` on SIGTERM / SIGINT stops admitting (new requests get 503), waits up to the
  drain timeout for the requests in flight, then fails the rest — an SSE error event and
  `[DONE]` for a stream, a JSON 503 otherwise — and only then lets uvicorn stop. `cut` is
  how many were failed; a second signal stops at once.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("agp.serve")


def header_timeout_protocol(seconds: float):
    """An H11Protocol class that gives each request `seconds` to send its request line and headers."""

    class HeaderTimeoutH11(H11Protocol):
        header_timeout = seconds

        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()                       # bytes of a request whose headers are not all here
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()                        # idle keep-alive: uvicorn's own timeout applies

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection whose request headers took more than %gs", self.header_timeout)
                self.transport.close()

    return HeaderTimeoutH11


class AgpServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the pipeline (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, apipe, drain_timeout: float):
        super().__init__(config)
        self.apipe, self.drain_timeout = apipe, drain_timeout
        self.stopped_by: int | None = None
        self.cut = 0
        self.drained = None                  # True: every request finished; False: some were cut
        self._draining = threading.Event()

    def handle_exit(self, sig, frame) -> None:
        if self._draining.is_set():          # a second signal: stop now
            self.should_exit = True
            self.force_exit = True
            return
        self.stopped_by = sig
        self._draining.set()
        threading.Thread(target=self._drain, name="agp-drain", daemon=True).start()

    def _drain(self) -> None:
        runtime = self.apipe.runtime
        log.info("draining: no new requests; %d in flight get up to %gs", runtime.in_flight, self.drain_timeout)
        self.drained = runtime.close(drain=True, timeout=self.drain_timeout,
                                     reason="the server shut down before this request finished "
                                            f"(drain timeout {self.drain_timeout:g}s)")
        self.cut = runtime.cut
        if self.cut:
            log.warning("drain timeout: %d request(s) cut (each got an error)", self.cut)
        time.sleep(0.3)                      # let the cut responses reach their clients
        self.should_exit = True


EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
