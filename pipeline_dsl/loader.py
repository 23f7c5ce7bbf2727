"""Files: reading (UTF-8), parsing, and `use "other.agp"` includes.

`load_program(path) -> (Program, diagnostics)` reads a file and, depth first, every
file it `use`s (paths relative to the including file). A missing include and an
include cycle are errors at the `use` line; a file that is not UTF-8 is an error
at its first bad byte. The program's pipelines are those of every loaded file;
two pipelines with one name are an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import ast
from .diagnostics import ERROR, Diagnostic, SourcePos
from .parser import parse


@dataclass
class Program:
    root: str                                          # the file as named by the user
    modules: dict[str, ast.Module] = field(default_factory=dict)   # display path -> module
    sources: dict[str, str] = field(default_factory=dict)          # display path -> text
    pipelines: list[ast.Pipeline] = field(default_factory=list)    # in load order

    def pipeline(self, name: str | None = None) -> ast.Pipeline | None:
        """The named pipeline; without a name, the root file's first (else the first loaded)."""
        if name is not None:
            return next((p for p in self.pipelines if p.name.text == name), None)
        own = [p for p in self.pipelines if p.pos.file == self.root]
        return (own or self.pipelines or [None])[0]

    def pipeline_names(self) -> list[str]:
        return [p.name.text for p in self.pipelines]


def read_source(path: str, file: str | None = None, at: SourcePos | None = None,
                what: str = "file") -> tuple[str | None, list[Diagnostic]]:
    """The text of `path`, or None and a diagnostic (missing, unreadable, not UTF-8)."""
    file = file or path
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, [Diagnostic(ERROR, f"{what} not found: '{path}'", at,
                                 expected="the path of an existing .agp file" +
                                          (", relative to the including file" if at else ""))]
    except IsADirectoryError:
        return None, [Diagnostic(ERROR, f"'{path}' is a directory, not a file", at)]
    except OSError as exc:
        return None, [Diagnostic(ERROR, f"cannot read '{path}': {exc.strerror or exc}", at)]
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
    return text.lstrip("\ufeff"), []


def _display(path: str) -> str:
    return os.path.normpath(path)


def load_program(path: str, text: str | None = None) -> tuple[Program, list[Diagnostic]]:
    """Load `path` (or `text` standing for it) and its includes; parse errors included."""
    prog = Program(root=_display(path))
    diags: list[Diagnostic] = []
    loaded: set[str] = set()
    owners: dict[str, ast.Pipeline] = {}

    def visit(p: str, stack: list[tuple[str, str]], at: SourcePos | None, source: str | None):
        disp = _display(p)
        key = os.path.realpath(p)
        if key in loaded:
            return
        loaded.add(key)
        if source is None:
            source, ds = read_source(p, disp, at, "include" if at else "file")
            if ds:
                diags.extend(ds)
                if source is None and ds[0].pos is not None and ds[0].pos.file == disp:
                    try:                       # keep a readable copy for the caret of a UTF-8 error
                        with open(p, "rb") as fh:
                            prog.sources[disp] = fh.read().decode("utf-8", "replace")
                    except OSError:
                        pass
                return
        source = source.replace("\r\n", "\n")
        prog.sources[disp] = source
        module, ds = parse(source, disp)
        diags.extend(ds)
        if module is None:
            return
        prog.modules[disp] = module
        for item in module.items:
            if isinstance(item, ast.Use):
                target = os.path.join(os.path.dirname(p), item.path.value)
                tkey = os.path.realpath(target)
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
    return prog, diags
