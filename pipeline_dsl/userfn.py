"""User functions named in a pipeline: `fn = "module:function"` (python stages, join).

The module is looked up beside the .agp file first, then on sys.path. `agp check`
finds the function without running the module: it reads the module's source and looks
for a top-level `def`, class, assignment or import of that name (a module without
source, such as a compiled extension, is imported). The runtime imports it for real.

    find_function("hooks:redact", base_dir)   # None, or the reason it cannot be found
    function_shape("hooks:redact", base_dir)  # "function" | "coroutine" | "generator" | ... | None
    fn = load_function("hooks:redact", base_dir)
    callable_shape(fn)                        # the same, of the loaded function
"""
from __future__ import annotations

import ast as pyast
import importlib
import importlib.util
import os
import re
import sys
import threading
from typing import Callable

REF_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_LOCK = threading.Lock()


class FunctionNotFound(LookupError):
    """The module or the function of a `fn` reference cannot be found; the message says which."""

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = names or []          # the module's top-level names, for did-you-mean


def split_ref(ref: str) -> tuple[str, str]:
    if not REF_RE.match(ref or ""):
        raise FunctionNotFound(f"'{ref}' is not a function reference: write \"module:function\"")
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


def _top_level_names(source: str, filename: str) -> set[str] | None:
    try:
        tree = pyast.parse(source, filename)
    except SyntaxError:
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (pyast.Assign, pyast.AnnAssign)):
            targets = node.targets if isinstance(node, pyast.Assign) else [node.target]
            for t in targets:
                for n in pyast.walk(t):
                    if isinstance(n, pyast.Name):
                        names.add(n.id)
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, (pyast.If, pyast.Try)):   # conditional definitions: accept their names
            for n in pyast.walk(node):
                if isinstance(n, (pyast.FunctionDef, pyast.ClassDef)):
                    names.add(n.name)
                elif isinstance(n, pyast.Name) and isinstance(n.ctx, pyast.Store):
                    names.add(n.id)
    return names


def find_function(ref: str, base_dir: str | None) -> None:
    """Raise FunctionNotFound unless `ref` names a function that can be loaded (no import of
    modules that have source)."""
    module, attr = split_ref(ref)
    path = _local_file(module, base_dir)
    if path is None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError) as e:
            raise FunctionNotFound(f"module '{module}' not found ({e})") from None
        if spec is None:
            where = f"beside the pipeline ({base_dir}) or on sys.path" if base_dir else "on sys.path"
            raise FunctionNotFound(f"module '{module}' not found {where}")
        path = spec.origin if spec.origin and spec.origin.endswith(".py") else None
        if path is None:                       # no source to read: import it
            try:
                mod = importlib.import_module(module)
            except Exception as e:             # noqa: BLE001 - any failure is the user's to see
                raise FunctionNotFound(f"module '{module}' cannot be imported: {type(e).__name__}: {e}") from None
            if not callable(getattr(mod, attr, None)):
                raise FunctionNotFound(f"module '{module}' has no function '{attr}'",
                                       [n for n in dir(mod) if not n.startswith("_")])
            return
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FunctionNotFound(f"cannot read {path}: {e}") from None
    names = _top_level_names(source, path)
    if names is None:
        raise FunctionNotFound(f"{path} has a syntax error")
    if attr not in names:
        raise FunctionNotFound(f"module '{module}' ({path}) has no function '{attr}'", sorted(names))


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
                loaded = mod
        else:
            loaded = importlib.import_module(module)
    fn = getattr(loaded, attr, None)
    if not callable(fn):
        raise FunctionNotFound(f"module '{module}' has no function '{attr}'")
    return fn


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


def _source_path(module: str, base_dir: str | None) -> str | None:
    path = _local_file(module, base_dir)
    if path is not None:
        return path
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def function_shape(ref: str, base_dir: str | None) -> str | None:
    """What `ref` names, read from its module's source (never imported): one of SHAPES for a
    top-level `def` (the last one of that name), None when the source does not say (a class,
    an assignment, an import, a module without source, a reference that is not found)."""
    try:
        module, attr = split_ref(ref)
    except FunctionNotFound:
        return None
    path = _source_path(module, base_dir)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tree = pyast.parse(f.read(), path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    shape = None
    for node in tree.body:
        names = _bound_names(node)
        if attr in names:
            shape = shape_of_def(node)            # a later binding replaces an earlier def
    return shape


def _bound_names(node: pyast.AST) -> set[str]:
    if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
        return {node.name}
    if isinstance(node, (pyast.Assign, pyast.AnnAssign, pyast.AugAssign)):
        targets = node.targets if isinstance(node, pyast.Assign) else [node.target]
        return {n.id for t in targets for n in pyast.walk(t) if isinstance(n, pyast.Name)}
    if isinstance(node, (pyast.Import, pyast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


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
