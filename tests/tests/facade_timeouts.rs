//! `http.request_timeout_secs` bounds every facade request: a backend FHIR server that does not
//! answer in time gives 504, a request the facade itself cannot finish in time (here: a client
//! that never sends its announced body) gives 503 — each with an OperationOutcome and an audit
//! record saying so. A backend's answer is bounded in size too (`max_response_bytes`): 502.
//! A backend that cannot be reached shows as degraded in `/ready`, which stays 200.

mod facade_support;

use facade_support::{export_audit, Facade};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend that accepts connections, reads the request, and lets `answer` write the response.
fn backend(answer: impl Fn(&mut TcpStream) + Send + Sync + 'static) -> String {
    backend_on(TcpListener::bind("127.0.0.1:0").unwrap(), answer)
}

fn backend_on(
    listener: TcpListener,
    answer: impl Fn(&mut TcpStream) + Send + Sync + 'static,
) -> String {
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                answer(&mut conn);
            });
        }
    });
    format!("http://{addr}/fhir")
}

/// A backend that answers only after `delay`.
fn slow_backend(delay: Duration) -> String {
    backend(move |conn| {
        std::thread::sleep(delay);
        let body = r#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#;
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
    })
}

fn assert_timeout_outcome(r: &facade_support::Resp, status: u16) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.json["resourceType"], "OperationOutcome", "{}", r.text);
    assert_eq!(r.json["issue"][0]["code"], "timeout", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_backend_gets_504_within_the_request_timeout_and_is_audited() {
    let slow = slow_backend(Duration::from_secs(20));
    // Observation: the backend's own timeout is long, so the request timeout (2 s) decides.
    // Condition: the backend's own timeout (1 s) fires first; that is a 504 as well.
    let config = format!(
        "[http]\nrequest_timeout_secs = 2\n\n\
         [[facade.backends]]\nname = \"slow-lab\"\nurl = \"{slow}\"\nresource_types = [\"Observation\"]\ntimeout_secs = 60\nhealth_check_secs = 0\n\n\
         [[facade.backends]]\nname = \"slow-problems\"\nurl = \"{slow}\"\nresource_types = [\"Condition\"]\ntimeout_secs = 1\nhealth_check_secs = 0\n"
    );
    let mut f = Facade::start(Some(&config));
    let t = f.token("app", "user/*.cruds", &[]);

    // Which timeout decided is in the answer (not measured: durations flake on a busy host).
    let r = f.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_timeout_outcome(&r, 504);
    assert_eq!(
        r.json["issue"][0]["diagnostics"],
        "backend slow-lab did not answer within the request timeout"
    );

    let r = f.call("GET", "/fhir/Condition", Some(&t), None).await;
    assert_timeout_outcome(&r, 504);
    assert_eq!(
        r.json["issue"][0]["diagnostics"],
        "backend slow-problems did not answer within its timeout_secs",
        "the backend's 1 s timeout decides"
    );

    // The store is unaffected.
    let r = f.call("GET", "/fhir/Patient", Some(&t), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Both backends count as not answering, whichever timeout decided.
    let ready = f.call("GET", "/ready", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    for (name, why) in [
        ("slow-lab", "no answer within the request timeout"),
        ("slow-problems", "no answer within timeout_secs"),
    ] {
        let c = &ready.json["components"][format!("backend.{name}")];
        assert_eq!(c["status"], "degraded", "{}", ready.text);
        assert!(
            c["reason"].as_str().unwrap().contains(why),
            "{}",
            ready.text
        );
    }

    f.stop();
    let records = export_audit(&f, None);
    for rtype in ["Observation", "Condition"] {
        let rec = records
            .iter()
            .map(|e| &e["body"])
            .find(|b| b["resource_type"] == rtype)
            .unwrap_or_else(|| panic!("no audit record for the {rtype} search: {records:?}"));
        assert_eq!(rec["status"], 504, "{rec}");
        assert_eq!(rec["outcome"], "failed", "{rec}");
        assert_eq!(rec["detail"], "timeout", "{rec}");
        assert!(
            rec["backend"].as_str().unwrap().starts_with("slow-"),
            "{rec}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_that_cannot_finish_in_time_gets_503_and_is_audited() {
    let mut f = Facade::start(Some("[http]\nrequest_timeout_secs = 1\n"));
    let t = f.token("app", "user/*.cruds", &[]);
    let addr = f.base.strip_prefix("http://").unwrap().to_string();
    // Announce a body, send one byte of it, then wait: the handler waits for the rest.
    let res = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        write!(
            s,
            "PUT /fhir/Patient/slow HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {t}\r\n\
             content-type: application/fhir+json\r\ncontent-length: 200\r\n\r\n{{"
        )
        .unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read until the whole (small) response arrived or the server closed.
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                break;
            }
        }
        (String::from_utf8_lossy(&buf).to_string(), started.elapsed())
    })
    .await
    .unwrap();
    let (text, took) = res;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.contains("OperationOutcome") && text.contains("timeout"),
        "{text}"
    );
    assert!(took < Duration::from_secs(5), "answered after {took:?}");

    f.stop();
    let records = export_audit(&f, None);
    let rec = records
        .iter()
        .map(|e| &e["body"])
        .find(|b| b["resource_id"] == "slow")
        .unwrap_or_else(|| panic!("no audit record for the timed-out update: {records:?}"));
    assert_eq!(rec["status"], 503, "{rec}");
    assert_eq!(rec["detail"], "timeout", "{rec}");
    assert_eq!(rec["interaction"], "update", "{rec}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_answers_past_max_response_bytes_get_502_without_reading_to_the_end() {
    // One backend streams a Bundle without end; the other announces 1 GiB and then stalls.
    let endless = backend(|conn| {
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let chunk = format!("1000\r\n{}\r\n", " ".repeat(4096));
        while conn.write_all(chunk.as_bytes()).is_ok() {}
    });
    let announced = backend(|conn| {
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 1073741824\r\n\r\n{{"
        );
        std::thread::sleep(Duration::from_secs(60));
    });
    let config = format!(
        "[http]\nrequest_timeout_secs = 30\n\n\
         [[facade.backends]]\nname = \"endless\"\nurl = \"{endless}\"\nresource_types = [\"Observation\"]\ntimeout_secs = 60\nmax_response_bytes = 1048576\n\n\
         [[facade.backends]]\nname = \"announced\"\nurl = \"{announced}\"\nresource_types = [\"Condition\"]\ntimeout_secs = 60\n"
    );
    let mut f = Facade::start(Some(&config));
    let t = f.token("app", "user/*.cruds", &[]);
    for (path, name, limit) in [
        ("/fhir/Observation", "endless", 1 << 20),
        ("/fhir/Condition", "announced", 32 << 20),
    ] {
        let started = Instant::now();
        let r = f.call("GET", path, Some(&t), None).await;
        assert_eq!(r.status, 502, "{}", r.text);
        assert_eq!(r.json["resourceType"], "OperationOutcome", "{}", r.text);
        assert_eq!(
            r.json["issue"][0]["diagnostics"],
            format!("backend {name}: response body larger than {limit} bytes"),
        );
        // Refused at the limit, not when the request timeout (30 s) ran out.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name}: answered after {:?}",
            started.elapsed()
        );
    }
    let r = f.call("GET", "/fhir/Patient", Some(&t), None).await;
    assert_eq!(r.status, 200, "the facade keeps serving: {}", r.text);

    f.stop();
    let records = export_audit(&f, None);
    for name in ["endless", "announced"] {
        let rec = records
            .iter()
            .map(|e| &e["body"])
            .find(|b| b["backend"] == name)
            .unwrap_or_else(|| panic!("no audit record for backend {name}: {records:?}"));
        assert_eq!(rec["status"], 502, "{rec}");
        assert_eq!(rec["outcome"], "failed", "{rec}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_backend_shows_degraded_in_ready_and_ready_again_once_it_answers() {
    // Health checks off: what a routed request finds decides (they are tested below).
    // A port that refuses connections now, and takes them once the backend "comes back".
    let parked = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = parked.local_addr().unwrap();
    drop(parked);
    let config = format!(
        "[[facade.backends]]\nname = \"lab\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Observation\"]\nconnect_timeout_secs = 2\nhealth_check_secs = 0\n"
    );
    let mut f = Facade::start(Some(&config));
    let t = f.token("app", "user/*.cruds", &[]);
    let ready = f.call("GET", "/ready", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(
        ready.json["components"]["backend.lab"]["status"], "ready",
        "every backend is listed from the start: {}",
        ready.text
    );

    let r = f.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_eq!(r.status, 502, "{}", r.text);
    let ready = f.call("GET", "/ready", None, None).await;
    assert_eq!(
        ready.status, 200,
        "one backend down leaves the rest of the API serving: {}",
        ready.text
    );
    assert_eq!(ready.json["status"], "degraded", "{}", ready.text);
    let lab = &ready.json["components"]["backend.lab"];
    assert_eq!(lab["status"], "degraded", "{}", ready.text);
    assert!(
        lab["reason"]
            .as_str()
            .unwrap()
            .contains("connection failed"),
        "{}",
        ready.text
    );
    let metrics = f.call("GET", "/metrics", None, None).await.text;
    assert!(
        metrics.contains("tributary_component_degraded{component=\"backend.lab\"} 1"),
        "{metrics}"
    );
    // the store's types are unaffected
    let r = f.call("GET", "/fhir/Patient", Some(&t), None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The backend comes back: the next request routed to it turns it ready again.
    let back = TcpListener::bind(addr).unwrap();
    let url = backend_on(back, |conn| {
        let body = r#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#;
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    assert_eq!(url, format!("http://{addr}/fhir"));
    let r = f.call("GET", "/fhir/Observation", Some(&t), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ready = f.call("GET", "/ready", None, None).await;
    assert_eq!(
        ready.json["components"]["backend.lab"]["status"], "ready",
        "{}",
        ready.text
    );
    f.stop();
}

/// With health checks (`health_check_secs`), `/ready` shows a backend that cannot be reached
/// without any request routed to it, and `ready` again once it answers `GET /metadata`; each
/// check is counted in `/metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn health_checks_show_a_backend_down_and_back_before_any_request() {
    let parked = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = parked.local_addr().unwrap();
    drop(parked);
    let config = format!(
        "[[facade.backends]]\nname = \"lab\"\nurl = \"http://{addr}/fhir\"\nresource_types = [\"Observation\"]\nconnect_timeout_secs = 2\nhealth_check_secs = 1\n"
    );
    let mut f = Facade::start(Some(&config));
    let backend_status = |r: &facade_support::Resp| {
        let c = &r.json["components"]["backend.lab"];
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["reason"].as_str().unwrap_or("").to_string(),
        )
    };
    let mut ready = f.call("GET", "/ready", None, None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend_status(&ready).0 != "degraded" {
        assert!(Instant::now() < deadline, "never degraded: {}", ready.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = f.call("GET", "/ready", None, None).await;
    }
    assert_eq!(ready.status, 200, "{}", ready.text);
    let (_, reason) = backend_status(&ready);
    assert!(
        reason.contains("connection failed on GET /metadata") && reason.contains("health check"),
        "{reason}"
    );

    // It comes back: the next check finds it, with no request routed to it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx = std::sync::Mutex::new(tx);
    let back = TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        for conn in back.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let _ = tx
                .lock()
                .unwrap()
                .send(String::from_utf8_lossy(&buf[..n]).into_owned());
            let body = r#"{"resourceType":"CapabilityStatement","status":"active","fhirVersion":"4.0.1","kind":"instance","format":["json"]}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend_status(&ready).0 != "ready" {
        assert!(
            Instant::now() < deadline,
            "never ready again: {}",
            ready.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = f.call("GET", "/ready", None, None).await;
    }
    // What reached the backend is the health check alone: no caller identity, no token.
    let seen = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .to_ascii_lowercase();
    assert!(seen.starts_with("get /fhir/metadata "), "{seen}");
    assert!(
        !seen.contains("authorization") && !seen.contains("x-tributary-"),
        "{seen}"
    );
    let metrics = f.call("GET", "/metrics", None, None).await.text;
    for outcome in ["unreachable", "answered"] {
        let line = format!(
            "tributary_backend_health_checks_total{{backend=\"lab\",outcome=\"{outcome}\"}}"
        );
        assert!(metrics.contains(&line), "{line} missing: {metrics}");
    }
    f.stop();
}
