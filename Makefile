# The two commands of the quick start: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $(STAMP)

install: $(STAMP)

# Runs the main job of the bundle on its shipped sample tiles; outputs go to demo_output/.
demo: $(STAMP)
	cd bundle && ../$(PY) -m scripts.demo --output_dir ../demo_output

test: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest -q

clean:
	rm -rf demo_output .pytest_cache
