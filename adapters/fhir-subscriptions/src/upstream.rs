//! Subscriptions in: reading the resources of `id-only` notifications from the partner's FHIR
//! server, with an OAuth2 client-credentials token that is reused until shortly before it
//! expires (partners' token endpoints are rate limited; one token request per notification
//! would be refused at volume).

use crate::config::InboundPartner;
use axum::http::StatusCode;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tributary_runtime::http::{read_json_limited, read_limited, BodyError};

/// A token endpoint's answer larger than this is not read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 << 10;
/// Id-only entries completed from the partner's server for one notification, at most.
const MAX_FETCHES: usize = 100;
/// The resources read for one notification, together, at most (a DocumentReference or Binary
/// can carry a whole document).
const MAX_FETCHED_BYTES: usize = 32 << 20;
/// How long a token whose answer gives no `expires_in` is reused.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest a token is reused, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Why id-only entries could not be completed.
pub(crate) enum FetchError {
    /// The notification itself is unacceptable (a focus outside the partner's server, one the
    /// server says it does not hold, too much to read): 400, and the body is kept as rejected.
    /// A retry would fail the same way.
    Refused(String),
    /// The partner's server could not answer now: 503, so the sender retries.
    Transient(String),
}

struct CachedToken {
    token: String,
    renew_at: Instant,
}

/// Access tokens per partner, each renewed at nine tenths of its lifetime or when the partner's
/// server refuses it.
#[derive(Default)]
pub(crate) struct UpstreamTokens(Mutex<HashMap<String, CachedToken>>);

impl UpstreamTokens {
    async fn get(
        &self,
        http: &reqwest::Client,
        p: &InboundPartner,
    ) -> Result<Option<String>, String> {
        let Some(url) = &p.token_url else {
            return Ok(None);
        };
        if let Some(c) = self.lock().get(&p.partner) {
            if Instant::now() < c.renew_at {
                return Ok(Some(c.token.clone()));
            }
        }
        let (token, lifetime) = request_token(http, url, p).await?;
        self.lock().insert(
            p.partner.clone(),
            CachedToken {
                token: token.clone(),
                renew_at: Instant::now() + lifetime * 9 / 10,
            },
        );
        Ok(Some(token))
    }

    /// Drops `token` if it is still the one held for the partner (a concurrent renewal wins).
    fn forget(&self, partner: &str, token: &str) {
        let mut map = self.lock();
        if map.get(partner).is_some_and(|c| c.token == token) {
            map.remove(partner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedToken>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One client-credentials grant: the access token and how long it may be used.
async fn request_token(
    http: &reqwest::Client,
    url: &str,
    p: &InboundPartner,
) -> Result<(String, Duration), String> {
    let mut form = vec![("grant_type", "client_credentials".to_string())];
    if let Some(s) = &p.scope {
        form.push(("scope", s.clone()));
    }
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
        .collect::<Vec<_>>()
        .join("&");
    let r = http
        .post(url)
        .basic_auth(
            p.client_id.as_deref().unwrap_or_default(),
            p.client_secret.as_deref(),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|_| "token endpoint unreachable".to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "token endpoint answered HTTP {}",
            r.status().as_u16()
        ));
    }
    let v = read_json_limited(r, MAX_TOKEN_RESPONSE_BYTES)
        .await
        .map_err(|e| format!("token endpoint answer not read: {e}"))?
        .ok_or_else(|| "token endpoint answered no JSON".to_string())?;
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .ok_or_else(|| "token response has no access_token".to_string())?;
    // RFC 6749 §5.1 makes `expires_in` a number; some servers send it as a string.
    let lifetime = match v.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
    .min(MAX_TOKEN_LIFETIME);
    Ok((token.to_string(), lifetime))
}

/// `Type/id` or `Type/id/_history/vid`: the only shapes of focus reference that are read.
fn is_resource_path(path: &str) -> bool {
    let id = |s: &str| tributary_core::valid_fhir_id(s) && s != "." && s != "..";
    let parts: Vec<&str> = path.split('/').collect();
    let rtype_ok = tributary_core::valid_fhir_type(parts[0]);
    rtype_ok
        && match parts[1..] {
            [i] => id(i),
            [i, "_history", v] => id(i) && id(v),
            _ => false,
        }
}

/// What a read's error status means for the notification. The partner's server saying the
/// resource is not there (404, 410) or the request is wrong (other 4xx) will not change on a
/// retry; refused credentials (401, 403 — after one renewal), overload (408, 429), redirects
/// (not followed: the base URL needs fixing) and server errors may.
fn read_failure(status: StatusCode) -> FetchError {
    let code = status.as_u16();
    match code {
        404 | 410 => FetchError::Refused(format!(
            "the partner's server does not hold a focus resource (read answered HTTP {code})"
        )),
        401 | 403 => FetchError::Transient(format!(
            "the partner's server refused our credentials (read answered HTTP {code})"
        )),
        408 | 429 => FetchError::Transient(format!("upstream read answered HTTP {code}")),
        400..=499 => FetchError::Refused(format!(
            "the partner's server refused to read a focus resource (HTTP {code})"
        )),
        _ => FetchError::Transient(format!("upstream read answered HTTP {code}")),
    }
}

/// Fills `resource` into id-only entries by reading them from the partner's server. Only
/// `Type/id[/_history/vid]` references under `upstream_base_url` are fetched (never an
/// arbitrary URL, nor a path that climbs out of the base with `..`).
pub(crate) async fn fetch_resources(
    http: &reqwest::Client,
    tokens: &UpstreamTokens,
    p: &InboundPartner,
    bundle: &mut Value,
) -> Result<usize, FetchError> {
    let Some(base) = p
        .upstream_base_url
        .as_deref()
        .map(|b| b.trim_end_matches('/'))
    else {
        return Ok(0);
    };
    let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) else {
        return Ok(0);
    };
    // Every reference is checked before anything is fetched: a bad one refuses the whole
    // notification, whatever the others hold.
    let prefix = format!("{base}/");
    let mut targets = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.get("resource").is_some()
            || e.pointer("/request/method").and_then(Value::as_str) == Some("DELETE")
        {
            continue;
        }
        let Some(url) = e.get("fullUrl").and_then(Value::as_str) else {
            continue;
        };
        let path = if url.starts_with("http://") || url.starts_with("https://") {
            url.strip_prefix(&prefix)
        } else {
            Some(url.trim_start_matches('/'))
        };
        match path {
            Some(path) if is_resource_path(path) => targets.push((i, format!("{prefix}{path}"))),
            _ => {
                return Err(FetchError::Refused(
                    "a focus reference is not a resource URL under the partner's base URL".into(),
                ))
            }
        }
    }
    if targets.is_empty() {
        return Ok(0);
    }
    if targets.len() > MAX_FETCHES {
        return Err(FetchError::Refused(format!(
            "the notification names {} resources to read; at most {MAX_FETCHES} are read for one notification",
            targets.len()
        )));
    }
    let mut token = tokens.get(http, p).await.map_err(FetchError::Transient)?;
    let mut budget = MAX_FETCHED_BYTES;
    for (i, target) in &targets {
        let mut renewed = false;
        let r = loop {
            let mut req = http.get(target).header("accept", "application/fhir+json");
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let r = req
                .send()
                .await
                .map_err(|_| FetchError::Transient("upstream server unreachable".into()))?;
            // A token revoked or expired early: one renewal, then the status stands.
            if r.status() == StatusCode::UNAUTHORIZED && !renewed {
                if let Some(old) = token.take() {
                    tokens.forget(&p.partner, &old);
                    token = tokens.get(http, p).await.map_err(FetchError::Transient)?;
                    renewed = true;
                    continue;
                }
            }
            break r;
        };
        if !r.status().is_success() {
            return Err(read_failure(r.status()));
        }
        let body = match read_limited(r, budget).await {
            Ok(b) => b,
            Err(BodyError::TooLarge { .. }) => {
                return Err(FetchError::Refused(format!(
                    "the resources to read for this notification exceed {MAX_FETCHED_BYTES} bytes"
                )))
            }
            Err(BodyError::Failed(_)) => {
                return Err(FetchError::Transient(
                    "upstream read broke off or timed out".into(),
                ))
            }
        };
        budget -= body.len();
        let res: Value = serde_json::from_slice(&body)
            .map_err(|_| FetchError::Transient("upstream read answered no JSON".into()))?;
        entries[*i]["resource"] = res;
    }
    Ok(targets.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_statuses_that_a_retry_cannot_change_refuse_the_notification() {
        for code in [400, 404, 405, 410, 422] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(matches!(read_failure(s), FetchError::Refused(_)), "{code}");
        }
        for code in [301, 307, 401, 403, 408, 429, 500, 502, 503] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(read_failure(s), FetchError::Transient(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn only_type_id_and_history_paths_are_read() {
        for ok in ["Encounter/e-1", "Patient/p.1/_history/3"] {
            assert!(is_resource_path(ok), "{ok}");
        }
        for bad in [
            "encounter/e-1",
            "Encounter/..",
            "Encounter/e-1/../../token",
            "Encounter/e-1?_format=xml",
            "Encounter",
            "Encounter/e-1/_history",
        ] {
            assert!(!is_resource_path(bad), "{bad}");
        }
    }
}
