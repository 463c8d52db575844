# gateway - make targets. `make test` needs only Python: it builds .venv itself.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: run run-wsgi test clean size

run:            ## the ASGI echo app on http://127.0.0.1:8000
	$(PYTHON) gateway.py --asgi echo_asgi:app

run-wsgi:       ## the WSGI echo app on http://127.0.0.1:8000
	$(PYTHON) gateway.py --wsgi echo_wsgi:application

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check pytest

test: $(VPY)    ## the test suite (pytest, real sockets on loopback)
	$(VPY) -m pytest -q

size:           ## the line budget of gateway.py
	wc -l gateway.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
