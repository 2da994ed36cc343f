//! `journal list` and `replay` against a running `tributary serve`: that process holds the data
//! directory, so the command asks it through the admin API (see `admin.rs`) instead.

use crate::admin::ListReply;
use crate::cli::ServerArgs;
use crate::config::Config;
use crate::selection::{ReplayReport, Selection};
use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// An admin call waits this long for the server (a replay of a large selection takes a while).
const TIMEOUT: Duration = Duration::from_secs(300);
/// Lifetime of a token the command signs for itself.
const TOKEN_TTL_SECS: i64 = 120;

pub async fn list(
    config: &Config,
    server: &ServerArgs,
    sel: &Selection,
) -> anyhow::Result<ListReply> {
    if !sel.ids.is_empty() {
        bail!("a running server lists by criteria only: drop the ids, or use `tributary journal show ID`");
    }
    sel.check()?;
    let req = authorized(
        config,
        server,
        sel.tenant.as_deref(),
        "admin",
        reqwest::Method::GET,
        "/admin/journal",
    )?;
    send(req.query(sel)).await
}

pub async fn replay(
    config: &Config,
    server: &ServerArgs,
    sel: &Selection,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    sel.check()?;
    let req = authorized(
        config,
        server,
        sel.tenant.as_deref(),
        "admin",
        reqwest::Method::POST,
        "/admin/replay",
    )?;
    send(req.query(&[("dry_run", dry_run)]).json(sel)).await
}

/// `GET /admin/journal/{id}`: the message's summary, `None` when the server does not know it
/// (for the token's tenant).
pub async fn message(
    config: &Config,
    server: &ServerArgs,
    tenant: Option<&str>,
    id: tributary_core::MessageId,
) -> anyhow::Result<Option<serde_json::Value>> {
    let req = authorized(
        config,
        server,
        tenant,
        "admin",
        reqwest::Method::GET,
        &format!("/admin/journal/{id}"),
    )?;
    match send(req).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `POST /admin/backup`: the running server copies its data directory to `backup.dir`.
pub async fn backup(
    config: &Config,
    server: &ServerArgs,
) -> anyhow::Result<tributary_storage::BackupReport> {
    let req = authorized(
        config,
        server,
        None,
        "admin",
        reqwest::Method::POST,
        "/admin/backup",
    )?;
    send(req).await
}

/// The server answered 404.
#[derive(Debug, thiserror::Error)]
#[error("the server answered 404 Not Found: {0}")]
struct NotFound(String);

/// `GET /admin/mapping/report` for one tenant (the default tenant when `tenant` is `None`).
pub async fn mapping_report(
    config: &Config,
    server: &ServerArgs,
    tenant: Option<&str>,
) -> anyhow::Result<tributary_storage::FieldReport> {
    let req = authorized(
        config,
        server,
        tenant,
        "admin",
        reqwest::Method::GET,
        "/admin/mapping/report",
    )?;
    send(req).await
}

/// What `GET /admin/audit/verify` answers (200 when intact, 409 naming the first bad record).
#[derive(Deserialize, Debug)]
pub struct AuditVerdict {
    pub intact: bool,
    pub entries: Option<u64>,
    pub head_hash: Option<String>,
    pub first_bad_record: Option<u64>,
    pub reason: Option<String>,
}

/// The running server walks its audit chain; the answer is the same either way it ends.
pub async fn audit_verify(config: &Config, server: &ServerArgs) -> anyhow::Result<AuditVerdict> {
    let req = authorized(
        config,
        server,
        None,
        "audit",
        reqwest::Method::GET,
        "/admin/audit/verify",
    )?;
    let (status, body) = exchange(req).await?;
    if status.is_success() || status == reqwest::StatusCode::CONFLICT {
        return serde_json::from_slice(&body)
            .context("the server's answer is not what this version expects");
    }
    bail!("the server answered {status}: {}", diagnostics(&body))
}

/// A request to the running server's `path` with a token of `role` for `tenant` (the default
/// tenant when `None`): the server answers for the token's tenant only. The audit trail is
/// the audit role's; everything else here is the admin role's.
fn authorized(
    config: &Config,
    server: &ServerArgs,
    tenant: Option<&str>,
    role: &str,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<reqwest::RequestBuilder> {
    let base = match &server.server {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if config.http.tls.is_some() => bail!(
            "the data directory is held by a running server that listens with TLS: pass --server https://HOST:PORT (and --cacert when its CA is not a system root)"
        ),
        None => {
            let addr: SocketAddr = config
                .http
                .listen
                .parse()
                .with_context(|| format!("http.listen {:?}", config.http.listen))?;
            let ip = if addr.ip().is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                addr.ip()
            };
            format!("http://{}", SocketAddr::new(ip, addr.port()))
        }
    };
    let token = match &server.token {
        Some(t) => t.clone(),
        None => local_token(config, tenant, role)?,
    };
    let mut client = reqwest::Client::builder().timeout(TIMEOUT);
    if let Some(path) = &server.cacert {
        let pem = std::fs::read(path).with_context(|| format!("--cacert {}", path.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("--cacert {}: not a PEM certificate", path.display()))?;
        client = client.add_root_certificate(ca);
    }
    let client = client.build().context("building the HTTP client")?;
    Ok(client
        .request(method, format!("{base}{path}"))
        .bearer_auth(token))
}

fn local_token(config: &Config, tenant: Option<&str>, role: &str) -> anyhow::Result<String> {
    let auth = &config.facade.auth;
    if !auth.local_key {
        bail!("the data directory is held by a running server: pass --token with an {role}-role token from your identity provider (facade.auth.local_key is off)");
    }
    let key = tributary_facade::LocalSigningKey::load_or_create(&config.data_dir)?;
    let req = tributary_facade::IssueRequest {
        client_id: "tributary-cli".into(),
        scope: String::new(),
        subject: None,
        patient: None,
        tenant: Some(tenant.unwrap_or(&config.default_tenant).to_string()),
        role: Some(role.into()),
        grant: None,
        ttl_secs: TOKEN_TTL_SECS,
        issuer: auth.issuers[0].clone(),
        audience: auth.audiences[0].clone(),
        clock_offset_secs: 0,
    };
    Ok(tributary_facade::auth::issue(&key, &req)?)
}

async fn exchange(
    req: reqwest::RequestBuilder,
) -> anyhow::Result<(reqwest::StatusCode, bytes::Bytes)> {
    let res = req
        .send()
        .await
        .context("the data directory is held by a running server, which did not answer")?;
    let status = res.status();
    let body = res.bytes().await.context("reading the server's answer")?;
    Ok((status, body))
}

async fn send<T: DeserializeOwned>(req: reqwest::RequestBuilder) -> anyhow::Result<T> {
    let (status, body) = exchange(req).await?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(NotFound(diagnostics(&body)).into());
    }
    if !status.is_success() {
        bail!("the server answered {status}: {}", diagnostics(&body));
    }
    serde_json::from_slice(&body).context("the server's answer is not what this version expects")
}

/// The OperationOutcome's diagnostics, or the body as text.
fn diagnostics(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let issues = v.get("issue")?.as_array()?.clone();
            let texts: Vec<String> = issues
                .iter()
                .filter_map(|i| i.get("diagnostics")?.as_str().map(str::to_string))
                .collect();
            (!texts.is_empty()).then(|| texts.join("; "))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect())
}
