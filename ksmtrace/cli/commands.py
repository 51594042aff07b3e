"""Imports every command module (each registers itself on the ``cli`` group)."""
import importlib

COMMAND_MODULES = ["capture", "info", "policies", "replay", "compare", "calibrate", "fidelity", "validate", "plot", "sweep", "breakdown", "demo"]

for _name in COMMAND_MODULES:
    try:
        importlib.import_module(f"ksmtrace.cli.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"ksmtrace.cli.{_name}":
            raise
