//! `[facade]` in `tributary.toml`: authentication, break-glass, rate limits and audit of the FHIR
//! API. The doc comments are the operator documentation. With no section at all, the embedded
//! default applies: tokens signed by a local key in the data directory (`tributary token issue`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("invalid value for `{key}`: {value:?} — {allowed}")]
pub struct FacadeConfigError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

fn invalid(key: &str, value: impl ToString, allowed: &str) -> FacadeConfigError {
    FacadeConfigError {
        key: format!("facade.{key}"),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FacadeConfig {
    /// Public base URL of the FHIR API (used in `Bundle.link` and `fullUrl`), e.g.
    /// `https://fhir.example.org/fhir`. Empty: derived from the request's `Host` header.
    pub base_url: String,
    pub auth: AuthConfig,
    pub break_glass: BreakGlassConfig,
    pub rate_limit: RateLimitConfig,
    /// Backend FHIR servers that serve some resource types (for some tenants) instead of the
    /// built-in store. Requests to them pass the same policy stack; responses are filtered by the
    /// caller's scopes and patient compartment before they leave.
    pub backends: Vec<BackendConfig>,
    pub export: ExportConfig,
    /// `Patient/$match`: what each agreeing detail adds to a candidate's score, and where the
    /// grades start. A shared identifier always makes a match certain (score 1).
    #[serde(rename = "match")]
    pub matching: MatchConfig,
}

/// Weights of `Patient/$match` (`[facade.match]`). A candidate's score is the sum of the
/// weights of what agrees with the Patient asked about, at most 0.99; from `probable` it is
/// graded probable, from `possible` possible, below that it is not returned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// A family name in common (case- and accent-insensitive).
    pub family: f64,
    /// Otherwise, family names that sound alike (American Soundex: `Smith` and `Smyth`).
    pub family_sounds_alike: f64,
    /// The first given name in common.
    pub given: f64,
    /// Otherwise, its initial.
    pub given_initial: f64,
    pub birth_date: f64,
    pub gender: f64,
    /// A postal code or first address line in common.
    pub address: f64,
    /// A phone number (by its digits) or other telecom value in common.
    pub telecom: f64,
    pub probable: f64,
    pub possible: f64,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            family: 0.25,
            family_sounds_alike: 0.15,
            given: 0.2,
            given_initial: 0.05,
            birth_date: 0.3,
            gender: 0.1,
            address: 0.075,
            telecom: 0.075,
            probable: 0.85,
            possible: 0.6,
        }
    }
}

/// Bulk Data export (`$export`): NDJSON files written under `<data_dir>/exports/`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Export jobs running at once across all tenants; one more kick-off is answered 429.
    pub max_running: usize,
    /// Export jobs a tenant may keep (running or finished, until they expire or are deleted).
    pub max_jobs_per_tenant: usize,
    /// How long a finished export's files stay downloadable before they are deleted.
    pub retention_secs: u64,
    /// Resources per NDJSON file; a type with more is split over several files.
    pub file_max_resources: usize,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            max_running: 2,
            max_jobs_per_tenant: 10,
            retention_secs: 24 * 3600,
            file_max_resources: 100_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// A name for logs and audit records.
    pub name: String,
    /// Base URL of the backend's FHIR API, e.g. `https://lab-fhir.internal/fhir`.
    pub url: String,
    /// Resource types routed to this backend.
    pub resource_types: Vec<String>,
    /// Tenants routed to this backend; empty means every tenant.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Whole-request timeout, in seconds.
    #[serde(default = "default_backend_timeout")]
    pub timeout_secs: u64,
    /// Connect timeout, in seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Idle pooled connections kept per backend host.
    #[serde(default = "default_pool")]
    pub pool_max_idle: usize,
    /// Largest response body read from the backend; a larger one (announced or streamed) is
    /// refused with 502 as soon as it passes this size.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Extra trusted CA certificate (PEM) for the backend's TLS certificate. Empty: system roots.
    #[serde(default)]
    pub ca_file: PathBuf,
    /// Client certificate chain and private key (PEM, one file) for mutual TLS. Empty: none.
    #[serde(default)]
    pub client_identity_file: PathBuf,
    /// Seconds between `GET <url>/metadata` health checks (the first at start), so `/ready`
    /// shows a backend that cannot be reached before a request finds out. 0: no checks.
    #[serde(default = "default_health_check")]
    pub health_check_secs: u64,
}

fn default_health_check() -> u64 {
    30
}

fn default_backend_timeout() -> u64 {
    10
}
fn default_connect_timeout() -> u64 {
    3
}
fn default_pool() -> usize {
    32
}
fn default_max_response() -> usize {
    32 << 20
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted `iss` values. Tokens from `tributary token issue` carry the first one.
    pub issuers: Vec<String>,
    /// Accepted `aud` values (a token must name at least one).
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Generate (on first start) and trust a local ES256 signing key kept in
    /// `<data_dir>/keys/`; its public key is served at `/.well-known/jwks.json`.
    pub local_key: bool,
    /// A JWKS file of trusted public keys (e.g. exported from the identity provider). Empty: none.
    pub jwks_file: PathBuf,
    /// The identity provider's JWKS URL. Fetched at start and when a token names an unknown `kid`
    /// (at most once per `jwks_refresh_min_secs`); the last good copy is cached in
    /// `<data_dir>/keys/jwks-cache.json` and used when the network is unavailable.
    pub jwks_url: String,
    /// Least interval between two JWKS fetches, in seconds.
    pub jwks_refresh_min_secs: u64,
    /// RFC 7662 token introspection endpoint of the authorization server. Empty disables it.
    /// Opaque (non-JWT) tokens are always introspected when it is set; see `introspect_jwts`.
    pub introspection_url: String,
    /// Client id the facade authenticates to the introspection endpoint with (HTTP Basic).
    pub introspection_client_id: String,
    /// File holding the matching client secret (kept out of this file).
    pub introspection_secret_file: PathBuf,
    /// Seconds an introspection answer is reused for reads. Writes are always introspected anew.
    pub introspection_cache_secs: u64,
    /// Also introspect JWTs (after their signature verified), so that a token revoked at the
    /// authorization server fails within `introspection_cache_secs`.
    pub introspect_jwts: bool,
    /// An opaque token's introspection answer must name one of `audiences` in `aud`. RFC 7662
    /// makes `aud` optional, but an authorization server that serves several APIs answers
    /// "active" for a token minted for any of them; without an audience we cannot tell ours.
    /// Turn off only for a server that never says `aud` and issues tokens for this API alone.
    pub introspection_requires_audience: bool,
    /// Role names a token's `role` claim may carry, mapped to what they may do:
    /// `view` (read/search), `edit` (read and write), `admin` (everything, plus the admin
    /// endpoints except the audit trail), `audit` (AuditEvent only, nothing clinical). A token without a role is limited by its
    /// scopes alone.
    pub roles: BTreeMap<String, String>,
    /// The authorization server's token endpoint, announced in
    /// `/.well-known/smart-configuration` so SMART clients find where to get a token. Empty:
    /// none is announced (the embedded default issues tokens with `tributary token issue`).
    pub token_endpoint: String,
    /// Its authorization endpoint (authorization code with PKCE S256). Empty: none announced.
    pub authorization_endpoint: String,
    /// How clients authenticate at the token endpoint (`private_key_jwt`,
    /// `client_secret_basic`, …), announced as given.
    pub token_endpoint_auth_methods: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuers: vec!["tributary".into()],
            audiences: vec!["tributary".into()],
            leeway_secs: 30,
            local_key: true,
            jwks_file: PathBuf::new(),
            jwks_url: String::new(),
            jwks_refresh_min_secs: 60,
            introspection_url: String::new(),
            introspection_client_id: String::new(),
            introspection_secret_file: PathBuf::new(),
            introspection_cache_secs: 30,
            introspection_requires_audience: true,
            introspect_jwts: false,
            roles: [
                ("view", "view"),
                ("edit", "edit"),
                ("admin", "admin"),
                ("audit", "audit"),
                ("clinician", "edit"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            token_endpoint: String::new(),
            authorization_endpoint: String::new(),
            token_endpoint_auth_methods: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakGlassConfig {
    /// Roles (token `role` claim) allowed to break the glass with the `X-Break-Glass` header.
    /// Empty disables break-glass.
    pub roles: Vec<String>,
    /// Accepted reason codes for the `X-Break-Glass` header. Codes, not free text, so the
    /// audit record stays free of patient information.
    pub reasons: Vec<String>,
}

impl Default for BreakGlassConfig {
    fn default() -> Self {
        Self {
            roles: vec!["clinician".into()],
            reasons: vec![
                "emergency".into(),
                "patient-unable-to-consent".into(),
                "system-outage".into(),
            ],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Turn rate limiting off entirely (not recommended outside benchmarks).
    pub enabled: bool,
    /// Bucket per (tenant, client): burst size in cost units.
    pub client_burst: u64,
    /// Bucket per (tenant, client): cost units refilled per second.
    pub client_per_sec: u64,
    /// Bucket per (tenant, user `sub`): burst size in cost units.
    pub user_burst: u64,
    /// Bucket per (tenant, user): cost units refilled per second.
    pub user_per_sec: u64,
    pub costs: CostWeights,
    /// Per-tenant or per-client limits. Key `tenant` or `tenant/client`; the most specific wins.
    pub overrides: BTreeMap<String, LimitOverride>,
    /// Per interaction class, the share (0 < share ≤ 1) of each client's and each user's
    /// budget that class may use: its own bucket of that share of the burst and rate, charged
    /// besides the client's and the user's. So a client's `$everything` or history calls cannot
    /// use up the budget its point-of-care reads need. A class not listed has no bucket of its own.
    pub class_shares: BTreeMap<RateClass, f64>,
}

/// The interaction classes rate limits are kept per (see `class_shares`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateClass {
    /// read, vread
    Read,
    /// searches (and the audit trail's)
    Search,
    /// instance and type history
    History,
    /// create, update, patch, delete, transaction and batch entries
    Write,
    /// `Patient/$everything`
    Everything,
    /// admin endpoints and anything else
    Metadata,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            client_burst: 2_000,
            client_per_sec: 1_000,
            user_burst: 1_000,
            user_per_sec: 500,
            costs: CostWeights::default(),
            overrides: BTreeMap::new(),
            class_shares: [(RateClass::Everything, 0.2), (RateClass::History, 0.25)]
                .into_iter()
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitOverride {
    pub burst: u64,
    pub per_sec: u64,
}

/// Cost of one request in bucket units, per interaction class.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CostWeights {
    pub read: u64,
    /// Base cost of a search; each `_include` adds `include`.
    pub search: u64,
    pub include: u64,
    pub history: u64,
    /// create, update, delete, and each entry of a transaction/batch.
    pub write: u64,
    /// `Patient/$everything`.
    pub everything: u64,
    /// `/metadata`
    pub metadata: u64,
}

impl Default for CostWeights {
    fn default() -> Self {
        Self {
            read: 1,
            search: 3,
            include: 1,
            history: 10,
            write: 5,
            everything: 20,
            metadata: 1,
        }
    }
}

pub const ROLE_KINDS: [&str; 4] = ["view", "edit", "admin", "audit"];

impl FacadeConfig {
    /// Checks every value without I/O.
    pub fn validate(&self) -> Result<(), FacadeConfigError> {
        let http_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        if !(self.base_url.is_empty() || http_url(&self.base_url)) {
            return Err(invalid(
                "base_url",
                &self.base_url,
                "an http(s) URL or empty",
            ));
        }
        let a = &self.auth;
        if a.issuers.is_empty() || a.issuers.iter().any(String::is_empty) {
            return Err(invalid(
                "auth.issuers",
                format!("{:?}", a.issuers),
                "at least one non-empty issuer",
            ));
        }
        if a.audiences.is_empty() || a.audiences.iter().any(String::is_empty) {
            return Err(invalid(
                "auth.audiences",
                format!("{:?}", a.audiences),
                "at least one non-empty audience",
            ));
        }
        if a.leeway_secs > 300 {
            return Err(invalid(
                "auth.leeway_secs",
                a.leeway_secs,
                "0 to 300 seconds",
            ));
        }
        if !(1..=86_400).contains(&a.jwks_refresh_min_secs) {
            // 0 would let every token with a made-up `kid` make us fetch the JWKS again.
            return Err(invalid(
                "auth.jwks_refresh_min_secs",
                a.jwks_refresh_min_secs,
                "1 to 86400 seconds",
            ));
        }
        if !a.jwks_url.is_empty()
            && !a.jwks_url.starts_with("https://")
            && !a.jwks_url.starts_with("http://")
        {
            return Err(invalid(
                "auth.jwks_url",
                &a.jwks_url,
                "an http(s) URL or empty",
            ));
        }
        if !a.introspection_url.is_empty() && !http_url(&a.introspection_url) {
            return Err(invalid(
                "auth.introspection_url",
                &a.introspection_url,
                "an http(s) URL or empty",
            ));
        }
        if a.introspect_jwts && a.introspection_url.is_empty() {
            return Err(invalid(
                "auth.introspect_jwts",
                true,
                "false, unless auth.introspection_url is set",
            ));
        }
        if !a.local_key && a.jwks_url.is_empty() && a.jwks_file.as_os_str().is_empty() {
            return Err(invalid(
                "auth.local_key",
                false,
                "true, unless auth.jwks_url or auth.jwks_file is set",
            ));
        }
        for (name, kind) in &a.roles {
            if !ROLE_KINDS.contains(&kind.as_str()) {
                return Err(invalid(
                    &format!("auth.roles.{name}"),
                    kind,
                    "one of: view, edit, admin, audit",
                ));
            }
        }
        for r in &self.break_glass.roles {
            if !a.roles.contains_key(r) {
                return Err(invalid(
                    "break_glass.roles",
                    r,
                    "a role defined in facade.auth.roles",
                ));
            }
        }
        let m = &self.matching;
        for (k, v) in [
            ("match.family", m.family),
            ("match.family_sounds_alike", m.family_sounds_alike),
            ("match.given", m.given),
            ("match.given_initial", m.given_initial),
            ("match.birth_date", m.birth_date),
            ("match.gender", m.gender),
            ("match.address", m.address),
            ("match.telecom", m.telecom),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(k, v, "a weight from 0 to 1"));
            }
        }
        if m.family_sounds_alike > m.family {
            return Err(invalid(
                "match.family_sounds_alike",
                m.family_sounds_alike,
                "at most match.family: sounding alike counts less than agreeing",
            ));
        }
        if m.given_initial > m.given {
            return Err(invalid(
                "match.given_initial",
                m.given_initial,
                "at most match.given: an initial counts less than the name",
            ));
        }
        if !(m.possible > 0.0 && m.possible <= m.probable && m.probable < 1.0) {
            return Err(invalid(
                "match.possible",
                format!("{} (probable {})", m.possible, m.probable),
                "0 < possible <= probable < 1 (1 is for a shared identifier)",
            ));
        }
        let ex = &self.export;
        for (k, v, range) in [
            ("export.max_running", ex.max_running, 1..=64),
            (
                "export.max_jobs_per_tenant",
                ex.max_jobs_per_tenant,
                1..=1000,
            ),
            (
                "export.file_max_resources",
                ex.file_max_resources,
                1..=10_000_000,
            ),
        ] {
            if !range.contains(&v) {
                let allowed = format!("{} to {}", range.start(), range.end());
                return Err(invalid(k, v, &allowed));
            }
        }
        if !(60..=30 * 86_400).contains(&ex.retention_secs) {
            return Err(invalid(
                "export.retention_secs",
                ex.retention_secs,
                "60 to 2592000 seconds",
            ));
        }
        let rl = &self.rate_limit;
        for (k, v) in [
            ("rate_limit.client_burst", rl.client_burst),
            ("rate_limit.client_per_sec", rl.client_per_sec),
            ("rate_limit.user_burst", rl.user_burst),
            ("rate_limit.user_per_sec", rl.user_per_sec),
        ] {
            if v == 0 {
                return Err(invalid(
                    k,
                    v,
                    "greater than 0 (use rate_limit.enabled = false to turn limits off)",
                ));
            }
        }
        for (k, o) in &rl.overrides {
            if o.burst == 0 || o.per_sec == 0 {
                return Err(invalid(
                    &format!("rate_limit.overrides.\"{k}\""),
                    format!("burst={} per_sec={}", o.burst, o.per_sec),
                    "burst and per_sec greater than 0",
                ));
            }
            if k.is_empty() || k.matches('/').count() > 1 {
                return Err(invalid(
                    "rate_limit.overrides",
                    k,
                    "a key `tenant` or `tenant/client`",
                ));
            }
        }
        for (class, share) in &rl.class_shares {
            if !(*share > 0.0 && *share <= 1.0) {
                return Err(invalid(
                    &format!("rate_limit.class_shares.{class:?}").to_lowercase(),
                    share,
                    "a share greater than 0 and at most 1",
                ));
            }
        }
        let mut routed = std::collections::BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let key = |k: &str| format!("backends[{i}].{k}");
            if !(b.url.starts_with("http://") || b.url.starts_with("https://")) {
                return Err(invalid(&key("url"), &b.url, "an http(s) URL"));
            }
            if b.resource_types.is_empty() {
                return Err(invalid(
                    &key("resource_types"),
                    "[]",
                    "at least one resource type",
                ));
            }
            for t in &b.resource_types {
                if !crate::policy::valid_type(t) {
                    return Err(invalid(
                        &key("resource_types"),
                        t,
                        "FHIR resource type names",
                    ));
                }
                let tenants = if b.tenants.is_empty() {
                    vec![String::from("*")]
                } else {
                    b.tenants.clone()
                };
                for tenant in tenants {
                    if !routed.insert((tenant.clone(), t.clone())) {
                        return Err(invalid(
                            &key("resource_types"),
                            t,
                            "each (tenant, type) routed to one backend only",
                        ));
                    }
                }
            }
            if b.timeout_secs == 0 || b.connect_timeout_secs == 0 {
                return Err(invalid(
                    &key("timeout_secs"),
                    b.timeout_secs,
                    "greater than 0",
                ));
            }
            if b.max_response_bytes == 0 {
                return Err(invalid(
                    &key("max_response_bytes"),
                    b.max_response_bytes,
                    "greater than 0",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        FacadeConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_key_value_allowed() {
        for (toml_text, key) in [
            ("[match]\nbirth_date = 1.5\n", "match.birth_date"),
            (
                "[match]\nfamily_sounds_alike = 0.3\n",
                "match.family_sounds_alike",
            ),
            ("[match]\ngiven_initial = 0.25\n", "match.given_initial"),
            ("[match]\npossible = 0.9\n", "match.possible"),
            ("[match]\nprobable = 1.0\n", "match.possible"),
        ] {
            let c: FacadeConfig = toml::from_str(toml_text).unwrap();
            let msg = c.validate().unwrap_err().to_string();
            assert!(msg.contains(&format!("facade.{key}")), "{toml_text}: {msg}");
        }
        let c: FacadeConfig = toml::from_str("[match]\nfamily = 0.3\npossible = 0.5\n").unwrap();
        c.validate().unwrap();
        assert_eq!((c.matching.family, c.matching.given), (0.3, 0.2));
        let mut c = FacadeConfig::default();
        c.auth.roles.insert("nurse".into(), "superuser".into());
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("facade.auth.roles.nurse")
                && msg.contains("superuser")
                && msg.contains("view, edit"),
            "{msg}"
        );
        let mut c = FacadeConfig::default();
        c.rate_limit.client_per_sec = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("client_per_sec"));
        let mut c = FacadeConfig::default();
        c.break_glass.roles = vec!["ghost".into()];
        assert!(c.validate().unwrap_err().to_string().contains("ghost"));
        let c: RateLimitConfig =
            toml::from_str("[class_shares]\neverything = 0.1\nread = 1.0\n").unwrap();
        assert_eq!(c.class_shares[&RateClass::Everything], 0.1);
        assert!(
            !c.class_shares.contains_key(&RateClass::History),
            "replaced, not merged"
        );
        assert!(toml::from_str::<RateLimitConfig>("[class_shares]\nbulk = 0.1\n").is_err());
        let mut c = FacadeConfig::default();
        c.rate_limit.class_shares.insert(RateClass::Search, 1.5);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rate_limit.class_shares.search"));
    }
}
