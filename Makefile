# The two commands of the quick start: `make demo` and `make test`; `make results` regenerates the shipped
# model's pages (docs/results.md and the files it gathers) on a quiet machine (about 50 minutes on 2 cores).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test results install clean

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

results: demo
	$(PY) benchmarks/quality.py --work /tmp/quality
	$(PY) benchmarks/ablation_inference.py --work /tmp/ablation_inference
	$(PY) benchmarks/speed_vs_hovernet.py --threads 1 --compile
	$(PY) benchmarks/bench_linear.py
	$(PY) benchmarks/bench_slide.py
	$(PY) benchmarks/results_page.py --demo_dir demo_output

clean:
	rm -rf demo_output .pytest_cache
