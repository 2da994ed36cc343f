//! Helpers for the event-streaming end-to-end tests: run the real `tributary` binary with a
//! config, kill it (-9) or stop it, and find the brokers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)]
pub use tributary_e2e::{free_addr, repo_root, tributary_bin};

#[path = "../../../adapters/amqp/tests/common/mod.rs"]
pub mod rabbit;

/// A running `tributary serve` with the event sections given in `extra`.
pub struct Server {
    pub child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &str) -> Server {
        Self::start_with_mllp(data_dir, extra, None)
    }

    /// With an MLLP listener at `mllp` (and the repository's mapping set).
    pub fn start_with_mllp(data_dir: &Path, extra: &str, mllp: Option<SocketAddr>) -> Server {
        let http = free_addr();
        let mllp_listen = mllp.map(|a| a.to_string()).unwrap_or_default();
        let mapping_dir = repo_root().join("mappings");
        let config = data_dir.with_extension("toml");
        let log = data_dir.with_extension("log");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\ndefault_tenant = \"t1\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n[http]\nlisten = \"{http}\"\n[mllp]\nlisten = \"{mllp_listen}\"\n[mapping]\ndir = {:?}\n{extra}",
                data_dir.display().to_string(),
                mapping_dir.display().to_string()
            ),
        )
        .unwrap();
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(tributary_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::from(logfile.try_clone().unwrap()))
            .stderr(Stdio::from(logfile))
            .spawn()
            .expect("start tributary");
        let mut s = Server { child, http, log };
        // the MLLP listener binds after the HTTP one: a sender right after a restart must not race it
        let listening: Vec<SocketAddr> = std::iter::once(http).chain(mllp).collect();
        tributary_e2e::wait_listening(&mut s.child, &s.log, &listening);
        s
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let st = tributary_e2e::terminate_child(&mut self.child, Duration::from_secs(60));
        assert!(st.success(), "tributary exited with {st}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config naming the data directory `data` (created here) and tenant `t1`, for the CLI to
/// issue tokens signed with that directory's key.
pub fn token_config(data: &Path) -> PathBuf {
    std::fs::create_dir_all(data).unwrap();
    let config = data.with_extension("token.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\ndefault_tenant = \"t1\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    config
}

/// `tributary token issue` for tenant `t1` (and `patient`, when given) with `config`.
pub fn issue_token(config: &Path, client: &str, scope: &str, patient: Option<&str>) -> String {
    let mut cmd = Command::new(tributary_bin());
    cmd.args([
        "token", "issue", "--client", client, "--scope", scope, "--tenant", "t1",
    ]);
    if let Some(p) = patient {
        cmd.args(["--patient", p]);
    }
    tributary_e2e::issued_token(cmd.arg("--config").arg(config).output().unwrap())
}

/// The type (`handshake`, `heartbeat`, `event-notification`, …) of a subscription notification
/// Bundle.
pub fn kind(b: &serde_json::Value) -> String {
    b["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "type"))
        .and_then(|p| p["valueCode"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// POSTs `body` to `{base}/{rtype}` with `token` as bearer token; asserts a 2xx answer.
pub async fn post_fhir(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    rtype: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    let res = http
        .post(format!("{base}/{rtype}"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        res.status().is_success(),
        "create {rtype}: {}",
        res.status()
    );
    res
}

/// GETs `url` with `token` as bearer token; asserts a 200 answer and returns its JSON body.
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    let res = http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    res.json().await.unwrap()
}

/// A Subscription to the observation topic over `channel` (`rest-hook` to `endpoint`, or
/// `websocket`) with a heartbeat every second and `content` payloads.
pub fn observation_subscription(
    channel: &str,
    endpoint: Option<&str>,
    content: &str,
) -> serde_json::Value {
    let mut sub = serde_json::json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "care management",
        "criteria": "http://tributary.dev/fhir/SubscriptionTopic/observation",
        "channel": {
            "extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period", "valueUnsignedInt": 1}],
            "type": channel,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": content}]}
        }
    });
    if let Some(e) = endpoint {
        sub["channel"]["endpoint"] = e.into();
    }
    sub
}
