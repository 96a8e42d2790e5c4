# The two commands of the README: `make demo` and `make test`. Both install
# what they need on a fresh Debian 12 machine (as root) first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench bootstrap build lint clean

bootstrap:
	@scripts/bootstrap.sh

# Recompiles the BPF objects and the cffi binding in place (editable install).
build: bootstrap
	@$(PY) -m pip install -q --no-build-isolation --no-deps -e . >.venv/build.log 2>&1 \
		|| (cat .venv/build.log; exit 1)

demo: build
	$(VENV)/bin/pyebpflb demo

lint: bootstrap
	$(VENV)/bin/ruff check src tests examples bench scripts
	$(VENV)/bin/ruff format --check src tests examples bench scripts
	$(VENV)/bin/mypy --strict src
	clang-format --dry-run -Werror $$(find csrc tests/bpf -name '*.c' -o -name '*.h')

test: build lint
	$(VENV)/bin/pytest

# Not part of `make test`: minutes of load against kube-proxy's rule sets.
# Rewrites docs/performance.md and docs/performance/*.png.
bench: build
	@$(PY) -m pip install -q --no-build-isolation -e '.[bench]' >.venv/bench.log 2>&1 \
		|| (cat .venv/bench.log; exit 1)
	$(PY) -m bench

clean:
	rm -rf build dist $(VENV) src/*.egg-info src/pyebpflb/bpf src/pyebpflb/_bpf/_libbpf*.so src/pyebpflb/_bpf/_libbpf.c
