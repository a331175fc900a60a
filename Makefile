# loraweb: `make run` starts the product, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test demo install install-test services base-model clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Reinstall only when a requirements file changes.
$(VENV)/.installed: requirements.txt | $(PY)
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements.txt requirements-test.txt | $(PY)
	$(PIP) install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

services:
	@PYTHON=$(PY) bin/ensure-redis

base-model:
	@$(PY) manage.py prepare_base_model

run: install services
	@mkdir -p var
	$(PY) manage.py migrate --no-input
	@$(PY) manage.py prepare_base_model
	@$(PY) manage.py ensure_admin
	@echo "Starting loraweb on http://127.0.0.1:$${LORAWEB_PORT:-8000}/ (web server and Celery worker; Ctrl-C stops both)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/honcho start -f Procfile

demo: install services
	$(PY) manage.py migrate --no-input
	@$(PY) manage.py prepare_base_model
	$(PY) manage.py demo

test: install-test services
	@$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests; that is a failure here." >&2; exit 1; fi; \
	exit $$status

clean:
	rm -rf var/test
