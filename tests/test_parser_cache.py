"""The parser's tables are built once and kept in the user's cache (parser.cache_file()): a later
agp process loads them, a broken file is built over, and a folder others may write is not used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_dsl.fmt import format_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat.agp"
# a child process parses and formats the example (the parser and nothing else: no torch)
CHILD = ("import sys; from pipeline_dsl.fmt import format_text; "
         "out, diags = format_text(open(sys.argv[1]).read(), sys.argv[1]); "
         "assert not diags, diags; sys.stdout.write(out)")


def child(cache_home: Path) -> str:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(EXAMPLE)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def expected():
    out, diags = format_text(EXAMPLE.read_text(), str(EXAMPLE))
    assert not diags
    return out


def cached(cache_home: Path) -> list[Path]:
    return sorted((cache_home / "agp").glob("parser-*.pickle"))


def test_a_second_process_loads_the_tables_the_first_wrote(tmp_path, expected):
    assert child(tmp_path) == expected
    [file] = cached(tmp_path)
    assert (tmp_path / "agp").stat().st_mode & 0o777 == 0o700       # made private
    before = (file.stat().st_mtime_ns, file.read_bytes())
    assert child(tmp_path) == expected
    assert (file.stat().st_mtime_ns, file.read_bytes()) == before, "the second process wrote the tables again"


def test_a_broken_cache_file_is_built_over_and_parses_the_same(tmp_path, expected):
    (tmp_path / "agp").mkdir(mode=0o700)
    assert child(tmp_path) == expected
    [file] = cached(tmp_path)
    good = file.read_bytes()
    for broken in (good[: len(good) // 2], b"not a pickle at all\n"):   # a write cut short (its stamp right); junk
        file.write_bytes(broken)
        assert child(tmp_path) == expected
        rebuilt = file.read_bytes()
        assert rebuilt != broken and len(rebuilt) > len(good) // 2
        assert child(tmp_path) == expected
        assert file.read_bytes() == rebuilt, "the tables written over the broken file did not load"


def test_a_cache_folder_others_may_write_is_not_used(tmp_path, expected):
    folder = tmp_path / "agp"
    folder.mkdir()
    folder.chmod(0o777)                                   # anyone could plant a pickle there
    assert child(tmp_path) == expected
    assert cached(tmp_path) == []
