"""Entry point of the ``anycast`` command: each role's module registers its commands."""

from __future__ import annotations

import typer

from anycast.cli import backup_cmds, cluster, control_cmds, region_cmds, replica_cmds, training_cmds

app = typer.Typer(
    name="anycast",
    help="Train models where the data lives; serve them from every region behind one endpoint.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (training_cmds, replica_cmds, control_cmds, region_cmds, cluster, backup_cmds):
    module.register(app)


if __name__ == "__main__":
    app()
