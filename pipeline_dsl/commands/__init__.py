"""The `agp` sub-commands: one module each, with HELP, add_arguments(parser) and main(args) -> int;
beside them what two of them drive: `runner` (agp run: requests through a runtime, the summary)
and `loadgen` (agp bench's load generator)."""

from pipeline_dsl.loader import add_allow_path, add_pipeline_arguments

__all__ = ["add_allow_path", "add_pipeline_arguments"]
