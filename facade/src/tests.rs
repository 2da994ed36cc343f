//! Router-level tests with `oneshot`: the whole policy stack over a temporary store, no sockets.

use super::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;
use tributary_runtime::ComponentStatus;
use tributary_storage::{Db, DbOptions};

pub(crate) struct Env {
    _dir: tempfile::TempDir,
    st: AppState,
}

pub(crate) fn env_with(cfg: FacadeConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let rt = Runtime::embedded(db, 0);
    let facade = Arc::new(Facade::new(cfg, dir.path(), "default").unwrap());
    Env {
        st: AppState {
            rt: Arc::new(rt),
            facade,
        },
        _dir: dir,
    }
}

fn env() -> Env {
    env_with(FacadeConfig::default())
}

impl Env {
    pub(crate) fn token(&self, scope: &str, f: impl FnOnce(&mut IssueRequest)) -> String {
        let mut r = IssueRequest {
            client_id: "app".into(),
            scope: scope.into(),
            ttl_secs: 600,
            issuer: "tributary".into(),
            audience: "tributary".into(),
            ..Default::default()
        };
        f(&mut r);
        auth::issue(self.st.facade.local_key.as_ref().unwrap(), &r).unwrap()
    }

    pub(crate) async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.call_h(method, uri, token, body, &[]).await
    }

    /// The `Type/id`s a search answers with (it must answer 200).
    pub(crate) async fn found(&self, uri: &str, token: &str) -> Vec<String> {
        ids(&self.get_ok(uri, token).await)
    }

    /// Each GET is refused as the client's error: 400 with an OperationOutcome.
    pub(crate) async fn refuses(&self, token: &str, uris: &[&str]) {
        for uri in uris {
            let (s, _, b) = self.call("GET", uri, Some(token), None).await;
            assert_eq!(s, 400, "{uri}: {b}");
            assert_eq!(b["resourceType"], "OperationOutcome", "{uri}");
        }
    }

    /// A transaction or batch Bundle posted to the base with request id `request_id`.
    pub(crate) async fn post_bundle(
        &self,
        token: &str,
        bundle: Value,
        request_id: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let id = [("x-request-id", request_id)];
        self.call_h("POST", "/fhir", Some(token), Some(bundle), &id)
            .await
    }

    pub(crate) async fn call_h(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let (status, headers, bytes) = self.call_bytes(method, uri, token, body, extra).await;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (status, headers, v)
    }

    /// `PUT`s each resource at `/fhir/<type>/<id>`, asserting success.
    pub(crate) async fn put_all(&self, token: &str, resources: impl IntoIterator<Item = Value>) {
        for r in resources {
            let uri = format!(
                "/fhir/{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            let (s, _, b) = self.call("PUT", &uri, Some(token), Some(r)).await;
            assert!(s.is_success(), "{uri}: {b}");
        }
    }

    /// `GET uri` with `token`, asserting 200 (naming the URI otherwise); the body.
    pub(crate) async fn get_ok(&self, uri: &str, token: &str) -> Value {
        let (s, _, b) = self.call("GET", uri, Some(token), None).await;
        assert_eq!(s, 200, "{uri}: {b}");
        b
    }

    /// [`Env::call_h`] with the body as it came (NDJSON, say).
    pub(crate) async fn call_bytes(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "test");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let req = b
            .body(
                body.map(|v| Body::from(v.to_string()))
                    .unwrap_or_else(Body::empty),
            )
            .unwrap();
        let res = app(self.st.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 24)
            .await
            .unwrap();
        (status, headers, bytes)
    }

    pub(crate) fn audit(&self) -> Vec<Value> {
        self.st
            .rt
            .audit
            .read_after(0, 100_000)
            .unwrap()
            .into_iter()
            .map(|e| e.body)
            .collect()
    }
}

fn patient(id: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Ann"]}], "birthDate": "1970-01-02", "gender": "female", "identifier": [{"system": "urn:mrn", "value": format!("MRN-{id}")}]})
}

fn obs(id: &str, patient: &str, cat: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "category": [{"coding": [{"code": cat}]}], "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": "2024-03-05T10:00:00Z"})
}

pub(crate) async fn seed(e: &Env) -> String {
    let admin = e.token("system/*.cruds", |_| {});
    for (id, fam) in [("p1", "Smith"), ("p2", "Jones")] {
        let (s, _, _) = e
            .call(
                "PUT",
                &format!("/fhir/Patient/{id}"),
                Some(&admin),
                Some(patient(id, fam)),
            )
            .await;
        assert!(s.is_success(), "{s}");
    }
    for (id, p, cat) in [
        ("o1", "p1", "laboratory"),
        ("o2", "p1", "vital-signs"),
        ("o3", "p2", "laboratory"),
    ] {
        let (s, _, _) = e
            .call(
                "PUT",
                &format!("/fhir/Observation/{id}"),
                Some(&admin),
                Some(obs(id, p, cat)),
            )
            .await;
        assert!(s.is_success(), "{s}");
    }
    admin
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap_or(""),
                        e["resource"]["id"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn ready_reflects_components() {
    let e = env();
    e.st.rt.readiness.set("store", ComponentStatus::Ready);
    e.st.rt.readiness.set("mllp", ComponentStatus::Starting);
    assert_eq!(
        e.call("GET", "/ready", None, None).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    e.st.rt.readiness.set("mllp", ComponentStatus::Ready);
    let (code, _, body) = e.call("GET", "/ready", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    assert_eq!(e.call("GET", "/health", None, None).await.0, StatusCode::OK);

    // a downstream outage: still serving, and saying why
    let reason = "kafka brokers unreachable".to_string();
    e.st.rt
        .readiness
        .set("kafka", ComponentStatus::Degraded { reason });
    let (code, _, body) = e.call("GET", "/ready", None, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["components"]["kafka"]["status"], "degraded");
    assert_eq!(
        body["components"]["kafka"]["reason"],
        "kafka brokers unreachable"
    );
    e.st.rt.readiness.set(
        "mllp",
        ComponentStatus::Failed {
            reason: "address in use".into(),
        },
    );
    let (code, _, body) = e.call("GET", "/ready", None, None).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
}

#[tokio::test]
async fn metrics_count_requests_by_interaction_and_status_without_phi() {
    let e = env();
    e.st.rt.readiness.set("store", ComponentStatus::Ready);
    e.st.rt.metrics.track_outbox_consumer("kafka");
    let admin = seed(&e).await;
    let reader = e.token("patient/Patient.read", |r| r.patient = Some("p1".into()));
    for (path, token, want) in [
        ("/fhir/Patient/p1", Some(&reader), 200),
        ("/fhir/Patient/p1", Some(&reader), 200),
        ("/fhir/Patient/p2", Some(&reader), 403),
        ("/fhir/Patient/p1", None, 401),
    ] {
        let got = e.call("GET", path, token.map(String::as_str), None).await.0;
        assert_eq!(got, want, "{path}");
    }
    let res = app(e.st.clone())
        .oneshot(
            Request::builder()
                .uri("/metrics")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(
        axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "tributary_http_requests_total{interaction=\"read\",status=\"200\"} 2",
        "tributary_http_requests_total{interaction=\"read\",status=\"403\"} 1",
        "tributary_http_requests_total{interaction=\"read\",status=\"401\"} 1",
        "tributary_http_requests_total{interaction=\"update\",status=\"201\"} 5",
        "tributary_http_request_duration_seconds_count{interaction=\"read\"} 4",
        "tributary_outbox_head_seq 5",
        "tributary_outbox_lag_events{relay=\"kafka\"} 5",
        "tributary_component_ready{component=\"store\"} 1",
        // One durable audit record per request above.
        "tributary_audit_records_total 9",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in\n{text}");
    }
    // Names, birth dates, identifiers, resource ids and tokens never appear.
    for phi in [
        "Smith",
        "Jones",
        "Ann",
        "1970-01-02",
        "MRN-",
        "p1",
        "p2",
        admin.as_str(),
    ] {
        assert!(!text.contains(phi), "{phi:?} leaked into /metrics");
    }
}

#[tokio::test]
async fn unauthenticated_requests_get_401_outcome_and_are_audited() {
    let e = env();
    let (s, h, body) = e.call("GET", "/fhir/Patient/p1", None, None).await;
    assert_eq!(s, 401);
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(h.contains_key("www-authenticate"));
    let (s, _, _) = e
        .call("GET", "/fhir/Patient/p1", Some("garbage"), None)
        .await;
    assert_eq!(s, 401);
    let audit = e.audit();
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0]["outcome"], "denied");
    assert_eq!(audit[0]["status"], 401);
    assert_eq!(audit[0]["interaction"], "read");
    // Metadata is public.
    let (s, _, cs) = e.call("GET", "/fhir/metadata", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    // Dated when this configuration took effect (a dateTime), not a date fixed in the code.
    let date = cs["date"].as_str().unwrap();
    let at = tributary_core::parse_rfc3339_millis(date).expect("date is an RFC 3339 dateTime");
    assert!(
        (tributary_core::now_millis() - at).abs() < 600_000,
        "{date}"
    );
}

#[tokio::test]
async fn crud_versioning_and_errors() {
    let e = env();
    let t = e.token("user/*.cruds", |_| {});
    let (s, h, created) = e
        .call(
            "POST",
            "/fhir/Patient",
            Some(&t),
            Some(json!({"resourceType": "Patient", "gender": "male"})),
        )
        .await;
    assert_eq!(s, 201);
    let id = created["id"].as_str().unwrap().to_string();
    assert!(h["location"]
        .to_str()
        .unwrap()
        .contains(&format!("/fhir/Patient/{id}/_history/1")));
    assert_eq!(h["etag"], "W/\"1\"");
    let mut upd = created.clone();
    upd["gender"] = json!("female");
    let (s, _, _) = e
        .call_h(
            "PUT",
            &format!("/fhir/Patient/{id}"),
            Some(&t),
            Some(upd.clone()),
            &[("if-match", "W/\"7\"")],
        )
        .await;
    assert_eq!(s, 412);
    let (s, h, _) = e
        .call_h(
            "PUT",
            &format!("/fhir/Patient/{id}"),
            Some(&t),
            Some(upd),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["etag"], "W/\"2\"");
    let (s, _, v1) = e
        .call(
            "GET",
            &format!("/fhir/Patient/{id}/_history/1"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!((s, v1["gender"].as_str()), (StatusCode::OK, Some("male")));
    let (s, _, hist) = e
        .call(
            "GET",
            &format!("/fhir/Patient/{id}/_history"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!((s, hist["total"].as_u64()), (StatusCode::OK, Some(2)));
    assert_eq!(
        e.call("DELETE", &format!("/fhir/Patient/{id}"), Some(&t), None)
            .await
            .0,
        204
    );
    assert_eq!(
        e.call("GET", &format!("/fhir/Patient/{id}"), Some(&t), None)
            .await
            .0,
        410
    );
    assert_eq!(
        e.call("GET", "/fhir/Patient/nope", Some(&t), None).await.0,
        404
    );
    assert_eq!(
        e.call("GET", "/fhir/Nonsense/1", Some(&t), None).await.0,
        404
    );
    assert_eq!(
        e.call(
            "POST",
            "/fhir/Patient",
            Some(&t),
            Some(json!({"resourceType": "Observation"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        e.call(
            "POST",
            "/fhir/Patient",
            Some(&t),
            Some(json!({"resourceType": "Patient", "id": "bad id!"}))
        )
        .await
        .0,
        422
    );
    // Conditional create: the second finds the first.
    let body =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "42"}]});
    let (s1, _, a) = e
        .call_h(
            "POST",
            "/fhir/Patient",
            Some(&t),
            Some(body.clone()),
            &[("if-none-exist", "identifier=urn:mrn|42")],
        )
        .await;
    let (s2, _, b) = e
        .call_h(
            "POST",
            "/fhir/Patient",
            Some(&t),
            Some(body),
            &[("if-none-exist", "identifier=urn:mrn|42")],
        )
        .await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(a["id"], b["id"]);
    // Conditional update.
    let (s, _, c) = e.call("PUT", "/fhir/Patient?identifier=urn:mrn|42", Some(&t), Some(json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "42"}], "gender": "other"}))).await;
    assert_eq!(s, 200);
    assert_eq!(c["id"], a["id"]);
}

#[tokio::test]
async fn search_paging_include_and_summary() {
    let e = env();
    let admin = seed(&e).await;
    let (s, _, b) = e
        .call("GET", "/fhir/Observation?_count=2", Some(&admin), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(b["total"], 3);
    assert_eq!(ids(&b).len(), 2);
    let next = b["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let next_path = next.trim_start_matches("http://test");
    let (_, _, b2) = e.call("GET", next_path, Some(&admin), None).await;
    assert_eq!(ids(&b2), vec!["Observation/o3"]);
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?patient=p1&_include=Observation:subject",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        ids(&b),
        vec!["Observation/o1", "Observation/o2", "Patient/p1"]
    );
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?category=laboratory&code=http://loinc.org|718-7",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(ids(&b), vec!["Observation/o1", "Observation/o3"]);
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Patient?name=smi&birthdate=ge1970-01-01&gender=female",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(ids(&b), vec!["Patient/p1"]);
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Patient?identifier=urn:mrn|MRN-p2",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(ids(&b), vec!["Patient/p2"]);
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?_summary=count",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(b["total"], 3);
    assert!(b.get("entry").is_none());
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?date=ge2024-03-01&date=lt2024-04-01&_sort=-_lastUpdated",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(
        ids(&b),
        vec!["Observation/o3", "Observation/o2", "Observation/o1"]
    );
    assert_eq!(
        e.call("GET", "/fhir/Observation?bogus=1", Some(&admin), None)
            .await
            .0,
        400
    );
    let (_, _, b) = e
        .call("GET", "/fhir/Patient/p1/$everything", Some(&admin), None)
        .await;
    assert_eq!(
        ids(&b),
        vec!["Patient/p1", "Observation/o1", "Observation/o2"]
    );
    let (_, _, b) = e
        .call("GET", "/fhir/Observation/_history", Some(&admin), None)
        .await;
    assert_eq!(b["total"], 3);
}

#[tokio::test]
async fn patient_context_is_narrowed_everywhere() {
    let e = env();
    seed(&e).await;
    let t = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&t), None).await.0,
        200
    );
    assert_eq!(
        e.call("GET", "/fhir/Patient/p2", Some(&t), None).await.0,
        403
    );
    assert_eq!(
        e.call("GET", "/fhir/Observation/o3", Some(&t), None)
            .await
            .0,
        403
    );
    // The audit names the patient whose data was asked for, not the token's own patient.
    assert_eq!(e.audit().pop().unwrap()["patient"], "p2");
    assert_eq!(
        e.call("GET", "/fhir/Observation/o3/_history", Some(&t), None)
            .await
            .0,
        403
    );
    assert_eq!(
        e.call("GET", "/fhir/Observation/o3/_history/1", Some(&t), None)
            .await
            .0,
        403
    );
    assert_eq!(
        e.call("GET", "/fhir/Patient/p2/$everything", Some(&t), None)
            .await
            .0,
        403
    );
    assert_eq!(
        e.call(
            "GET",
            "/fhir/Observation?subject=Patient/p2",
            Some(&t),
            None
        )
        .await
        .0,
        403
    );
    let (_, _, b) = e.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_eq!(ids(&b), vec!["Observation/o1", "Observation/o2"]);
    let (_, _, b) = e.call("GET", "/fhir/Patient", Some(&t), None).await;
    assert_eq!(ids(&b), vec!["Patient/p1"]);
    let (_, _, b) = e
        .call("GET", "/fhir/Observation/_history", Some(&t), None)
        .await;
    assert_eq!(b["total"], 2);
    // v2 narrowing by category.
    let lab = e.token("patient/Observation.rs?category=laboratory", |r| {
        r.patient = Some("p1".into())
    });
    let (_, _, b) = e.call("GET", "/fhir/Observation", Some(&lab), None).await;
    assert_eq!(ids(&b), vec!["Observation/o1"]);
    assert_eq!(
        e.call("GET", "/fhir/Observation/o2", Some(&lab), None)
            .await
            .0,
        403
    );
    // Scope mismatch.
    let pat_only = e.token("patient/Patient.read", |r| r.patient = Some("p1".into()));
    assert_eq!(
        e.call("GET", "/fhir/Observation/o1", Some(&pat_only), None)
            .await
            .0,
        403
    );
    // An _include that would reach another patient brings nothing.
    let admin = e.token("system/*.cruds", |_| {});
    let mut cross = obs("o9", "p1", "laboratory");
    cross["performer"] = json!([{"reference": "Patient/p2"}]);
    e.call("PUT", "/fhir/Observation/o9", Some(&admin), Some(cross))
        .await;
    let (_, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?_id=o9&_include=Observation:performer",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(ids(&b), vec!["Observation/o9"]);
}

/// `_sort` takes several keys; ties on one go to the next, then to the id; what has no value
/// for a key comes last in either direction.
#[tokio::test]
async fn sort_by_several_keys() {
    let e = env();
    let admin = e.token("system/*.cruds", |_| {});
    for (id, birth) in [
        ("pa", Some("1990-05-01")),
        ("pb", Some("1980")),
        ("pc", Some("1990-05-01")),
        ("pd", None),
    ] {
        let mut p = json!({"resourceType": "Patient", "id": id});
        if let Some(b) = birth {
            p["birthDate"] = json!(b);
        }
        let (s, _, _) = e
            .call("PUT", &format!("/fhir/Patient/{id}"), Some(&admin), Some(p))
            .await;
        assert!(s.is_success());
    }
    for (sort, expected) in [
        ("birthdate", ["pb", "pa", "pc", "pd"]),
        ("-birthdate", ["pa", "pc", "pb", "pd"]),
        ("-birthdate,-_id", ["pc", "pa", "pb", "pd"]),
        ("-_id", ["pd", "pc", "pb", "pa"]),
    ] {
        let b = e
            .get_ok(&format!("/fhir/Patient?_sort={sort}"), &admin)
            .await;
        let want: Vec<String> = expected.iter().map(|id| format!("Patient/{id}")).collect();
        assert_eq!(ids(&b), want, "{sort}");
    }
}

/// A chained parameter through the patient reference finds a patient's resources by what the
/// caller knows of the Patient (an MRN, a name), with the caller's own access to Patients.
#[tokio::test]
async fn chained_patient_parameters_find_resources_by_the_patients_own_parameters() {
    let e = env();
    let admin = seed(&e).await;
    // seed: p1 Smith (MRN-p1) with o1, o2; p2 Jones (MRN-p2) with o3
    assert_eq!(
        e.found(
            "/fhir/Observation?patient.identifier=urn:mrn|MRN-p1",
            &admin
        )
        .await,
        ["Observation/o1", "Observation/o2"]
    );
    assert_eq!(
        e.found("/fhir/Observation?subject:Patient.name=jones", &admin)
            .await,
        ["Observation/o3"]
    );
    assert_eq!(
        e.found(
            "/fhir/Observation?subject.identifier=MRN-p1,MRN-p2&category=laboratory",
            &admin
        )
        .await,
        ["Observation/o1", "Observation/o3"]
    );
    assert!(e
        .found(
            "/fhir/Observation?patient.identifier=urn:mrn|nobody",
            &admin
        )
        .await
        .is_empty());
    // a patient-context token's chain reaches its own patient only
    let t = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
    assert!(e
        .found("/fhir/Observation?patient.identifier=urn:mrn|MRN-p2", &t)
        .await
        .is_empty());
    assert_eq!(
        e.found("/fhir/Observation?patient.family=smith", &t).await,
        ["Observation/o1", "Observation/o2"]
    );
    // without search on Patient there is no chain through it
    let no_patients = e.token("user/Observation.rs", |_| {});
    let (s, _, _) = e
        .call(
            "GET",
            "/fhir/Observation?patient.identifier=MRN-p1",
            Some(&no_patients),
            None,
        )
        .await;
    assert_eq!(s, 403);
    e.refuses(
        &admin,
        &[
            "/fhir/Observation?patient.bogus=1",
            "/fhir/Observation?patient.birthdate=someday",
            "/fhir/Observation?performer.identifier=x",
            "/fhir/Observation?patient.organization.name=x",
            "/fhir/Patient?patient.identifier=MRN-p1",
            "/fhir/Practitioner?subject.identifier=MRN-p1",
        ],
    )
    .await;
}

/// `Prefer: return=minimal|representation|OperationOutcome` shapes what a write answers with,
/// on its own and inside a batch or transaction; the headers stay.
#[tokio::test]
async fn prefer_return_shapes_what_writes_answer_with() {
    let e = env();
    let admin = e.token("system/*.cruds", |_| {});
    let write = |method: &'static str, uri: &'static str, prefer: &'static str| {
        let (e, admin) = (&e, &admin);
        async move {
            let body = patient("pr1", "Ode");
            let h = [("prefer", prefer)];
            let extra: &[(&str, &str)] = if prefer.is_empty() { &[] } else { &h };
            e.call_bytes(method, uri, Some(admin), Some(body), extra)
                .await
        }
    };
    let (s, h, body) = write("POST", "/fhir/Patient", "return=minimal").await;
    assert_eq!(s, 201);
    assert!(body.is_empty(), "{body:?}");
    assert!(h["location"].to_str().unwrap().contains("/fhir/Patient/"));
    assert_eq!(h["etag"], "W/\"1\"");
    assert_eq!(h["preference-applied"], "return=minimal");
    let (s, h, body) = write("PUT", "/fhir/Patient/pr1", "return=OperationOutcome").await;
    assert_eq!(s, 201);
    let oo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(
        oo["issue"][0]["diagnostics"],
        "created Patient/pr1 version 1"
    );
    assert!(
        !String::from_utf8_lossy(&body).contains("Ode"),
        "no resource content"
    );
    assert_eq!(h["preference-applied"], "return=OperationOutcome");
    let (s, _, body) = write(
        "PUT",
        "/fhir/Patient/pr1",
        "respond-async, return=OperationOutcome",
    )
    .await;
    assert_eq!(s, 200);
    let oo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        oo["issue"][0]["diagnostics"],
        "unchanged Patient/pr1 version 1"
    );
    let (s, h, body) = write("PUT", "/fhir/Patient/pr1", "").await;
    assert_eq!(s, 200);
    let r: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["name"][0]["family"], "Ode");
    assert!(h.get("preference-applied").is_none());
    // in a batch: no resource with minimal, the outcome beside the status with OperationOutcome
    let bundle = |id: &str| {
        json!({"resourceType": "Bundle", "type": "batch", "entry": [{
            "resource": patient(id, "Ode"),
            "request": {"method": "PUT", "url": format!("Patient/{id}")}}]})
    };
    for (prefer, kind) in [
        ("return=minimal", "batch"),
        ("return=OperationOutcome", "transaction"),
    ] {
        let mut b = bundle(&format!("pr-{kind}"));
        b["type"] = json!(kind);
        let (s, _, out) = e
            .call_h(
                "POST",
                "/fhir",
                Some(&admin),
                Some(b),
                &[("prefer", prefer)],
            )
            .await;
        assert_eq!(s, 200, "{out}");
        let entry = &out["entry"][0];
        assert_eq!(entry["response"]["status"], "201 Created", "{out}");
        assert!(entry.get("resource").is_none(), "{out}");
        assert_eq!(
            entry["response"].get("outcome").is_some(),
            prefer == "return=OperationOutcome",
            "{out}"
        );
    }
    let (_, _, out) = e
        .call("POST", "/fhir", Some(&admin), Some(bundle("pr-default")))
        .await;
    assert_eq!(out["entry"][0]["resource"]["id"], "pr-default", "{out}");
}

/// `Patient/$match`: the Patients a described person may be, scored and graded, found through
/// the indexes, and only those the caller may search.
#[tokio::test]
async fn patient_match_ranks_candidates_by_identifier_then_demographics() {
    let e = env();
    let admin = seed(&e).await;
    // seed: p1 Ann Smith and p2 Ann Jones, both female, born 1970-01-02, MRN-p1 / MRN-p2
    let mut twin = patient("p3", "Smith");
    twin["identifier"] = json!([{"system": "urn:mrn", "value": "MRN-p3"}]);
    twin["gender"] = json!("male");
    twin["name"][0]["given"] = json!(["Bob"]);
    let (s, _, _) = e
        .call("PUT", "/fhir/Patient/p3", Some(&admin), Some(twin))
        .await;
    assert!(s.is_success());
    let ask = |who: Value, token: String, only_certain: bool| {
        let e = &e;
        async move {
            let body = json!({"resourceType": "Parameters", "parameter": [
                {"name": "resource", "resource": who},
                {"name": "onlyCertainMatches", "valueBoolean": only_certain}]});
            let (s, _, b) = e
                .call("POST", "/fhir/Patient/$match", Some(&token), Some(body))
                .await;
            (s, b)
        }
    };
    let graded = |b: &Value| -> Vec<(String, String, f64)> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["resource"]["id"].as_str().unwrap().to_string(),
                    x["search"]["extension"][0]["valueCode"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    x["search"]["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // by MRN: certain; Ann Jones (same given name and birth date, another family) is no match
    let by_mrn = json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN-p1"}],
        "name": [{"family": "Smith", "given": ["Ann"]}], "birthDate": "1970-01-02"});
    let (s, b) = ask(by_mrn.clone(), admin.clone(), false).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["type"], "searchset");
    assert_eq!(graded(&b), [("p1".to_string(), "certain".to_string(), 1.0)]);
    // by demographics only: p1 agrees on all four (probable); p2 on all but the family name (a
    // name change: possible); p3 on family name and birth date only (no match)
    let by_name = json!({"resourceType": "Patient", "name": [{"family": "SMITH", "given": ["ann"]}],
        "birthDate": "1970-01-02", "gender": "female"});
    let (s, b) = ask(by_name.clone(), admin.clone(), false).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        graded(&b),
        [
            ("p1".to_string(), "probable".to_string(), 0.85),
            ("p2".to_string(), "possible".to_string(), 0.6)
        ],
        "{b}"
    );
    // onlyCertainMatches leaves the demographic ones out
    let (_, b) = ask(by_name, admin.clone(), true).await;
    assert!(b.get("entry").is_none() || graded(&b).is_empty(), "{b}");
    // a patient-context token finds its own patient only; no Patient search, no match
    let p2 = e.token("patient/Patient.rs", |r| r.patient = Some("p2".into()));
    let (s, b) = ask(by_mrn.clone(), p2, false).await;
    assert_eq!(s, 200);
    assert!(b.get("entry").is_none() || graded(&b).is_empty(), "{b}");
    let no_search = e.token("user/Patient.r", |_| {});
    assert_eq!(ask(by_mrn, no_search, false).await.0, 403);
    let (s, b) = ask(json!({"resourceType": "Observation"}), admin, false).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["resourceType"], "OperationOutcome");
    // the audit record names the operation, and no detail of the person asked about
    let rec = e
        .audit()
        .into_iter()
        .rev()
        .find(|r| r["interaction"] == "operation-match" && r["status"] == 200)
        .expect("an audit record of the match");
    assert!(
        !rec.to_string().contains("Smith") && !rec.to_string().contains("MRN-p1"),
        "{rec}"
    );
}

/// `Observation/$lastn`: per code, the newest Observations that match, `max` of each; the
/// patient must be named or be the token's.
#[tokio::test]
async fn lastn_gives_the_newest_observations_per_code() {
    let e = env();
    let admin = seed(&e).await;
    // seed: o1 (p1, laboratory), o2 (p1, vital-signs), o3 (p2, laboratory): 718-7, 2024-03-05
    for (id, cat, code, when) in [
        ("o5", "laboratory", "718-7", "2024-04-01"),
        ("o6", "vital-signs", "8867-4", "2024-01-01"),
        ("o7", "vital-signs", "8867-4", "2024-02-01T08:00:00Z"),
    ] {
        let mut o = obs(id, "p1", cat);
        o["code"]["coding"][0]["code"] = json!(code);
        o["effectiveDateTime"] = json!(when);
        let (s, _, _) = e
            .call(
                "PUT",
                &format!("/fhir/Observation/{id}"),
                Some(&admin),
                Some(o),
            )
            .await;
        assert!(s.is_success());
    }
    for (query, want) in [
        ("patient=p1", vec!["o5", "o7"]),
        ("patient=p1&max=2", vec!["o5", "o1", "o7", "o6"]),
        (
            "subject=Patient/p1&category=laboratory&max=5",
            vec!["o5", "o1"],
        ),
        ("patient=p1&code=http://loinc.org|8867-4", vec!["o7"]),
        ("patient=p2", vec!["o3"]),
    ] {
        let got = e
            .found(&format!("/fhir/Observation/$lastn?{query}"), &admin)
            .await;
        let want: Vec<String> = want.iter().map(|id| format!("Observation/{id}")).collect();
        assert_eq!(got, want, "{query}");
    }
    // a patient-context token names no patient: its own
    let p2 = e.token("patient/Observation.rs", |r| r.patient = Some("p2".into()));
    assert_eq!(
        e.found("/fhir/Observation/$lastn", &p2).await,
        ["Observation/o3"]
    );
    e.refuses(
        &admin,
        &[
            "/fhir/Observation/$lastn",
            "/fhir/Observation/$lastn?patient=p1&max=0",
            "/fhir/Observation/$lastn?patient=p1&max=many",
            "/fhir/Observation/$lastn?patient=p1&_sort=date",
            "/fhir/Observation/$lastn?patient=p1&bogus=1",
        ],
    )
    .await;
    assert!(e
        .audit()
        .iter()
        .any(|r| r["interaction"] == "operation-lastn" && r["status"] == 200));
}

/// `encounter`, `performer`, `requester` and `based-on` find resources by the references they
/// hold, in lists and in backbone elements too, with a type modifier for a bare id.
#[tokio::test]
async fn reference_parameters_beside_patient() {
    let e = env();
    let admin = seed(&e).await;
    let refs = |v: &[&str]| {
        json!(v
            .iter()
            .map(|r| json!({"reference": r}))
            .collect::<Vec<_>>())
    };
    let mut o8 = obs("o8", "p1", "laboratory");
    o8["encounter"] = json!({"reference": "Encounter/e1"});
    o8["performer"] = refs(&["Practitioner/dr1", "Organization/lab1"]);
    o8["basedOn"] = refs(&["ServiceRequest/sr1"]);
    let mut o9 = obs("o9", "p1", "laboratory");
    o9["encounter"] = json!({"reference": "https://other.example/fhir/Encounter/e2"});
    o9["performer"] = refs(&["Practitioner/dr2"]);
    let sr1 = json!({"resourceType": "ServiceRequest", "id": "sr1", "status": "active",
        "intent": "order", "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "Practitioner/dr1"}});
    let pr1 = json!({"resourceType": "Procedure", "id": "pr1", "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "performer": [{"actor": {"reference": "Practitioner/dr1"}}]});
    // the orderer at an ordering facility, as the library maps ORC-12 with ORC-21
    let role1 = json!({"resourceType": "PractitionerRole", "id": "role1",
        "practitioner": {"reference": "Practitioner/dr1"},
        "organization": {"reference": "Organization/clinic1"}});
    // an order whose requester is that role, and the visit o8 belongs to
    let sr2 = json!({"resourceType": "ServiceRequest", "id": "sr2", "status": "active",
        "intent": "order", "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "PractitionerRole/role1"}});
    let e1 = json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"code": "IMP"}, "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:visit", "value": "V1"}]});
    e.put_all(&admin, [o8, o9, sr1, pr1, role1, sr2, e1]).await;
    for (uri, want) in [
        ("/fhir/Observation?encounter=e1", vec!["Observation/o8"]),
        (
            "/fhir/Observation?encounter=Encounter/e2",
            vec!["Observation/o9"],
        ),
        (
            "/fhir/Observation?encounter:missing=true&patient=p1",
            vec!["Observation/o1", "Observation/o2"],
        ),
        ("/fhir/Observation?performer=dr1", vec!["Observation/o8"]),
        (
            "/fhir/Observation?performer=Organization/lab1",
            vec!["Observation/o8"],
        ),
        (
            "/fhir/Observation?performer:Practitioner=dr2",
            vec!["Observation/o9"],
        ),
        ("/fhir/Observation?performer:Organization=dr2", vec![]),
        (
            "/fhir/Observation?based-on=ServiceRequest/sr1",
            vec!["Observation/o8"],
        ),
        (
            "/fhir/ServiceRequest?requester=Practitioner/dr1",
            vec!["ServiceRequest/sr1"],
        ),
        (
            "/fhir/Procedure?performer=Practitioner/dr1",
            vec!["Procedure/pr1"],
        ),
        (
            "/fhir/PractitionerRole?practitioner=dr1",
            vec!["PractitionerRole/role1"],
        ),
        (
            "/fhir/PractitionerRole?organization=Organization/clinic1",
            vec!["PractitionerRole/role1"],
        ),
        ("/fhir/PractitionerRole?practitioner=dr2", vec![]),
        // chained through a reference parameter: typed where it may point at several types
        (
            "/fhir/ServiceRequest?requester:PractitionerRole.practitioner=Practitioner/dr1",
            vec!["ServiceRequest/sr2"],
        ),
        (
            "/fhir/ServiceRequest?requester:PractitionerRole.practitioner=dr2",
            vec![],
        ),
        (
            "/fhir/Observation?encounter.identifier=urn:visit|V1",
            vec!["Observation/o8"],
        ),
        ("/fhir/Observation?encounter.identifier=V2", vec![]),
    ] {
        assert_eq!(e.found(uri, &admin).await, want, "{uri}");
    }
    // the chained type is searched with the caller's own scopes
    let orders_only = e.token("user/ServiceRequest.rs", |_| {});
    let (s, _, _) = e
        .call(
            "GET",
            "/fhir/ServiceRequest?requester:PractitionerRole.practitioner=dr1",
            Some(&orders_only),
            None,
        )
        .await;
    assert_eq!(s, 403);
    e.refuses(
        &admin,
        &[
            "/fhir/Patient?encounter=e1",
            "/fhir/Observation?requester=dr1",
            "/fhir/Observation?practitioner=dr1",
            "/fhir/Observation?organization=clinic1",
            "/fhir/ServiceRequest?requester.practitioner=dr1",
            "/fhir/ServiceRequest?requester:Nope.practitioner=dr1",
            "/fhir/ServiceRequest?requester:PractitionerRole.bogus=1",
            "/fhir/ServiceRequest?requester:PractitionerRole.organization.name=x",
            "/fhir/Observation?requester:PractitionerRole.practitioner=dr1",
        ],
    )
    .await;
    let (_, _, cap) = e.call("GET", "/fhir/metadata", None, None).await;
    let obs_params = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap()["searchParam"]
        .to_string();
    assert!(obs_params.contains("\"encounter\"") && obs_params.contains("\"based-on\""));
}

/// Modifiers: `:missing` on any parameter, `:not` on tokens (a resource without the element
/// matches), `:text` on codes and categories, and a resource type on references.
#[tokio::test]
async fn search_modifiers_missing_not_text_and_reference_type() {
    let e = env();
    let admin = seed(&e).await;
    // o4: p2's, no category, no date, a code known by its text only
    let o4 = json!({"resourceType": "Observation", "id": "o4", "status": "preliminary",
        "code": {"text": "Glucose [Mass/volume] fasting"}, "subject": {"reference": "Patient/p2"}});
    let (s, _, _) = e
        .call("PUT", "/fhir/Observation/o4", Some(&admin), Some(o4))
        .await;
    assert!(s.is_success());
    // seed: o1 (p1, laboratory), o2 (p1, vital-signs), o3 (p2, laboratory), all final, dated
    for (uri, want) in [
        (
            "/fhir/Observation?category:not=laboratory",
            vec!["o2", "o4"],
        ),
        (
            "/fhir/Observation?category:not=laboratory,vital-signs",
            vec!["o4"],
        ),
        ("/fhir/Observation?status:not=final", vec!["o4"]),
        ("/fhir/Observation?category:missing=true", vec!["o4"]),
        (
            "/fhir/Observation?category:missing=false",
            vec!["o1", "o2", "o3"],
        ),
        ("/fhir/Observation?date:missing=true", vec!["o4"]),
        ("/fhir/Observation?code:text=fasting", vec!["o4"]),
        ("/fhir/Observation?code:text=GLUC", vec!["o4"]),
        ("/fhir/Observation?code:text=ose", vec![]),
        ("/fhir/Observation?subject:Patient=p1", vec!["o1", "o2"]),
        (
            "/fhir/Observation?subject:Patient=Patient/p2",
            vec!["o3", "o4"],
        ),
        ("/fhir/Observation?subject:Group=p1", vec![]),
        ("/fhir/Observation?patient:missing=true", vec![]),
        (
            "/fhir/Patient?birthdate:missing=false&name:missing=false",
            vec!["p1", "p2"],
        ),
    ] {
        let (s, _, b) = e.call("GET", uri, Some(&admin), None).await;
        assert_eq!(s, 200, "{uri}: {b}");
        let got: Vec<String> = ids(&b)
            .into_iter()
            .map(|x| x.split('/').nth(1).unwrap_or_default().to_string())
            .collect();
        assert_eq!(got, want, "{uri}");
    }
    // a patient-context token's :not stays in its compartment
    let p1 = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
    let (s, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?category:not=vital-signs",
            Some(&p1),
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(ids(&b), ["Observation/o1"]);
    e.refuses(
        &admin,
        &[
            "/fhir/Observation?code:missing=maybe",
            "/fhir/Patient?name:not=smith",
            "/fhir/Observation?status:text=final",
            "/fhir/Observation?subject:Bogus=p1",
            "/fhir/Observation?patient:Group=p1",
            "/fhir/Observation?date:not=2024",
        ],
    )
    .await;
}

/// `_has` (a reverse chain) finds the resources that matching resources of another type point
/// at, with the caller's own access to those: what the caller could not search for never
/// decides what it finds.
#[tokio::test]
async fn reverse_chains_find_what_matching_resources_point_at() {
    let e = env();
    let admin = seed(&e).await;
    // seed: p1 Smith with o1 (laboratory), o2 (vital-signs); p2 Jones with o3 (laboratory)
    for (uri, want) in [
        (
            "/fhir/Patient?_has:Observation:patient:category=vital-signs",
            vec!["Patient/p1"],
        ),
        (
            "/fhir/Patient?_has:Observation:subject:category=laboratory",
            vec!["Patient/p1", "Patient/p2"],
        ),
        (
            "/fhir/Patient?_has:Observation:patient:category=laboratory&name=jones",
            vec!["Patient/p2"],
        ),
        (
            "/fhir/Patient?_has:Observation:patient:code=http://loinc.org|718-7&_id=p2",
            vec!["Patient/p2"],
        ),
        ("/fhir/Patient?_has:Observation:patient:code=2345-7", vec![]),
    ] {
        assert_eq!(e.found(uri, &admin).await, want, "{uri}");
    }
    // SMART v2 narrowing on the chained type: vital signs are not this token's to search
    let lab_only = e.token(
        "user/Patient.rs user/Observation.rs?category=laboratory",
        |_| {},
    );
    assert!(e
        .found(
            "/fhir/Patient?_has:Observation:patient:category=vital-signs",
            &lab_only
        )
        .await
        .is_empty());
    // a patient-context token's reverse chain sees its own patient's resources only
    let p2 = e.token("patient/*.rs", |r| r.patient = Some("p2".into()));
    assert_eq!(
        e.found(
            "/fhir/Patient?_has:Observation:patient:category=laboratory",
            &p2
        )
        .await,
        ["Patient/p2"]
    );
    let no_observations = e.token("user/Patient.rs", |_| {});
    let (s, _, _) = e
        .call(
            "GET",
            "/fhir/Patient?_has:Observation:patient:category=laboratory",
            Some(&no_observations),
            None,
        )
        .await;
    assert_eq!(s, 403);
    e.refuses(
        &admin,
        &[
            "/fhir/Patient?_has:Observation:patient=x",
            "/fhir/Patient?_has:Bogus:patient:code=x",
            "/fhir/Patient?_has:Observation:code:code=x",
            "/fhir/Patient?_has:Observation:patient:bogus=x",
            "/fhir/Patient?_has:Observation:patient:date=someday",
            "/fhir/Patient?_has:Observation:patient:_has:Observation:patient:code=x",
            "/fhir/Practitioner?_has:Observation:patient:code=x",
        ],
    )
    .await;
}

/// `_revinclude` brings the resources that reference the matches: through the patient index
/// for a Patient and for what belongs to patients, by a scan of the source type for what does
/// not (a Practitioner) — and only what the caller may read.
#[tokio::test]
async fn revinclude_brings_what_references_the_matches() {
    let e = env();
    let admin = seed(&e).await;
    let mut o4 = obs("o4", "p1", "laboratory");
    o4["encounter"] = json!({"reference": "Encounter/e1"});
    for (path, body) in [
        (
            "Encounter/e1",
            json!({"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "IMP"}, "subject": {"reference": "Patient/p1"}}),
        ),
        (
            "Encounter/e2",
            json!({"resourceType": "Encounter", "id": "e2", "status": "finished", "class": {"code": "IMP"}, "subject": {"reference": "Patient/p2"}, "participant": [{"individual": {"reference": "Practitioner/dr1"}}]}),
        ),
        ("Observation/o4", o4),
        (
            "Practitioner/dr1",
            json!({"resourceType": "Practitioner", "id": "dr1"}),
        ),
        (
            "Provenance/pv1",
            json!({"resourceType": "Provenance", "id": "pv1", "recorded": "2024-03-05T10:00:00Z", "target": [{"reference": "Patient/p1"}, {"reference": "Observation/o1"}], "agent": [{"who": {"display": "lab"}}]}),
        ),
        (
            "Provenance/pv2",
            json!({"resourceType": "Provenance", "id": "pv2", "recorded": "2024-03-05T10:00:00Z", "target": [{"reference": "Patient/p2"}], "agent": [{"who": {"display": "lab"}}]}),
        ),
    ] {
        let (s, _, b) = e
            .call("PUT", &format!("/fhir/{path}"), Some(&admin), Some(body))
            .await;
        assert!(s.is_success(), "{path}: {s} {b}");
    }
    let search = |uri: &'static str, token: String| {
        let e = &e;
        async move {
            let (s, _, b) = e.call("GET", uri, Some(&token), None).await;
            assert_eq!(s, 200, "{uri}: {b}");
            b
        }
    };
    let b = search(
        "/fhir/Patient?_id=p1&_revinclude=Provenance:target",
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&b), vec!["Patient/p1", "Provenance/pv1"]);
    assert_eq!(b["total"], 1, "total counts the matches only");
    assert_eq!(b["entry"][1]["search"]["mode"], "include");
    let b = search(
        "/fhir/Patient?_id=p1&_revinclude=Observation:subject",
        admin.clone(),
    )
    .await;
    assert_eq!(
        ids(&b),
        vec![
            "Patient/p1",
            "Observation/o1",
            "Observation/o2",
            "Observation/o4"
        ]
    );
    // an Encounter's and an Observation's referrers, found among their patient's resources
    let b = search(
        "/fhir/Encounter?_revinclude=Observation:encounter",
        admin.clone(),
    )
    .await;
    assert_eq!(
        ids(&b),
        vec!["Encounter/e1", "Encounter/e2", "Observation/o4"]
    );
    let b = search(
        "/fhir/Observation?patient=p1&_revinclude=Provenance:target",
        admin.clone(),
    )
    .await;
    assert_eq!(
        ids(&b),
        vec![
            "Observation/o1",
            "Observation/o2",
            "Observation/o4",
            "Provenance/pv1"
        ]
    );
    // a Practitioner belongs to no patient: the Encounters are looked through
    let b = search(
        "/fhir/Practitioner?_revinclude=Encounter:participant",
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&b), vec!["Practitioner/dr1", "Encounter/e2"]);
    // a target type other than the search's brings nothing
    let b = search(
        "/fhir/Patient?_id=p1&_revinclude=Provenance:target:Observation",
        admin.clone(),
    )
    .await;
    assert_eq!(ids(&b), vec!["Patient/p1"]);
    let b = search(
        "/fhir/Patient?_id=p1&_revinclude=Provenance:target&_summary=count",
        admin.clone(),
    )
    .await;
    assert_eq!((b["total"].as_u64(), b.get("entry")), (Some(1), None));
    // A patient-context token gets its own patient's referrers only.
    let t = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
    let b = search("/fhir/Patient?_revinclude=Provenance:target", t.clone()).await;
    assert_eq!(ids(&b), vec!["Patient/p1", "Provenance/pv1"]);
    let b = search(
        "/fhir/Practitioner?_revinclude=Encounter:participant",
        t.clone(),
    )
    .await;
    assert_eq!(ids(&b), vec!["Practitioner/dr1"], "e2 is p2's");
    // and none of a type its scopes do not grant
    let t = e.token("patient/Patient.rs", |r| r.patient = Some("p1".into()));
    let b = search("/fhir/Patient?_revinclude=Observation:subject", t).await;
    assert_eq!(ids(&b), vec!["Patient/p1"]);
    e.refuses(
        &admin,
        &[
            "/fhir/Patient?_revinclude=Observation",
            "/fhir/Patient?_revinclude=Observation:bogus",
            "/fhir/Patient?_revinclude=observation:subject",
            "/fhir/Patient?_revinclude=Provenance:target:patient",
        ],
    )
    .await;
    let (_, _, cap) = e.call("GET", "/fhir/metadata", None, None).await;
    let rev = |t: &str| {
        cap["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == t)
            .unwrap()["searchRevInclude"]
            .clone()
    };
    let patient = rev("Patient");
    for want in [
        "Provenance:target",
        "Observation:patient",
        "Encounter:patient",
    ] {
        assert!(
            patient.as_array().unwrap().iter().any(|v| v == want),
            "{want}: {patient}"
        );
    }
    assert!(rev("Encounter")
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == "Observation:encounter"));
}

/// A patient-context token learns nothing about other patients from conditional operations,
/// cannot file data into another patient's record by naming its own patient beside it, and
/// cannot vread an old version of a resource that now belongs to another patient.
#[tokio::test]
async fn patient_context_writes_and_conditionals_stay_in_the_compartment() {
    let e = env();
    let admin = seed(&e).await;
    let t = e.token("patient/*.cruds", |r| r.patient = Some("p1".into()));
    // o3 is p2's: a condition that only o3 matches is no match for p1 (not a 403 or a 412
    // telling that it exists); the create goes ahead in p1's own compartment.
    let (s, _, b) = e
        .call_h(
            "POST",
            "/fhir/Observation",
            Some(&t),
            Some(obs("ignored", "p1", "laboratory")),
            &[("if-none-exist", "_id=o3")],
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_ne!(b["id"], "o3");
    let (s, _, _) = e
        .call("DELETE", "/fhir/Observation?_id=o3", Some(&t), None)
        .await;
    assert_eq!(s, 204);
    let (s, _, b) = e
        .call("GET", "/fhir/Observation/o3", Some(&admin), None)
        .await;
    assert_eq!(
        (s.as_u16(), &b["subject"]["reference"]),
        (200, &json!("Patient/p2"))
    );
    // an Appointment naming p2 and p1 is p2's data too: p1 may not write it
    let appt = json!({"resourceType": "Appointment", "status": "booked", "participant": [
        {"actor": {"reference": "Patient/p2"}, "status": "accepted"},
        {"actor": {"reference": "Patient/p1"}, "status": "accepted"}]});
    let (s, _, _) = e
        .call("POST", "/fhir/Appointment", Some(&t), Some(appt.clone()))
        .await;
    assert_eq!(s, 403);
    let (s, _, b) = e
        .call("POST", "/fhir/Appointment", Some(&admin), Some(appt))
        .await;
    assert_eq!(s, 201);
    let appt_id = b["id"].as_str().unwrap().to_string();
    // reading it is fine (p1 is in it); deleting it is not
    let (s, _, _) = e
        .call(
            "GET",
            &format!("/fhir/Appointment/{appt_id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = e
        .call(
            "DELETE",
            &format!("/fhir/Appointment/{appt_id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(s, 403);
    // o1 was filed to p1 by mistake and moved to p2: its first version is no longer p1's to read
    let (s, _, _) = e
        .call(
            "PUT",
            "/fhir/Observation/o1",
            Some(&admin),
            Some(obs("o1", "p2", "laboratory")),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = e
        .call("GET", "/fhir/Observation/o1/_history/1", Some(&t), None)
        .await;
    assert_eq!(s, 403);
    let (s, _, _) = e
        .call("GET", "/fhir/Observation/o1/_history/1", Some(&admin), None)
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn tenants_are_isolated() {
    let e = env();
    seed(&e).await;
    let other = e.token("system/*.cruds", |r| r.tenant = Some("other".into()));
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&other), None)
            .await
            .0,
        404
    );
    let (_, _, b) = e.call("GET", "/fhir/Observation", Some(&other), None).await;
    assert_eq!(b["total"], 0);
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1/_history", Some(&other), None)
            .await
            .0,
        404
    );
    let last = e.audit().pop().unwrap();
    assert_eq!(last["tenant"], "other");
}

#[tokio::test]
async fn transaction_is_atomic_and_resolves_urn_uuids() {
    let e = env();
    let t = e.token("user/*.cruds", |_| {});
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111", "resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}}, "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&t), Some(bundle)).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["type"], "transaction-response");
    let pid = out["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        out["entry"][1]["resource"]["subject"]["reference"],
        format!("Patient/{pid}")
    );
    // A failing entry leaves nothing behind.
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "tx-new"}, "request": {"method": "PUT", "url": "Patient/tx-new"}},
        {"resource": {"resourceType": "Patient", "id": pid}, "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"9\""}}
    ]});
    assert_eq!(e.call("POST", "/fhir", Some(&t), Some(bad)).await.0, 412);
    assert_eq!(
        e.call("GET", "/fhir/Patient/tx-new", Some(&t), None)
            .await
            .0,
        404
    );
    // Batch: entries independent.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{pid}")}},
        {"request": {"method": "GET", "url": "Patient/missing"}}
    ]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&t), Some(batch)).await;
    assert_eq!(s, 200);
    assert_eq!(out["entry"][0]["response"]["status"], "200 OK");
    assert!(out["entry"][1]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("404"));
    // A read-only token may batch its reads; any write in its Bundle is refused.
    let ro = e.token("user/*.rs", |_| {});
    let write = json!({"request": {"method": "POST", "url": "Patient"},
                       "resource": {"resourceType": "Patient"}});
    let read = json!({"request": {"method": "GET", "url": format!("Patient/{pid}")}});
    let (s, _, out) = e
        .call(
            "POST",
            "/fhir",
            Some(&ro),
            Some(json!({"resourceType": "Bundle", "type": "batch", "entry": [read, write]})),
        )
        .await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["entry"][0]["response"]["status"], "200 OK");
    assert!(out["entry"][1]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("403"));
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [write]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&ro), Some(tx.clone())).await;
    assert_eq!(s, 403, "{out}");
    // The view role reads, in a Bundle too, and never writes, whatever its scopes.
    let viewer = e.token("user/*.cruds", |r| r.role = Some("view".into()));
    let reads = json!({"resourceType": "Bundle", "type": "batch", "entry": [read]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&viewer), Some(reads)).await;
    assert_eq!(
        (s, &out["entry"][0]["response"]["status"]),
        (StatusCode::OK, &json!("200 OK"))
    );
    let (s, _, out) = e.call("POST", "/fhir", Some(&viewer), Some(tx)).await;
    assert_eq!(s, 403, "{out}");
    assert_eq!(out["issue"][0]["diagnostics"], "the view role cannot write");
    // A token without any FHIR scope posts no Bundle.
    let none = e.token("openid", |_| {});
    let empty = json!({"resourceType": "Bundle", "type": "batch", "entry": []});
    assert_eq!(
        e.call("POST", "/fhir", Some(&none), Some(empty)).await.0,
        403
    );
}

/// A decimal keeps the precision it was sent with (FHIR R4 decimal: `7.10` is not `7.1`) through
/// create, transaction, read, search and history.
#[tokio::test]
async fn decimals_keep_their_precision_through_the_api() {
    let e = env();
    let t = e.token("user/*.cruds", |_| {});
    let quantity = |v: &str| -> Value {
        serde_json::from_str(&format!(
            r#"{{"resourceType": "Observation", "status": "final", "code": {{"text": "x"}}, "valueQuantity": {{"value": {v}, "unit": "mg/dL"}}}}"#
        ))
        .unwrap()
    };
    let (s, _, created) = e
        .call(
            "POST",
            "/fhir/Observation",
            Some(&t),
            Some(quantity("7.10")),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let mut entry = quantity("0.0500");
    entry["id"] = json!("dec-tx");
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": entry, "request": {"method": "PUT", "url": "Observation/dec-tx"}}
    ]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&t), Some(bundle)).await;
    assert_eq!(s, 200, "{out}");
    let value = |v: &Value| v["valueQuantity"]["value"].to_string();
    for (id, written) in [(id.as_str(), "7.10"), ("dec-tx", "0.0500")] {
        let (_, _, read) = e
            .call("GET", &format!("/fhir/Observation/{id}"), Some(&t), None)
            .await;
        assert_eq!(value(&read), written);
        let (_, _, hist) = e
            .call(
                "GET",
                &format!("/fhir/Observation/{id}/_history"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(value(&hist["entry"][0]["resource"]), written);
        let (_, _, found) = e
            .call(
                "GET",
                &format!("/fhir/Observation?_id={id}"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(value(&found["entry"][0]["resource"]), written);
    }
}

#[tokio::test]
async fn roles_break_glass_and_audit_trail() {
    let e = env();
    seed(&e).await;
    let auditor = e.token("user/*.cruds", |r| r.role = Some("audit".into()));
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&auditor), None)
            .await
            .0,
        403
    );
    let clin = e.token("patient/*.rs", |r| {
        r.patient = Some("p1".into());
        r.role = Some("clinician".into());
        r.subject = Some("dr-who".into());
    });
    assert_eq!(
        e.call("GET", "/fhir/Patient/p2", Some(&clin), None).await.0,
        403
    );
    let (s, _, _) = e
        .call_h(
            "GET",
            "/fhir/Patient/p2",
            Some(&clin),
            None,
            &[("x-break-glass", "emergency")],
        )
        .await;
    assert_eq!(s, 200);
    let rec = e.audit().pop().unwrap();
    assert_eq!(rec["break_glass"], true);
    assert_eq!(rec["break_glass_reason"], "emergency");
    assert_eq!(rec["review"], "required");
    let plain = e.token("user/*.rs", |_| {});
    assert_eq!(
        e.call_h(
            "GET",
            "/fhir/Patient/p2",
            Some(&plain),
            None,
            &[("x-break-glass", "emergency")]
        )
        .await
        .0,
        403
    );
    let (s, _, b) = e
        .call(
            "GET",
            "/fhir/AuditEvent?patient=p2&date=ge2020-01-01&agent=app",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let events = b["entry"].as_array().unwrap();
    assert!(events.len() >= 2, "{b}");
    for ev in events {
        assert_eq!(ev["resource"]["resourceType"], "AuditEvent");
        let text = ev.to_string();
        assert!(
            !text.contains("Jones") && !text.contains("MRN-") && !text.contains("1970"),
            "{text}"
        );
    }
    let (s, _, v) = e
        .call("GET", "/admin/audit/verify", Some(&auditor), None)
        .await;
    assert_eq!(
        (s, v["intact"].as_bool()),
        (StatusCode::OK, Some(true)),
        "{v}"
    );
    assert!(v["entries"].as_u64().unwrap() > 5);
    // Neither a clinical token nor the admin role reads the audit trail.
    let app_token = e.token("user/*.cruds", |_| {});
    let admin = e.token("system/*.cruds", |r| r.role = Some("admin".into()));
    for t in [&app_token, &admin] {
        for path in ["/admin/audit/verify", "/fhir/AuditEvent"] {
            assert_eq!(e.call("GET", path, Some(t), None).await.0, 403, "{path}");
        }
    }
}

#[tokio::test]
async fn audit_records_carry_no_phi() {
    let e = env();
    let admin = seed(&e).await;
    let searched = e
        .call(
            "GET",
            "/fhir/Patient?name=Smith&birthdate=1970-01-02&identifier=urn:mrn|MRN-p1",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(searched.0, 200);
    let created = e
        .call(
            "POST",
            "/fhir/Patient",
            Some(&admin),
            Some(patient("x", "Secretname")),
        )
        .await;
    assert_eq!(created.0, 201);
    // The same through bundle entries, whose URLs and bodies carry PHI too.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient?name=Smith&birthdate=1970-01-02"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:mrn|MRN-p2"}},
        {"resource": patient("y", "Secretname"), "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|MRN-p2"}}
    ]});
    assert_eq!(
        e.call("POST", "/fhir", Some(&admin), Some(batch)).await.0,
        200
    );
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("z", "Secretname"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|MRN-p1"}}
    ]});
    assert_eq!(e.call("POST", "/fhir", Some(&admin), Some(tx)).await.0, 200);
    let records = e.audit();
    for interaction in ["search-type", "create"] {
        assert!(
            records.iter().any(|r| r["interaction"] == interaction),
            "the {interaction} carrying PHI is audited: {records:?}"
        );
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["kind"] == "fhir-bundle-entry")
            .count(),
        4
    );
    for rec in records {
        let text = rec.to_string();
        for phi in ["Smith", "Jones", "Secretname", "1970", "MRN-", "Ann"] {
            assert!(!text.contains(phi), "audit record leaks {phi}: {text}");
        }
    }
}

#[tokio::test]
async fn rate_limit_429_with_headers_and_per_client_isolation() {
    let mut cfg = FacadeConfig::default();
    cfg.rate_limit.client_burst = 25;
    cfg.rate_limit.client_per_sec = 1;
    let e = env_with(cfg);
    seed(&e).await;
    let bulk = e.token("system/*.cruds", |r| r.client_id = "bulk".into());
    let mut limited = None;
    for _ in 0..5 {
        let (s, h, _) = e
            .call("GET", "/fhir/Patient/p1/$everything", Some(&bulk), None)
            .await;
        assert!(
            h.contains_key("ratelimit-limit")
                && h.contains_key("ratelimit-remaining")
                && h.contains_key("ratelimit-reset")
        );
        if s == 429 {
            limited = Some(h);
            break;
        }
    }
    let h = limited.expect("the bulk client is limited");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Its `$everything` bucket (a fifth of 25, at least one call's cost of 20) is what is short;
    // the rest of its budget is kept for its own reads.
    assert_eq!(h["ratelimit-limit"], "20");
    assert_eq!(h["ratelimit-remaining"], "0");
    let (s, h, _) = e.call("GET", "/fhir/Patient/p1", Some(&bulk), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["ratelimit-remaining"], "4");
    let reader = e.token("system/*.cruds", |r| r.client_id = "bedside".into());
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&reader), None)
            .await
            .0,
        200
    );
    let rec = e.audit().into_iter().find(|r| r["status"] == 429).unwrap();
    assert_eq!(rec["outcome"], "denied");
}

/// A batch pays for each entry what it would cost as a request of its own: one request
/// carrying a thousand searches is not one write, and ten reads are not ten writes.
#[tokio::test]
async fn a_batch_is_charged_per_entry() {
    let mut cfg = FacadeConfig::default();
    cfg.rate_limit.client_burst = 25;
    cfg.rate_limit.client_per_sec = 1;
    let e = env_with(cfg);
    seed(&e).await;
    let t = e.token("system/*.cruds", |r| r.client_id = "batcher".into());
    let batch = |n: usize| {
        let entry = json!({"request": {"method": "GET", "url": "Patient/p1"}});
        json!({"resourceType": "Bundle", "type": "batch", "entry": vec![entry; n]})
    };
    // 25 to spend: ten reads cost 10 (at least one write's 5), twice
    for _ in 0..2 {
        let (s, _, b) = e.call("POST", "/fhir", Some(&t), Some(batch(10))).await;
        assert_eq!(s, 200, "{b}");
    }
    let (s, h, b) = e.call("POST", "/fhir", Some(&t), Some(batch(10))).await;
    assert_eq!(s, 429, "{b}");
    assert!(h.contains_key("retry-after"));
    // five writes cost 25: the whole budget
    let w = e.token("system/*.cruds", |r| r.client_id = "writer".into());
    let entry = json!({"request": {"method": "POST", "url": "Patient"},
                       "resource": {"resourceType": "Patient"}});
    let writes = |n: usize| json!({"resourceType": "Bundle", "type": "batch", "entry": vec![entry.clone(); n]});
    let (s, _, b) = e.call("POST", "/fhir", Some(&w), Some(writes(5))).await;
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = e.call("POST", "/fhir", Some(&w), Some(writes(1))).await;
    assert_eq!(s, 429, "{b}");
}

#[tokio::test]
async fn revoked_grant_fails_next_request() {
    let e = env();
    seed(&e).await;
    let t = e.token("user/*.rs", |r| r.grant = Some("consent-123".into()));
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&t), None).await.0,
        200
    );
    let admin = e.token("system/*.cruds", |r| r.role = Some("admin".into()));
    let viewer = e.token("user/*.rs", |_| {});
    assert_eq!(
        e.call(
            "POST",
            "/admin/consent/consent-123/revoke",
            Some(&viewer),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        e.call(
            "POST",
            "/admin/consent/consent-123/revoke",
            Some(&admin),
            None
        )
        .await
        .0,
        200
    );
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&t), None).await.0,
        401
    );
}

/// Most identity providers sign RS256: a token signed with the key a JWKS file trusts is
/// accepted; one signed by another RSA key under the same kid, or naming a kid nobody trusts,
/// is refused with 401.
#[tokio::test]
async fn rs256_tokens_trusted_through_a_jwks_file_are_verified() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut cfg = FacadeConfig::default();
    cfg.auth.jwks_file = fixtures.join("idp-rs256-jwks.json");
    cfg.auth.issuers = vec!["tributary".into(), "https://idp.example".into()];
    let e = env_with(cfg);
    seed(&e).await;
    let sign = |pem: &str, kid: &str| {
        let key =
            jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(fixtures.join(pem)).unwrap())
                .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.into());
        let now = tributary_core::now_millis() / 1000;
        let claims = json!({"iss": "https://idp.example", "aud": "tributary", "sub": "dr-1",
            "client_id": "ehr-app", "scope": "user/*.rs", "iat": now, "nbf": now,
            "exp": now + 300});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let good = sign("idp-rs256.pem", "idp-rsa-1");
    let (s, _, b) = e.call("GET", "/fhir/Patient/p1", Some(&good), None).await;
    assert_eq!(s, 200, "{b}");
    for bad in [
        sign("idp-rs256-other.pem", "idp-rsa-1"),
        sign("idp-rs256.pem", "idp-rsa-2"),
    ] {
        let (s, _, b) = e.call("GET", "/fhir/Patient/p1", Some(&bad), None).await;
        assert_eq!(s, 401, "{b}");
    }
    // The audit record names the identity provider's client.
    assert!(e
        .audit()
        .iter()
        .any(|r| r["client"] == "ehr-app" && r["status"] == 200));
}

#[tokio::test]
async fn smart_configuration_and_jwks_are_served() {
    let e = env();
    let (s, _, v) = e
        .call("GET", "/.well-known/smart-configuration", None, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["jwks_uri"], "http://test/.well-known/jwks.json");
    // No authorization server configured: no endpoint, grant or client authentication claimed.
    assert!(v.get("token_endpoint").is_none(), "{v}");
    assert_eq!(v["grant_types_supported"], json!([]));
    assert!(!v["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c.as_str().unwrap().starts_with("client-")));
    let mut cfg = FacadeConfig::default();
    cfg.auth.token_endpoint = "https://idp.example/token".into();
    cfg.auth.authorization_endpoint = "https://idp.example/authorize".into();
    cfg.auth.token_endpoint_auth_methods = vec!["private_key_jwt".into()];
    let (_, _, v) = env_with(cfg)
        .call("GET", "/.well-known/smart-configuration", None, None)
        .await;
    assert_eq!(v["token_endpoint"], "https://idp.example/token");
    assert_eq!(v["authorization_endpoint"], "https://idp.example/authorize");
    assert_eq!(
        v["grant_types_supported"],
        json!(["authorization_code", "client_credentials"])
    );
    assert_eq!(v["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(
        v["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert!(v["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("client-confidential-asymmetric")));
    let (_, _, jwks) = e.call("GET", "/.well-known/jwks.json", None, None).await;
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "private key must never be served"
    );
}

/// A stand-in RFC 7662 endpoint: `good` is active (patient context p1); `no-audience` and
/// `other-api` are active too but say no audience or another API's; anything else inactive.
/// Counts the calls it gets.
async fn introspection_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let authed = req.to_ascii_lowercase().contains("authorization: basic ");
                let active = json!({"active": true, "client_id": "opaque-app", "sub": "u1", "scope": "patient/*.cruds", "patient": "p1", "aud": "tributary", "iss": "tributary", "exp": tributary_core::now_millis() / 1000 + 600});
                let body = if authed && req.contains("token=good&") {
                    active
                } else if authed && req.contains("token=no-audience&") {
                    let mut v = active;
                    v.as_object_mut().unwrap().remove("aud");
                    v
                } else if authed && req.contains("token=other-api&") {
                    let mut v = active;
                    v["aud"] = json!(["billing-api"]);
                    v
                } else {
                    json!({"active": false})
                };
                let body = body.to_string();
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/introspect"), calls)
}

#[tokio::test]
async fn opaque_tokens_are_introspected_cached_for_reads_and_rechecked_for_writes() {
    let (url, calls) = introspection_server().await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cret\n").unwrap();
    let mut cfg = FacadeConfig::default();
    cfg.auth.introspection_url = url;
    cfg.auth.introspection_client_id = "facade".into();
    cfg.auth.introspection_secret_file = secret.path().to_path_buf();
    cfg.validate().unwrap();
    let e = env_with(cfg);
    seed(&e).await;
    let n = || calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some("good"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        e.call("GET", "/fhir/Observation/o1", Some("good"), None)
            .await
            .0,
        200
    );
    assert_eq!(n(), 1, "reads reuse the cached answer");
    assert_eq!(
        e.call("GET", "/fhir/Patient/p2", Some("good"), None)
            .await
            .0,
        403,
        "scopes and patient context apply"
    );
    let body = obs("o7", "p1", "laboratory");
    assert_eq!(
        e.call(
            "PUT",
            "/fhir/Observation/o7",
            Some("good"),
            Some(body.clone())
        )
        .await
        .0,
        201
    );
    assert_eq!(n(), 2, "a write is introspected anew");
    e.call("PUT", "/fhir/Observation/o7", Some("good"), Some(body))
        .await;
    assert_eq!(n(), 3);
    assert_eq!(
        e.call(
            "GET",
            "/fhir/Patient/p1",
            Some("revoked-at-the-server"),
            None
        )
        .await
        .0,
        401
    );
    for token in ["no-audience", "other-api"] {
        assert_eq!(
            e.call("GET", "/fhir/Patient/p1", Some(token), None).await.0,
            401,
            "an active token not stated to be for this API: {token}"
        );
    }
    let rec = e
        .audit()
        .into_iter()
        .find(|r| r["client"] == "opaque-app")
        .unwrap();
    assert_eq!(rec["user"], "u1");
}

#[tokio::test]
async fn mapping_report_is_for_the_admin_role_and_the_callers_tenant_only() {
    use tributary_storage::{FieldKey, FieldKind, FieldReportStore, FieldStats};
    let e = env();
    let row = |tenant: &str, path: &str, count| {
        (
            FieldKey {
                tenant: tenant.into(),
                message_map: "ADT_A01.yaml".into(),
                message_type: "ADT^A01".into(),
                kind: FieldKind::Unconsumed,
                path: path.into(),
                reason: String::new(),
                feed: "riverside".into(),
            },
            FieldStats {
                count,
                first_seen: 1,
                last_seen: 2,
                example_message: format!("{tenant}-msg"),
            },
        )
    };
    FieldReportStore::new(e.st.rt.db.clone())
        .merge(
            vec![
                row("default", "PID-11.7", 5),
                row("default", "ZXT-2", 9),
                row("acme", "PID-13", 50),
            ],
            vec![],
        )
        .await
        .unwrap();
    let viewer = e.token("user/*.rs", |_| {});
    assert_eq!(
        e.call("GET", "/admin/mapping/report", Some(&viewer), None)
            .await
            .0,
        403
    );
    assert_eq!(
        e.call("GET", "/admin/mapping/report", None, None).await.0,
        401
    );
    let admin = e.token("system/*.cruds", |r| r.role = Some("admin".into()));
    let (s, _, v) = e
        .call("GET", "/admin/mapping/report", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let rows = v["rows"].as_array().unwrap();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["ZXT-2", "PID-11.7"], "{v}");
    assert!(rows.iter().all(|r| r["tenant"] == "default"), "{v}");
    assert_eq!(rows[0]["count"], 9);
}

/// The AuditEvents of `/fhir/AuditEvent?{query}` (auditor role) that record a bundle entry, as
/// (interaction, entity, outcome, client, request id).
async fn bundle_entry_events(e: &Env, query: &str) -> Vec<[String; 5]> {
    let auditor = e.token("user/*.rs", |r| r.role = Some("audit".into()));
    let (s, _, b) = e
        .call(
            "GET",
            &format!("/fhir/AuditEvent?{query}"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["resource"])
        .filter(|ev| {
            ev["extension"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["url"] == "urn:tributary:audit:bundle-entry")
        })
        .map(|ev| {
            let request_id = ev["extension"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["url"] == "urn:tributary:audit:request-id")
                .map(|x| text(&x["valueString"]))
                .unwrap_or_default();
            [
                text(&ev["subtype"][0]["code"]),
                text(&ev["entity"][0]["what"]["reference"]),
                text(&ev["outcome"]),
                text(&ev["agent"][0]["who"]["identifier"]["value"]),
                request_id,
            ]
        })
        .collect()
}

/// What a client reads or writes through a batch or transaction shows in the audit report of
/// the patient whose data it is, entry by entry, with the Bundle's request id.
#[tokio::test]
async fn bundle_entries_are_in_their_patients_audit_report() {
    let e = env();
    seed(&e).await;
    let t = e.token("user/*.cruds", |r| r.client_id = "bundler".into());
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation/o3"}},
        {"request": {"method": "GET", "url": "Observation?patient=p1&category=laboratory"}}
    ]});
    let (s, _, out) = e.post_bundle(&t, batch, "batch-1").await;
    assert_eq!(s, 200, "{out}");
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("ignored", "p1", "vital-signs"), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (s, _, out) = e.post_bundle(&t, tx, "tx-1").await;
    assert_eq!(s, 200, "{out}");
    let created = out["entry"][0]["resource"]["id"].as_str().unwrap();
    let row = |i: &str, what: &str, outcome: &str, req: &str| {
        [i, what, outcome, "bundler", req].map(String::from)
    };
    assert_eq!(
        bundle_entry_events(&e, "patient=p1").await,
        [
            row("read", "Observation/o1", "0", "batch-1"),
            row("search-type", "Observation", "0", "batch-1"),
            row("create", &format!("Observation/{created}"), "0", "tx-1"),
        ]
    );
    assert_eq!(
        bundle_entry_events(&e, "patient=p2").await,
        [row("read", "Observation/o3", "0", "batch-1")]
    );
    // The Bundle's own record stays as it was: one `transaction` request on `Bundle`.
    let records = e.audit();
    let bundle_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["request_id"] == "batch-1" && r["kind"] == "fhir-request")
        .collect();
    assert_eq!(bundle_records.len(), 1);
    assert_eq!(bundle_records[0]["resource_type"], "Bundle");
    assert_eq!(bundle_records[0]["returned"], 3);
}

/// A batch entry refused by the token's patient context is recorded as denied for the patient
/// it would have touched; in a refused transaction the other entries are recorded as not
/// committed.
#[tokio::test]
async fn denied_bundle_entries_are_audited_as_denied() {
    let e = env();
    seed(&e).await;
    let t = e.token("patient/*.cruds", |r| {
        r.client_id = "portal".into();
        r.patient = Some("p1".into());
    });
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation/o3"}}
    ]});
    let (s, _, out) = e.call("POST", "/fhir", Some(&t), Some(batch)).await;
    assert_eq!(s, 200, "{out}");
    assert!(out["entry"][1]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("403"));
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("a", "p1", "laboratory"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("b", "p2", "laboratory"), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (s, _, out) = e.post_bundle(&t, tx, "tx-2").await;
    assert_eq!(s, 403, "{out}");
    let p2: Vec<[String; 3]> = bundle_entry_events(&e, "patient=p2&agent=portal")
        .await
        .into_iter()
        .map(|[i, what, outcome, ..]| [i, what.split('/').next().unwrap().into(), outcome])
        .collect();
    let row = |i: &str, t: &str, o: &str| [i, t, o].map(String::from);
    assert_eq!(
        p2,
        [
            row("read", "Observation", "4"),
            row("create", "Observation", "4")
        ]
    );
    let records = e.audit();
    let entries: Vec<&Value> = records
        .iter()
        .filter(|r| r["request_id"] == "tx-2" && r["kind"] == "fhir-bundle-entry")
        .collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        (&entries[0]["patient"], &entries[0]["detail"]),
        (&json!("p1"), &json!("not-committed"))
    );
    assert_eq!(
        (
            &entries[1]["patient"],
            &entries[1]["outcome"],
            &entries[1]["detail"]
        ),
        (&json!("p2"), &json!("denied"), &json!("forbidden"))
    );
}

/// Entry records are links of the hash chain like any other: the chain verifies with them, and
/// an edited entry record is named.
#[tokio::test]
async fn bundle_entry_records_are_chained_and_verified() {
    let e = env();
    let admin = seed(&e).await;
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "GET", "url": "Observation/o3"}}
    ]});
    assert_eq!(
        e.call("POST", "/fhir", Some(&admin), Some(batch)).await.0,
        200
    );
    assert_eq!(
        e.call("GET", "/fhir/Patient/p1", Some(&admin), None)
            .await
            .0,
        200
    );
    let log = &e.st.rt.audit;
    let report = log.verify().unwrap().expect("the chain verifies");
    let entries: Vec<u64> = log
        .read_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|x| x.body["kind"] == "fhir-bundle-entry")
        .map(|x| x.seq)
        .collect();
    assert_eq!(entries.len(), 2);
    assert!(report.head_seq > entries[1]);
    let seq = entries[0];
    let raw = String::from_utf8(log.raw(seq).unwrap().unwrap()).unwrap();
    let edited = raw.replace("\"patient\":\"p1\"", "\"patient\":\"p9\"");
    assert_ne!(raw, edited);
    log.tamper_raw(seq, Some(edited.into_bytes()))
        .await
        .unwrap();
    let bad = log.verify().unwrap().expect_err("an edited entry is named");
    assert_eq!(bad.seq, seq + 1, "{bad}");
}

/// `AuditEvent?patient=…&agent=analytics` as "interaction entity outcome" lines.
async fn report(e: &Env, auditor: &str, patient: &str) -> Vec<String> {
    let (s, _, b) = e
        .call(
            "GET",
            &format!("/fhir/AuditEvent?patient={patient}&agent=analytics"),
            Some(auditor),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let ev = &x["resource"];
            format!(
                "{} {} {}",
                ev["subtype"][0]["code"].as_str().unwrap(),
                ev["entity"][0]["what"]["reference"].as_str().unwrap(),
                ev["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

/// The CapabilityStatement lists per type only the search parameters that type can match (by
/// its R4 elements); a search with one that cannot match is refused, not answered with nothing;
/// `_include` follows search-parameter names (`Observation:patient`), backbone references
/// (`Encounter:location`) and `*`, as `searchInclude` declares.
#[tokio::test]
async fn search_parameters_and_includes_are_what_the_capability_statement_says() {
    let e = env();
    let admin = seed(&e).await;
    let (s, _, cap) = e.call("GET", "/fhir/metadata", None, None).await;
    assert_eq!(s, 200);
    let params = |t: &str| -> Vec<String> {
        cap["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == t)
            .unwrap()["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let obs = params("Observation");
    for p in [
        "_id",
        "identifier",
        "patient",
        "subject",
        "code",
        "category",
        "date",
        "status",
    ] {
        assert!(
            obs.contains(&p.to_string()),
            "Observation lacks {p}: {obs:?}"
        );
    }
    for p in ["gender", "birthdate", "name", "family"] {
        assert!(!obs.contains(&p.to_string()), "Observation claims {p}");
    }
    let pat = params("Patient");
    for p in ["gender", "birthdate", "name", "family", "identifier"] {
        assert!(pat.contains(&p.to_string()), "Patient lacks {p}: {pat:?}");
    }
    for p in ["code", "subject", "category"] {
        assert!(!pat.contains(&p.to_string()), "Patient claims {p}");
    }
    assert!(params("Appointment").contains(&"patient".to_string()));
    // Without [subscriptions] beside the facade no topic or Subscription operation is claimed.
    let sub = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Subscription")
        .unwrap();
    assert!(
        sub.get("extension").is_none() && sub.get("operation").is_none(),
        "{sub}"
    );
    assert!(
        !params("Immunization").contains(&"code".to_string()),
        "vaccineCode, not code"
    );
    assert!(!params("Organization").contains(&"family".to_string()));

    let (s, _, b) = e
        .call("GET", "/fhir/Observation?gender=female", Some(&admin), None)
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("does not apply to Observation"),
        "{b}"
    );

    let enc = json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"code": "IMP"}, "subject": {"reference": "Patient/p1"},
        "location": [{"location": {"reference": "Location/l1"}}]});
    let loc = json!({"resourceType": "Location", "id": "l1", "name": "Ward 3"});
    for (path, body) in [("/fhir/Encounter/e1", enc), ("/fhir/Location/l1", loc)] {
        let (s, _, b) = e.call("PUT", path, Some(&admin), Some(body)).await;
        assert!(s.is_success(), "{s} {b}");
    }
    for (query, expect) in [
        (
            "Observation?_id=o1&_include=Observation:patient",
            vec!["Observation/o1", "Patient/p1"],
        ),
        (
            "Observation?_id=o3&_include=Observation:*",
            vec!["Observation/o3", "Patient/p2"],
        ),
        (
            "Encounter?_id=e1&_include=Encounter:location",
            vec!["Encounter/e1", "Location/l1"],
        ),
        (
            "Encounter?_id=e1&_include=Encounter:*",
            vec!["Encounter/e1", "Location/l1", "Patient/p1"],
        ),
    ] {
        let (s, _, b) = e
            .call("GET", &format!("/fhir/{query}"), Some(&admin), None)
            .await;
        assert_eq!(s, 200, "{query}: {b}");
        assert_eq!(ids(&b), expect, "{query}");
    }
    let (s, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?_include=Observation:performerz",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 400, "{b}");
}

/// `_include:iterate` follows its references from the matches and from what other includes
/// brought in, round after round (an order's requester role, then the role's practitioner),
/// stops at a cycle, and brings only what the caller may read.
#[tokio::test]
async fn include_iterate_follows_references_of_included_resources() {
    let e = env();
    let admin = seed(&e).await;
    let mut p1 = patient("p1", "Smith");
    p1["link"] = json!([{"other": {"reference": "Patient/p2"}, "type": "seealso"}]);
    let mut p2 = patient("p2", "Jones");
    p2["link"] = json!([{"other": {"reference": "Patient/p1"}, "type": "seealso"}]);
    let sr1 = json!({"resourceType": "ServiceRequest", "id": "sr1", "status": "active",
        "intent": "order", "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "PractitionerRole/role1"}});
    let role1 = json!({"resourceType": "PractitionerRole", "id": "role1",
        "practitioner": {"reference": "Practitioner/dr1"},
        "organization": {"reference": "Organization/clinic1"}});
    let dr1 = json!({"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Orderly"}]});
    let clinic1 = json!({"resourceType": "Organization", "id": "clinic1", "name": "Clinic"});
    e.put_all(&admin, [p1, p2, sr1, role1, dr1, clinic1]).await;
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    for (uri, want) in [
        // without :iterate the role's references are not followed
        (
            "/fhir/ServiceRequest?_id=sr1&_include=ServiceRequest:requester",
            vec!["PractitionerRole/role1", "ServiceRequest/sr1"],
        ),
        (
            "/fhir/ServiceRequest?_id=sr1&_include=ServiceRequest:requester&_include:iterate=PractitionerRole:practitioner",
            vec!["Practitioner/dr1", "PractitionerRole/role1", "ServiceRequest/sr1"],
        ),
        // an iterating include applies to the matches too, then to what it added
        (
            "/fhir/ServiceRequest?_id=sr1&_include:iterate=ServiceRequest:requester&_include:iterate=PractitionerRole:*",
            vec![
                "Organization/clinic1",
                "Practitioner/dr1",
                "PractitionerRole/role1",
                "ServiceRequest/sr1",
            ],
        ),
        // STU3's name
        (
            "/fhir/ServiceRequest?_id=sr1&_include:recurse=ServiceRequest:requester",
            vec!["PractitionerRole/role1", "ServiceRequest/sr1"],
        ),
        // a cycle ends
        (
            "/fhir/Patient?_id=p1&_include:iterate=Patient:link",
            vec!["Patient/p1", "Patient/p2"],
        ),
    ] {
        assert_eq!(sorted(e.found(uri, &admin).await), sorted(want.iter().map(|s| s.to_string()).collect()), "{uri}");
    }
    // a patient-context token never receives another patient through a chain of includes
    let own = e.token("patient/*.rs", |r| r.patient = Some("p1".into()));
    assert_eq!(
        e.found("/fhir/Patient?_id=p1&_include:iterate=Patient:link", &own)
            .await,
        vec!["Patient/p1"]
    );
    e.refuses(
        &admin,
        &[
            "/fhir/ServiceRequest?_include=PractitionerRole:practitioner",
            "/fhir/ServiceRequest?_include:iterate=Nonsense:practitioner",
            "/fhir/ServiceRequest?_include:iterate=PractitionerRole:bogus",
        ],
    )
    .await;
}

/// `_lastUpdated` is answered from its index (a type larger than the scan bound stays
/// searchable by it), and each prefix selects what the filter itself would.
#[tokio::test]
async fn last_updated_searches_select_by_prefix() {
    let e = env();
    let admin = seed(&e).await;
    let (_, _, o1) = e
        .call("GET", "/fhir/Observation/o1", Some(&admin), None)
        .await;
    let ms =
        tributary_core::parse_rfc3339_millis(o1["meta"]["lastUpdated"].as_str().unwrap()).unwrap();
    let iso = |t: i64| tributary_core::format_rfc3339_millis(t);
    // o1, o2, o3 were written in that order, so all three are at or after o1's time.
    for (query, expect) in [
        (format!("ge{}", iso(ms)), 3),
        (format!("gt{}", iso(ms + 60_000)), 0),
        (format!("lt{}", iso(ms - 60_000)), 0),
        (format!("le{}", iso(ms + 60_000)), 3),
        (format!("lt{}", iso(ms)), 0),
        (
            format!("ge{}&_lastUpdated=le{}", iso(ms - 60_000), iso(ms + 60_000)),
            3,
        ),
        ("2020".to_string(), 0),
    ] {
        let (s, _, b) = e
            .call(
                "GET",
                &format!("/fhir/Observation?_lastUpdated={query}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(s, 200, "{query}: {b}");
        assert_eq!(ids(&b).len(), expect, "{query}: {b}");
    }
}

/// Follows `next` links from `first`: every page's entries, in order.
async fn all_pages(e: &Env, token: &str, first: &str) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut url = first.to_string();
    loop {
        let (s, _, b) = e.call("GET", &url, Some(token), None).await;
        assert_eq!(s, 200, "{url}: {b}");
        pages.push(
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    let r = &x["resource"];
                    match r["meta"]["versionId"].as_str() {
                        Some(v) => format!(
                            "{}/{}/{v}",
                            r["resourceType"].as_str().unwrap(),
                            r["id"].as_str().unwrap()
                        ),
                        None => x["request"]["url"].as_str().unwrap_or("").to_string(),
                    }
                })
                .collect(),
        );
        let next = b["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .map(|l| {
                l["url"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("http://test")
                    .to_string()
            });
        match next {
            Some(n) => url = n,
            None => return pages,
        }
        assert!(pages.len() < 50, "paging does not end");
    }
}

/// Type history and `$everything` page with `next` links: every version (or compartment
/// resource) comes exactly once across the pages, in order, whatever the page size.
#[tokio::test]
async fn history_and_everything_page_with_next_links() {
    let e = env();
    let admin = seed(&e).await;
    // more versions: o1 updated twice, o3 deleted
    for status in ["amended", "corrected"] {
        let mut o = obs("o1", "p1", "laboratory");
        o["status"] = json!(status);
        let (s, _, _) = e
            .call("PUT", "/fhir/Observation/o1", Some(&admin), Some(o))
            .await;
        assert!(s.is_success());
    }
    let (s, _, _) = e
        .call("DELETE", "/fhir/Observation/o3", Some(&admin), None)
        .await;
    assert!(s.is_success());
    let (_, _, whole) = e
        .call(
            "GET",
            "/fhir/Observation/_history?_count=100",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(whole["entry"].as_array().unwrap().len(), 6, "{whole}");
    assert_eq!(whole["total"], 6, "one page: the total is known");
    let everything: Vec<String> = all_pages(&e, &admin, "/fhir/Observation/_history?_count=100")
        .await
        .concat();
    for size in [1, 2, 4] {
        let pages = all_pages(
            &e,
            &admin,
            &format!("/fhir/Observation/_history?_count={size}"),
        )
        .await;
        assert!(pages.iter().all(|p| p.len() <= size), "{pages:?}");
        assert_eq!(pages.concat(), everything, "page size {size}");
    }
    let (_, _, paged) = e
        .call(
            "GET",
            "/fhir/Observation/_history?_count=2",
            Some(&admin),
            None,
        )
        .await;
    assert!(
        paged.get("total").is_none(),
        "a paged history has no total: {paged}"
    );
    let (s, _, _) = e
        .call(
            "GET",
            "/fhir/Observation/_history?_cursor=nonsense",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 400);

    // $everything of p1: the Patient, then its compartment (o1, o2), one per page.
    let pages = all_pages(&e, &admin, "/fhir/Patient/p1/$everything?_count=1").await;
    let flat: Vec<String> = pages.concat();
    assert_eq!(flat.len(), 3, "{pages:?}");
    assert!(flat[0].starts_with("Patient/p1/"), "{flat:?}");
    let mut rest = flat[1..].to_vec();
    rest.sort();
    rest.dedup();
    assert_eq!(rest.len(), 2, "each once: {flat:?}");
    let (_, _, first) = e
        .call(
            "GET",
            "/fhir/Patient/p1/$everything?_count=1",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(first["total"], 3);
}

/// `$everything` takes the R4 operation's `_type`, `_since` and care-date `start`/`end`, also
/// across pages; a parameter it does not take is refused rather than ignored.
#[tokio::test]
async fn everything_takes_type_since_start_and_end() {
    let mut cfg = FacadeConfig::default();
    cfg.rate_limit.enabled = false;
    let e = env_with(cfg);
    let admin = seed(&e).await;
    let subject = json!({"reference": "Patient/q1"});
    let code = json!({"text": "x"});
    let writes = [
        ("Patient/q1", json!({"resourceType": "Patient", "id": "q1"})),
        (
            "Observation/qa",
            json!({"resourceType": "Observation", "id": "qa", "status": "final",
            "code": code, "subject": subject, "effectiveDateTime": "2024-01-10"}),
        ),
        (
            "Observation/qb",
            json!({"resourceType": "Observation", "id": "qb", "status": "final",
            "code": code, "subject": subject, "effectiveDateTime": "2024-03-05T10:00:00Z"}),
        ),
        (
            "Encounter/qe",
            json!({"resourceType": "Encounter", "id": "qe", "status": "finished",
            "class": {"code": "IMP"}, "subject": subject,
            "period": {"start": "2024-02-25", "end": "2024-03-02"}}),
        ),
        (
            "AllergyIntolerance/qx",
            json!({"resourceType": "AllergyIntolerance", "id": "qx",
            "patient": subject}),
        ),
    ];
    for (path, body) in writes {
        let (s, _, b) = e
            .call("PUT", &format!("/fhir/{path}"), Some(&admin), Some(body))
            .await;
        assert!(s.is_success(), "{b}");
    }
    let ids = |b: &Value| {
        let mut v = ids(b);
        v.sort();
        v
    };
    for (query, expected) in [
        (
            "_type=Observation",
            vec!["Observation/qa", "Observation/qb"],
        ),
        (
            "_type=Patient,Encounter",
            vec!["Encounter/qe", "Patient/q1"],
        ),
        (
            "_type=Encounter&_type=AllergyIntolerance",
            vec!["AllergyIntolerance/qx", "Encounter/qe"],
        ),
        (
            "start=2024-03-01",
            vec![
                "AllergyIntolerance/qx",
                "Encounter/qe",
                "Observation/qb",
                "Patient/q1",
            ],
        ),
        (
            "end=2024-02",
            vec![
                "AllergyIntolerance/qx",
                "Encounter/qe",
                "Observation/qa",
                "Patient/q1",
            ],
        ),
        (
            "start=2024-03-03&end=2024-03-05&_type=Observation,Encounter",
            vec!["Observation/qb"],
        ),
    ] {
        let b = e
            .get_ok(&format!("/fhir/Patient/q1/$everything?{query}"), &admin)
            .await;
        assert_eq!(ids(&b), expected, "{query}");
        assert_eq!(b["total"], expected.len(), "{query}");
    }
    // `date=` compares with a period as a whole, its end too.
    for (query, expected) in [
        ("date=ge2024-03-01", vec!["Encounter/qe"]),
        ("date=lt2024-02-26", vec!["Encounter/qe"]),
        ("date=gt2024-03-03", vec![]),
        ("date=eq2024-03", vec![]),
        ("date=eq2024", vec!["Encounter/qe"]),
    ] {
        let b = e
            .get_ok(&format!("/fhir/Encounter?patient=q1&{query}"), &admin)
            .await;
        assert_eq!(ids(&b), expected, "{query}");
    }
    // `_sort=date` orders by the same dates, undated last; pages keep the order.
    for (query, expected) in [
        ("_sort=date", ["Observation/qa", "Observation/qb"]),
        ("_sort=-date", ["Observation/qb", "Observation/qa"]),
    ] {
        let b = e
            .get_ok(&format!("/fhir/Observation?patient=q1&{query}"), &admin)
            .await;
        assert_eq!(crate::tests::ids(&b), expected, "{query}");
        let pages = all_pages(
            &e,
            &admin,
            &format!("/fhir/Observation?patient=q1&{query}&_count=1"),
        )
        .await;
        let paged: Vec<String> = pages
            .concat()
            .iter()
            .map(|p| p.rsplit_once('/').unwrap().0.to_string())
            .collect();
        assert_eq!(paged, expected, "{query}");
    }
    for bad in [
        "Patient?_sort=date",
        "Observation?_sort=-date,status",
        "Observation?_sort=birthdate",
    ] {
        let (s, _, b) = e
            .call("GET", &format!("/fhir/{bad}"), Some(&admin), None)
            .await;
        assert_eq!(s, 400, "{bad}: {b}");
    }
    // `_since`: what changed at or after the time given (here: qb, updated again).
    let mut qb = json!({"resourceType": "Observation", "id": "qb", "status": "amended",
        "code": code, "subject": subject, "effectiveDateTime": "2024-03-05T10:00:00Z"});
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (_, _, updated) = e
        .call("PUT", "/fhir/Observation/qb", Some(&admin), Some(qb.take()))
        .await;
    let since = updated["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .replace('+', "%2B");
    let b = e
        .get_ok(
            &format!("/fhir/Patient/q1/$everything?_since={since}"),
            &admin,
        )
        .await;
    assert_eq!(ids(&b), ["Observation/qb"]);
    // Pages keep the filter.
    let pages = all_pages(
        &e,
        &admin,
        "/fhir/Patient/q1/$everything?_type=Observation&_count=1",
    )
    .await;
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(
        pages.concat().iter().all(|p| p.starts_with("Observation/")),
        "{pages:?}"
    );
    for bad in ["foo=1", "_type=Nonsense", "_since=2024-01-01", "start=soon"] {
        let (s, _, b) = e
            .call(
                "GET",
                &format!("/fhir/Patient/q1/$everything?{bad}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(s, 400, "{bad}: {b}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
}

/// `_elements` and `_summary=data|text` cut matched resources (a search's, a read's) down to
/// what was asked, what R4 requires, `id` and `meta`, tagged `SUBSETTED`; included resources
/// stay whole. A name the type does not have is a 400.
#[tokio::test]
async fn elements_and_summary_return_tagged_subsets() {
    let e = env();
    let admin = seed(&e).await;
    let tags = |r: &Value| r["meta"]["tag"].to_string();
    let (s, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?patient=p1&_elements=effective&_include=Observation:subject",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let entries = b["entry"].as_array().unwrap();
    let mut saw_patient = false;
    for x in entries {
        let r = &x["resource"];
        if x["search"]["mode"] == "match" {
            let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort();
            assert_eq!(
                keys,
                [
                    "code",
                    "effectiveDateTime",
                    "id",
                    "meta",
                    "resourceType",
                    "status"
                ],
                "{r}"
            );
            assert!(tags(r).contains("SUBSETTED"), "{r}");
        } else {
            saw_patient = true;
            assert_eq!(r["name"][0]["family"], "Smith", "an include is whole: {r}");
            assert!(!tags(r).contains("SUBSETTED"), "{r}");
        }
    }
    assert!(saw_patient, "{b}");
    let (s, _, r) = e
        .call(
            "GET",
            "/fhir/Patient/p1?_elements=gender",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["gender"], "female");
    assert!(
        r.get("name").is_none() && r.get("birthDate").is_none(),
        "{r}"
    );
    assert!(tags(&r).contains("SUBSETTED"), "{r}");
    // ... and cannot be written back over the whole one
    let (s, _, b) = e
        .call("PUT", "/fhir/Patient/p1", Some(&admin), Some(r.clone()))
        .await;
    assert_eq!(s, 422, "{b}");
    let (_, _, whole) = e.call("GET", "/fhir/Patient/p1", Some(&admin), None).await;
    assert_eq!(whole["name"][0]["family"], "Smith");
    assert!(whole["meta"].get("tag").is_none(), "{whole}");
    let (s, _, b) = e
        .call("GET", "/fhir/Patient?_summary=data", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["entry"][0]["resource"].get("name").is_some(), "{b}");
    // `_summary=true`: R4's summary elements, on a search and on a read
    let (s, _, b) = e
        .call("GET", "/fhir/Observation?_summary=true", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{b}");
    let first = &b["entry"][0]["resource"];
    assert!(
        first.get("category").is_none() && first.get("code").is_some(),
        "{first}"
    );
    assert!(
        first.get("subject").is_some() && tags(first).contains("SUBSETTED"),
        "{first}"
    );
    let (s, _, r) = e
        .call("GET", "/fhir/Patient/p1?_summary=true", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["name"][0]["family"], "Smith", "{r}");
    assert!(tags(&r).contains("SUBSETTED"), "{r}");
    // `_total`: exact either way; `none` leaves it out
    let b = e.get_ok("/fhir/Observation?_total=accurate", &admin).await;
    assert_eq!(b["total"], 3, "{b}");
    let b = e.get_ok("/fhir/Observation?_total=none", &admin).await;
    assert!(
        b.get("total").is_none() && b["entry"].as_array().unwrap().len() == 3,
        "{b}"
    );
    e.refuses(
        &admin,
        &[
            "/fhir/Observation?_total=some",
            "/fhir/Patient/p1?_elements=valueQuantity",
            "/fhir/Observation?_elements=birthDate",
            "/fhir/Observation?_summary=yes",
        ],
    )
    .await;
}

/// A conditional read: `If-None-Match` with the current version's ETag, or `If-Modified-Since`
/// not before the last update, is a 304 with no body; an older copy gets the resource.
/// `Last-Modified` is an HTTP-date.
#[tokio::test]
async fn conditional_read_answers_304_for_a_current_copy() {
    let e = env();
    let admin = seed(&e).await;
    let (s, h, _) = e.call("GET", "/fhir/Patient/p1", Some(&admin), None).await;
    assert_eq!(s, 200);
    let etag = h["etag"].to_str().unwrap().to_string();
    let modified = h["last-modified"].to_str().unwrap().to_string();
    assert!(modified.ends_with(" GMT"), "{modified}");
    let t = httpdate::parse_http_date(&modified).unwrap();
    let later = httpdate::fmt_http_date(t + std::time::Duration::from_secs(60));
    let earlier = httpdate::fmt_http_date(t - std::time::Duration::from_secs(60));
    let not_modified = [
        ("if-none-match", etag.as_str()),
        ("if-none-match", "\"1\""),
        ("if-none-match", "W/\"9\", *"),
        ("if-modified-since", modified.as_str()),
        ("if-modified-since", later.as_str()),
    ];
    for (k, v) in not_modified {
        let (s, h, b) = e
            .call_h("GET", "/fhir/Patient/p1", Some(&admin), None, &[(k, v)])
            .await;
        assert_eq!(s, 304, "{k}: {v}");
        assert_eq!(h["etag"].to_str().unwrap(), etag);
        assert!(b.is_null(), "{b}");
    }
    let modified_since = [
        ("if-none-match", "W/\"2\""),
        ("if-modified-since", earlier.as_str()),
        ("if-modified-since", "yesterday"),
    ];
    for (k, v) in modified_since {
        let (s, _, b) = e
            .call_h("GET", "/fhir/Patient/p1", Some(&admin), None, &[(k, v)])
            .await;
        assert_eq!(s, 200, "{k}: {v}");
        assert_eq!(b["id"], "p1");
    }
}

/// Writes are checked against the FHIR R4 element table at the top level: an element the type
/// does not have, or a required one missing, is 422 naming it; nothing is stored. A patch whose
/// result lacks a required element is refused the same way.
#[tokio::test]
async fn writes_with_unknown_or_missing_required_elements_are_refused() {
    let e = env();
    let admin = seed(&e).await;
    let mut typo = obs("x1", "p1", "laboratory");
    typo["valueQuantty"] = json!({"value": 1});
    let mut no_code = obs("x2", "p1", "laboratory");
    no_code.as_object_mut().unwrap().remove("code");
    let imm = json!({"resourceType": "Immunization", "id": "i1", "status": "completed",
        "vaccineCode": {"text": "x"}, "patient": {"reference": "Patient/p1"}});
    for (path, body, says) in [
        ("/fhir/Observation/x1", typo, "no element `valueQuantty`"),
        ("/fhir/Observation/x2", no_code, "requires code"),
        (
            "/fhir/Immunization/i1",
            imm.clone(),
            "requires occurrence[x]",
        ),
    ] {
        let (s, _, b) = e.call("PUT", path, Some(&admin), Some(body)).await;
        assert_eq!(s, 422, "{path}: {b}");
        let text = b["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.contains(says), "{path}: {text}");
        let (s, _, _) = e.call("GET", path, Some(&admin), None).await;
        assert_eq!(s, 404, "{path}: nothing stored");
    }
    let mut ok = imm;
    ok["occurrenceDateTime"] = json!("2026-11-01");
    let (s, _, b) = e
        .call("PUT", "/fhir/Immunization/i1", Some(&admin), Some(ok))
        .await;
    assert!(s.is_success(), "{b}");
    // "did you mean" for a near miss
    let mut near = obs("x3", "p1", "laboratory");
    near["subjekt"] = json!({"reference": "Patient/p1"});
    let (_, _, b) = e
        .call("PUT", "/fhir/Observation/x3", Some(&admin), Some(near))
        .await;
    assert!(
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("did you mean `subject`"),
        "{b}"
    );
}

/// `Appointment?patient=` finds the Appointments a patient takes part in (`participant.actor`,
/// where the SIU^S12 mapping puts the patient), also for a patient-context token's search.
#[tokio::test]
async fn appointments_are_found_by_their_patient_participants() {
    let e = env();
    let admin = seed(&e).await;
    for (id, patients) in [
        ("a1", vec!["p1"]),
        ("a2", vec!["p2"]),
        ("a3", vec!["p1", "p2"]),
    ] {
        let participant: Vec<Value> = patients
            .iter()
            .map(|p| json!({"actor": {"reference": format!("Patient/{p}")}, "status": "accepted"}))
            .chain([json!({"actor": {"reference": "Practitioner/d1"}, "status": "accepted"})])
            .collect();
        let appt = json!({"resourceType": "Appointment", "id": id, "status": "booked",
            "participant": participant});
        let (s, _, b) = e
            .call(
                "PUT",
                &format!("/fhir/Appointment/{id}"),
                Some(&admin),
                Some(appt),
            )
            .await;
        assert!(s.is_success(), "{s} {b}");
    }
    let found = |b: &Value| {
        let mut v: Vec<String> = ids(b)
            .into_iter()
            .map(|i| i.trim_start_matches("Appointment/").to_string())
            .collect();
        v.sort();
        v
    };
    for (query, expect) in [
        ("patient=p1", vec!["a1", "a3"]),
        ("patient=Patient/p2", vec!["a2", "a3"]),
        ("patient=p3", vec![]),
    ] {
        let (s, _, b) = e
            .call(
                "GET",
                &format!("/fhir/Appointment?{query}"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{query}: {b}");
        assert_eq!(found(&b), expect, "{query}: {b}");
    }
    let p2 = e.token("patient/Appointment.rs", |r| r.patient = Some("p2".into()));
    let (s, _, b) = e.call("GET", "/fhir/Appointment", Some(&p2), None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(found(&b), ["a2", "a3"], "{b}");
}

/// A resource in two patients' compartments (an Appointment with both as participants): its
/// write and its reads are in both patients' reports, whichever the record itself names.
#[tokio::test]
async fn a_resource_in_two_compartments_is_in_both_patients_reports() {
    let e = env();
    seed(&e).await;
    let t = e.token("user/*.cruds", |r| r.client_id = "analytics".into());
    let auditor = e.token("user/*.rs", |r| r.role = Some("audit".into()));
    let appt = json!({"resourceType": "Appointment", "id": "a1", "status": "booked",
        "participant": [
            {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
            {"actor": {"reference": "Patient/p2"}, "status": "accepted"}]});
    let (s, _, b) = e
        .call("PUT", "/fhir/Appointment/a1", Some(&t), Some(appt))
        .await;
    assert!(s.is_success(), "{s} {b}");
    let (s, _, _) = e.call("GET", "/fhir/Appointment/a1", Some(&t), None).await;
    assert_eq!(s, 200);
    // A patient-context token of p2 may read it (one link to its patient is enough); the record
    // names p2, and p1's report lists the read as well.
    let p2 = e.token("patient/Appointment.rs", |r| {
        r.client_id = "analytics".into();
        r.patient = Some("p2".into());
    });
    let (s, _, _) = e.call("GET", "/fhir/Appointment/a1", Some(&p2), None).await;
    assert_eq!(s, 200);
    for p in ["p1", "p2"] {
        assert_eq!(
            report(&e, &auditor, p).await,
            [
                "update Appointment/a1 0",
                "read Appointment/a1 0",
                "read Appointment/a1 0"
            ],
            "{p}"
        );
    }
    let kinds: Vec<(String, String)> = e
        .audit()
        .iter()
        .filter(|r| r["resource_type"] == "Appointment")
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["patient"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = |k: &str, p: &str| (k.to_string(), p.to_string());
    assert_eq!(
        kinds,
        [
            expect("fhir-request", "p1"),
            expect("fhir-disclosure", "p2"),
            expect("fhir-request", "p1"),
            expect("fhir-disclosure", "p2"),
            expect("fhir-request", "p2"),
            expect("fhir-disclosure", "p1"),
        ]
    );
}

/// A search or history whose results span patients is in each of their reports (a
/// `fhir-disclosure` record per patient besides the one the request names), not only in the
/// report of the patient its URL or token names.
#[tokio::test]
async fn searches_across_patients_are_in_each_patients_report() {
    let e = env();
    seed(&e).await;
    let t = e.token("user/*.rs", |r| r.client_id = "analytics".into());
    let auditor = e.token("user/*.rs", |r| r.role = Some("audit".into()));
    let (s, _, b) = e
        .call(
            "GET",
            "/fhir/Observation?category=laboratory",
            Some(&t),
            None,
        )
        .await;
    assert_eq!((s, ids(&b).len()), (StatusCode::OK, 2), "{b}");
    let (s, _, b) = e
        .call("GET", "/fhir/Observation/_history", Some(&t), None)
        .await;
    assert_eq!(
        (s, b["entry"].as_array().unwrap().len()),
        (StatusCode::OK, 3)
    );
    // Named by the URL: one record, no disclosure of the same patient again.
    let (s, _, _) = e
        .call("GET", "/fhir/Observation?patient=p1", Some(&t), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        report(&e, &auditor, "p1").await,
        [
            "search-type Observation 0",
            "history-type Observation 0",
            "search-type Observation 0"
        ]
    );
    assert_eq!(
        report(&e, &auditor, "p2").await,
        ["search-type Observation 0", "history-type Observation 0"]
    );
    let records = e.audit();
    let disclosures: Vec<(&Value, &Value)> = records
        .iter()
        .filter(|r| r["kind"] == "fhir-disclosure")
        .map(|r| (&r["patient"], &r["returned"]))
        .collect();
    assert_eq!(
        disclosures,
        [
            (&json!("p1"), &json!(1)),
            (&json!("p2"), &json!(1)),
            (&json!("p1"), &json!(2)),
            (&json!("p2"), &json!(1)),
        ]
    );
    // Break-glass lifts a patient-context token's compartment: the record names the token's
    // patient, and the other patient whose data it saw gets one too.
    let clin = e.token("patient/*.rs", |r| {
        r.client_id = "analytics".into();
        r.patient = Some("p1".into());
        r.role = Some("clinician".into());
    });
    let (s, _, b) = e
        .call_h(
            "GET",
            "/fhir/Observation?category=laboratory",
            Some(&clin),
            None,
            &[("x-break-glass", "emergency")],
        )
        .await;
    assert_eq!((s, ids(&b).len()), (StatusCode::OK, 2), "{b}");
    let last = e.audit().pop().unwrap();
    assert_eq!(
        (&last["kind"], &last["patient"], &last["break_glass"]),
        (&json!("fhir-disclosure"), &json!("p2"), &json!(true))
    );
    assert_eq!(report(&e, &auditor, "p2").await.len(), 3);
}

/// Name and birth date searches come from the store's string index: they answer over more
/// Patients than a search may scan, case- and accent-insensitively, with `:exact`.
#[tokio::test]
async fn name_and_birthdate_searches_use_their_index_beyond_the_scan_bound() {
    use tributary_storage::{ResourceWrite, StoreTransaction};
    let e = env();
    let admin = e.token("system/*.cruds", |_| {});
    let named = [
        ("m1", "Müller", "Zoë", "1980-03-05", "female"),
        ("m2", "MULLER", "Jon", "1980-11-30", "male"),
        ("m3", "Mullins", "Ann", "1999-01-01", "female"),
        ("m4", "Berg", "Müller", "2001-06-07", "male"),
    ];
    let mut writes: Vec<ResourceWrite> = named
        .iter()
        .map(|(id, family, given, birth, gender)| {
            ResourceWrite::upsert(
                "Patient",
                id,
                json!({"resourceType":"Patient","name":[{"family":family,"given":[given]}],
                       "birthDate":birth,"gender":gender}),
            )
        })
        .collect();
    writes.extend((0..search::MAX_SCAN).map(|i| {
        ResourceWrite::upsert(
            "Patient",
            &format!("x{i}"),
            json!({"resourceType":"Patient","name":[{"family":format!("Other{i}")}],
                   "birthDate":"1950-01-01","gender":"unknown"}),
        )
    }));
    for chunk in writes.chunks(2_000) {
        e.st.rt
            .store
            .commit(StoreTransaction {
                tenant: "default".into(),
                writes: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let search = |q: &'static str| {
        let (e, admin) = (&e, &admin);
        async move {
            let (s, _, b) = e
                .call("GET", &format!("/fhir/Patient?{q}"), Some(admin), None)
                .await;
            let mut found = ids(&b);
            found.sort();
            (s.as_u16(), found, b)
        }
    };
    for (q, expect) in [
        ("name=muller", vec!["m1", "m2", "m4"]),
        ("name=MÜL", vec!["m1", "m2", "m3", "m4"]),
        ("family=mul", vec!["m1", "m2", "m3"]),
        ("family:exact=Müller", vec!["m1"]),
        ("name=zoe", vec!["m1"]),
        ("name=zoe,jon", vec!["m1", "m2"]),
        ("name=muller&gender=male", vec!["m2", "m4"]),
        ("birthdate=1980", vec!["m1", "m2"]),
        ("birthdate=1980-03", vec!["m1"]),
        ("birthdate=ge1980-06-01&name=mul", vec!["m2", "m3", "m4"]),
        ("birthdate=lt1999-01-01&name=mul", vec!["m1", "m2"]),
        ("birthdate=ge2000", vec!["m4"]),
    ] {
        let (s, found, b) = search(q).await;
        assert_eq!(s, 200, "{q}: {b}");
        let expect: Vec<String> = expect.iter().map(|id| format!("Patient/{id}")).collect();
        assert_eq!(found, expect, "{q}");
    }
    // Without an index to narrow by, the bound still holds, and the answer says why.
    for q in [
        "name:contains=ulle",
        "gender=female",
        "birthdate=ne1980",
        "name:missing=true",
    ] {
        let (s, _, b) = search(q).await;
        assert_eq!(s, 400, "{q}: {b}");
        assert!(b.to_string().contains("would scan more than"), "{q}: {b}");
    }
}

/// A Bundle is answered from the built-in store, so entries of a type routed to a backend FHIR
/// server are refused (405) rather than written to, or read from, the wrong place.
#[tokio::test]
async fn bundle_entries_of_a_backend_routed_type_are_refused() {
    let cfg: FacadeConfig = toml::from_str(
        r#"
        [[backends]]
        name = "lab"
        url = "http://127.0.0.1:9/fhir"
        resource_types = ["Observation"]
        health_check_secs = 0
        "#,
    )
    .unwrap();
    let e = env_with(cfg);
    let admin = e.token("system/*.cruds", |_| {});
    let obs = obs("o1", "p1", "laboratory");
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "PUT", "url": "Patient/p1"}, "resource": patient("p1", "Smith")},
        {"request": {"method": "PUT", "url": "Observation/o1"}, "resource": obs},
    ]});
    let (s, _, b) = e
        .call("POST", "/fhir", Some(&admin), Some(transaction))
        .await;
    assert_eq!(s, 405, "{b}");
    assert!(
        b.to_string()
            .contains("entry 1: Observation is served by the backend FHIR server \\\"lab\\\""),
        "{b}"
    );
    let store = &e.st.rt.store;
    assert!(store
        .read("default", "Observation", "o1")
        .unwrap()
        .is_none());
    assert!(
        store.read("default", "Patient", "p1").unwrap().is_none(),
        "all or nothing"
    );
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?patient=p1"}},
        {"request": {"method": "PUT", "url": "Patient/p1"}, "resource": patient("p1", "Smith")},
    ]});
    let (s, _, b) = e.call("POST", "/fhir", Some(&admin), Some(batch)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["entry"][0]["response"]["status"], "405 Method Not Allowed",
        "{b}"
    );
    assert!(
        b["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("201"),
        "{b}"
    );
}

/// `$everything` asks the backends for the patient's resources of the types they serve; when
/// one cannot answer, the Bundle says which types are missing and why, in an OperationOutcome
/// entry, and has no `total`, instead of looking complete. Types with no patient link
/// (Practitioner) are not in a compartment and not asked.
#[tokio::test]
async fn everything_names_what_an_unreachable_backend_could_not_give() {
    let cfg: FacadeConfig = toml::from_str(
        r#"
        [[backends]]
        name = "lab"
        url = "http://127.0.0.1:9/fhir"
        resource_types = ["Observation", "DiagnosticReport", "Practitioner"]
        health_check_secs = 0
        "#,
    )
    .unwrap();
    let e = env_with(cfg);
    let admin = e.token("system/*.cruds", |_| {});
    let (s, _, b) = e
        .call(
            "PUT",
            "/fhir/Patient/p1",
            Some(&admin),
            Some(patient("p1", "Smith")),
        )
        .await;
    assert!(s.is_success(), "{b}");
    let (s, _, b) = e
        .call("GET", "/fhir/Patient/p1/$everything", Some(&admin), None)
        .await;
    assert_eq!(s, 200, "{b}");
    let outcomes: Vec<&Value> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["search"]["mode"] == "outcome")
        .collect();
    assert_eq!(outcomes.len(), 1, "{b}");
    let said = outcomes[0]["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert_eq!(
        said,
        "not all in this answer: DiagnosticReport (lab): backend lab unavailable; \
         Observation (lab): backend lab unavailable"
    );
    assert!(b.get("total").is_none(), "{b}");
    assert_eq!(b["entry"][0]["resource"]["id"], "p1");
    // without backends, no such entry
    let e = env();
    let admin = e.token("system/*.cruds", |_| {});
    e.call(
        "PUT",
        "/fhir/Patient/p1",
        Some(&admin),
        Some(patient("p1", "Smith")),
    )
    .await;
    let (_, _, b) = e
        .call("GET", "/fhir/Patient/p1/$everything", Some(&admin), None)
        .await;
    assert!(
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["search"]["mode"] == "match"),
        "{b}"
    );
}
