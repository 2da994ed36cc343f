"""A FHIR client nobody here wrote (fhirpy) against the Tributary facade.

Usage: python3 facade_fhirpy_client.py BASE_URL TOKEN
Posts a transaction (Patient + 5 Observations + a Provenance linked by urn:uuid), reads the
Patient back, searches the Observations with _count=2 so that fhirpy has to follow `next`
links, searches the Patient with its Provenances (`_revinclude=Provenance:target`) and by its
Observations (`_has:Observation:patient:code`), and asks `Patient/$match` for it by identifier.
Prints one JSON line with what it saw; exits non-zero on any failure.
"""
import json
import sys

from fhirpy import SyncFHIRClient


def main():
    base, token = sys.argv[1], sys.argv[2]
    client = SyncFHIRClient(base, authorization=f"Bearer {token}")
    patient_urn = "urn:uuid:6f1c1a2e-0000-4000-8000-000000000001"
    entries = [{
        "fullUrl": patient_urn,
        "resource": {"resourceType": "Patient", "gender": "unknown",
                     "identifier": [{"system": "urn:test", "value": "fhirpy-1"}]},
        "request": {"method": "POST", "url": "Patient"},
    }]
    for i in range(5):
        entries.append({
            "resource": {"resourceType": "Observation", "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                         "subject": {"reference": patient_urn},
                         "valueQuantity": {"value": 60 + i, "unit": "/min"}},
            "request": {"method": "POST", "url": "Observation"},
        })
    entries.append({
        "resource": {"resourceType": "Provenance", "recorded": "2026-01-02T03:04:05Z",
                     "target": [{"reference": patient_urn}],
                     "agent": [{"who": {"display": "fhirpy test"}}]},
        "request": {"method": "POST", "url": "Provenance"},
    })
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    response = client.execute("", method="post", data=bundle)
    assert response["type"] == "transaction-response", response
    patient_ref = response["entry"][0]["response"]["location"].split("/_history")[0]
    patient_id = patient_ref.split("/")[1]

    patient = client.reference("Patient", patient_id).to_resource()
    assert patient["id"] == patient_id and patient["resourceType"] == "Patient"

    search = client.resources("Observation").search(subject=f"Patient/{patient_id}").limit(2)
    observations = search.fetch_all()
    first_page = search.fetch_raw()
    has_next = any(l.get("relation") == "next" for l in first_page.get("link", []))
    refs = sorted(o["subject"]["reference"] for o in observations)
    with_provenance = client.resources("Patient").search(_id=patient_id) \
        .revinclude("Provenance", "target").fetch_raw()
    revincluded = sorted(
        (e["resource"]["resourceType"], e["resource"]["target"][0]["reference"])
        for e in with_provenance.get("entry", []) if e["search"]["mode"] == "include")
    has = client.resources("Patient").search(
        **{"_has:Observation:patient:code": "http://loinc.org|8867-4", "identifier": "urn:test|fhirpy-1"}
    ).fetch()
    match = client.execute("Patient/$match", method="post", data={
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": {
            "resourceType": "Patient", "identifier": [{"system": "urn:test", "value": "fhirpy-1"}]}}],
    })
    matched = [(e["resource"]["id"], e["search"]["extension"][0]["valueCode"])
               for e in match.get("entry", [])]
    print(json.dumps({
        "has": sorted(p["id"] for p in has),
        "matched": matched,
        "patient": patient_id,
        "read_ok": True,
        "observations": len(observations),
        "first_page_size": len(first_page.get("entry", [])),
        "first_page_has_next": has_next,
        "subjects": sorted(set(refs)),
        "revincluded": revincluded,
    }))


if __name__ == "__main__":
    main()
