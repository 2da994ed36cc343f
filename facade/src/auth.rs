//! Authentication: bearer JWTs (ES256/RS256) verified against the local key, a JWKS file and/or
//! a JWKS URL (cached on disk, refreshed on an unknown `kid`), with `iss`, `aud`, `exp` and `nbf`
//! checked. A verified token becomes a [`Principal`]. Verified tokens are cached until they expire
//! (signature checks are the costliest step); revocation is checked on every request regardless.

use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::keys::LocalSigningKey;
use crate::revocation::Revocations;
use crate::scopes::ScopeSet;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tributary_runtime::http::{read_json_limited, read_limited};

/// Who is calling, as established from a verified token. Carries ids only.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub client_id: String,
    /// The user (`sub`), when a person is behind the app.
    pub user: Option<String>,
    pub tenant: String,
    /// The `role` claim as given, and what it maps to (view/edit/admin/audit).
    pub role: Option<String>,
    pub role_kind: Option<String>,
    pub scopes: ScopeSet,
    /// The scope string as granted, for the audit record.
    pub scope_text: String,
    /// Patient context (a resource id).
    pub patient: Option<String>,
    /// Consent / grant id the token was issued under.
    pub grant: Option<String>,
    pub jti: Option<String>,
    pub exp: i64,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    client_id: Option<String>,
    azp: Option<String>,
    #[serde(default)]
    scope: String,
    patient: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
    grant: Option<String>,
    jti: Option<String>,
}

#[derive(Clone)]
struct TrustedKey {
    key: DecodingKey,
    alg: Algorithm,
}

pub struct Authenticator {
    cfg: AuthConfig,
    default_tenant: String,
    keys: RwLock<HashMap<String, TrustedKey>>,
    /// The local key and the `jwks_file` keys: a JWKS URL refresh replaces the rest.
    static_keys: HashMap<String, TrustedKey>,
    verified: Mutex<HashMap<String, Arc<Principal>>>,
    pub revocations: Arc<Revocations>,
    jwks_cache_path: PathBuf,
    last_fetch: Mutex<Option<Instant>>,
    http: Option<reqwest::Client>,
    introspection_secret: String,
    /// token → (principal, when introspected)
    introspected: Mutex<HashMap<String, (Arc<Principal>, Instant)>>,
    /// Bounds the introspection calls in flight: any bearer value that is not a JWT is
    /// introspected before anything else limits its sender, so a flood of random tokens must
    /// not become a flood at the authorization server.
    introspecting: tokio::sync::Semaphore,
}

/// Introspection calls in flight at once; a request that finds none free within
/// [`INTROSPECTION_WAIT`] gets 401 (the token could not be checked), not a queue.
const INTROSPECTION_CONCURRENCY: usize = 16;
const INTROSPECTION_WAIT: Duration = Duration::from_secs(1);

const VERIFIED_CACHE_MAX: usize = 50_000;
/// A JWKS document larger than this is not read (a few keys take a few KiB).
const MAX_JWKS_BYTES: usize = 1 << 20;
/// An RFC 7662 answer larger than this is not read.
const MAX_INTROSPECTION_BYTES: usize = 64 << 10;

fn tenant_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn id_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn parse_jwks(text: &str) -> Vec<(String, TrustedKey)> {
    let Ok(set) = serde_json::from_str::<JwkSet>(text) else {
        return Vec::new();
    };
    set.keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => return None,
            };
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((kid, TrustedKey { key, alg }))
        })
        .collect()
}

impl Authenticator {
    /// Builds the trusted key set from config: the local key, the JWKS file, the cached copy of
    /// the JWKS URL. Does not touch the network; call [`Authenticator::refresh_jwks`] for that.
    pub fn new(
        cfg: AuthConfig,
        data_dir: &Path,
        default_tenant: &str,
        local: Option<&LocalSigningKey>,
        revocations: Arc<Revocations>,
    ) -> Result<Self, String> {
        let mut keys = HashMap::new();
        if let Some(local) = local {
            let key = local.decoding_key().map_err(|e| e.to_string())?;
            keys.insert(
                local.kid.clone(),
                TrustedKey {
                    key,
                    alg: Algorithm::ES256,
                },
            );
        }
        if !cfg.jwks_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(&cfg.jwks_file)
                .map_err(|e| format!("facade.auth.jwks_file {}: {e}", cfg.jwks_file.display()))?;
            let found = parse_jwks(&text);
            if found.is_empty() {
                return Err(format!(
                    "facade.auth.jwks_file {}: no usable EC/RSA key with a kid",
                    cfg.jwks_file.display()
                ));
            }
            keys.extend(found);
        }
        let static_keys = keys.clone();
        let jwks_cache_path = crate::keys::keys_dir(data_dir).join("jwks-cache.json");
        if !cfg.jwks_url.is_empty() {
            if let Ok(text) = std::fs::read_to_string(&jwks_cache_path) {
                keys.extend(parse_jwks(&text));
            }
        }
        let introspection_secret = if cfg.introspection_secret_file.as_os_str().is_empty() {
            String::new()
        } else {
            std::fs::read_to_string(&cfg.introspection_secret_file)
                .map_err(|e| {
                    format!(
                        "facade.auth.introspection_secret_file {}: {e}",
                        cfg.introspection_secret_file.display()
                    )
                })?
                .trim()
                .to_string()
        };
        let http = (!cfg.jwks_url.is_empty() || !cfg.introspection_url.is_empty()).then(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default()
        });
        Ok(Self {
            cfg,
            default_tenant: default_tenant.to_string(),
            keys: RwLock::new(keys),
            static_keys,
            verified: Mutex::new(HashMap::new()),
            revocations,
            jwks_cache_path,
            last_fetch: Mutex::new(None),
            http,
            introspection_secret,
            introspected: Mutex::new(HashMap::new()),
            introspecting: tokio::sync::Semaphore::new(INTROSPECTION_CONCURRENCY),
        })
    }

    /// Fetches the JWKS URL (if configured and not fetched within `jwks_refresh_min_secs`),
    /// takes its key set (beside the local and file keys) and writes the on-disk cache.
    /// Failures keep the cached keys.
    pub async fn refresh_jwks(&self) -> bool {
        let Some(http) = self.http.as_ref().filter(|_| !self.cfg.jwks_url.is_empty()) else {
            return false;
        };
        {
            let mut last = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = *last {
                if at.elapsed() < Duration::from_secs(self.cfg.jwks_refresh_min_secs) {
                    return false;
                }
            }
            *last = Some(Instant::now());
        }
        let text = match http.get(&self.cfg.jwks_url).send().await {
            Ok(r) if r.status().is_success() => match read_limited(r, MAX_JWKS_BYTES).await {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS response not read; keeping cached keys");
                    return false;
                }
            },
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "JWKS fetch refused; keeping cached keys"
                );
                return false;
            }
            Err(e) => {
                tracing::warn!(
                    error_kind = if e.is_timeout() {
                        "timeout"
                    } else if e.is_connect() {
                        "connect"
                    } else {
                        "other"
                    },
                    "JWKS fetch failed; keeping cached keys"
                );
                return false;
            }
        };
        let found = parse_jwks(&text);
        if found.is_empty() {
            return false;
        }
        let tmp = self.jwks_cache_path.with_extension("tmp");
        if let Some(dir) = self.jwks_cache_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &self.jwks_cache_path);
        }
        // The URL's set replaces what it said before: a key the provider rotated out (maybe a
        // compromised one) stops being trusted now, not at the next restart.
        let mut merged = self.static_keys.clone();
        merged.extend(found);
        let removed = match self.keys.write() {
            Ok(mut k) => {
                let removed = k.keys().any(|kid| !merged.contains_key(kid));
                *k = merged;
                removed
            }
            Err(_) => false,
        };
        if removed {
            // Tokens verified with a removed key must be verified again.
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        true
    }

    fn key_for(&self, kid: Option<&str>) -> Option<TrustedKey> {
        let keys = self.keys.read().ok()?;
        match kid {
            Some(k) => keys.get(k).cloned(),
            None if keys.len() == 1 => keys.values().next().cloned(),
            None => None,
        }
    }

    /// Verifies a bearer token and checks revocation. Errors are deliberately coarse. `write`:
    /// the request changes data, so an introspected token is introspected anew.
    pub async fn authenticate(&self, token: &str, write: bool) -> Result<Arc<Principal>, ApiError> {
        let is_jwt = token.split('.').count() == 3;
        let introspection = !self.cfg.introspection_url.is_empty();
        if !is_jwt {
            if !introspection {
                return Err(ApiError::Unauthorized("invalid bearer token".into()));
            }
            let p = self.introspect(token, write, true).await?;
            self.check_revoked(&p)?;
            return Ok(p);
        }
        let p = self.authenticate_jwt(token).await?;
        if introspection && self.cfg.introspect_jwts {
            // The signature is ours to check; whether the token is still active is the
            // authorization server's.
            self.introspect(token, write, false).await?;
        }
        Ok(p)
    }

    fn check_revoked(&self, principal: &Principal) -> Result<(), ApiError> {
        for id in [&principal.grant, &principal.jti].into_iter().flatten() {
            if self.revocations.is_revoked(&principal.tenant, id) {
                return Err(ApiError::Unauthorized(
                    "token grant has been revoked".into(),
                ));
            }
        }
        Ok(())
    }

    /// RFC 7662: POST token=… to the introspection endpoint; answers are cached for reads.
    /// `opaque`: the answer is all we know of the token (not a JWT whose claims we verified).
    async fn introspect(
        &self,
        token: &str,
        write: bool,
        opaque: bool,
    ) -> Result<Arc<Principal>, ApiError> {
        let ttl = Duration::from_secs(self.cfg.introspection_cache_secs);
        let unusable = || ApiError::Unauthorized("token could not be introspected".into());
        if !write {
            let hit = self
                .introspected
                .lock()
                .ok()
                .and_then(|c| c.get(token).cloned());
            if let Some((p, at)) = hit {
                let now = tributary_core::now_millis() / 1000;
                if at.elapsed() < ttl && p.exp >= now {
                    return Ok(p);
                }
            }
        }
        let http = self.http.as_ref().ok_or_else(unusable)?;
        let _permit = tokio::time::timeout(INTROSPECTION_WAIT, self.introspecting.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                tracing::debug!("token introspection saturated; request refused");
                unusable()
            })?;
        let res = http
            .post(&self.cfg.introspection_url)
            .basic_auth(
                &self.cfg.introspection_client_id,
                Some(&self.introspection_secret),
            )
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|_| {
                tracing::warn!("token introspection endpoint unreachable");
                unusable()
            })?;
        if !res.status().is_success() {
            tracing::warn!(
                status = res.status().as_u16(),
                "token introspection refused"
            );
            return Err(unusable());
        }
        let v = match read_json_limited(res, MAX_INTROSPECTION_BYTES).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                tracing::warn!("token introspection answered no JSON");
                return Err(unusable());
            }
            Err(e) => {
                tracing::warn!(error = %e, "token introspection answer not read");
                return Err(unusable());
            }
        };
        if v.get("active").and_then(Value::as_bool) != Some(true) {
            if let Ok(mut c) = self.introspected.lock() {
                c.remove(token);
            }
            return Err(ApiError::Unauthorized("token is not active".into()));
        }
        if let Some(iss) = v.get("iss").and_then(Value::as_str) {
            if !self.cfg.issuers.iter().any(|i| i == iss) {
                return Err(ApiError::Unauthorized("token issuer not accepted".into()));
            }
        }
        match v.get("aud") {
            Some(aud) => {
                let auds: Vec<&str> = match aud {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                if !auds
                    .iter()
                    .any(|a| self.cfg.audiences.iter().any(|x| x == a))
                {
                    return Err(ApiError::Unauthorized("token audience not accepted".into()));
                }
            }
            // A JWT's own `aud` was checked with its signature.
            None if opaque && self.cfg.introspection_requires_audience => {
                return Err(ApiError::Unauthorized(
                    "token audience not stated by the authorization server".into(),
                ));
            }
            None => {}
        }
        let claims: Claims = serde_json::from_value(v).map_err(|_| unusable())?;
        let now = tributary_core::now_millis() / 1000;
        if claims
            .exp
            .is_some_and(|e| e + (self.cfg.leeway_secs as i64) < now)
        {
            return Err(ApiError::Unauthorized("token expired".into()));
        }
        let p = Arc::new(self.principal(claims)?);
        if let Ok(mut c) = self.introspected.lock() {
            if c.len() >= VERIFIED_CACHE_MAX {
                c.clear();
            }
            c.insert(token.to_string(), (p.clone(), Instant::now()));
        }
        Ok(p)
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Arc<Principal>, ApiError> {
        let now = tributary_core::now_millis() / 1000;

        let cached = self
            .verified
            .lock()
            .ok()
            .and_then(|c| c.get(token).cloned());
        let principal = match cached {
            Some(p) if p.exp.saturating_add(self.cfg.leeway_secs as i64) >= now => p,
            _ => {
                let p = Arc::new(self.verify(token).await?);
                if let Ok(mut c) = self.verified.lock() {
                    if c.len() >= VERIFIED_CACHE_MAX {
                        c.retain(|_, v| v.exp + 60 >= now);
                        if c.len() >= VERIFIED_CACHE_MAX {
                            c.clear();
                        }
                    }
                    c.insert(token.to_string(), p.clone());
                }
                p
            }
        };
        self.check_revoked(&principal)?;
        Ok(principal)
    }

    async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let bad = || ApiError::Unauthorized("invalid bearer token".into());
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad())?;
        let mut key = self.key_for(header.kid.as_deref());
        if key.is_none() && header.kid.is_some() && self.refresh_jwks().await {
            key = self.key_for(header.kid.as_deref());
        }
        let key = key.ok_or_else(bad)?;
        if header.alg != key.alg {
            return Err(bad());
        }
        let mut v = Validation::new(key.alg);
        v.leeway = self.cfg.leeway_secs;
        v.validate_nbf = true;
        v.set_issuer(&self.cfg.issuers);
        v.set_audience(&self.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => ApiError::Unauthorized("token expired".into()),
                K::InvalidAudience => ApiError::Unauthorized("token audience not accepted".into()),
                K::InvalidIssuer => ApiError::Unauthorized("token issuer not accepted".into()),
                K::ImmatureSignature => ApiError::Unauthorized("token not yet valid".into()),
                _ => bad(),
            }
        })?;
        self.principal(data.claims)
    }

    fn principal(&self, c: Claims) -> Result<Principal, ApiError> {
        let client_id = c
            .client_id
            .or(c.azp)
            .or_else(|| c.sub.clone())
            .ok_or_else(|| ApiError::Unauthorized("token names no client".into()))?;
        let tenant = c.tenant.unwrap_or_else(|| self.default_tenant.clone());
        if !tenant_ok(&tenant) {
            return Err(ApiError::Unauthorized(
                "token tenant is not a valid tenant id".into(),
            ));
        }
        if let Some(p) = &c.patient {
            if !id_ok(p) {
                return Err(ApiError::Unauthorized(
                    "token patient is not a resource id".into(),
                ));
            }
        }
        let role_kind =
            match &c.role {
                None => None,
                Some(r) => Some(self.cfg.roles.get(r).cloned().ok_or_else(|| {
                    ApiError::Unauthorized("token role is not configured".into())
                })?),
            };
        Ok(Principal {
            client_id,
            user: c.sub,
            tenant,
            role: c.role,
            role_kind,
            scopes: ScopeSet::parse(&c.scope),
            scope_text: c.scope,
            patient: c.patient,
            grant: c.grant,
            jti: c.jti,
            exp: c.exp.unwrap_or(i64::MAX),
        })
    }
}

/// What `tributary token issue` puts in a token.
#[derive(Clone, Debug, Default)]
pub struct IssueRequest {
    pub client_id: String,
    pub scope: String,
    pub subject: Option<String>,
    pub patient: Option<String>,
    pub tenant: Option<String>,
    pub role: Option<String>,
    pub grant: Option<String>,
    pub ttl_secs: i64,
    pub issuer: String,
    pub audience: String,
    /// Seconds added to "now" for `iat`/`nbf`/`exp` (tests: negative issues an expired token).
    pub clock_offset_secs: i64,
}

pub fn issue(key: &LocalSigningKey, req: &IssueRequest) -> Result<String, crate::keys::KeyError> {
    let now = tributary_core::now_millis() / 1000 + req.clock_offset_secs;
    let mut claims = serde_json::json!({
        "iss": req.issuer,
        "aud": req.audience,
        "sub": req.subject.clone().unwrap_or_else(|| req.client_id.clone()),
        "client_id": req.client_id,
        "scope": req.scope,
        "iat": now,
        "nbf": now,
        "exp": now + req.ttl_secs,
        "jti": uuid::Uuid::now_v7().to_string(),
    });
    let obj = claims.as_object_mut().expect("object");
    for (k, v) in [
        ("patient", &req.patient),
        ("tenant", &req.tenant),
        ("role", &req.role),
        ("grant", &req.grant),
    ] {
        if let Some(v) = v {
            obj.insert(k.into(), Value::String(v.clone()));
        }
    }
    key.sign(&claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn setup() -> (tempfile::TempDir, LocalSigningKey, Authenticator) {
        let dir = tempfile::tempdir().unwrap();
        let key = LocalSigningKey::load_or_create(dir.path()).unwrap();
        let rev = Arc::new(Revocations::open(dir.path()));
        let auth = Authenticator::new(
            AuthConfig::default(),
            dir.path(),
            "default",
            Some(&key),
            rev,
        )
        .unwrap();
        (dir, key, auth)
    }

    fn req() -> IssueRequest {
        IssueRequest {
            client_id: "app".into(),
            scope: "user/*.rs".into(),
            ttl_secs: 300,
            issuer: "tributary".into(),
            audience: "tributary".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn good_token_verifies() {
        let (_d, key, auth) = setup();
        let t = issue(
            &key,
            &IssueRequest {
                patient: Some("p1".into()),
                tenant: Some("acme".into()),
                ..req()
            },
        )
        .unwrap();
        let p = auth.authenticate(&t, false).await.unwrap();
        assert_eq!(p.client_id, "app");
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.patient.as_deref(), Some("p1"));
    }

    #[tokio::test]
    async fn expired_wrong_audience_and_foreign_key_fail() {
        let (_d, key, auth) = setup();
        let expired = issue(
            &key,
            &IssueRequest {
                clock_offset_secs: -4000,
                ..req()
            },
        )
        .unwrap();
        assert!(matches!(
            auth.authenticate(&expired, false).await,
            Err(ApiError::Unauthorized(_))
        ));
        let aud = issue(
            &key,
            &IssueRequest {
                audience: "other".into(),
                ..req()
            },
        )
        .unwrap();
        assert!(matches!(
            auth.authenticate(&aud, false).await,
            Err(ApiError::Unauthorized(_))
        ));
        let other_dir = tempfile::tempdir().unwrap();
        let mut foreign = LocalSigningKey::load_or_create(other_dir.path()).unwrap();
        foreign.kid = key.kid.clone();
        let forged = issue(&foreign, &req()).unwrap();
        assert!(matches!(
            auth.authenticate(&forged, false).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(auth.authenticate("not.a.jwt", false).await.is_err());
    }

    #[tokio::test]
    async fn revoked_grant_fails_even_when_cached() {
        let (dir, key, auth) = setup();
        let t = issue(
            &key,
            &IssueRequest {
                grant: Some("consent-7".into()),
                ..req()
            },
        )
        .unwrap();
        auth.authenticate(&t, false).await.unwrap();
        crate::revocation::revoke_in_data_dir(dir.path(), None, "consent-7").unwrap();
        assert!(matches!(
            auth.authenticate(&t, false).await,
            Err(ApiError::Unauthorized(_))
        ));
    }

    /// An identity provider on loopback: `/{small,big}/jwks.json` serve `idp`'s key, the big one
    /// padded past the JWKS limit and streamed without a length; `/{small,big}/introspect`
    /// answer "active", the big one padded past the introspection limit.
    async fn identity_provider(idp: &LocalSigningKey) -> String {
        use axum::routing::{get, post};
        let jwks = json!({"keys": [idp.jwk()]});
        let padded = |mut v: Value, n: usize| {
            v["padding"] = json!("x".repeat(n));
            v.to_string()
        };
        let big_jwks = padded(jwks.clone(), MAX_JWKS_BYTES);
        let active = json!({"active": true, "client_id": "opaque-app", "scope": "user/*.rs", "aud": "tributary",
            "exp": tributary_core::now_millis() / 1000 + 600});
        let big_active = padded(active.clone(), MAX_INTROSPECTION_BYTES);
        let app = axum::Router::new()
            .route(
                "/small/jwks.json",
                get(move || async move { jwks.to_string() }),
            )
            .route(
                "/big/jwks.json",
                get(move || async move {
                    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = big_jwks
                        .into_bytes()
                        .chunks(4096)
                        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
                        .collect();
                    axum::body::Body::from_stream(futures_util::stream::iter(chunks))
                }),
            )
            .route(
                "/small/introspect",
                post(move || async move { active.to_string() }),
            )
            .route("/big/introspect", post(move || async move { big_active }));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// A key the identity provider drops from its JWKS stops being trusted at the next refresh,
    /// also for tokens verified (and cached) before.
    #[tokio::test]
    async fn a_key_rotated_out_of_the_jwks_is_no_longer_trusted() {
        use axum::routing::get;
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = LocalSigningKey::load_or_create(dir_a.path()).unwrap();
        let b = LocalSigningKey::load_or_create(dir_b.path()).unwrap();
        let served = Arc::new(Mutex::new(json!({"keys": [a.jwk(), b.jwk()]})));
        let current = served.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            get(move || {
                let current = current.clone();
                async move { current.lock().unwrap().to_string() }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            local_key: false,
            jwks_url: format!("http://{addr}/jwks.json"),
            jwks_refresh_min_secs: 0,
            ..AuthConfig::default()
        };
        let rev = Arc::new(Revocations::open(dir.path()));
        let auth = Authenticator::new(cfg, dir.path(), "default", None, rev).unwrap();
        let (ta, tb) = (issue(&a, &req()).unwrap(), issue(&b, &req()).unwrap());
        auth.authenticate(&ta, false).await.unwrap();
        auth.authenticate(&tb, false).await.unwrap();
        *served.lock().unwrap() = json!({"keys": [b.jwk()]});
        assert!(auth.refresh_jwks().await);
        assert!(matches!(
            auth.authenticate(&ta, false).await,
            Err(ApiError::Unauthorized(_))
        ));
        auth.authenticate(&tb, false).await.unwrap();
    }

    #[tokio::test]
    async fn jwks_and_introspection_answers_past_their_limit_are_not_used() {
        let idp_dir = tempfile::tempdir().unwrap();
        let idp = LocalSigningKey::load_or_create(idp_dir.path()).unwrap();
        let base = identity_provider(&idp).await;
        let token = issue(&idp, &req()).unwrap();
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "s3cret").unwrap();
        let authenticator = |size: &str| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = AuthConfig {
                local_key: false,
                jwks_url: format!("{base}/{size}/jwks.json"),
                jwks_refresh_min_secs: 0,
                introspection_url: format!("{base}/{size}/introspect"),
                introspection_client_id: "facade".into(),
                introspection_secret_file: secret.path().to_path_buf(),
                ..AuthConfig::default()
            };
            let rev = Arc::new(Revocations::open(dir.path()));
            let auth = Authenticator::new(cfg, dir.path(), "default", None, rev).unwrap();
            (dir, auth)
        };
        let (_d, small) = authenticator("small");
        small.authenticate(&token, false).await.unwrap();
        let opaque = small.authenticate("opaque-1", false).await.unwrap();
        assert_eq!(opaque.client_id, "opaque-app");

        let (_d, big) = authenticator("big");
        assert!(!big.refresh_jwks().await, "an oversized JWKS is not read");
        assert!(matches!(
            big.authenticate(&token, false).await,
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            big.authenticate("opaque-1", false).await,
            Err(ApiError::Unauthorized(_))
        ));
    }
}
