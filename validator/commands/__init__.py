"""The subcommands of `validator`."""
