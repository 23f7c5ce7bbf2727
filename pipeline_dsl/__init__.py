"""agp's language front end: parse, check, format and draw `.agp` pipelines (no torch).

The API other layers use:

    import pipeline_dsl
    program, diags = pipeline_dsl.load("examples/chat.agp")    # never raises on bad input
    # program.pipelines: [ast.Pipeline] (derived ones expanded); program.sources: {file: text}
    # diags: [diagnostics.Diagnostic] sorted by position (errors and warnings)

    g = pipeline_dsl.load_pipeline_graph("examples/chat.agp", pipeline_name=None)
    # networkx.DiGraph; raises pipeline_dsl.diagnostics.CheckFailed (with .diagnostics
    # and .render()) when the file has errors. Without a name: the file's first pipeline
    # (a file of `use`s alone: what its first include with one would give).
    g.graph["name"], g.graph["settings"]      # settings: model, mode, device, threads, dtype
    g.graph["sources"]                        # {file: text}: the file and its includes, as read
    g.nodes["batch"]["kind"], g.nodes["batch"]["params"]["timeout"]   # 'dynamic_batch', 0.001
    g.nodes["gen"]["resource"], g.nodes["gen"]["placement"]           # 'compute', None
    g.edges["batch", "encode"]["conditions"]          # [('label', 'full'), ('label', 'timeout')]

    pipeline_dsl.load_pipeline_graphs(path)   # {name: DiGraph} for every pipeline (includes too)
    pipeline_dsl.graph.build_graph(pipeline)  # ast.Pipeline -> DiGraph (no checks)
    pipeline_dsl.check_file(path)             # -> (Program, diagnostics)
    pipeline_dsl.loads(text, file="<string>") # like load(), from a string
    pipeline_dsl.read_pipeline_source(path)  # (file, text): FILE "-" is stdin, named "<stdin>"

Modules: grammar.lark, parser (text -> ast), loader (files, includes), checker
(settings, stages, edges against stages.registry), graph (DiGraph, graph checks),
modes (presets), units, fmt (canonical printer), render (graphviz), cli (`agp`).
"""

from __future__ import annotations

import os

from .diagnostics import CheckFailed, Diagnostic, SourcePos, has_errors, sort_diagnostics

from importlib.metadata import PackageNotFoundError, version as _version  # noqa: E402

try:                                  # (the import outside: a Ctrl-C inside it is a KeyboardInterrupt, not a NameError)
    __version__ = _version("agp")
except PackageNotFoundError:          # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = ["CheckFailed", "Diagnostic", "SourcePos", "Reject", "REJECT_STATUSES", "Retry", "load", "loads",
           "check_file", "load_pipeline_graph", "load_pipeline_graphs", "read_pipeline_source"]


# HTTP's own 4xx and 5xx statuses (RFC 9110 and IANA's registry) that a Reject may answer: all but
# those whose answer needs what agp does not send or that no origin server answers — 405 (its
# `Allow` header), 407 (`Proxy-Authenticate`), 416 (`Content-Range`, for a Range request agp
# serves none of), 426 (`Upgrade`), 418 (unused), 505 (the connection's HTTP version, already
# taken), 510 (obsolete), 511 (a network's captive portal, never an origin server) — and none
# HTTP does not define (nginx's 499, a client that went away, is no answer at all)
REJECT_STATUSES = frozenset({400, 401, 402, 403, 404, 406, 408, 409, 410, 411, 412, 413, 414, 415, 417,
                             421, 422, 423, 424, 425, 428, 429, 431, 451,
                             500, 501, 502, 503, 504, 506, 507, 508})


class Reject(Exception):
    """Raised by a python stage's function to refuse the request it is looking at: that request
    gets this message as its error (HTTP 400 in agp serve, or the `status` given: one of
    REJECT_STATUSES, with a `Retry-After` header of `retry_after` seconds when given); every
    other request goes on. `param` names the request field at fault (the error's `param`, null
    when not given) and `code` the error's `code` (default `rejected`).

        def guard(item):
            if "password" in item["text"]:
                raise pipeline_dsl.Reject("the answer would disclose a password")
            return item

        def rate_limit(item):
            if over_limit(item["metadata"]["tenant"]):
                raise pipeline_dsl.Reject("over the tenant's rate limit", status=429, retry_after=2)
            return item

        def check_tenant(item):
            if item["metadata"].get("tenant") not in TENANTS:
                raise pipeline_dsl.Reject("unknown tenant", param="metadata.tenant", code="unknown_tenant")
            return item
    """

    def __init__(self, message: str = "", *, status: int = 400, retry_after: float | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.retry_after, self.param, self.code = status, retry_after, param, code
        self.check()

    def check(self) -> None:
        """Raises ValueError saying which of its status, retry_after, param or code is not one
        a Reject may carry (the runtime checks a Reject again when a stage raises it: one changed
        after it was made fails its request as the stage's bug)."""
        status, retry_after = getattr(self, "status", 400), getattr(self, "retry_after", None)
        if isinstance(status, bool) or not isinstance(status, int) or status not in REJECT_STATUSES:
            why = (" (it needs a header agp does not send, or no server answers it)"
                   if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599 else "")
            raise ValueError(f"Reject's status must be a 4xx or 5xx HTTP status agp can answer "
                             f"(pipeline_dsl.REJECT_STATUSES), got {status!r}{why}")
        if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, (int, float))
                                        or not 0 <= retry_after < float("inf")):
            raise ValueError(f"Reject's retry_after must be a number of seconds >= 0, got {retry_after!r}")
        for name in ("param", "code"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, str) or not value or not value.isprintable()
                                      or len(value) > 256):
                raise ValueError(f"Reject's {name} must be a non-empty string of at most 256 printable "
                                 f"characters or None, got {value!r}")


class Retry(Exception):
    """Raised by a python stage's function to say that its failure is transient: with
    `retries = N` on the stage the call is tried again after a backoff (TimeoutError,
    ConnectionError and HTTP 408/425/429/5xx errors count as transient too).

        def lookup(item):
            if cache_server_busy():
                raise pipeline_dsl.Retry("the cache server is busy")
    """


def load(path: str, allow_paths=()):
    """(Program, diagnostics): the file and its includes, parsed and checked. Included files and
    json_schema files must lie in the file's folder or in one of `allow_paths`."""
    return _load(path, None, allow_paths)


def loads(text: str, file: str = "<string>", allow_paths=()):
    """(Program, diagnostics) for source text; `use` paths resolve against the current directory."""
    return _load(file, text, allow_paths)


check_file = load


def _load(path: str, text: str | None, allow_paths=()):
    from .graph import check_program
    from .loader import load_program

    program, diags = load_program(path, text, allow_paths)
    diags = list(diags) + check_program(program)
    if not program.pipelines and not has_errors(diags):
        # plan, run and serve need a pipeline: what check accepts must run, so check refuses it too
        from .diagnostics import ERROR
        diags.append(Diagnostic(ERROR, f"{program.root} defines no pipeline", SourcePos(program.root, 1, 1, 1, 2),
                                expected="a pipeline: pipeline NAME { … } (or use \"file.agp\" of a file with one)",
                                hint="see examples/chat.agp"))
    return program, sort_diagnostics(diags)


def load_pipeline_graph(path: str, pipeline_name: str | None = None, allow_paths=(), text: str | None = None):
    """The checked DiGraph of one pipeline of `path` (or of `text` standing for it, as loads);
    raises CheckFailed on errors."""
    from .graph import build_graph

    program, diags = _load(path, text, allow_paths)
    if has_errors(diags):
        raise CheckFailed(diags, program.sources)
    p = program.pipeline(pipeline_name)
    if p is None:
        from .diagnostics import ERROR, did_you_mean
        names = program.pipeline_names()
        msg = (f"no pipeline named '{pipeline_name}' in {path}" if pipeline_name is not None
               else f"{path} defines no pipeline")
        raise CheckFailed([Diagnostic(ERROR, msg, None, expected="one of: " + (", ".join(names) or "(none)"),
                                      hint=did_you_mean(pipeline_name or "", names))], program.sources)
    g = build_graph(p, allowed=getattr(program, "allowed", None) or None)   # the folders agp check allowed
    g.graph["sources"] = program.sources     # what it was made from (agp run's --resume fingerprint)
    return g


def load_pipeline_graphs(path: str, allow_paths=()) -> dict:
    """{pipeline name: checked DiGraph} for every pipeline of `path` and its includes."""
    from .graph import build_graph

    program, diags = load(path, allow_paths)
    if has_errors(diags):
        raise CheckFailed(diags, program.sources)
    allowed = getattr(program, "allowed", None) or None
    return {p.name.text: build_graph(p, allowed=allowed) for p in program.pipelines}


def read_pipeline_source(path: str) -> tuple[str, str | None]:
    """(file, text) for a command's FILE argument: `-` is standard input, read now and named
    `<stdin>` (text given to load/loads/load_pipeline_graph); any other path is read by the
    loader itself (text None). Raises CheckFailed when stdin cannot be read."""
    from .loader import STDIN, STDIN_NAME, read_stdin

    if os.fspath(path) != STDIN:
        return os.fspath(path), None
    text, diags = read_stdin()
    if text is None:
        raise CheckFailed(diags, {})
    return STDIN_NAME, text
