//! TLS and mTLS on the listener: partner by certificate, refusal without one, reload of the
//! certificate files without a restart.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tributary_mllp::ack::{read_msa, AckCode};
use tributary_mllp::sink::MllpSender;
use tributary_mllp::{MllpListenerConfig, MllpTlsConfig, PartnerConfig};

fn tls_sender(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    ca: &str,
    client: Option<&str>,
) -> MllpSender {
    let ca = dir.join(ca);
    let (c, k) = client.map_or((None, None), |n| {
        (
            Some(dir.join(format!("{n}.crt"))),
            Some(dir.join(format!("{n}.key"))),
        )
    });
    let cfg =
        tributary_mllp::tls::client_config(Some(&ca), c.as_deref().zip(k.as_deref())).unwrap();
    let mut s = sender_cfg(addr);
    s.tls = Some((Arc::new(cfg), "localhost".into()));
    s.max_attempts = 1;
    MllpSender::new(s)
}

fn tls_config(dir: &std::path::Path, require: bool, reload: u64) -> MllpTlsConfig {
    MllpTlsConfig {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client_ca: Some(dir.join("ca.crt")),
        require_client_cert: require,
        reload_interval_secs: reload,
    }
}

#[tokio::test]
async fn mtls_partner_is_identified_by_certificate_san() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("Test CA");
    pki.write_ca(&dir.path().join("ca.crt"));
    pki.write(dir.path(), "server", "localhost", &["localhost"], false);
    pki.write(
        dir.path(),
        "lab",
        "Some Lab Inc",
        &["lab.example.org"],
        true,
    );
    pki.write(
        dir.path(),
        "stranger",
        "stranger.example.org",
        &["stranger.example.org"],
        true,
    );
    let h = start(MllpListenerConfig {
        tls: Some(tls_config(dir.path(), true, 0)),
        allow_unknown_partners: false,
        partners: vec![PartnerConfig {
            id: "lab".into(),
            tenant: Some("west".into()),
            cert_names: vec!["lab.example.org".into()],
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let ack = tls_sender(h.addr, dir.path(), "ca.crt", Some("lab"))
        .send_once(&adt("TLS1"))
        .await
        .unwrap();
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AA, b"TLS1".to_vec()));
    // a valid certificate that names no partner: refused with a reason
    let ack = tls_sender(h.addr, dir.path(), "ca.crt", Some("stranger"))
        .send_once(&adt("TLS2"))
        .await
        .unwrap();
    assert_eq!(read_msa(&ack).unwrap().0, AckCode::AR);
    // no certificate at all: the handshake fails, nothing is stored
    assert!(tls_sender(h.addr, dir.path(), "ca.crt", None)
        .send_once(&adt("TLS3"))
        .await
        .is_err());
    let recs = h.records();
    let ok: Vec<_> = recs
        .iter()
        .filter(|r| r.envelope.meta["control_id"] == "TLS1")
        .collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].envelope.partner.as_str(), "lab");
    assert_eq!(ok[0].envelope.tenant.as_str(), "west");
    assert!(!recs
        .iter()
        .any(|r| r.envelope.meta.get("control_id").map(String::as_str) == Some("TLS3")));
}

#[tokio::test]
async fn certificate_is_reloaded_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = Pki::new("Old CA");
    old.write_ca(&dir.path().join("ca.crt"));
    old.write_ca(&dir.path().join("old-ca.crt"));
    old.write(dir.path(), "server", "localhost", &["localhost"], false);
    let h = start(MllpListenerConfig {
        tls: Some(MllpTlsConfig {
            client_ca: None,
            ..tls_config(dir.path(), false, 1)
        }),
        ..Default::default()
    })
    .await;
    let ack = tls_sender(h.addr, dir.path(), "old-ca.crt", None)
        .send_once(&adt("R1"))
        .await
        .unwrap();
    assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
    // rotate: a certificate from a new CA replaces the files in place
    let new = Pki::new("New CA");
    new.write_ca(&dir.path().join("new-ca.crt"));
    std::thread::sleep(Duration::from_millis(1100)); // distinct mtime on coarse filesystems
    new.write(dir.path(), "server", "localhost", &["localhost"], false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = tls_sender(h.addr, dir.path(), "new-ca.crt", None)
            .send_once(&adt("R2"))
            .await;
        if let Ok(ack) = r {
            assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // and clients that only trust the old CA are now refused
    assert!(tls_sender(h.addr, dir.path(), "old-ca.crt", None)
        .send_once(&adt("R3"))
        .await
        .is_err());
}
