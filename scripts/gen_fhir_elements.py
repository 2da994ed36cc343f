#!/usr/bin/env python3
"""Regenerates engine/core/data/fhir_r4_elements.tsv from the FHIR R4 (4.0.1) models of
fhir.resources==6.4.0: one line per element, `Owner<TAB>element<TAB>type<TAB>max<TAB>min`, where
max is 1 or *, and min is 1 (required), 0, or `<group>[x]` for a member of a choice of which one
is required (`occurrence[x]`: occurrenceDateTime or occurrenceString).
Run: python3 scripts/gen_fhir_elements.py > engine/core/data/fhir_r4_elements.tsv"""
import importlib, inspect, pkgutil
import fhir.resources as fr
from fhir.resources.core.fhirabstractmodel import FHIRAbstractModel

PRIMS = {"Boolean":"boolean","bool":"boolean","Integer":"integer","Decimal":"decimal","String":"string","Uri":"uri",
 "Url":"url","Canonical":"canonical","Code":"code","Id":"id","Oid":"oid","Uuid":"uuid","Markdown":"markdown",
 "Base64Binary":"base64Binary","Date":"date","DateTime":"dateTime","Instant":"instant","Time":"time",
 "PositiveInt":"positiveInt","UnsignedInt":"unsignedInt","Xhtml":"xhtml"}
rows = set()
for m in pkgutil.iter_modules(fr.__path__):
    if m.name in ("DSTU2", "STU3", "R4B", "R5") or m.name.startswith(("fhir", "tests")):
        continue
    try:
        mod = importlib.import_module("fhir.resources." + m.name)
    except Exception:
        continue
    for cname, cls in inspect.getmembers(mod, inspect.isclass):
        if not issubclass(cls, FHIRAbstractModel) or cls.__module__ != mod.__name__:
            continue
        for fname, f in cls.__fields__.items():
            if fname.endswith("__ext") or fname in ("resource_type", "fhir_comments"):
                continue
            if not f.field_info.extra.get("element_property"):
                continue
            ty = f.type_
            while getattr(ty, "__origin__", None) is not None and getattr(ty, "__args__", None):
                ty = [a for a in ty.__args__ if a is not type(None)][0]
            t = getattr(ty, "__name__", str(ty))
            if t.endswith("Type") and t != "FHIRPrimitiveExtensionType":
                t = t[:-4]
            t = PRIMS.get(t, t)
            if t == "Resource" or t == "FHIRAbstractModel":
                t = "Resource"
            extra = f.field_info.extra
            if extra.get("one_of_many") and extra.get("one_of_many_required"):
                least = extra["one_of_many"] + "[x]"
            elif f.required or extra.get("element_required"):
                least = "1"
            else:
                least = "0"
            rows.add((cname, f.alias, t, "*" if f.shape != 1 else "1", least))
for r in sorted(rows):
    print("\t".join(r))
