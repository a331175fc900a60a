# loraweb: `make run` starts the product, `make test` runs the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test demo install install-test services browser base-model clean

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

# The browser tests drive Debian's Chromium, and their Chinese screenshots need a CJK font;
# install what is missing when we are root.
BROWSER_PACKAGES := chromium fonts-noto-cjk
browser:
	@if [ ! -x /usr/bin/chromium ] || ! fc-list :lang=zh 2>/dev/null | grep -q .; then \
	  if [ "$$(id -u)" -eq 0 ]; then \
	    apt-get install -y $(BROWSER_PACKAGES) || { apt-get update && apt-get install -y $(BROWSER_PACKAGES); }; \
	  elif [ ! -x /usr/bin/chromium ]; then \
	    echo "The browser tests need Debian's Chromium at /usr/bin/chromium; install it with: sudo apt-get install -y $(BROWSER_PACKAGES)" >&2; \
	    exit 1; \
	  else \
	    echo "No Chinese font is installed, so Chinese screenshots show boxes; install one with: sudo apt-get install -y fonts-noto-cjk" >&2; \
	  fi; \
	fi

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

test: install-test services browser
	@$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests; that is a failure here." >&2; exit 1; fi; \
	exit $$status

clean:
	rm -rf var/test
