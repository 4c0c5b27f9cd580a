# The Harmont server. `make run` serves a demo on http://127.0.0.1:$(PORT); `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PORT

.PHONY: install run test test-postgres bench bench-dispatch bench-stream bench-plan bench-containers bench-caches bench-fleet bench-logs migrate clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) manage.py migrate --noinput

# Installs, migrates, seeds the demo, and serves in the foreground until Ctrl-C.
run: install
	$(PY) -m harmont.run

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-postgres: install
	DATABASE_URL=$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/harmont} $(PY) -m pytest -q $(PYTEST_ARGS)

# Benchmarks on a scratch PostgreSQL database; each prints ratios against a baseline of the same run.
bench: install
	$(PY) bench/api_bench.py

bench-dispatch: install
	$(PY) bench/dispatch_bench.py

# The dispatch bench again beside 1,000 simulated idle agents long-polling the server.
bench-fleet: install
	$(PY) bench/dispatch_bench.py --idle-fleet 1000

bench-stream: install
	$(PY) bench/stream_bench.py

bench-plan: install
	$(PY) bench/plan_bench.py

# Needs podman (or --engine docker), runc and busybox-static; runs as the user the engine serves.
bench-containers: install
	$(PY) bench/bench_containers.py

bench-caches: install
	$(PY) bench/bench_caches.py

bench-logs: install
	$(PY) bench/bench_logs.py

clean:
	rm -rf $(VENV) var db.sqlite3
