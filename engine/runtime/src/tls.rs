//! TLS with rustls for every listener (MLLP, HTTP) and outbound client: TLS 1.2+ only, optional
//! client certificates verified against a CA bundle, partner names read from the client
//! certificate, and reload of the certificate, key and CA files without a restart.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// TLS settings of a listener (rustls; TLS 1.2 and 1.3 only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM certificate chain of the listener.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of CAs that issue client certificates. Needed for mTLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a valid client certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the certificate, key and CA files are checked for changes and reloaded
    /// (no restart needed). 0 disables reloading.
    #[serde(default = "default_reload")]
    pub reload_interval_secs: u64,
}

fn default_reload() -> u64 {
    30
}

impl ListenerTlsConfig {
    /// The key (under the TLS section) that is set wrong and what it needs, checked without
    /// reading the files.
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        (self.require_client_cert && self.client_ca.is_none()).then_some((
            "client_ca",
            "a CA bundle path is required when require_client_cert = true",
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} holds no usable PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA bundle rejected: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: path.into(),
        });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Empty {
        what: "key",
        path: path.into(),
    })
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    }
    Ok(roots)
}

/// Builds the rustls server configuration from the files named in `cfg`.
pub fn server_config(cfg: &ListenerTlsConfig) -> Result<ServerConfig, TlsError> {
    let certs = load_certs(&cfg.cert)?;
    let key = load_key(&cfg.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider());
            let v = if cfg.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build().map_err(|e| TlsError::Verifier(e.to_string()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(certs, key)?)
}

/// A TLS acceptor whose configuration is swapped when the files change.
#[derive(Clone)]
pub struct ReloadingAcceptor {
    current: Arc<RwLock<TlsAcceptor>>,
    cfg: ListenerTlsConfig,
    stamps: Arc<RwLock<Vec<Option<SystemTime>>>>,
}

impl ReloadingAcceptor {
    pub fn new(cfg: ListenerTlsConfig) -> Result<Self, TlsError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&cfg)?));
        let stamps = file_stamps(&cfg);
        Ok(Self {
            current: Arc::new(RwLock::new(acceptor)),
            cfg,
            stamps: Arc::new(RwLock::new(stamps)),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Reloads when a file's modification time changed. Returns Ok(true) when reloaded. A bad
    /// new file keeps the previous configuration in service (and returns the error).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = file_stamps(&self.cfg);
        let changed = self.stamps.read().map(|s| *s != now).unwrap_or(true);
        if !changed {
            return Ok(false);
        }
        if let Ok(mut s) = self.stamps.write() {
            *s = now;
        }
        self.reload()?;
        Ok(true)
    }

    /// Rebuilds the configuration from the files now.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&self.cfg)?));
        if let Ok(mut cur) = self.current.write() {
            *cur = acceptor;
        }
        Ok(())
    }

    pub fn reload_interval(&self) -> Option<Duration> {
        (self.cfg.reload_interval_secs > 0)
            .then(|| Duration::from_secs(self.cfg.reload_interval_secs))
    }

    /// Checks the files every `reload_interval_secs` until `shutdown` and swaps in a changed
    /// certificate; a bad new file is logged and the previous certificate stays in service.
    pub async fn keep_reloaded(self, listener: String, shutdown: CancellationToken) {
        let Some(every) = self.reload_interval() else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(listener, "TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(listener, error = %e, "TLS reload failed; keeping the previous certificate")
                }
            }
        }
    }
}

fn file_stamps(cfg: &ListenerTlsConfig) -> Vec<Option<SystemTime>> {
    [Some(&cfg.cert), Some(&cfg.key), cfg.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Subject CN plus DNS, email and URI SANs of a certificate (the partner's identity).
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    names.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    names
}

/// A client configuration for the outbound sink and the load generator.
pub fn client_config(
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = match ca {
        Some(p) => load_roots(p)?,
        None => RootCertStore::empty(),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    Ok(match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}
