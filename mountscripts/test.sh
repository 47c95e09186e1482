#!/usr/bin/env bash
# Install everything (the SeaweedFS test server included) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
mountscripts/setup.sh --test
exec .venv/bin/python -m pytest tests "$@"
