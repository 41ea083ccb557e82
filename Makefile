# Common commands. `make demo` and `make test` create .venv first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lab notebooks bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[lab,test]'
	touch $(STAMP)

## The main job: the numbered notebooks on the embedded demo catalogue -> outputs/demo/
demo: venv
	$(BIN)/cbir run params/demo.yaml

## The whole test suite (unit tests, notebook regression tests, end-to-end tests)
test: venv
	$(BIN)/python -m pytest tests

lab: venv
	$(BIN)/jupyter lab notebooks

bench: venv
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/search.py

clean:
	rm -rf outputs/* .pytest_cache
	touch outputs/.gitkeep
