# One entry point for every task. Each target creates the virtual environment and installs the
# project when needed; the venv is cached in .venv and rebuilt when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN_DIR := clients
# The buf CLI, pinned in tools/buf/package-lock.json and installed from the npm registry by `npm ci`.
BUF_DIR := tools/buf
BUF     := $(BUF_DIR)/node_modules/.bin/buf
BUF_STAMP := $(BUF_DIR)/node_modules/.installed
API_SNAPSHOT := protos/api-snapshot.binpb
# Where the alerts' runbook_url annotations point: the published docs/runbook.md; each alert appends its
# `#anchor`. Default: the runbook in the repository on GitHub. Deploy with your own copy, e.g.
#   make alerts RUNBOOK_URL=https://git.example.com/ml/tabserve/-/blob/main/docs/runbook.md ALERTS_OUT=build/alerts
RUNBOOK_URL ?= https://github.com/tabserve/tabserve/blob/main/docs/runbook.md
ALERTS_OUT ?= monitor/alerts

.PHONY: venv run test lint image image-test protos protos-check buf buf-check protos-snapshot alerts alerts-check demo demo-model bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## protos: regenerate Python code from protos/ into clients/tabserve (generated only, never edited)
protos: $(STAMP)
	$(PY) tools/gen_protos.py --out $(GEN_DIR)

## protos-check: fail when the checked-in generated code is stale
protos-check: $(STAMP)
	$(PY) tools/gen_protos.py --out $(GEN_DIR) --check

## buf: install the pinned buf CLI into tools/buf/node_modules (--ignore-scripts: the package's bin finds
## its platform binary without the postinstall step)
buf: $(BUF_STAMP)

$(BUF_STAMP): $(BUF_DIR)/package.json $(BUF_DIR)/package-lock.json
	npm ci --prefix $(BUF_DIR) --ignore-scripts --no-audit --no-fund
	@touch $(BUF_STAMP)

## buf-check: buf lint of protos/, and buf breaking against the reviewed public-API snapshot
buf-check: $(BUF_STAMP)
	$(BUF) lint protos
	$(BUF) breaking protos --against $(API_SNAPSHOT)

## protos-snapshot: the deliberate, reviewed step that records protos/ as the public API buf-check guards
protos-snapshot: $(BUF_STAMP)
	$(BUF) lint protos
	$(BUF) build protos --exclude-source-info -o $(API_SNAPSHOT)

## alerts: write the alert rules and their promtool tests with runbook_url = $(RUNBOOK_URL)#<alert> to $(ALERTS_OUT), and
## the same rules as a PrometheusRule to deploy/base/prometheusrule.yaml ($(ALERTS_OUT)/prometheusrule.yaml when set)
alerts: $(STAMP)
	$(PY) tools/gen_alert_rules.py --runbook-url '$(RUNBOOK_URL)' --out '$(ALERTS_OUT)'

## alerts-check: fail when monitor/alerts or deploy/base/prometheusrule.yaml was not written with the default RUNBOOK_URL
alerts-check: $(STAMP)
	$(PY) tools/gen_alert_rules.py --runbook-url '$(RUNBOOK_URL)' --check

lint: $(STAMP)
	$(PY) -m ruff check common server clients monitor demo admin tests tools bench imagetest
	$(PY) -m mypy

test: $(STAMP) protos-check buf-check alerts-check lint
	$(PY) -m pytest tests

## run: embedded default: local SQLite registry + demo model under $(DATA)/, server in the foreground;
## the first run trains and registers the demo model first (about 20 s, with progress lines)
run: $(STAMP)
	$(PY) -m tabserve_demo.embedded --data-dir $(DATA)

## demo: scripted tour in a fresh temporary registry: score, explain a decline, promote a version and watch the
## switch, promote a broken one and watch it refused while the good one keeps serving, verify the decision log,
## end with `tabserve-admin registry check` (--deep finds the broken version, as expected); exits 0 when all held
demo: $(STAMP)
	$(PY) -m tabserve_demo.tour

## bench: the benchmark (not part of test): compute limit, reference servicer, this server, reloads under
## load, the monitor's poll cost; prints a table and writes bench/results.json (about 15 minutes)
bench: $(STAMP)
	$(PY) -m bench --out bench/results.json

## demo-model: train and register another demo model version and move the production alias to it
demo-model: $(STAMP)
	$(PY) -m tabserve_demo.new_version --data-dir $(DATA) --set-alias production

## image: build localhost/tabserve:latest with podman (as root; Debian's mmdebstrap, podman and runc are installed
## when missing): a Debian base from mmdebstrap, the project's wheels built here and installed offline
## (tools/image.py; about 6 min the first time, see the README)
image: $(STAMP)
	$(PY) -m tools.image

## image-test: play deploy/'s Deployment on that image with podman kube play, end to end on loopback (not part of
## test: root and minutes)
image-test: $(STAMP)
	CONTAINERS_CONF=$(CURDIR)/container/containers.conf $(PY) -m pytest imagetest -p no:cacheprovider -s

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
