"""Files: reading (UTF-8), parsing, and `use "other.agp"` includes.

`load_program(path) -> (Program, diagnostics)` reads a file and, depth first, every
file it `use`s (paths relative to the including file). A missing include and an
include cycle are errors at the `use` line; a file that is not UTF-8 is an error
at its first bad byte. The program's pipelines are those of every loaded file;
two pipelines with one name are an error.

Trust (docs/language.md, "What agp check reads"): an included file must be an `.agp` file
inside the root file's folder (or a folder the user allows: `allow_paths`, `--allow-path
DIR`), symlinks resolved; anything else is refused before it is opened, so no diagnostic
ever shows a line of a file that is not an .agp source of the program.

Limits (each an error at the `use`, or at 1:1 of the root file): only regular files are
read (a directory, a device such as /dev/zero or a FIFO is refused after a stat, never
opened); a file has at most MAX_FILE_BYTES, a program MAX_FILES files and
MAX_PROGRAM_BYTES in all; a chain of uses is at most MAX_INCLUDE_DEPTH files long.

`read_stdin()` gives the text of FILE `-` (standard input), named `<stdin>` in diagnostics.
"""

from __future__ import annotations

import codecs
import os
import stat
import sys
import unicodedata
from dataclasses import dataclass, field, replace

from . import ast
from .diagnostics import ERROR, Diagnostic, SourcePos, Suggestions, one_of
from .parser import newlines, parse


@dataclass
class Program:
    root: str                                          # the file as named by the user
    modules: dict[str, ast.Module] = field(default_factory=dict)   # display path -> module
    sources: dict[str, str] = field(default_factory=dict)          # display path -> text
    pipelines: list[ast.Pipeline] = field(default_factory=list)    # in load order
    allowed: tuple[str, ...] = ()     # folders (real paths) whose files `use` and json_schema may name

    def pipeline(self, name: str | None = None) -> ast.Pipeline | None:
        """The named pipeline; without a name, the root file's first, else (a file of `use`s
        alone) what its first include that has one would give by the same rule: a file that
        only says `use "common.agp"` runs what `common.agp` runs."""
        if name is not None:
            return next((p for p in self.pipelines if p.name.text == name), None)
        return self._first_of(self.root, set()) or (self.pipelines or [None])[0]

    def _first_of(self, file: str, seen: set[str]) -> ast.Pipeline | None:
        seen.add(file)
        own = next((p for p in self.pipelines if p.pos.file == file), None)
        module = self.modules.get(file)
        if own is not None or module is None:
            return own
        for item in module.items:
            target = _display(os.path.join(os.path.dirname(file), item.path.value)) \
                if isinstance(item, ast.Use) else None
            found = self._first_of(target, seen) if target is not None and target not in seen else None
            if found is not None:
                return found
        return None

    def pipeline_names(self) -> list[str]:
        return [p.name.text for p in self.pipelines]


# limits, so that no input can hang `agp check` or exhaust its memory
MAX_FILE_BYTES = 1 << 20          # one .agp file: 1 MiB (about 25,000 stages)
MAX_PROGRAM_BYTES = 8 << 20       # all the files of one program together
MAX_INCLUDE_DEPTH = 64            # a use inside a use inside a use …
MAX_FILES = 1000                  # the files of one program

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISSOCK, "a socket"))


_SPLIT = 'split it into several files joined with use "…"'


def _shown(path: str, width: int = 200) -> str:
    """A path as a message shows it: control characters escaped (a NUL as \\x00), cut to `width`."""
    out = "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in path[:width + 1])
    return out[:width] + "…" if len(out) > width else out


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{round(n / (1 << 20), 2):g} MiB"
    return f"{round(n / 1024, 2):g} KiB" if n >= 1024 else f"{n} bytes"


NEARBY_MAX = 1000     # files of a folder looked at for a did-you-mean on a missing file


def nearby(real: str, shown: str | None = None) -> str | None:
    """"did you mean 'sub/lib.agp'?" when a file of the missing `real` path's folder, with its
    extension, has a close name (the first NEARBY_MAX entries looked at), spelt as `shown`."""
    folder, name = os.path.split(real)
    stem, ext = os.path.splitext(name)
    try:
        with os.scandir(folder or ".") as entries:
            stems = [e.name[:len(e.name) - len(ext)] for e, _ in zip(entries, range(NEARBY_MAX))
                     if e.name.endswith(ext) and e.is_file()]
    except OSError:
        return None
    close = Suggestions(stems).closest(stem)     # the names without the extension they all share
    return f"did you mean '{os.path.join(os.path.dirname(shown or real), close + ext)}'?" if close else None


def _starts_with(path: str, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def read_bytes(path: str, file: str | None = None, at: SourcePos | None = None, what: str = "file",
               limit: int | None = None) -> tuple[bytes | None, list[Diagnostic]]:
    """The bytes of `path`, or None and a diagnostic: missing, unreadable, not a regular file
    (a directory, a device such as /dev/zero, a FIFO: looked at with stat, never opened),
    or over `limit` bytes (at most limit + 1 are read). The diagnostic stands at `at` (the
    `use` that names the file), else at line 1, column 1 of the file itself."""
    path = os.fspath(path)
    file = file or path
    where = at or SourcePos.point(file, 1, 1)
    limit = MAX_FILE_BYTES if limit is None else limit
    real, path = path, _shown(path)          # messages name the path printable and short
    too_large = f"an .agp file of at most {_size(limit)}"
    bad = lambda msg, expected=None, hint=None: (None, [Diagnostic(ERROR, msg, where, expected=expected,  # noqa: E731
                                                                   hint=hint)])
    fd = None
    try:
        st = os.stat(real)
        for test, kind in _NOT_REGULAR:
            if test(st.st_mode):
                if kind == "a directory":
                    return bad(f"'{path}' is a directory, not a file", "the path of an .agp file")
                return bad(f"'{path}' is {kind}, not a regular file", "the path of an .agp file",
                           "only regular files can be checked or included")
        if st.st_size > limit:
            if _starts_with(real, GGUF_MAGIC):
                return None, [_a_model(where)]
            return bad(f"{what} '{path}' is too large ({_size(st.st_size)})", too_large, _SPLIT)
        # O_NONBLOCK: should the path turn into a FIFO after the stat, opening it cannot hang
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return bad(f"'{path}' is not a regular file", "the path of an .agp file")
        chunks, n = [], 0
        while n <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > limit:                     # the file grew after the stat (or stat lied: /proc)
            return bad(f"{what} '{path}' is too large (more than {_size(limit)})", too_large, _SPLIT)
        return b"".join(chunks), []
    except FileNotFoundError:
        relative = ("" if not at else ", relative to the current folder (the including pipeline came on "
                    "standard input)" if at.file == STDIN_NAME else ", relative to the including file")
        return bad(f"{what} not found: '{path}'", "the path of an existing .agp file" + relative,
                   nearby(real, path))
    except ValueError:                    # a NUL in the path
        return bad(f"cannot read '{path}': the path holds a NUL character", "the path of an .agp file")
    except OSError as exc:
        return bad(f"cannot read '{path}': {exc.strerror or exc}")
    finally:
        if fd is not None:
            os.close(fd)


# the byte-order marks of the encodings an editor may save in instead of UTF-8 (UTF-32's first:
# its little-endian mark starts with UTF-16's)
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _foreign_encoding(data: bytes) -> str | None:
    """"UTF-16" or "UTF-32" when `data` is text in one of them (a byte-order mark, or the zero
    bytes between ASCII characters that UTF-16 without a mark has), else None."""
    for bom, name in _FOREIGN_BOMS:
        if data.startswith(bom):
            return name
    head = data[:64]
    if len(head) >= 2 and (head[0::2].count(0) == len(head[0::2]) or head[1::2].count(0) == len(head[1::2])):
        return "UTF-16"
    return None


def shown_text(data: bytes) -> str:
    """The text of a file that is not UTF-8, to show under its error: decoded as what it is."""
    encoding = _foreign_encoding(data)
    return data.decode(encoding.lower() if encoding else "utf-8", "replace")


GGUF_MAGIC = b"GGUF"


def is_gguf_file(path) -> bool:
    """Whether the file at `path` begins as a GGUF model does, whatever its name."""
    return _starts_with(path, GGUF_MAGIC)


def _a_model(where: SourcePos) -> Diagnostic:
    """A model's GGUF file given where a pipeline goes (`agp run model.gguf`, as `agp serve` takes it)."""
    return Diagnostic(ERROR, "file is a model (a GGUF file), not a pipeline", where, expected="a pipeline (.agp) file",
                      hint="`agp serve MODEL` serves a model as it is; a pipeline names it in its generate stage: "
                           "stage gen : generate { model = \"path/to/model.gguf\" }")


def decode(data: bytes, file: str) -> tuple[str | None, list[Diagnostic]]:
    """UTF-8 text (a byte-order mark dropped), or None and an error at the first bad byte (at
    1:1 for a file in UTF-16 or UTF-32, which says so; at 1:1 a model's GGUF file, which is
    no pipeline at all)."""
    if data[:4] == GGUF_MAGIC:
        return None, [_a_model(SourcePos.point(file, 1, 1))]
    encoding = _foreign_encoding(data)
    if encoding is not None:
        return None, [Diagnostic(ERROR, f"file is {encoding}, not UTF-8", SourcePos.point(file, 1, 1),
                                 expected="a text file encoded as UTF-8",
                                 hint=f"re-save the file as UTF-8 (e.g. iconv -f {encoding.lower()} -t utf-8)")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[:exc.start]
        line = prefix.count(b"\n") + 1
        col = len(prefix[prefix.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        pos = SourcePos.point(file, line, col)
        return None, [Diagnostic(ERROR, f"file is not valid UTF-8: byte 0x{data[exc.start]:02x} cannot be decoded",
                                 pos, expected="a text file encoded as UTF-8",
                                 hint="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")]
    return text.removeprefix("\ufeff"), []           # one BOM, as utf-8-sig reads it


def read_source(path: str, file: str | None = None, at: SourcePos | None = None,
                what: str = "file") -> tuple[str | None, list[Diagnostic]]:
    """The text of `path`, or None and a diagnostic (see read_bytes; not UTF-8)."""
    data, diags = read_bytes(path, file, at, what)
    if data is None:
        return None, diags
    return decode(data, file or path)


STDIN = "-"                 # the FILE that names standard input (check, fmt, plan, render)
STDIN_NAME = "<stdin>"      # how diagnostics name it: <stdin>:3:5
_stdin: dict = {}           # stream -> its text, read once: `agp check - -` reads it again from here


def read_stdin(stream=None) -> tuple[str | None, list[Diagnostic]]:
    """The .agp text on standard input (at most MAX_FILE_BYTES, UTF-8), or None and a diagnostic
    at <stdin>:1:1. Includes in it resolve against the current folder."""
    stream = stream if stream is not None else getattr(sys.stdin, "buffer", sys.stdin)
    where = SourcePos.point(STDIN_NAME, 1, 1)
    if stream is None:
        return None, [Diagnostic(ERROR, "standard input is closed", where, expected="the .agp text on stdin")]
    if stream not in _stdin:
        _stdin.clear()                    # one stdin per process; a test may swap it
        try:
            data = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            return None, [Diagnostic(ERROR, f"cannot read standard input: {exc.strerror or exc}", where)]
        if isinstance(data, str):         # a text stream without .buffer (a test's StringIO)
            data = data.encode("utf-8")
        if len(data) > MAX_FILE_BYTES:
            return None, [Diagnostic(ERROR, f"standard input is too large (more than {_size(MAX_FILE_BYTES)})",
                                     where, expected=f"an .agp file of at most {_size(MAX_FILE_BYTES)}",
                                     hint=_SPLIT)]
        _stdin[stream] = decode(data, STDIN_NAME)
    return _stdin[stream]


def _display(path: str) -> str:
    return os.path.normpath(path)


def program_root(path) -> str:
    """The name the file at `path` goes by as a program's root: Program.root, its key in
    Program.sources and in a graph's "sources"."""
    return _display(os.fspath(path))


def allowed_folders(root: str, allow_paths=()) -> tuple[str, ...]:
    """The folders a program's files may be read from: the root file's folder (the current
    directory for text without a file) and each of `allow_paths`, as real paths."""
    folder = os.path.dirname(os.path.abspath(root)) if root and not root.startswith("<") else os.getcwd()
    return tuple(dict.fromkeys(_key(f) for f in (folder, *(os.fspath(a) for a in allow_paths))))


def inside(path: str, folders) -> bool:
    """Whether `path` (symlinks resolved) lies in one of `folders` (real paths)."""
    real = _key(path)
    return any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def load_program(path: str, text: str | None = None, allow_paths=()) -> tuple[Program, list[Diagnostic]]:
    """Load `path` (or `text` standing for it) and its includes; parse errors included.
    `allow_paths`: folders besides the root file's from which files may be included."""
    path = os.fspath(path)
    prog = Program(root=_display(path), allowed=allowed_folders(path, allow_paths))
    diags: list[Diagnostic] = []
    loaded: set[str] = set()
    owners: dict[str, ast.Pipeline] = {}
    budget = {"bytes": MAX_PROGRAM_BYTES, "files": MAX_FILES, "told": False}

    def refuse(msg: str, at: SourcePos, expected: str, hint: str) -> None:
        if not budget["told"]:            # once: the uses after it would only repeat it
            budget["told"] = True
            diags.append(Diagnostic(ERROR, msg, at, expected=expected, hint=hint))

    def visit(p: str, stack: list[tuple[str, str]], at: SourcePos | None, source: str | None):
        disp = _display(p)
        key = _key(p)
        if key in loaded:
            return
        if budget["files"] <= 0:
            refuse(f"too many files: '{_shown(disp)}' would be file {MAX_FILES + 1} of this program", at,
                   f"a program of at most {MAX_FILES} .agp files", "merge small files")
            return
        loaded.add(key)
        budget["files"] -= 1
        if source is None:
            data, ds = read_bytes(p, disp, at, "include" if at else "file")
            diags.extend(ds)
            if data is None:
                return
        else:                             # text given for the root file (loads)
            data = source.encode("utf-8", "surrogatepass")
            if len(data) > MAX_FILE_BYTES:
                diags.append(Diagnostic(ERROR, f"the text is too large ({_size(len(data))})",
                                        SourcePos.point(disp, 1, 1),
                                        expected=f"an .agp file of at most {_size(MAX_FILE_BYTES)}", hint=_SPLIT))
                return
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            refuse(f"the program is too large: with '{_shown(disp)}' its files pass {_size(MAX_PROGRAM_BYTES)}",
                   at or SourcePos.point(disp, 1, 1),
                   f"the files of one program together at most {_size(MAX_PROGRAM_BYTES)}",
                   "include fewer or smaller files")
            return
        if source is None:
            source, ds = decode(data, disp)
            if ds:
                diags.extend(_included(ds, at))
                prog.sources[disp] = shown_text(data)   # for the caret of the error
                return
        source = newlines(source)
        prog.sources[disp] = source
        module, ds = parse(source, disp)
        diags.extend(_included(ds, at))
        if module is None:
            return
        prog.modules[disp] = module
        for item in module.items:
            if isinstance(item, ast.Use):
                target = os.path.join(os.path.dirname(p), item.path.value)
                tkey = _key(target)
                chain = [k for k, _ in stack] + [key]
                if tkey in chain:
                    names = [d for _, d in stack] + [disp]
                    cycle = names[chain.index(tkey):] + [_display(target)]
                    diags.append(Diagnostic(ERROR, "include cycle: " + " -> ".join(cycle), item.pos,
                                            expected="files that do not include themselves, directly or not",
                                            hint=f"remove this 'use \"{item.path.value}\"'"))
                    continue
                if not item.path.value:
                    diags.append(Diagnostic(ERROR, "empty include path", item.path.pos,
                                            expected='use "other.agp"'))
                    continue
                refused = _refused_include(item.path.value, target, prog.allowed)
                if refused:
                    diags.append(Diagnostic(ERROR, refused[0], item.path.pos, expected=refused[1], hint=refused[2]))
                    continue
                if len(stack) + 2 > MAX_INCLUDE_DEPTH:     # this file is number len(stack) + 1
                    diags.append(Diagnostic(ERROR, f"includes nested too deeply: '{_shown(_display(target))}' would be "
                                            f"file {len(stack) + 2} of a chain of uses from '{prog.root}'",
                                            item.path.pos,
                                            expected=f"chains of uses at most {MAX_INCLUDE_DEPTH} files long",
                                            hint="include the file from a file nearer the root"))
                    continue
                visit(target, stack + [(key, disp)], item.path.pos, None)
            else:
                first = owners.get(item.name.text)
                if first is not None:
                    diags.append(Diagnostic(ERROR, f"duplicate pipeline '{item.name.text}'", item.name.pos,
                                            notes=(("first defined here", first.name.pos),),
                                            hint="give each pipeline its own name"))
                    continue
                owners[item.name.text] = item
                prog.pipelines.append(item)

    visit(path, [], None, text)
    # a file that could not be read whole (a use refused or not found, a syntax error) may hold
    # the base a derivation names: its error is the one to fix, and 'unknown base' would be a second
    prog.pipelines = derive(prog.pipelines, diags, unread=any(d.is_error for d in diags))
    return prog, diags


# settings, stages and edges that derived pipelines copy from their bases, all together: each copy
# is checked as the base is, so without a bound a few bytes (`pipeline p2 : big {}`, many times)
# would make agp check work through millions of stages; with it a program's copies cost at most
# what one full-size file (about 25,000 stages) costs
MAX_DERIVED_STATEMENTS = 20_000


def derive(pipelines: list[ast.Pipeline], diags: list[Diagnostic], unread: bool = False) -> list[ast.Pipeline]:
    """The program's pipelines with each derived one (`pipeline short : chat { … }`) expanded:
    its base's stages and edges (the base expanded first when it is derived itself), the base's
    settings with the derived body's settings in place of those of the same name, and each
    override `stage.param = value` in place of that stage's parameter (or added to it). The
    copied statements keep the base's positions; the derived body's own keep theirs. Errors go
    to `diags`, at the statement: an unknown base, a cycle of derivations, an override of a
    stage the base lacks, a stage or edge in a derived body, an override in a pipeline without
    a base, copies past MAX_DERIVED_STATEMENTS. A derived pipeline whose base cannot be had is
    left out (its error said why), as is one derived from it. `unread`: part of the program could
    not be read (its error is said), so an unknown base is left out without an error of its own."""
    by_name = {p.name.text: p for p in pipelines}
    names = Suggestions(by_name)
    done: dict[str, ast.Pipeline | None] = {}     # name -> expanded pipeline; None: cannot be had
    copied, told = 0, False                       # statements copied from bases so far
    for p in pipelines:
        if p.base is None:
            done[p.name.text] = p
            for o in p.overrides:
                diags.append(Diagnostic(
                    ERROR, f"'{o.stage.text}.{o.name.text}' overrides a stage of a base pipeline, "
                           f"but '{p.name.text}' has no base", o.pos,
                    expected=f"a setting, stage or edge of pipeline '{p.name.text}'",
                    hint=f"set {o.name.text} inside stage {o.stage.text}'s {{ … }}; a derived pipeline "
                         f"(pipeline NAME : BASE {{ … }}) overrides its base's stages this way"))
    for p in pipelines:
        chain: list[ast.Pipeline] = []            # p, its base, its base's base … until one is done
        on_chain: set[int] = set()
        q = p
        while q.name.text not in done:
            if id(q) in on_chain:                 # a cycle: reported at each of its pipelines
                cycle = chain[next(i for i, c in enumerate(chain) if c is q):]
                for i, c in enumerate(cycle):
                    turn = cycle[i:] + cycle[:i]
                    shown = " : ".join(t.name.text for t in turn + [c])
                    msg = (f"pipeline '{q.name.text}' derives from itself" if len(cycle) == 1
                           else f"pipelines derive from each other: {shown}")
                    diags.append(Diagnostic(ERROR, msg, c.base.pos,
                                            expected="a base that does not derive from this pipeline, "
                                                     "directly or not",
                                            hint=f"derive '{c.name.text}' from a pipeline with stages of its own"))
                    done[c.name.text] = None
                break
            chain.append(q)
            on_chain.add(id(q))
            base = by_name.get(q.base.text)
            if base is None and unread:
                done[q.name.text] = None
                break
            if base is None:
                diags.append(Diagnostic(ERROR, f"unknown base pipeline '{q.base.text}'", q.base.pos,
                                        expected="a pipeline of this program (this file or a file it uses)",
                                        hint=names.hint(q.base.text)))
                done[q.name.text] = None
                break
            q = base
        for c in reversed(chain):
            if c.name.text not in done:
                base = done[c.base.text]
                if base is not None and (told or copied + len(base.body) > MAX_DERIVED_STATEMENTS):
                    if not told:                  # said once: the derivations after it are left out too
                        diags.append(Diagnostic(
                            ERROR, f"derived pipelines copy too much: with '{c.name.text}' they copy more than "
                                   f"{MAX_DERIVED_STATEMENTS:,} statements", c.base.pos,
                            expected=f"derived pipelines that copy at most {MAX_DERIVED_STATEMENTS:,} settings, "
                                     f"stages and edges in all",
                            hint="derive fewer pipelines from large ones"))
                    told, base = True, None
                if base is not None:
                    copied += len(base.body)
                done[c.name.text] = None if base is None else _expand(c, base, diags)
    return [done[p.name.text] for p in pipelines if done[p.name.text] is not None]


def _expand(p: ast.Pipeline, base: ast.Pipeline, diags: list[Diagnostic]) -> ast.Pipeline:
    """Derived `p` over its expanded `base` (see derive)."""
    for item in p.body:
        if isinstance(item, (ast.Stage, ast.Chain)):
            what = f"stage '{item.name.text}'" if isinstance(item, ast.Stage) else "an edge"
            diags.append(Diagnostic(
                ERROR, f"{what} in derived pipeline '{p.name.text}'", item.pos,
                expected=f"settings (mode = efficient) and overrides of the stages of '{base.name.text}' "
                         f"(gen.max_new_tokens = 16)",
                hint=f"a derived pipeline keeps the stages and edges of '{base.name.text}'; to change "
                     f"the graph, write a pipeline of its own"))
    own = {s.name.text for s in p.settings}
    settings = [s for s in base.settings if s.name.text not in own] + p.settings
    stages = {st.name.text: st for st in base.stages}
    stage_names = Suggestions(stages)
    changed: dict[str, list[ast.Param]] = {}
    for o in p.overrides:
        st = stages.get(o.stage.text)
        if st is None:
            diags.append(Diagnostic(ERROR, f"unknown stage '{o.stage.text}' in base pipeline '{base.name.text}'",
                                    o.stage.pos, expected=f"a stage of '{base.name.text}': " + one_of(stages),
                                    hint=stage_names.hint(o.stage.text)))
            continue
        changed.setdefault(st.name.text, []).append(ast.Param(o.name, o.value, o.pos))
    body: list = list(settings)
    for st in base.stages:
        new = changed.get(st.name.text)
        if new:
            replaced = {prm.name.text for prm in new}
            st = replace(st, params=tuple(prm for prm in st.params if prm.name.text not in replaced) + tuple(new))
        body.append(st)
    body += base.chains
    return replace(p, body=tuple(body))


def _included(diags: list[Diagnostic], at: SourcePos | None) -> list[Diagnostic]:
    """An included file's own errors (its bytes, its syntax), each with a note of the `use` that
    read it: `agp check main.agp` names main.agp's line even where the fault is in the other file
    (a `use` of the wrong file, say)."""
    if at is None:
        return diags
    return [replace(d, notes=d.notes + (("included here", at),)) for d in diags]


def _refused_include(named: str, target: str, allowed) -> tuple[str, str, str] | None:
    """(message, expected, hint) when `use` may not read `target`: not an .agp file, or outside
    the allowed folders (symlinks resolved); None when it may. Nothing is opened."""
    shown = _shown(named)
    if "\0" in named:
        return (f"include '{shown}': the path holds a NUL character", 'use "other.agp": the path of an .agp file',
                "remove the NUL")
    if not named.endswith(".agp") or not _key(target).endswith(".agp"):
        hint = "only .agp files can be included"
        if not named.endswith(".agp") and inside(target + ".agp", allowed) and os.path.isfile(target + ".agp"):
            hint = f'write use "{shown}.agp"'          # use "chat": the file is chat.agp
        return (f"include '{shown}' is not an .agp file", 'use "other.agp": the path of an .agp file', hint)
    if not inside(target, allowed):
        return (f"include '{shown}' is outside the pipeline's folder",
                "an .agp file in the folder of the file given to agp (or below it)",
                "move the file there, or allow its folder with --allow-path DIR")
    return None


def _key(path: str) -> str:
    """The file a path names, whatever the spelling (symlinks resolved): what `loaded` holds."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):        # a NUL in the path: reported when the file is read
        return os.path.abspath(path.replace("\0", "\\0"))


def add_pipeline_arguments(p, stdin: bool = False, file_help: str | None = None) -> None:
    """The .agp file (`args.pipeline`) and which of its pipelines (`args.name`): one spelling
    for every command that loads a pipeline (and for `agp serve`'s flags, which Ray replicas
    parse too). `stdin`: FILE may be `-` (read_stdin); elsewhere `-` is refused while parsing.
    `file_help`: what FILE may be, where a command takes more than a .agp file."""
    p.add_argument("pipeline", metavar="FILE", type=None if stdin else _a_file,
                   help=file_help or ("the .agp file; - reads standard input" if stdin else "the .agp file"))
    p.add_argument("--pipeline", "--pipeline-name", "--name", dest="name", default=None,
                   help="which pipeline of the file (default: the only or first one)")
    add_allow_path(p)


def add_allow_path(p) -> None:
    """--allow-path DIR: a folder besides the pipeline file's own that its `use` includes and
    json_schema files may come from (docs/language.md, "What agp reads and runs")."""
    p.add_argument("--allow-path", dest="allow_path", action="append", default=[], metavar="DIR",
                   help="also read included .agp files and json_schema files from DIR (repeatable; "
                        "default: only the pipeline file's folder)")


def _a_file(text: str) -> str:
    """FILE of a command that runs the pipeline: '-' is not read from stdin there (agp run reads
    its requests from stdin; a server or a replica may load the file again)."""
    if text == STDIN:
        import argparse

        raise argparse.ArgumentTypeError("'-' (standard input) is read as a pipeline by check, fmt, plan and "
                                         "render only: give the .agp file's path")
    return text
