# The two set-up commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow install clean bench bench-quick bench-gpu reliability soak

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/onestep demo --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(VENV)/bin/onestep bench --out benchmarks/results/latency_cpu

bench-quick: $(VENV)/.installed
	$(VENV)/bin/onestep bench --quick --out runs/latency_quick

bench-gpu: $(VENV)/.installed
	$(VENV)/bin/onestep bench --device cuda --out benchmarks/results/latency_gpu

reliability: $(VENV)/.installed runs/demo/model_repository
	$(PY) -m benchmarks.reliability --repo runs/demo/model_repository --model fmnist_student --seconds 20 \
		--limit 8 --out benchmarks/results/reliability

soak: $(VENV)/.installed runs/demo/model_repository
	$(PY) -m benchmarks.soak --repo runs/demo/model_repository --model fmnist_student --minutes 10 --limit 8 \
		--out benchmarks/results/soak

runs/demo/model_repository:
	$(VENV)/bin/onestep demo --out runs/demo

clean:
	rm -rf runs/demo .cache/test
