#!/usr/bin/env python3
"""Baseline for docs/perf/mapping.md: PyPI hl7v2-fhir-bridge `convert` in-process (parse + map +
json.dumps), the same work our criterion bench measures, on the same corpus files.
Needs its own venv (it pins pydantic 2 / fhir.resources 8, which clash with the validators):
  python3 -m venv /tmp/bridge-venv && /tmp/bridge-venv/bin/pip install hl7v2-fhir-bridge
  /tmp/bridge-venv/bin/python scripts/perf/bridge_convert.py FILE [FILE...]
Prints msgs/s per file (wall clock and process CPU), validation off (as in our bench)."""
import json, sys, time
from datetime import datetime, timezone
from v2fhir.__main__ import _config
from v2fhir.convert import convert
from v2fhir.hl7.parser import parse_bytes

cfg = _config(None)
now = datetime(2026, 11, 23, tzinfo=timezone.utc)
for path in sys.argv[1:]:
    raw = open(path, "rb").read()
    try:
        json.dumps(convert(parse_bytes(raw, cfg.default_charset, cfg.fallback_charsets), cfg, now).bundle)
    except Exception as e:  # noqa: BLE001
        print(f"{path}: not converted ({type(e).__name__}: {e})")
        continue
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < 3.0:
        json.dumps(convert(parse_bytes(raw, cfg.default_charset, cfg.fallback_charsets), cfg, now).bundle)
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{path}: {n / wall:.0f} msgs/s wall, {n / cpu:.0f} msgs/s per CPU-second ({n} runs)")
