# gateway - make targets. `make test` needs only Python: it builds .venv itself.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
IVENV := .venv-interop
IPY := $(IVENV)/bin/python

.PHONY: run run-wsgi test interop clean size

run:            ## the ASGI echo app on http://127.0.0.1:8000
	$(PYTHON) gateway.py --asgi echo_asgi:app

run-wsgi:       ## the WSGI echo app on http://127.0.0.1:8000
	$(PYTHON) gateway.py --wsgi echo_wsgi:application

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check pytest

test: $(VPY)    ## the test suite (pytest, real sockets on loopback)
	$(VPY) -m pytest -q --ignore=interop

# The stamp is newer than requirements.txt once they are installed: a second
# `make interop` goes straight to the tests.
$(IVENV)/.installed: interop/requirements.txt
	test -x $(IPY) || $(PYTHON) -m venv $(IVENV)
	$(IPY) -m pip install --quiet --disable-pip-version-check -r interop/requirements.txt
	touch $@

interop: $(IVENV)/.installed   ## Flask, Django, Starlette, FastAPI served by gateway.py, real clients
	$(IPY) -m pytest -q interop

size:           ## the line budget of gateway.py
	wc -l gateway.py

clean:
	rm -rf $(VENV) $(IVENV) .pytest_cache __pycache__ interop/.pytest_cache interop/__pycache__

# Benchmark beside the peers (bench/README.md): uvicorn, hypercorn, gunicorn, waitress,
# wsgiref, each one process on loopback, driven by wrk. Needs wrk (run.py apt-installs it).
BVENV := .venv-bench
BPY := $(BVENV)/bin/python

.PHONY: bench bench-quick

$(BVENV)/.installed: bench/requirements.txt
	test -x $(BPY) || $(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(BVENV)/.installed        ## gateway vs its peers, every workload (< 10 minutes)
	$(BPY) bench/run.py

bench-quick: $(BVENV)/.installed  ## hello + echo 1 KiB, gateway vs uvicorn/gunicorn/waitress (~35 s)
	$(BPY) bench/run.py --quick
