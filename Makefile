# Two commands set up a fresh machine (Python 3.11, make and a C compiler are all it needs):
#   make quickstart   # .venv, install, sample data, TFRecords, pretraining, report
#   make test         # .venv, install, the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := data/samrs_sample
TFRECORDS := data/samrs_tfrecords
WORKDIR ?= workdirs/quickstart

.PHONY: install quickstart data test lock clean

# What the quickstart runs needs the package alone; the tests also need the test extra (torch for
# the parity tests, libtpu for planning, the geo and notebook packages: about 1.5 GB more).
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/lock.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -c requirements/lock.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

$(TFRECORDS)/sota/train/dataset_info.json: $(VENV)/.installed
	$(PY) -m data_pipelines.samrs.synthetic --out $(SAMPLE) --images 48 --size 128 --seed 0
	rm -rf $(TFRECORDS)  # derived from the sample: rebuilt whole (the converter refuses foreign folders)
	$(PY) -m data_pipelines.samrs.convert --root $(SAMPLE) --subset all --split all --out $(TFRECORDS)

data: $(TFRECORDS)/sota/train/dataset_info.json

quickstart: data
	$(PY) main.py --config configs/pretrain/quickstart.py --workdir $(WORKDIR)

# Two pytest workers (pytest-xdist), each test file kept on one worker so that its module fixtures
# are built once: the suite is mostly single-threaded XLA compiles, so 2 cores run it ~2x faster.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lock: $(VENV)/.installed-test
	head -n 2 requirements/lock.txt > requirements/lock.txt.new
	$(PY) -m pip freeze --exclude-editable | grep -v '^mtp.jax' >> requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt

clean:
	rm -rf $(SAMPLE) $(TFRECORDS) workdirs
