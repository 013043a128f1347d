# The two commands of README.md: `make demo` (examples → images) and `make test`.
# Both set up .venv first; setup reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this kind of machine; on a GPU box use e.g. `make TORCH=torch setup`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := demo

.PHONY: setup demo serve test test-cluster test-systemd soak lint typecheck clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# Fresh spool in demo/, tiny test models, the example jobs in its inbox, one pass of the daemon.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/diffusiond make-test-model $(DEMO)/models/test
	mkdir -p $(DEMO)/inbox
	cp -R examples/inbox/. $(DEMO)/inbox/
	$(BIN)/diffusiond run --config examples/config.yaml --oneshot
	@echo
	@echo "Results (the test model's weights are random: the images are noise):"
	@ls -1 $(DEMO)/outbox | sed 's#^#  $(DEMO)/outbox/#'
	@echo "Inputs archived in $(DEMO)/archive/, rejects with their reports in $(DEMO)/failed/."

# The daemon on the demo spool until Ctrl-C; try `diffusiond submit ... --wait` beside it.
serve: setup
	test -d $(DEMO)/models/test || $(BIN)/diffusiond make-test-model $(DEMO)/models/test
	$(BIN)/diffusiond run --config examples/config.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# diffusiond on a real local Ray cluster (head + nodes on 127.0.0.1, the `cluster` extra): node loss,
# a frozen node, drain; about 3 minutes on 2 cores.
test-cluster: setup
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cluster]'
	$(BIN)/python -m pytest -q -m "cluster or not cluster" tests/test_cluster.py tests/test_systemd_unit.py -k "cluster or ray"

# The service under a real systemd (PID 1 of a throwaway nspawn container): root and systemd-nspawn,
# about 2.5 minutes; it prints "skipped: ..." and succeeds where it cannot run. See tests/systemd/README.md.
test-systemd:
	TORCH="$(TORCH)" tests/systemd/run.sh

# The crash and race tests, longer: 1,000 randomized kill -9s over streams of jobs (about 15 minutes on 2 cores).
soak: setup
	DIFFUSIOND_SOAK_KILLS=1000 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fault_points.py \
		tests/test_shared_spool.py -k "randomized or 500 or race"

lint: setup typecheck
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# mypy on the package by its installed names: daemon/ and pipeline/ are diffusiond.daemon and
# diffusiond.pipeline only through pyproject's package-dir mapping, which mypy cannot see, so it
# reads them through a tree of links under build/typecheck.
TYPECHECK := build/typecheck
typecheck: setup
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/diffusiond
	@for f in diffusiond/*.py; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/diffusiond/; done
	@ln -s "$(CURDIR)/daemon" $(TYPECHECK)/diffusiond/daemon && ln -s "$(CURDIR)/pipeline" $(TYPECHECK)/diffusiond/pipeline
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p diffusiond

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache .mypy_cache $(TYPECHECK)

# A system service under /opt/diffusiond (README.md, "Running as a service"); run as root.
# e.g. `sudo make install INSTALL_ARGS="--gpus 0,1"`; the CUDA torch from PyPI unless INSTALL_TORCH says otherwise.
INSTALL_TORCH ?= torch
INSTALL_ARGS ?=
.PHONY: install uninstall
install:
	TORCH="$(INSTALL_TORCH)" systemd/install.sh $(INSTALL_ARGS)

uninstall:
	systemd/install.sh --uninstall $(INSTALL_ARGS)
