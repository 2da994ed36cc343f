#!/usr/bin/env bash
# Installs the external FHIR R4 validators the corpus tests use (tests only; users need none):
#   python: fhir.resources==6.4.0 with pydantic<2 (FHIR R4 4.0.1 models)
#   npm:    fhir@4.12.0 (into scripts/node_modules)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m pip install --quiet 'fhir.resources==6.4.0' 'pydantic<2'
(cd "$here" && npm install --silent --no-audit --no-fund fhir@4.12.0)
