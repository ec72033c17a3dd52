# freqdiff: the two commands a newcomer runs are `make exp` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?=
FID ?=
ARGS ?=
DRY ?=
PYTEST_ARGS ?=

MATRIX ?= quickstart
LAUNCHER ?= local

.PHONY: help install exp matrix compare test test-all bench board lint format clean-runs

help:  ## the targets, one line each
	@echo "make exp [FID=1]                                  the default: five methods compared (runs/quickstart/compare/)"
	@echo "make exp EXP=name|path.yaml [ARGS=\"k=v ...\"] [RUN=runs/<exp>/<name>]  train (or resume) one experiment"
	@echo "make matrix [MATRIX=quickstart] [LAUNCHER=local] [FID=1] [ARGS=...]  every cell of experiments/matrices/<MATRIX>.yaml (done cells skipped)"
	@echo "make compare [RUNS=runs/quickstart]                  the runs under RUNS compared: RUNS/compare/report.md, table.csv, PNGs"
	@echo "make test / make test-all                         the fast suite / every test (slow, DDP, fault injection)"
	@echo "make bench                                        side-by-side benchmarks (ratios)"
	@echo "make shards SRC=folder OUT=folder RES=64,256 [VAL=1000|0.05] ...  image folder -> WebDataset shards (VAL: + held-out val split)"
	@echo "make sample RUN=... [N=50000]                      EMA samples of a trained run, resumable chunks"
	@echo "make eval RUN=... [N=] [REF=]                      its metrics with spreads and floors (default: as in training)"
	@echo "make spectra EXP=name | RUN=...                   data spectra, per-frequency SNR, chromatography (PNG + TensorBoard)"
	@echo "make board [LOGDIR=runs] [PORT=6006]              TensorBoard on 127.0.0.1"
	@echo "make submit EXP=name [NODES= GPUS= TIME= PARTITION= ... DRY=1]   Slurm jobs (docs/cluster.md)"
	@echo "make status [RUN=runs/<exp>/<name> | MATRIX=name]  the Slurm jobs of a run or a matrix"
	@echo "make test-slurm                                   the slurm tests on a local single-node Slurm"
	@echo "make lint / make format                           ruff"

# Install once: torch==2.13.0 first (a local CPU wheel here), then the project with the same pin as a
# constraint so that no dependency can pull another torch. Re-runs when pyproject.toml or constraints.txt change.
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	$(PY) -c "import freqdiff._torchvision_compat as m; m.write_pth()"
	@touch $(STAMP)

# make exp: the default comparison (matrix experiments/matrices/quickstart.yaml: five methods on the
# embedded data, then runs/quickstart/compare/); FID=1 adds FID. make exp EXP=name [ARGS="key=value ..."]:
# one experiment; make exp RUN=runs/<exp>/<name> [ARGS=...] resumes that run from its saved config
# (only the resumable keys, e.g. trainer.max_steps, may be given).
exp: install
ifeq ($(EXP)$(RUN),)
	$(PY) -m experiments.matrix quickstart --launcher local $(if $(filter 1,$(FID)),--fid) $(ARGS)
else
	DRY=$(DRY) $(PY) -m experiments $(if $(RUN),resume "$(RUN)",run $(EXP)) $(ARGS)
endif

# Slurm (docs/cluster.md): make submit EXP=name [NODES= GPUS= TASKS= PARTITION= TIME=minutes ACCOUNT= QOS=
# CPUS= MEM=GB CONSTRAINT=] [ARGS="key=value ..."] [DRY=1: print the sbatch scripts]; make status RUN=|MATRIX=
SLURM_ARGS = $(if $(NODES),cluster.nodes=$(NODES)) $(if $(GPUS),cluster.gpus_per_node=$(GPUS)) \
	$(if $(TASKS),cluster.tasks_per_node=$(TASKS)) $(if $(PARTITION),cluster.partition=$(PARTITION)) \
	$(if $(TIME),cluster.time_min=$(TIME)) $(if $(ACCOUNT),cluster.account=$(ACCOUNT)) \
	$(if $(QOS),cluster.qos=$(QOS)) $(if $(CPUS),cluster.cpus_per_task=$(CPUS)) \
	$(if $(MEM),cluster.mem_gb=$(MEM)) $(if $(CONSTRAINT),cluster.constraint=$(CONSTRAINT))
.PHONY: submit status test-slurm slurm-up slurm-down
submit: install
	@test -n "$(EXP)" || { echo "make submit EXP=<experiment> [NODES= GPUS= ...]"; exit 2; }
	DRY=$(DRY) $(PY) -m experiments submit $(EXP) $(SLURM_ARGS) $(ARGS)

status: install
	$(PY) -m experiments status "$(or $(RUN),$(if $(MATRIX),runs/$(MATRIX)),runs)"

# The slurm tests on a single-node Slurm of this machine (scripts/local_slurm.sh; needs root and apt)
test-slurm: install
	scripts/local_slurm.sh install && scripts/local_slurm.sh start
	SLURM_CONF=$${FREQDIFF_SLURM_DIR:-/tmp/freqdiff-slurm}/slurm.conf $(PY) -m pytest -q -m slurm $(PYTEST_ARGS)

slurm-up:
	scripts/local_slurm.sh install && scripts/local_slurm.sh start

slurm-down:
	scripts/local_slurm.sh stop

# make matrix MATRIX=name|path.yaml [LAUNCHER=local] [ARGS="key=value ..." given to every cell]
matrix: install
	$(PY) -m experiments.matrix "$(MATRIX)" --launcher $(LAUNCHER) $(if $(filter 1,$(FID)),--fid) $(ARGS)

# make compare [RUNS=runs/quickstart]: <RUNS>/compare/report.md, table.csv and plots over its run folders
RUNS ?= runs/quickstart
compare: install
	$(PY) -m experiments.compare "$(RUNS)"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks

# make board [LOGDIR=runs] [PORT=6006]: TensorBoard on 127.0.0.1 over the runs under LOGDIR
LOGDIR ?= runs
PORT ?= 6006
board: install
	$(PY) -m experiments.board_layout "$(LOGDIR)" --port $(PORT)
	$(VENV)/bin/tensorboard --logdir "$(LOGDIR)" --host 127.0.0.1 --port $(PORT)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Image folder -> WebDataset shards + manifest (README "Datasets"; python -m datamodules.write_shards -h):
#   make shards SRC=/data/ffhq OUT=data/ffhq RES=64,256 [LABELS=folders] [FILTER=lanczos] [ALLOW_UPSCALE=1]
#               [WORKERS=8] [FORCE=1] [VAL=1000 | VAL=0.05] [VAL_SEED=0] [ENCODING=raw|png]
# ENCODING=png stores PNGs (2.5x smaller at 256², about 3x slower to load) instead of raw arrays.
# VAL holds out a seeded random count / fraction of the images: OUT/train/ and OUT/val/, one shard set each.
.PHONY: shards
shards: install
	$(PY) -m datamodules.write_shards "$(SRC)" "$(OUT)" --res "$(RES)" --labels $(or $(LABELS),none) \
		--filter $(or $(FILTER),lanczos) $(if $(filter 1,$(ALLOW_UPSCALE)),--allow-upscale) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(filter 1,$(FORCE)),--force) \
		$(if $(VAL),--val "$(VAL)") $(if $(VAL_SEED),--val-seed "$(VAL_SEED)") \
		$(if $(ENCODING),--encoding "$(ENCODING)")

# Standalone sampling and evaluation of a trained run (README "Evaluation"; python -m experiments sample -h):
#   make sample RUN=runs/quickstart/default N=50000 [ARGS="--format png --steps 100 --workers 2"]
#   make eval   RUN=runs/quickstart/default [N=...] [REF=shard/folder | stats.npz] [ARGS="--kid --prc"]
#   (make eval with RUN only: the run's own evaluation settings, reproducing its final_metrics.json)
RUN ?=
N ?=
REF ?=
.PHONY: sample eval
sample: install
	$(PY) -m experiments sample "$(RUN)" --n $(or $(N),50000) $(ARGS)

eval: install
	$(PY) -m experiments eval "$(RUN)" $(if $(N),--n $(N)) $(if $(REF),--ref "$(REF)") $(ARGS)

# The frequency view of an experiment or a trained run (docs/frequencies.md, "make spectra"):
#   make spectra EXP=quickstart [ARGS="k=v ..."]    data spectra, per-frequency SNR, chromatography
#   make spectra RUN=runs/quickstart/default         + sample spectra, empirical chromatography
.PHONY: spectra
spectra: install
	$(if $(RUN),$(PY) -m experiments.spectra "$(RUN)" --run $(if $(N),--n $(N)),$(PY) -m experiments.spectra "$(or $(EXP),quickstart)" $(ARGS) $(if $(N),--n $(N)))
