"""``python -m anycast`` runs the CLI."""

from anycast.cli.main import app

app()
