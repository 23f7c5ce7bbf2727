"""User functions named in a pipeline: `fn = "module:function"` (python stages, join).

The module is looked up beside the .agp file first, then on sys.path. `agp check` never
imports or runs anything: it finds the module's file as the import system would (the
finders' `find_spec`, a dotted name one package at a time from its parent's search path,
so no parent package is executed either), reads the source and looks for a top-level
`def`, class, assignment or import of that name with `ast` (else in the modules it
star-imports). A module without Python source
cannot be read: one of the standard library's own C modules (`math`) is imported, as no
Python code runs then; any other (a third-party compiled extension) is an error. The runtime
imports the module for real.

    find_function("hooks:redact", base_dir)   # raises FunctionNotFound, with the reason
    info = function_info("hooks:redact", base_dir)   # FunctionInfo: path, the defining ast node
    function_shape("hooks:redact", base_dir)  # "function" | "coroutine" | "generator" | ... | None
    returned_labels(info.node)                # {"math", "chat"}: the labels its returns spell; None: unknown
    always_labels(info)                       # {"a", "b"}: every path returns one of these; None: not sure
    fn = load_function("hooks:redact", base_dir)
    callable_shape(fn)                        # the same, of the loaded function
"""
from __future__ import annotations

import ast as pyast
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from .constraints import OnceCache

REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
MAX_SOURCE_BYTES = 4 << 20        # a module's source read by check; a larger one is an error
_LOCK = threading.Lock()


class FunctionNotFound(LookupError):
    """The module or the function of a `fn` reference cannot be found; the message says which."""

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = names or []          # the module's top-level names, for did-you-mean


class ArgsRefused(FunctionNotFound):
    """The function is there, but its signature refuses the stage's `args` as keywords."""


class NoSource(FunctionNotFound):
    """The module is there but has no Python source to read (a compiled extension)."""


@dataclass(frozen=True)
class FunctionInfo:
    """Where a `fn` reference's function is defined, found without running anything."""
    module: str
    name: str
    path: str | None                      # the module's source file (None: a C module of the stdlib)
    node: pyast.AST | None                # the top-level statement that defines it: FunctionDef,
                                          # AsyncFunctionDef, ClassDef, Assign, Import, If, Try, ...
                                          # (None: a C module's function)
    tree: pyast.Module | None = field(default=None, repr=False, compare=False)   # the module's

    @cached_property
    def settled(self) -> bool:
        """Whether node is a top-level def that nothing else in the module binds the name to (no
        conditional def, no reassignment): from one walk over the module, made the first time any of
        its functions is asked about."""
        return self.tree is not None and self.node is not None and _sole_binding(self.tree, self.node, self.name)


def split_ref(ref: str) -> tuple[str, str]:
    if not REF_RE.match(ref or ""):
        module, dot, attr = (ref or "").rpartition(".")            # hooks.redact, as Python spells the path
        fixed = f"{module}:{attr}" if dot and ":" not in ref else ""
        said = f'"{fixed}" (module:function)' if REF_RE.match(fixed) else '"module:function"'
        raise FunctionNotFound(f"'{ref}' is not a function reference: write {said}")
    module, _, attr = ref.partition(":")
    return module, attr


def _local_file(module: str, base_dir: str | None) -> str | None:
    """The module's source file beside the .agp file, if there is one."""
    if not base_dir:
        return None
    rel = os.path.join(base_dir, *module.split("."))
    for candidate in (rel + ".py", os.path.join(rel, "__init__.py")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _find_spec(fullname: str, path):
    """The import system's spec of `fullname` under `path` (None: top level), asking each finder
    of sys.meta_path as import does, without importing anything."""
    loaded = sys.modules.get(fullname)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(fullname, path)
        except (ImportError, ValueError, OSError):
            continue
        if spec is not None:
            return spec
    return None


def module_source(module: str, base_dir: str | None) -> str | None:
    """The source file of `module` (beside the .agp file first, then as import would find it),
    found without executing it or its parent packages; None for one of the standard library's
    own C modules (math); FunctionNotFound otherwise."""
    path = _local_file(module, base_dir)
    if path is not None:
        return path
    parts = module.split(".")
    spec, search = None, None
    loaded = sys.modules.get(module)          # already imported (os.path): its spec, nothing run
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        spec, parts = loaded.__spec__, []
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        if i and search is None:
            raise FunctionNotFound(f"module '{'.'.join(parts[:i])}' is not a package, so it has no module "
                                   f"'{parts[i]}'")
        spec = _find_spec(name, search)
        if spec is None:
            where = f"beside the pipeline ({base_dir}) or on sys.path" if base_dir else "on sys.path"
            raise FunctionNotFound(f"module '{name}' not found {where}")
        search = list(spec.submodule_search_locations) if spec.submodule_search_locations is not None else None
    origin = spec.origin if spec.has_location else None
    if origin is None:                         # a frozen stdlib module (os, posixpath) knows its file
        origin = getattr(getattr(spec, "loader_state", None), "filename", None) or \
            getattr(sys.modules.get(module), "__file__", None)
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        if _stdlib_c_module(module, spec):
            return None
        raise NoSource(f"module '{module}' has no Python source to read (agp check imports nothing); "
                               "put the function in a .py module beside the pipeline")
    return origin


def _stdlib_c_module(module: str, spec) -> bool:
    """Whether `module` is one of CPython's own C modules (builtin or in lib-dynload): importing it
    runs no Python code, only the interpreter's."""
    if "." in module or module not in getattr(sys, "stdlib_module_names", ()):
        return False
    origin = spec.origin or ""
    return origin == "built-in" or origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _definitions(tree: pyast.Module) -> dict[str, pyast.AST]:
    """Top-level name -> the statement that (last) defines it."""
    out: dict[str, pyast.AST] = {}
    for node in tree.body:
        if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (pyast.Assign, pyast.AnnAssign)):
            targets = node.targets if isinstance(node, pyast.Assign) else [node.target]
            for t in targets:
                for n in pyast.walk(t):
                    if isinstance(n, pyast.Name):
                        out[n.id] = node
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, _COMPOUND):
            # conditional definitions: a name only defs bind is their (last) def; one the block
            # binds otherwise too (`try: from fast import split`, `if ...: split = other`) is the
            # block, whose source does not say what the name ends up as, over any def before it
            defs: dict[str, pyast.AST] = {}
            others: set[str] = set()
            for n in _module_level(node):
                if isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
                    defs[n.name] = n
                elif isinstance(n, pyast.Name) and isinstance(n.ctx, pyast.Store):
                    others.add(n.id)
                elif isinstance(n, (pyast.Import, pyast.ImportFrom)):
                    others.update((a.asname or a.name).split(".")[0] for a in n.names)
            out.update(defs)
            out.update(dict.fromkeys(others, node))
    return out


_COMPOUND = (pyast.If, pyast.Try, pyast.For, pyast.AsyncFor, pyast.While, pyast.With, pyast.AsyncWith) + \
    ((pyast.TryStar,) if hasattr(pyast, "TryStar") else ())


def _module_level(node: pyast.AST):
    """The nodes of a module-level compound statement whose bindings are the module's: a def's or
    class's own node, never its body (its names are its own)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef, pyast.Lambda)):
            todo.extend(reversed(list(pyast.iter_child_nodes(n))))


# modules whose parse is kept (by path and source), the latest used 32
_PARSED = OnceCache(32, 1 << 62, size=lambda kept: 0)


def _parsed(path: str) -> tuple[pyast.Module, dict[str, pyast.AST]]:
    """(the module's tree, its top-level definitions): parsed once while its source stays as it
    is (one `agp check` asks of a module for each stage and each question: its function, its
    shape, its signature, its labels), again once the file's bytes change. The trees are shared:
    read them, never change them."""
    source = _source(path)

    def parse():
        tree = _parse(source, path)
        return tree, _definitions(tree)

    return _PARSED.get((path, source), parse)


def _source(path: str) -> bytes:
    try:
        if os.path.getsize(path) > MAX_SOURCE_BYTES:
            raise FunctionNotFound(f"{path} is larger than {MAX_SOURCE_BYTES >> 20} MiB, too large to check")
        with open(path, "rb") as f:
            return f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise FunctionNotFound(f"cannot read {path}: {e.strerror or e}") from None


def _parse(source: bytes, path: str) -> pyast.Module:
    try:
        return pyast.parse(source, path)
    except SyntaxError as e:              # where, as Python says it: the user fixes their module there
        where = f"{path}:{e.lineno}" + (f":{e.offset}" if e.offset else "") if e.lineno else path
        raise FunctionNotFound(f"{where}: the module has a syntax error: {e.msg}") from None
    except ValueError as e:               # a NUL byte
        raise FunctionNotFound(f"{path}: the module cannot be parsed: {e}") from None
    except (RecursionError, MemoryError):
        raise FunctionNotFound(f"{path} is nested too deeply to check") from None


def _star_imports(tree: pyast.Module, module: str, path: str) -> list[str]:
    """The modules a module's `from M import *` statements name (relative ones made absolute), in order."""
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in tree.body:
        for n in ([node] if not isinstance(node, (pyast.If, pyast.Try)) else pyast.walk(node)):
            if isinstance(n, pyast.ImportFrom) and any(a.name == "*" for a in n.names):
                if n.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (n.level - 1)] if n.level > 1 else base
                    out.append(".".join([*base, *([n.module] if n.module else [])]))
                elif n.module:
                    out.append(n.module)
    return [m for m in out if m]


def function_info(ref: str, base_dir: str | None, _depth: int = 0) -> FunctionInfo:
    """Where `ref`'s function is defined (FunctionNotFound with the reason otherwise), found by
    reading source: nothing is imported or run. A name the module does not bind itself is looked
    for in the modules it star-imports (`from .impl import *`); one of those without source
    (a compiled module) leaves it unknown: a FunctionInfo without a node."""
    module, attr = split_ref(ref)
    path = module_source(module, base_dir)
    if path is None:                           # a stdlib C module: no Python code runs on import
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise FunctionNotFound(f"module '{module}' cannot be imported: {e}") from None
        if not callable(getattr(mod, attr, None)):
            raise FunctionNotFound(f"module '{module}' has no function '{attr}'",
                                   [n for n in dir(mod) if not n.startswith("_")])
        return FunctionInfo(module, attr, None, None)
    tree, defined = _parsed(path)
    if attr not in defined:
        for star in _star_imports(tree, module, path) if _depth < 8 else ():
            try:
                return function_info(f"{star}:{attr}", base_dir, _depth + 1)
            except NoSource:
                return FunctionInfo(module, attr, path, None)
            except FunctionNotFound:
                continue
        raise FunctionNotFound(f"module '{module}' ({path}) has no function '{attr}'",
                               sorted(n for n in defined if n != "*"))
    return FunctionInfo(module, attr, path, defined[attr], tree)


def _sole_binding(tree: pyast.Module, node: pyast.AST, name: str) -> bool:
    """Whether `node` is a def directly in the module's body and the module binds `name` nowhere
    else: no other def or class of that name outside a function, no assignment, loop or with
    target, import, walrus or del of it at module level (or under a `global`), no star import after
    the def. Judged conservatively: a name the module may rebind is not settled. The module is
    walked once (_bindings), whichever of its functions is asked about."""
    if not isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef)):
        return False
    at = next((i for i, n in enumerate(tree.body) if n is node), None)
    if at is None:
        return False
    b = _bindings(tree)
    if b.last_star > at:
        return False
    return not any(n is not node for n in b.defs.get(name, ())) and name not in b.rebound


@dataclass(frozen=True)
class _Binds:
    """What one walk over a module finds binding names (see _sole_binding)."""
    defs: dict[str, list[pyast.AST]]      # name -> the defs and classes of it outside any function
    rebound: frozenset[str]               # bound otherwise: module-level store/del/import, global, walrus
    last_star: int                        # index in the body of the last statement holding a star import


_BINDS: "weakref.WeakKeyDictionary[pyast.Module, _Binds]" = weakref.WeakKeyDictionary()
_BINDS_LOCK = threading.Lock()


def _bindings(tree: pyast.Module) -> _Binds:
    """The module's bindings, found once per parsed tree (the trees _parsed keeps are shared and
    never changed; a changed file is a new tree)."""
    with _BINDS_LOCK:
        found = _BINDS.get(tree)
    if found is not None:
        return found
    defs: dict[str, list[pyast.AST]] = {}
    rebound: set[str] = set()
    last_star = -1
    for i, stmt in enumerate(tree.body):
        if any(isinstance(n, pyast.ImportFrom) and any(a.name == "*" for a in n.names)
               for n in pyast.walk(stmt)):
            last_star = i
    todo: list[tuple[pyast.AST, bool]] = [(n, True) for n in tree.body]
    while todo:
        n, module_level = todo.pop()
        if module_level and isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            defs.setdefault(n.name, []).append(n)
        if isinstance(n, pyast.Global):
            rebound.update(n.names)
        if module_level and isinstance(n, pyast.Name) and not isinstance(n.ctx, pyast.Load):
            rebound.add(n.id)
        if module_level and isinstance(n, (pyast.Import, pyast.ImportFrom)):
            rebound.update((a.asname or a.name).split(".")[0] for a in n.names)
        if isinstance(n, pyast.NamedExpr):
            rebound.add(n.target.id)
        inside = isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda, pyast.ClassDef))
        todo.extend((c, module_level and not inside) for c in pyast.iter_child_nodes(n))
    found = _Binds(defs, frozenset(rebound), last_star)
    with _BINDS_LOCK:
        return _BINDS.setdefault(tree, found)


def find_function(ref: str, base_dir: str | None) -> None:
    """Raise FunctionNotFound unless `ref` names a function that can be loaded (nothing imported)."""
    function_info(ref, base_dir)


def load_function(ref: str, base_dir: str | None) -> Callable:
    """Import the module (beside the .agp file first) and return the callable."""
    module, attr = split_ref(ref)
    with _LOCK:
        path = _local_file(module, base_dir)
        if path is not None:
            name = module
            loaded = sys.modules.get(name)
            if loaded is None or os.path.abspath(getattr(loaded, "__file__", "") or "") != os.path.abspath(path):
                if loaded is not None:        # a module of that name from elsewhere: keep both
                    name = f"agp_user_{abs(hash(os.path.abspath(path))):x}.{module}"
                spec = importlib.util.spec_from_file_location(
                    name, path, submodule_search_locations=[os.path.dirname(path)]
                    if path.endswith("__init__.py") else None)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                added = base_dir not in sys.path
                if added:
                    sys.path.insert(0, base_dir)   # so that the module's own imports of its neighbours work
                try:
                    spec.loader.exec_module(mod)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
                finally:
                    if added:
                        sys.path.remove(base_dir)
                if base_dir not in sys.path:
                    # an import its functions make when called (`import helper` inside a def) finds
                    # the neighbours too, wherever agp runs from; last, so that no file beside the
                    # pipeline shadows a module agp or a library imports later
                    sys.path.append(base_dir)
                loaded = mod
        else:
            loaded = importlib.import_module(module)
    if not hasattr(loaded, attr):
        raise FunctionNotFound(f"module '{module}' has no function '{attr}'")
    fn = getattr(loaded, attr)
    if not callable(fn):
        raise FunctionNotFound(f"'{attr}' in module '{module}' is not callable (of type {type(fn).__name__})")
    return fn


def positional_arity(node: pyast.AST | None) -> tuple[int, int | None] | None:
    """(the positional arguments a top-level `def` or a lambda needs, the most it takes: None for
    *args), or None when the source does not say (not a def, or a decorated one). A keyword-only
    argument without a default fails every positional call: (positional + 1, 0)."""
    if not isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda)) or \
            getattr(node, "decorator_list", None):
        return None
    a = node.args
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    if any(d is None for d in a.kw_defaults):          # a keyword-only argument without a default
        return (positional + 1, 0)
    return required, (None if a.vararg is not None else positional)


def takes(node: pyast.AST | None, n: int) -> bool | None:
    """Whether a call with `n` positional arguments fits the def's signature (None: unknown)."""
    arity = positional_arity(node)
    if arity is None:
        return None
    least, most = arity
    return least <= n and (most is None or n <= most)


@dataclass(frozen=True)
class KeywordCall:
    """How a def's parameters take a call of `n` positional arguments and some keywords
    (keyword_call): what fails, each by name; empty tuples where nothing does."""
    unknown: tuple[str, ...] = ()         # keywords no parameter takes, with no **kwargs
    twice: tuple[str, ...] = ()           # keywords naming a parameter the positional arguments fill
    positional_only: tuple[str, ...] = ()  # keywords naming a positional-only parameter (no **kwargs)
    missing: tuple[str, ...] = ()         # parameters without a default that nothing fills
    too_many: bool = False                # more positional arguments than it takes (no *args)
    names: tuple[str, ...] = ()           # the parameters a keyword may name
    any_keyword: bool = False             # it takes **kwargs
    passed: tuple[str, ...] = ()          # the parameters the positional arguments fill
    annotations: dict = field(default_factory=dict, compare=False)   # keyword -> its parameter's annotation node


def keyword_call(node: pyast.AST | None, n: int, keywords) -> KeywordCall | None:
    """How `fn(a1, …, an, **keywords)` binds to a top-level `def` or a lambda, as Python binds it;
    None when the source does not say (not a def, or a decorated one, whose wrapper may take
    anything)."""
    if not isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda)) or \
            getattr(node, "decorator_list", None):
        return None
    a = node.args
    positional = [*a.posonlyargs, *a.args]
    required = len(positional) - len(a.defaults)
    filled = {p.arg for p in positional[:n]}
    posonly = {p.arg for p in a.posonlyargs}
    by_name = {p.arg: p for p in [*a.args, *a.kwonlyargs] if p.arg not in posonly}
    unknown, twice, only = [], [], []
    for k in keywords:
        if k in filled and k not in posonly:
            twice.append(k)
        elif k in by_name:
            continue
        elif k in posonly and not (k in filled and a.kwarg is not None):
            only.append(k)          # unbound positional-only: the call refuses it even with **kwargs
        elif a.kwarg is not None:
            continue
        else:
            unknown.append(k)
    given = set(keywords)
    missing = [p.arg for i, p in enumerate(positional) if i >= n and i < required
               and p.arg not in given]            # a positional-only one given by name: said as such
    missing += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None and p.arg not in given]
    return KeywordCall(tuple(unknown), tuple(twice), tuple(only), tuple(missing),
                       n > len(positional) and a.vararg is None,
                       tuple(p.arg for i, p in enumerate(positional) if i >= n and p.arg not in posonly)
                       + tuple(p.arg for p in a.kwonlyargs), a.kwarg is not None, tuple(p.arg for p in positional[:n]),
                       {k: by_name[k].annotation for k in keywords if k in by_name and k not in filled
                        and by_name[k].annotation is not None})


# an annotation's name -> the JSON value types (of a map's values) it takes: a bool is an int and an
# int a float, as Python and its type checkers take them
_ANNOTATED = {"int": {"bool", "int"}, "float": {"bool", "int", "float"}, "complex": {"bool", "int", "float"},
              "bool": {"bool"}, "str": {"str"}, "list": {"list"}, "List": {"list"}, "dict": set(), "Dict": set(),
              "None": set(), "NoneType": set(), "bytes": set(), "set": set(), "Set": set(), "frozenset": set()}


def annotation_takes(note: pyast.AST | None, _depth: int = 0) -> set[str] | None:
    """The JSON value types ("str", "int", "float", "bool", "list") an annotation clearly takes,
    or None when it does not say clearly (Any, a class of the user's, a Literal, a type alias, …):
    `int`, `list[str]`, `Optional[int]`, `int | None`, `Union[int, str]`, `"int"`."""
    if note is None or _depth > 16:
        return None
    if isinstance(note, pyast.Constant) and isinstance(note.value, str):     # "int": a forward reference
        try:
            return annotation_takes(pyast.parse(note.value, mode="eval").body, _depth + 1)
        except (SyntaxError, ValueError, RecursionError):
            return None
    if isinstance(note, pyast.Constant) and note.value is None:
        return set()
    name = note.id if isinstance(note, pyast.Name) else note.attr if isinstance(note, pyast.Attribute) else None
    if name is not None:
        return set(_ANNOTATED[name]) if name in _ANNOTATED else None
    if isinstance(note, pyast.BinOp) and isinstance(note.op, pyast.BitOr):
        left, right = annotation_takes(note.left, _depth + 1), annotation_takes(note.right, _depth + 1)
        return None if left is None or right is None else left | right
    if isinstance(note, pyast.Subscript):
        head = note.value.id if isinstance(note.value, pyast.Name) else \
            note.value.attr if isinstance(note.value, pyast.Attribute) else None
        if head in ("list", "List", "dict", "Dict", "set", "Set", "frozenset"):
            return set(_ANNOTATED[head])
        inner = note.slice.elts if isinstance(note.slice, pyast.Tuple) else [note.slice]
        if head == "Optional":
            inner = [*inner, pyast.Constant(None)]
        if head in ("Optional", "Union"):
            parts = [annotation_takes(x, _depth + 1) for x in inner]
            return None if any(p is None for p in parts) else set().union(*parts)
    return None


# ---------------------------------------------------------------- function shapes
# A python stage runs a plain function on a worker thread, an `async def` on the event loop,
# and a generator (sync or async) only as a stream filter; check tells them apart statically.

SHAPES = ("function", "coroutine", "generator", "async_generator")


def _yields(fn: pyast.AST) -> bool:
    """Whether a def's own body yields (nested functions, lambdas and classes are theirs)."""
    todo = list(pyast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        if isinstance(node, (pyast.Yield, pyast.YieldFrom)):
            return True
        if not isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda, pyast.ClassDef)):
            todo.extend(pyast.iter_child_nodes(node))
    return False


def shape_of_def(node: pyast.AST) -> str | None:
    """The shape of a `def` / `async def` node; None for anything else."""
    if isinstance(node, pyast.AsyncFunctionDef):
        return "async_generator" if _yields(node) else "coroutine"
    if isinstance(node, pyast.FunctionDef):
        return "generator" if _yields(node) else "function"
    return None


def _every_return(node: pyast.AST, ok) -> bool:
    """Whether ok(value) holds for the value of every `return` of the def `node` itself (those of
    the functions, lambdas and classes inside it are theirs)."""
    todo = list(pyast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        if isinstance(n, pyast.Return) and not ok(n.value):
            return False
        if not isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda, pyast.ClassDef)):
            todo.extend(pyast.iter_child_nodes(n))
    return True


def returned_labels(node: pyast.AST | None) -> set[str] | None:
    """The label strings a `def` can return, when its source settles every return: each `return`
    (a stream generator's too) gives a string literal, None, the item it got (its first parameter,
    or a dict made from one) or a choice of these (`"a" if x else "b"`). None when one return is
    anything else (a variable, a call), so nothing can be said."""
    if not isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef)):
        return None
    args = node.args.posonlyargs + node.args.args
    item = args[0].arg if args else None
    labels: set[str] = set()

    def settle(value) -> bool:
        if value is None or isinstance(value, pyast.Dict):
            return True
        if isinstance(value, pyast.Constant):
            if isinstance(value.value, str):
                labels.add(value.value)
            return value.value is None or isinstance(value.value, str)
        if isinstance(value, pyast.Name):
            return value.id == item
        if isinstance(value, pyast.Call) and isinstance(value.func, pyast.Name) and value.func.id == "dict":
            return True                       # dict(item): a copy of the item, not a label
        if isinstance(value, pyast.IfExp):
            return settle(value.body) and settle(value.orelse)
        return False

    return labels if _every_return(node, settle) else None


# what a `return` of these literals gives: never the dict, label or None a python stage returns
_NO_STAGE_RETURN = {pyast.Tuple: "a tuple", pyast.List: "a list", pyast.Set: "a set", pyast.ListComp: "a list",
                    pyast.SetComp: "a set", pyast.GeneratorExp: "a generator", pyast.Lambda: "a function"}


def wrong_returns(info: FunctionInfo | None) -> list[tuple[int, str]]:
    """The `return`s of a python stage's function that give what a python stage may not return
    (the item's dict, a label string or None), by their literal: (line, what it gives), as `return
    item, "math"` (a tuple: the item and a label at once), `return 42`, `return [item]`. Only for
    a plain def the module binds the name to alone and no decorator wraps (a wrapper may turn the
    value into a dict); its own returns, not those of the functions inside it."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) is None or node.decorator_list:
        return []
    found: list[tuple[int, str]] = []

    def what(value) -> str | None:
        if isinstance(value, pyast.Constant) and not (value.value is None or isinstance(value.value, str)):
            return f"{'a' if type(value.value).__name__[0] not in 'aeiou' else 'an'} {type(value.value).__name__}"
        return _NO_STAGE_RETURN.get(type(value))

    def ok(value) -> bool:
        got = what(value)
        if got is not None:
            found.append((value.lineno, got))
        return True

    _every_return(node, ok)
    return sorted(found)


# what a `return` of these literals gives: never the list of requests a `returns = many` stage returns
_NO_MANY_RETURN = {pyast.Dict: "a dict", pyast.DictComp: "a dict", pyast.Set: "a set", pyast.SetComp: "a set",
                   pyast.GeneratorExp: "a generator", pyast.Lambda: "a function", pyast.JoinedStr: "a string"}


def wrong_many_returns(info: FunctionInfo | None) -> list[tuple[int, str]]:
    """The `return`s of a `returns = many` stage's function that give no list, by their literal:
    (line, what it gives), as `return item` written as a dict literal (`return {"prompt": p}`), a
    label string, a number, None or a bare `return`. Only for a plain def the module binds the name
    to alone and no decorator wraps (a wrapper may make a list of it); its own returns, not those of
    the functions inside it."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) not in ("function", "coroutine") or node.decorator_list:
        return []
    found: list[tuple[int, str]] = []

    def ok(value) -> bool:
        if isinstance(value, pyast.Constant):
            v = value.value
            found.append((value.lineno, "None" if v is None else "a string" if isinstance(v, str) else
                          f"{'an' if type(v).__name__[0] in 'aeiou' else 'a'} {type(v).__name__}"))
        elif type(value) in _NO_MANY_RETURN:
            found.append((value.lineno, _NO_MANY_RETURN[type(value)]))
        return True

    for n in _own_nodes(node):                  # a bare `return`: None
        if isinstance(n, pyast.Return) and n.value is None:
            found.append((n.lineno, "None"))
    _every_return(node, lambda v: v is None or ok(v))
    return sorted(found)


_COPIES = ("dict", "copy", "deepcopy")          # dict(x), copy.copy(x), deepcopy(x), x.copy(): x's kind


def _names_of(node) -> tuple[str | None, dict[str, int], dict[str, pyast.AST]]:
    """A def's first parameter (the item it gets), how many times its body binds each name (its
    parameters once), and the value of each name last bound by a plain `name = value`."""
    params = node.args.posonlyargs + node.args.args
    item = params[0].arg if params else None
    binds: dict[str, int] = {a.arg: 1 for a in params + node.args.kwonlyargs}
    value_of: dict[str, pyast.AST] = {}
    for n in _own_nodes(node):
        named = []
        if isinstance(n, pyast.Name) and not isinstance(n.ctx, pyast.Load):
            named = [n.id]
        elif isinstance(n, (pyast.Global, pyast.Nonlocal)):
            named = list(n.names) * 2
        elif isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            named = [n.name]
        elif isinstance(n, pyast.ExceptHandler) and n.name:
            named = [n.name]
        elif isinstance(n, (pyast.Import, pyast.ImportFrom)):
            named = [(a.asname or a.name).split(".")[0] for a in n.names]
        for name in named:
            binds[name] = binds.get(name, 0) + 1
        if isinstance(n, pyast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], pyast.Name):
            value_of[n.targets[0].id] = n.value
    return item, binds, value_of


def passes_item_on(info: FunctionInfo | None) -> bool:
    """Whether a plain def (or async def) surely gives back, on some path, the item it got: a
    `return` of its first parameter (bound once) or a copy of it (`dict(item)`, `item.copy()`,
    `copy.deepcopy(item)`), of None or of nothing (the item goes on, unlabelled), or a body that
    can run off its end. A guard that answers some requests itself and passes the rest on."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) not in ("function", "coroutine") or node.decorator_list:
        return False
    item, binds, _ = _names_of(node)

    def its_item(v, depth: int = 0) -> bool:
        if isinstance(v, pyast.IfExp):
            return its_item(v.body, depth) or its_item(v.orelse, depth)
        if v is None or isinstance(v, pyast.Constant) and v.value is None:
            return True
        if isinstance(v, pyast.Name):
            return v.id == item and binds.get(item) == 1
        if isinstance(v, pyast.Call) and depth < 4 and not v.keywords:
            f = v.func
            name = f.id if isinstance(f, pyast.Name) else f.attr if isinstance(f, pyast.Attribute) else None
            if name not in _COPIES:
                return False
            if isinstance(f, pyast.Attribute) and not v.args:
                return its_item(f.value, depth + 1)        # item.copy()
            if isinstance(f, pyast.Name) and binds.get(name):
                return False                               # a local `dict` or `copy` of its own
            return len(v.args) == 1 and its_item(v.args[0], depth + 1)
        return False

    return runs_off_end(info) is not None or any(
        isinstance(n, pyast.Return) and its_item(n.value) for n in _own_nodes(node))


def returned_kinds(info: FunctionInfo | None) -> list[tuple[int, str, str, bool]]:
    """The `return`s of a python stage's function whose value is, by its source, surely a Request or
    surely a Generated result, as the runtime tells them apart (a dict with `messages` or `prompt` is
    a request, else one with `text` a result): (line, "Request" | "Generated", the value as written,
    whether every call returns it). Every call does where the `return` is a statement of the body
    itself, before any other `return` or `raise` (one inside an `if`, a loop, a `try` or a `with`
    may be passed by), and the value is the return's own, not one side of `a if c else b`.
    Known: the request a result carries, `item["request"]` (its first parameter's, or a copy of it:
    `dict(item["request"])`, `copy.deepcopy(...)`, `{**item["request"], ...}`), a dict literal whose
    keys say (`{"prompt": p}`, `{"text": t}` without `**`), a local name bound once to one of these
    (`req = dict(item["request"])` … `return req`), and either side of `a if c else b`. Only for a
    plain def (or async def) the module binds the name to alone and no decorator wraps; its own
    returns, not those of the functions inside it. Anything else (the item, a call, a variable bound
    twice) says nothing."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) not in ("function", "coroutine") or node.decorator_list:
        return []
    item, binds, value_of = _names_of(node)
    def kind(value, depth: int = 0) -> str | None:
        if depth > 8:
            return None
        if isinstance(value, pyast.Subscript):
            key = value.slice
            if isinstance(value.value, pyast.Name) and value.value.id == item and binds.get(item) == 1 \
                    and isinstance(key, pyast.Constant) and key.value == "request":
                return "Request"
            return None
        if isinstance(value, pyast.Call):
            f = value.func
            name = f.id if isinstance(f, pyast.Name) else f.attr if isinstance(f, pyast.Attribute) else None
            if name not in _COPIES:
                return None
            if isinstance(f, pyast.Attribute) and not value.args and not value.keywords:
                return kind(f.value, depth + 1)            # x.copy()
            if isinstance(f, pyast.Name) and binds.get(name):
                return None                                # a local `dict` or `copy` of its own
            if name == "dict" and not value.args and all(k.arg for k in value.keywords):
                return _dict_kind({k.arg for k in value.keywords}, [])
            if len(value.args) != 1:
                return None
            got = kind(value.args[0], depth + 1)
            if not value.keywords:
                return got
            if name == "dict" and all(k.arg for k in value.keywords):   # dict(x, text=…): x's keys and these
                return _dict_kind({k.arg for k in value.keywords}, [got])
            return None
        if isinstance(value, pyast.Dict):
            keys = {k.value for k in value.keys if isinstance(k, pyast.Constant) and isinstance(k.value, str)}
            if any(k is not None and not isinstance(k, pyast.Constant) for k in value.keys):
                return None                                # a computed key may be any
            splats = [kind(v, depth + 1) for k, v in zip(value.keys, value.values) if k is None]
            return _dict_kind(keys, splats)
        if isinstance(value, pyast.Name) and value.id != item and binds.get(value.id) == 1 \
                and value.id in value_of:
            return kind(value_of[value.id], depth + 1)
        return None

    found: list[tuple[int, str, str, bool]] = []
    exits = [n for n in _own_nodes(node) if isinstance(n, (pyast.Return, pyast.Raise))]
    first = min(exits, key=lambda n: (n.lineno, n.col_offset), default=None)
    surely = first if first is not None and any(first is stmt for stmt in node.body) else None

    def note(value, always: bool) -> None:
        for v in (value.body, value.orelse) if isinstance(value, pyast.IfExp) else (value,):
            if isinstance(v, pyast.IfExp):
                note(v, False)
                continue
            got = kind(v)
            if got is not None:
                found.append((v.lineno, got, pyast.unparse(v), always and v is value))

    for n in exits:
        if isinstance(n, pyast.Return) and n.value is not None:
            note(n.value, n is surely)
    return sorted(found)


def _dict_kind(keys: set, splats: list) -> str | None:
    """The kind of a dict with these literal keys and `**` parts of these kinds (None: unknown)."""
    if keys & {"messages", "prompt"} or "Request" in splats:
        return "Request"
    if splats:
        return None                                        # what a `**` part brings is not known
    if "text" in keys:
        return "Generated"
    return "Request" if "prompt_token_ids" in keys else None


def runs_off_end(info: FunctionInfo | None) -> int | None:
    """The line after which a plain def (or async def) surely can run off its end, returning None:
    its body ends in a statement that is no `return` or `raise` (an assignment, a call, `pass`), or
    in an `if` one of whose branches does, or that has no `else`. None when it cannot, or when the
    source does not say for sure (a loop, a `with`, a `try` or a `match` last: it may leave by a
    return inside it; a decorated def, whose wrapper may return anything)."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) not in ("function", "coroutine") or node.decorator_list:
        return None

    def off(body: list) -> int | None:
        last = body[-1]
        if isinstance(last, (pyast.Return, pyast.Raise)):
            return None
        if isinstance(last, pyast.If):
            inside = off(last.body)
            if inside is not None:
                return inside
            return (getattr(last, "end_lineno", None) or last.lineno) if not last.orelse else off(last.orelse)
        if isinstance(last, (pyast.Expr, pyast.Assign, pyast.AugAssign, pyast.AnnAssign, pyast.Pass)):
            if isinstance(last, pyast.Expr) and isinstance(last.value, pyast.Call):
                return None                     # sys.exit(), a helper that raises: it may never return
            return getattr(last, "end_lineno", None) or last.lineno
        return None

    return off(node.body)


def _own_nodes(node: pyast.AST):
    """The nodes of a def's own body (not those of the functions, lambdas and classes inside it)."""
    todo = list(pyast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        yield n
        if not isinstance(n, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda, pyast.ClassDef)):
            todo.extend(pyast.iter_child_nodes(n))


def always_labels(info: FunctionInfo | None) -> set[str] | None:
    """The labels a plain `def` (or `async def`) returns when its source shows it returns a label
    on every path: each `return` gives a string literal or a choice of them (`"b" if h < 50 else
    "a"`), and no path ends without a return or a raise (that would return None: the item with
    no label). A plain generator (a `stream = true` stage's filter) is judged by the same rule: the
    runtime drives it to its end, and the value of the `return` that ends it is its label
    (flow/streams.run_filter). None for anything less certain (a return of a variable, a call, the
    item or None; a body that may run off its end; an async generator, which returns no value; a
    decorated def, whose wrapper may return anything; a def the module may bind the name past, as a
    conditional def or a reassignment: FunctionInfo.settled), so callers keep their stricter rule."""
    node = info.node if info is not None and info.settled else None
    if shape_of_def(node) not in ("function", "coroutine", "generator") or node.decorator_list:
        return None
    labels: set[str] = set()

    def literal(value) -> bool:
        if isinstance(value, pyast.Constant) and isinstance(value.value, str):
            labels.add(value.value)
            return True
        if isinstance(value, pyast.IfExp):
            return literal(value.body) and literal(value.orelse)
        return False

    return labels if _every_return(node, literal) and labels and _always_leaves(node.body) else None


def _always_leaves(body: list) -> bool:
    """Whether every path through these statements ends in a `return` or a `raise` (judged
    conservatively: only a final return or raise, or an if/else or try whose branches all end so).
    A `with` block proves nothing: its context manager's exit may swallow an exception raised in
    it and carry on past it (`with suppress(KeyError): return "a" if item["x"] else "b"` returns
    None when the key is missing)."""
    if not body:
        return False
    last = body[-1]
    if isinstance(last, (pyast.Return, pyast.Raise)):
        return True
    if isinstance(last, pyast.If):
        return _always_leaves(last.body) and _always_leaves(last.orelse)
    if isinstance(last, pyast.Try) and not last.finalbody:
        return (_always_leaves(last.body) or _always_leaves(last.orelse)) \
            and all(_always_leaves(h.body) for h in last.handlers)
    return False


def function_shape(ref: str, base_dir: str | None) -> str | None:
    """What `ref` names, read from its module's source (never imported): one of SHAPES for a
    top-level `def` (the last binding of that name), None when the source does not say (a class,
    an assignment, an import, a module without source, a reference that is not found)."""
    try:
        return shape_of_def(function_info(ref, base_dir).node)
    except FunctionNotFound:
        return None


def callable_shape(fn: Callable) -> str:
    """One of SHAPES for a loaded callable (an object whose __call__ is async counts as async)."""
    import inspect

    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) or not callable(fn) else \
        getattr(fn, "__call__", fn)
    for target in (fn, call):
        if inspect.isasyncgenfunction(target):
            return "async_generator"
        if inspect.isgeneratorfunction(target):
            return "generator"
        if inspect.iscoroutinefunction(target):
            return "coroutine"
    return "function"
