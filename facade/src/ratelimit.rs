//! Token buckets per (tenant, client) and per (tenant, user), charged by the request's cost
//! (read 1, search 3 + 1 per include, history 10, write 5, `$everything` 20 by default). A client
//! that exhausts its bucket gets 429 while other clients keep their own budget. Classes with a
//! share (`class_shares`: `$everything` 20%, history 25% by default) also have a bucket per
//! client and per user of that share, so bulk calls cannot use up what the same client's reads
//! need.

use crate::config::{RateClass, RateLimitConfig};
use crate::policy::{FhirRequest, Interaction};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What the RateLimit headers report for the tightest bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limited {
    pub quota: Quota,
    pub retry_after_secs: u64,
}

pub struct RateLimiter {
    cfg: RateLimitConfig,
    buckets: Mutex<HashMap<BucketKey, Bucket>>,
    /// When the map was last swept (see [`MAX_BUCKETS`]).
    swept: Mutex<Instant>,
}

/// (tenant, client or user, its id, the class of a class bucket).
type BucketKey = (String, Owner, String, Option<RateClass>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Owner {
    Client,
    User,
}

/// Past this many buckets, those idle for an hour are dropped — at most once per
/// [`SWEEP_EVERY`]: when every bucket is recent, a sweep frees nothing, and sweeping on every
/// request would scan the whole map under its lock each time.
const MAX_BUCKETS: usize = 100_000;
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> Self {
        Self {
            cfg,
            buckets: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// The class a request's interaction is limited in.
    pub fn class(req: &FhirRequest) -> RateClass {
        match req.interaction {
            Interaction::Read | Interaction::Vread => RateClass::Read,
            Interaction::Search
            | Interaction::AuditQuery
            | Interaction::Match
            | Interaction::LastN => RateClass::Search,
            Interaction::HistoryInstance | Interaction::HistoryType => RateClass::History,
            Interaction::Create
            | Interaction::Update
            | Interaction::Patch
            | Interaction::Delete
            | Interaction::Transaction => RateClass::Write,
            Interaction::Everything | Interaction::Export => RateClass::Everything,
            Interaction::ExportStatus | Interaction::ExportFile => RateClass::Read,
            Interaction::Capabilities | Interaction::Admin | Interaction::Unknown => {
                RateClass::Metadata
            }
        }
    }

    /// The cost of a request in bucket units.
    pub fn cost(&self, req: &FhirRequest) -> u64 {
        let c = &self.cfg.costs;
        match req.interaction {
            Interaction::Read | Interaction::Vread => c.read,
            Interaction::Search | Interaction::AuditQuery => {
                c.search + c.include * req.includes() as u64
            }
            Interaction::Match | Interaction::LastN => c.search,
            Interaction::HistoryInstance | Interaction::HistoryType => c.history,
            Interaction::Create
            | Interaction::Update
            | Interaction::Patch
            | Interaction::Delete
            | Interaction::Transaction => c.write,
            Interaction::Everything | Interaction::Export => c.everything,
            Interaction::ExportStatus | Interaction::ExportFile => c.read,
            Interaction::Capabilities | Interaction::Admin | Interaction::Unknown => c.metadata,
        }
    }

    /// Extra cost charged once the body is read: each entry of a transaction or batch beyond
    /// the first (see `transaction.rs`).
    pub fn write_cost(&self) -> u64 {
        self.cfg.costs.write
    }

    fn client_limits(&self, tenant: &str, client: &str) -> (u64, u64) {
        let o = &self.cfg.overrides;
        if let Some(x) = o
            .get(&format!("{tenant}/{client}"))
            .or_else(|| o.get(tenant))
        {
            return (x.burst, x.per_sec);
        }
        (self.cfg.client_burst, self.cfg.client_per_sec)
    }

    /// Charges `cost` to the client's and the user's bucket, and to their buckets of `class`
    /// when it has a share, or to none of them if any is short.
    pub fn check(
        &self,
        tenant: &str,
        client: &str,
        user: Option<&str>,
        class: RateClass,
        cost: u64,
    ) -> Result<Quota, Limited> {
        let now = Instant::now();
        let (cb, cr) = self.client_limits(tenant, client);
        let mut owners = vec![(Owner::Client, client, cb, cr)];
        if let Some(u) = user {
            owners.push((Owner::User, u, self.cfg.user_burst, self.cfg.user_per_sec));
        }
        let share = self.cfg.class_shares.get(&class).copied();
        let mut keys = Vec::with_capacity(4);
        for (owner, id, burst, rate) in owners {
            keys.push((
                (tenant.to_string(), owner, id.to_string(), None),
                burst,
                rate,
            ));
            if let Some(share) = share {
                // Never below one request's cost: a request the whole budget admits must not
                // be refused for good by its class's share.
                let part = |v: u64| ((v as f64 * share).round() as u64).max(1);
                let class_burst = part(burst).max(cost).min(burst);
                keys.push((
                    (tenant.to_string(), owner, id.to_string(), Some(class)),
                    class_burst,
                    part(rate),
                ));
            }
        }
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > MAX_BUCKETS {
            let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*swept) >= SWEEP_EVERY {
                *swept = now;
                // Buckets idle for an hour are full again: they carry no state worth keeping.
                map.retain(|_, b| now.duration_since(b.last).as_secs() < 3600);
            }
        }
        let mut tightest: Option<Quota> = None;
        let mut short: Option<Limited> = None;
        for (key, burst, rate) in &keys {
            let b = map.entry(key.clone()).or_insert(Bucket {
                tokens: *burst as f64,
                last: now,
            });
            let elapsed = now.duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * *rate as f64).min(*burst as f64);
            b.last = now;
            let after = b.tokens - cost as f64;
            let remaining = after.max(0.0);
            let quota = Quota {
                limit: *burst,
                remaining: remaining.floor() as u64,
                reset_secs: ((*burst as f64 - remaining) / *rate as f64).ceil() as u64,
            };
            if after < 0.0 {
                let need = (cost as f64 - b.tokens).max(0.0);
                let retry = ((need / *rate as f64).ceil() as u64).max(1);
                let q = Quota {
                    remaining: b.tokens.max(0.0).floor() as u64,
                    ..quota
                };
                if short.is_none_or(|s| s.retry_after_secs < retry) {
                    short = Some(Limited {
                        quota: q,
                        retry_after_secs: retry,
                    });
                }
            }
            if tightest.is_none_or(|t| quota.remaining < t.remaining) {
                tightest = Some(quota);
            }
        }
        if let Some(l) = short {
            return Err(l);
        }
        for (key, _, _) in &keys {
            if let Some(b) = map.get_mut(key) {
                b.tokens -= cost as f64;
            }
        }
        Ok(tightest.expect("at least the client bucket"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitOverride;

    fn limiter(burst: u64, per_sec: u64) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            client_burst: burst,
            client_per_sec: per_sec,
            user_burst: 1_000_000,
            user_per_sec: 1_000_000,
            ..Default::default()
        })
    }

    #[test]
    fn bucket_exhausts_and_reports() {
        let l = limiter(10, 1);
        let q = l.check("t", "a", None, RateClass::Read, 4).unwrap();
        assert_eq!((q.limit, q.remaining), (10, 6));
        l.check("t", "a", None, RateClass::Read, 6).unwrap();
        let err = l.check("t", "a", None, RateClass::Read, 3).unwrap_err();
        assert!(err.retry_after_secs >= 2, "{err:?}");
        assert_eq!(err.quota.limit, 10);
        // Another client and another tenant are untouched.
        assert!(l.check("t", "b", None, RateClass::Read, 10).is_ok());
        assert!(l.check("u", "a", None, RateClass::Read, 10).is_ok());
    }

    #[test]
    fn user_bucket_applies_across_clients() {
        let l = RateLimiter::new(RateLimitConfig {
            user_burst: 5,
            user_per_sec: 1,
            ..Default::default()
        });
        l.check("t", "a", Some("dr-x"), RateClass::Read, 5).unwrap();
        assert!(l.check("t", "b", Some("dr-x"), RateClass::Read, 1).is_err());
        assert!(l.check("t", "b", Some("dr-y"), RateClass::Read, 1).is_ok());
    }

    #[test]
    fn overrides_and_costs() {
        let mut cfg = RateLimitConfig::default();
        cfg.overrides.insert(
            "t/bulk".into(),
            LimitOverride {
                burst: 3,
                per_sec: 1,
            },
        );
        let l = RateLimiter::new(cfg);
        assert!(l.check("t", "bulk", None, RateClass::Read, 4).is_err());
        assert!(l.check("t", "other", None, RateClass::Read, 4).is_ok());
        let req = crate::policy::classify(
            &axum::http::Method::GET,
            "/Observation",
            Some("_include=Observation:subject"),
        );
        assert_eq!(l.cost(&req), 4);
    }

    /// A class with a share has its own bucket of that share: the client's `$everything` calls
    /// stop at it while its reads go on; a class without one draws on the whole budget.
    #[test]
    fn a_class_share_keeps_bulk_calls_from_using_up_the_reads() {
        let l = limiter(100, 1);
        let everything = RateClass::Everything;
        assert_eq!(l.check("t", "a", None, everything, 20).unwrap().limit, 20);
        let err = l.check("t", "a", None, everything, 20).unwrap_err();
        assert_eq!(err.quota.limit, 20, "the class bucket is the one short");
        for _ in 0..80 {
            l.check("t", "a", None, RateClass::Read, 1).unwrap();
        }
        assert!(l.check("t", "a", None, RateClass::Read, 1).is_err());
        // A request larger than the share still fits a budget that admits it.
        let l = limiter(50, 1);
        assert!(l.check("t", "b", None, everything, 20).is_ok());
        assert!(l.check("t", "b", None, everything, 20).is_err());
    }
}
