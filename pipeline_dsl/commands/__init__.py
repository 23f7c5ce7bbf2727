"""The `agp` sub-commands: one module each, with HELP, add_arguments(parser) and main(args) -> int."""


def add_pipeline_arguments(p) -> None:
    """The .agp file (`args.pipeline`) and which of its pipelines (`args.name`): one spelling
    for every command that loads a pipeline."""
    p.add_argument("pipeline", metavar="FILE", help="the .agp file")
    p.add_argument("--pipeline", "--pipeline-name", "--name", dest="name", default=None,
                   help="which pipeline of the file (default: the only or first one)")
