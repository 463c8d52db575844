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

size:           ## the reading budget of gateway.py (code, commentary, lengths)
	$(PYTHON) .ci/size.py gateway.py

clean:
	rm -rf $(VENV) $(IVENV) $(AVENV) .pytest_cache __pycache__ interop/.pytest_cache interop/__pycache__ interop/reports

# Benchmark beside the peers (bench/README.md): uvicorn, hypercorn, gunicorn, waitress,
# wsgiref, each one process on loopback, driven by wrk. Needs wrk (run.py apt-installs it).
BVENV := .venv-bench
BPY := $(BVENV)/bin/python

.PHONY: bench bench-quick

$(BVENV)/.installed: bench/requirements.txt
	test -x $(BPY) || $(PYTHON) -m venv $(BVENV)
	$(BPY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(BVENV)/.installed        ## gateway vs its peers, every workload, no-log and defaults tables (~11 minutes)
	$(BPY) bench/run.py

bench-quick: $(BVENV)/.installed  ## hello + echo 1 KiB, gateway vs uvicorn/gunicorn/waitress, and defaults (~60 s)
	$(BPY) bench/run.py --quick

# The Autobahn|Testsuite fuzzing client against gateway (interop/README.md): opt-in, not in
# .ci/run, as the whole suite takes ~10 minutes. wstest is Python 2.7 only, so
# .venv-autobahn is a Python 3 venv holding virtualenv (the last release that makes 2.7
# environments), and .venv-autobahn/py27 the 2.7 one holding wstest. PYTHON2 defaults to a
# pyenv 2.7; AUTOBAHN_CASES="'1.*' '12.1.*'" runs a subset.
AVENV := .venv-autobahn
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON2 ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/2.7*/bin/python2.7) python2.7)

.PHONY: autobahn

$(AVENV)/.installed: interop/autobahn-requirements.txt
	@$(PYTHON2) -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null || \
	  { echo "make autobahn needs Python 2.7 (wstest is Python 2 only): PYTHON2=/path/to/python2.7"; exit 1; }
	test -x $(AVENV)/bin/python || $(PYTHON) -m venv $(AVENV)
	$(AVENV)/bin/python -m pip install --quiet --disable-pip-version-check virtualenv==20.21.1
	test -x $(AVENV)/py27/bin/python || $(AVENV)/bin/virtualenv --quiet -p $(PYTHON2) $(AVENV)/py27
	$(AVENV)/py27/bin/pip install --quiet --disable-pip-version-check --no-python-version-warning -r interop/autobahn-requirements.txt
	touch $@

autobahn: $(AVENV)/.installed   ## Autobahn|Testsuite, every case, against gateway (~14 minutes)
	$(PYTHON) interop/autobahn.py --wstest $(AVENV)/py27/bin/wstest $(if $(AUTOBAHN_CASES),--cases $(AUTOBAHN_CASES))

# Fault run (bench/README.md "chaos"): well-behaved and misbehaving clients at once against
# each interface for CHAOS_SECONDS (default 300); fails if the server dies, a well-behaved
# request goes unanswered, fds/threads leak or SIGTERM does not end it cleanly. Standard
# library only, so the system python3; not part of `make test` nor .ci/run.
CHAOS_SECONDS ?= 300
CHAOS_ARGS ?=

.PHONY: chaos

chaos:          ## fault run, WSGI then ASGI (2 x ~5.5 minutes); CHAOS_SECONDS=60 for a short one
	status=0; \
	for interface in wsgi asgi; do \
	  python3 bench/chaos.py --interface $$interface --seconds $(CHAOS_SECONDS) $(CHAOS_ARGS) || status=1; \
	done; exit $$status
