//! Conditional delete and JSON Patch against the real binary: status codes, OperationOutcomes,
//! `If-Match`, scope and compartment checks, audit records, and the CapabilityStatement saying so.

mod facade_support;

use facade_support::{export_audit, seed, Facade, Resp};
use serde_json::{json, Value};

async fn patch(f: &Facade, path: &str, token: &str, body: &str, headers: &[(&str, &str)]) -> Resp {
    let mut rb = reqwest::Client::new()
        .patch(format!("{}{}", f.base, path))
        .bearer_auth(token)
        .body(body.to_string());
    let mut typed = false;
    for (k, v) in headers {
        typed |= k.eq_ignore_ascii_case("content-type");
        rb = rb.header(*k, *v);
    }
    if !typed {
        rb = rb.header("content-type", "application/json-patch+json");
    }
    Resp::read(rb.send().await.unwrap()).await
}

fn assert_outcome(r: &Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.json["resourceType"], "OperationOutcome", "{}", r.text);
}

fn patient(id: &str, mrn: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "identifier": [{"system": "urn:mrn", "value": mrn}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn conditional_delete_zero_one_or_many_matches() {
    let mut f = Facade::start(None);
    let admin = seed(&f, None).await;
    for (id, mrn) in [("pc", "MRN-77"), ("pd", "MRN-99")] {
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Patient/{id}"),
                Some(&admin),
                Some(&patient(id, mrn)),
            )
            .await;
        assert!(r.status < 300, "{}", r.text);
    }
    // No match: an ordinary delete of nothing.
    let r = f
        .call(
            "DELETE",
            "/fhir/Patient?identifier=urn:mrn|NOPE",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    // Two matches (pa and pc share MRN-77): 412, nothing deleted.
    let r = f
        .call(
            "DELETE",
            "/fhir/Patient?identifier=urn:mrn|MRN-77",
            Some(&admin),
            None,
        )
        .await;
    assert_outcome(&r, 412);
    for id in ["pa", "pc"] {
        let r = f
            .call("GET", &format!("/fhir/Patient/{id}"), Some(&admin), None)
            .await;
        assert_eq!(r.status, 200, "{id} must survive: {}", r.text);
    }
    // Without parameters it is not a conditional delete.
    let r = f.call("DELETE", "/fhir/Patient", Some(&admin), None).await;
    assert_outcome(&r, 400);
    // Scopes: no `d` → 403; for a patient-context token another patient's resource does not
    // match (204, nothing deleted: a 403 would tell it that the identifier exists).
    let no_d = f.token("writer", "user/*.cru", &[]);
    let r = f
        .call(
            "DELETE",
            "/fhir/Patient?identifier=urn:mrn|MRN-99",
            Some(&no_d),
            None,
        )
        .await;
    assert_outcome(&r, 403);
    let pa = f.token("portal", "patient/*.cruds", &["--patient", "pa"]);
    let r = f
        .call(
            "DELETE",
            "/fhir/Patient?identifier=urn:mrn|MRN-99",
            Some(&pa),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = f.call("GET", "/fhir/Patient/pd", Some(&admin), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // One match: deleted.
    let r = f
        .call(
            "DELETE",
            "/fhir/Patient?identifier=urn:mrn|MRN-88",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = f.call("GET", "/fhir/Patient/pb", Some(&admin), None).await;
    assert_outcome(&r, 410);

    f.stop();
    let deletes: Vec<Value> = export_audit(&f, None)
        .into_iter()
        .map(|e| e["body"].clone())
        .filter(|b| b["interaction"] == "delete")
        .collect();
    let statuses: Vec<u64> = deletes
        .iter()
        .map(|b| b["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, vec![204, 412, 400, 403, 204, 204], "{deletes:?}");
    let last = deletes.last().unwrap();
    assert_eq!(last["resource_id"], "pb", "{last}");
    assert_eq!(last["patient"], "pb", "{last}");
    assert!(
        !last.to_string().contains("MRN-88"),
        "identifier value leaked into audit: {last}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_patch_honours_if_match_scopes_and_reports_errors() {
    let mut f = Facade::start(None);
    let admin = seed(&f, None).await;
    let ok = r#"[{"op": "add", "path": "/gender", "value": "female"}]"#;

    let r = patch(&f, "/fhir/Patient/pa", &admin, ok, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["gender"], "female");
    assert_eq!(r.json["meta"]["versionId"], "2");
    assert_eq!(r.headers["etag"], "W/\"2\"");
    assert_eq!(r.json["name"][0]["family"], "Quixote", "the rest is kept");

    // If-Match: a stale version is 412, the current one applies.
    let replace = r#"[{"op": "replace", "path": "/gender", "value": "other"}]"#;
    let r = patch(
        &f,
        "/fhir/Patient/pa",
        &admin,
        replace,
        &[("if-match", "W/\"1\"")],
    )
    .await;
    assert_outcome(&r, 412);
    let r = patch(
        &f,
        "/fhir/Patient/pa",
        &admin,
        replace,
        &[("if-match", "W/\"2\"")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["meta"]["versionId"], "3");

    // 400: not a patch document, unknown op, wrong media type.
    for (body, headers) in [
        (r#"{"op": "add"}"#, vec![]),
        (r#"[{"op": "frobnicate", "path": "/gender"}]"#, vec![]),
        ("not json", vec![]),
        (ok, vec![("content-type", "application/fhir+json")]),
    ] {
        let r = patch(&f, "/fhir/Patient/pa", &admin, body, &headers).await;
        assert_outcome(&r, 400);
    }
    // 422: does not apply, or the result is not this resource / not acceptable.
    for body in [
        r#"[{"op": "test", "path": "/gender", "value": "male"}]"#,
        r#"[{"op": "remove", "path": "/nothing-here"}]"#,
        r#"[{"op": "replace", "path": "/id", "value": "other"}]"#,
        r#"[{"op": "remove", "path": "/resourceType"}]"#,
        r#"[{"op": "add", "path": "/meta", "value": "not an object"}]"#,
    ] {
        let r = patch(&f, "/fhir/Patient/pa", &admin, body, &[]).await;
        assert_outcome(&r, 422);
    }
    // 404 / 410.
    let r = patch(&f, "/fhir/Patient/nobody", &admin, ok, &[]).await;
    assert_outcome(&r, 404);

    // Scopes: read-only → 403; a patient-context token may patch its own resources only, and
    // may not move one out of its compartment.
    let ro = f.token("reader", "user/*.rs", &[]);
    let r = patch(&f, "/fhir/Patient/pa", &ro, ok, &[]).await;
    assert_outcome(&r, 403);
    let pa = f.token("portal", "patient/*.rus", &["--patient", "pa"]);
    let status_patch = r#"[{"op": "replace", "path": "/status", "value": "amended"}]"#;
    let r = patch(&f, "/fhir/Observation/ob", &pa, status_patch, &[]).await;
    assert_outcome(&r, 403);
    let r = patch(&f, "/fhir/Observation/oa", &pa, status_patch, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let away = r#"[{"op": "replace", "path": "/subject/reference", "value": "Patient/pb"}]"#;
    let r = patch(&f, "/fhir/Observation/oa", &pa, away, &[]).await;
    assert_outcome(&r, 403);
    let r = f
        .call("GET", "/fhir/Observation/oa", Some(&admin), None)
        .await;
    assert_eq!(r.json["subject"]["reference"], "Patient/pa");
    assert_eq!(r.json["status"], "amended");

    // The CapabilityStatement says so.
    let r = f.call("GET", "/fhir/metadata", None, None).await;
    let res = r.json["rest"][0]["resource"].as_array().unwrap();
    let p = res.iter().find(|e| e["type"] == "Patient").unwrap();
    assert!(
        p["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["code"] == "patch"),
        "{p}"
    );
    assert_eq!(p["conditionalDelete"], "single");

    f.stop();
    let patches: Vec<Value> = export_audit(&f, None)
        .into_iter()
        .map(|e| e["body"].clone())
        .filter(|b| b["interaction"] == "patch")
        .collect();
    let statuses: Vec<u64> = patches
        .iter()
        .map(|b| b["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec![200, 412, 200, 400, 400, 400, 400, 422, 422, 422, 422, 422, 404, 403, 403, 200, 403],
        "{patches:?}"
    );
    let denied = &patches[14];
    assert_eq!(denied["outcome"], "denied");
    assert_eq!(denied["resource_type"], "Observation");
    assert_eq!(denied["resource_id"], "ob");
}

/// A Subscription's delivery bounds (the writing token's readable types, its patient context)
/// are the server's: a PATCH that removes or widens them leaves the token's values in place,
/// as create and update do — or a narrow token could subscribe to everything.
#[tokio::test(flavor = "multi_thread")]
async fn patch_cannot_lift_a_subscriptions_delivery_bounds() {
    let f = Facade::start(None);
    let narrow = f.token(
        "narrow-app",
        "user/Subscription.cru user/Observation.rs",
        &[],
    );
    let sub = json!({"resourceType": "Subscription", "status": "requested", "reason": "labs",
        "criteria": "http://tributary.dev/fhir/SubscriptionTopic/observation",
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "payload": "application/fhir+json"}});
    let r = f
        .call("POST", "/fhir/Subscription", Some(&narrow), Some(&sub))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    let allowed = |v: &Value| -> Vec<String> {
        v["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("subscription-allowed-types"))
            })
            .map(|e| e["valueString"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(allowed(&r.json), ["Observation,Subscription"]);
    for ops in [
        r#"[{"op":"remove","path":"/extension"}]"#,
        r#"[{"op":"replace","path":"/extension","value":[{"url":"http://tributary.dev/fhir/StructureDefinition/subscription-allowed-types","valueString":"*"}]}]"#,
    ] {
        let r = patch(&f, &format!("/fhir/Subscription/{id}"), &narrow, ops, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(allowed(&r.json), ["Observation,Subscription"], "{ops}");
        let stored = f
            .call(
                "GET",
                &format!("/fhir/Subscription/{id}"),
                Some(&narrow),
                None,
            )
            .await;
        assert_eq!(allowed(&stored.json), ["Observation,Subscription"], "{ops}");
    }
}

/// A FHIRPath Patch (`application/fhir+json` Parameters) through `PATCH`, and `PATCH` entries of
/// a transaction: a FHIRPath Patch, and a Binary holding a JSON Patch.
#[tokio::test(flavor = "multi_thread")]
async fn fhirpath_patch_and_transaction_patch_entries() {
    let f = Facade::start(None);
    let admin = seed(&f, None).await;
    let r = f
        .call(
            "PUT",
            "/fhir/Patient/pf",
            Some(&admin),
            Some(&patient("pf", "MRN-5")),
        )
        .await;
    assert!(r.status < 300, "{}", r.text);
    let op = |kind: &str, path: &str, rest: Value| {
        let mut part = vec![
            json!({"name": "type", "valueCode": kind}),
            json!({"name": "path", "valueString": path}),
        ];
        part.extend(rest.as_array().cloned().unwrap_or_default());
        json!({"name": "operation", "part": part})
    };
    let params = json!({"resourceType": "Parameters", "parameter": [
        op("add", "Patient", json!([{"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "female"}])),
        op("add", "Patient", json!([{"name": "name", "valueString": "identifier"},
            {"name": "value", "valueIdentifier": {"system": "urn:ssn", "value": "9"}}])),
        op("delete", "Patient.identifier.where(system = 'urn:mrn')", json!([])),
    ]});
    let fhir = [("content-type", "application/fhir+json")];
    let r = patch(&f, "/fhir/Patient/pf", &admin, &params.to_string(), &fhir).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["gender"], "female");
    assert_eq!(
        r.json["identifier"],
        json!([{"system": "urn:ssn", "value": "9"}])
    );
    // a path the patch subset does not take, and an operation that cannot apply
    let bad = json!({"resourceType": "Parameters", "parameter": [op("delete", "Patient.name.select(family)", json!([]))]});
    let r = patch(&f, "/fhir/Patient/pf", &admin, &bad.to_string(), &fhir).await;
    assert_outcome(&r, 400);
    let twice = json!({"resourceType": "Parameters", "parameter": [
        op("add", "Patient", json!([{"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "male"}]))]});
    let r = patch(&f, "/fhir/Patient/pf", &admin, &twice.to_string(), &fhir).await;
    assert_outcome(&r, 422);

    use base64::Engine as _;
    let json_patch = base64::engine::general_purpose::STANDARD
        .encode(r#"[{"op": "replace", "path": "/gender", "value": "other"}]"#);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PATCH", "url": "Patient/pf"},
         "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": json_patch}},
        {"request": {"method": "PATCH", "url": "Patient/pa"},
         "resource": {"resourceType": "Parameters", "parameter": [
            op("add", "Patient", json!([{"name": "name", "valueString": "active"}, {"name": "value", "valueBoolean": false}]))]}},
    ]});
    let r = f.call("POST", "/fhir", Some(&admin), Some(&bundle)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<&str> = r.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["200 OK", "200 OK"]);
    let pf = f.call("GET", "/fhir/Patient/pf", Some(&admin), None).await;
    assert_eq!(pf.json["gender"], "other");
    let pa = f.call("GET", "/fhir/Patient/pa", Some(&admin), None).await;
    assert_eq!(pa.json["active"], false);
    // a transaction whose PATCH does not apply changes nothing
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/pg"}, "resource": patient("pg", "MRN-6")},
        {"request": {"method": "PATCH", "url": "Patient/pa"}, "resource": {"resourceType": "Parameters", "parameter": [
            op("replace", "Patient.deceasedBoolean", json!([{"name": "value", "valueBoolean": true}]))]}},
    ]});
    let r = f.call("POST", "/fhir", Some(&admin), Some(&bundle)).await;
    assert_outcome(&r, 422);
    let pg = f.call("GET", "/fhir/Patient/pg", Some(&admin), None).await;
    assert_eq!(pg.status, 404, "{}", pg.text);
}

/// What `tributary map` prints is a transaction the facade takes: the ADT^A40's merge entry (a
/// FHIRPath Patch) merges into the Patient an earlier Bundle stored, and posting it again
/// changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_merge_bundle_posted_to_the_facade_merges_into_the_stored_patient() {
    let f = Facade::start(None);
    let admin = f.token("loader", "system/*.cruds", &[]);
    let dir = tempfile::tempdir().unwrap();
    let register = dir.path().join("a04.hl7");
    std::fs::write(
        &register,
        "MSH|^~\\&|SYNTH_ADT|RIVERSIDE^2.16.840.1.113883.3.9999.1^ISO|TRIBUTARY|TRIB_HIE|20261101080000-0600||ADT^A04^ADT_A01|SYN-A04-MERGED|P|2.5.1\r\
EVN|A04|20261101080000-0600\r\
PID|1||MRN70999^^^RIVERSIDE&2.16.840.1.113883.3.9999.1&ISO^MR||Testpatient^Avery||19800214|F|||12 Synthetic Way^^Springfield^IL^62701^USA^H\r\
PV1|1|O\r",
    )
    .unwrap();
    let library = tributary_e2e::repo_root().join("mappings/hl7v2");
    let map = |file: &std::path::Path| -> Value {
        let out = std::process::Command::new(tributary_e2e::workspace_bin("tributary"))
            .args(["map", "--mapping"])
            .arg(&library)
            .arg(file)
            .output()
            .unwrap();
        serde_json::from_str(&tributary_e2e::succeeded(out)).unwrap()
    };
    let first = map(&register);
    let r = f.call("POST", "/fhir", Some(&admin), Some(&first)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let merge = map(&library.join("messages/ADT_A40.hl7"));
    let patch_entry = merge["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["request"]["method"] == "PATCH")
        .expect("the A40 Bundle has a merge entry")
        .clone();
    let url = patch_entry["request"]["url"].as_str().unwrap().to_string();
    for round in 0..2 {
        let r = f.call("POST", "/fhir", Some(&admin), Some(&merge)).await;
        assert_eq!(r.status, 200, "round {round}: {}", r.text);
        let p = f
            .call("GET", &format!("/fhir/{url}"), Some(&admin), None)
            .await;
        assert_eq!(p.json["birthDate"], "1980-02-14", "round {round}: kept");
        assert_eq!(p.json["gender"], "female");
        assert_eq!(p.json["active"], false);
        assert_eq!(
            p.json["link"].as_array().unwrap().len(),
            1,
            "round {round}: {}",
            p.text
        );
        assert_eq!(
            p.json["identifier"].as_array().unwrap().len(),
            1,
            "round {round}: {}",
            p.text
        );
        assert_eq!(
            p.json["meta"]["versionId"], "2",
            "round {round}: a replay is no new version"
        );
    }
}

/// Every Bundle of the mapping library's fixtures (what `tributary map` prints for them) is a
/// transaction the facade takes as is, `DELETE` entries included — once what the `PATCH`
/// entries merge into is there (the Patient an ADT^A40 merges, the Account an A41 retires, the
/// document an MDM^T10 replaces): FHIR answers a `PATCH` of an absent resource 404 (the
/// pipeline's merge creates it instead, its amend leaves it absent).
#[tokio::test(flavor = "multi_thread")]
async fn every_library_fixture_bundle_posts_as_a_transaction() {
    // a loader's burst of Bundles is no test of the rate limit
    let f = Facade::start(Some("[facade.rate_limit]\nenabled = false\n"));
    let admin = f.token("loader", "system/*.cruds", &[]);
    let dir = tributary_e2e::repo_root().join("mappings/hl7v2/messages");
    let mut posted = 0;
    for path in tributary_e2e::files_with_extension(&dir, "json") {
        let bundle: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            if e["request"]["method"] == "PATCH" {
                let url = e["request"]["url"].as_str().unwrap();
                let (rtype, id) = url.split_once('/').unwrap();
                let earlier = match rtype {
                    "Patient" => json!({"birthDate": "1980-02-14"}),
                    "Account" => json!({"status": "active"}),
                    "DocumentReference" => json!({"status": "current", "content": [
                        {"attachment": {"contentType": "text/plain", "data": "b3JpZ2luYWw="}}]}),
                    other => panic!("{}: no earlier {other} for its PATCH", path.display()),
                };
                let mut earlier = earlier;
                earlier["resourceType"] = json!(rtype);
                earlier["id"] = json!(id);
                let r = f
                    .call("PUT", &format!("/fhir/{url}"), Some(&admin), Some(&earlier))
                    .await;
                assert!(r.status < 300, "{}", r.text);
            }
        }
        let r = f.call("POST", "/fhir", Some(&admin), Some(&bundle)).await;
        assert_eq!(r.status, 200, "{}: {}", path.display(), r.text);
        posted += 1;
    }
    assert!(posted >= 20, "{posted} fixture Bundles");
}
