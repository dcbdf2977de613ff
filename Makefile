# The two commands of the README:  `make demo` (the main job) and `make test` (the whole suite).
# Both create ./.venv and install what they need. torch is pinned to the CPU wheel this project is developed
# on; GPU users override it, e.g.  make test AEM_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
AEM_TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(AEM_TORCH_SPEC) numpy   # numpy first: torch's extension build imports it
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,train,bench,verl,trl]"
	touch $(STAMP)

# The main job: a worked AEM loss computation, the reference trainer's demo (GRPO vs GRPO+AEM on the household
# environment, one seed, a few minutes on 2 CPU cores; output in demo_out/), and the benchmark summary.
DEMO_OUT ?= demo_out
demo: $(STAMP)
	$(PY) -m aem_kernels.demo
	$(PY) -m aem_kernels.train demo --out $(DEMO_OUT)
	$(PY) -m bench --summary

# pytest exits 5 when it collected no tests: fine for a filtered run (PYTEST_ARGS set), a failure otherwise.
test: $(STAMP)
	@rc=0; $(PY) -m pytest python_tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  if [ -n "$(PYTEST_ARGS)" ]; then echo "make test: no test matched PYTEST_ARGS='$(PYTEST_ARGS)'"; exit 0; \
	  else echo "make test: pytest collected no tests; the suite must not be empty"; exit 1; fi; \
	fi; exit $$rc

# Speed and peak memory against eager / torch.compile / TRL / verl (/ Liger / CCE on GPU); see bench/README.md.
#   make bench BENCH_ARGS="--profile quick"
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info aem_kernels/*.so
