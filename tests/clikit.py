"""The `agp` command as a user runs it, in a child process or in this one:

    r = agp("check", "examples/chat.agp")                 # a child process, run to its end: a CompletedProcess (text)
    r = agp_in("run", path, "-i", inp)                    # the same, through cli.main in this process
    with reaped(agp_child("run", path, "-i", inp)) as proc:   # started; killed if the block leaves it running
        ...

A child costs a Python start and torch's import (seconds each): `agp_in` is for what needs no
fresh process. A child stays what a test needs where the process itself is the point: signals,
a kill, the environment it starts with (read at an import), a hook module imported afresh,
file descriptors 0-2 themselves (a pipe, a locale, /dev/full), what the interpreter does at exit.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack, chdir, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGP = (sys.executable, "-m", "pipeline_dsl.cli")


def ctrl_c_default() -> None:
    """preexec_fn of a child a test stops with SIGINT: Ctrl-C's default disposition in it. A shell
    starts a background job (`make test &`, nohup) with SIGINT ignored, and a child inherits that,
    so a Python child would never see the signal the test sends and would wait on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def agp(*args, cwd=ROOT, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`agp ARGS` (each str()-ed) run to its end in `cwd`, its stdout and stderr captured as text;
    `kw` goes to subprocess.run (input=, env=, ...)."""
    return subprocess.run([*AGP, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          **kw)


@contextmanager
def std_streams(stdin=None, stdout=None, stderr=None):
    """sys.stdin, sys.stdout and sys.stderr are the streams given (None: the one there) while in
    use, as a shell's redirections give them to a command run in this process (cli.main); they are
    put back after, and so are sys.path (a python stage's folder is added to it) and torch's thread
    count (`--threads N` sets it for the process)."""
    saved, path = (sys.stdin, sys.stdout, sys.stderr), list(sys.path)
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    sys.stdin, sys.stdout, sys.stderr = (new if new is not None else old
                                         for new, old in zip((stdin, stdout, stderr), saved))
    try:
        yield
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        sys.path[:] = path
        if threads is not None:
            torch.set_num_threads(threads)


def agp_in(*args, cwd=ROOT, input: str | None = None, encoding: str = "utf-8") -> subprocess.CompletedProcess:
    """`agp ARGS` (each str()-ed) run to its end in this process, through the command line's
    main(argv), in `cwd`: as agp(), a CompletedProcess with the exit status and what it wrote on
    stdout and stderr as text. Standard input holds `input` (nothing when None); the three
    streams are files, as a shell's redirections make them (each has a descriptor), and
    sys.stdin/stdout/stderr, the folder, sys.path (a python stage's folder is added to it) and
    torch's thread count (`--threads N` sets it for the process) are put back after it."""
    from pipeline_dsl import cli

    argv = [*map(str, args)]
    with ExitStack() as stack:
        stdin, stdout, stderr = (stack.enter_context(tempfile.TemporaryFile("w+", encoding=encoding, errors=errors))
                                 for errors in ("strict", "strict", "backslashreplace"))
        stdin.write(input or "")
        stdin.seek(0)
        stack.enter_context(chdir(cwd))
        try:
            with std_streams(stdin, stdout, stderr):
                code = cli.main(argv)
        except SystemExit as exc:                  # argparse's usage errors, --help, --version
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if isinstance(exc.code, str):
                print(exc.code, file=stderr)
        texts = []
        for stream in (stdout, stderr):
            stream.flush()
            stream.seek(0)
            texts.append(stream.read())
    return subprocess.CompletedProcess([*AGP, *argv], code, *texts)


def agp_child(*args, cwd=ROOT, **kw) -> subprocess.Popen:
    """`agp ARGS` (each str()-ed) started in `cwd`, its stderr a text pipe; `kw` goes to subprocess.Popen."""
    return subprocess.Popen([*AGP, *map(str, args)], stderr=subprocess.PIPE, text=True, cwd=cwd, **kw)


def reap(proc: subprocess.Popen) -> None:
    """Kill `proc` if it is still running, and wait for it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@contextmanager
def reaped(proc: subprocess.Popen):
    """`proc` for the block; reaped when the block ends however it ends (an assertion failed, a
    timeout), so that no child outlives its test."""
    try:
        yield proc
    finally:
        reap(proc)
