#!/usr/bin/env python3
"""Validates FHIR R4 JSON Bundles with fhir.resources==6.4.0 (pydantic<2) and the R4 regexes for
dateTime/date/instant (which fhir.resources does not enforce), then with npm fhir@4.12.0 through
scripts/validate_fhir.js. Usage: scripts/validate_fhir.py DIR_OR_FILES... ; exit 1 on any error.

Install: scripts/install-test-tools (pip 'fhir.resources==6.4.0' 'pydantic<2'; npm fhir@4.12.0 in scripts/node_modules)
"""
import json, os, re, subprocess, sys

from fhir.resources.bundle import Bundle  # R4 4.0.1 models in 6.4.0

DT = re.compile(r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?$")
DATE = re.compile(r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?$")
INSTANT = re.compile(r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$")
# element names whose type is date / dateTime / instant in the resources we produce
DATE_KEYS = {"birthDate", "expirationDate"}
# instant-typed elements, by owner resource type (Meta.lastUpdated anywhere)
INSTANT_KEYS = {("Observation", "issued"), ("DiagnosticReport", "issued"), ("Provenance", "recorded"),
                ("DocumentReference", "date"), ("Bundle", "timestamp"), ("Appointment", "start"),
                ("Appointment", "end"), ("", "lastUpdated")}
DATETIME_KEYS = {"start", "end", "authoredOn", "recorded", "receivedTime", "creation", "date"}


def check_dates(node, path, errors, rtype=""):
    if isinstance(node, dict):
        rt = node.get("resourceType", rtype)
        for k, v in node.items():
            p = f"{path}.{k}"
            if isinstance(v, str):
                if k in DATE_KEYS and not DATE.match(v):
                    errors.append(f"{p}: not an R4 date")
                elif ((rt, k) in INSTANT_KEYS or k == "lastUpdated") and not INSTANT.match(v):
                    errors.append(f"{p}: not an R4 instant")
                elif (k.endswith("DateTime") or k.endswith("Date") or k in DATETIME_KEYS) and not DT.match(v):
                    errors.append(f"{p}: not an R4 dateTime")
            else:
                check_dates(v, p, errors, rt)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_dates(v, f"{path}[{i}]", errors, rtype)


def files(args):
    for a in args:
        if os.path.isdir(a):
            for root, _, names in os.walk(a):
                for n in sorted(names):
                    if n.endswith(".json"):
                        yield os.path.join(root, n)
        else:
            yield a


def main():
    paths = list(files(sys.argv[1:]))
    bad = 0
    for f in paths:
        data = json.load(open(f))
        errors = []
        try:
            Bundle.parse_obj(data)
        except Exception as e:  # pydantic ValidationError
            errors.append("fhir.resources: " + str(e).replace("\n", " | ")[:600])
        check_dates(data, "Bundle", errors)
        if errors:
            bad += 1
            print(f"INVALID {f}")
            for e in errors:
                print(f"   {e}")
    print(f"fhir.resources + R4 date regexes: {len(paths) - bad}/{len(paths)} valid")
    here = os.path.dirname(os.path.abspath(__file__))
    node = subprocess.run(["node", os.path.join(here, "validate_fhir.js")] + paths)
    sys.exit(1 if bad or node.returncode else 0)


if __name__ == "__main__":
    main()
