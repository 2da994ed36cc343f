"""A consumer nobody on this project wrote (confluent-kafka): reads the relay's topics with a
consumer group and prints one JSON line per record: topic, partition, key, headers, value.

usage: consume.py BOOTSTRAP GROUP EXPECTED_COUNT TIMEOUT_SECS TOPIC...
"""
import json
import sys
import time

from confluent_kafka import Consumer

bootstrap, group, expected, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
topics = sys.argv[5:]
c = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "topic.metadata.refresh.interval.ms": 1000,
})
c.subscribe(topics)
seen = 0
deadline = time.time() + timeout
while seen < expected and time.time() < deadline:
    m = c.poll(1.0)
    if m is None or m.error():
        continue
    headers = {k: v.decode() for k, v in (m.headers() or [])}
    print(json.dumps({
        "topic": m.topic(),
        "partition": m.partition(),
        "key": m.key().decode() if m.key() else None,
        "headers": headers,
        "value": json.loads(m.value()),
    }), flush=True)
    seen += 1
c.close()
