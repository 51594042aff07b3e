"""Registers every command: one module per command, each adding itself to the ``cli`` group.

A missing or broken command module is an import error at start-up, never a silently absent
command.  Third-party commands come from the ``ksmtrace.commands`` entry-point group (a module
whose import registers a command on :data:`ksmtrace.cli.cli`), loaded unless
``KSMTRACE_LOAD_PLUGINS=none``.
"""
import importlib
import os

COMMAND_MODULES = ("capture", "info", "policies", "replay", "compare", "calibrate", "fidelity", "validate",
                   "plot", "sweep", "breakdown", "fleet", "frontier", "controllers", "advise", "doctor", "strengths",
                   "redact", "demo")

for _name in COMMAND_MODULES:
    importlib.import_module(f"ksmtrace.cli.{_name}")


def _load_plugins() -> None:
    if os.environ.get("KSMTRACE_LOAD_PLUGINS", "").lower() == "none":
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group="ksmtrace.commands"):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not take the built-in commands with it
            import sys

            print(f"ksmtrace: warning: command plug-in {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)


_load_plugins()
