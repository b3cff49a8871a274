"""Subcommands living in their own modules. Each module defines ``register(sub, common)`` which adds
its parser (with ``set_defaults(run=...)``); heavy imports belong inside the run function."""
