#!/usr/bin/env bash
# The test command: installs and starts what the tests need, then runs the whole suite against
# SQLite and PostgreSQL, and its behavioural tests with the Docker sandbox as well. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-system-deps.sh --test
scripts/setup-venv.sh
LAMBENT_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
export LAMBENT_TEST_POSTGRES_URL
scripts/start-docker.sh
# The Docker sandbox's images; only those missing are built (about a minute, once).
.venv/bin/lambent images build

.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
