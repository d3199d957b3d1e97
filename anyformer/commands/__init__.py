"""Subcommands of the `anyformer` CLI; every module here defines `register(subparsers)`."""
