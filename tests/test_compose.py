"""docker-compose.yml: a valid production deployment that keeps its secrets out of the file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / "deploy" / "lambent.env.example"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ADMIN_KEY")
# A required variable: compose refuses to start when it is unset.
REQUIRED_REFERENCE = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")
LAMBENT_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def example_secrets() -> dict[str, str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return ["docker", "compose"]
    return None


def run_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor `docker compose` is here; make test installs one")
    # A copy in an empty directory, so that no .env of the working tree is read.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    return subprocess.run(
        [*command, "-f", "docker-compose.yml", "config", "-q"],
        cwd=tmp_path,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_accepts_the_file_with_the_example_secrets(tmp_path: Path) -> None:
    result = run_config(tmp_path, example_secrets())

    assert result.returncode == 0, result.stderr


def test_compose_refuses_the_file_without_its_secrets(tmp_path: Path) -> None:
    result = run_config(tmp_path, {})

    assert result.returncode != 0
    assert "in .env" in result.stderr + result.stdout


def test_a_deployment_has_a_database_an_object_store_an_api_and_a_worker(
    services: dict[str, Any],
) -> None:
    assert {"postgres", "minio", "minio-init", "migrate", "api", "worker"} <= set(services)


def test_migrations_complete_before_the_api_starts(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["lambent", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    api_waits_for = services["api"]["depends_on"]
    assert api_waits_for["migrate"]["condition"] == "service_completed_successfully"
    assert api_waits_for["minio-init"]["condition"] == "service_completed_successfully"


def test_the_api_is_health_checked_on_healthz_and_workers_wait_for_it(
    services: dict[str, Any],
) -> None:
    check = services["api"]["healthcheck"]["test"]
    assert any(part.endswith(":8080/healthz") for part in check)
    assert services["worker"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_the_api_keeps_packages_in_s3_and_runs_no_sandboxes(services: dict[str, Any]) -> None:
    env = services["api"]["environment"]

    assert env["LAMBENT_OBJECT_STORE"] == "s3"
    assert env["LAMBENT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["LAMBENT_EMBEDDED_WORKER"] == "false"
    assert services["migrate"]["environment"]["LAMBENT_DATABASE_URL"] == env["LAMBENT_DATABASE_URL"]


def test_the_api_runs_several_processes_and_no_embedded_worker(services: dict[str, Any]) -> None:
    command = services["api"]["command"]

    assert command[:2] == ["lambent", "serve"]
    assert int(command[command.index("--workers") + 1]) > 1
    assert services["api"]["environment"]["LAMBENT_EMBEDDED_WORKER"] == "false"


def test_the_worker_runs_docker_sandboxes_for_the_api(services: dict[str, Any]) -> None:
    worker = services["worker"]
    command = worker["command"]
    env = worker["environment"]

    assert command[:2] == ["lambent", "worker"]
    assert command[command.index("--control-plane") + 1] == "http://api:8080"
    assert "--listen" in command
    assert env["LAMBENT_SANDBOX"] == "docker"
    assert "/var/run/docker.sock:/var/run/docker.sock" in worker["volumes"]
    # The engine resolves bind-mount sources on the host, so the sandbox dir must be mounted
    # at the path the worker uses.
    sandbox_dir = env["LAMBENT_SANDBOX_DIR"]
    assert f"{sandbox_dir}:{sandbox_dir}" in worker["volumes"]
    assert REQUIRED_REFERENCE.fullmatch(env["LAMBENT_WORKER_TOKEN"])
    assert REQUIRED_REFERENCE.fullmatch(services["api"]["environment"]["LAMBENT_WORKER_TOKEN"])


def test_no_secret_is_written_in_the_file(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_REFERENCE.fullmatch(str(value)), f"{name}: {key} is inline"
            if key.endswith("DATABASE_URL"):
                # Not urlsplit: the reference's ":?" would end the URL's authority there.
                userinfo = str(value).split("://", 1)[1].rpartition("@")[0]
                password = userinfo.partition(":")[2]
                assert REQUIRED_REFERENCE.fullmatch(password), f"{name}: {key} has a password"
    text = COMPOSE.read_text()
    for key, value in example_secrets().items():
        if SECRET_NAME.search(key):
            assert value not in text, key


def test_the_example_env_file_names_every_secret_the_file_needs() -> None:
    needed = set(REQUIRED_REFERENCE.findall(COMPOSE.read_text()))

    assert needed == set(example_secrets())


def test_env_files_with_real_secrets_stay_out_of_git_and_the_image() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)

    assert ignored.returncode == 0
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_lambent_services_run_the_image_built_from_deploy_dockerfile(
    services: dict[str, Any],
) -> None:
    images = {services[name]["image"] for name in LAMBENT_SERVICES}
    assert len(images) == 1
    for name in LAMBENT_SERVICES:
        assert services[name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.MULTILINE)
    assert "bubblewrap" in dockerfile
