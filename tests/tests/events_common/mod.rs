//! Helpers for the event-streaming end-to-end tests: run the real `tributary` binary with a
//! config, kill it (-9) or stop it, and find the brokers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use tributary_e2e::{free_addr, repo_root, tributary_bin};

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
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect_timeout(&http, Duration::from_millis(200)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "tributary exited early ({st}); log:\n{}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "http not listening within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
