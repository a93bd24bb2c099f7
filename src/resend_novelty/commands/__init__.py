"""CLI sub-commands: each module has ``add_parser(subparsers, name)`` and ``run(args)``."""
