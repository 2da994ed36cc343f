//! The deployment files in `deploy/` start a working engine: the Kubernetes ConfigMap's
//! configuration file, the container image's environment and the systemd unit's settings are
//! each given to the real binary (with the container paths and ports moved into a temporary
//! directory), which must come up ready and acknowledge an HL7 message over MLLP.
//! The compose file's engine settings, with its brokers replaced by a Tansu broker and the
//! RabbitMQ on this machine, must stream an acknowledged message's events to both.
//! The image itself is not built here (no container registry on the test machine), and neither
//! Kafka's nor RabbitMQ's image is run: the compose file is checked against the Compose
//! specification's schema and for settings that must agree between its services.

mod mllp_common;
#[allow(dead_code)] // shared with the AMQP tests, which use the rest
#[path = "../../adapters/amqp/tests/common/mod.rs"]
mod rabbit;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use mllp_common::{field, Client};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use tributary_e2e::{free_port, http_get, issued_token, repo_root, workspace_bin, Server};
use tributary_kafka::testing::{headers_of, tansu_or_skip, Tansu};
use yaml_rust2::{Yaml, YamlLoader};

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
        let server = Server::spawn(
            Command::new(workspace_bin("tributary"))
                .arg("serve")
                .args(args)
                .current_dir(self.dir.path())
                .envs(env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.path().join("serve.log")).unwrap()),
            &self.http,
        );
        server.wait_ready(Duration::from_secs(30));
        server
    }

    /// An ADT^A01 over MLLP, which must be acknowledged AA.
    fn admit(&self) {
        let mut c = Client::connect(&self.mllp);
        c.send(b"MSH|^~\\&|LAB|HOSP|TRIB|HIE|20261204101500||ADT^A01|DEPLOY-1|P|2.5.1\rEVN|A01|20261204101500\rPID|1||MRN-DEPLOY^^^HOSP^MR||Sample^Pat||19800101|F\rPV1|1|I|W1^1^1\r");
        let ack = c.recv(Duration::from_secs(10)).expect("an ACK");
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    }

    /// Ready, healthy, an ADT^A01 acknowledged AA over MLLP, the data where it was told to go.
    fn check_running(&self, mut server: Server) {
        let ready = http_get(&self.http, "/ready").unwrap();
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        let health = http_get(&self.http, "/health").unwrap();
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        self.admit();
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
/// The image's environment as a local run sees it: its configuration file (container paths
/// and ports moved under `local`) named by `TRIBUTARY_CONFIG`.
fn image_env(local: &Local) -> Vec<(String, String)> {
    let config = local.dir.path().join("container.toml");
    std::fs::write(&config, local.localize(&read("deploy/container.toml"))).unwrap();
    vec![(
        "TRIBUTARY_CONFIG".to_string(),
        config.to_str().unwrap().to_string(),
    )]
}

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
    let dockerfile = read("deploy/Dockerfile");
    let env = dockerfile_env(&dockerfile);
    // Settings in the image's file, only its name in ENV: a mounted file replaces them whole.
    assert_eq!(
        env,
        [(
            "TRIBUTARY_CONFIG".to_string(),
            "/etc/tributary/tributary.toml".to_string()
        )]
    );
    assert!(dockerfile.contains("COPY deploy/container.toml /etc/tributary/tributary.toml"));
    let local = Local::new();
    let env = image_env(&local);
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
        assert!(
            std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
            "kubernetes-validate is missing but TEST_REQUIRE_TOOLS is set"
        );
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

fn compose() -> Yaml {
    YamlLoader::load_from_str(&read("deploy/compose.yaml"))
        .unwrap()
        .remove(0)
}

/// A service's `environment` mapping as (name, value) pairs, in file order.
fn compose_env(doc: &Yaml, service: &str) -> Vec<(String, String)> {
    let env = &doc["services"][service]["environment"];
    let map = env
        .as_hash()
        .unwrap_or_else(|| panic!("services.{service}.environment is a mapping: {env:?}"));
    map.iter()
        .map(|(k, v)| {
            let v = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                other => panic!("{service}: {k:?} is not a string: {other:?}"),
            };
            (k.as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} not set: {env:?}"))
}

#[test]
fn compose_file_is_valid_and_its_services_agree() {
    // Settings that must agree between services for the engine to reach its brokers.
    let doc = compose();
    let engine = compose_env(&doc, "tributary");
    let kafka = compose_env(&doc, "kafka");
    let rabbit = compose_env(&doc, "rabbitmq");
    let brokers = value(&engine, "TRIBUTARY_KAFKA__BROKERS");
    assert!(
        value(&kafka, "KAFKA_ADVERTISED_LISTENERS")
            .split(',')
            .any(|l| l.split_once("://").map(|(_, a)| a) == Some(brokers)),
        "the engine's brokers {brokers} are not an advertised Kafka listener"
    );
    let url = value(&engine, "TRIBUTARY_AMQP__URL");
    let user = value(&rabbit, "RABBITMQ_DEFAULT_USER");
    let pass = value(&rabbit, "RABBITMQ_DEFAULT_PASS");
    assert!(
        url.starts_with(&format!("amqp://{user}:{pass}@rabbitmq:5672/")),
        "the engine's AMQP URL {url} does not use RabbitMQ's user {user}"
    );
    for volume in ["tributary-data", "kafka-data", "rabbitmq-data"] {
        assert!(!doc["volumes"][volume].is_badvalue(), "volume {volume}");
    }

    // The Compose specification's JSON schema (as docker-compose 1.29.2 ships it), installed by
    // scripts/install-test-tools; a copy with a misspelt key must fail, so the check can fail.
    let venv = repo_root().join("target/test-tools/kubernetes-validate-venv");
    let python = venv.join("bin/python");
    let schema = std::fs::read_dir(venv.join("lib"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| {
            e.path()
                .join("site-packages/compose/config/compose_spec.json")
        })
        .filter(|p| p.exists());
    let Some(schema) = schema else {
        assert!(
            std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
            "a test tool is missing but TEST_REQUIRE_TOOLS is set"
        );
        eprintln!("compose specification schema not installed (scripts/install-test-tools): compose file not checked against it");
        return;
    };
    const CHECK: &str = "import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(sys.stdin)
errors = list(jsonschema.Draft201909Validator(schema).iter_errors(doc))
for e in errors:
    print('/'.join(map(str, e.path)) + ': ' + e.message)
print(len(errors), 'errors')
";
    let check = |text: &str| {
        let mut child = Command::new(&python)
            .args(["-c", CHECK])
            .arg(&schema)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let text = read("deploy/compose.yaml");
    assert_eq!(check(&text), "0 errors\n");
    let misspelt = text.replace("stop_grace_period:", "stop_grace_periode:");
    let report = check(&misspelt);
    assert!(
        report.contains("services/tributary: 'stop_grace_periode' does not match"),
        "{report}"
    );
}

/// The compose file's settings for the engine (over the image's), with `kafka:9092` pointing at
/// a Tansu broker and the RabbitMQ URL at the one on this machine: an ADT^A01 acknowledged over
/// MLLP comes out as the same event on the Kafka topic and on the RabbitMQ exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_settings_start_an_engine_that_streams_to_kafka_and_rabbitmq() {
    const TEST: &str = "compose_settings_start_an_engine_that_streams_to_kafka_and_rabbitmq";
    if !tansu_or_skip(TEST) {
        return;
    }
    let Some(conn) = rabbit::rabbit_or_skip(TEST).await else {
        return;
    };
    let doc = compose();
    let compose_env = compose_env(&doc, "tributary");
    let broker = Tansu::start().unwrap();
    // amqp://user:pass@host:port of this machine's RabbitMQ, the vhost from the compose file
    let local_amqp = rabbit::amqp_url();
    let local_authority = local_amqp
        .rsplit_once('/')
        .map(|(a, _)| a.to_string())
        .unwrap();
    let local = Local::new();
    let mut env: Vec<(String, String)> = image_env(&local)
        .into_iter()
        .filter(|(k, _)| !compose_env.iter().any(|(c, _)| c == k))
        .chain(compose_env.iter().cloned())
        .map(|(k, v)| {
            let v = local
                .localize(&v)
                .replace("kafka:9092", &broker.bootstrap());
            let v = match v.split_once("@rabbitmq:5672") {
                Some((_, vhost)) => format!("{local_authority}{vhost}"),
                None => v,
            };
            (k, v)
        })
        .collect();
    env.push(("TRIBUTARY_LOG".into(), "warn".into()));
    let exchange = value(&compose_env, "TRIBUTARY_AMQP__SINK__EXCHANGE");

    // A subscriber queue on the exchange, bound before anything is published.
    let ch = conn.create_channel().await.unwrap();
    let queue = rabbit::bound_queue(&ch, exchange, "*.hl7v2.adt.A01").await;
    let consumer: StreamConsumer = broker.consumer_config("e2e-compose").create().unwrap();
    consumer.subscribe(&["^hl7v2\\..*"]).unwrap();

    let mut server = local.serve(&[], &env);
    local.admit();

    // The message event on Kafka …
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let event_id = loop {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .expect("the A01 event on Kafka within 60 s");
        // the topic appears with the first event; until then the consumer reports it unknown
        let Ok(m) = m else { continue };
        let headers = headers_of(&m);
        let header = |name: &str| headers.get(name).cloned();
        if header("ce_type").as_deref() == Some("hl7v2.adt.A01") {
            assert_eq!(m.topic(), "hl7v2.adt.A01");
            break header("ce_id").expect("ce_id");
        }
    };
    // … and the same event, by id, on RabbitMQ.
    let mut deliveries = ch
        .basic_consume(
            queue.as_str().into(),
            "compose-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    loop {
        let d = tokio::time::timeout_at(deadline, deliveries.next())
            .await
            .expect("the A01 event on RabbitMQ within 60 s")
            .unwrap()
            .unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        let id = d.properties.message_id().as_ref().map(|s| s.to_string());
        if id.as_deref() == Some(event_id.as_str()) {
            break;
        }
    }
    let ready = http_get(&local.http, "/ready").unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}
