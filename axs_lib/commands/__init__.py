"""Subcommands of ``axs``: one module each, each with ``register(subparsers)``."""
