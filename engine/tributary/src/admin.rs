//! The journal on a running server: `GET /admin/journal` lists messages, `GET
//! /admin/journal/{id}` shows one (never its content) and `POST /admin/replay[?dry_run=true]`
//! queues a selection for mapping again; `POST /admin/backup` copies the data directory while it
//! serves. A running server holds the data directory, so this is how `tributary journal list`,
//! `journal show`, `replay` and `backup` reach it. Mounted behind the
//! facade's policy stack: admin role only, the token's tenant only, every call audited like any
//! other request.

use crate::selection::{self, MessageRow, ReplayReport, Selection};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tributary_core::MessageId;
use tributary_facade::policy::Access;
use tributary_facade::ApiError;
use tributary_pipeline::MappingRegistry;
use tributary_runtime::Runtime;
use tributary_storage::{Journal, ListFilter, StateRecord};

#[derive(Clone)]
struct AdminState {
    rt: Arc<Runtime>,
    /// The running mapping set, which `stale` compares with; absent when no pipeline runs.
    registry: Option<Arc<MappingRegistry>>,
    backups: Arc<Backups>,
    /// The instance's own tenant: its admins operate the instance (backups hold every tenant).
    default_tenant: String,
}

pub fn router(
    rt: Arc<Runtime>,
    registry: Option<Arc<MappingRegistry>>,
    backups: Arc<Backups>,
    default_tenant: &str,
) -> Router {
    Router::new()
        .route("/admin/journal", get(list))
        .route("/admin/journal/{id}", get(show))
        .route("/admin/replay", post(replay))
        .route("/admin/backup", post(backup))
        .with_state(AdminState {
            rt,
            registry,
            backups,
            default_tenant: default_tenant.to_string(),
        })
}

/// `GET /admin/journal` answers this; `mapping_version` is what `stale` compares with.
#[derive(Serialize, Deserialize, Debug)]
pub struct ListReply {
    #[serde(default)]
    pub mapping_version: Option<String>,
    pub messages: Vec<MessageRow>,
}

/// Most rows `GET /admin/journal` returns when the query sets no `limit`.
const DEFAULT_LIST_LIMIT: usize = 100;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayQuery {
    #[serde(default)]
    dry_run: bool,
}

impl AdminState {
    fn current_version(&self) -> Option<String> {
        self.registry.as_ref().map(|r| r.current().version.clone())
    }

    /// Journal reads off the runtime's workers: a selection may scan a long time range.
    async fn reading<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Journal) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let journal = self.rt.journal.clone();
        tokio::task::spawn_blocking(move || read(journal.as_ref()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(selection_error)
    }

    async fn select(
        &self,
        sel: Selection,
        filter: ListFilter,
    ) -> Result<Vec<(MessageId, i64, StateRecord)>, ApiError> {
        self.reading(move |j| sel.select(j, &filter)).await
    }

    /// The token's tenant replaces whatever tenant the selection names: an admin of one tenant
    /// neither sees nor replays another's messages, and ids of other tenants read as unknown.
    fn scoped(&self, mut sel: Selection, access: &Access) -> Selection {
        sel.tenant = Some(access.principal.tenant.clone());
        sel
    }
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

/// A storage failure is the server's (500); anything else is about the selection (400).
fn selection_error(e: anyhow::Error) -> ApiError {
    match e.downcast_ref::<tributary_storage::StorageError>() {
        Some(tributary_storage::StorageError::TooMany(_)) | None => bad_request(e),
        Some(_) => ApiError::Internal(e.to_string()),
    }
}

async fn list(
    State(st): State<AdminState>,
    Extension(access): Extension<Access>,
    query: Result<Query<Selection>, QueryRejection>,
) -> Result<Json<ListReply>, ApiError> {
    let Query(sel) = query.map_err(bad_request)?;
    let mut sel = st.scoped(sel, &access);
    sel.limit.get_or_insert(DEFAULT_LIST_LIMIT);
    let current = st.current_version();
    let filter = sel.filter(&[], current.as_deref()).map_err(bad_request)?;
    let selected = st.select(sel, filter).await?;
    Ok(Json(ListReply {
        mapping_version: current,
        messages: selection::rows(&selected),
    }))
}

async fn show(
    State(st): State<AdminState>,
    Extension(access): Extension<Access>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: MessageId = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a message id (UUID)")))?;
    let tenant = access.principal.tenant.clone();
    st.reading(move |j| selection::message_summary(j, id, Some(&tenant)))
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("message {id} is not in the journal")))
}

async fn replay(
    State(st): State<AdminState>,
    Extension(access): Extension<Access>,
    query: Result<Query<ReplayQuery>, QueryRejection>,
    body: Result<Json<Selection>, JsonRejection>,
) -> Result<Json<ReplayReport>, ApiError> {
    let Query(q) = query.map_err(bad_request)?;
    let Json(sel) = body.map_err(bad_request)?;
    if sel.is_unbounded() {
        return Err(ApiError::BadRequest(
            "give message ids or at least one of state, since, until, partner, type, mapped_by, stale".into(),
        ));
    }
    let sel = st.scoped(sel, &access);
    let filter = sel
        .replay_filter(st.current_version().as_deref())
        .map_err(bad_request)?;
    // A task of its own: a large replay that outlives the request timeout (which drops this
    // handler) still finishes, rather than stopping between two chunks with part queued.
    let (tenant, client) = (
        access.principal.tenant.clone(),
        access.principal.client_id.clone(),
    );
    let work = tokio::spawn(async move {
        let selected = st
            .reading(move |j| sel.select_for_replay(j, &filter))
            .await?;
        let report = selection::replay(st.rt.journal.as_ref(), selected, q.dry_run)
            .await
            .map_err(selection_error)?;
        tracing::info!(
            %tenant,
            %client,
            matched = report.matched,
            followers = report.followers,
            queued = report.queued,
            dry_run = q.dry_run,
            "replay requested through the admin API"
        );
        Ok::<_, ApiError>(report)
    });
    let report = work
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(Json(report))
}

/// `POST /admin/backup`: a consistent copy of the data directory, written while the server
/// serves to `backup.dir/tributary-<time>` (see `tributary_storage::Db::backup`). For admins of
/// the instance's default tenant only: the copy holds every tenant's data.
async fn backup(
    State(st): State<AdminState>,
    Extension(access): Extension<Access>,
) -> Result<Json<tributary_storage::BackupReport>, ApiError> {
    if access.principal.tenant != st.default_tenant {
        return Err(ApiError::Forbidden(
            "backups hold every tenant's data: an admin of the instance's default tenant starts them".into(),
        ));
    }
    if st.backups.dir.as_os_str().is_empty() {
        return Err(ApiError::Conflict(
            "online backups are off: set backup.dir in the configuration".into(),
        ));
    }
    let report = st
        .backups
        .take()
        .await
        .map_err(|e| match e {
            tributary_storage::StorageError::Io(io)
                if io.kind() == std::io::ErrorKind::InvalidInput =>
            {
                ApiError::Conflict(io.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        })?
        .ok_or_else(|| ApiError::Conflict("a backup is running already".into()))?;
    tracing::info!(
        client = %access.principal.client_id,
        entries = report.store_entries,
        bytes = report.bytes,
        millis = report.millis,
        "backup written through the admin API"
    );
    Ok(Json(report))
}

/// Online backups into `backup.dir` (`tributary_storage::Db::backup`), one at a time: asked
/// for through `POST /admin/backup`, or every `backup.every_secs`.
pub struct Backups {
    db: tributary_storage::Db,
    dir: std::path::PathBuf,
    keep: usize,
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Backups {
    pub fn new(db: tributary_storage::Db, cfg: &crate::config::BackupConfig) -> Self {
        Self {
            db,
            dir: cfg.dir.clone(),
            keep: cfg.keep,
            running: Arc::default(),
        }
    }

    /// Takes a backup into `dir/tributary-<time>` and deletes the oldest beyond `keep`;
    /// `None` when another one is running. Runs as a task of its own, like a replay: a backup
    /// that outlives the request that asked for it finishes.
    pub async fn take(
        &self,
    ) -> Result<Option<tributary_storage::BackupReport>, tributary_storage::StorageError> {
        let Ok(one) = self.running.clone().try_lock_owned() else {
            return Ok(None);
        };
        let stamp: String = tributary_core::format_rfc3339_millis(tributary_core::now_millis())
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let target = self.dir.join(format!("tributary-{stamp}"));
        let (db, dir, keep) = (self.db.clone(), self.dir.clone(), self.keep);
        let work = tokio::task::spawn_blocking(move || {
            let _one = one;
            let report = db.backup(&target)?;
            if keep > 0 {
                rotate_backups(&dir, keep);
            }
            Ok(report)
        });
        work.await
            .map_err(|e| tributary_storage::StorageError::Io(std::io::Error::other(e.to_string())))?
            .map(Some)
    }

    /// Takes a backup every `every`, until `shutdown`; a failure is logged (and the next one
    /// tried), never fatal to the server.
    pub async fn every(
        &self,
        every: std::time::Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.take().await {
                Ok(Some(r)) => tracing::info!(
                    entries = r.store_entries,
                    bytes = r.bytes,
                    millis = r.millis,
                    "scheduled backup written"
                ),
                Ok(None) => tracing::info!("scheduled backup skipped: one is running"),
                Err(e) => tracing::error!(error = %e, "scheduled backup failed"),
            }
        }
    }
}

/// Deletes the oldest of the backups in `dir` beyond the newest `keep`. Only directories this
/// server names (`tributary-<time>`) and that hold a store count; anything else there is left.
fn rotate_backups(dir: &std::path::Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut ours: Vec<std::path::PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("tributary-"))
                .is_some_and(|stamp| {
                    stamp.len() == 19 && stamp.bytes().all(|b| b.is_ascii_alphanumeric())
                })
                && p.join("keyspaces").is_dir()
        })
        .collect();
    // The names are UTC times of one width: their order is the order they were taken in.
    ours.sort();
    let excess = ours.len().saturating_sub(keep);
    for old in &ours[..excess] {
        match std::fs::remove_dir_all(old) {
            Ok(()) => tracing::info!(backup = %old.display(), "old backup deleted (backup.keep)"),
            Err(e) => {
                tracing::warn!(backup = %old.display(), error = %e, "could not delete an old backup")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Scheduled backups come at the interval, each a store of its own, and `keep` bounds how
    /// many stay.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_backups_are_taken_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let db = tributary_storage::Db::open(dir.path().join("data"), Default::default()).unwrap();
        let cfg = crate::config::BackupConfig {
            dir: dir.path().join("backups"),
            keep: 2,
            every_secs: 60,
        };
        let backups = std::sync::Arc::new(super::Backups::new(db, &cfg));
        let taken = || std::fs::read_dir(&cfg.dir).map_or(0, |e| e.count());
        let stop = tokio_util::sync::CancellationToken::new();
        let (b, s) = (backups.clone(), stop.clone());
        let task = tokio::spawn(async move {
            b.every(std::time::Duration::from_millis(100), &s).await;
        });
        tributary_runtime::test_wait::wait("a scheduled backup")
            .until_async(|| async { (taken() >= 1).then_some(()) })
            .await;
        stop.cancel();
        task.await.unwrap();
        // Asked for three more: two stay.
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            assert!(backups.take().await.unwrap().is_some());
        }
        assert_eq!(taken(), 2, "keep = 2");
        for e in std::fs::read_dir(&cfg.dir).unwrap() {
            let copy = e.unwrap().path();
            assert!(copy.join("keyspaces").is_dir() && copy.join("audit").is_dir());
        }
    }

    #[test]
    fn rotation_keeps_the_newest_backups_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "tributary-20261207T010000000Z",
            "tributary-20261207T020000000Z",
            "tributary-20261207T030000000Z",
        ];
        for n in names {
            std::fs::create_dir_all(dir.path().join(n).join("keyspaces")).unwrap();
        }
        // Not ours: a name of another shape, and one without a store.
        std::fs::create_dir_all(dir.path().join("tributary-manual").join("keyspaces")).unwrap();
        std::fs::create_dir_all(dir.path().join("tributary-20261207T000000000Z")).unwrap();
        super::rotate_backups(dir.path(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "tributary-20261207T000000000Z",
                "tributary-20261207T020000000Z",
                "tributary-20261207T030000000Z",
                "tributary-manual"
            ]
        );
    }
}
