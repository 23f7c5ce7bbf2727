"""`agp plan FILE`: show how a pipeline's stages are laid onto streams (no torch).

    agp plan examples/chat.agp            # streams, their stages, events, predicted overlap
    agp plan examples/chat.agp --json     # the Plan as JSON (top-level `streams` list)
    agp fmt gen.agp | agp plan -          # FILE '-' reads the pipeline from standard input

Exit status 0 on success, 2 when the file has errors (diagnostics on stderr).
"""
from __future__ import annotations

import json
import sys

from pipeline_dsl.commands import add_pipeline_arguments

HELP = "show the streams, events and predicted overlap the planner gives a pipeline"


def add_arguments(p) -> None:
    add_pipeline_arguments(p, stdin=True)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args) -> int:
    from pathlib import Path

    from pipeline_dsl import load_pipeline_graph, read_pipeline_source
    from pipeline_dsl.diagnostics import CheckFailed
    from pipeline_dsl.plan import PlanError, format_plan, make_plan

    try:
        path, text = read_pipeline_source(args.pipeline)      # FILE '-': stdin, named <stdin>
        graph = load_pipeline_graph(path if text is not None else Path(path), args.name, args.allow_path, text=text)
    except CheckFailed as e:
        sys.stderr.write(e.render())
        return 2
    except (OSError, UnicodeDecodeError) as e:
        print(f"agp plan: error: cannot read {args.pipeline}: {e}", file=sys.stderr)
        return 2
    try:
        plan = make_plan(graph)
    except PlanError as e:
        print(f"agp plan: error: {args.pipeline}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
