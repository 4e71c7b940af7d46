#!/usr/bin/env bash
# The test command of README.md: install the project with its test extra, lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
ruff check .
set +e
python -m pytest -q -rs -p no:cacheprovider tests | tee /tmp/trident-pytest.log
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 5 ]; then echo "no tests ran"; exit 1; fi
if [ "$status" -ne 0 ]; then exit "$status"; fi
if [ "${CI:-}" = "true" ] && grep -E "^SKIPPED .*(test_golden|reference-golden)" /tmp/trident-pytest.log; then
  echo "the golden reference tests were skipped in CI"; exit 1
fi
