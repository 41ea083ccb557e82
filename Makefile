# Common commands. `make demo` and `make test` create .venv first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
VOILA_SETTINGS := --Voila.tornado_settings="{'websocket_max_message_size': 104857600}"

.PHONY: venv demo study test test-fast notebooks lab app bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[lab,test]'
	touch $(STAMP)

## The main job: the numbered notebooks on the embedded demo catalogue -> outputs/demo/
demo: venv
	$(BIN)/cbir run params/demo.yaml

## The study on the real catalogue: every model and baseline, the models trained on it (notebooks 09, 10), then the summary
study: venv
	$(BIN)/cbir run params/vgg16.yaml params/vgg19.yaml params/resnet50.yaml params/xception.yaml \
		params/mobilenet_v2.yaml params/efficientnet_lite0.yaml params/efficientnet_lite1.yaml \
		params/efficientnet_lite2.yaml params/color_hist.yaml params/lbp.yaml params/hog.yaml
	$(BIN)/cbir run params/finetune_mobilenet_v2.yaml params/metric_mobilenet_v2.yaml \
		params/metric_mobilenet_v2_openset.yaml params/autoencoder.yaml
	$(BIN)/cbir run params/summary.yaml

## The whole test suite: unit and end-to-end tests, then the notebooks re-executed and compared (nbval)
test: venv
	rm -rf outputs/notebooks
	$(BIN)/python -m pytest tests notebooks $(NBVAL)

## Unit tests only, without the slow ones
test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow"

## Re-execute the notebooks in place with their demo defaults (the outputs nbval compares against)
notebooks: venv
	rm -rf outputs/notebooks
	cd notebooks && for nb in [0-9][0-9]_*.ipynb; do \
		../$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; \
	done

## JupyterLab at the workspace root: notebooks/ and outputs/ (reports, tables, figures) both in reach
lab: venv
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)"

## The visual search app under Voila (http://localhost:8866)
app: venv
	$(BIN)/voila notebooks/07_visual_search.ipynb --no-browser --port 8866 $(VOILA_SETTINGS)

bench: venv
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/search.py

clean:
	rm -rf outputs/* .pytest_cache
	touch outputs/.gitkeep
