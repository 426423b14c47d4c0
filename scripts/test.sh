#!/usr/bin/env bash
# The test command: installs and starts what the tests need, then runs the whole suite against
# SQLite and PostgreSQL. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-system-deps.sh --test
scripts/setup-venv.sh
LAMBENT_TEST_POSTGRES_URL=$(scripts/start-postgres.sh)
export LAMBENT_TEST_POSTGRES_URL

.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
