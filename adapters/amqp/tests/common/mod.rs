//! The RabbitMQ on this machine, for the tests that need one. Also used by the end-to-end tests
//! (`tests/tests/events_common`, through `#[path]`), so that both find, skip and fill it alike.

use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// 127.0.0.1:5672 as guest/guest, or `AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A connection, or None (after saying why `test` skips) when RabbitMQ is not reachable.
pub async fn rabbit_or_skip(test: &str) -> Option<Connection> {
    match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
        Ok(c) => Some(c),
        Err(e) => {
            // CI installs every test tool and sets TEST_REQUIRE_TOOLS=1: there, a missing tool fails.
            assert!(
                std::env::var_os("TEST_REQUIRE_TOOLS").is_none(),
                "a test tool is missing but TEST_REQUIRE_TOOLS is set"
            );
            eprintln!("SKIP {test}: RabbitMQ not reachable ({e}); start it with `rabbitmq-server -detached`");
            None
        }
    }
}

/// Declares the durable queue `queue` and publishes each of `messages` to it, persistent, each
/// confirmed before the next.
pub async fn fill_durable_queue(
    ch: &Channel,
    queue: &str,
    messages: impl IntoIterator<Item = String>,
) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for msg in messages {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            msg.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

/// Messages ready in `queue` (a passive declare).
pub async fn queue_depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// Declares the durable topic exchange `exchange` (as the sink does) and an exclusive,
/// server-named queue bound to it with `routing_key`; returns the queue's name. Declared before
/// the sink publishes, so the queue receives everything from the start.
pub async fn bound_queue(ch: &Channel, exchange: &str, routing_key: &str) -> String {
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let queue = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    queue
}
