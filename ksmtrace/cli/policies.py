"""``ksmtrace policies``: list the registered policies, or show one's parameters and model."""
from __future__ import annotations

import click

from ksmtrace.cli import cli
from ksmtrace.cli._options import echo_table, emit_json, json_option
from ksmtrace.policies.registry import broken_plugins, get_policy, list_policies, origin


@cli.group("policies", invoke_without_command=True)
@json_option
@click.pass_context
def policies_cmd(ctx, as_json):
    """List the merge policies (built-in and plugins).

    \b
    Example:
      ksmtrace policies
      ksmtrace policies show ksm
    """
    if ctx.invoked_subcommand is not None:
        return
    rows = [
        {"name": cls.name, "scope": cls.default_scope, "kernel": "numba" if cls.has_kernel() else "-",
         "summary": cls.summary, "from": origin(cls.name)}
        for cls in list_policies()
    ]
    if as_json:
        emit_json({"policies": rows, "broken": broken_plugins()})
        return
    echo_table(rows, ["name", "scope", "kernel", "summary"])
    for name, why in broken_plugins().items():
        click.echo(f"(plugin {name!r} not loaded: {why})", err=True)


@policies_cmd.command("show")
@click.argument("name")
@json_option
def show_cmd(name, as_json):
    """Show a policy's parameters (defaults, units) and what it models.

    \b
    Example:
      ksmtrace policies show ksm
    """
    cls = get_policy(name)
    params = cls.parameter_table()
    if as_json:
        emit_json({
            "name": cls.name, "summary": cls.summary, "default_scope": cls.default_scope, "kernel": cls.kernel,
            "counters": list(cls.kernel_counters), "parameters": params, "description": cls.docstring(),
            "module_doc": (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip(),
        })
        return
    click.echo(f"{cls.name}: {cls.summary}")
    click.echo(f"default scope: {cls.default_scope}   from: {origin(cls.name)}")
    click.echo("")
    rows = [{"parameter": p["name"], "default": p["default"], "unit": p["unit"], "help": p["help"] + (f" ({'/'.join(map(str, p['choices']))})" if p["choices"] else "")} for p in params]
    echo_table(rows, ["parameter", "default", "unit", "help"])
    if cls.kernel_counters:
        click.echo("")
        click.echo("counters: " + ", ".join(cls.kernel_counters))
    doc = (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()
    if doc:
        click.echo("")
        click.echo(doc)
