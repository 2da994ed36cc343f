//! Helpers for the MLLP end-to-end tests: run the real `tributary` binary, read its journal,
//! find the shared corpus, make certificates.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, JournalRecord, ListFilter};

#[allow(unused_imports)]
pub use tributary_e2e::{free_addr, repo_root, tributary_bin};

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
        s.wait_listening(&addrs);
        s
    }

    fn wait_listening(&mut self, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for a in addrs {
            while std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err() {
                if let Ok(Some(st)) = self.child.try_wait() {
                    panic!(
                        "tributary exited early ({st}); log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                assert!(Instant::now() < deadline, "{a} not listening within 60 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert!(st.success(), "tributary exited with {st}");
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tributary did not stop within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A CA with helpers to issue server and client certificates (PEM files).
pub struct Pki {
    pub ca: rcgen::Certificate,
    pub ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub fn issue(&self, dir: &Path, name: &str, cn: &str, sans: &[&str], client: bool) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.ca.pem()).unwrap();
    }
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
