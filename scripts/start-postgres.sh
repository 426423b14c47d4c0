#!/usr/bin/env bash
# Starts the local PostgreSQL cluster and makes sure the test role exists.
# Prints the URL the tests use.
set -euo pipefail

version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -q "^$version main$"; then
    pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true  # stdout carries only the URL
for _ in $(seq 100); do
    pg_isready -q -h 127.0.0.1 && break
    sleep 0.1
done
pg_isready -q -h 127.0.0.1 || { echo "PostgreSQL did not start" >&2; exit 1; }

runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'lambent_test') THEN
        CREATE ROLE lambent_test LOGIN CREATEDB PASSWORD 'lambent_test';
    END IF;
END $$;
SQL
echo "postgresql://lambent_test:lambent_test@127.0.0.1:5432/postgres"
