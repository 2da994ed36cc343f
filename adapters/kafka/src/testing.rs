//! Test support: a real Kafka-protocol broker (Tansu) run as a child process on a free loopback
//! port, which a test can stop, freeze and restart to simulate outages. Used by this crate's
//! tests and by the end-to-end tests; not used by the product.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `tansu` on `PATH`, else `~/.cargo/bin/tansu`; `None` when neither exists (tests then skip).
pub fn find_tansu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cargo/bin/tansu");
    p.is_file().then_some(p)
}

/// Whether `tansu` is installed; when it is not, says why `test` skips. CI installs every test
/// tool and sets `TEST_REQUIRE_TOOLS=1`: there, a missing broker fails the test instead.
pub fn tansu_or_skip(test: &str) -> bool {
    if find_tansu().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
        "a test tool is missing but TEST_REQUIRE_TOOLS is set"
    );
    eprintln!(
        "SKIP {test}: `tansu` not found on PATH or in ~/.cargo/bin \
         (cargo install tansu --version 0.6.0 --locked --features dynostore)"
    );
    false
}

pub use tributary_runtime::test_ports::free_loopback_port as free_port;

/// One Tansu broker with in-memory storage. Its data does not survive [`Tansu::stop`].
pub struct Tansu {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> std::io::Result<Self> {
        Self::start_on(free_port())
    }

    /// Starts a broker on a given port (e.g. one a relay was already configured with).
    pub fn start_on(port: u16) -> std::io::Result<Self> {
        let bin = find_tansu().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "tansu not installed")
        })?;
        let mut t = Self {
            bin,
            port,
            child: None,
        };
        t.spawn()?;
        Ok(t)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A consumer group's settings for this broker: reads each topic from its start and learns of
    /// topics the relay creates within a second (tests subscribe by pattern before they exist).
    pub fn consumer_config(&self, group: &str) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "1000");
        c
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "tansu did not start listening within 30 s",
        ))
    }

    /// Kills the broker (its in-memory data is gone).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fresh broker on the same port.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered — a hung
    /// broker or a network partition, with its data kept.
    pub fn freeze(&self) -> std::io::Result<()> {
        self.signal("-STOP")
    }

    /// Undoes [`Tansu::freeze`].
    pub fn thaw(&self) -> std::io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> std::io::Result<()> {
        let Some(c) = &self.child else {
            return Ok(());
        };
        let status = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other("kill failed"))
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.thaw();
        self.stop();
    }
}

/// A consumed record's headers as text (what the CloudEvents `ce_*` headers carry).
pub fn headers_of(m: &impl rdkafka::Message) -> std::collections::HashMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = std::collections::HashMap::new();
    if let Some(h) = m.headers() {
        for h in h.iter() {
            let v = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
            out.insert(h.key.to_string(), v);
        }
    }
    out
}
