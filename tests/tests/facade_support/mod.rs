//! Shared by the `facade_*` end-to-end tests: start the real binary on a temp data directory and
//! a free port, issue tokens with `tributary token issue`, call it over HTTP.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tributary_e2e::{free_port, workspace_bin, Server};

pub struct Facade {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub config: Option<PathBuf>,
}

pub fn data_dir(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("data")
}

fn common_args(data: &Path, config: Option<&Path>) -> Vec<String> {
    let mut a = vec!["--data-dir".to_string(), data.display().to_string()];
    if let Some(c) = config {
        a.push("--config".into());
        a.push(c.display().to_string());
    }
    a
}

/// Runs the CLI with the facade's `--data-dir`/`--config`.
pub fn cli(f: &Facade, args: &[&str]) -> Output {
    let mut cmd = Command::new(workspace_bin("tributary"));
    cmd.args(args)
        .args(common_args(&data_dir(&f.dir), f.config.as_deref()))
        .env_remove("TRIBUTARY_CONFIG");
    cmd.output().expect("running tributary")
}

impl Facade {
    /// Starts `tributary serve` with `config` (TOML) on a fresh data directory.
    pub fn start(config: Option<&str>) -> Facade {
        let dir = tempfile::tempdir().unwrap();
        let config = config.map(|text| {
            let p = dir.path().join("tributary.toml");
            std::fs::write(&p, text).unwrap();
            p
        });
        let mut f = Facade {
            server: None,
            dir,
            base: String::new(),
            config,
        };
        f.restart();
        f
    }

    /// (Re)starts the server on the same data directory and a new port.
    pub fn restart(&mut self) {
        self.stop();
        let http = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(self.dir.path().join("serve.log")).unwrap();
        let child = Command::new(workspace_bin("tributary"))
            .arg("serve")
            .args(common_args(&data_dir(&self.dir), self.config.as_deref()))
            .args(["--http-listen", &http, "--mllp-listen", ""])
            .env_remove("TRIBUTARY_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Server {
            child,
            http: http.clone(),
        };
        // Fail with the server's own words if it exits during start-up (bad config, port taken).
        for _ in 0..300 {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!(
                    "server exited ({status}) during start-up; its log:\n{}",
                    self.log()
                );
            }
            if tributary_e2e::http_get(&http, "/ready").is_ok_and(|b| b.starts_with("HTTP/1.1 200"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        server.wait_ready(Duration::from_secs(1));
        self.base = format!("http://{http}");
        self.server = Some(server);
    }

    /// Stops the server gracefully (the data directory is then free for the CLI).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let status = s.terminate(Duration::from_secs(30));
            assert!(status.success(), "server exit: {status:?}");
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// `tributary token issue --client C --scope S [extra…]`; the token is the last line.
    pub fn token(&self, client: &str, scope: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "issue", "--client", client, "--scope", scope];
        args.extend_from_slice(extra);
        tributary_e2e::issued_token(cli(self, &args))
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        self.call_h(method, path, token, body, &[]).await
    }

    /// The status of a `GET` with a bearer token.
    pub async fn get_status(&self, path: &str, token: &str) -> u16 {
        self.call("GET", path, Some(token), None).await.status
    }

    pub async fn call_h(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let client = reqwest::Client::new();
        let mut rb = client.request(method.parse().unwrap(), format!("{}{}", self.base, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/fhir+json")
                .body(b.to_string());
        }
        Resp::read(rb.send().await.expect("request")).await
    }
}

impl Drop for Facade {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Resp {
    /// Status, headers and body of `res`; `json` is Null when the body is not JSON.
    pub async fn read(res: reqwest::Response) -> Resp {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            json,
        }
    }

    /// The `next` link's path on the facade, from `prefix` on (`None` on the last page); a
    /// `next` link without `prefix` fails the test.
    #[allow(dead_code)] // not every including test pages
    pub fn next_from(&self, prefix: &str) -> Option<String> {
        let next = self.json["link"]
            .as_array()?
            .iter()
            .find(|l| l["relation"] == "next")?["url"]
            .as_str()
            .unwrap();
        let at = next.find(prefix).unwrap_or_else(|| panic!("{next}"));
        Some(next[at..].to_string())
    }

    pub fn ids(&self) -> Vec<String> {
        self.json["entry"]
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
}

/// Names, identifiers and dates that the seeded resources carry: none may appear in audit output.
pub const PHI: [&str; 6] = [
    "Zebulon",
    "Quixote",
    "MRN-77",
    "1961-07-04",
    "Marchbanks",
    "MRN-88",
];

/// Two patients with an Observation each, written by a `system/*.cruds` token; returns it.
pub async fn seed(f: &Facade, tenant: Option<&str>) -> String {
    let mut extra = vec![];
    if let Some(t) = tenant {
        extra.extend(["--tenant", t]);
    }
    let admin = f.token("seeder", "system/*.cruds", &extra);
    let p = |id: &str, family: &str, mrn: &str| serde_json::json!({"resourceType": "Patient", "id": id, "name": [{"family": family, "given": ["Zebulon"]}], "birthDate": "1961-07-04", "identifier": [{"system": "urn:mrn", "value": mrn}]});
    for (id, fam, mrn) in [("pa", "Quixote", "MRN-77"), ("pb", "Marchbanks", "MRN-88")] {
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Patient/{id}"),
                Some(&admin),
                Some(&p(id, fam, mrn)),
            )
            .await;
        assert!(
            r.status == 200 || r.status == 201,
            "{} {}",
            r.status,
            r.text
        );
    }
    for (id, pid) in [("oa", "pa"), ("ob", "pb")] {
        let o = serde_json::json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]}, "subject": {"reference": format!("Patient/{pid}")}, "effectiveDateTime": "2026-01-02T03:04:05Z"});
        let r = f
            .call(
                "PUT",
                &format!("/fhir/Observation/{id}"),
                Some(&admin),
                Some(&o),
            )
            .await;
        assert!(
            r.status == 200 || r.status == 201,
            "{} {}",
            r.status,
            r.text
        );
    }
    admin
}

/// The audit log as exported by `tributary audit export`.
pub fn export_audit(f: &Facade, since: Option<&str>) -> Vec<Value> {
    let mut args = vec!["audit", "export"];
    if let Some(s) = since {
        args.extend(["--since", s]);
    }
    let out = cli(f, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
