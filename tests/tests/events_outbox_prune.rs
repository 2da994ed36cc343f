//! Outbox retention in `serve`: with a RabbitMQ relay configured, events it has delivered and
//! that are older than `outbox.max_age_secs` are removed from the data directory; with
//! `max_age_secs = 0` they stay; sequence numbers go on across prunes and restarts.
//! Skips when RabbitMQ is not reachable at 127.0.0.1:5672 (or `AMQP_URL`).

mod events_common;

use events_common::rabbit::{amqp_url, rabbit_or_skip};
use events_common::{issue_token, post_fhir, token_config, Server};
use serde_json::{json, Value};
use std::path::Path;
use tributary_e2e::{metric, wait};
use tributary_storage::{Db, DbOptions, FjallStore, Store};

/// (remaining event seqs, the relay's cursor) read from the stopped server's data directory.
fn outbox_state(data: &Path) -> (Vec<u64>, u64) {
    let store = FjallStore::new(Db::open(data, DbOptions::default()).unwrap());
    let seqs = store
        .outbox()
        .read_after(0, 100_000)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    (seqs, store.outbox().cursor("amqp").unwrap())
}

/// Events the outbox pruner reported removing (its `outbox retention` lines in the JSON log).
fn pruned_in_log(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "outbox retention")
        .filter_map(|l| l["pruned"].as_u64())
        .sum()
}

async fn create_patients(server: &Server, token: &str, n: usize) {
    let http = reqwest::Client::new();
    let base = format!("http://{}/fhir", server.http);
    for i in 0..n {
        let gender = if i % 2 == 0 { "female" } else { "male" };
        let patient = json!({"resourceType": "Patient", "gender": gender});
        post_fhir(&http, &base, token, "Patient", &patient).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_old_events_are_pruned_and_only_then() {
    if rabbit_or_skip("delivered_old_events_are_pruned_and_only_then")
        .await
        .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = issue_token(&token_config(&data), "ops", "system/*.cruds", None);
    let relay = |max_age: u64| {
        format!(
            "[outbox]\nmax_age_secs = {max_age}\nprune_interval_secs = 1\n[amqp]\nurl = {:?}\n[amqp.sink]\nexchange = \"e2e.prune.{}\"\n",
            amqp_url(),
            std::process::id()
        )
    };

    // Pruning on: delivered and older than a second → gone.
    let server = Server::start(&data, &relay(1));
    create_patients(&server, &token, 3).await;
    let http = server.http.to_string();
    wait("the pruner to report every outbox event removed")
        .until_async(|| async {
            let head = metric(&http, "tributary_outbox_head_seq")? as u64;
            (head >= 3 && pruned_in_log(&server.log) >= head).then_some(())
        })
        .await;
    server.stop();
    let (left, cursor) = outbox_state(&data);
    assert!(
        cursor >= 3,
        "the relay delivered the events (cursor {cursor})"
    );
    assert!(left.is_empty(), "delivered old events pruned: {left:?}");

    // Pruning off: they stay, and numbering goes on after the prune.
    let server = Server::start(&data, &relay(0));
    create_patients(&server, &token, 2).await;
    // The pruner says it is off (it never runs), and the relay has delivered both events.
    let http = server.http.to_string();
    wait("pruning off and both new events delivered")
        .until_async(|| async {
            let head = metric(&http, "tributary_outbox_head_seq")? as u64;
            let lag = metric(&http, "tributary_outbox_lag_events{relay=\"amqp\"}")?;
            let off = tributary_e2e::log_count(&server.log, "outbox pruning off") > 0;
            (off && head >= cursor + 2 && lag == 0.0).then_some(())
        })
        .await;
    server.stop();
    let (left, cursor2) = outbox_state(&data);
    assert_eq!(left.len(), 2, "max_age_secs = 0 keeps events: {left:?}");
    assert!(
        left[0] > cursor,
        "sequence numbers never go back: {left:?} after {cursor}"
    );
    assert!(cursor2 >= left[1], "and they were delivered too");
}
