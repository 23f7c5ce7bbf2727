"""The `agp` sub-commands: one module each, with HELP, add_arguments(parser) and main(args) -> int."""


def add_pipeline_arguments(p) -> None:
    """The .agp file (`args.pipeline`) and which of its pipelines (`args.name`): one spelling
    for every command that loads a pipeline."""
    p.add_argument("pipeline", metavar="FILE", help="the .agp file")
    p.add_argument("--pipeline", "--pipeline-name", "--name", dest="name", default=None,
                   help="which pipeline of the file (default: the only or first one)")
    add_allow_path(p)


def add_allow_path(p) -> None:
    """--allow-path DIR: a folder besides the pipeline file's own that its `use` includes and
    json_schema files may come from (docs/language.md, "What agp reads and runs")."""
    p.add_argument("--allow-path", dest="allow_path", action="append", default=[], metavar="DIR",
                   help="also read included .agp files and json_schema files from DIR (repeatable; "
                        "default: only the pipeline file's folder)")
