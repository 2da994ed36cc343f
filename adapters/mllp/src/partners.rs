//! Who is sending: partners recognised by TLS client certificate or source address, and their
//! per-partner rate limits (a token bucket shared by all of a partner's connections).

use crate::config::{MllpClientTlsConfig, MllpListenerConfig, PartnerConfig};
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A resolved sender.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: String,
    pub tenant: String,
    /// How it was recognised: `certificate`, `address` or `open`.
    pub matched_by: &'static str,
    /// Where application ACKs go when the message's connection is gone (`host:port`, TLS).
    pub app_ack_return: Option<(String, Option<MllpClientTlsConfig>)>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Partner {
    /// Takes one message from the partner's budget; false means "rate limited".
    pub fn admit(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.try_acquire())
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub fn try_acquire(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Entry {
    partner: Partner,
    cert_names: Vec<String>,
    cidrs: Vec<IpNet>,
}

/// The partner table of one listener.
pub struct Partners {
    entries: Vec<Entry>,
    open: Option<Partner>,
}

/// The identity a connection presents.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity {
    pub addr: Option<IpAddr>,
    /// Subject CN and DNS/email/URI SANs of a verified client certificate.
    pub cert_names: Vec<String>,
}

impl Partners {
    /// Builds the table; `config` must have passed `validate()`.
    pub fn new(config: &MllpListenerConfig, listener_tenant: &str) -> Self {
        let entries = config
            .partners
            .iter()
            .map(|p: &PartnerConfig| Entry {
                partner: Partner {
                    id: p.id.clone(),
                    tenant: p.tenant.clone().unwrap_or_else(|| listener_tenant.into()),
                    matched_by: "",
                    app_ack_return: p
                        .app_ack_return
                        .clone()
                        .map(|a| (a, p.app_ack_return_tls.clone())),
                    limiter: p.max_messages_per_sec.map(|r| {
                        let burst = p.burst.unwrap_or_else(|| r.ceil().max(1.0) as u32);
                        Arc::new(RateLimiter::new(r, burst))
                    }),
                },
                cert_names: p
                    .cert_names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect(),
                cidrs: p
                    .source_cidrs
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect(),
            })
            .collect();
        let open = config.allow_unknown_partners.then(|| Partner {
            id: config.default_partner.clone(),
            tenant: listener_tenant.into(),
            matched_by: "open",
            app_ack_return: None,
            limiter: None,
        });
        Self { entries, open }
    }

    /// The partner for a connection: certificate match first, then address, then the open
    /// default; `None` means unknown and refused.
    pub fn identify(&self, peer: &PeerIdentity) -> Option<Partner> {
        if !peer.cert_names.is_empty() {
            for e in &self.entries {
                if e.cert_names
                    .iter()
                    .any(|n| peer.cert_names.iter().any(|c| c.eq_ignore_ascii_case(n)))
                {
                    return Some(Partner {
                        matched_by: "certificate",
                        ..e.partner.clone()
                    });
                }
            }
        }
        if let Some(addr) = peer.addr {
            let addr = match addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
                v4 => v4,
            };
            for e in &self.entries {
                if e.cidrs.iter().any(|n| n.contains(&addr)) {
                    return Some(Partner {
                        matched_by: "address",
                        ..e.partner.clone()
                    });
                }
            }
        }
        self.open.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(open: bool) -> MllpListenerConfig {
        MllpListenerConfig {
            allow_unknown_partners: open,
            partners: vec![
                PartnerConfig {
                    id: "lab".into(),
                    cert_names: vec!["Lab.Example".into()],
                    max_messages_per_sec: Some(2.0),
                    burst: Some(2),
                    ..Default::default()
                },
                PartnerConfig {
                    id: "adt".into(),
                    tenant: Some("north".into()),
                    source_cidrs: vec!["10.1.0.0/16".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn identifies_by_certificate_then_address_then_open() {
        let p = Partners::new(&cfg(false), "default");
        let by_cert = p
            .identify(&PeerIdentity {
                addr: Some("10.1.2.3".parse().unwrap()),
                cert_names: vec!["lab.example".into()],
            })
            .unwrap();
        assert_eq!(
            (by_cert.id.as_str(), by_cert.matched_by),
            ("lab", "certificate")
        );
        let by_addr = p
            .identify(&PeerIdentity {
                addr: Some("::ffff:10.1.9.9".parse().unwrap()),
                cert_names: vec![],
            })
            .unwrap();
        assert_eq!(
            (by_addr.id.as_str(), by_addr.tenant.as_str()),
            ("adt", "north")
        );
        let stranger = PeerIdentity {
            addr: Some("192.0.2.1".parse().unwrap()),
            cert_names: vec!["evil.example".into()],
        };
        assert!(p.identify(&stranger).is_none());
        let open = Partners::new(&cfg(true), "default");
        assert_eq!(open.identify(&stranger).unwrap().id, "anonymous");
    }

    #[test]
    fn rate_limit_is_shared_by_a_partners_connections() {
        let p = Partners::new(&cfg(false), "default");
        let peer = PeerIdentity {
            addr: None,
            cert_names: vec!["lab.example".into()],
        };
        let a = p.identify(&peer).unwrap();
        let b = p.identify(&peer).unwrap();
        assert!(a.admit());
        assert!(b.admit());
        // burst of 2 used up; the next one right away is refused (2/s refill is far slower
        // than these three calls)
        assert!(!a.admit() || !b.admit());
    }
}
