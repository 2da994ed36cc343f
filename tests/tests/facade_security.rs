//! The HIPAA reviewer's checklist against the running binary (issue 5, "Done when"): one named
//! test per item. Tokens come from `tributary token issue`, audit checks from `tributary audit`.

mod facade_support;

use facade_support::{cli, data_dir, export_audit, seed, Facade, PHI};
use serde_json::{json, Value};

fn assert_outcome(r: &facade_support::Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.json["resourceType"], "OperationOutcome", "{}", r.text);
    for phi in PHI {
        assert!(!r.text.contains(phi), "error body leaks {phi}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_bad_signature_expired_or_wrong_audience_get_401_outcome() {
    let f = Facade::start(None);
    seed(&f, None).await;
    let good = f.token("app", "user/*.rs", &[]);
    assert_eq!(f.get_status("/fhir/Patient/pa", &good).await, 200);

    let r = f.call("GET", "/fhir/Patient/pa", None, None).await;
    assert_outcome(&r, 401);
    assert!(r.headers.contains_key("www-authenticate"));

    // Signed by a key the server does not trust.
    let forged = untrusted_token("app");
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&forged), None).await,
        401,
    );

    // A trusted token whose payload was edited (scope widened) no longer verifies.
    let parts: Vec<&str> = good.split('.').collect();
    let mut tampered_payload = parts[1].to_string();
    tampered_payload.replace_range(5..6, if &parts[1][5..6] == "A" { "B" } else { "A" });
    let tampered = format!("{}.{}.{}", parts[0], tampered_payload, parts[2]);
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&tampered), None)
            .await,
        401,
    );

    let expired = f.token("app", "user/*.rs", &["--ttl", "-120"]);
    let r = f
        .call("GET", "/fhir/Patient/pa", Some(&expired), None)
        .await;
    assert_outcome(&r, 401);
    assert!(r.text.contains("expired"), "{}", r.text);

    let wrong_aud = f.token("app", "user/*.rs", &["--audience", "someone-else"]);
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&wrong_aud), None)
            .await,
        401,
    );

    // Searches are refused the same way, with no data.
    assert_outcome(
        &f.call("GET", "/fhir/Patient?name=Quixote", None, None)
            .await,
        401,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_read_scope_asking_for_observation_is_403() {
    let f = Facade::start(None);
    seed(&f, None).await;
    let t = f.token("portal", "patient/Patient.read", &["--patient", "pa"]);
    assert_eq!(f.get_status("/fhir/Patient/pa", &t).await, 200);
    assert_outcome(
        &f.call("GET", "/fhir/Observation/oa", Some(&t), None).await,
        403,
    );
    assert_outcome(
        &f.call("GET", "/fhir/Observation?patient=pa", Some(&t), None)
            .await,
        403,
    );
    let write = f.call("POST", "/fhir/Observation", Some(&t), Some(&json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/pa"}}))).await;
    assert_outcome(&write, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_context_token_never_gets_another_patients_data() {
    let f = Facade::start(None);
    seed(&f, None).await;
    let t = f.token("portal", "patient/*.rs", &["--patient", "pa"]);
    // read
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pb", Some(&t), None).await,
        403,
    );
    assert_outcome(
        &f.call("GET", "/fhir/Observation/ob", Some(&t), None).await,
        403,
    );
    // search: explicit other patient is refused; an open search is narrowed.
    assert_outcome(
        &f.call(
            "GET",
            "/fhir/Observation?subject=Patient/pb",
            Some(&t),
            None,
        )
        .await,
        403,
    );
    let r = f.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_eq!(r.ids(), vec!["Observation/oa"]);
    let r = f
        .call("GET", "/fhir/Patient?name=Marchbanks", Some(&t), None)
        .await;
    assert_eq!(r.status, 200);
    assert!(r.ids().is_empty(), "{}", r.text);
    // _include: a reference to the other patient brings nothing in.
    let admin = f.token("seeder", "system/*.cruds", &[]);
    let cross = json!({"resourceType": "Observation", "id": "ox", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/pa"}, "performer": [{"reference": "Patient/pb"}]});
    assert!(
        f.call("PUT", "/fhir/Observation/ox", Some(&admin), Some(&cross))
            .await
            .status
            < 300
    );
    let r = f
        .call(
            "GET",
            "/fhir/Observation?_id=ox&_include=Observation:performer&_include=Observation:subject",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.ids(), vec!["Observation/ox", "Patient/pa"], "{}", r.text);
    // history: instance history of another patient's resources is refused; type history narrowed.
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pb/_history", Some(&t), None)
            .await,
        403,
    );
    assert_outcome(
        &f.call("GET", "/fhir/Observation/ob/_history", Some(&t), None)
            .await,
        403,
    );
    assert_outcome(
        &f.call("GET", "/fhir/Observation/ob/_history/1", Some(&t), None)
            .await,
        403,
    );
    let r = f
        .call("GET", "/fhir/Observation/_history", Some(&t), None)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        !r.text.contains("Patient/pb\"}") || !r.text.contains("\"id\":\"ob\""),
        "{}",
        r.text
    );
    let hist_ids: Vec<&str> = r.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert!(
        hist_ids.iter().all(|id| *id == "oa" || *id == "ox"),
        "{hist_ids:?}"
    );
    // $everything on the other patient.
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pb/$everything", Some(&t), None)
            .await,
        403,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_tenant_reads_return_no_data_and_are_audited() {
    let mut f = Facade::start(None);
    seed(&f, Some("hospital-a")).await;
    let b = f.token("app-b", "system/*.cruds", &["--tenant", "hospital-b"]);
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&b), None).await,
        404,
    );
    let r = f
        .call(
            "GET",
            "/fhir/Patient?identifier=urn:mrn|MRN-77",
            Some(&b),
            None,
        )
        .await;
    assert_eq!((r.status, r.json["total"].as_u64()), (200, Some(0)));
    let r = f
        .call(
            "GET",
            "/fhir/Observation?patient=pa&_include=Observation:subject",
            Some(&b),
            None,
        )
        .await;
    assert_eq!(r.json["total"], 0);
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa/_history", Some(&b), None)
            .await,
        404,
    );
    let r = f
        .call("GET", "/fhir/Observation/_history", Some(&b), None)
        .await;
    assert_eq!(r.json["total"], 0, "{}", r.text);
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa/$everything", Some(&b), None)
            .await,
        404,
    );
    // The tenant's own data is still there for its own tokens.
    let a = f.token("app-a", "user/*.rs", &["--tenant", "hospital-a"]);
    assert_eq!(f.get_status("/fhir/Patient/pa", &a).await, 200);
    f.stop();
    let records = export_audit(&f, None);
    let attempts: Vec<&Value> = records
        .iter()
        .map(|e| &e["body"])
        .filter(|b| b["client"] == "app-b")
        .collect();
    assert_eq!(attempts.len(), 6, "every cross-tenant attempt is audited");
    assert!(attempts.iter().all(|b| b["tenant"] == "hospital-b"));
    assert!(attempts
        .iter()
        .any(|b| b["status"] == 404 && b["resource_id"] == "pa"));
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_consent_fails_the_next_request() {
    let f = Facade::start(None);
    seed(&f, None).await;
    let t = f.token(
        "portal",
        "patient/*.rs",
        &["--patient", "pa", "--grant", "consent-2026-0042"],
    );
    let other = f.token(
        "portal",
        "patient/*.rs",
        &["--patient", "pa", "--grant", "consent-2026-0043"],
    );
    assert_eq!(f.get_status("/fhir/Patient/pa", &t).await, 200);
    let out = cli(&f, &["consent", "revoke", "consent-2026-0042"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&t), None).await,
        401,
    );
    assert_outcome(
        &f.call("GET", "/fhir/Observation", Some(&t), None).await,
        401,
    );
    assert_eq!(f.get_status("/fhir/Patient/pa", &other).await, 200);
    // The admin endpoint does the same for a running server.
    let admin = f.token("ops", "system/*.cruds", &["--role", "admin"]);
    assert_eq!(
        f.call(
            "POST",
            "/admin/consent/consent-2026-0043/revoke",
            Some(&admin),
            None
        )
        .await
        .status,
        200
    );
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&other), None).await,
        401,
    );
    // Another tenant's admin revokes only its own tenant's tokens under that id.
    let third = f.token(
        "portal",
        "patient/*.rs",
        &["--patient", "pa", "--grant", "consent-2026-0044"],
    );
    let elsewhere = f.token(
        "ops",
        "system/*.cruds",
        &["--role", "admin", "--tenant", "elsewhere"],
    );
    let r = f
        .call(
            "POST",
            "/admin/consent/consent-2026-0044/revoke",
            Some(&elsewhere),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(f.get_status("/fhir/Patient/pa", &third).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_report_for_one_patient_and_window_lists_every_access_without_phi() {
    let mut f = Facade::start(None);
    let admin = seed(&f, None).await;
    let start = tributary_core::format_rfc3339_millis(tributary_core::now_millis() - 1);
    let portal = f.token("portal", "patient/*.rs", &["--patient", "pa"]);
    let clinic = f.token("clinic-app", "user/*.rs", &["--sub", "dr-7"]);
    let nosy = f.token("nosy", "patient/*.rs", &["--patient", "pb"]);
    assert_eq!(f.get_status("/fhir/Patient/pa", &portal).await, 200);
    assert_eq!(f.get_status("/fhir/Observation/oa", &clinic).await, 200);
    assert_eq!(
        f.get_status("/fhir/Observation?patient=pa", &clinic).await,
        200
    );
    assert_eq!(f.get_status("/fhir/Patient/pa", &nosy).await, 403);
    assert_eq!(f.get_status("/fhir/Patient/pb", &clinic).await, 200); // other patient
    let end = tributary_core::format_rfc3339_millis(tributary_core::now_millis() + 1);
    let auditor = f.token("siem", "user/*.rs", &["--role", "audit"]);
    // The auditor reads audit, nothing clinical.
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&auditor), None)
            .await,
        403,
    );
    assert_outcome(
        &f.call("GET", "/fhir/AuditEvent", Some(&admin), None).await,
        403,
    );
    let r = f
        .call(
            "GET",
            &format!("/fhir/AuditEvent?patient=pa&date=ge{start}&date=le{end}"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events: Vec<&Value> = r.json["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["agent"][0]["who"]["identifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["entity"][0]["what"]["reference"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("portal".into(), "Patient/pa".into(), "0".into()),
            ("clinic-app".into(), "Observation/oa".into(), "0".into()),
            ("clinic-app".into(), "Observation".into(), "0".into()),
            ("nosy".into(), "Patient/pa".into(), "4".into()),
        ],
        "{}",
        r.text
    );
    assert_eq!(events[1]["agent"][0]["altId"], "dr-7");
    assert_eq!(r.json["total"], 4);
    // Page by page (one record each), every next link continuing after the page's last
    // record: the same records in the same order, then no next link.
    let window = format!("patient=pa&date=ge{start}&date=le{end}");
    let mut url = format!("/fhir/AuditEvent?{window}&_count=1");
    let mut paged = Vec::new();
    loop {
        let page = f.call("GET", &url, Some(&auditor), None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        assert_eq!(
            page.json["entry"].as_array().unwrap().len(),
            1,
            "{}",
            page.text
        );
        paged.push(page.json["entry"][0]["resource"]["id"].clone());
        let links = page.json["link"].as_array().unwrap();
        let Some(next) = links.iter().find(|l| l["relation"] == "next") else {
            break;
        };
        let next = next["url"].as_str().unwrap();
        url = next[next.find("/fhir/").unwrap()..].to_string();
        assert!(
            paged.len() <= events.len(),
            "next links past the end: {url}"
        );
    }
    let ids: Vec<Value> = events.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(paged, ids);
    let counted = f
        .call(
            "GET",
            &format!("/fhir/AuditEvent?{window}&_count=0"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(counted.json["total"], 4, "{}", counted.text);
    assert_eq!(counted.json["entry"].as_array().map_or(0, Vec::len), 0);
    // Filters on the AuditEvent's own codes.
    let only = |query: String| {
        let f = &f;
        let auditor = &auditor;
        async move {
            let r = f
                .call(
                    "GET",
                    &format!("/fhir/AuditEvent?{query}"),
                    Some(auditor),
                    None,
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            r.json["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"]["id"].clone())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        only(format!("{window}&outcome=4")).await,
        vec![ids[3].clone()]
    );
    assert_eq!(
        only(format!("{window}&agent=clinic-app&subtype=read")).await,
        vec![ids[1].clone()]
    );
    assert_eq!(
        only(format!(
            "{window}&type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest&action=R"
        ))
        .await,
        vec![ids[0].clone(), ids[1].clone(), ids[3].clone()]
    );
    assert_outcome(
        &f.call(
            "GET",
            &format!("/fhir/AuditEvent?{window}&_cursor=x"),
            Some(&auditor),
            None,
        )
        .await,
        400,
    );
    for phi in PHI {
        assert!(!r.text.contains(phi), "audit report leaks {phi}");
    }
    // The same records as JSON lines for a SIEM, also PHI-free.
    f.stop();
    let lines = export_audit(&f, Some(&start));
    assert!(lines.len() >= 8, "{}", lines.len());
    let text = serde_json::to_string(&lines).unwrap();
    for phi in PHI {
        assert!(!text.contains(phi), "audit export leaks {phi}");
    }
    for l in &lines {
        let b = &l["body"];
        for k in [
            "time",
            "request_id",
            "interaction",
            "outcome",
            "status",
            "latency_us",
            "policy_version",
            "break_glass",
        ] {
            assert!(b.get(k).is_some(), "record lacks {k}: {b}");
        }
    }
    // The server logs are PHI-free too.
    let log = f.log();
    for phi in PHI {
        assert!(!log.contains(phi), "server log leaks {phi}");
    }
}

/// Bundles are audited entry by entry (and searches across patients patient by patient): those
/// records are exported PHI-free, `audit verify` passes over them, and an edit of one is named.
#[tokio::test(flavor = "multi_thread")]
async fn bundle_entry_records_are_exported_verified_and_tamper_evident() {
    let mut f = Facade::start(None);
    let admin = seed(&f, None).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/oa"}},
        {"request": {"method": "GET", "url": "Patient?name=Quixote"}},
        {"request": {"method": "GET", "url": "Observation/ob"}}
    ]});
    let r = f.call("POST", "/fhir", Some(&admin), Some(&batch)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "MRN-77"}, "subject": {"reference": "Patient/pa"}}, "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = f.call("POST", "/fhir", Some(&admin), Some(&tx)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(f.get_status("/fhir/Patient/pa", &admin).await, 200);
    f.stop();
    let lines = export_audit(&f, None);
    let text = serde_json::to_string(&lines).unwrap();
    for phi in PHI {
        assert!(!text.contains(phi), "audit export leaks {phi}");
    }
    let parts: Vec<(u64, &str, &str, &str)> = lines
        .iter()
        .filter(|l| l["body"]["kind"] != "fhir-request")
        .map(|l| {
            let b = &l["body"];
            (
                l["seq"].as_u64().unwrap(),
                b["kind"].as_str().unwrap(),
                b["interaction"].as_str().unwrap(),
                b["patient"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let shape: Vec<_> = parts.iter().map(|(_, k, i, p)| (*k, *i, *p)).collect();
    assert_eq!(
        shape,
        [
            ("fhir-bundle-entry", "read", "pa"),
            ("fhir-bundle-entry", "search-type", ""),
            ("fhir-disclosure", "search-type", "pa"),
            ("fhir-bundle-entry", "read", "pb"),
            ("fhir-bundle-entry", "create", "pa"),
        ]
    );
    let ok = cli(&f, &["audit", "verify"]);
    assert!(
        ok.status.success(),
        "a chain with entry records must verify: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let seq = parts[0].0;
    {
        let db = tributary_storage::Db::open(data_dir(&f.dir), Default::default()).unwrap();
        let log = tributary_storage::AuditLog::new(db);
        let raw = String::from_utf8(log.raw(seq).unwrap().unwrap()).unwrap();
        let edited = raw.replace("\"patient\":\"pa\"", "\"patient\":\"pb\"");
        assert_ne!(raw, edited);
        log.tamper_raw(seq, Some(edited.into_bytes()))
            .await
            .unwrap();
    }
    let out = cli(&f, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(out.contains(&format!("record {}", seq + 1)), "{out}");
}

async fn tampered_verify(
    tamper: impl FnOnce(
        &tributary_storage::AuditLog,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>,
) -> String {
    let mut f = Facade::start(None);
    let t = seed(&f, None).await;
    for _ in 0..4 {
        f.call("GET", "/fhir/Patient/pa", Some(&t), None).await;
    }
    f.stop();
    let ok = cli(&f, &["audit", "verify"]);
    assert!(
        ok.status.success(),
        "intact chain must verify: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    {
        let db = tributary_storage::Db::open(data_dir(&f.dir), Default::default()).unwrap();
        let log = tributary_storage::AuditLog::new(db);
        tamper(&log).await;
    }
    let out = cli(&f, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_tamper_modify_is_detected_and_named() {
    let out = tampered_verify(|log| {
        Box::pin(async move {
            let raw = String::from_utf8(log.raw(5).unwrap().unwrap()).unwrap();
            let edited = raw.replace("\"status\":200", "\"status\":403");
            assert_ne!(raw, edited);
            log.tamper_raw(5, Some(edited.into_bytes())).await.unwrap();
        })
    })
    .await;
    assert!(out.contains("record 6") && out.contains("edited"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_tamper_delete_is_detected_and_named() {
    let out =
        tampered_verify(|log| Box::pin(async move { log.tamper_raw(3, None).await.unwrap() }))
            .await;
    assert!(out.contains("record 3") && out.contains("missing"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_tamper_reorder_is_detected_and_named() {
    let out = tampered_verify(|log| {
        Box::pin(async move {
            let a = log.raw(4).unwrap().unwrap();
            let b = log.raw(5).unwrap().unwrap();
            log.tamper_raw(4, Some(b)).await.unwrap();
            log.tamper_raw(5, Some(a)).await.unwrap();
        })
    })
    .await;
    assert!(out.contains("record 4"), "{out}");
}

/// A stand-in identity provider: serves one JWKS over loopback HTTP until dropped.
struct Idp {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Idp {
    async fn start(jwks: String) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let body = jwks.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Idp { addr, task }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_network_blocked_keeps_serving_enforcing_and_auditing() {
    // The identity provider's key lives elsewhere; the facade only knows its JWKS URL.
    let idp_dir = tempfile::tempdir().unwrap();
    let idp_key = tributary_facade::LocalSigningKey::load_or_create(idp_dir.path()).unwrap();
    let idp = Idp::start(json!({"keys": [idp_key.jwk()]}).to_string()).await;
    let idp_token = |scope: &str, extra: &[&str]| {
        let out = std::process::Command::new(tributary_e2e::workspace_bin("tributary"))
            .args(["token", "issue", "--client", "partner", "--scope", scope])
            .args(extra)
            .arg("--data-dir")
            .arg(idp_dir.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let config = format!("[facade.auth]\nlocal_key = false\njwks_url = \"http://{}/jwks.json\"\njwks_refresh_min_secs = 1\n", idp.addr);
    let mut f = Facade::start(Some(&config));
    let admin = idp_token("system/*.cruds", &[]);
    let p = json!({"resourceType": "Patient", "id": "pa", "gender": "female"});
    assert_eq!(
        f.call("PUT", "/fhir/Patient/pa", Some(&admin), Some(&p))
            .await
            .status,
        201
    );
    // Cut the network: the identity provider is gone, and the facade restarts without it.
    idp.task.abort();
    let _ = idp.task.await;
    f.restart();
    let reader = idp_token("patient/*.rs", &["--patient", "pa"]);
    let r = f.call("GET", "/fhir/Patient/pa", Some(&reader), None).await;
    assert_eq!(
        r.status, 200,
        "token validation from the cached JWKS: {}",
        r.text
    );
    assert_outcome(
        &f.call("GET", "/fhir/Patient/other", Some(&reader), None)
            .await,
        403,
    );
    assert_outcome(&f.call("GET", "/fhir/Patient/pa", None, None).await, 401);
    // A token from an unknown key still fails (the refresh attempt fails fast, offline).
    let stranger = untrusted_token("x");
    assert_outcome(
        &f.call("GET", "/fhir/Patient/pa", Some(&stranger), None)
            .await,
        401,
    );
    f.stop();
    let records = export_audit(&f, None);
    let after_cut: Vec<&Value> = records
        .iter()
        .map(|e| &e["body"])
        .filter(|b| b["interaction"] == "read")
        .collect();
    assert_eq!(after_cut.len(), 4, "every request after the cut is audited");
    assert!(cli(&f, &["audit", "verify"]).status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_429_carries_headers_and_bulk_cannot_starve_other_clients() {
    let config = "[facade.rate_limit.overrides]\n\"default/bulk\" = { burst = 100, per_sec = 5 }\n";
    let f = std::sync::Arc::new(Facade::start(Some(config)));
    seed(&f, None).await;
    let bulk = f.token("bulk", "system/*.rs", &[]);
    let bedside = f.token("bedside", "user/*.rs", &["--sub", "nurse-1"]);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (f, t) = (f.clone(), bulk.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..15 {
                let r = f
                    .call("GET", "/fhir/Patient/pa/$everything", Some(&t), None)
                    .await;
                out.push((r.status, r.headers));
            }
            out
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (f, t) = (f.clone(), bedside.clone());
        readers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..20 {
                statuses.push(f.get_status("/fhir/Observation/oa", &t).await);
            }
            statuses
        }));
    }
    let mut bulk_results = Vec::new();
    for t in tasks {
        bulk_results.extend(t.await.unwrap());
    }
    let mut reader_statuses = Vec::new();
    for t in readers {
        reader_statuses.extend(t.await.unwrap());
    }
    let limited: Vec<_> = bulk_results.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!limited.is_empty(), "the bulk client must be limited");
    assert!(
        bulk_results.iter().any(|(s, _)| *s == 200),
        "the bulk client gets its share"
    );
    for (_, h) in &limited {
        let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
        // its `$everything` bucket: the default fifth of its burst of 100
        assert_eq!(h["ratelimit-limit"], "20");
        assert!(h.contains_key("ratelimit-remaining") && h.contains_key("ratelimit-reset"));
    }
    for (_, h) in bulk_results.iter().filter(|(s, _)| *s == 200) {
        assert!(h.contains_key("ratelimit-remaining"));
    }
    assert_eq!(reader_statuses.len(), 60);
    assert!(
        reader_statuses.iter().all(|s| *s == 200),
        "point-of-care reads starved: {reader_statuses:?}"
    );
}

/// A well-formed token for `client` (scope `user/*.rs`) signed by a key the server under test
/// does not trust: issued from a data directory of its own.
fn untrusted_token(client: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    tributary_e2e::issued_token(
        std::process::Command::new(tributary_e2e::workspace_bin("tributary"))
            .args(["token", "issue", "--client", client, "--scope", "user/*.rs"])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap(),
    )
}
