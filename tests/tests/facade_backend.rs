//! Routing to a backend FHIR server nobody here wrote — PyPI `hl7v2-fhir-bridge`'s
//! `python -m v2fhir.mock_fhir` — with scope/compartment filtering and audit applied to the
//! proxied responses. Skips with a message when the package is missing (CI: `pip install
//! hl7v2-fhir-bridge==0.1.0`; `FACADE_TEST_PYTHON` may name a venv's python; not `TRIBUTARY_*`, which the
//! server would read as configuration).

mod facade_support;
#[path = "../../adapters/mllp/tests/common/pki.rs"]
mod pki;

use facade_support::{export_audit, Facade};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn python() -> String {
    std::env::var("FACADE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

struct Mock(Child);

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_mock() -> Option<(Mock, String)> {
    let ok = Command::new(python())
        .args(["-c", "import v2fhir.mock_fhir"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        return None;
    }
    let port = tributary_e2e::free_port();
    let child = Command::new(python())
        .args(["-m", "v2fhir.mock_fhir", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mock = Mock(child);
    let base = format!("http://127.0.0.1:{port}/fhir");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/metadata")).await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "mock_fhir did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some((mock, base))
}

fn obs(id: &str, patient: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "identifier": [{"system": "urn:lab", "value": id}], "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "subject": {"reference": format!("Patient/{patient}")}})
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_fhir_server_responses_are_narrowed_and_audited() {
    let Some((_mock, mock_base)) = start_mock().await else {
        // CI installs every test tool and sets TEST_REQUIRE_TOOLS=1: there, a missing tool fails.
        assert!(
            std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
            "a test tool is missing but TEST_REQUIRE_TOOLS is set"
        );
        eprintln!("SKIPPED: v2fhir.mock_fhir not importable (pip install hl7v2-fhir-bridge==0.1.0, or set FACADE_TEST_PYTHON)");
        return;
    };
    // The backend holds the Observations (its own data, loaded directly).
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("lab-a", "pa"), "request": {"method": "PUT", "url": "Observation/lab-a"}},
        {"resource": obs("lab-b", "pb"), "request": {"method": "PUT", "url": "Observation/lab-b"}},
    ]});
    let r = reqwest::Client::new()
        .post(&mock_base)
        .header("content-type", "application/fhir+json")
        .body(tx.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    let config = format!("[[facade.backends]]\nname = \"lab\"\nurl = \"{mock_base}\"\nresource_types = [\"Observation\"]\n");
    let mut f = Facade::start(Some(&config));
    let admin = f.token("seeder", "system/*.cruds", &[]);
    for id in ["pa", "pb"] {
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Patient/{id}"),
                Some(&admin),
                Some(&json!({"resourceType": "Patient", "id": id})),
            )
            .await;
        assert!(r.status < 300, "{}", r.text);
    }
    // An unrestricted token sees both, proxied.
    let r = f.call("GET", "/fhir/Observation", Some(&admin), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut all = r.ids();
    all.sort();
    assert_eq!(all, vec!["Observation/lab-a", "Observation/lab-b"]);
    assert!(
        !r.text.contains(&mock_base),
        "backend URL leaked: {}",
        r.text
    );

    let t = f.token("portal", "patient/*.rs", &["--patient", "pa"]);
    let r = f
        .call("GET", "/fhir/Observation/lab-a", Some(&t), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["subject"]["reference"], "Patient/pa");
    let r = f
        .call("GET", "/fhir/Observation/lab-b", Some(&t), None)
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json["resourceType"], "OperationOutcome");
    let r = f.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_eq!(r.ids(), vec!["Observation/lab-a"], "{}", r.text);
    let r = f
        .call(
            "GET",
            "/fhir/Observation?identifier=urn:lab|lab-b",
            Some(&t),
            None,
        )
        .await;
    assert!(r.ids().is_empty(), "{}", r.text);
    let r = f
        .call("GET", "/fhir/Observation/lab-b/_history", Some(&t), None)
        .await;
    assert!(
        r.ids().is_empty() && !r.text.contains("Patient/pb"),
        "{}",
        r.text
    );
    // An update is checked against what it replaces, not only what it writes: pa's token may
    // not overwrite pb's result by naming pa in the body.
    let writer = f.token("portal-writer", "patient/*.cruds", &["--patient", "pa"]);
    let r = f
        .call(
            "PUT",
            "/fhir/Observation/lab-b",
            Some(&writer),
            Some(&obs("lab-b", "pa")),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = f
        .call("GET", "/fhir/Observation/lab-b", Some(&admin), None)
        .await;
    assert_eq!(r.json["subject"]["reference"], "Patient/pb", "{}", r.text);
    // ... and a conditional update, whose target cannot be checked first, is not forwarded
    let r = f
        .call(
            "PUT",
            "/fhir/Observation?identifier=urn:lab|lab-b",
            Some(&writer),
            Some(&obs("lab-b", "pa")),
        )
        .await;
    assert_eq!(r.status, 405, "{}", r.text);
    let cap = f.call("GET", "/fhir/metadata", None, None).await;
    let observation = cap.json["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap()
        .clone();
    assert_eq!(observation["conditionalUpdate"], false, "{observation}");
    // Scope mismatch is refused before the backend is asked.
    let pat_only = f.token("portal", "patient/Patient.read", &["--patient", "pa"]);
    assert_eq!(
        f.get_status("/fhir/Observation/lab-a", &pat_only).await,
        403
    );
    // Patients still come from the built-in store.
    assert_eq!(f.get_status("/fhir/Patient/pa", &t).await, 200);

    f.stop();
    let records = export_audit(&f, None);
    let proxied: Vec<&Value> = records
        .iter()
        .map(|e| &e["body"])
        .filter(|b| b["client"] == "portal" && b["resource_type"] == "Observation")
        .collect();
    assert_eq!(proxied.len(), 6, "every proxied request is audited");
    let denied = proxied
        .iter()
        .find(|b| b["resource_id"] == "lab-b" && b["interaction"] == "read")
        .unwrap();
    assert_eq!(
        (denied["status"].as_u64(), denied["patient"].as_str()),
        (Some(403), Some("pb"))
    );
    // The unrestricted search proxied to the backend returned both patients' results: it is in
    // both patients' audit reports.
    let mut disclosed: Vec<(&str, u64)> = records
        .iter()
        .map(|e| &e["body"])
        .filter(|b| b["kind"] == "fhir-disclosure" && b["resource_type"] == "Observation")
        .map(|b| {
            assert_eq!(
                (&b["client"], &b["backend"]),
                (&json!("seeder"), &json!("lab"))
            );
            (
                b["patient"].as_str().unwrap(),
                b["returned"].as_u64().unwrap(),
            )
        })
        .collect();
    disclosed.sort();
    assert_eq!(disclosed, [("pa", 1), ("pb", 1)]);
}

/// A backend that records what it received and answers one Observation.
#[tokio::test(flavor = "multi_thread")]
async fn backend_never_receives_the_callers_authorization() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let body = obs("x1", "pa").to_string();
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    let config = format!("[[facade.backends]]\nname = \"capture\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Observation\"]\nhealth_check_secs = 0\n");
    let f = Facade::start(Some(&config));
    let t = f.token(
        "portal",
        "user/*.rs",
        &["--sub", "dr-9", "--tenant", "acme"],
    );
    let r = f
        .call_h(
            "GET",
            "/fhir/Observation/x1",
            Some(&t),
            None,
            &[("x-request-id", "req-42"), ("cookie", "session=secret")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let seen = rx.recv().await.unwrap().to_ascii_lowercase();
    assert!(seen.starts_with("get /fhir/observation/x1 "), "{seen}");
    assert!(
        !seen.contains("authorization"),
        "Authorization forwarded: {seen}"
    );
    assert!(
        !seen.contains(&t.to_ascii_lowercase()) && !seen.contains("cookie"),
        "{seen}"
    );
    for h in [
        "x-tributary-tenant: acme",
        "x-tributary-client: portal",
        "x-tributary-user: dr-9",
        "x-request-id: req-42",
    ] {
        assert!(seen.contains(h), "missing {h}: {seen}");
    }
}

/// Routing to a backend over HTTPS with mutual TLS: the facade trusts the backend's CA
/// (`ca_file`) and presents its client certificate (`client_identity_file`). A route to the
/// same backend without the certificate fails the handshake: 502, and the backend degraded.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_behind_mutual_tls_is_reached_with_the_configured_identity() {
    use tributary_runtime::http_server::{serve, Limits};
    use tributary_runtime::tls::{ListenerTlsConfig, ReloadingAcceptor};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki::Pki::new("Backend Test CA");
    ca.write_ca(&d.join("ca.crt"));
    ca.write(d, "server", "localhost", &["localhost"], false);
    let (cert, key) = ca.issue("tributary-facade", &[], true);
    std::fs::write(d.join("client.pem"), format!("{cert}{key}")).unwrap();

    let app = axum::Router::new().route(
        "/fhir/Observation/{id}",
        axum::routing::get(
            |axum::extract::Path(id): axum::extract::Path<String>| async move {
                (
                    [("content-type", "application/fhir+json")],
                    obs(&id, "pa").to_string(),
                )
            },
        ),
    );
    let acceptor = ReloadingAcceptor::new(ListenerTlsConfig {
        cert: d.join("server.crt"),
        key: d.join("server.key"),
        client_ca: Some(d.join("ca.crt")),
        require_client_cert: true,
        reload_interval_secs: 0,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = Limits {
        idle_timeout: Duration::from_secs(30),
        max_connections: 64,
    };
    tokio::spawn(serve(
        listener,
        app,
        limits,
        Some(acceptor),
        tributary_runtime::Metrics::default(),
        shutdown.clone(),
    ));

    let url = format!("https://localhost:{port}/fhir");
    let (ca_file, identity) = (d.join("ca.crt"), d.join("client.pem"));
    let config = format!(
        "[[facade.backends]]\nname = \"lab\"\nurl = \"{url}\"\nresource_types = [\"Observation\"]\nca_file = {ca_file:?}\nclient_identity_file = {identity:?}\nhealth_check_secs = 0\n\n\
         [[facade.backends]]\nname = \"lab-anonymous\"\nurl = \"{url}\"\nresource_types = [\"Condition\"]\nca_file = {ca_file:?}\nhealth_check_secs = 0\n"
    );
    let f = Facade::start(Some(&config));
    let t = f.token("portal", "user/*.rs", &[]);
    let r = f.call("GET", "/fhir/Observation/x1", Some(&t), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (&r.json["resourceType"], &r.json["id"]),
        (&json!("Observation"), &json!("x1"))
    );
    let r = f.call("GET", "/fhir/Condition/c1", Some(&t), None).await;
    assert_eq!(r.status, 502, "without the client certificate: {}", r.text);
    let ready = f.call("GET", "/ready", None, None).await;
    assert_eq!(
        ready.json["components"]["backend.lab-anonymous"]["status"], "degraded",
        "{}",
        ready.text
    );
    assert_eq!(
        ready.json["components"]["backend.lab"]["status"], "ready",
        "{}",
        ready.text
    );
    shutdown.cancel();
}

/// `$everything` gathers the patient's resources from the backends as well as the store. The
/// backend here ignores the `patient` parameter (it answers two patients' Observations): only
/// the asked patient's reach the answer. A backend that fails is named in an OperationOutcome
/// entry; a type with no patient link (Practitioner) and a type the caller may not read are
/// not asked.
#[tokio::test(flavor = "multi_thread")]
async fn everything_gathers_the_patients_resources_from_the_backends() {
    use axum::extract::{OriginalUri, State};
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex};
    type Asked = Arc<Mutex<Vec<String>>>;
    async fn answer(State(asked): State<Asked>, uri: OriginalUri) -> (StatusCode, String) {
        let path = uri.0.to_string();
        asked.lock().unwrap().push(path.clone());
        let bundle = |entries: Vec<Value>| {
            json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(),
                   "entry": entries.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
            .to_string()
        };
        if path.starts_with("/fhir/Observation?") {
            (
                StatusCode::OK,
                bundle(vec![obs("lab-a", "pa"), obs("lab-b", "pb")]),
            )
        } else if path.starts_with("/fhir/Condition?") {
            (StatusCode::SERVICE_UNAVAILABLE, String::new())
        } else if path == "/fhir/Practitioner/dr1" {
            let dr = json!({"resourceType": "Practitioner", "id": "dr1", "active": true});
            (StatusCode::OK, dr.to_string())
        } else {
            (StatusCode::NOT_FOUND, String::new())
        }
    }
    let asked: Asked = Arc::default();
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(asked.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!(
        "[[facade.backends]]\nname = \"lab\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Observation\", \"Practitioner\"]\nhealth_check_secs = 0\n\
         [[facade.backends]]\nname = \"problems\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Condition\"]\nhealth_check_secs = 0\n"
    );
    let mut f = Facade::start(Some(&config));
    let admin = f.token("seeder", "system/*.cruds", &[]);
    for (path, body) in [
        (
            "/fhir/Patient/pa",
            json!({"resourceType": "Patient", "id": "pa"}),
        ),
        (
            "/fhir/Patient/pb",
            json!({"resourceType": "Patient", "id": "pb"}),
        ),
        (
            "/fhir/Encounter/ea",
            json!({"resourceType": "Encounter", "id": "ea", "status": "finished",
                   "class": {"code": "IMP"}, "subject": {"reference": "Patient/pa"},
                   "participant": [{"individual": {"reference": "Practitioner/dr1"}},
                                   {"individual": {"reference": "Practitioner/gone"}}]}),
        ),
    ] {
        let r = f.call("PUT", path, Some(&admin), Some(&body)).await;
        assert!(r.status < 300, "{}", r.text);
    }
    let portal = f.token("portal", "patient/*.rs", &["--patient", "pa"]);
    for token in [&admin, &portal] {
        let r = f
            .call("GET", "/fhir/Patient/pa/$everything", Some(token), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.ids(),
            [
                "Patient/pa",
                "Encounter/ea",
                "Observation/lab-a",
                "OperationOutcome/"
            ],
            "{}",
            r.text
        );
        let entries = r.json["entry"].as_array().unwrap();
        assert!(
            entries[2]["fullUrl"]
                .as_str()
                .unwrap()
                .ends_with("/fhir/Observation/lab-a"),
            "{}",
            r.text
        );
        assert_eq!(
            entries[3]["resource"]["issue"][0]["diagnostics"],
            "not all in this answer: Condition (problems): backend problems answered 503"
        );
        assert!(r.json.get("total").is_none(), "{}", r.text);
        assert!(!r.text.contains(&addr.to_string()), "{}", r.text);
    }
    // Only Patient and Encounter in scope: no backend is asked.
    let narrow = f.token(
        "narrow",
        "patient/Patient.rs patient/Encounter.rs",
        &["--patient", "pa"],
    );
    let before = asked.lock().unwrap().len();
    let r = f
        .call("GET", "/fhir/Patient/pa/$everything", Some(&narrow), None)
        .await;
    assert_eq!(r.ids(), ["Patient/pa", "Encounter/ea"], "{}", r.text);
    assert_eq!(r.json["total"], 2, "{}", r.text);
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), before, "{asked:?}");
    let mut first_two = asked[..2].to_vec();
    first_two.sort();
    assert_eq!(
        first_two,
        [
            "/fhir/Condition?patient=pa&_count=1000",
            "/fhir/Observation?patient=pa&_count=1000"
        ]
    );
    assert!(
        asked.len() == 4 && !asked.iter().any(|p| p.contains("Practitioner")),
        "{asked:?}"
    );

    // `_include` reads the targets a backend serves from it; one that is gone is left out, as
    // a dangling reference is.
    let r = f
        .call(
            "GET",
            "/fhir/Encounter?patient=pa&_include=Encounter:participant",
            Some(&portal),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.ids(), ["Encounter/ea", "Practitioner/dr1"], "{}", r.text);
    assert_eq!(r.json["entry"][1]["search"]["mode"], "include");
    // ... also as a batch entry
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"request": {
        "method": "GET", "url": "Encounter?patient=pa&_include=Encounter:participant"}}]});
    let r = f.call("POST", "/fhir", Some(&admin), Some(&batch)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let inner = &r.json["entry"][0]["resource"]["entry"];
    let found: Vec<String> = inner
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!("{}/{}", e["resource"]["resourceType"], e["resource"]["id"]).replace('"', "")
        })
        .collect();
    assert_eq!(found, ["Encounter/ea", "Practitioner/dr1"], "{}", r.text);
    // The backend down: the Bundle says what is missing and why.
    let gone = "[[facade.backends]]\nname = \"lab\"\nurl = \"http://127.0.0.1:9/fhir\"\nresource_types = [\"Practitioner\"]\nhealth_check_secs = 0\n";
    let mut g = Facade::start(Some(gone));
    let admin_g = g.token("seeder", "system/*.cruds", &[]);
    let ea = json!({"resourceType": "Encounter", "id": "ea", "status": "finished",
        "class": {"code": "IMP"}, "participant": [{"individual": {"reference": "Practitioner/dr1"}}]});
    let w = g
        .call("PUT", "/fhir/Encounter/ea", Some(&admin_g), Some(&ea))
        .await;
    assert!(w.status < 300, "{}", w.text);
    let r = g
        .call(
            "GET",
            "/fhir/Encounter?_include=Encounter:participant",
            Some(&admin_g),
            None,
        )
        .await;
    assert_eq!(r.ids(), ["Encounter/ea", "OperationOutcome/"], "{}", r.text);
    assert_eq!(
        r.json["entry"][1]["resource"]["issue"][0]["diagnostics"],
        "not all included: Practitioner (lab): backend lab unavailable"
    );
    g.stop();

    f.stop();
    let records = export_audit(&f, None);
    let everything: Vec<&Value> = records
        .iter()
        .map(|e| &e["body"])
        .filter(|b| b["interaction"] == "operation-everything")
        .collect();
    assert_eq!(everything.len(), 3, "{everything:?}");
    assert_eq!(
        everything[0]["backend"], "lab,problems",
        "{}",
        everything[0]
    );
    assert_eq!(everything[0]["returned"], 4, "{}", everything[0]);
    let search = records
        .iter()
        .map(|e| &e["body"])
        .find(|b| b["interaction"] == "search-type" && b["resource_type"] == "Encounter")
        .unwrap();
    assert_eq!(
        (&search["backend"], &search["returned"]),
        (&json!("lab"), &json!(2)),
        "{search}"
    );
}

/// A backend that pages from its base URL, as HAPI does (`{base}?_getpages=…`): its page links
/// reach the caller as links on the facade and lead to the next page through the same filtering;
/// `$everything` follows them to gather all of the patient's resources there. A page link made
/// up to reach anything else on the backend is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_paging_from_its_base_is_paged_through_the_facade() {
    use axum::extract::{OriginalUri, State};
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex};
    type Asked = Arc<Mutex<Vec<String>>>;
    // Six Observations, one of another patient among them, two to a page.
    let all = || {
        ["lab-1", "lab-2", "other", "lab-3", "lab-4", "lab-5"]
            .map(|id| obs(id, if id == "other" { "pb" } else { "pa" }))
    };
    async fn answer(
        State((asked, base)): State<(Asked, Arc<Mutex<String>>)>,
        uri: OriginalUri,
    ) -> (StatusCode, String) {
        let uri = uri.0.to_string();
        asked.lock().unwrap().push(uri.clone());
        // A history pages the same way (its entries here are the search's).
        let from = if uri.starts_with("/fhir/Observation?patient=pa")
            || uri == "/fhir/Observation/lab-1/_history"
        {
            0
        } else if let Some(q) = uri.strip_prefix("/fhir?_getpages=s1&_getpagesoffset=") {
            q.split('&').next().unwrap().parse().unwrap()
        } else {
            return (StatusCode::NOT_FOUND, String::new());
        };
        let all = ["lab-1", "lab-2", "other", "lab-3", "lab-4", "lab-5"];
        let page = &all[from..(from + 2).min(all.len())];
        let base = base.lock().unwrap().clone();
        let mut links = vec![json!({"relation": "self", "url": format!("{base}{uri}")})];
        if from + 2 < all.len() {
            links.push(json!({"relation": "next",
                "url": format!("{base}/fhir?_getpages=s1&_getpagesoffset={}&_count=2", from + 2)}));
        }
        let entries: Vec<Value> = page
            .iter()
            .map(|id| json!({"resource": obs(id, if *id == "other" { "pb" } else { "pa" })}))
            .collect();
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": all.len(),
                       "link": links, "entry": entries});
        (StatusCode::OK, b.to_string())
    }
    let asked: Asked = Arc::default();
    let origin = Arc::new(Mutex::new(String::new()));
    let app = axum::Router::new()
        .fallback(answer)
        .with_state((asked.clone(), origin.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    *origin.lock().unwrap() = format!("http://{addr}");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!(
        "[[facade.backends]]\nname = \"lab\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Observation\"]\nhealth_check_secs = 0\n"
    );
    let mut f = Facade::start(Some(&config));
    let admin = f.token("seeder", "system/*.cruds", &[]);
    let pa = json!({"resourceType": "Patient", "id": "pa"});
    let r = f
        .call("PUT", "/fhir/Patient/pa", Some(&admin), Some(&pa))
        .await;
    assert!(r.status < 300, "{}", r.text);
    let portal = f.token("portal", "patient/*.rs", &["--patient", "pa"]);

    // Search: every page through the facade, the other patient's Observation left out.
    for (token, expected) in [
        (
            &admin,
            all()
                .map(|o| format!("Observation/{}", o["id"].as_str().unwrap()))
                .to_vec(),
        ),
        (
            &portal,
            ["lab-1", "lab-2", "lab-3", "lab-4", "lab-5"]
                .map(|i| format!("Observation/{i}"))
                .to_vec(),
        ),
    ] {
        let mut found = Vec::new();
        let mut path = String::from("/fhir/Observation?patient=pa");
        let mut pages = 0;
        loop {
            let r = f.call("GET", &path, Some(token), None).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            assert!(!r.text.contains(&addr.to_string()), "{}", r.text);
            found.extend(r.ids());
            pages += 1;
            let Some(next) = r.next_from("/fhir/Observation?_backend_page=") else {
                break;
            };
            path = next;
        }
        assert_eq!(pages, 3);
        assert_eq!(found, expected);
    }

    // A history's page links stay on the history, so following them takes the read permission
    // the history took, not a search permission.
    let reader = f.token("reader", "patient/Observation.r", &["--patient", "pa"]);
    let r = f
        .call(
            "GET",
            "/fhir/Observation/lab-1/_history",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let next = r
        .next_from("/fhir/Observation/lab-1/_history?_backend_page=")
        .expect("a next page");
    let r = f.call("GET", &next, Some(&reader), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.ids(), ["Observation/lab-3"], "{}", r.text);

    // $everything follows the backend's pages.
    let r = f
        .call("GET", "/fhir/Patient/pa/$everything", Some(&portal), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut expected = vec!["Patient/pa".to_string()];
    expected.extend((1..=5).map(|i| format!("Observation/lab-{i}")));
    assert_eq!(r.ids(), expected, "{}", r.text);
    assert_eq!(r.json["total"], 6, "{}", r.text);
    // ... up to its `_count` per type, and says so beyond it
    let r = f
        .call(
            "GET",
            "/fhir/Patient/pa/$everything?_count=3",
            Some(&portal),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ids = r.ids();
    assert_eq!(ids.len(), 5, "{}", r.text);
    assert_eq!(ids[4], "OperationOutcome/");
    assert_eq!(
        r.json["entry"][4]["resource"]["issue"][0]["diagnostics"],
        "not all in this answer: Observation (lab): more than 3; search them by patient (GET /fhir/Observation?patient=pa)"
    );

    // `_type` and `_since` reach the backend part too: a type left out is not asked for, and
    // `_since` is passed on as `_lastUpdated`.
    let before = asked.lock().unwrap().len();
    let r = f
        .call(
            "GET",
            "/fhir/Patient/pa/$everything?_type=Patient",
            Some(&portal),
            None,
        )
        .await;
    assert_eq!(r.ids(), ["Patient/pa"], "{}", r.text);
    assert_eq!(asked.lock().unwrap().len(), before);
    let r = f
        .call(
            "GET",
            "/fhir/Patient/pa/$everything?_type=Observation&_since=2024-01-01T00:00:00Z",
            Some(&portal),
            None,
        )
        .await;
    assert_eq!(r.ids().len(), 5, "{}", r.text);
    let asked_now = asked.lock().unwrap().clone();
    assert!(
        asked_now[before].ends_with("&_lastUpdated=ge2024-01-01T00:00:00Z"),
        "{asked_now:?}"
    );

    // A page link made up to reach something else on the backend, or another host, is refused
    // before anything is asked of the backend.
    let before = asked.lock().unwrap().len();
    for page in [
        "%2FPatient%2Fpa",
        "%2FObservation%2Flab-1",
        "%2F..%2Fadmin%3Fx%3D1",
        "http%3A%2F%2Fexample.org%2F",
    ] {
        let r = f
            .call(
                "GET",
                &format!("/fhir/Observation?_backend_page={page}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(r.status, 400, "{page}: {}", r.text);
        assert_eq!(r.json["resourceType"], "OperationOutcome", "{}", r.text);
    }
    assert_eq!(asked.lock().unwrap().len(), before);
    f.stop();
}
