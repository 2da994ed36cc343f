//! Bulk Data export through the real binary: a system client kicks off `$export`, polls the
//! status URL, downloads the NDJSON files (split at `file_max_resources`) and finds every stored
//! resource once; the finished export is still served after a restart; the downloads are in
//! each exported patient's audit trail, with no PHI in it.

mod facade_support;

use facade_support::{cli, Facade, Resp};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const PATIENTS: usize = 12;
const PER_PATIENT: usize = 3;

async fn poll(f: &Facade, status: &str, token: &str) -> Resp {
    tributary_e2e::wait("the export to finish")
        .until_async(|| async {
            let r = f.call("GET", status, Some(token), None).await;
            match r.status {
                200 => Some(r),
                202 => {
                    assert!(r.headers.contains_key("x-progress"), "{:?}", r.headers);
                    None
                }
                s => panic!("status {s}: {}", r.text),
            }
        })
        .await
}

/// `(type, url path)` and the count the manifest gives for each output file.
fn outputs(manifest: &Value) -> Vec<(String, String, usize)> {
    manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let url = o["url"].as_str().unwrap();
            let path = &url[url.find("/fhir/").unwrap()..];
            (
                o["type"].as_str().unwrap().to_string(),
                path.to_string(),
                o["count"].as_u64().unwrap() as usize,
            )
        })
        .collect()
}

async fn download(f: &Facade, files: &[(String, String, usize)], token: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (rtype, path, count) in files {
        let r = f.call("GET", path, Some(token), None).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.headers["content-type"], "application/fhir+ndjson");
        let lines: Vec<&str> = r.text.lines().collect();
        assert_eq!(lines.len(), *count, "{path}");
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["resourceType"], rtype.as_str());
            assert!(
                seen.insert(format!("{rtype}/{}", v["id"].as_str().unwrap())),
                "{l} twice"
            );
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_is_downloaded_whole_and_survives_a_restart() {
    let mut f = Facade::start(Some("[facade.export]\nfile_max_resources = 10\n"));
    let token = f.token("exporter", "system/*.rs system/*.cruds", &[]);
    let mut stored = BTreeSet::new();
    for p in 0..PATIENTS {
        let pid = format!("bulk{p}");
        let patient = json!({"resourceType": "Patient", "id": pid, "name": [{"family": "Marchbanks"}], "birthDate": "1961-07-04"});
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Patient/{pid}"),
                Some(&token),
                Some(&patient),
            )
            .await;
        assert!(r.status < 300, "{}", r.text);
        stored.insert(format!("Patient/{pid}"));
        for o in 0..PER_PATIENT {
            let oid = format!("{pid}-o{o}");
            let obs = json!({"resourceType": "Observation", "id": oid, "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                "subject": {"reference": format!("Patient/{pid}")},
                "valueQuantity": {"value": 12.5, "unit": "g/dL"}});
            let r = f
                .call(
                    "PUT",
                    &format!("/fhir/Observation/{oid}"),
                    Some(&token),
                    Some(&obs),
                )
                .await;
            assert!(r.status < 300, "{}", r.text);
            stored.insert(format!("Observation/{oid}"));
        }
    }

    let r = f
        .call_h(
            "GET",
            "/fhir/$export?_type=Patient,Observation",
            Some(&token),
            None,
            &[
                ("prefer", "respond-async"),
                ("accept", "application/fhir+json"),
            ],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let location = r.headers["content-location"].to_str().unwrap().to_string();
    let status = location[location.find("/fhir/").unwrap()..].to_string();
    let manifest = poll(&f, &status, &token).await.json;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["error"], json!([]));
    let files = outputs(&manifest);
    // 36 Observations in files of at most 10, then 12 Patients in two.
    let counts: Vec<(&str, usize)> = files.iter().map(|(t, _, n)| (t.as_str(), *n)).collect();
    assert_eq!(
        counts,
        [
            ("Observation", 10),
            ("Observation", 10),
            ("Observation", 10),
            ("Observation", 6),
            ("Patient", 10),
            ("Patient", 2)
        ]
    );
    assert_eq!(download(&f, &files, &token).await, stored);
    // Nobody else's to read: a token of another client gets 404 for the status and the files.
    let other = f.token("someone-else", "system/*.rs", &[]);
    assert_eq!(f.get_status(&status, &other).await, 404);
    assert_eq!(f.get_status(&files[0].1, &other).await, 404);

    // A finished export is kept across a restart, until it expires or is deleted.
    f.restart();
    let again = poll(&f, &status, &token).await.json;
    assert_eq!(outputs(&again).len(), files.len());
    assert_eq!(download(&f, &outputs(&again), &token).await, stored);
    let r = f.call("DELETE", &status, Some(&token), None).await;
    assert_eq!(r.status, 202);
    assert_eq!(f.get_status(&status, &token).await, 404);
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.stop();

    // Every patient's audit trail has the downloads of the files holding its data; no PHI.
    let out = cli(&f, &["audit", "export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = String::from_utf8(out.stdout).unwrap();
    for phi in facade_support::PHI {
        assert!(!exported.contains(phi), "{phi} in the audit trail");
    }
    let downloads: BTreeSet<String> = exported
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["body"].clone())
        .filter(|b| b["interaction"] == "export-file" && b["kind"] == "fhir-disclosure")
        .map(|b| b["patient"].as_str().unwrap().to_string())
        .collect();
    let patients: BTreeSet<String> = (0..PATIENTS).map(|p| format!("bulk{p}")).collect();
    assert_eq!(downloads, patients);
}
