//! Helpers for the MLLP end-to-end tests: run the real `tributary` binary, read its journal,
//! find the shared corpus, make certificates.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, JournalRecord, ListFilter};

#[allow(unused_imports)]
pub use tributary_e2e::{free_addr, repo_root, tributary_bin};

#[path = "../../../adapters/mllp/tests/common/pki.rs"]
mod pki;
pub use pki::Pki;

/// Sends one message over MLLP and asserts the listener accepted it: `MSA|AA` (original mode)
/// or `MSA|CA` (enhanced mode: the library's fixtures ask for it in MSH-15).
pub async fn send_accepted(addr: &str, bytes: &[u8]) {
    let mut s =
        tributary_mllp::sink::MllpSender::new(tributary_mllp::sink::MllpSenderConfig::new(addr));
    let ack = tokio::time::timeout(Duration::from_secs(30), s.send_once(bytes))
        .await
        .expect("ack in time")
        .expect("sent");
    let text = String::from_utf8_lossy(&ack);
    assert!(text.contains("MSA|AA") || text.contains("MSA|CA"), "{text}");
}

/// The shared HL7 v2 corpus (`../shared/corpus/hl7v2` beside the repository), if present.
pub fn corpus_dir() -> Option<PathBuf> {
    tributary_e2e::corpus_dir("hl7v2")
}

/// Every `.hl7` file under the corpus, sorted.
pub fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    tributary_e2e::files_with_extension(dir, "hl7")
}

/// A running `tributary serve`.
pub struct Server {
    pub child: Child,
    pub mllp: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Server {
    /// Starts the binary with `data_dir`, a default MLLP listener and `extra` TOML appended
    /// (e.g. more `[[mllp.listeners]]`). Logs (JSON, debug level) go to `log`.
    pub fn start(data_dir: &Path, log: &Path, extra: &str, wait_for: &[SocketAddr]) -> Server {
        let mllp = free_addr();
        let http = free_addr();
        let config = data_dir.with_extension("toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[log]\nformat = \"json\"\nlevel = \"debug\"\n[http]\nlisten = \"{http}\"\n[mllp]\nlisten = \"{mllp}\"\n{extra}",
                data_dir.display().to_string()
            ),
        )
        .unwrap();
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(tributary_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("TRIBUTARY_LOG")
            .stdout(Stdio::from(logfile.try_clone().unwrap()))
            .stderr(Stdio::from(logfile))
            .spawn()
            .expect("start tributary");
        let mut s = Server {
            child,
            mllp,
            http,
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
        };
        let mut addrs = vec![mllp];
        addrs.extend_from_slice(wait_for);
        tributary_e2e::wait_listening(&mut s.child, &s.log, &addrs);
        s
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let st = tributary_e2e::terminate_child(&mut self.child, Duration::from_secs(60));
        assert!(st.success(), "tributary exited with {st}");
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every journaled message, read straight from the data directory (server stopped).
pub fn journal_records(data_dir: &Path) -> Vec<JournalRecord> {
    let db = Db::open(data_dir, DbOptions::default()).expect("open data dir");
    let j = FjallJournal::new(db, 0);
    j.list(&ListFilter::default())
        .unwrap()
        .into_iter()
        .map(|(id, _, _)| j.get(id).unwrap().unwrap())
        .collect()
}

/// A CA with a `localhost` server certificate and a client certificate for
/// `lab.partner.example`, written to `dir` as `ca.crt`, `server.{crt,key}` and `lab.{crt,key}`.
pub fn write_lab_certs(dir: &Path) {
    let pki = Pki::new("Tributary Test CA");
    pki.write_ca(&dir.join("ca.crt"));
    pki.write(dir, "server", "localhost", &["localhost"], false);
    pki.write(
        dir,
        "lab",
        "lab.partner.example",
        &["lab.partner.example"],
        true,
    );
}

/// An `[[mllp.listeners]]` entry: mTLS on `addr` with the certificates [`write_lab_certs`] wrote to
/// `dir`, admitting only the `general-lab` partner (`lab.partner.example`).
pub fn mtls_listener(addr: SocketAddr, dir: &Path) -> String {
    format!(
        r#"
[[mllp.listeners]]
name = "mllp-tls"
listen = "{addr}"
allow_unknown_partners = false
[mllp.listeners.tls]
cert = "{d}/server.crt"
key = "{d}/server.key"
client_ca = "{d}/ca.crt"
require_client_cert = true
[[mllp.listeners.partners]]
id = "general-lab"
cert_names = ["lab.partner.example"]
"#,
        d = dir.display()
    )
}

/// A plain blocking MLLP client written here (no shared code with the server's codec).
pub struct Client {
    pub s: std::net::TcpStream,
    pub buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: &str) -> Client {
        let s = std::net::TcpStream::connect(addr).unwrap();
        Client { s, buf: Vec::new() }
    }

    pub fn send(&mut self, msg: &[u8]) {
        let mut f = vec![0x0b];
        f.extend_from_slice(msg);
        f.extend_from_slice(&[0x1c, 0x0d]);
        std::io::Write::write_all(&mut self.s, &f).unwrap();
    }

    /// The next frame, or None when none arrives within `wait`.
    pub fn recv(&mut self, wait: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
                let start = self.buf.iter().position(|b| *b == 0x0b).unwrap_or(0);
                let frame = String::from_utf8_lossy(&self.buf[start + 1..end]).into_owned();
                self.buf.drain(..end + 2);
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match std::io::Read::read(&mut self.s, &mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

pub fn field(msg: &str, seg: &str, n: usize) -> String {
    msg.split('\r')
        .find(|s| s.starts_with(seg))
        .and_then(|s| s.split('|').nth(n))
        .unwrap_or_default()
        .to_string()
}

pub fn segment(msg: &str, seg: &str) -> Option<String> {
    msg.split('\r')
        .find(|s| s.starts_with(seg))
        .map(str::to_string)
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the shipped mapping set in `dir/mappings` where a malformed value (a bad date)
/// fails the message instead of being left out with a warning; returns the `[mapping] dir`.
pub fn mappings_failing_on_invalid_values(dir: &Path) -> PathBuf {
    let maps = dir.join("mappings");
    copy_dir(&repo_root().join("mappings"), &maps);
    let set = maps.join("hl7v2/mapping-set.yaml");
    let text = std::fs::read_to_string(&set).unwrap();
    assert!(text.contains("on_invalid_value: warn"));
    std::fs::write(
        &set,
        text.replace("on_invalid_value: warn", "on_invalid_value: fail"),
    )
    .unwrap();
    maps
}
