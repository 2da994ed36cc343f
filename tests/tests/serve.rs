//! `tributary serve` with no configuration: starts, answers /health and /ready, writes only
//! under its data directory, and stops cleanly on SIGTERM. Malformed configuration fails fast.

use std::process::{Command, Stdio};
use std::time::Duration;
use tributary_e2e::{free_port, http_get, workspace_bin, Server};

#[test]
fn serve_with_no_config_starts_answers_and_stops_cleanly() {
    let cwd = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mllp = format!("127.0.0.1:{}", free_port());
    let log = cwd.path().join("../serve-test.log");
    let child = Command::new(workspace_bin("tributary"))
        .arg("serve")
        .current_dir(cwd.path())
        // Ports only: the test must not collide with a developer's running instance.
        .env("TRIBUTARY_HTTP__LISTEN", &http)
        .env("TRIBUTARY_MLLP__LISTEN", &mllp)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server {
        child,
        http: http.clone(),
    };
    server.wait_ready(Duration::from_secs(30));

    let health = http_get(&http, "/health").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&http, "/ready").unwrap();
    assert!(
        ready.contains("\"store\":{\"status\":\"ready\"}"),
        "{ready}"
    );
    assert!(ready.contains("\"http\":{\"status\":\"ready\"}"), "{ready}");

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
