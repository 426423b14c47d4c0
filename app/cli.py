"""The ``lambent`` command."""

from __future__ import annotations

from typing import Annotated

import typer

cli = typer.Typer(help="Lambent: a self-hosted function-as-a-service platform.", no_args_is_help=True)


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
) -> None:
    """Run the whole platform in this process: API, scheduler and an embedded worker."""
    import uvicorn

    from app.logging import configure_logging
    from app.main import create_app
    from app.migrate import upgrade_to_head
    from app.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level="warning",
        access_log=False,
    )


@cli.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from app.migrate import upgrade_to_head
    from app.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    typer.echo("database is up to date")


def main() -> None:
    cli()
