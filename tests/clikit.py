"""The `agp` command in a child process, as a user runs it:

    r = agp("check", "examples/chat.agp")                 # run to its end: a CompletedProcess (text)
    with reaped(agp_child("run", path, "-i", inp)) as proc:   # started; killed if the block leaves it running
        ...
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGP = (sys.executable, "-m", "pipeline_dsl.cli")


def agp(*args, cwd=ROOT, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`agp ARGS` (each str()-ed) run to its end in `cwd`, its stdout and stderr captured as text;
    `kw` goes to subprocess.run (input=, env=, ...)."""
    return subprocess.run([*AGP, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          **kw)


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
