# Two commands for a fresh Linux machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
TORCH  ?= 2.13.0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The Blender side: Blender 4.2 LTS as a Python module (the `bpy` wheel needs exactly Python 3.11).
# numpy<2: bpy 4.2's compiled modules are built against numpy 1.x.
BVENV  ?= .venv-blender
BPY    := $(BVENV)/bin/python
BSTAMP := $(BVENV)/.installed
BPY_PIN ?= bpy==4.2.0
ADDON_ZIP := dist/sam3d_blender.zip

.PHONY: install install-blender lock demo demo-blend addon test test-main test-blender lint format bench-stage1 clean

# constraints*.txt: the versions the quick start was last tested with, so that a new release of some dependency's
# dependency cannot break a fresh install (transformers 5.25 once did); `make lock` rebuilds them.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone, at the pinned version (a local CPU wheel where one exists); no silent fallback
	$(PY) -m pip install -q "torch==$(TORCH)" || { echo "could not install torch==$(TORCH); \
	set TORCH=<version> (make TORCH=2.5.1 ...) to use another, at your own risk" >&2; exit 1; }
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(BSTAMP): constraints-blender.txt
	$(PYTHON) -m venv $(BVENV)
	echo '*' > $(BVENV)/.gitignore
	$(BPY) -m pip install -q --upgrade pip
	$(BPY) -m pip install -q -c constraints-blender.txt "$(BPY_PIN)" "numpy<2" "pytest>=8" "trimesh>=4"
	touch $(BSTAMP)

# Rebuild constraints*.txt from fresh environments with the newest releases (then run `make test` on them).
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv $$tmp/main; $$tmp/main/bin/pip install -q "torch==$(TORCH)"; \
	$$tmp/main/bin/pip install -q -e ".[dev]"; \
	{ echo "# The versions \`make install\` was last tested with (pip constraints: they pin a version only where a package is"; \
	  echo "# installed at all). torch is pinned by the Makefile's TORCH. Rebuild with \`make lock\` after a dependency change."; \
	  $$tmp/main/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|sam3d)' | sort -f; } > constraints.txt.tmp; \
	$(PYTHON) -m venv $$tmp/blender; $$tmp/blender/bin/pip install -q "$(BPY_PIN)" "numpy<2" "pytest>=8" "trimesh>=4"; \
	{ echo "# The Blender test environment's tested versions (see constraints.txt); rebuilt by \`make lock\`."; \
	  $$tmp/blender/bin/pip freeze | sort -f; } > constraints-blender.txt.tmp; \
	mv constraints.txt.tmp constraints.txt; mv constraints-blender.txt.tmp constraints-blender.txt

install: $(STAMP)

install-blender: $(BSTAMP)

# The main job on the bundled example: photo -> placed, textured object (GLB, scene GLB, scene.json, mask IoU),
# then the .blend (matched camera, photo, placed objects) and its Cycles render composited over the photo.
demo: $(STAMP) $(BSTAMP)
	$(PY) -m sam3d_core.cli demo --out demo_out --overwrite  # replaces only our earlier demo_out results
	$(MAKE) demo-blend

# demo_out/scene.json (from `make demo`) -> demo_out/scene.blend + demo_out/render.png: the matched camera,
# the photo and the placed objects, rendered with Cycles over the photo. --photo/--mask only serve older
# scene.json files that name none.
demo-blend: $(BSTAMP)
	$(BPY) addon/build.py vendor
	PYTHONPATH=addon $(BPY) -m sam3d_blender.demo_scene demo_out/scene.json --blend demo_out/scene.blend \
		--render demo_out/render.png --photo assets/examples/armchair.png --mask assets/examples/armchair_mask.png

# The installable extension zip (manifest next to the add-on's __init__.py), validated by Blender's own checker.
addon: $(BSTAMP)
	$(BPY) addon/build.py zip --out $(ADDON_ZIP) --validate

test: lint test-main test-blender

test-main: $(STAMP)
	$(PY) -m pytest -q tests

# The Blender suite runs in .venv-blender (bpy, no torch); the worker it starts runs in .venv.
# --confcutdir: tests/conftest.py imports torch and is not for this suite.
test-blender: $(STAMP) $(BSTAMP)
	SAM3D_PYTHON=$(abspath $(PY)) $(BPY) -m pytest -q --confcutdir=tests/blender tests/blender

LINTED := sam3d_core sam3d_kernels tests bench addon

# Checks only: it never rewrites a file. `make format` applies the fixes.
lint: $(STAMP)
	$(VENV)/bin/ruff check --no-fix $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINTED)
	$(VENV)/bin/ruff format $(LINTED)

bench-stage1: $(STAMP)
	$(PY) bench/stage1.py

clean:
	rm -rf $(VENV) $(BVENV) demo_out .pytest_cache build dist
