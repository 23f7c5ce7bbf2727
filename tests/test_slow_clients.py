"""Clients that stop reading their streams, or go mid-stream, cost the others nothing lasting
(serve/async_pipeline.py, serve/server.py): past --max-unread-tokens a stalled stream's request
is aborted and its KV blocks freed while its client still holds the connection; a client gone
mid-stream frees its sequence at once; hundreds of idle connections leave room for a request
whatever the open-files limit the server was started with. Probed with raw sockets that read nothing, against an
`agp serve` child on the tiny model with a 4096-token context."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline_dsl.serve.async_pipeline import LoopMail, RequestStream
from test_connections import sockets_of, wait_for
from test_serve import TINY, start_agp_serve

# one client for the polls of /metrics (a new one a call, as httpx.get makes, loads the CA
# certificates again, CPU the server under test needs); a connection a request, none kept open
HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
UNREAD = 64            # --max-unread-tokens of the server under test (what its loop's lag queues for a
                       # client that reads is not counted: the tiny model's tokens come by the thousand
                       # a second, and a loaded machine's loop fell 64 behind them)
MAX_TOKENS = 3000      # each stalled stream's: far more than its socket's buffers hold


def low_soft_files():
    """A preexec_fn that starts a child under a soft limit of 256 open files, its hard limit as
    it is; None where the hard limit is under 1024 (no room to show the server raising its own)."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


class Served:
    """An `agp serve` child on the tiny model with a 4096-token context (batch of 4, KV for 16k
    tokens) and `flags`, shared by a module's tests: started for the first test that asks, and
    again for the next one where a test stopped it (a test of its shutdown); its log read as it
    comes (`log`). `preexec_fn` goes to the child's Popen (a lower open-files limit)."""

    def __init__(self, long_gguf, folder, *flags: str, preexec_fn=None):
        self.path = folder / "tiny.agp"
        self.path.write_text(TINY.format(model=long_gguf, max_queue=64, max_batch_size=4, timeout=1)
                             .replace("1MiB", "8MiB"))
        self.flags, self.proc, self.preexec_fn = flags, None, preexec_fn

    def get(self) -> tuple[subprocess.Popen, str, int]:
        """(process, url, port) of the running server."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc, self.url = start_agp_serve(str(self.path), "--threads", "1", *self.flags,
                                                  preexec_fn=self.preexec_fn)
            self.lines: list[str] = []
            self.reader = threading.Thread(target=self.lines.extend, args=(self.proc.stderr,), daemon=True)
            self.reader.start()
        return self.proc, self.url, int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        """What the running (or last) server logged so far."""
        return "".join(self.lines)

    def exit_log(self, timeout: float) -> str:
        """Once the server has exited (within `timeout`): its whole log."""
        self.proc.wait(timeout=timeout)
        self.reader.join(60)
        return self.log()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.exit_log(60)


@pytest.fixture(scope="module")
def cutting(long_gguf, tmp_path_factory):
    """The server that cuts only for unread tokens (its tests share it; the last stops it),
    started under a soft limit of 256 open files where the hard one is higher (it raises its own)."""
    served = Served(long_gguf, tmp_path_factory.mktemp("slow"), "--no-access-log", "--send-timeout", "600",
                    "--max-unread-tokens", str(UNREAD), "--pause-unread-tokens", "0", preexec_fn=low_soft_files())
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def serve(cutting):
    """`agp serve` that cuts only for unread tokens: (process, url, port)."""
    return cutting.get()


@pytest.fixture(scope="module")
def pausing(long_gguf, tmp_path_factory):
    """The server that pauses a stream past 32 unread tokens and cuts none for --send-timeout;
    its drain waits up to 600 s (its tests share it; the last stops it). In a drain, streams no
    longer paused are cut past 256 unread tokens (the default 1,024 only takes longer to reach)."""
    served = Served(long_gguf, tmp_path_factory.mktemp("pause"), "--no-access-log", "--send-timeout", "600",
                    "--pause-unread-tokens", "32", "--max-unread-tokens", "256", "--drain-timeout", "600")
    try:
        yield served
    finally:
        served.stop()


def scrape(url: str, labelled: bool = False) -> dict:
    """agp's unlabelled-but-model_name series: name -> value; `labelled` adds agp_requests_total
    by status: (name, status) -> value."""
    out = {}
    # only agp's samples with no `le` label are parsed (the whole page, hundreds of histogram
    # buckets, took a fifth of a second a call, polled ten times a second): the same samples
    text = HTTP.get(url + "/metrics").text
    mine = "\n".join(line for line in text.splitlines() if line.startswith("agp_") and 'le="' not in line)
    for fam in text_string_to_metric_families(mine + "\n"):
        for s in fam.samples:
            if s.name.startswith("agp_") and set(s.labels) == {"model_name"}:
                out[s.name] = s.value
            elif labelled and s.name == "agp_requests_total":
                out[(s.name, s.labels["status"])] = s.value
    return out


def stalled_stream(port: int, prompt, max_tokens: int = MAX_TOKENS, logprobs: int | None = 5,
                   request_id: str | None = None) -> socket.socket:
    """A streamed completions request (with its X-Request-Id if given) whose client then reads
    nothing (a small receive buffer)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                       "logprobs": logprobs}).encode()
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", port))
    named = b"X-Request-Id: %s\r\n" % request_id.encode() if request_id else b""
    c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              + named + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return c


def tokens_per_second(url: str, tokens: int = 100) -> float:
    """How fast the server generates one stream read as it comes: its tokens after the first by
    the time from the first to the end."""
    body = {"prompt": "hello world", "max_tokens": tokens, "ignore_eos": True, "stream": True}
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    assert r.status_code == 200 and first is not None
    return (tokens - 1) / max(time.perf_counter() - first, 1e-3)


def read_to_end(c: socket.socket) -> bytes:
    """The rest of a chunked answer, to its last (empty) chunk."""
    c.settimeout(60)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n") and (chunk := c.recv(1 << 16)):
        data += chunk
    return data


def test_stalled_readers_are_cut_and_free_their_kv_while_others_stream(serve):
    """Seven streams (one a completions batch of two prompts) whose clients read nothing: each is
    aborted once more than --max-unread-tokens of its tokens wait, its KV blocks freed while the
    client still holds the connection; another client's stream meanwhile is answered whole. The
    stalled ones, reading at last, find the error event that says why. (Before: the engine
    generated every stalled stream to its max_tokens, the kernel buffering 4 MiB a connection.)"""
    _, url, port = serve
    before = scrape(url)
    stalled = [stalled_stream(port, "hello world") for _ in range(5)] + [stalled_stream(port, ["one", "two"])]
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines)

        def idle():
            m = scrape(url)
            return m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0
        assert wait_for(idle, 120)                            # the stalled clients still read nothing
        after = scrape(url)
        assert after["agp_streams_cut_unread_total"] - before.get("agp_streams_cut_unread_total", 0) == 7
        generated = after["agp_generation_tokens_total"] - before["agp_generation_tokens_total"]
        assert generated < 7 * MAX_TOKENS / 2                  # cut, not generated to the end
        for c in stalled:
            tail = read_to_end(c)[-2000:]
            error, done = tail.split(b"data: ")[-2:]
            assert b"--max-unread-tokens" in error and done.startswith(b"[DONE]"), tail[-300:]
    finally:
        for c in stalled:
            c.close()


def test_a_stalled_stream_that_fits_in_the_buffers_is_cut_after_the_send_timeout(long_gguf, tmp_path):
    """A client that reads nothing of an 800-token stream (some 190 KB: less than the server's
    socket and asyncio buffers hold) while another client reads its own: the stalled request is
    aborted --send-timeout after its client's receive buffer filled, counted as a 499 like a
    client gone, its sequence out of the batch and its KV blocks freed while its client still
    holds its end of the connection; the other stream is answered whole. The log line of the cut
    names the request (its X-Request-Id) and its client, the access log off. (Before: nothing was
    cut until the server's buffers were full too, so this answer was generated to its end, a 200;
    and the cut was logged as "cutting a connection", naming neither.)"""
    path = tmp_path / "tiny.agp"
    path.write_text(TINY.format(model=long_gguf, max_queue=64, max_batch_size=4, timeout=1).replace("1MiB", "8MiB"))
    proc, url = start_agp_serve(str(path), "--threads", "1", "--no-access-log", "--send-timeout", "0.05",
                                "--max-unread-tokens", "100000")
    port = int(url.rsplit(":", 1)[1])
    try:
        before = scrape(url)
        stalled = stalled_stream(port, "hello world", max_tokens=800, logprobs=None, request_id="stalled-800")
        client = "127.0.0.1:%d" % stalled.getsockname()[1]
        with stalled:
            with httpx.stream("POST", url + "/v1/completions", timeout=120,
                              json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert r.status_code == 200 and lines[-1] == "data: [DONE]"
            assert not any('"error"' in line for line in lines)
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"

            def idle():
                m = scrape(url)
                return m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0 \
                    and m["agp_requests_in_flight"] == 0
            assert wait_for(idle, 120)
            after = scrape(url, labelled=True)
            assert after[("agp_requests_total", "499")] - before.get(("agp_requests_total", "499"), 0) == 1
            assert after[("agp_requests_total", "200")] - before.get(("agp_requests_total", "200"), 0) == 1
            generated = after["agp_generation_tokens_total"] - before["agp_generation_tokens_total"]
            assert generated < 200 + 800                          # cut, not generated to its end
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    cut = [line for line in err.splitlines() if "cutting" in line]
    assert len(cut) == 1 and "POST /v1/completions id=stalled-800" in cut[0] and client in cut[0], err[-3000:]


def unchunked(data: bytes) -> bytes:
    """The body of a chunked HTTP answer (its head cut off)."""
    rest, body = data.split(b"\r\n\r\n", 1)[1], b""
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return body
        body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]


def test_stalled_readers_are_paused_out_of_the_batch_while_others_stream_and_go_on_when_read(pausing):
    """Six streams whose clients read nothing, against a batch of four: each, once more than
    --pause-unread-tokens of its tokens wait, leaves the batch (KV blocks freed, counted in
    agp_streams_paused_total) while its client holds the connection, so the engine is idle and
    another client's stream is answered whole; none is cut. A stalled client that then reads
    finds its whole answer, to its max_tokens, with no error. (Before: the stalled streams held
    every slot of the batch, generating for nobody, until --send-timeout or --max-unread-tokens
    cut them: another client's first token waited 30 s behind 32 of them.)"""
    _, url, port = pausing.get()
    stalled = []
    try:
        before = scrape(url)
        stalled = [stalled_stream(port, "hello world", max_tokens=1500) for _ in range(6)]

        def all_paused():
            m = scrape(url)
            return m["agp_streams_paused_total"] - before.get("agp_streams_paused_total", 0) >= 6 \
                and m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0
        assert wait_for(all_paused, 120)                     # the stalled clients still read nothing
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"prompt": "hi", "max_tokens": 50, "ignore_eos": True, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        m = scrape(url)
        assert m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0
        assert m.get("agp_streams_cut_unread_total", 0) == before.get("agp_streams_cut_unread_total", 0)

        answer = unchunked(read_to_end(stalled[0])).decode()
        events = [line[6:] for line in answer.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), answer[-500:]
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert sum(len(c["logprobs"]["tokens"]) for c in chunks if c["logprobs"]) == 1500
        assert chunks[-1]["finish_reason"] == "length"
    finally:
        for c in stalled:
            c.close()


def test_a_client_whose_tcp_takes_nothing_pauses_its_stream_before_any_token_queues(limited):
    """A client that reads nothing of a long stream, against a server whose unread-token
    pause and cut are out of reach: the server sees its TCP take nothing (no byte acknowledged
    while some wait) and pauses the stream (out of the batch, KV blocks freed) without a token
    queued in the server, far from its end; read at last, it goes on and the client gets all of its
    tokens. (Before: only queued tokens paused a stream, so this one was generated to its end
    for a client that read none of it, a thousand of its tokens in the kernel's buffers.) The
    pause comes about a second after the client's 4 KiB receive buffer filled, some 1.5 s in:
    as many tokens as the machine generates meanwhile (about 500 on a 2-core EPYC), so the
    stream is as long as 3 s of the machine's own generation (measured first; at least 1,500
    tokens, at most 4,000 of the 4,096-token context), far from its end when it pauses on a
    machine 4 times faster or slower alike. On the module's server under a limit of 256 open
    files, its pause and cut for unread tokens and --send-timeout out of reach."""
    limited.quiet()
    url, port = limited.url, limited.port
    max_tokens = min(4000, max(1500, int(3 * tokens_per_second(url))))
    before = scrape(url)
    with stalled_stream(port, "hello world", max_tokens=max_tokens, logprobs=None) as c:
        def paused():
            m = scrape(url)
            return m["agp_streams_paused_total"] - before.get("agp_streams_paused_total", 0) >= 1 \
                and m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0
        assert wait_for(paused, 120)
        generated = scrape(url)["agp_generation_tokens_total"] - before["agp_generation_tokens_total"]
        assert generated < max_tokens
        events = [line[6:] for line in unchunked(read_to_end(c)).decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert scrape(url)["agp_generation_tokens_total"] - before["agp_generation_tokens_total"] == max_tokens


def test_a_client_that_reads_its_stream_is_never_cut_however_long_the_answer(serve):
    """--max-unread-tokens counts the tokens waiting for the client, not those it has read: a
    stream read as it comes runs to its max_tokens, far past the bound (the module's server's
    UNREAD: 1,500 tokens), with no error."""
    _, url, _ = serve
    before = scrape(url).get("agp_streams_cut_unread_total", 0)
    body = {"prompt": "hi", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines), [line for line in lines if '"error"' in line]
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 1500
    assert scrape(url).get("agp_streams_cut_unread_total", 0) == before


def test_clients_gone_mid_stream_give_the_kv_pool_back_at_once(serve):
    """Streams whose clients close their connections unread: their sequences end at once (the
    engine idle, every KV block back) though each had thousands of tokens to go."""
    _, url, port = serve
    before = scrape(url)
    gone = [stalled_stream(port, "hello world") for _ in range(4)]
    assert wait_for(lambda: scrape(url)["agp_num_requests_running"] == 4, 60)
    for c in gone:
        c.close()

    def idle():
        m = scrape(url)
        return m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0 \
            and m["agp_requests_in_flight"] == 0
    assert wait_for(idle, 60)
    generated = scrape(url)["agp_generation_tokens_total"] - before["agp_generation_tokens_total"]
    assert generated < 4 * MAX_TOKENS / 2


def test_a_client_that_half_closes_after_its_request_is_taken_as_gone(serve):
    """A client that shuts its sending side after the request (`nc -N`) gets no answer: the EOF
    is its going away, as uvicorn takes it; its long answer is aborted and its KV freed."""
    _, url, port = serve
    c = stalled_stream(port, "hello world")
    with c:
        c.shutdown(socket.SHUT_WR)
        c.settimeout(60)
        assert read_to_end(c) == b""

        def idle():
            m = scrape(url)
            return m["agp_num_requests_running"] == 0 and m["agp_kv_blocks_used"] == 0
        assert wait_for(idle, 60)


@dataclass
class _Out:
    new_token_ids: list
    delta_text: str
    text: str
    logprobs: list | None = field(default=None)


def test_a_backlog_of_deltas_holds_the_answer_text_once():
    """Deltas queued for a consumer that does not take them keep their own text, not the whole
    text so far each (n of them held n copies: n² characters for a stalled stream)."""
    loop = asyncio.new_event_loop()
    try:
        owner = type("Owner", (), {"metrics": None})()
        stream = RequestStream(owner, LoopMail(loop))
        text = ""
        for i in range(500):
            text += f"tok{i} "
            stream.on_delta("k", 0, _Out([i], f"tok{i} ", text))
        loop.run_until_complete(asyncio.sleep(0))       # the queued callbacks run
        queued = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
        assert len(queued) == 500 and "".join(e[2].delta_text for e in queued) == text
        assert sum(len(e[2].text) for e in queued) <= len(text)
        assert stream.unread == 500
    finally:
        loop.close()


def test_a_stream_cut_for_its_unread_tokens_lets_go_of_them():
    """Past max_unread_tokens the request is aborted and the deltas its consumer never took are
    dropped at once, those still on their way too: the consumer's next event is the result that
    says why. (Before: a cut stream held its queued deltas, 1,024 of them by default, some 4 KB
    each with 20 logprobs, until its client's connection ended: --send-timeout later.)"""
    loop = asyncio.new_event_loop()
    try:
        aborted = []
        runtime = type("Runtime", (), {"abort": lambda self, key, message: aborted.append((key, message)),
                                       "running": lambda self, key: True})()
        owner = type("Owner", (), {"metrics": None, "runtime": runtime})()
        stream = RequestStream(owner, LoopMail(loop), max_unread_tokens=10)
        stream.key = "k"
        for i in range(30):
            stream.on_delta("k", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0))
        assert len(aborted) == 1 and "--max-unread-tokens" in aborted[0][1]
        assert stream.cut and stream.queue.qsize() == 0 and stream.unread == 0
        stream.on_done("the result")
        assert loop.run_until_complete(stream.__anext__()) == ("done", "the result")
    finally:
        loop.close()


class _Runtime:
    """A FlowRuntime as a stream sees it: what it was told to pause and abort."""
    accepting = True

    def __init__(self):
        self.calls = []

    def pause(self, key, paused):
        self.calls.append(("pause", key, paused))
        return paused

    def abort(self, key, message=""):
        self.calls.append(("abort", key, message))

    def running(self, key):
        return True


def _streams(runtime, keys, pause: int = 0, limit: int = 10) -> list[RequestStream]:
    """RequestStreams on the running loop (one LoopMail: what the runtime's threads hand them
    before the loop runs again comes in one batch) cut past `limit` unread tokens, paused past
    `pause` (0: never)."""
    owner = type("Owner", (), {"metrics": None, "runtime": runtime})()
    mail = LoopMail(asyncio.get_running_loop())
    streams = []
    for key in keys:
        stream = RequestStream(owner, mail, max_unread_tokens=limit, pause_unread_tokens=pause)
        stream.key = key
        streams.append(stream)
    return streams


async def _turns(n: int = 5) -> None:
    """Let the loop run what is ready (the mail's batch, the consumers it wakes) n times over."""
    for _ in range(n):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def _consuming(consumer):
    """`consumer` running as a task, cancelled on the way out."""
    task = asyncio.ensure_future(consumer)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _deltas(stream: RequestStream, ids) -> None:
    """The runtime's thread hands `stream` a delta a token (they reach the loop in one batch)."""
    for i in ids:
        stream.on_delta(stream.key, 0, _Out([i], f"tok{i} ", ""))


@pytest.mark.parametrize("pause", [0, 4])
def test_tokens_that_come_in_one_batch_while_the_consumer_waits_are_neither_cut_nor_paused_for(pause):
    """A consumer waiting for its stream's next event (its client took everything) is run only
    once the loop has handed the stream a whole LoopMail batch: on a loaded machine hundreds of a
    fast model's tokens. They are the server's lag, not its client's: the stream is neither cut
    nor paused for them, however many past its bounds, and its consumer gets every one. (Before:
    a client that read its stream as it came was cut past --max-unread-tokens.)"""
    runtime = _Runtime()

    async def read_after_a_batch():
        stream, = _streams(runtime, ["k"], pause=pause)
        async with _consuming(stream.__anext__()) as first:
            await _turns()                             # it waits on the empty queue
            _deltas(stream, range(30))                 # three times the cut's bound, in one batch
            await _turns()
            assert runtime.calls == [] and not stream.cut and not stream.paused
            events = [first.result()]
        while not stream.queue.empty():
            events.append(await stream.__anext__())
        assert runtime.calls == [] and stream.unread == 0 and stream.lagged == 0
        return events

    events = asyncio.run(read_after_a_batch())
    assert [e[2].new_token_ids for e in events] == [[i] for i in range(30)]


@pytest.mark.parametrize("pause", [0, 4])
def test_tokens_that_come_while_the_consumer_is_blocked_writing_count_past_what_came_while_it_waited(pause):
    """The consumer that took part of a batch that came while it waited (not counted) and is then
    blocked writing to its client (the transport's drain: the client takes nothing) has the
    tokens that come meanwhile counted: past the pause's bound it pauses, past the cut's (pausing
    off) it is cut, as for a client that stops reading; the lag still queued ahead of them is
    not counted."""
    runtime = _Runtime()

    async def blocked_after_a_batch():
        stream, = _streams(runtime, ["k"], pause=pause)
        writing = asyncio.Event()                      # its write to the client waits: never set
        taken = []

        async def writer():
            async for event in stream:
                taken.append(event)
                if len(taken) == 5:                    # five of the lag taken, then its client blocks it
                    await writing.wait()

        async with _consuming(writer()):
            await _turns()                             # it waits on the empty queue
            _deltas(stream, range(30))                 # the loop's lag: a batch past both bounds
            await _turns()
            assert runtime.calls == [] and len(taken) == 5
            assert stream.lagged == 25 and stream.unread == 0
            bound = pause or 10
            _deltas(stream, range(30, 30 + bound))     # up to the bound, while it writes: counted
            await _turns()
            assert runtime.calls == [] and stream.unread == bound
            _deltas(stream, [99])                      # one past it
            await _turns()
        return stream

    stream = asyncio.run(blocked_after_a_batch())
    if pause:
        assert runtime.calls == [("pause", "k", True)] and stream.paused and not stream.cut
    else:
        assert [c[:2] for c in runtime.calls] == [("abort", "k")] and "--max-unread-tokens" in runtime.calls[0][2]
        assert stream.cut and stream.queue.qsize() == 0 and stream.lagged == 0


def test_the_streams_of_a_batch_of_prompts_count_only_what_comes_while_their_merge_does_not_wait():
    """A StreamGroup (a completions batch of prompts) waits for each request's admission, then for
    the next event of any: what comes meanwhile, in one batch past the bound, is the loop's lag in
    each of its streams (none cut); once its consumer is blocked writing, what comes counts."""
    from pipeline_dsl.serve.async_pipeline import StreamGroup

    runtime = _Runtime()

    async def scenario():
        one, two = _streams(runtime, ["one", "two"])
        group = StreamGroup([one, two], 1)
        writing = asyncio.Event()
        taken = []

        async def writer():
            async for event in group:
                taken.append(event)
                if len(taken) == 60:
                    await writing.wait()               # its client blocks it

        async with _consuming(writer()):
            await _turns()                             # it waits for the first prompt's admission
            one.on_admitted("one")
            _deltas(one, range(30))                    # the first prompt's tokens while the second
            await _turns()                             # waits for an engine: nobody could read them
            assert runtime.calls == [] and taken == [] and one.lagged == 30
            two.on_admitted("two")
            _deltas(two, range(30))                    # the second's, in one batch, while it waits
            await _turns()
            assert runtime.calls == [] and len(taken) == 60 and one.unread == two.unread == 0
            _deltas(two, range(30, 41))                # past the bound while it writes
            await _turns()
        return one, two

    one, two = asyncio.run(scenario())
    assert [c[:2] for c in runtime.calls] == [("abort", "two")] and two.cut and not one.cut


def test_a_stream_held_waiting_until_its_writer_begins_counts_nothing_before():
    """The app holds a stream waiting from its first event until its answer's writer begins
    (serve/generation.py, sse.Relay): the tokens the loop hands it meanwhile (it takes turns to get
    the first event to the writer) are the server's lag; once the writer begins, what comes while
    it is blocked writing counts."""
    runtime = _Runtime()

    async def scenario():
        stream, = _streams(runtime, ["k"])
        stream.waiting = True                          # generation.start
        async with _consuming(stream.__anext__()) as first:
            await _turns()
            _deltas(stream, [0])
            await _turns()
            assert first.done() and stream.waiting     # still held: its writer has not begun
        _deltas(stream, range(1, 31))
        await _turns()
        assert runtime.calls == [] and stream.lagged == 30 and stream.unread == 0
        stream.waiting = False                         # Relay.relay begins (and writes, blocked)
        _deltas(stream, range(40, 51))
        await _turns()
        return stream

    stream = asyncio.run(scenario())
    assert [c[:2] for c in runtime.calls] == [("abort", "k")] and stream.cut


def test_a_paused_stream_goes_on_when_its_consumer_catches_up_and_is_cut_if_it_never_does():
    """Past pause_unread_tokens queued, the request's generation is paused (once, counted); the
    consumer taking every queued token lets it go on. Paused for pause_limit_s with the consumer
    never catching up (a client that reads a byte now and then), it is cut as for unread tokens:
    aborted, its deltas dropped, counted."""
    from pipeline_dsl.serve.metrics import ServerMetrics

    loop = asyncio.new_event_loop()
    try:
        calls = []
        runtime = type("Runtime", (), {"abort": lambda self, key, message: calls.append(("abort", message)),
                                       "pause": lambda self, key, paused: calls.append(("pause", paused)) or paused,
                                       "accepting": True})()
        metrics = ServerMetrics()
        owner = type("Owner", (), {"metrics": metrics, "runtime": runtime})()
        stream = RequestStream(owner, LoopMail(loop), max_unread_tokens=1000, pause_unread_tokens=8,
                               pause_limit_s=0.05)
        stream.key = "k"
        for i in range(12):
            stream.on_delta("k", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0))
        assert calls == [("pause", True)] and stream.paused
        for _ in range(11):
            loop.run_until_complete(stream.__anext__())
        assert calls == [("pause", True)]                 # one token still waits
        loop.run_until_complete(stream.__anext__())
        assert calls == [("pause", True), ("pause", False)] and not stream.paused

        for i in range(12):                                # stalled again, and for good
            stream.on_delta("k", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0.2))        # past pause_limit_s
        assert [c[0] for c in calls] == ["pause", "pause", "pause", "abort"] and "--send-timeout" in calls[-1][1]
        assert stream.cut and stream.queue.qsize() == 0
        counted = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}
        assert counted["agp_streams_paused_total"] == 2 and counted["agp_streams_cut_unread_total"] == 1
    finally:
        loop.close()


def test_a_stream_that_pauses_and_goes_on_says_so_in_the_log_with_its_client_and_request_id(caplog):
    """Each pause and each going on is an INFO line of agp.serve naming the answer, its client
    and why (unread tokens, or its client's TCP taking nothing), the client and request id as the
    record's fields too (a JSON log line's `client`, `request_id`), as the line of a cut does.
    (Before: a stream paused and went on without a word; only its cut was logged.)"""
    import logging

    loop = asyncio.new_event_loop()
    try:
        runtime = type("Runtime", (), {"pause": lambda self, key, paused: paused, "accepting": True})()
        owner = type("Owner", (), {"metrics": None, "runtime": runtime})()
        stream = RequestStream(owner, LoopMail(loop), pause_unread_tokens=8)
        stream.key, stream.id, stream.client, stream.request_id = "k", "cmpl-abc", "10.1.2.3:5000", "abc"
        caplog.set_level(logging.INFO, logger="agp.serve")
        for i in range(12):
            stream.on_delta("k", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0))
        for _ in range(12):
            loop.run_until_complete(stream.__anext__())
        stream.client_stalled(True)
        stream.client_stalled(False)
        lines = [r for r in caplog.records if r.name == "agp.serve"]
        assert [r.getMessage().split(":")[0] for r in lines] == ["pausing cmpl-abc of 10.1.2.3", "resuming cmpl-abc of "
                                                                 "10.1.2.3"] * 2
        assert "more than 8 tokens unread" in lines[0].getMessage() and "TCP" in lines[2].getMessage()
        assert "paused" in lines[1].getMessage()
        assert all((r.levelname, r.client, r.request_id) == ("INFO", "10.1.2.3:5000", "abc") for r in lines)
    finally:
        loop.close()


def test_in_a_drain_a_stream_is_neither_paused_nor_cut_for_a_pause_that_did_not_happen():
    """Once the runtime stops admitting (a drain) it pauses nothing, and lets go what was paused:
    a stream past pause_unread_tokens then is not counted as paused nor cut pause_limit_s later
    for a pause that never happened (its tokens queue on, up to max_unread_tokens), and one
    paused before the drain is not cut when its pause_limit_s runs out (before: both were cut,
    naming --send-timeout, though the engine went on generating for them)."""
    from pipeline_dsl.serve.metrics import ServerMetrics

    class Runtime:
        accepting = True

        def __init__(self):
            self.calls = []

        def pause(self, key, paused):
            self.calls.append(("pause", paused))
            return paused and self.accepting          # FlowRuntime.pause: nothing paused in a drain

        def abort(self, key, message):
            self.calls.append(("abort", message))

    loop = asyncio.new_event_loop()
    try:
        metrics = ServerMetrics()
        runtime = Runtime()
        owner = type("Owner", (), {"metrics": metrics, "runtime": runtime})()

        def stream_of(key):
            stream = RequestStream(owner, LoopMail(loop), max_unread_tokens=1000, pause_unread_tokens=8,
                                   pause_limit_s=0.05)
            stream.key = key
            return stream

        before = stream_of("before")
        for i in range(12):
            before.on_delta("before", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0))
        assert before.paused
        runtime.accepting = False                      # the drain begins: it let the paused request go
        during = stream_of("during")
        for i in range(12):
            during.on_delta("during", 0, _Out([i], f"tok{i} ", ""))
        loop.run_until_complete(asyncio.sleep(0.2))    # past pause_limit_s
        assert not during.paused and not during.cut and during.queue.qsize() == 12
        assert not before.paused and not before.cut and before.queue.qsize() == 12
        assert not [c for c in runtime.calls if c[0] == "abort"]
        counted = {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples}
        assert counted["agp_streams_paused_total"] == 1 and counted["agp_streams_cut_unread_total"] == 0
    finally:
        loop.close()


def test_a_stream_whose_client_stalls_pauses_and_goes_on_once_the_client_takes_bytes_and_every_token():
    """The server's word that the client's TCP takes nothing pauses the generation at once, with
    no token queued; the queue emptied, it stays paused while the client still takes nothing,
    and goes on when it takes bytes again."""
    loop = asyncio.new_event_loop()
    try:
        calls = []
        runtime = type("Runtime", (), {"pause": lambda self, key, paused: calls.append(paused) or paused})()
        owner = type("Owner", (), {"metrics": None, "runtime": runtime})()
        stream = RequestStream(owner, LoopMail(loop), pause_unread_tokens=32)
        stream.key = "k"

        async def stall_then_read():
            stream.client_stalled(True)
            assert calls == [True] and stream.paused
            stream.on_delta("k", 0, _Out([1], "a", ""))
            await asyncio.sleep(0)
            await stream.__anext__()                       # every queued token taken
            assert calls == [True]                         # but the client takes nothing yet
            stream.client_stalled(False)
            assert calls == [True, False] and not stream.paused
        loop.run_until_complete(stall_then_read())
    finally:
        loop.close()


def test_hundreds_of_idle_connections_leave_room_for_a_request_under_a_low_open_files_limit(cutting):
    """Started under a soft limit of 256 open files (the hard one higher: the module's server
    that cuts for unread tokens is), the server raises its own: 400 connections that send
    nothing, and a request still gets its answer. (Before: the server ran out of descriptors,
    and the request was dropped unanswered.)"""
    if cutting.preexec_fn is None:
        resource = pytest.importorskip("resource")
        pytest.skip(f"the hard open-files limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")
    _, url, port = cutting.get()
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(400)]
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    finally:
        for c in idle:
            c.close()
    assert wait_for(lambda: "open files" in cutting.log(), 60), cutting.log()[-3000:]     # its startup line
    assert "too few" not in cutting.log(), cutting.log()[-3000:]


@contextlib.contextmanager
def _two_stalled_streams(port: int):
    """Two streams whose clients read nothing; their sockets closed after."""
    stalled = [stalled_stream(port, "hello world") for _ in range(2)]
    try:
        yield
    finally:
        for c in stalled:
            c.close()


def test_a_shutdown_cuts_the_connections_of_clients_that_read_nothing_without_a_traceback(cutting):
    """SIGTERM with two stalled streams (their requests already cut) and a request whose body is
    still arriving: the server closes the stalled streams' connections, answers the request whose
    body has not come a JSON 503 at once, and exits 0 at once. (Before: uvicorn waited its graceful
    5 s on the writes that could not go, then cancelled them and logged an ERROR with a traceback
    per connection; the handler waited on the body until uvicorn cancelled it 5 s into the
    shutdown: a text/plain 500 and a traceback in the log.) The module's server, stopped here: no
    test before this one left a traceback in its log either."""
    proc, url, port = cutting.get()
    before = scrape(url).get("agp_streams_cut_unread_total", 0)
    with _two_stalled_streams(port), socket.create_connection(("127.0.0.1", port)) as c:
        assert wait_for(lambda: scrape(url)["agp_streams_cut_unread_total"] - before == 2, 120)
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")          # the rest never comes
        assert wait_for(lambda: re.search(r"^agp_http_bodies_arriving(\{[^}]*\})? 1\.0$",
                                          HTTP.get(url + "/metrics").text, re.M), 60)   # in its handler
        proc.send_signal(signal.SIGTERM)
        c.settimeout(60)
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
        c.close()                                      # as a client does once answered: the server's
        err = cutting.exit_log(60)                     # linger for the rest of the body ends at once
        assert proc.returncode == 0, err[-2000:]
        bad = [i for i in (err.find("Traceback"), err.find("Exception in ASGI application")) if i >= 0]
        assert not bad, err[max(0, min(bad) - 1000):][:4000]       # the log around it, not the log's end
        assert "timeout graceful shutdown exceeded" not in err, err[-3000:]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"application/json" in head, answer[:300]
    assert "body was still arriving" in json.loads(body)["error"]["message"]


def test_a_shutdown_lets_paused_streams_go_on_rather_than_wait_for_their_readers(pausing):
    """SIGTERM with two streams paused for clients that read nothing: the drain lets them go on
    (their tokens queue until --max-unread-tokens cuts them) and the server exits 0, drained,
    without waiting out its drain timeout (600 s) or their --send-timeout (600 s). (Before: a
    paused request waited for its reader, so the drain waited the whole timeout and then cut it.)"""
    proc, url, port = pausing.get()
    before = scrape(url).get("agp_streams_paused_total", 0)
    with _two_stalled_streams(port):
        assert wait_for(lambda: scrape(url)["agp_streams_paused_total"] - before >= 2, 120)
        proc.send_signal(signal.SIGTERM)
        err = pausing.exit_log(300)
        assert proc.returncode == 0 and "stopped (drained)" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        # let go on by the drain, each is cut past --max-unread-tokens, not generated to its max_tokens
        # for a reader that takes nothing
        assert err.count("its client left more than 256 tokens of its stream unread") == 2, err[-3000:]


class Limited:
    """agp serve on the tiny model under a hard limit of 256 open files (the server cannot raise
    it), its header timeout long enough that no idle connection is closed by it, its pause and cut
    for unread tokens and its --send-timeout out of reach of a stalled stream of 2,000 tokens; its
    log read as it comes (`log`), so that each of the tests sharing it sees what its own
    connections caused."""

    def __init__(self, long_gguf, folder):
        resource = pytest.importorskip("resource")
        path = folder / "tiny.agp"
        path.write_text(TINY.format(model=long_gguf, max_queue=64, max_batch_size=4, timeout=1).replace("1MiB", "8MiB"))
        self.proc, self.url = start_agp_serve(
            str(path), "--threads", "1", "--no-access-log", "--header-timeout", "300", "--send-timeout", "600",
            "--pause-unread-tokens", "100000", "--max-unread-tokens", "200000",
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
        self.port = int(self.url.rsplit(":", 1)[1])
        self.sockets = sockets_of(self.proc.pid)         # listening, no connection open
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def log(self, since: int = 0) -> str:
        """What the server logged from its line `since` on."""
        return "".join(self.lines[since:])

    def quiet(self) -> int:
        """Once the server has closed every connection an earlier test left, as a fresh one has
        none: the number of lines logged so far."""
        assert wait_for(lambda: sockets_of(self.proc.pid) <= self.sockets, 60), sockets_of(self.proc.pid)
        return len(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.reader.join(60)


@pytest.fixture(scope="module")
def limited(long_gguf, tmp_path_factory):
    """The server under a hard limit of 256 open files, shared by the tests of that limit and
    the test of a client whose TCP takes nothing."""
    served = Limited(long_gguf, tmp_path_factory.mktemp("limited"))
    try:
        yield served
    finally:
        served.stop()


def test_connections_waiting_for_a_request_make_room_for_a_new_client_at_the_open_files_limit(limited):
    """Under a hard limit of 256 open files (the server cannot raise it), 400 connections that
    send nothing: a new client's request gets its answer, and the connections that waited
    longest for a request were closed to make room for it. (Before: they took every descriptor,
    and the new client's connection was closed unanswered.)"""
    since = limited.quiet()
    idle = []
    try:
        idle = [socket.create_connection(("127.0.0.1", limited.port)) for _ in range(400)]
        r = httpx.post(limited.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        first = idle[0]
        first.settimeout(60)
        assert first.recv(1) == b""          # the longest waiting: closed for the new ones (not by the header timeout)
    finally:
        for c in idle:
            c.close()
    assert "open files 256" in limited.log(), limited.log()[-3000:]            # its startup line
    assert wait_for(lambda: "that waited longest for a request" in limited.log(since), 60), limited.log()[-3000:]


def test_the_first_connection_past_the_bound_closes_the_longest_waiting(limited):
    """Under an open-files limit of 256 the server keeps 256 - 64 = 192 connections open: the 193rd
    (and a few more) closes the one that waited longest, the earliest opened without a request; a
    connection whose request is under way (its body still arriving) is none of them and is answered."""
    limited.quiet()
    port = limited.port
    idle = []
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        busy = socket.create_connection(("127.0.0.1", port))
        busy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
        idle = [busy] + [socket.create_connection(("127.0.0.1", port)) for _ in range(192 + 4)]
        idle[1].settimeout(60)
        assert idle[1].recv(1) == b""            # closed at once, not by the header timeout (300 s)
        busy.sendall(body[5:])
        busy.settimeout(60)
        answer = b""
        while chunk := busy.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        assert httpx.get(limited.url + "/health", timeout=30).status_code == 200
    finally:
        for c in idle:
            c.close()


def test_the_connections_kept_open_leave_a_quarter_of_the_open_files_limit_spare_from_64_to_2048():
    from pipeline_dsl.serve.server import max_open_connections

    assert max_open_connections(None) is None                       # no limit known: no bound
    assert max_open_connections(256) == 256 - 64                    # at least 64 spare
    assert max_open_connections(1024) == 1024 - 256                 # a quarter
    assert max_open_connections(65536) == 65536 - 2048              # at most 2,048 spare


def test_a_stream_lets_go_of_its_connections_send_watch_when_it_ends():
    """The server's SendWatch (one a connection, kept across its keep-alive requests) tells the
    stream being written when its client stalls; once the answer ends it tells nobody. The
    stream's own disconnect watcher was named `watch` too and shadowed it, so the end cleared
    the watcher's attribute, and the SendWatch kept calling the finished stream."""
    import asyncio

    from pipeline_dsl.serve.server import SEND_WATCH, SendWatch
    from pipeline_dsl.serve.sse import EventStream

    class Stream:
        started = True

        def client_stalled(self, stalled):
            pass

        def abort(self):
            pass

    async def body():
        yield b"data: [DONE]\n\n"

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        pass

    watch = SendWatch()
    scope = {"type": "http", "extensions": {SEND_WATCH: watch}}
    asyncio.run(EventStream(body(), Stream(), on_gone=lambda: None)(scope, receive, send))
    assert watch.listener is None


def test_streams_aborted_while_paused_leave_no_timer_on_the_loop_and_are_let_go():
    """A stream paused for its client arms a timer (pause_limit_s: cut if it never catches up);
    aborted (its client gone), the stream leaves no timer behind on the event loop, and nothing
    holds it and its queued deltas any more (before: each aborted paused stream's timer stayed
    armed, holding it, until --send-timeout passed)."""
    import gc
    import weakref

    class Loop(asyncio.SelectorEventLoop):
        """An event loop that keeps the timers it was asked for."""

        def __init__(self):
            super().__init__()
            self.timers = []

        def call_later(self, *args, **kwargs):
            handle = super().call_later(*args, **kwargs)
            self.timers.append(handle)
            return handle

    loop = Loop()
    try:
        runtime = type("Runtime", (), {"abort": lambda self, key, message="": None,
                                       "pause": lambda self, key, paused: paused, "accepting": True})()
        owner = type("Owner", (), {"metrics": None, "runtime": runtime})()
        streams = []
        for k in range(200):
            stream = RequestStream(owner, LoopMail(loop), max_unread_tokens=1000, pause_unread_tokens=8,
                                   pause_limit_s=600)
            stream.key = f"k{k}"
            for i in range(12):
                stream.on_delta(stream.key, 0, _Out([i], f"tok{i} ", ""))
            streams.append(stream)
        loop.run_until_complete(asyncio.sleep(0))
        assert all(s.paused for s in streams) and len(loop.timers) == 200
        for stream in streams:
            stream.abort()
        loop.run_until_complete(asyncio.sleep(0))
        assert [t for t in loop.timers if not t.cancelled()] == []
        gone = [weakref.ref(s) for s in streams]
        del streams, stream
        gc.collect()
        assert [r for r in gone if r() is not None] == []
    finally:
        loop.close()
