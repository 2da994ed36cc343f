//! The facade over what the pipeline wrote: HL7 v2 messages of the shared corpus arrive over
//! MLLP, and a client finds each Patient with the Provenance of the messages that wrote it
//! (`_revinclude=Provenance:target`), and a patient's Observations by the Patient's identifier
//! (`patient.identifier=system|value`), as a care-management app that knows an MRN asks.
//! Skips without the shared corpus.

mod events_common;

use events_common::{free_addr, get_json, issue_token, repo_root, token_config, Server};
use serde_json::Value;
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};

fn of_mode<'a>(bundle: &'a Value, mode: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |e| e["search"]["mode"] == mode)
        .map(|e| &e["resource"])
}

/// Starts the server over `data` with an MLLP listener, sends each file as one message (each
/// must be accepted) and waits until the pipeline has mapped them all.
async fn serve_and_send(data: &std::path::Path, files: &[std::path::PathBuf]) -> Server {
    let mllp = free_addr();
    let server = Server::start_with_mllp(data, "", Some(mllp));
    let mut sender = MllpSender::new(MllpSenderConfig::new(mllp.to_string()));
    for f in files {
        let ack = sender.send_once(&std::fs::read(f).unwrap()).await.unwrap();
        // original mode AA; enhanced mode (MSH-15 AL) a commit accept, CA
        let ack = String::from_utf8_lossy(&ack);
        assert!(
            ack.contains("MSA|AA") || ack.contains("MSA|CA"),
            "{f:?}: {ack}"
        );
    }
    let metrics = server.http.to_string();
    let n = files.len() as f64;
    tributary_e2e::wait("the pipeline to map every message")
        .until_async(|| async { (tributary_e2e::pipeline_finished(&metrics) >= n).then_some(()) })
        .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_patients_come_with_their_provenance_and_are_found_by_identifier() {
    let corpus = repo_root().join("../shared/corpus/hl7v2/linuxforhealth");
    let files = [
        corpus.join("sample_unix.hl7"),
        corpus.join("ORU-multiline-short.hl7"),
    ];
    if files.iter().any(|f| !f.is_file()) {
        eprintln!("SKIP mapped_patients_come_with_their_provenance_and_are_found_by_identifier: corpus absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = issue_token(&token_config(&data), "care-app", "system/*.rs", None);
    let server = serve_and_send(&data, &files).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/fhir", server.http);

    let b = get_json(
        &http,
        &format!("{base}/Patient?_revinclude=Provenance:target"),
        &token,
    )
    .await;
    let patients: Vec<&Value> = of_mode(&b, "match").collect();
    let provenances: Vec<&Value> = of_mode(&b, "include").collect();
    assert!(!patients.is_empty(), "{b}");
    assert_eq!(
        provenances.len(),
        files.len(),
        "one Provenance per message, each once: {b}"
    );
    let targets = |pv: &Value| -> Vec<String> {
        pv["target"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["reference"].as_str().map(String::from))
            .collect()
    };
    for p in &patients {
        let me = format!("Patient/{}", p["id"].as_str().unwrap());
        assert!(
            provenances.iter().any(|pv| targets(pv).contains(&me)),
            "{me} comes with the Provenance of its message: {b}"
        );
    }
    assert!(provenances
        .iter()
        .all(|pv| pv["resourceType"] == "Provenance"));

    // By each Patient's first identifier, the same Observations as by its id.
    let mut found_any = false;
    for p in &patients {
        let id = p["id"].as_str().unwrap();
        let Some(ident) = p["identifier"].as_array().and_then(|i| i.first()) else {
            continue;
        };
        let system = ident["system"].as_str().unwrap_or("");
        let value = ident["value"].as_str().unwrap();
        let chained = reqwest::Url::parse_with_params(
            &format!("{base}/Observation"),
            &[
                ("patient.identifier", format!("{system}|{value}")),
                ("_summary", "count".into()),
            ],
        )
        .unwrap();
        let by_identifier = get_json(&http, chained.as_str(), &token).await;
        let by_id = get_json(
            &http,
            &format!("{base}/Observation?patient=Patient/{id}&_summary=count"),
            &token,
        )
        .await;
        assert_eq!(by_identifier["total"], by_id["total"], "Patient/{id}");
        found_any |= by_id["total"].as_u64().unwrap_or(0) > 0;
    }
    assert!(
        found_any,
        "the ORU's Observations were found by their patient's identifier"
    );
    server.stop();
}

/// A care-management app whose SMART v2 scope is narrowed to lab results
/// (`system/Observation.rs?category=laboratory`) sees the mapped results of a lab order (OBR-24
/// a laboratory section) and none of an imaging order's (OBR-24 CT), searching or reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_category_narrowed_scope_sees_the_mapped_lab_results_only() {
    let corpus = repo_root().join("../shared/corpus/hl7v2");
    let files = [
        corpus.join("ms-fhir-converter/ORU-R01-01.hl7"),
        corpus.join("linuxforhealth/ORU-multiline-short.hl7"),
    ];
    if files.iter().any(|f| !f.is_file()) {
        eprintln!("SKIP a_category_narrowed_scope_sees_the_mapped_lab_results_only: corpus absent");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = token_config(&data);
    let all = issue_token(&config, "records", "system/Observation.rs", None);
    let labs = issue_token(
        &config,
        "lab-app",
        "system/Observation.rs?category=laboratory",
        None,
    );
    let server = serve_and_send(&data, &files).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/fhir", server.http);
    let ids = |b: &Value| -> Vec<String> {
        let mut v: Vec<String> = of_mode(b, "match")
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let everything = get_json(&http, &format!("{base}/Observation?_count=200"), &all).await;
    let category = |r: &Value| {
        r["category"][0]["coding"][0]["code"]
            .as_str()
            .map(String::from)
    };
    let (mut lab, mut imaging) = (Vec::new(), Vec::new());
    for r in of_mode(&everything, "match") {
        let id = r["id"].as_str().unwrap().to_string();
        match category(r).as_deref() {
            Some("laboratory") => lab.push(id),
            Some("imaging") => imaging.push(id),
            other => panic!("Observation/{id} has category {other:?}: {everything}"),
        }
    }
    lab.sort();
    assert!(!lab.is_empty() && !imaging.is_empty(), "{everything}");

    let seen = get_json(&http, &format!("{base}/Observation?_count=200"), &labs).await;
    assert_eq!(ids(&seen), lab, "{seen}");
    let read = |id: String| {
        let (http, labs) = (http.clone(), labs.clone());
        let url = format!("{base}/Observation/{id}");
        async move {
            http.get(url)
                .bearer_auth(labs)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(read(lab[0].clone()).await, 200);
    assert_eq!(read(imaging[0].clone()).await, 403);
    server.stop();
}
