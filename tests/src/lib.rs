//! Helpers shared by the end-to-end tests and their helper binaries.

pub mod crash {
    use sha2::{Digest, Sha256};

    /// The 1 KiB payload a crash-test key always maps to, so the verifier can check it byte for
    /// byte without having seen it.
    pub fn payload_for(key: &str) -> Vec<u8> {
        let seed = Sha256::digest(key.as_bytes());
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(key.as_bytes());
        out.push(b'|');
        while out.len() < 1024 {
            out.extend_from_slice(&seed);
        }
        out.truncate(1024);
        out
    }
}

use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of a workspace binary whose package has the same name (e.g. `tributary`), for tests
/// that run it as a real process.
///
/// Integration tests only get `CARGO_BIN_EXE_*` for their own package, so this looks next to the
/// test executable (`target/<profile>/`) and, when the binary is missing or older than nothing at
/// all, builds it once with the same cargo and profile.
///
/// `E2E_BIN_DIR`, when set, names a directory holding already-built binaries to use instead
/// (nothing is built): for runs that share a target directory with other builds, which could
/// replace `target/<profile>/<name>` in the middle of a test.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("E2E_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        assert!(path.exists(), "E2E_BIN_DIR has no {}", path.display());
        return path;
    }
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    BUILT.get_or_init(|| {
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", name, "--bin", name])
            .current_dir(repo_root());
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the e2e binary");
        assert!(status.success(), "cargo build --bin {name} failed");
    });
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `tributary` binary of this workspace, built once per test process.
pub fn tributary_bin() -> PathBuf {
    workspace_bin("tributary")
}

/// Path of the shared corpus folder (`../shared/corpus/<sub>` beside the repository), if present.
pub fn corpus_dir(sub: &str) -> Option<PathBuf> {
    let dir = repo_root().join("../shared/corpus").join(sub);
    dir.is_dir().then_some(dir)
}

/// Every file with extension `ext` under `dir`, recursively, sorted.
pub fn files_with_extension(dir: &std::path::Path, ext: &str) -> Vec<PathBuf> {
    fn walk(d: &std::path::Path, ext: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, ext, out);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, ext, &mut out);
    out.sort();
    out
}

pub use tributary_runtime::test_ports::{
    free_loopback_addr as free_addr, free_loopback_port as free_port,
};
pub use tributary_runtime::test_wait::wait;

/// A running `tributary serve` child process, killed on drop.
pub struct Server {
    pub child: std::process::Child,
    pub http: String,
}

impl Server {
    /// Starts `serve` (a `tributary serve` command whose HTTP listener is at `http`).
    pub fn spawn(serve: &mut std::process::Command, http: &str) -> Server {
        Server {
            child: serve.spawn().expect("start tributary serve"),
            http: http.to_string(),
        }
    }

    /// Polls `GET /ready` until it answers 200 (or panics after `timeout`).
    pub fn wait_ready(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(body) = http_get(&self.http, "/ready") {
                if body.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server at {} never became ready",
                self.http
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the exit status.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        terminate_child(&mut self.child, timeout)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends SIGTERM to `child` and waits up to `timeout` for its exit status; kills it and panics
/// when it does not stop in time.
pub fn terminate_child(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> std::process::ExitStatus {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("server did not stop within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits (at most 60 s) until every one of `addrs` accepts TCP connections; panics with the log
/// at `log` when `child` exits first.
pub fn wait_listening(
    child: &mut std::process::Child,
    log: &std::path::Path,
    addrs: &[std::net::SocketAddr],
) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in addrs {
        while std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "tributary exited early ({st}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{a} not listening within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The stdout of a CLI run that must have succeeded; panics with its exit status, stdout and
/// stderr otherwise.
pub fn succeeded(out: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {}: {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The token a `tributary token issue` run printed (its last line); panics with the CLI's
/// stderr when the run failed.
pub fn issued_token(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "token issue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

/// A minimal blocking HTTP/1.1 GET over a real socket: returns the whole response as text.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of one series of the `/metrics` answer at `http` — `series` is the name with its
/// labels exactly as rendered, e.g. `tributary_outbox_lag_events{relay="amqp"}` — or `None`
/// when the server does not answer or has no such series.
pub fn metric(http: &str, series: &str) -> Option<f64> {
    series_value(&http_get(http, "/metrics").ok()?, series)
}

fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Journaled messages the mapping pipeline at `http` is done with (committed, failed or
/// skipped), from one `/metrics` answer; 0 when the server does not answer.
pub fn pipeline_finished(http: &str) -> f64 {
    let text = http_get(http, "/metrics").unwrap_or_default();
    ["committed", "failed", "skipped"]
        .iter()
        .filter_map(|o| {
            series_value(
                &text,
                &format!("tributary_pipeline_messages_total{{outcome=\"{o}\"}}"),
            )
        })
        .sum()
}

/// How often `needle` occurs in the log file at `log` (0 while it does not exist).
pub fn log_count(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}
