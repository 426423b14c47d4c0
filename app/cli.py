"""The ``lambent`` command: run the platform, and use its API from a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.billing.cli import billing_cli

cli = typer.Typer(
    help="Lambent: a self-hosted function-as-a-service platform.", no_args_is_help=True
)
tenants_cli = typer.Typer(help="Manage tenants (operator key).", no_args_is_help=True)
functions_cli = typer.Typer(help="Deploy and manage functions.", no_args_is_help=True)
invocations_cli = typer.Typer(help="Look at past invocations.", no_args_is_help=True)
images_cli = typer.Typer(
    help="Images of the Docker sandbox (LAMBENT_SANDBOX=docker), built without a registry.",
    no_args_is_help=True,
)
cli.add_typer(tenants_cli, name="tenants")
cli.add_typer(functions_cli, name="functions")
cli.add_typer(invocations_cli, name="invocations")
cli.add_typer(images_cli, name="images")
cli.add_typer(billing_cli)

console = Console()
errors = Console(stderr=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", envvar="LAMBENT_URL", help="API address", show_default=False)
]
KeyOption = Annotated[
    str | None,
    typer.Option("--key", envvar="LAMBENT_API_KEY", help="API key", show_default=False),
]


def _client(url: str | None, key: str | None):  # type: ignore[no-untyped-def]
    from app.client import LambentClient

    return LambentClient(url, key)


def _run(action):  # type: ignore[no-untyped-def]
    """Run an API call, turning platform errors into a message and exit status 1."""
    from httpx import HTTPError

    from app.client import ApiError

    try:
        return action()
    except ApiError as error:
        errors.print(f"[red]{error.type}[/red] ({error.status}): {error.message}")
        raise typer.Exit(1) from None
    except HTTPError as error:
        errors.print(f"[red]cannot reach Lambent[/red]: {error}")
        raise typer.Exit(1) from None
    except (ValueError, OSError) as error:
        errors.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="API processes [default: LAMBENT_API_WORKERS, 1]; more than one needs "
            "LAMBENT_EMBEDDED_WORKER=false",
        ),
    ] = None,
) -> None:
    """Run the platform: API and scheduler, with an embedded worker unless it is turned off."""
    import uvicorn

    from app.logging import configure_logging
    from app.main import create_app
    from app.migrate import upgrade_to_head
    from app.settings import get_settings

    settings = get_settings()
    processes = processes or settings.api_workers
    if processes > 1 and settings.embedded_worker:
        errors.print(
            f"[red]error[/red]: {processes} API processes need LAMBENT_EMBEDDED_WORKER=false: "
            "an embedded worker belongs to one process. Run the sandboxes with `lambent worker`."
        )
        raise typer.Exit(2)

    configure_logging(settings.log_format, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Once, before any API process starts.
    upgrade_to_head(settings.resolved_database_url)
    options: dict[str, Any] = {
        "host": host or settings.host,
        "port": port or settings.port,
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 30,
    }
    if processes == 1:
        uvicorn.run(create_app(settings), **options)
    else:
        # Each process builds its own application (scheduler, worker registry) from the same
        # LAMBENT_* environment; they share the database, the object store and the workers.
        uvicorn.run("app.main:create_app_from_env", factory=True, workers=processes, **options)


@cli.command()
def worker(
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve on [default: 127.0.0.1:8081]")
    ] = None,
    control_plane: Annotated[
        str | None, typer.Option("--control-plane", help="The control plane's URL")
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option("--memory-mb", help="Instance memory this worker may place")
    ] = None,
    cpus: Annotated[int | None, typer.Option(help="CPUs to report [default: this host's]")] = None,
    worker_id: Annotated[
        str | None, typer.Option("--id", help="Worker id [default: generated once, kept]")
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(help="HOST:PORT the control plane reaches this worker at [default: --listen]"),
    ] = None,
) -> None:
    """Run this host's sandboxes as a worker of a control plane (LAMBENT_WORKER_TOKEN)."""
    import uvloop

    from app.logging import configure_logging
    from app.settings import get_settings
    from workers import standalone
    from workers.cgroups import CgroupUnavailable
    from workers.sandbox.base import SandboxStartError

    options = {
        "worker_listen": listen,
        "control_plane_url": control_plane,
        "worker_memory_mb": memory_mb,
        "worker_cpus": cpus,
        "worker_id": worker_id,
        "worker_advertise": advertise,
    }
    settings = get_settings().model_copy(update={k: v for k, v in options.items() if v is not None})
    configure_logging(settings.log_format, settings.log_level)
    if settings.worker_token is None:
        errors.print("[red]error[/red]: set LAMBENT_WORKER_TOKEN, the control plane's worker token")
        raise typer.Exit(2)
    if not settings.control_plane_url:
        errors.print("[red]error[/red]: pass --control-plane URL (or LAMBENT_CONTROL_PLANE_URL)")
        raise typer.Exit(2)
    try:
        status = uvloop.run(standalone.run(settings))
    except (SandboxStartError, CgroupUnavailable, ValueError) as error:
        errors.print(f"[red]error[/red]: {error}")
        raise typer.Exit(1) from None
    raise typer.Exit(status)


@cli.command()
def migrate() -> None:
    """Apply pending database migrations and exit."""
    from app.migrate import upgrade_to_head
    from app.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    typer.echo("database is up to date")


@images_cli.command("build")
def images_build(
    runtime: Annotated[
        list[str] | None,
        typer.Option("--runtime", help="Only this runtime's image, repeatable [default: all]"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild images that exist")] = False,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror for debootstrap")] = None,
) -> None:
    """Build the runtime images from Debian packages (debootstrap, docker import, docker build)."""
    import docker
    import docker.errors

    from app.settings import get_settings
    from workers.agent import SUPPORTED_RUNTIMES
    from workers.images.build import DEFAULT_MIRROR, ImageBuildError, build_images

    unknown = sorted(set(runtime or []) - set(SUPPORTED_RUNTIMES))
    if unknown:
        errors.print(f"[red]error[/red]: unknown runtime {', '.join(unknown)}")
        raise typer.Exit(2)
    settings = get_settings()
    try:
        client = docker.from_env()
        built = build_images(
            client,
            runtime or SUPPORTED_RUNTIMES,
            force=force,
            mirror=mirror or DEFAULT_MIRROR,
            sandbox_uid=settings.sandbox_uid,
            sandbox_gid=settings.sandbox_gid,
            progress=lambda line: errors.print(line, markup=False, highlight=False),
        )
    except (ImageBuildError, docker.errors.DockerException) as error:
        errors.print(f"[red]error[/red]: {error}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"built {', '.join(built)}" if built else "every image exists already")


@tenants_cli.command("create")
def tenants_create(name: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Create a tenant and print its API key (shown only this once)."""
    body = _run(lambda: _client(url, key).request("POST", "/v1/tenants", json={"name": name}))
    _print_json(body.json())


@tenants_cli.command("list")
def tenants_list(url: UrlOption = None, key: KeyOption = None) -> None:
    """List tenants."""
    body = _run(lambda: _client(url, key).request("GET", "/v1/tenants")).json()
    table = Table("id", "name", "created")
    for tenant in body["tenants"]:
        table.add_row(tenant["id"], tenant["name"], tenant["created_at"])
    console.print(table)


@tenants_cli.command("delete")
def tenants_delete(tenant_id: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Delete a tenant, its keys and its functions."""
    _run(lambda: _client(url, key).request("DELETE", f"/v1/tenants/{tenant_id}"))
    console.print(f"deleted tenant {tenant_id}")


@functions_cli.command("deploy")
def functions_deploy(
    name: str,
    runtime: Annotated[str, typer.Option(help="python3.11, nodejs20.x or provided")] = "python3.11",
    handler: Annotated[
        str, typer.Option(help="module.function (python), file.function (node)")
    ] = "app.handler",
    zip_path: Annotated[Path | None, typer.Option("--zip", help="A zip package")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="A directory to zip")] = None,
    memory_mb: Annotated[int, typer.Option("--memory", help="Memory in MB")] = 128,
    timeout_s: Annotated[int, typer.Option("--timeout", help="Time limit in seconds")] = 3,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    description: str = "",
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Create a function from a zip file or a directory."""
    from app.client import read_package

    def deploy() -> Any:
        environment = dict(item.split("=", 1) for item in env or [])
        fields = {
            "name": name,
            "runtime": runtime,
            "handler": handler,
            "memory_mb": str(memory_mb),
            "timeout_s": str(timeout_s),
            "environment": json.dumps(environment),
            "description": description,
        }
        return _client(url, key).create_function(fields, read_package(zip_path, directory))

    _print_json(_run(deploy))


@functions_cli.command("update-code")
def functions_update_code(
    name: str,
    zip_path: Annotated[Path | None, typer.Option("--zip", help="A zip package")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="A directory to zip")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Replace a function's code."""
    from app.client import read_package

    _print_json(
        _run(lambda: _client(url, key).update_code(name, read_package(zip_path, directory)))
    )


@functions_cli.command("list")
def functions_list(url: UrlOption = None, key: KeyOption = None) -> None:
    """List your functions."""
    client = _client(url, key)
    table = Table("name", "runtime", "handler", "memory", "timeout", "updated")
    token: str | None = None
    while True:
        params = {"limit": 200, **({"next_token": token} if token else {})}
        page = _run(lambda p=params: client.request("GET", "/v1/functions", params=p)).json()
        for fn in page["functions"]:
            table.add_row(
                fn["name"],
                fn["runtime"],
                fn["handler"],
                f"{fn['memory_mb']} MB",
                f"{fn['timeout_s']} s",
                fn["updated_at"],
            )
        token = page["next_token"]
        if not token:
            break
    console.print(table)


@functions_cli.command("get")
def functions_get(name: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Show a function's configuration."""
    _print_json(_run(lambda: _client(url, key).request("GET", f"/v1/functions/{name}")).json())


@functions_cli.command("delete")
def functions_delete(name: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Delete a function."""
    _run(lambda: _client(url, key).request("DELETE", f"/v1/functions/{name}"))
    console.print(f"deleted function {name}")


@cli.command()
def invoke(
    name: str,
    payload: Annotated[str, typer.Option(help="The event as JSON, or @file")] = "{}",
    logs: Annotated[bool, typer.Option("--logs", help="Also print the invocation's logs")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Invoke a function and print what it returned."""
    body = Path(payload[1:]).read_bytes() if payload.startswith("@") else payload.encode()
    client = _client(url, key)
    response = _run(lambda: client.invoke(name, body))
    request_id = response.headers["x-request-id"]
    if logs:
        record = _run(lambda: client.request("GET", f"/v1/invocations/{request_id}")).json()
        errors.print(record["logs"], end="", markup=False, highlight=False)
    sys.stdout.write(response.text + "\n")
    if response.headers.get("x-function-error"):
        errors.print(f"[red]function error[/red] (request {request_id})")
        raise typer.Exit(2)


@invocations_cli.command("get")
def invocations_get(request_id: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """Show one invocation, with its logs."""
    record = _run(lambda: _client(url, key).request("GET", f"/v1/invocations/{request_id}")).json()
    logs = record.pop("logs")
    _print_json(record)
    console.print(logs, markup=False, highlight=False)


@invocations_cli.command("list")
def invocations_list(name: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """A function's recent invocations."""
    body = _run(lambda: _client(url, key).request("GET", f"/v1/functions/{name}/invocations"))
    table = Table("request id", "status", "cold", "duration ms", "billed ms", "memory used")
    for inv in body.json()["invocations"]:
        table.add_row(
            inv["request_id"],
            inv["status"],
            "yes" if inv["cold_start"] else "",
            f"{inv['duration_ms']:.2f}",
            str(inv["billed_duration_ms"]),
            f"{inv['max_memory_used_mb']} MB",
        )
    console.print(table)


@cli.command()
def usage(
    start: Annotated[str | None, typer.Option(help="ISO time, default month start")] = None,
    end: Annotated[str | None, typer.Option(help="ISO time, default now")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Requests, billed milliseconds and GB-seconds per function."""
    params = {k: v for k, v in (("start", start), ("end", end)) if v}
    body = _run(lambda: _client(url, key).request("GET", "/v1/usage", params=params)).json()
    table = Table("function", "requests", "billed ms", "GB-seconds")
    for row in [*body["functions"], {"function": "total", **body["total"]}]:
        table.add_row(
            row["function"], str(row["requests"]), str(row["billed_ms"]), f"{row['gb_seconds']:.6f}"
        )
    console.print(f"usage from {body['start']} to {body['end']}")
    console.print(table)


def main() -> None:
    cli()
