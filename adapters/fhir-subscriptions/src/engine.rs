//! Delivery: one worker per active Subscription, each with its own durable outbox cursor
//! (`sub:<tenant>/<id>`), so a subscriber whose endpoint is down holds back nobody else and
//! resumes exactly where it stopped — after an outage or a restart.
//!
//! Per Subscription: handshake (status `requested` → `active`), then event-notification
//! Bundles in outbox order (at most `max_count` events each), heartbeats when idle, retries with
//! exponential backoff, and after `give_up_after_secs` the events are dead-lettered, the status
//! becomes `error` (with the reason in `Subscription.error`) and delivery moves on. Event numbers
//! count matching events from the subscription's start; the worker records each number (number
//! → outbox seq) with its cursor, so `$status` and `$events` read them instead of rescanning
//! the outbox, and outbox retention may prune what every active subscription has delivered.

use crate::bundle::{self, NotificationType, NumberedEvent, StatusInfo};
use crate::config::SubscriptionsConfig;
use crate::model::{Change, ChannelType, SubscriptionSpec};
use crate::ws::{Binding, BindingTokens, WsClient};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tributary_runtime::{ComponentStatus, Readiness};
use tributary_storage::{
    AuditLog, Db, DeadLetterLog, Numbering, Outbox, OutboxEvent, Precondition, ResourceWrite,
    Store, StoreTransaction, WriteOp,
};

/// A notification that could not be delivered before the give-up time. Kept durably in the
/// store's dead-letter keyspace (relay `subscriptions`), so it survives restarts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub tenant: String,
    pub subscription: String,
    pub event_numbers: Vec<u64>,
    pub event_ids: Vec<String>,
    /// HTTP status or transport error kind; never a payload.
    pub reason: String,
    pub at: String,
}

/// What `$status` and the operators see of one subscription.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SubState {
    pub status: String,
    pub events_since_start: u64,
    pub error: Option<String>,
    pub delivered_notifications: u64,
    pub failed_attempts: u64,
    pub heartbeats: u64,
}

/// What `$events` found for a range of event numbers.
#[derive(Debug, Default)]
pub(crate) struct EventsPage {
    /// Events numbered so far (including those only scanned for this answer).
    pub total: u64,
    pub events: Vec<(u64, OutboxEvent)>,
    /// The first and last requested number whose event is past the outbox retention.
    pub pruned: Option<(u64, u64)>,
}

struct SubHandle {
    spec: RwLock<SubscriptionSpec>,
    state: Mutex<SubState>,
    cancel: CancellationToken,
    changed: Notify,
    /// Websocket channel: the bound connections.
    clients: Mutex<Vec<WsClient>>,
}

impl SubHandle {
    fn new(spec: SubscriptionSpec, cancel: CancellationToken) -> Self {
        Self {
            spec: RwLock::new(spec),
            state: Mutex::new(SubState::default()),
            cancel,
            changed: Notify::new(),
            clients: Mutex::default(),
        }
    }

    /// Queues `text` for every bound websocket client; a client whose queue is full is
    /// disconnected (too slow), not waited for. Returns how many clients got it.
    fn broadcast(&self, text: &str) -> usize {
        let Ok(mut clients) = self.clients.lock() else {
            return 0;
        };
        clients.retain(|c| match c.tx.try_send(text.to_string()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::info!(client = c.id, "websocket client too slow; disconnecting");
                c.slow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        clients.len()
    }
}

/// Shared by the delivery workers and the HTTP operations (`$status`, `$events`).
pub struct SubscriptionService {
    pub(crate) cfg: SubscriptionsConfig,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) default_tenant: String,
    pub(crate) http: reqwest::Client,
    /// For rest-hook notifications: public addresses only unless `allow_private_endpoints`.
    notify: reqwest::Client,
    /// Access tokens for reading from inbound partners' servers.
    pub(crate) upstream_tokens: crate::upstream::UpstreamTokens,
    subs: RwLock<HashMap<(String, String), Arc<SubHandle>>>,
    dead_letters: DeadLetterLog,
    /// Outstanding `$get-ws-binding-token` tokens.
    pub(crate) ws_tokens: BindingTokens,
    /// One permit per open websocket connection (`ws_max_connections`).
    pub(crate) ws_slots: Arc<tokio::sync::Semaphore>,
    /// Websocket binds and closes are audited (they open a stream of resources).
    audit: AuditLog,
    next_client: AtomicU64,
    /// The outbox head when the last completed rescan began (0: none yet), for retention.
    rescanned_head: AtomicU64,
    /// Cancelled when [`SubscriptionService::run`] stops: websocket connections close.
    pub(crate) shutdown: CancellationToken,
    /// Whether a grant or token id is revoked for a tenant (consent revocation, kept by the
    /// facade); unset: nothing is.
    revoked: std::sync::OnceLock<RevocationCheck>,
}

/// `(tenant, grant or token id) -> revoked?`
pub type RevocationCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

const MAX_DEAD_LETTERS: usize = 10_000;
/// `Subscription.error` of one switched off because its authorization was revoked.
const REVOKED: &str = "the authorization this Subscription was created under was revoked";
/// How `Subscription.error` starts when the endpoint did not answer the handshake.
const HANDSHAKE_FAILED: &str = "handshake failed";
/// Most websocket connections bound to one subscription at once.
pub(crate) const MAX_WS_PER_SUBSCRIPTION: usize = 16;

/// The first incarnation keeps the names it always had, so existing delivery state stays valid.
fn incarnation_key(spec: &SubscriptionSpec) -> String {
    match spec.incarnation {
        0 | 1 => format!("{}/{}", spec.tenant, spec.id),
        n => format!("{}/{}@{n}", spec.tenant, spec.id),
    }
}

impl SubscriptionService {
    /// `db`: the data directory's database, where dead letters are kept.
    pub fn new(
        cfg: SubscriptionsConfig,
        store: Arc<dyn Store>,
        db: Db,
        default_tenant: &str,
    ) -> Result<Arc<Self>, crate::SubscriptionsConfigError> {
        let http = cfg.http_client()?;
        let notify = cfg.notification_client()?;
        let ws_slots = Arc::new(tokio::sync::Semaphore::new(cfg.ws_max_connections));
        Ok(Arc::new(Self {
            cfg,
            store,
            default_tenant: default_tenant.to_string(),
            http,
            notify,
            upstream_tokens: Default::default(),
            subs: RwLock::default(),
            dead_letters: DeadLetterLog::new(db.clone(), "subscriptions", MAX_DEAD_LETTERS),
            audit: AuditLog::new(db),
            ws_tokens: BindingTokens::default(),
            ws_slots,
            next_client: AtomicU64::new(1),
            rescanned_head: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            revoked: std::sync::OnceLock::new(),
        }))
    }

    /// Delivery of a Subscription stops (status `off`) once the consent or token it was
    /// created under is revoked, as the token itself stops working. Set once, at start.
    pub fn set_revocation_check(&self, check: RevocationCheck) {
        let _ = self.revoked.set(check);
    }

    /// Switches the Subscription off when its authorization was revoked; `true` then.
    async fn stop_if_revoked(&self, h: &SubHandle, spec: &SubscriptionSpec) -> bool {
        let revoked = self
            .revoked
            .get()
            .is_some_and(|f| spec.grants.iter().any(|g| f(&spec.tenant, g)));
        if revoked {
            tracing::info!(subscription = %spec.id, tenant = %spec.tenant, "subscription's authorization revoked; delivery stopped");
            self.set_status(h, "off", Some(REVOKED)).await;
        }
        revoked
    }

    pub fn tenants(&self) -> Vec<String> {
        if self.cfg.tenants.is_empty() {
            vec![self.default_tenant.clone()]
        } else {
            self.cfg.tenants.clone()
        }
    }

    /// The dead letters kept (oldest first, at most 10,000).
    pub fn dead_letters(&self) -> tributary_storage::Result<Vec<DeadLetter>> {
        Ok(self
            .dead_letters
            .list()?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect())
    }

    pub fn state(&self, tenant: &str, id: &str) -> Option<(SubscriptionSpec, SubState)> {
        let subs = self.subs.read().ok()?;
        let h = subs.get(&(tenant.to_string(), id.to_string()))?;
        let spec = h.spec.read().ok()?.clone();
        let state = h.state.lock().ok()?.clone();
        Some((spec, state))
    }

    fn start_name(spec: &SubscriptionSpec) -> String {
        format!("substart:{}", incarnation_key(spec))
    }

    fn cursor_name(spec: &SubscriptionSpec) -> String {
        format!("sub:{}", incarnation_key(spec))
    }

    /// See [`SubscriptionSpec::incarnation`]: read from the history when the current version
    /// is not the first (deletions are versions too).
    pub(crate) fn incarnation(
        &self,
        tenant: &str,
        id: &str,
        version: u64,
    ) -> tributary_storage::Result<u64> {
        if version <= 1 {
            return Ok(1);
        }
        let history = self.store.history(tenant, "Subscription", id)?;
        Ok(history
            .iter()
            .find(|r| r.deleted && r.version < version)
            .map_or(1, |r| r.version + 1))
    }

    /// The outbox position of a Subscription's creation event, for one first seen without it
    /// (the periodic rescan found it before the change notice did, more events arrived at once
    /// than a notice reads, or it was created just before a crash). Found by its version 1's
    /// time: the lowest position not older than that (less a clock slack — commits stamp their
    /// time before they are ordered), then forward to the creation event itself. Where that
    /// cannot be found, the earlier position: a few older matching events are delivered rather
    /// than any later one missed. `head` when nothing tells.
    fn creation_seq(&self, spec: &SubscriptionSpec, head: u64) -> tributary_storage::Result<u64> {
        const CLOCK_SLACK_MS: i64 = 5_000;
        const SCAN_MAX: u64 = 100_000;
        let (tenant, id, created) = (spec.tenant.as_str(), spec.id.as_str(), spec.incarnation);
        let outbox = self.store.outbox();
        if outbox.cursor(&Self::start_name(spec))? != 0 {
            return Ok(head); // recorded already: start_seq ignores this
        }
        let Some(v1) = self.store.vread(tenant, "Subscription", id, created)? else {
            return Ok(head);
        };
        let from_ms = v1.last_updated.saturating_sub(CLOCK_SLACK_MS);
        // Pruned positions (the front of the outbox) count as older.
        let (mut lo, mut hi) = (1u64, head.saturating_add(1));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let older = outbox.event(mid)?.is_none_or(|e| e.occurred_at < from_ms);
            if older {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let start = lo.saturating_sub(1);
        let mut at = start;
        while at < head && at - start < SCAN_MAX {
            let batch = outbox.read_after(at, 1000)?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            if let Some(e) = batch.iter().find(|e| {
                e.version == Some(created)
                    && e.tenant == tenant
                    && e.resource_type.as_deref() == Some("Subscription")
                    && e.resource_id.as_deref() == Some(id)
            }) {
                return Ok(e.seq);
            }
            at = last;
        }
        Ok(start)
    }

    /// The outbox position a subscription starts after (its own creation), recorded durably
    /// the first time it is seen.
    async fn start_seq(
        &self,
        spec: &SubscriptionSpec,
        seen_at: u64,
    ) -> tributary_storage::Result<u64> {
        let outbox = self.store.outbox();
        let name = Self::start_name(spec);
        match outbox.cursor(&name)? {
            0 => {
                let s = seen_at.max(1);
                outbox.ack(&name, s).await?;
                Ok(s)
            }
            s => Ok(s),
        }
    }

    /// Does `ev` match `spec`? Reads the previous version only for topics that need it.
    /// The next events after `cursor` that `spec` matches, at most one notification's worth,
    /// and the last outbox position looked at (so a cursor can skip what did not match).
    fn next_batch(
        &self,
        spec: &SubscriptionSpec,
        outbox: &Outbox,
        cursor: u64,
    ) -> tributary_storage::Result<(Vec<OutboxEvent>, u64)> {
        let max = spec
            .max_count
            .unwrap_or(usize::MAX)
            .min(self.cfg.max_events_per_notification)
            .max(1);
        let mut matched = Vec::new();
        let mut scanned = cursor;
        for ev in outbox.read_after(cursor, 512)? {
            scanned = ev.seq;
            if self.matches(spec, &ev) {
                matched.push(ev);
                if matched.len() >= max {
                    break;
                }
            }
        }
        Ok((matched, scanned))
    }

    pub(crate) fn matches(&self, spec: &SubscriptionSpec, ev: &OutboxEvent) -> bool {
        if ev.tenant != spec.tenant || ev.resource_type.is_none() {
            return false;
        }
        let previous = if spec.topic().needs_previous() {
            match (&ev.resource_type, &ev.resource_id, ev.version) {
                (Some(t), Some(id), Some(v)) if v > 1 => self
                    .store
                    .vread(&ev.tenant, t, id, v - 1)
                    .ok()
                    .flatten()
                    .and_then(|r| r.resource().ok()),
                _ => None,
            }
        } else {
            None
        };
        spec.matches(&Change {
            event: ev,
            previous: previous.as_ref(),
        })
    }

    /// Matching events after outbox position `after`, numbered from `count + 1`, up to event
    /// number `until`, scanning at most up to outbox position `upto`. Returns the last number
    /// given and the events numbered `since..=until` (at most `limit`). Writes nothing.
    #[allow(clippy::too_many_arguments)]
    fn scan_numbered(
        &self,
        spec: &SubscriptionSpec,
        after: u64,
        count: u64,
        upto: u64,
        since_number: u64,
        until_number: u64,
        limit: usize,
    ) -> tributary_storage::Result<(u64, Vec<(u64, OutboxEvent)>)> {
        let mut after = after;
        let mut n = count;
        let mut out = Vec::new();
        loop {
            let batch = self.store.outbox().read_after(after, 1024)?;
            if batch.is_empty() {
                break;
            }
            for ev in batch {
                if ev.seq > upto {
                    return Ok((n, out));
                }
                after = ev.seq;
                if self.matches(spec, &ev) {
                    n += 1;
                    if n >= since_number && n <= until_number && out.len() < limit {
                        out.push((n, ev));
                    }
                }
            }
        }
        Ok((n, out))
    }

    /// The subscription's numbering record, created on its worker's first start: for a
    /// subscription that delivered before numbers were recorded, the matches between its start
    /// and its cursor are numbered once here (the last full rescan it ever needs).
    async fn init_numbering(
        &self,
        spec: &SubscriptionSpec,
        name: &str,
        start: u64,
        cursor: u64,
    ) -> tributary_storage::Result<Numbering> {
        let outbox = self.store.outbox();
        let known = outbox.numbering(name)?;
        let from = known.map_or(start, |n| n.through.max(start));
        if known.is_some() && from >= cursor {
            return Ok(known.unwrap_or_default());
        }
        let mut after = from;
        loop {
            let batch = outbox.read_after(after, 1024)?;
            let mut matched = Vec::new();
            let mut last = after;
            for ev in batch.iter().take_while(|e| e.seq <= cursor) {
                last = ev.seq;
                if self.matches(spec, ev) {
                    matched.push(ev.seq);
                }
            }
            let done = last == after || last >= cursor;
            let through = if done { cursor.max(last) } else { last };
            let numbering = outbox.advance_numbered(name, through, matched).await?;
            if done {
                return Ok(numbering);
            }
            after = last;
        }
    }

    /// Events numbered `since..=until` (at most `limit`): from the subscription's numbering
    /// index for what its worker has numbered, by scanning on from the worker's position for
    /// later numbers (without recording them).
    pub(crate) fn events_page(
        &self,
        spec: &SubscriptionSpec,
        start: u64,
        since: u64,
        until: u64,
        limit: usize,
    ) -> tributary_storage::Result<EventsPage> {
        let outbox = self.store.outbox();
        let name = Self::cursor_name(spec);
        let head = outbox.head();
        let Some(n) = outbox.numbering(&name)? else {
            // The worker has not started yet: nothing is numbered (or pruned) so far.
            let (total, events) = self.scan_numbered(spec, start, 0, head, since, until, limit)?;
            return Ok(EventsPage {
                total,
                events,
                pruned: None,
            });
        };
        let mut page = EventsPage {
            total: n.count,
            events: Vec::new(),
            pruned: None,
        };
        if since <= n.count {
            let last = until.min(n.count);
            let mut want = since;
            for (number, seq) in outbox.numbered_seqs(&name, since, last, limit)? {
                match outbox.event(seq)? {
                    Some(ev) => {
                        if number > want && page.events.is_empty() {
                            page.pruned = Some((since, number - 1));
                        }
                        page.events.push((number, ev));
                    }
                    None => page.pruned = Some((since, number)),
                }
                want = number + 1;
            }
            if page.events.is_empty() && want <= last {
                // Every indexed number in the range is gone.
                page.pruned = Some((since, last));
            }
        }
        if until > n.count && page.events.len() < limit {
            let (total, more) = self.scan_numbered(
                spec,
                n.through,
                n.count,
                head,
                since,
                until,
                limit - page.events.len(),
            )?;
            page.total = total;
            page.events.extend(more);
        }
        Ok(page)
    }

    /// Records delivery through outbox position `through` and the numbers of `matched` (one
    /// atomic write with the cursor), and takes the count from that record.
    async fn advance(
        &self,
        h: &SubHandle,
        name: &str,
        through: u64,
        matched: &[OutboxEvent],
    ) -> tributary_storage::Result<()> {
        let seqs = matched.iter().map(|e| e.seq).collect();
        let n = self
            .store
            .outbox()
            .advance_numbered(name, through, seqs)
            .await?;
        if let Ok(mut st) = h.state.lock() {
            if st.events_since_start != n.count {
                tracing::warn!(cursor = %name, notified = st.events_since_start, recorded = n.count, "event numbering disagreed with the record; using the record");
            }
            st.events_since_start = n.count;
        }
        Ok(())
    }

    /// Event numbers given so far (0 before the worker first ran).
    pub(crate) fn numbered_count(&self, spec: &SubscriptionSpec) -> u64 {
        self.store
            .outbox()
            .numbering(&Self::cursor_name(spec))
            .ok()
            .flatten()
            .map_or(0, |n| n.count)
    }

    /// `eventsSinceSubscriptionStart` as `$status` reports it: the events numbered so far plus
    /// those matching since the worker's position (committed, not yet delivered) — a client
    /// whose endpoint is down still sees the count grow. Scans only the undelivered backlog.
    pub(crate) fn events_since_start(&self, spec: &SubscriptionSpec) -> u64 {
        let recorded = self.numbered_count(spec);
        match self.start_of(spec) {
            Ok(start) if start > 0 => self
                .events_page(spec, start, u64::MAX, u64::MAX, 1)
                .map_or(recorded, |p| p.total.max(recorded)),
            _ => recorded,
        }
    }

    /// The outbox position every active subscription has delivered through: events at or
    /// before it are no longer needed by Subscriptions (`None` until the first rescan, while
    /// it is not yet known which subscriptions are active). Deleted, `off` and ended
    /// subscriptions hold nothing back; events they would have matched may be pruned meanwhile.
    pub fn retention_floor(&self) -> tributary_storage::Result<Option<u64>> {
        // A subscription created after the last rescan started needs only later events.
        let mut floor = self.rescanned_head.load(Ordering::Acquire);
        if floor == 0 {
            return Ok(None);
        }
        let names: Vec<String> = self
            .subs
            .read()
            .expect("subs")
            .values()
            .filter_map(|h| h.spec.read().ok().map(|s| Self::cursor_name(&s)))
            .collect();
        for name in names {
            floor = floor.min(self.store.outbox().cursor(&name)?);
        }
        Ok(Some(floor))
    }

    pub(crate) fn start_of(&self, spec: &SubscriptionSpec) -> tributary_storage::Result<u64> {
        self.store.outbox().cursor(&Self::start_name(spec))
    }

    async fn dead_letter(&self, d: DeadLetter) -> tributary_storage::Result<()> {
        tracing::warn!(subscription = %d.subscription, tenant = %d.tenant, events = d.event_ids.len(), reason = %d.reason, "subscription notification dead-lettered");
        let v = serde_json::to_value(&d).expect("a DeadLetter serializes");
        self.dead_letters.append(&v).await
    }

    /// Writes `status` (and `error`) back into the stored Subscription, if it changed.
    async fn set_status(&self, h: &SubHandle, status: &str, error: Option<&str>) {
        let (tenant, id) = {
            let spec = h.spec.read().expect("spec lock");
            (spec.tenant.clone(), spec.id.clone())
        };
        if let Ok(mut st) = h.state.lock() {
            st.status = status.to_string();
            st.error = error.map(str::to_string);
        }
        let Ok(Some(cur)) = self.store.read(&tenant, "Subscription", &id) else {
            return;
        };
        if cur.deleted {
            return;
        }
        let Ok(mut body) = cur.resource() else { return };
        let same_status = body.get("status").and_then(Value::as_str) == Some(status);
        let same_error = body.get("error").and_then(Value::as_str) == error;
        if same_status && same_error {
            return;
        }
        body["status"] = Value::String(status.into());
        match error {
            Some(e) => body["error"] = Value::String(e.into()),
            None => {
                if let Some(o) = body.as_object_mut() {
                    o.remove("error");
                }
            }
        }
        let tx = StoreTransaction {
            tenant: tenant.clone(),
            writes: vec![ResourceWrite {
                resource_type: "Subscription".into(),
                id: id.clone(),
                op: WriteOp::Upsert(body),
                precondition: Precondition::VersionMatch(cur.version),
            }],
            ..Default::default()
        };
        match self.store.commit(tx).await {
            Ok(_) => {
                tracing::info!(subscription = %id, %tenant, status, "subscription status changed")
            }
            Err(e) => {
                tracing::warn!(subscription = %id, %tenant, error = %e, "could not record subscription status")
            }
        }
    }

    /// One POST of a Bundle to the subscriber; `Err` holds a PHI-free reason.
    async fn post(&self, spec: &SubscriptionSpec, body: &Value) -> Result<(), String> {
        let timeout = spec
            .timeout_secs
            .map(|s| Duration::from_secs(s.max(1)))
            .unwrap_or(Duration::from_millis(self.cfg.request_timeout_ms))
            .min(Duration::from_millis(self.cfg.request_timeout_ms));
        if !self.cfg.allow_private_endpoints
            && crate::netpolicy::literal_ip(&spec.endpoint)
                .is_some_and(|ip| !crate::netpolicy::is_public(ip))
        {
            return Err(
                "endpoint address is not public (see [subscriptions] allow_private_endpoints)"
                    .into(),
            );
        }
        let mut req = self
            .notify
            .post(&spec.endpoint)
            .timeout(timeout)
            .header("content-type", "application/fhir+json")
            .json(body);
        for (k, v) in &spec.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("endpoint answered HTTP {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err("endpoint timed out".into()),
            Err(e) if e.is_connect() => Err("endpoint refused or unreachable".into()),
            Err(_) => Err("endpoint request failed".into()),
        }
    }

    /// Posts `body` (built under `built`) with retries until success (`Ok(true)`), give-up
    /// (`Err(reason)`), cancellation, or a change of the Subscription while retrying (both
    /// `Ok(false)`: not sent; a changed one is rebuilt under its new spec, so a new endpoint
    /// never gets a body made for the old one's filters and payload). While the Subscription is
    /// in `error` (an earlier notification was given up), a notification gets one round of
    /// retries, not the whole give-up time: an endpoint that is gone for good must not hold
    /// every later event for `give_up_after_secs` each.
    async fn post_with_retries(
        &self,
        h: &SubHandle,
        built: &SubscriptionSpec,
        body: &Value,
    ) -> Result<bool, String> {
        let began = Instant::now();
        let failing = h.state.lock().is_ok_and(|s| s.status == "error");
        let give_up = if failing {
            Duration::from_millis(self.cfg.retry_max_ms)
        } else {
            Duration::from_secs(self.cfg.give_up_after_secs)
        };
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        loop {
            let spec = h.spec.read().expect("spec lock").clone();
            if spec.version != built.version {
                return Ok(false);
            }
            match self.post(&spec, body).await {
                Ok(()) => return Ok(true),
                Err(reason) => {
                    if let Ok(mut st) = h.state.lock() {
                        st.failed_attempts += 1;
                    }
                    tracing::debug!(subscription = %spec.id, %reason, "delivery attempt failed");
                    if began.elapsed() + backoff > give_up {
                        return Err(reason);
                    }
                    tokio::select! {
                        _ = h.cancel.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(self.cfg.retry_max_ms));
                }
            }
        }
    }

    fn info<'a>(&'a self, spec: &'a SubscriptionSpec, st: &'a SubState) -> StatusInfo<'a> {
        StatusInfo {
            base_url: &self.cfg.base_url,
            spec,
            status: &st.status,
            events_since_start: st.events_since_start,
            error: st.error.as_deref(),
        }
    }

    /// The life of one subscription's delivery.
    async fn worker(
        self: Arc<Self>,
        h: Arc<SubHandle>,
        seen_at: u64,
    ) -> tributary_storage::Result<()> {
        let spec0 = h.spec.read().expect("spec lock").clone();
        let (tenant, id) = (spec0.tenant.clone(), spec0.id.clone());
        let outbox = self.store.outbox().clone();
        // A rest-hook endpoint must answer the handshake before its first delivery, whatever
        // status the client wrote (one created `active` would otherwise skip it).
        let first_start = outbox.cursor(&Self::start_name(&spec0))? == 0;
        let start = self.start_seq(&spec0, seen_at).await?;
        let cursor_name = Self::cursor_name(&spec0);
        let mut cursor = outbox.cursor(&cursor_name)?.max(start);
        let numbering = self
            .init_numbering(&spec0, &cursor_name, start, cursor)
            .await?;
        cursor = cursor.max(numbering.through);
        if let Ok(mut st) = h.state.lock() {
            st.events_since_start = numbering.count;
            st.status = spec0.status.clone();
        }
        tracing::info!(subscription = %id, %tenant, topic = %spec0.topic_url, start, cursor, "subscription delivery started");
        // Rest-hook handshake; a websocket client gets its handshake when it binds.
        let mut handshaken = spec0.endpoint.clone();
        if spec0.channel == ChannelType::RestHook && (spec0.status == "requested" || first_start) {
            match self.handshake(&h).await {
                Some(endpoint) => handshaken = endpoint,
                None => return Ok(()),
            }
        }

        self.deliver(&h, cursor, &cursor_name, handshaken).await
    }

    /// Posts the handshake to the endpoint the Subscription names (again, under its new spec,
    /// when it changed meanwhile): the endpoint it reached, once it answered (status `active`),
    /// or `None` when stopped or given up (status `error`, recorded).
    async fn handshake(&self, h: &SubHandle) -> Option<String> {
        loop {
            let spec = h.spec.read().expect("spec lock").clone();
            let st = h.state.lock().expect("state lock").clone();
            let body = bundle::notification_bundle(
                &self.info(&spec, &st),
                NotificationType::Handshake,
                &[],
                spec.content,
            );
            match self.post_with_retries(h, &spec, &body).await {
                Ok(true) => {
                    self.set_status(h, "active", None).await;
                    return Some(spec.endpoint);
                }
                Ok(false) if h.cancel.is_cancelled() => return None,
                Ok(false) => continue,
                Err(reason) => {
                    self.set_status(h, "error", Some(&format!("{HANDSHAKE_FAILED}: {reason}")))
                        .await;
                    return None;
                }
            }
        }
    }

    /// Delivery after the handshake, for both channels: matches the events after `cursor`,
    /// numbers them and sends one notification per batch; heartbeats when idle. Rest-hook posts
    /// with retries and dead-letters what it gives up on. Websocket queues the notification for
    /// every bound client, and the cursor moves on whether or not a client is bound (missed
    /// events: `$events`).
    async fn deliver(
        &self,
        h: &SubHandle,
        mut cursor: u64,
        cursor_name: &str,
        mut handshaken: String,
    ) -> tributary_storage::Result<()> {
        let outbox = self.store.outbox().clone();
        let mut head_rx = outbox.subscribe();
        let mut last_sent = Instant::now();
        loop {
            if h.cancel.is_cancelled() {
                return Ok(());
            }
            let spec = h.spec.read().expect("spec lock").clone();
            if self.stop_if_revoked(h, &spec).await {
                return Ok(());
            }
            // A new endpoint agrees to receive before anything is sent to it.
            if spec.channel == ChannelType::RestHook && spec.endpoint != handshaken {
                match self.handshake(h).await {
                    Some(endpoint) => handshaken = endpoint,
                    None => return Ok(()),
                }
                continue;
            }
            let (matched, scanned) = self.next_batch(&spec, &outbox, cursor)?;
            if matched.is_empty() {
                if scanned > cursor {
                    cursor = scanned;
                    self.advance(h, cursor_name, cursor, &[]).await?;
                    continue;
                }
                // Idle: wait for new events, a heartbeat, a spec change or shutdown.
                let heartbeat = spec
                    .heartbeat_secs
                    .map(|s| Duration::from_secs(s.max(self.cfg.min_heartbeat_secs)));
                let sleep = match heartbeat {
                    Some(p) => p.saturating_sub(last_sent.elapsed()),
                    None => Duration::from_secs(3600),
                };
                tokio::select! {
                    _ = h.cancel.cancelled() => return Ok(()),
                    r = head_rx.changed() => if r.is_err() { return Ok(()) },
                    _ = h.changed.notified() => {}
                    _ = tokio::time::sleep(sleep) => {
                        if heartbeat.is_some_and(|p| last_sent.elapsed() >= p) {
                            self.heartbeat(h, &spec).await;
                            last_sent = Instant::now();
                        }
                    }
                }
                continue;
            }

            // Again with the batch in hand: a revocation made before these events were
            // committed must stop them.
            if self.stop_if_revoked(h, &spec).await {
                return Ok(());
            }
            let first_number = h.state.lock().expect("state lock").events_since_start + 1;
            let numbered: Vec<NumberedEvent<'_>> = matched
                .iter()
                .enumerate()
                .map(|(i, event)| NumberedEvent {
                    number: first_number + i as u64,
                    event,
                })
                .collect();
            let last_number = first_number + matched.len() as u64 - 1;
            let mut st = h.state.lock().expect("state lock").clone();
            st.events_since_start = last_number;
            if spec.channel == ChannelType::RestHook && st.status == "requested" {
                st.status = "active".into();
            }
            let body = bundle::notification_bundle(
                &self.info(&spec, &st),
                NotificationType::EventNotification,
                &numbered,
                spec.content,
            );
            let outcome = match spec.channel {
                ChannelType::Websocket => Ok(h.broadcast(&body.to_string()) > 0),
                ChannelType::RestHook => match self.post_with_retries(h, &spec, &body).await {
                    Ok(false) if h.cancel.is_cancelled() => return Ok(()),
                    Ok(false) => continue, // changed while retrying: rebuilt from the cursor
                    Ok(true) => Ok(true),
                    Err(reason) => Err(reason),
                },
            };
            if let Ok(mut s) = h.state.lock() {
                s.events_since_start = last_number;
                if outcome == Ok(true) {
                    s.delivered_notifications += 1;
                }
            }
            if outcome == Ok(true) {
                self.audit_notification(&spec, &matched, first_number).await;
            }
            match outcome {
                Ok(true) if spec.channel == ChannelType::RestHook => {
                    let was_error = h.state.lock().map(|s| s.status == "error").unwrap_or(false);
                    if was_error {
                        self.set_status(h, "active", None).await;
                    }
                }
                Ok(_) => {}
                Err(reason) => {
                    self.dead_letter(DeadLetter {
                        tenant: spec.tenant.clone(),
                        subscription: spec.id.clone(),
                        event_numbers: (first_number..=last_number).collect(),
                        event_ids: matched.iter().map(|e| e.event_id.clone()).collect(),
                        reason: reason.clone(),
                        at: tributary_core::format_rfc3339_millis(tributary_core::now_millis()),
                    })
                    .await?;
                    self.set_status(h, "error", Some(&format!("delivery gave up: {reason}")))
                        .await;
                }
            }
            last_sent = Instant::now();
            cursor = matched.last().map_or(scanned, |e| e.seq);
            self.advance(h, cursor_name, cursor, &matched).await?;
        }
    }

    /// One heartbeat notification: posted once (rest-hook; a failure waits for the next one) or
    /// queued for the bound clients (websocket).
    async fn heartbeat(&self, h: &SubHandle, spec: &SubscriptionSpec) {
        let st = h.state.lock().expect("state lock").clone();
        let body = bundle::notification_bundle(
            &self.info(spec, &st),
            NotificationType::Heartbeat,
            &[],
            spec.content,
        );
        let sent = match spec.channel {
            ChannelType::Websocket => h.broadcast(&body.to_string()) > 0,
            ChannelType::RestHook => match self.post(spec, &body).await {
                Ok(()) => true,
                Err(reason) => {
                    tracing::debug!(subscription = %spec.id, %reason, "heartbeat failed");
                    false
                }
            },
        };
        if sent {
            if let Ok(mut st) = h.state.lock() {
                st.heartbeats += 1;
            }
        }
    }

    /// Reads every Subscription of every served tenant and starts, updates or stops workers.
    async fn rescan(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        shutdown: &CancellationToken,
        created: &HashMap<(String, String), u64>,
    ) -> tributary_storage::Result<()> {
        let head = self.store.outbox().head();
        let mut live = std::collections::HashSet::new();
        for tenant in self.tenants() {
            let mut after: Option<String> = None;
            loop {
                let page = self
                    .store
                    .list(&tenant, "Subscription", after.as_deref(), 200)?;
                if page.is_empty() {
                    break;
                }
                after = page.last().map(|r| r.id.clone());
                for r in page {
                    let Ok(body) = r.resource() else { continue };
                    let k = (tenant.clone(), r.id.clone());
                    let mut spec = match SubscriptionSpec::parse(
                        &tenant,
                        &r.id,
                        r.version,
                        &body,
                        self.cfg.allow_http_endpoints,
                    ) {
                        Ok(s) => s,
                        Err(e) => {
                            let status = body.get("status").and_then(Value::as_str);
                            if status != Some("error") && status != Some("off") {
                                tracing::info!(subscription = %r.id, %tenant, reason = e.kind(), "subscription refused");
                                self.write_refusal(&tenant, &r.id, r.version, body, &e.to_string())
                                    .await;
                            }
                            continue;
                        }
                    };
                    let expired = spec.end.is_some_and(|e| e <= tributary_core::now_millis());
                    // A failed handshake stops delivery until the client asks again (sets
                    // `requested`); the endpoint never agreed to receive anything.
                    let refused = spec.status == "error"
                        && body
                            .get("error")
                            .and_then(Value::as_str)
                            .is_some_and(|e| e.starts_with(HANDSHAKE_FAILED));
                    if spec.status == "off" || expired || refused {
                        continue;
                    }
                    live.insert(k.clone());
                    let mut existing = self.subs.read().expect("subs").get(&k).cloned();
                    let known = existing
                        .as_ref()
                        .map(|h| h.spec.read().expect("spec").clone())
                        .filter(|cur| cur.version == spec.version);
                    spec.incarnation = match &known {
                        Some(cur) => cur.incarnation,
                        None => self.incarnation(&tenant, &r.id, r.version)?,
                    };
                    if let Some(h) = &existing {
                        let incarnation = h.spec.read().expect("spec").incarnation;
                        if incarnation != spec.incarnation {
                            // Deleted and created again since the last look: a new subscriber.
                            h.cancel.cancel();
                            self.subs.write().expect("subs").remove(&k);
                            existing = None;
                        }
                    }
                    match existing {
                        Some(h) => {
                            if known.is_none() {
                                *h.spec.write().expect("spec") = spec;
                                h.changed.notify_one();
                            }
                        }
                        None => {
                            // Delivery starts after the Subscription's own creation event.
                            let seen_at = match created.get(&k) {
                                Some(seq) => *seq,
                                None => self.creation_seq(&spec, head)?,
                            };
                            let h = Arc::new(SubHandle::new(spec, shutdown.child_token()));
                            self.subs.write().expect("subs").insert(k, h.clone());
                            let me = self.clone();
                            tasks.spawn(async move {
                                let (t, i) = {
                                    let s = h.spec.read().expect("spec");
                                    (s.tenant.clone(), s.id.clone())
                                };
                                if let Err(e) = me.clone().worker(h.clone(), seen_at).await {
                                    tracing::error!(subscription = %i, tenant = %t, error = %e, "subscription worker stopped");
                                }
                                // Bound websocket clients learn that the subscription ended.
                                if let Ok(mut c) = h.clients.lock() {
                                    c.clear();
                                }
                                // Only its own entry: a stopped worker can end after a rescan
                                // started the next one under the same key.
                                let mut subs = me.subs.write().expect("subs");
                                if subs.get(&(t.clone(), i.clone())).is_some_and(|x| Arc::ptr_eq(x, &h)) {
                                    subs.remove(&(t, i));
                                }
                            });
                        }
                    }
                }
            }
        }
        // Deleted, switched off or expired: stop their workers.
        let stale: Vec<_> = self
            .subs
            .read()
            .expect("subs")
            .iter()
            .filter(|(k, _)| !live.contains(*k))
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        for (k, h) in stale {
            h.cancel.cancel();
            self.subs.write().expect("subs").remove(&k);
        }
        self.rescanned_head.fetch_max(head.max(1), Ordering::AcqRel);
        Ok(())
    }

    async fn write_refusal(
        &self,
        tenant: &str,
        id: &str,
        version: u64,
        mut body: Value,
        reason: &str,
    ) {
        body["status"] = Value::String("error".into());
        body["error"] = Value::String(reason.into());
        let tx = StoreTransaction {
            tenant: tenant.into(),
            writes: vec![ResourceWrite {
                resource_type: "Subscription".into(),
                id: id.into(),
                op: WriteOp::Upsert(body),
                precondition: Precondition::VersionMatch(version),
            }],
            ..Default::default()
        };
        if let Err(e) = self.store.commit(tx).await {
            tracing::warn!(subscription = %id, error = %e, "could not record subscription refusal");
        }
    }

    /// Runs until shutdown: rescans on Subscription changes (seen in the outbox) and every
    /// `rescan_secs`.
    pub async fn run(
        self: Arc<Self>,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> tributary_storage::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let outbox = self.store.outbox().clone();
        let mut head_rx = outbox.subscribe();
        let mut seen = outbox.head();
        self.rescan(&mut tasks, &shutdown, &HashMap::new()).await?;
        readiness.set("subscriptions", ComponentStatus::Ready);
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.rescan_secs));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = head_rx.changed() => {
                    if r.is_err() { break; }
                    let head = outbox.head();
                    let mut touched = false;
                    let mut created = HashMap::new();
                    let span = head.saturating_sub(seen);
                    for e in outbox.read_after(seen, span.min(10_000) as usize)? {
                        if e.resource_type.as_deref() == Some("Subscription") {
                            touched = true;
                            if e.event_type.ends_with(".create") {
                                if let Some(id) = &e.resource_id {
                                    created.insert((e.tenant.clone(), id.clone()), e.seq);
                                }
                            }
                        }
                    }
                    seen = head;
                    if touched {
                        self.rescan(&mut tasks, &shutdown, &created).await?;
                    } else if span <= 10_000 {
                        // Every event up to `head` was looked at and none was a Subscription
                        // change: every active subscription has a worker.
                        self.rescanned_head.fetch_max(head, Ordering::AcqRel);
                    }
                }
                _ = tick.tick() => self.rescan(&mut tasks, &shutdown, &HashMap::new()).await?,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        self.shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Binds a websocket connection to the subscription a binding token names: the handshake
    /// is the first message in its queue. Waits up to the bind timeout for a just-created
    /// subscription's worker. `Err` is a PHI-free reason for the client.
    pub(crate) async fn bind_ws(
        &self,
        b: &Binding,
    ) -> Result<(u64, mpsc::Receiver<String>, CancellationToken), String> {
        let k = (b.tenant.clone(), b.subscription.clone());
        let deadline = Instant::now() + Duration::from_secs(self.cfg.ws_bind_timeout_secs);
        let h = loop {
            if let Some(h) = self.subs.read().ok().and_then(|s| s.get(&k).cloned()) {
                break h;
            }
            if Instant::now() >= deadline {
                return Err("the subscription is not active (off, ended, or in error)".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let spec = h.spec.read().expect("spec lock").clone();
        if spec.channel != ChannelType::Websocket {
            return Err("the subscription's channel is not websocket".into());
        }
        let status = h.state.lock().expect("state lock").status.clone();
        if status == "requested" || status.is_empty() {
            self.set_status(&h, "active", None).await;
        }
        let st = h.state.lock().expect("state lock").clone();
        let handshake = bundle::notification_bundle(
            &self.info(&spec, &st),
            NotificationType::Handshake,
            &[],
            spec.content,
        );
        if h.clients.lock().expect("clients lock").len() >= MAX_WS_PER_SUBSCRIPTION {
            return Err(format!(
                "at most {MAX_WS_PER_SUBSCRIPTION} connections may be bound to one subscription"
            ));
        }
        let (tx, rx) = mpsc::channel(self.cfg.ws_queue_bound.max(1));
        let _ = tx.try_send(handshake.to_string());
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let slow = CancellationToken::new();
        h.clients.lock().expect("clients lock").push(WsClient {
            id,
            tx,
            slow: slow.clone(),
        });
        Ok((id, rx, slow))
    }

    /// A delivered event notification tells its subscriber about its events' patients (and,
    /// with `full-resource`, hands over their data): one PHI-free record per patient (events of
    /// no patient get one without), written before the cursor moves past the events, so each
    /// patient's audit report lists what went to which Subscription. A crash in between sends
    /// the notification again and records it again.
    async fn audit_notification(
        &self,
        spec: &SubscriptionSpec,
        events: &[OutboxEvent],
        first_number: u64,
    ) {
        let mut by_patient: std::collections::BTreeMap<Option<&str>, u64> = Default::default();
        for e in events {
            // A patient-context subscriber received it as its own patient's (the resource may
            // be keyed by another patient whose compartment it is in too).
            let own = spec
                .patient_context
                .as_deref()
                .filter(|p| e.other_patients.iter().any(|o| o == p));
            *by_patient
                .entry(own.or(e.patient_id.as_deref()))
                .or_default() += 1;
        }
        let time = tributary_core::now_millis();
        let last_number = first_number + events.len() as u64 - 1;
        let records = by_patient
            .into_iter()
            .map(|(patient, n)| {
                let mut rec = serde_json::json!({
                    "kind": "subscription-notification",
                    "time": time,
                    "tenant": spec.tenant,
                    "interaction": "notify",
                    "resource_type": "Subscription",
                    "resource_id": spec.id,
                    "channel": spec.channel.code(),
                    "content": spec.content.code(),
                    "events": n,
                    "first_event": first_number,
                    "last_event": last_number,
                    "status": 200,
                    "outcome": "allowed",
                });
                if let Some(p) = patient {
                    rec["patient"] = Value::String(p.to_string());
                }
                if let Some(c) = &spec.client {
                    rec["client"] = Value::String(c.clone());
                }
                rec
            })
            .collect();
        if let Err(e) = self.audit.append(records).await {
            tracing::error!(subscription = %spec.id, error = %e, "could not audit a delivered notification");
        }
    }

    /// Appends one PHI-free audit record (the inbound hook's `ingress` records), durable when
    /// this returns; a failure is logged.
    pub(crate) async fn append_audit(&self, record: Value) {
        if let Err(e) = self.audit.append(vec![record]).await {
            tracing::error!(error = %e, "audit write failed");
        }
    }

    /// A PHI-free audit record of a websocket bind or close, durable when this returns (a
    /// failure is logged: the connection is refused or closed anyway).
    pub(crate) async fn audit_ws(
        &self,
        b: Option<&Binding>,
        interaction: &str,
        status: u16,
        detail: &str,
        notifications: u64,
    ) {
        let mut rec = serde_json::json!({
            "kind": "subscription-websocket",
            "time": tributary_core::now_millis(),
            "interaction": interaction,
            "resource_type": "Subscription",
            "status": status,
            "outcome": match status {
                200..=399 => "allowed",
                401 | 403 => "denied",
                _ => "failed",
            },
            "detail": detail,
            "notifications": notifications,
        });
        if let Some(b) = b {
            rec["tenant"] = Value::String(b.tenant.clone());
            rec["resource_id"] = Value::String(b.subscription.clone());
            if let Some(c) = &b.client {
                rec["client"] = Value::String(c.clone());
            }
            if let Some(p) = &b.patient {
                rec["patient"] = Value::String(p.clone());
            }
        }
        if let Err(e) = self.audit.append(vec![rec]).await {
            tracing::error!(error = %e, "could not audit a websocket bind/close");
        }
    }

    pub(crate) fn unbind_ws(&self, b: &Binding, client: u64) {
        let k = (b.tenant.clone(), b.subscription.clone());
        if let Some(h) = self.subs.read().ok().and_then(|s| s.get(&k).cloned()) {
            if let Ok(mut c) = h.clients.lock() {
                c.retain(|c| c.id != client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_client_queue_disconnects_that_client_only() {
        let sub = json!({"resourceType": "Subscription", "status": "active",
            "criteria": format!("{}/observation", crate::model::TOPIC_BASE),
            "channel": {"type": "websocket"}});
        let spec = SubscriptionSpec::parse("t1", "s1", 1, &sub, false).unwrap();
        let h = SubHandle::new(spec, CancellationToken::new());
        let (slow_tx, _slow_rx) = mpsc::channel(2);
        let (fast_tx, mut fast_rx) = mpsc::channel(2);
        let (slow, fast) = (CancellationToken::new(), CancellationToken::new());
        h.clients.lock().unwrap().extend([
            WsClient {
                id: 1,
                tx: slow_tx,
                slow: slow.clone(),
            },
            WsClient {
                id: 2,
                tx: fast_tx,
                slow: fast.clone(),
            },
        ]);
        for (i, want) in [2, 2, 1, 1].into_iter().enumerate() {
            assert_eq!(h.broadcast(&format!("n{i}")), want, "message {i}");
            assert_eq!(fast_rx.try_recv().unwrap(), format!("n{i}"));
        }
        assert!(
            slow.is_cancelled(),
            "the client that stopped reading is cut off"
        );
        assert!(!fast.is_cancelled());
    }
}
