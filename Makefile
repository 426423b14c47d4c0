.PHONY: run test bench lint format

run:  ## install what is missing, then start Lambent on 127.0.0.1:8080
	scripts/run.sh

test:  ## install and start what the tests need, then run them all
	scripts/test.sh

bench:  ## run the benchmarks in bench/ beside their baselines
	scripts/setup-venv.sh
	.venv/bin/python bench/run.py
	.venv/bin/python bench/scheduler.py
	.venv/bin/python bench/metering.py
	.venv/bin/python bench/docker_sandbox.py

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
