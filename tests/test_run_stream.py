"""`agp run` reads its input as a stream: a producer piped into it (`producer | agp run P -`) has
its first lines answered while it has not written the later ones, a bad line later in the stream
is an error record with its line number and loses no answer before it, a gzip'd stream is
answered as it comes too, and an input that cannot be read to its end keeps the answers to the
lines before the failure (exit 2, saying after which line)."""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import select
import subprocess
import sys
import tempfile
import termios
import threading
import time
import zlib
from pathlib import Path

from clikit import agp_in, reaped, std_streams
from test_run_errors import ROOT, pipeline, records, run  # noqa: F401  (pipeline: a fixture)


def start(pipeline: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline_dsl.cli", "run", str(pipeline), "--no-progress",
                             "--threads", "1", "-i", "-", *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


class Fed:
    """A run of this process (see fed_run) as its feeder thread sees it: `stdin`, the write end
    of the run's input pipe (unbuffered), `stdout`, the read end of its standard output's pipe,
    and poll(): None while the run goes on, as a child's Popen.poll() says."""

    def __init__(self):
        in_r, in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.stdin_r, self.stdin = open(in_r, "r", encoding="utf-8"), open(in_w, "wb", buffering=0)
        self.stdout = self.out_r
        self.code = None

    def poll(self):
        return self.code

    def communicate(self):                         # what wait_for_lines shows of a run that ended early
        return None, b"(the run ended; its standard error is in the test's report)"


def fed_run(pipeline: Path, feed, *args) -> tuple[int, str, str]:
    """`agp run PIPELINE --no-progress --threads 1 -i - ARGS` in this process (cli.main in the
    main thread, where the run takes its signals), its standard input a pipe that `feed(fed)`
    writes from a thread of its own meanwhile, as a producer piped into it (`producer | agp run
    P -`) writes; the input is closed when feed returns or fails. The run's standard output is a
    pipe too (fed.stdout, its read end) and its standard error a file. (exit status, what is
    left on standard output once it has ended, standard error); a failure in feed fails the test.
    The run reads its input through sys.stdin's descriptor as it reads a shell's pipe; a child
    took seconds to start."""
    from pipeline_dsl import cli

    fed, failed = Fed(), []

    def feeder():
        try:
            feed(fed)
        except BaseException as exc:               # noqa: BLE001 - raised in the test's thread below
            failed.append(exc)
        finally:
            fed.stdin.close()

    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="backslashreplace") as stderr, \
            open(fed.out_w, "w", encoding="utf-8") as stdout:
        thread = threading.Thread(target=feeder, daemon=True)
        thread.start()
        try:
            with std_streams(fed.stdin_r, stdout, stderr):
                fed.code = cli.main(["run", str(pipeline), "--no-progress", "--threads", "1", "-i", "-",
                                     *map(str, args)])
        finally:
            fed.stdin_r.close()
        thread.join(120)
        stderr.seek(0)
        err = stderr.read()
    with open(fed.out_r, "rb") as rest:
        left = rest.read().decode()
    assert not thread.is_alive(), "the feeder thread did not end"
    if failed:
        raise AssertionError(f"{failed[0]!r}; the run said:\n{err}") from failed[0]
    return fed.code, left, err


def wait_for_lines(path: Path, n: int, proc, timeout: float = 120) -> list[dict]:
    """The output's first n records, once written; the run (a child, or a Fed) must still be going meanwhile."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count("\n") >= n):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, f"no {n} answer(s) within {timeout} s"
        time.sleep(0.05)
    return records(path)


def wait_until_read(proc, timeout: float = 120) -> None:
    """Until the run has read what its input pipe holds (the pipe is empty), the run still going."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = bytearray(4)
        fcntl.ioctl(proc.stdin.fileno(), termios.FIONREAD, waiting)
        if int.from_bytes(waiting, "little") == 0:
            return
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, f"the input not read within {timeout} s"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, last: bytes) -> str:
    """Write the input's last bytes and close it; the run's standard error once it has ended."""
    return proc.communicate(last, timeout=120)[1].decode()


def test_an_answer_is_written_before_the_input_pipe_is_closed_and_a_second_run_writing_it_is_refused(tmp_path,
                                                                                                    pipeline):
    """The first line's answer is in the output while the input pipe is still open. Two `agp run
    -o out.jsonl` at once: the second's --overwrite emptied the file under the first, both wrote at
    their own offsets (a hole of NULs, lines cut and lost) and both exited 0. (One run serves
    both: a run writing its output with its input open is the second check's setting.)"""
    out, other = tmp_path / "out.jsonl", tmp_path / "other.jsonl"
    other.write_text('{"id": "x", "prompt": "other", "max_tokens": 2}\n')
    with reaped(start(pipeline, "-o", out)) as proc:
        proc.stdin.write(b'{"id": "first", "prompt": "hello", "max_tokens": 2}\n')
        proc.stdin.flush()
        (got,) = wait_for_lines(out, 1, proc)            # the pipe is still open: more may come
        assert got["id"] == "first" and "text" in got, got
        for how in ("--overwrite", "--resume"):
            r = run(pipeline, "-i", other, "-o", out, how)
            assert r.returncode == 2 and f"{out} is being written by another agp run" in r.stderr, r.stderr
        err = finish(proc, b'{"id": "second", "prompt": "again", "max_tokens": 2}\n')
    assert proc.returncode == 0, err
    assert [g["id"] for g in records(out)] == ["first", "second"]


def fifo_writer(fifo, proc) -> int:
    """A write end of `fifo` once `proc` has opened its read end (polled, up to two minutes)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:                    # ENXIO: no reader yet
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)


def test_of_two_runs_started_before_their_output_existed_the_second_to_open_it_is_refused(tmp_path, pipeline):
    """Both found no out.jsonl (each reads its input's first line before opening it); the second
    to open it then emptied the first's answers and wrote over them, and both exited 0."""
    out, fifo = tmp_path / "out.jsonl", tmp_path / "in.fifo"
    os.mkfifo(fifo)
    with reaped(start(pipeline, "-o", out, "--overwrite", "-i", fifo)) as second:
        fd = fifo_writer(fifo, second)     # it opens its input once it has found no out.jsonl

        def first_writes_then_second_opens(first):          # the first run: this process's
            first.stdin.write(b'{"id": "first", "prompt": "hello", "max_tokens": 2}\n')
            wait_for_lines(out, 1, first)                # the first run created out.jsonl and writes it
            os.write(fd, b'{"id": "second", "prompt": "again", "max_tokens": 2}\n')
            os.close(fd)
            err = second.communicate(timeout=120)[1].decode()
            assert second.returncode == 2 and f"{out} is being written by another agp run" in err, err

        code, _, err = fed_run(pipeline, first_writes_then_second_opens, "-o", out)
    assert second.returncode == 2 and code == 0, err
    assert [g["id"] for g in records(out)] == ["first"]


def test_a_run_whose_output_another_run_created_and_finished_meanwhile_is_refused_and_keeps_it(tmp_path, pipeline):
    """This run found no out.jsonl, then waited for its input's first line; another run wrote
    out.jsonl whole and ended meanwhile (its lock let go). Without --overwrite or --resume this
    run must not empty those answers: it is refused, exit 2, and the file is left as it was."""
    out, fifo, other = tmp_path / "out.jsonl", tmp_path / "in.fifo", tmp_path / "other.jsonl"
    other.write_text('{"id": "first", "prompt": "hello", "max_tokens": 2}\n')
    os.mkfifo(fifo)
    with reaped(start(pipeline, "-o", out, "-i", fifo)) as second:
        fd = fifo_writer(fifo, second)     # it opens its input once it has found no out.jsonl
        r = run(pipeline, "-i", other, "-o", out)
        assert r.returncode == 0, r.stderr
        os.write(fd, b'{"id": "second", "prompt": "again", "max_tokens": 2}\n')
        os.close(fd)
        err = second.communicate(timeout=120)[1].decode()
    assert second.returncode == 2 and f"{out} was written by another run while this one started" in err, err
    assert [g["id"] for g in records(out)] == ["first"]


def test_answers_on_stdout_come_before_the_input_pipe_is_closed_and_a_malformed_line_later_is_an_error_record(
        tmp_path, pipeline):
    """The answers so far are on stdout while the input is still open; a malformed line later in
    the stream is an error record with its line number and loses no answer around it. (One run
    serves both.)"""
    seen = []

    def answers_read_then_the_rest_written(proc):
        proc.stdin.write(b'{"id": "a", "prompt": "one", "max_tokens": 2}\n\n{"id": "b", "prompt": "two", '
                         b'"max_tokens": 2}\n')
        so_far = b""
        while so_far.count(b"\n") < 2:                   # the answers so far, the input still open
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no answer on stdout within 120 s"
            so_far += os.read(proc.stdout, 1 << 16)      # unbuffered: select sees what is left
            assert proc.poll() is None
        seen.extend(json.loads(line) for line in so_far.decode().splitlines())
        assert [g["id"] for g in seen] == ["a", "b"]
        proc.stdin.write(b'{"id": "c", "prompt": \n{"id": "d", "prompt": "four", "max_tokens": 2}\n')

    code, rest, err = fed_run(pipeline, answers_read_then_the_rest_written)
    assert code == 0, err
    got = seen + [json.loads(line) for line in rest.splitlines()]
    assert [g["id"] for g in got] == ["a", "b", 4, "d"]
    assert "text" in got[0] and "text" in got[1] and "text" in got[3]
    assert got[2]["error"]["line"] == 4 and "not valid JSON" in got[2]["error"]["message"]
    assert "1 failed" in err


def test_a_gzip_compressed_stream_is_answered_as_it_comes_even_when_its_first_write_is_one_byte(tmp_path,
                                                                                                  pipeline):
    """A gzip'd stream's first answer is written before the rest of the stream comes. The gzip
    magic is two bytes; a pipe's first read may hold only the first (a producer that writes byte
    by byte, a network stream split there): the stream was then taken for text and refused as not
    JSON Lines. (One run serves both: the first line's compressed bytes go as one byte, then the
    rest.)"""
    out = tmp_path / "out.jsonl"
    packer = zlib.compressobj(wbits=31)                  # gzip
    first = packer.compress(b'{"id": "z1", "prompt": "hello", "max_tokens": 2}\n') + packer.flush(zlib.Z_SYNC_FLUSH)
    def one_byte_first(proc):
        proc.stdin.write(first[:1])
        wait_until_read(proc)                             # read alone, before the rest is written
        proc.stdin.write(first[1:])
        assert [g["id"] for g in wait_for_lines(out, 1, proc)] == ["z1"]
        proc.stdin.write(packer.compress(b'{"id": "z2", "prompt": "again", "max_tokens": 2}\n') + packer.flush())

    code, _, err = fed_run(pipeline, one_byte_first, "-o", out)
    assert code == 0, err
    assert [g["id"] for g in records(out)] == ["z1", "z2"]


def test_an_input_cut_short_keeps_the_answers_before_it_and_says_after_which_line(tmp_path, pipeline):
    lines = "".join(json.dumps({"id": f"r{i}", "prompt": f"p{i} " + "x" * 4000, "max_tokens": 1}) + "\n"
                    for i in range(60))
    packed = gzip.compress(lines.encode(), compresslevel=0)   # stored: each line's bytes come out as read
    inp, out = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl"
    inp.write_bytes(packed[:len(packed) // 2])
    r = run(pipeline, "-i", inp, "-o", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    got = records(out)
    assert 0 < len(got) < 60 and [g["id"] for g in got] == [f"r{i}" for i in range(len(got))]
    assert (f"cannot read {inp} after line {len(got)}: it is gzip-compressed and cannot be decompressed"
            in r.stderr) and "run summary" in r.stderr


def test_a_stream_killed_midway_is_resumed_from_a_file_of_the_same_lines(tmp_path, pipeline):
    """OUT.agp-run covers the lines read when each answer is written: after a kill -9 mid-stream,
    --resume over the whole input checks those lines and answers only the rest."""
    lines = [json.dumps({"id": f"q{i}", "prompt": f"hello {i}", "max_tokens": 2}) + "\n" for i in range(5)]
    out = tmp_path / "out.jsonl"
    with reaped(start(pipeline, "-o", out)) as proc:
        proc.stdin.write("".join(lines[:2]).encode())
        proc.stdin.flush()
        wait_for_lines(out, 2, proc)
        proc.kill()
        proc.communicate(timeout=60)
    assert json.loads((tmp_path / "out.jsonl.agp-run").read_text())["input_lines"] == 2
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(lines))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert [g["id"] for g in records(out)] == [f"q{i}" for i in range(5)]
    assert "2 more already answered in the output (--resume)" in r.stderr
    inp.write_text("".join(lines).replace("hello 1", "edited"))
    r = run(pipeline, "-i", inp, "-o", out, "--resume")
    assert r.returncode == 2 and f"{out} was made from another input" in r.stderr


def test_the_progress_of_a_file_counts_to_its_lines_to_answer(tmp_path, pipeline):
    """A file's lines are counted beside the run: the progress counts to those to answer (not the
    blank one, not the bad one, answered by an error record). It was a count with no total; before
    that, tqdm refusing bool() of a bar without a total failed every run with progress on."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "prompt": "hi", "max_tokens": 1}) for i in range(3)]
    inp.write_text("\n".join([lines[0], "", "{not json", *lines[1:]]) + "\n")
    r = agp_in("run", pipeline, "--threads", "1", "-i", inp, "-o", out)         # progress on, off a terminal
    assert r.returncode == 0, r.stderr
    got = records(out)
    assert [g["id"] for g in got] == [0, 3, 1, 2] and "error" in got[1]    # a bad line's id: its number
    assert "3/3" in r.stderr.replace(" ", "") and "internal error" not in r.stderr


def test_the_lines_of_a_file_are_known_before_they_are_read_those_of_a_pipe_at_its_end(tmp_path):
    import os

    from pipeline_dsl.commands.run_input import InputLines, open_input

    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"b": 2}\r\n{"c": 3}')
    lines = InputLines(open_input(str(path)))
    deadline = time.monotonic() + 30
    while lines.request_lines is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines.request_lines == 3 and lines.count == 0          # counted, none taken
    r, w = os.pipe()
    with open(r, "rb") as rf:
        lines = InputLines(rf)
        os.write(w, b'{"a": 1}\n\n{"b": 2}\n')
        assert lines.take() == b'{"a": 1}' and lines.request_lines is None    # a pipe's length: unknown
        os.close(w)
        while lines.take() is not None:
            pass
        assert lines.request_lines == 2
