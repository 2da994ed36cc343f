//! `tributary serve` with no configuration: starts, answers /health and /ready, writes only
//! under its data directory, and stops cleanly on SIGTERM. Malformed configuration fails fast.

use std::process::{Command, Stdio};
use std::time::Duration;
use tributary_e2e::{free_port, http_get, workspace_bin, Server};

#[path = "../../adapters/mllp/tests/common/pki.rs"]
mod pki;

#[test]
fn serve_with_no_config_starts_answers_and_stops_cleanly() {
    let cwd = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mllp = format!("127.0.0.1:{}", free_port());
    let log = cwd.path().join("../serve-test.log");
    let mut server = Server::spawn(
        Command::new(workspace_bin("tributary"))
            .arg("serve")
            .current_dir(cwd.path())
            // Ports only: the test must not collide with a developer's running instance.
            .env("TRIBUTARY_HTTP__LISTEN", &http)
            .env("TRIBUTARY_MLLP__LISTEN", &mllp)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
        &http,
    );
    server.wait_ready(Duration::from_secs(30));

    let health = http_get(&http, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&http, "/ready").unwrap();
    assert!(
        ready.contains("\"store\":{\"status\":\"ready\"}"),
        "{ready}"
    );
    assert!(ready.contains("\"http\":{\"status\":\"ready\"}"), "{ready}");
    // no mapping set in this directory: messages are kept, and /ready says they wait
    assert!(ready.contains("\"status\":\"degraded\""), "{ready}");
    assert!(ready.contains("no mapping set at"), "{ready}");

    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("stopped cleanly"), "{logs}");

    let entries: Vec<_> = std::fs::read_dir(cwd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        vec!["tributary-data".to_string()],
        "wrote outside its data directory"
    );
    // The data directory holds a real store that reopens.
    let db = tributary_storage::Db::open(cwd.path().join("tributary-data"), Default::default());
    assert!(db.is_ok());
    let _ = std::fs::remove_file(log);

    // Other commands need the directory `serve` made: a wrong path is an error, not a new
    // empty store that answers "0 records".
    let missing = cwd.path().join("not-the-data-dir");
    for args in [
        &["audit", "verify"][..],
        &["journal", "list"],
        &["consent", "revoke", "grant-1"],
        &["token", "issue", "--client", "c", "--scope", "user/*.rs"],
    ] {
        let out = Command::new(workspace_bin("tributary"))
            .args(args)
            .arg("--data-dir")
            .arg(&missing)
            .current_dir(cwd.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("does not exist"), "{args:?}: {stderr}");
        assert!(!missing.exists(), "{args:?} created the directory");
    }
}

/// A component that stops on its own (here: the MLLP port is taken) stops the server with a
/// failing exit status, so that a supervisor restarts it.
#[test]
fn a_failed_component_makes_serve_exit_with_failure() {
    let cwd = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mllp = taken.local_addr().unwrap().to_string();
    let http = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(workspace_bin("tributary"))
        .arg("serve")
        .current_dir(cwd.path())
        .env("TRIBUTARY_HTTP__LISTEN", &http)
        .env("TRIBUTARY_MLLP__LISTEN", &mllp)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if began.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("serve kept running without its MLLP listener");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status:?}: {stderr}");
    assert!(stderr.contains("component"), "{stderr}");
    drop(taken);
}

#[test]
fn malformed_config_names_key_value_and_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[log]\nformat = \"xml\"\n",
            vec!["log.format", "xml", "pretty, json"],
        ),
        (
            "[http]\nlisten = \"everywhere\"\n",
            vec!["http.listen", "everywhere", "IP:PORT"],
        ),
        ("[journal]\nmax_grup = 3\n", vec!["max_grup", "max_group"]),
        (
            "[journal]\nmax_group = 0\n",
            vec!["journal.max_group", "greater than 0"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(workspace_bin("tributary"))
            .args(["config", "check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "case {i} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(err.contains(n), "case {i}: {n:?} missing from {err}");
        }
        // `serve` refuses the same file before opening anything.
        let out = Command::new(workspace_bin("tributary"))
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("never"))
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            !dir.path().join("never").exists(),
            "serve touched the disk with a bad config"
        );
    }
    let out = Command::new(workspace_bin("tributary"))
        .args(["config", "check", "--config", "/nonexistent/tributary.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tributary.toml"));
}

/// Whether the server closed `s` (end of stream or reset) within its read timeout, reading and
/// discarding whatever it still sends; `false` when the connection stayed open.
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    read_until_closed(s).is_some()
}

/// Everything the server sent before it closed the connection; `None` when it did not close it
/// within the read timeout.
fn read_until_closed(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::{ErrorKind, Read};
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

/// The HTTP listener bounds its connections in time and number: one silent from the start, one
/// stopped in the middle of its request head and one left open after a keep-alive answer are
/// closed after `http.idle_timeout_secs`; past `http.max_connections` a new connection is closed
/// at once while those within the limit are served; and SIGTERM still stops the server cleanly
/// with a connection open.
#[test]
fn http_connections_are_bounded_in_time_and_number() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut server = Server::spawn(
        Command::new(workspace_bin("tributary"))
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("TRIBUTARY_HTTP__LISTEN", &http)
            .env(
                "TRIBUTARY_MLLP__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("TRIBUTARY_HTTP__IDLE_TIMEOUT_SECS", "2")
            .env("TRIBUTARY_HTTP__MAX_CONNECTIONS", "4")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        &http,
    );
    server.wait_ready(Duration::from_secs(30));
    let connect = || {
        let s = TcpStream::connect(&http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    };
    let health = b"GET /health HTTP/1.1\r\nHost: tributary\r\n\r\n";
    // `false` for a connection the server closed instead of answering
    let answered = |s: &mut TcpStream| {
        let mut buf = [0u8; 4096];
        s.write_all(health).is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"))
    };

    let opened = Instant::now();
    let mut silent = connect();
    let mut partial = connect();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: tributary\r\n")
        .unwrap();
    let mut idle = connect();
    assert!(answered(&mut idle), "a keep-alive request is answered");
    // The readiness probe's connection may hold its place a moment after its answer: retry the
    // fourth (each refusal is counted below) while the three above are surely open, i.e.
    // within the idle timeout of opening them.
    let mut fourths_refused = 0;
    let fourth = tributary_e2e::wait("the fourth connection to be within the limit")
        .within(Duration::from_secs(2).saturating_sub(opened.elapsed()))
        .until(|| {
            let mut s = connect();
            if answered(&mut s) {
                return Some(s);
            }
            fourths_refused += 1;
            None
        });
    let mut fifth = connect();
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = fifth.write_all(health);
    assert_eq!(
        read_until_closed(&mut fifth).map(|b| String::from_utf8_lossy(&b).into_owned()),
        Some(String::new()),
        "a fifth connection is closed unanswered"
    );

    for (name, s) in [
        ("silent", &mut silent),
        ("partial head", &mut partial),
        ("idle keep-alive", &mut idle),
    ] {
        assert!(closed_by_server(s), "{name}: still open after 20 s");
    }
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "closed before the idle timeout: {waited:?}"
    );
    // The closed connections gave their places back, and /metrics counts what happened.
    let again = http_get(&http, "/health").unwrap();
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    let metrics = http_get(&http, "/metrics").unwrap();
    let refused = format!(
        "tributary_http_connections_total{{outcome=\"refused\"}} {}\n",
        1 + fourths_refused
    );
    assert!(metrics.contains(&refused), "{refused:?} in {metrics}");
    let idle_closed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tributary_http_connections_closed_total{reason=\"idle\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(idle_closed >= 2, "silent connections counted: {metrics}");

    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    drop(fourth);
}

/// `[http.tls]`: the facade, `/health` and `/ready` are served over HTTPS and only over HTTPS;
/// with `require_client_cert`, a client needs a certificate from the configured CA, and a client
/// that does not trust the server's CA gets no answer either.
#[tokio::test(flavor = "multi_thread")]
async fn https_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = pki::Pki::new("HTTP Test CA");
    pki.write_ca(&d.join("ca.crt"));
    pki.write(d, "server", "localhost", &["localhost"], false);
    pki.write(d, "app", "care-app", &["care-app.example.org"], true);
    let port = free_port();
    let config = d.join("tributary.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n\n[http.tls]\ncert = \"{c}\"\nkey = \"{k}\"\nclient_ca = \"{ca}\"\nrequire_client_cert = true\n",
            c = d.join("server.crt").display(),
            k = d.join("server.key").display(),
            ca = d.join("ca.crt").display(),
        ),
    )
    .unwrap();
    let log = d.join("serve.log");
    let mut server = Server::spawn(
        Command::new(workspace_bin("tributary"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(d.join("data"))
            .env(
                "TRIBUTARY_MLLP__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
        &format!("127.0.0.1:{port}"),
    );
    let addr: std::net::SocketAddr = server.http.parse().unwrap();
    tributary_e2e::wait_listening(&mut server.child, &log, &[addr]);

    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.crt")).unwrap()).unwrap();
    let client = |identity: Option<&str>, trust: bool| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .resolve("localhost", addr)
            .timeout(Duration::from_secs(10));
        if trust {
            b = b.add_root_certificate(ca.clone());
        }
        if let Some(name) = identity {
            let mut pem = std::fs::read(d.join(format!("{name}.crt"))).unwrap();
            pem.extend(std::fs::read(d.join(format!("{name}.key"))).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let app = client(Some("app"), true);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match app.get(url("/ready")).send().await {
            Ok(r) if r.status() == 200 => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "never ready over HTTPS"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = app.get(url("/fhir/metadata")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cs: serde_json::Value = r.json().await.unwrap();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    let smart: serde_json::Value = app
        .get(url("/fhir/.well-known/smart-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        smart["jwks_uri"]
            .as_str()
            .is_some_and(|u| u.starts_with(&url("/"))),
        "links name the HTTPS base: {smart}"
    );

    let refused = client(None, true).get(url("/health")).send().await;
    assert!(refused.is_err(), "no client certificate: {refused:?}");
    let untrusting = client(Some("app"), false).get(url("/health")).send().await;
    assert!(untrusting.is_err(), "server CA not trusted: {untrusting:?}");
    let plain = http_get(&server.http, "/health").unwrap_or_default();
    assert!(
        !plain.starts_with("HTTP/1.1 2"),
        "plain HTTP is not served: {plain}"
    );

    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}
