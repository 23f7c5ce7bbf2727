"""The `agp` sub-commands: one module each, with HELP, add_arguments(parser) and main(args) -> int."""
