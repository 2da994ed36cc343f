//! Backups through the real binary: `tributary backup` against a running server (which copies its
//! data directory into `backup.dir` while it serves) and against a stopped one (`--to DIR`).
//! Restoring is moving the copy into place: the server runs on it, serves what was committed
//! before the backup (not what came after), accepts tokens signed before it (the keys come
//! along), and its audit chain verifies.

mod facade_support;

use facade_support::{cli, data_dir, Facade};
use serde_json::json;

fn patient(id: &str) -> serde_json::Value {
    json!({"resourceType": "Patient", "id": id, "name": [{"family": "Quixote"}]})
}

/// The directory a `backup …: …` line names.
fn backup_path(printed: &str) -> std::path::PathBuf {
    let line = printed
        .lines()
        .find(|l| l.starts_with("backup "))
        .unwrap_or_else(|| panic!("{printed}"));
    line["backup ".len()..line.find(": ").unwrap()].into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_restores_to_a_server_that_serves_what_was_committed_before_it() {
    let backups = tempfile::tempdir().unwrap();
    let config = format!(
        "[backup]\ndir = {:?}\n",
        backups.path().display().to_string()
    );
    let mut f = Facade::start(Some(&config));
    let token = f.token("ops", "system/*.cruds", &[]);
    for i in 0..20 {
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Patient/b{i}"),
                Some(&token),
                Some(&patient(&format!("b{i}"))),
            )
            .await;
        assert!(r.status < 300, "{}", r.text);
    }
    // Only the admin role may ask for one.
    assert_eq!(
        f.call("POST", "/admin/backup", Some(&token), None)
            .await
            .status,
        403
    );
    // `--to` is for a stopped server: a running one writes under backup.dir.
    let refused = cli(
        &f,
        &["backup", "--server", &f.base, "--to", "/tmp/elsewhere"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("drop --to"));

    let printed = tributary_e2e::succeeded(cli(&f, &["backup", "--server", &f.base]));
    let online = backup_path(&printed);
    assert!(online.starts_with(backups.path()), "{printed}");
    let r = f
        .call(
            "PUT",
            "/fhir/Patient/after",
            Some(&token),
            Some(&patient("after")),
        )
        .await;
    assert!(r.status < 300);
    f.stop();

    // The copy's audit chain verifies on its own.
    tributary_e2e::succeeded(
        std::process::Command::new(tributary_e2e::tributary_bin())
            .args(["audit", "verify", "--data-dir"])
            .arg(&online)
            .env_remove("TRIBUTARY_CONFIG")
            .output()
            .unwrap(),
    );

    // A stopped server's data directory is backed up with --to.
    let offline = backups.path().join("offline");
    let printed = tributary_e2e::succeeded(cli(&f, &["backup", "--to", offline.to_str().unwrap()]));
    assert_eq!(backup_path(&printed), offline);

    // Restore: the online copy moved into place, then served.
    std::fs::rename(data_dir(&f.dir), f.dir.path().join("replaced")).unwrap();
    std::fs::rename(&online, data_dir(&f.dir)).unwrap();
    f.restart();
    for i in 0..20 {
        assert_eq!(
            f.get_status(&format!("/fhir/Patient/b{i}"), &token).await,
            200
        );
    }
    assert_eq!(f.get_status("/fhir/Patient/after", &token).await, 404);
    f.stop();
    // The offline copy has the write that came after the online one.
    std::fs::rename(data_dir(&f.dir), f.dir.path().join("restored-once")).unwrap();
    std::fs::rename(&offline, data_dir(&f.dir)).unwrap();
    f.restart();
    assert_eq!(f.get_status("/fhir/Patient/after", &token).await, 200);
}
