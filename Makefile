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

interop: $(IVENV)/.installed   ## Flask and Django served by gateway.py, driven by real clients
	$(IPY) -m pytest -q interop

size:           ## the line budget of gateway.py
	wc -l gateway.py

clean:
	rm -rf $(VENV) $(IVENV) .pytest_cache __pycache__ interop/.pytest_cache interop/__pycache__
