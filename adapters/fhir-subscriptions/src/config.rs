//! `[subscriptions]`: FHIR Subscriptions out (R4 Backport IG, topic-based) and in (an endpoint
//! upstream FHIR servers post notifications to). Optional; absent = off.
//!
//! ```toml
//! [subscriptions]
//! base_url = "https://fhir.example.org/fhir"   # how notifications refer to our resources
//! tenants = ["default"]
//! give_up_after_secs = 86400                    # then dead-letter, Subscription.status = error
//!
//! [[subscriptions.inbound]]                     # upstream EHRs allowed to notify us
//! partner = "ehr-east"
//! token = "…"                                   # Bearer token they send (never logged)
//! upstream_base_url = "https://ehr.example.org/fhir"
//! token_url = "https://ehr.example.org/oauth2/token"  # OAuth2 client credentials for id-only
//! client_id = "tributary"
//! client_secret = "…"
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("invalid value for `subscriptions.{key}`: {value:?} — {allowed}")]
pub struct SubscriptionsConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: &str, value: impl ToString, allowed: &str) -> SubscriptionsConfigError {
    SubscriptionsConfigError {
        key: key.into(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// Public base URL of our FHIR API; notifications reference `<base_url>/Subscription/<id>`
    /// and `<base_url>/<Type>/<id>`.
    pub base_url: String,
    /// Where `$status`, `$events`, `$dead-letters` and `/subscription-hook/<partner>` are
    /// mounted on the HTTP server (the FHIR base path).
    pub path_prefix: String,
    /// Tenants whose `Subscription` resources are served. Empty = the default tenant.
    pub tenants: Vec<String>,
    /// How often `Subscription` resources are re-read from the store (new ones are also picked
    /// up at once from the outbox).
    pub rescan_secs: u64,
    /// First retry delay after a failed delivery; doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How long one notification is retried before its events are dead-lettered and the
    /// Subscription's status set to `error` (later events are still attempted).
    pub give_up_after_secs: u64,
    /// Timeout of one delivery request (a Subscription's `backport-timeout` may shorten it).
    pub request_timeout_ms: u64,
    /// Most events in one notification Bundle (a Subscription's `backport-max-count` may
    /// lower it).
    pub max_events_per_notification: usize,
    /// Smallest heartbeat period honoured; shorter requests are raised to it.
    pub min_heartbeat_secs: u64,
    /// Allow `http://` endpoints (tests, loopback); otherwise only `https://`.
    pub allow_http_endpoints: bool,
    /// Allow rest-hook endpoints at loopback, private (RFC 1918, IPv6 unique-local), link-local
    /// (cloud metadata services among them), shared (100.64/10) or unspecified addresses. Off:
    /// a client that may create Subscriptions cannot make the engine post into the network it
    /// runs in. Checked on the address each request connects to, after name resolution.
    pub allow_private_endpoints: bool,
    /// Websocket channel: the URL `$get-ws-binding-token` tells clients to connect to. Empty =
    /// `ws://<Host of the request><path_prefix>/subscription-ws` (`wss://` when the request came
    /// over `[http.tls]` or with `X-Forwarded-Proto: https`); set it when a proxy serves another
    /// address.
    pub websocket_url: String,
    /// How long a websocket binding token stays valid (it binds one connection, once).
    pub ws_token_ttl_secs: u64,
    /// A websocket client must send `bind-with-token` within this many seconds of connecting.
    pub ws_bind_timeout_secs: u64,
    /// Notifications queued per websocket connection; a client that falls this far behind is
    /// disconnected (it catches up with `$events`).
    pub ws_queue_bound: usize,
    /// Websocket ping period; a client that answers nothing for three periods is dropped.
    pub ws_ping_secs: u64,
    /// Most websocket connections open at once, bound or still waiting for their bind. An
    /// upgraded connection leaves the HTTP listener's `max_connections`, so this bounds them;
    /// one more is answered 503 before the upgrade.
    pub ws_max_connections: usize,
    /// Partners allowed to post notifications to `/subscription-hook/<partner>`.
    pub inbound: Vec<InboundPartner>,
    /// Extra trusted CA certificates (a PEM bundle) for the HTTPS calls this component makes:
    /// subscriber endpoints, and partners' token endpoints and FHIR servers. Empty: the public
    /// web roots only.
    pub ca_file: std::path::PathBuf,
    /// Client certificate chain and private key (PEM, one file) presented on those HTTPS calls,
    /// for subscribers and partners that require mutual TLS. Empty: none.
    pub client_identity_file: std::path::PathBuf,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8080/fhir".into(),
            path_prefix: "/fhir".into(),
            tenants: Vec::new(),
            rescan_secs: 5,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            give_up_after_secs: 86_400,
            request_timeout_ms: 10_000,
            max_events_per_notification: 50,
            min_heartbeat_secs: 10,
            allow_http_endpoints: false,
            allow_private_endpoints: false,
            websocket_url: String::new(),
            ws_token_ttl_secs: 60,
            ws_bind_timeout_secs: 10,
            ws_queue_bound: 64,
            ws_ping_secs: 30,
            ws_max_connections: 1024,
            inbound: Vec::new(),
            ca_file: std::path::PathBuf::new(),
            client_identity_file: std::path::PathBuf::new(),
        }
    }
}

/// An upstream FHIR server that notifies us (Subscriptions in).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundPartner {
    /// Partner id: the path segment of its endpoint and the journal's partner.
    pub partner: String,
    /// Bearer token the partner must send (`Authorization: Bearer …`). Never logged.
    pub token: String,
    /// Tenant the notifications belong to; empty = the default tenant.
    #[serde(default)]
    pub tenant: String,
    /// Base URL to fetch full resources from for `id-only` notifications.
    #[serde(default)]
    pub upstream_base_url: Option<String>,
    /// OAuth2 token endpoint (client credentials grant) for those fetches.
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    /// Never logged.
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
}

impl SubscriptionsConfig {
    /// The client for every outbound call: `request_timeout_ms` per request, the public web
    /// roots plus `ca_file`, `client_identity_file` for mutual TLS, no redirects (a subscriber's
    /// endpoint is the URL it registered).
    /// The client for rest-hook notifications: as [`Self::http_client`], and unless
    /// `allow_private_endpoints`, names resolve to public addresses only.
    pub fn notification_client(&self) -> Result<reqwest::Client, SubscriptionsConfigError> {
        self.client(!self.allow_private_endpoints)
    }

    /// The client for reads from inbound partners' servers (configured by the operator, so
    /// they may be on the private network).
    pub fn http_client(&self) -> Result<reqwest::Client, SubscriptionsConfigError> {
        self.client(false)
    }

    fn client(&self, public_only: bool) -> Result<reqwest::Client, SubscriptionsConfigError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(std::time::Duration::from_millis(self.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none());
        if !self.ca_file.as_os_str().is_empty() {
            let unusable = |e: String| invalid("ca_file", self.ca_file.display(), &e);
            let pem = std::fs::read(&self.ca_file).map_err(|e| unusable(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| unusable(format!("a PEM bundle of CA certificates ({e})")))?;
            if certs.is_empty() {
                return Err(unusable(
                    "a PEM bundle of CA certificates (none found)".into(),
                ));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if !self.client_identity_file.as_os_str().is_empty() {
            let path = &self.client_identity_file;
            let unusable = |e: String| invalid("client_identity_file", path.display(), &e);
            let pem = std::fs::read(path).map_err(|e| unusable(e.to_string()))?;
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| unusable(format!("a PEM certificate chain and private key ({e})")))?;
            b = b.identity(id);
        }
        if public_only {
            b = b.dns_resolver(std::sync::Arc::new(crate::netpolicy::PublicOnly));
        }
        b.build()
            .map_err(|e| invalid("ca_file", "", &e.to_string()))
    }

    /// Checks every value without network access.
    pub fn validate(&self) -> Result<(), SubscriptionsConfigError> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://"))
            || self.base_url.ends_with('/')
        {
            return Err(invalid(
                "base_url",
                &self.base_url,
                "an absolute http(s) URL without a trailing slash",
            ));
        }
        if !self.path_prefix.starts_with('/') || self.path_prefix.ends_with('/') {
            return Err(invalid(
                "path_prefix",
                &self.path_prefix,
                "a path starting with / and not ending with /, e.g. /fhir",
            ));
        }
        for (key, v) in [
            ("rescan_secs", self.rescan_secs),
            ("retry_initial_ms", self.retry_initial_ms),
            ("give_up_after_secs", self.give_up_after_secs),
            ("request_timeout_ms", self.request_timeout_ms),
            ("min_heartbeat_secs", self.min_heartbeat_secs),
            (
                "max_events_per_notification",
                self.max_events_per_notification as u64,
            ),
            ("ws_token_ttl_secs", self.ws_token_ttl_secs),
            ("ws_bind_timeout_secs", self.ws_bind_timeout_secs),
            ("ws_queue_bound", self.ws_queue_bound as u64),
            ("ws_ping_secs", self.ws_ping_secs),
            ("ws_max_connections", self.ws_max_connections as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, v, "must be greater than 0"));
            }
        }
        if self.retry_max_ms < self.retry_initial_ms {
            return Err(invalid(
                "retry_max_ms",
                self.retry_max_ms,
                "at least retry_initial_ms",
            ));
        }
        if !(self.websocket_url.is_empty()
            || self.websocket_url.starts_with("ws://")
            || self.websocket_url.starts_with("wss://"))
        {
            return Err(invalid(
                "websocket_url",
                &self.websocket_url,
                "empty (derived from the request) or a ws:// or wss:// URL",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.inbound.iter().enumerate() {
            let key = format!("inbound[{i}]");
            if p.partner.is_empty()
                || !p
                    .partner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || !seen.insert(p.partner.clone())
            {
                return Err(invalid(
                    &format!("{key}.partner"),
                    &p.partner,
                    "unique; letters, digits, - and _",
                ));
            }
            if p.token.len() < 16 {
                return Err(invalid(
                    &format!("{key}.token"),
                    "***",
                    "at least 16 characters",
                ));
            }
            if p.token_url.is_some() && (p.client_id.is_none() || p.client_secret.is_none()) {
                return Err(invalid(
                    &format!("{key}.client_id"),
                    "",
                    "client_id and client_secret are required with token_url",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SubscriptionsConfig, String> {
        let c: SubscriptionsConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn defaults_and_errors() {
        assert_eq!(parse("").unwrap(), SubscriptionsConfig::default());
        let e = parse("base_url = \"fhir\"").unwrap_err();
        assert!(e.contains("subscriptions.base_url"), "{e}");
        let e = parse("give_up_after_secs = 0").unwrap_err();
        assert!(e.contains("subscriptions.give_up_after_secs"), "{e}");
        let e = parse("[[inbound]]\npartner = \"ehr\"\ntoken = \"short\"").unwrap_err();
        assert!(
            e.contains("inbound[0].token") && !e.contains("short"),
            "{e}"
        );
        let e = parse("websocket_url = \"http://x/ws\"").unwrap_err();
        assert!(e.contains("subscriptions.websocket_url"), "{e}");
        let e = parse("ws_queue_bound = 0").unwrap_err();
        assert!(e.contains("subscriptions.ws_queue_bound"), "{e}");
        let e = parse("retries = 3").unwrap_err();
        assert!(e.contains("retries"), "{e}");
    }
}
