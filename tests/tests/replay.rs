//! The analyst's loop after a mapping edit, through the real binary: `tributary replay` selects
//! messages by type and by the mapping version that last mapped them (`--stale`), asks the running
//! server (which holds the data directory) through its admin API, and the server maps them again
//! with the new version. Admin role and the token's tenant are enforced; with the server stopped
//! the same command queues the messages for the next start. `mapping report` and `audit verify`
//! also reach a running server.

mod mllp_common;

use mllp_common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tributary_core::MessageState;
use tributary_e2e::succeeded as ok;
use tributary_storage::{Db, DbOptions, FjallStore, Store};

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(tributary_e2e::tributary_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TRIBUTARY_TOKEN")
        .output()
        .expect("run tributary")
}

/// `journal list` rows: (id, state, attempts, version prefix).
fn rows(text: &str) -> Vec<(String, String, String, String)> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert!(f.len() >= 5, "not a journal row: {l:?}");
            (
                f[0].to_string(),
                f[2].to_string(),
                f[3].trim_start_matches("attempts=").to_string(),
                f[4].trim_start_matches("version=").to_string(),
            )
        })
        .collect()
}

/// Polls `journal list` (through the running server) until `done` holds for its rows.
fn wait_rows(
    config: &Path,
    args: &[&str],
    done: impl Fn(&[(String, String, String, String)]) -> bool,
) -> Vec<(String, String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rows(&ok(cli(config, &[&["journal", "list"], args].concat())));
        if done(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "journal never reached the state: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_log(log: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(Instant::now() < deadline, "{needle:?} never logged");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_edit_is_applied_to_the_stale_messages_of_one_type_through_the_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let maps = tmp.path().join("mappings");
    copy_dir(&tributary_e2e::repo_root().join("mappings"), &maps);
    let data = tmp.path().join("data");
    let config = data.with_extension("toml");
    let log = tmp.path().join("serve.log");
    let extra = format!(
        "[mapping]\ndir = {:?}\nreload_interval_secs = 1\n",
        maps.display().to_string()
    );
    let server = Server::start(&data, &log, &extra, &[]);
    let mllp = server.mllp.to_string();
    let fixtures = tributary_e2e::repo_root().join("mappings/hl7v2/messages");
    send_accepted(&mllp, &std::fs::read(fixtures.join("ADT_A01.hl7")).unwrap()).await;
    let oru_text = std::fs::read_to_string(fixtures.join("ORU_R01.hl7")).unwrap();
    send_accepted(&mllp, oru_text.as_bytes()).await;
    // a result for another patient (another ordering key)
    let other_patient = oru_text
        .replace("MRN70001", "MRN70002")
        .replace("|SYN-", "|SYN2-");
    assert_ne!(other_patient, oru_text);
    send_accepted(&mllp, other_patient.as_bytes()).await;

    // `journal list` works while the server holds the data directory: it asks the server.
    let before = wait_rows(&config, &[], |r| {
        r.len() == 3 && r.iter().all(|row| row.1 == "committed")
    });
    let (adt, oru, oru2) = (
        before[0].0.clone(),
        before[1].0.clone(),
        before[2].0.clone(),
    );
    let v1 = before[0].3.clone();
    assert!(before.iter().all(|r| r.3 == v1));

    // The analyst's edit: every Patient's gender becomes a constant. Hot reload picks it up.
    let file = maps.join("hl7v2/segments/PID-Patient.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let rule = "  - set: gender\n    from: PID-8\n    translate: v2-0001-gender\n";
    assert!(text.contains(rule));
    std::fs::write(
        &file,
        text.replace(rule, "  - set: gender\n    value: unknown\n"),
    )
    .unwrap();
    wait_log(&log, "mapping set reloaded");

    // Nothing is selected without a criterion; a dry run selects and queues nothing.
    let none = cli(&config, &["replay"]);
    assert_eq!(none.status.code(), Some(1));
    let dry = ok(cli(
        &config,
        &["replay", "--stale", "--type", "ADT", "--dry-run"],
    ));
    // The admission's later result for the same patient comes along, so the two are mapped
    // again in their original order; the other patient's result does not.
    assert!(
        dry.contains(&adt) && dry.contains(&oru) && !dry.contains(&oru2),
        "{dry}"
    );
    assert!(
        dry.contains(
            "1 message(s) match, with 1 later message(s) of the same senders and patients"
        ),
        "{dry}"
    );
    assert!(dry.contains("(committed 2); nothing queued"), "{dry}");
    let bad = cli(&config, &["replay", "--state", "done"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected one of"));

    // Another tenant's admin sees none of it and cannot replay it; a non-admin is refused.
    let token = |extra: &[&str]| {
        tributary_e2e::issued_token(cli(
            &config,
            &[
                &["token", "issue", "--client", "ops", "--scope", "user/*.rs"],
                extra,
            ]
            .concat(),
        ))
    };
    let other = token(&["--role", "admin", "--tenant", "other"]);
    let listed = ok(cli(&config, &["journal", "list", "--token", &other]));
    assert_eq!(listed, "", "another tenant's messages were listed");
    let refused = cli(&config, &["replay", "--token", &other, &adt]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not in the journal"),
        "{refused:?}"
    );
    let shown = cli(&config, &["journal", "show", &adt, "--token", &other]);
    assert_eq!(shown.status.code(), Some(1), "{shown:?}");
    let shown: serde_json::Value =
        serde_json::from_str(&ok(cli(&config, &["journal", "show", &adt]))).unwrap();
    assert_eq!(shown["meta"]["message_type"], "ADT", "{shown}");
    assert_eq!(shown["state"], "committed");
    let raw = cli(&config, &["journal", "show", &adt, "--payload"]);
    assert!(
        !raw.status.success(),
        "the admin API served message content"
    );
    let viewer = token(&["--role", "view"]);
    let refused = cli(&config, &["replay", "--token", &viewer, "--stale"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("403"),
        "{refused:?}"
    );

    let queued = ok(cli(&config, &["replay", "--stale", "--type", "ADT^A01"]));
    assert!(queued.contains("queued 2 message(s)"), "{queued}");
    let after = wait_rows(&config, &[], |r| {
        r.iter()
            .filter(|row| row.1 == "committed" && row.2 == "2")
            .count()
            == 2
    });
    let v2 = after.iter().find(|r| r.0 == adt).unwrap().3.clone();
    assert_ne!(v2, v1, "the replay mapped with the new version");
    // The audit chain, too, is verified by the running server, admin calls included.
    let verified = ok(cli(&config, &["audit", "verify"]));
    assert!(
        verified.contains("audit chain intact") && verified.contains("by the running server"),
        "{verified}"
    );
    // The field report, too, comes from the running server.
    let report: serde_json::Value =
        serde_json::from_str(&ok(cli(&config, &["mapping", "report", "--json"]))).unwrap();
    assert!(report["rows"].is_array(), "{report}");
    let stale = ok(cli(&config, &["journal", "list", "--stale"]));
    assert_eq!(rows(&stale).len(), 1);
    assert!(stale.contains(&oru2), "{stale}");
    server.stop();

    // Server stopped: the same command queues the rest for the next start.
    let offline = cli(&config, &["replay", "--stale"]);
    let stdout = ok(offline.clone());
    assert!(stdout.contains("queued 1 message(s)"), "{stdout}");
    assert!(String::from_utf8_lossy(&offline.stderr).contains("maps them when it starts"));
    let server = Server::start(&data, &log, &extra, &[]);
    wait_rows(&config, &["--stale"], |r| r.is_empty());
    server.stop();

    let records = journal_records(&data);
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r.state.state, MessageState::Committed);
        assert_eq!(r.state.attempts, 2);
        assert!(r.state.mapping_version.as_deref().unwrap().starts_with(&v2));
    }
    let store = FjallStore::new(Db::open(&data, DbOptions::default()).unwrap());
    let patients = store.list("default", "Patient", None, 10).unwrap();
    assert!(!patients.is_empty());
    for p in patients {
        assert_eq!(p.resource().unwrap()["gender"], "unknown");
    }
}

/// With `[http.tls]`, the commands need the server's https URL, and `--cacert` for a CA the
/// system does not trust; the admin API answers over the same TLS listener.
#[test]
fn the_commands_reach_a_server_that_listens_with_tls() {
    let tmp = tempfile::tempdir().unwrap();
    write_lab_certs(tmp.path());
    let data = tmp.path().join("data");
    let config = data.with_extension("toml");
    let extra = format!(
        "[http.tls]\ncert = {:?}\nkey = {:?}\n",
        tmp.path().join("server.crt").display().to_string(),
        tmp.path().join("server.key").display().to_string()
    );
    let server = Server::start(&data, &tmp.path().join("serve.log"), &extra, &[]);
    let plain = cli(&config, &["journal", "list"]);
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("listens with TLS"),
        "{plain:?}"
    );
    let url = format!("https://localhost:{}", server.http.port());
    let untrusted = cli(&config, &["journal", "list", "--server", &url]);
    assert!(!untrusted.status.success(), "a self-signed CA was trusted");
    let ca = tmp.path().join("ca.crt");
    let ca = ca.to_str().unwrap();
    let listed = ok(cli(
        &config,
        &["journal", "list", "--server", &url, "--cacert", ca],
    ));
    assert_eq!(listed, "");
    let dry = ok(cli(
        &config,
        &[
            "replay",
            "--state",
            "failed",
            "--dry-run",
            "--server",
            &url,
            "--cacert",
            ca,
        ],
    ));
    assert!(dry.contains("0 message(s) match"), "{dry}");
    server.stop();
}
