//! The websocket channel of FHIR Subscriptions through the real binary and a real websocket
//! client (tokio-tungstenite): two patient-context SMART clients each create a websocket
//! Subscription, get a binding token with `$get-ws-binding-token`, bind, and receive the
//! handshake, a heartbeat, and notifications for their own patient's matching changes only.
//! Bad, reused and expired binding tokens get an OperationOutcome and a close. Over `[http.tls]`
//! the binding URL is `wss://` and binding works there. Open websockets are bounded by
//! `ws_max_connections`.

mod events_common;
#[path = "../../adapters/mllp/tests/common/pki.rs"]
mod pki;

use events_common::{
    get_json, issue_token, kind, observation_subscription, post_fhir, repo_root, token_config,
    Server,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tributary_e2e::wait;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn param<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no parameter {name} in {p}"))
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn post(&self, rtype: &str, body: &Value) -> Value {
        let res = post_fhir(&self.http, &self.base, &self.token, rtype, body).await;
        res.json().await.unwrap()
    }

    async fn binding_token(&self, sub: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!(
                "{}/Subscription/{sub}/$get-ws-binding-token",
                self.base
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let code = res.status().as_u16();
        (code, res.json().await.unwrap_or(Value::Null))
    }
}

/// Next text message as JSON, within `secs`.
async fn next_json(ws: &mut Ws, secs: u64) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match m.ok()? {
            Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn bind(url: &str, token: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    ws
}

/// A refused bind: an OperationOutcome, then a close frame with code 1008.
async fn expect_refused(url: &str, token: &str, what: &str) {
    let mut ws = bind(url, token).await;
    let m = next_json(&mut ws, 10).await.expect(what);
    assert_eq!(m["resourceType"], "OperationOutcome", "{what}: {m}");
    let mut closed = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Message::Close(f) = m {
            closed = Some(f.map(|f| u16::from(f.code)));
            break;
        }
    }
    assert_eq!(closed, Some(Some(1008)), "{what}: closed with policy code");
}

/// Collects notifications for `secs` and returns the focus URLs of event notifications.
async fn focus_of(ws: &mut Ws, secs: u64) -> Vec<String> {
    let mut focus = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = m {
            let b: Value = serde_json::from_str(&t).unwrap();
            if kind(&b) == "event-notification" {
                for e in b["entry"].as_array().unwrap().iter().skip(1) {
                    focus.push(e["fullUrl"].as_str().unwrap().to_string());
                    assert!(e["resource"].is_object(), "full-resource payload");
                }
            }
        }
    }
    focus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_get_handshake_heartbeat_and_only_their_patients_events() {
    let _ = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = token_config(&data);
    let system = issue_token(&config, "feeder", "system/*.cruds", None);
    let scope = "patient/Observation.rs patient/Subscription.cruds";
    let alice = issue_token(&config, "care-app", scope, Some("pA"));
    let bob = issue_token(&config, "care-app", scope, Some("pB"));

    let extra = "[subscriptions]\nmin_heartbeat_secs = 1\nrescan_secs = 1\nws_token_ttl_secs = 3\n";
    let server = Server::start(&data, extra);
    let base = format!("http://{}/fhir", server.http);
    let http = reqwest::Client::new();
    let client = |token: &str| Client {
        http: http.clone(),
        base: base.clone(),
        token: token.to_string(),
    };
    let (feeder, a, b) = (client(&system), client(&alice), client(&bob));

    // Each patient-context client subscribes; the facade confines the Subscription to its patient.
    let ws_sub = observation_subscription("websocket", None, "full-resource");
    let sub_a = a.post("Subscription", &ws_sub).await;
    let sub_b = b.post("Subscription", &ws_sub).await;
    let (id_a, id_b) = (
        sub_a["id"].as_str().unwrap().to_string(),
        sub_b["id"].as_str().unwrap().to_string(),
    );
    assert!(
        sub_a.to_string().contains("Patient/pA"),
        "patient context stamped: {sub_a}"
    );

    // A binding token needs a token that may read that Subscription.
    let (code, _) = b.binding_token(&id_a).await;
    assert_eq!(code, 403, "bob may not bind to alice's subscription");
    let res = http
        .get(format!("{base}/Subscription/{id_a}/$get-ws-binding-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status().as_u16(),
        401,
        "no SMART token, no binding token"
    );
    let (code, params_a) = a.binding_token(&id_a).await;
    assert_eq!(code, 200, "{params_a}");
    assert_eq!(
        param(&params_a, "subscription")["valueString"],
        format!("Subscription/{id_a}")
    );
    assert!(param(&params_a, "expiration")["valueDateTime"].is_string());
    let url = param(&params_a, "websocket-url")["valueUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.starts_with("ws://"), "{url}");
    let token_a = param(&params_a, "token")["valueString"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, params_b) = b.binding_token(&id_b).await;
    let token_b = param(&params_b, "token")["valueString"]
        .as_str()
        .unwrap()
        .to_string();

    // Bind: the handshake first, then heartbeats (period 1 s).
    let mut ws_a = bind(&url, &token_a).await;
    let mut ws_b = bind(&url, &token_b).await;
    for (ws, id) in [(&mut ws_a, &id_a), (&mut ws_b, &id_b)] {
        let hs = next_json(ws, 15).await.expect("handshake");
        assert_eq!(kind(&hs), "handshake", "{hs}");
        assert!(hs.to_string().contains(&format!("Subscription/{id}")));
        let mut heartbeat = false;
        for _ in 0..10 {
            let m = next_json(ws, 5)
                .await
                .expect("a message after the handshake");
            if kind(&m) == "heartbeat" {
                heartbeat = true;
                break;
            }
        }
        assert!(heartbeat, "a heartbeat within the heartbeat period");
    }

    // Changes: an Observation of each patient, and an Encounter of A (not this topic).
    let obs = |p: &str| {
        json!({"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "subject": {"reference": format!("Patient/{p}")}})
    };
    let oa = feeder.post("Observation", &obs("pA")).await;
    feeder
        .post(
            "Encounter",
            &json!({"resourceType": "Encounter", "status": "in-progress",
                    "class": {"code": "IMP"}, "subject": {"reference": "Patient/pA"}}),
        )
        .await;
    let ob = feeder.post("Observation", &obs("pB")).await;
    let (focus_a, focus_b) = tokio::join!(focus_of(&mut ws_a, 5), focus_of(&mut ws_b, 5));
    let want = |o: &Value| format!("/Observation/{}", o["id"].as_str().unwrap());
    assert_eq!(focus_a.len(), 1, "alice: {focus_a:?}");
    assert!(focus_a[0].ends_with(&want(&oa)), "alice: {focus_a:?}");
    assert_eq!(focus_b.len(), 1, "bob: {focus_b:?}");
    assert!(focus_b[0].ends_with(&want(&ob)), "bob: {focus_b:?}");

    // Refusals: unknown, already used, expired.
    expect_refused(&url, "not-a-token", "unknown token").await;
    expect_refused(&url, &token_a, "reused token").await;
    let (_, p) = a.binding_token(&id_a).await;
    let late = param(&p, "token")["valueString"]
        .as_str()
        .unwrap()
        .to_string();
    // Expiry is the passing of time itself: wait until the expiration the server gave is past.
    let expires = param(&p, "expiration")["valueDateTime"].as_str().unwrap();
    let expires = tributary_core::parse_rfc3339_millis(expires).expect("an RFC 3339 expiration");
    wait("the binding token's expiration to pass")
        .until_async(|| async { (tributary_core::now_millis() > expires).then_some(()) })
        .await;
    expect_refused(&url, &late, "expired token").await;

    // Missed while disconnected: $events has them.
    drop(ws_a);
    let oa2 = feeder.post("Observation", &obs("pA")).await;
    wait("$events to have the event missed while disconnected")
        .until_async(|| async {
            let url = format!("{base}/Subscription/{id_a}/$events");
            let ev = get_json(&http, &url, &alice).await;
            ev.to_string().contains(&want(&oa2)).then_some(())
        })
        .await;
    server.stop();

    // Binds and closes are audited, with client and patient, and no payload.
    let db = tributary_storage::Db::open(&data, tributary_storage::DbOptions::default()).unwrap();
    let audit = tributary_storage::AuditLog::new(db);
    let ws: Vec<Value> = audit
        .read_after(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| e.body)
        .filter(|b| b["kind"] == "subscription-websocket")
        .collect();
    let binds = |outcome: &str| {
        ws.iter()
            .filter(|b| b["interaction"] == "websocket-bind" && b["outcome"] == outcome)
            .count()
    };
    assert_eq!(binds("allowed"), 2, "{ws:?}");
    assert_eq!(binds("denied"), 3, "unknown, reused, expired: {ws:?}");
    assert!(ws.iter().any(|b| b["resource_id"] == id_a.as_str()
        && b["patient"] == "pA"
        && b["client"] == "care-app"));
    assert!(
        !format!("{ws:?}").contains("8867-4"),
        "no payload in the audit"
    );
}

/// Over `[http.tls]`: `$get-ws-binding-token` names a `wss://` URL on the same listener, and a
/// websocket client that trusts the server's CA binds there and gets its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_binding_url_is_wss_and_binding_works() {
    let _ = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pki = pki::Pki::new("WSS Test CA");
    pki.write_ca(&dir.path().join("ca.crt"));
    pki.write(dir.path(), "server", "localhost", &["localhost"], false);
    let config = token_config(&data);
    let alice = issue_token(
        &config,
        "care-app",
        "patient/Observation.rs patient/Subscription.cruds",
        Some("pA"),
    );
    let extra = format!(
        "[subscriptions]\nmin_heartbeat_secs = 1\nrescan_secs = 1\n[http.tls]\ncert = {:?}\nkey = {:?}\n",
        dir.path().join("server.crt").display().to_string(),
        dir.path().join("server.key").display().to_string(),
    );
    let server = Server::start(&data, &extra);
    let port = server.http.port();
    let ca_pem = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .resolve("localhost", server.http)
        .build()
        .unwrap();
    let a = Client {
        http,
        base: format!("https://localhost:{port}/fhir"),
        token: alice,
    };
    let sub = a
        .post(
            "Subscription",
            &observation_subscription("websocket", None, "id-only"),
        )
        .await;
    let id = sub["id"].as_str().unwrap();
    let (code, params) = a.binding_token(id).await;
    assert_eq!(code, 200, "{params}");
    let url = param(&params, "websocket-url")["valueUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        url.starts_with(&format!("wss://localhost:{port}/")),
        "{url}"
    );
    let token = param(&params, "token")["valueString"].as_str().unwrap();

    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        &url,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(
            tls,
        ))),
    )
    .await
    .unwrap();
    ws.send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    let hs = next_json(&mut ws, 15).await.expect("handshake over wss");
    assert_eq!(kind(&hs), "handshake", "{hs}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_connections_are_bounded_and_a_freed_slot_is_reused() {
    let _ = repo_root();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // (a bind timeout long enough that no unbound connection is dropped during the test)
    let server = Server::start(
        &data,
        "[subscriptions]\nws_max_connections = 2\nws_bind_timeout_secs = 120\n",
    );
    let url = format!("ws://{}/fhir/subscription-ws", server.http);
    // Two connections that have not bound yet hold both slots …
    let (first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // … so a third is refused before the upgrade, with an OperationOutcome and Retry-After.
    let refused = tokio_tungstenite::connect_async(&url).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(res) = refused else {
        panic!("expected an HTTP refusal, got {refused:?}");
    };
    assert_eq!(res.status().as_u16(), 503);
    assert_eq!(res.headers()["retry-after"], "5");
    let body: Value = serde_json::from_slice(res.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["code"], "transient", "{body}");
    // The HTTP API is not affected.
    let health = tributary_e2e::http_get(&server.http.to_string(), "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    // A connection that closes gives its slot back.
    drop(first);
    wait("a websocket slot to be free again")
        .until_async(|| {
            let url = url.clone();
            async move { tokio_tungstenite::connect_async(&url).await.ok() }
        })
        .await;
}
