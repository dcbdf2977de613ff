# The two commands of the README:  `make demo` (the main job) and `make test` (the whole suite).
# Both create ./.venv and install what they need. torch is pinned to the CPU wheel this project is developed
# on; GPU users override it, e.g.  make test AEM_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
AEM_TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Two pytest-xdist workers (the development VM has 2 cores), a test file on one worker (conftest.py keeps
# python_tests/distributed/ together too); PYTEST_XDIST= runs in one process.
PYTEST_XDIST ?= -n 2 --dist loadfile
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The second leg of `make test`: the Triton checks under the oldest supported Triton (README "Supported
# versions"; the lent H200's image has 3.6): every Triton kernel in the interpreter, the sm_90 compiles, and
# test_versions.py, which fails unless the leg really imported that Triton (AEM_EXPECT_TRITON). Only triton
# goes into an overlay folder (pip --no-deps --target, git-ignored) that PYTHONPATH puts before the venv's
# site-packages: the leg reuses ./.venv's torch CPU wheel and everything else, costs one wheel and no
# resolver run, and cannot end up with another torch. (A venv with --system-site-packages would see the base
# Python's packages rather than ./.venv's, so it would need a torch of its own.)
OLDEST_TRITON ?= 3.6.0
OVERLAY := .triton-$(OLDEST_TRITON)
OLDEST_TRITON_TESTS := python_tests/test_versions.py python_tests/ops/test_triton_every_kernel.py \
	python_tests/ops/test_logprobs_sm90.py python_tests/ops/test_fused_linear_sm90.py
OLDEST_TRITON_RUN = PYTHONPATH="$(CURDIR)/$(OVERLAY)$${PYTHONPATH:+:$$PYTHONPATH}" \
	AEM_EXPECT_TRITON=$(OLDEST_TRITON) $(PY) -m pytest $(OLDEST_TRITON_TESTS) $(PYTEST_XDIST)

.PHONY: demo test test-oldest-triton bench venv clean

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

# The suite, then (unfiltered runs only) the same Triton checks under triton $(OLDEST_TRITON); a failure in either
# fails `make test`. pytest exits 5 when it collected no tests: fine for a filtered run (PYTEST_ARGS set), a
# failure otherwise. A filtered run leaves out the second leg; `make test-oldest-triton` runs it alone.
test: $(STAMP) $(if $(PYTEST_ARGS),,$(OVERLAY)/.installed)
	@rc=0; $(PY) -m pytest python_tests $(PYTEST_XDIST) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  if [ -n "$(PYTEST_ARGS)" ]; then echo "make test: no test matched PYTEST_ARGS='$(PYTEST_ARGS)'"; exit 0; \
	  else echo "make test: pytest collected no tests; the suite must not be empty"; exit 1; fi; \
	fi; \
	if [ -n "$(PYTEST_ARGS)" ]; then \
	  echo "make test: filtered run, the triton $(OLDEST_TRITON) leg left out (make test-oldest-triton)"; exit $$rc; \
	fi; \
	echo "make test: the Triton checks under triton $(OLDEST_TRITON)"; \
	rc2=0; $(OLDEST_TRITON_RUN) || rc2=$$?; \
	echo "make test: suite exit $$rc, triton $(OLDEST_TRITON) leg exit $$rc2"; \
	[ $$rc -eq 0 ] && [ $$rc2 -eq 0 ]

test-oldest-triton: $(STAMP) $(OVERLAY)/.installed
	$(OLDEST_TRITON_RUN)

$(OVERLAY)/.installed: | $(STAMP)
	rm -rf $(OVERLAY)
	$(PY) -m pip install --quiet --no-deps --target $(OVERLAY) triton==$(OLDEST_TRITON)
	touch $@

# Speed and peak memory against eager / torch.compile / TRL / verl (/ Liger / CCE on GPU); see bench/README.md.
#   make bench BENCH_ARGS="--profile quick"
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(OVERLAY) build *.egg-info aem_kernels/*.so
