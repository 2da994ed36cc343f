//! The deployment files in `deploy/` start a working engine: the Kubernetes ConfigMap's
//! configuration file, the container image's environment and the systemd unit's settings are
//! each given to the real binary (with the container paths and ports moved into a temporary
//! directory), which must come up ready and acknowledge an HL7 message over MLLP.
//! The image itself is not built here (no container registry on the test machine).

mod mllp_common;

use mllp_common::{field, Client};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tributary_e2e::{free_port, http_get, issued_token, repo_root, workspace_bin, Server};

/// Where a setting from `deploy/` points inside a container or host, and where it points here.
struct Local {
    dir: tempfile::TempDir,
    http: String,
    mllp: String,
}

impl Local {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            http: format!("127.0.0.1:{}", free_port()),
            mllp: format!("127.0.0.1:{}", free_port()),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The same text with the deployment's paths and listen addresses replaced by local ones.
    fn localize(&self, text: &str) -> String {
        let mappings = repo_root().join("mappings");
        text.replace("/var/lib/tributary", self.data().to_str().unwrap())
            .replace("/usr/share/tributary/mappings", mappings.to_str().unwrap())
            .replace("/etc/tributary/mappings", mappings.to_str().unwrap())
            .replace("0.0.0.0:8080", &self.http)
            .replace("0.0.0.0:2575", &self.mllp)
    }

    fn serve(&self, args: &[&str], env: &[(String, String)]) -> Server {
        let child = Command::new(workspace_bin("tributary"))
            .arg("serve")
            .args(args)
            .current_dir(self.dir.path())
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            http: self.http.clone(),
        };
        server.wait_ready(Duration::from_secs(30));
        server
    }

    /// Ready, healthy, an ADT^A01 acknowledged AA over MLLP, the data where it was told to go.
    fn check_running(&self, mut server: Server) {
        let ready = http_get(&self.http, "/ready").unwrap();
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        let health = http_get(&self.http, "/health").unwrap();
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let mut c = Client::connect(&self.mllp);
        c.send(b"MSH|^~\\&|LAB|HOSP|TRIB|HIE|20261204101500||ADT^A01|DEPLOY-1|P|2.5.1\rEVN|A01|20261204101500\rPID|1||MRN-DEPLOY^^^HOSP^MR||Sample^Pat||19800101|F\rPV1|1|I|W1^1^1\r");
        let ack = c.recv(Duration::from_secs(10)).expect("an ACK");
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
        assert!(
            self.data().join("audit").is_dir(),
            "data not in the data dir"
        );
        let status = server.terminate(Duration::from_secs(30));
        assert!(status.success(), "exit status after SIGTERM: {status:?}");
    }
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap()
}

/// The `KEY=value` assignments of a Dockerfile's `ENV` instructions (continuation lines included).
fn dockerfile_env(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut continued = false;
    for line in text.lines() {
        let t = line.trim();
        let Some(body) = t.strip_prefix("ENV ").or(continued.then_some(t)) else {
            continue;
        };
        for word in body.trim_end_matches('\\').split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            }
        }
        continued = t.ends_with('\\');
    }
    out
}

#[test]
fn kubernetes_configmap_configuration_starts_a_working_engine() {
    let manifest = read("deploy/kubernetes/tributary.yaml");
    // The ConfigMap's `tributary.toml: |` block: its lines indented deeper than the key.
    let start =
        manifest.find("tributary.toml: |").expect("ConfigMap key") + "tributary.toml: |".len();
    let toml: String = manifest[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    assert!(toml.contains("[mapping]"), "{toml}");
    let local = Local::new();
    let config = local.dir.path().join("tributary.toml");
    std::fs::write(&config, local.localize(&toml)).unwrap();
    let server = local.serve(&["--config", config.to_str().unwrap()], &[]);
    local.check_running(server);
}

#[test]
fn container_image_environment_starts_a_working_engine_and_issues_tokens() {
    let env = dockerfile_env(&read("deploy/Dockerfile"));
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "TRIBUTARY_DATA_DIR",
            "TRIBUTARY_MAPPING__DIR",
            "TRIBUTARY_HTTP__LISTEN",
            "TRIBUTARY_MLLP__LISTEN",
            "TRIBUTARY_LOG__FORMAT"
        ]
    );
    let local = Local::new();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, local.localize(&v)))
        .collect();
    let server = local.serve(&[], &env);
    // `docker exec … tributary token issue` finds the key through the same environment.
    let out = Command::new(workspace_bin("tributary"))
        .args(["token", "issue", "--client", "demo", "--scope", "user/*.rs"])
        .current_dir(local.dir.path())
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert_eq!(issued_token(out).split('.').count(), 3);
    local.check_running(server);
}

#[test]
fn systemd_unit_verifies_and_its_settings_start_a_working_engine() {
    let unit = read("deploy/systemd/tributary.service");
    let env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "TRIBUTARY_DATA_DIR"),
        "{env:?}"
    );
    let local = Local::new();
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {
            // Verified against the binary built here instead of /usr/local/bin.
            let path = local.dir.path().join("tributary.service");
            let bin = workspace_bin("tributary");
            std::fs::write(
                &path,
                unit.replace("/usr/local/bin/tributary", bin.to_str().unwrap()),
            )
            .unwrap();
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "systemd-analyze verify: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        _ => eprintln!("systemd-analyze not installed: the unit file is not verified"),
    }
    // The unit's ExecStart reads /etc/tributary/tributary.toml: here, the shipped example.
    let config = local.dir.path().join("tributary.toml");
    let example = read("deploy/tributary.example.toml")
        .replace("127.0.0.1:8080", "0.0.0.0:8080")
        .replace("127.0.0.1:2575", "0.0.0.0:2575");
    std::fs::write(&config, local.localize(&example)).unwrap();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| (k, local.localize(&v)))
        .collect();
    let server = local.serve(&["--config", config.to_str().unwrap()], &env);
    local.check_running(server);
}

#[test]
fn kubernetes_manifest_is_valid_against_the_api_schemas() {
    let tool =
        repo_root().join("target/test-tools/kubernetes-validate-venv/bin/kubernetes-validate");
    if !tool.exists() {
        eprintln!(
            "kubernetes-validate not installed (scripts/install-test-tools): manifest not checked"
        );
        return;
    }
    let out = Command::new(tool)
        .args(["--strict", "-k", "1.31.0"])
        .arg(repo_root().join("deploy/kubernetes/tributary.yaml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for kind in [
        "configmap/tributary",
        "service/tributary",
        "statefulset/tributary",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{text}"
        );
    }
}
