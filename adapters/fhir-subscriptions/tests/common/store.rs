//! Writing a resource of tenant `t1` straight into the store (one committed transaction), as a
//! mapped message or a facade write would; its change event lands in the outbox.

use serde_json::Value;
use tributary_storage::{FjallStore, ResourceWrite, Store, StoreTransaction};

pub async fn put(store: &FjallStore, rtype: &str, id: &str, body: Value) {
    store
        .commit(StoreTransaction {
            tenant: "t1".into(),
            writes: vec![ResourceWrite::upsert(rtype, id, body)],
            ..Default::default()
        })
        .await
        .unwrap();
}
