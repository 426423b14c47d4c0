#!/usr/bin/env bash
# Installs the Debian packages Lambent needs when they are missing.
#   scripts/install-system-deps.sh          what `lambent serve` needs (bubblewrap sandboxes)
#   scripts/install-system-deps.sh --test   plus what the test suite needs (PostgreSQL,
#                                           docker-compose to check docker-compose.yml, and
#                                           for the Docker sandbox: the engine, and debootstrap
#                                           and gcc for `lambent images build`)
set -euo pipefail

packages=()
command -v bwrap >/dev/null || packages+=(bubblewrap)
command -v setpriv >/dev/null || packages+=(util-linux)
command -v curl >/dev/null || packages+=(curl)
[ -x /usr/bin/python3 ] || packages+=(python3)
if [ "${1:-}" = "--test" ]; then
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || packages+=(postgresql)
    command -v docker-compose >/dev/null || packages+=(docker-compose)
    command -v dockerd >/dev/null || packages+=(docker.io)
    command -v debootstrap >/dev/null || packages+=(debootstrap)
    command -v gcc >/dev/null || packages+=(gcc)
    # The static C library, for lambent-init.
    compgen -G "/usr/lib/*-linux-gnu/libc.a" >/dev/null || packages+=(libc6-dev)
fi

if [ ${#packages[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${packages[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "installing ${packages[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi
