#!/usr/bin/env bash
# The run command: installs what Lambent needs, then starts it (127.0.0.1:8080 by default).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-system-deps.sh
scripts/setup-venv.sh
exec .venv/bin/lambent serve "$@"
