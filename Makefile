# craft-adapter: `make demo` runs the reference job end to end, `make test` runs the tests.
# Both work from nothing on a Debian machine where you are root (apt installs Fashion-MNIST and the DejaVu fonts).
# `make install-check` (CI) builds the wheel and installs it, from the registry, into one fresh venv per install
# kind (runtime, server, fit), then runs each kind's smoke path.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VENDOR := craft_adapter/reference/vendor/open_clip_model.safetensors

.PHONY: demo test install-check lint setup data vendor clean

demo: setup data vendor
	$(BIN)/craft-adapter demo

test: setup data
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

install-check: setup data
	$(BIN)/python -m pytest -q -p no:cacheprovider -m install tests/install

lint: setup
	$(BIN)/ruff check .

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned versions (on these machines they come from local disk)
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	# one onnxruntime build only: the CPU and GPU builds write the same files (a venv from an older setup had the GPU one)
	$(BIN)/pip uninstall -q -y onnxruntime-gpu 2>/dev/null || true
	# the development venv is every install kind at once: runtime, server, fit, plus the dev tools
	$(BIN)/pip install -q -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

# Fashion-MNIST (the reference task) and the DejaVu fonts (the letter tasks of the benchmark suite, benchmarks/suite)
APT_DATA := dataset-fashion-mnist fonts-dejavu-core fonts-dejavu-extra
data:
	@dpkg -s $(APT_DATA) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_DATA); }

# The reference vendor is committed; this rebuilds it only when it is missing (about 7 minutes on 2 cores).
vendor: $(VENDOR)
$(VENDOR): | setup data
	$(BIN)/python benchmarks/train_reference_vendor.py --out craft_adapter/reference/vendor

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
