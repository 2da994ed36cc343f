//! The MLLP load generator behind `tributary bench mllp`: N persistent connections send M
//! messages in total (sample files, each with a fresh MSH-10 so nothing is de-duplicated), one at
//! a time per connection, and the ACK latency of every message is recorded.

use crate::ack::read_msa;
use crate::header::{is_batch, segments, split_batch, Header};
use crate::sink::{MllpSender, MllpSenderConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct LoadOptions {
    pub addr: String,
    pub connections: usize,
    /// Messages in total, spread over the connections.
    pub messages: usize,
    pub files: Vec<PathBuf>,
    /// Target messages/s over all connections; `None` = as fast as ACKs come back.
    pub rate: Option<f64>,
    /// TLS client configuration and server name.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    /// Open a new connection for every message (for servers that close after one reply).
    pub reconnect: bool,
    /// Spread the messages over this many synthetic patients (PID-3's first id replaced by
    /// `BENCH<n>`), so ordering keys differ as in a real feed; `None` sends the samples as they are.
    pub patients: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub sent: usize,
    pub positive: usize,
    pub negative: usize,
    pub errors: usize,
    pub elapsed_secs: f64,
    pub msgs_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connections={} sent={} positive={} negative={} errors={} elapsed={:.2}s rate={:.0} msgs/s ack latency p50={:.2}ms p99={:.2}ms max={:.2}ms",
            self.connections,
            self.sent,
            self.positive,
            self.negative,
            self.errors,
            self.elapsed_secs,
            self.msgs_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read sample {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no usable HL7 v2 message in the sample files")]
    NoSamples,
}

/// One sample message with the byte range of its MSH-10, so each send gets a fresh control id.
#[derive(Clone)]
struct Sample {
    bytes: Vec<u8>,
    control_id: std::ops::Range<usize>,
    /// PID-3.1 of the first repetition, after MSH-10 in the message.
    patient_id: Option<std::ops::Range<usize>>,
}

fn pid3_first_id(m: &[u8], h: &Header<'_>) -> Option<std::ops::Range<usize>> {
    let d = h.delims;
    let seg = segments(m).find(|r| m[r.clone()].starts_with(b"PID"))?;
    let mut start = seg.start;
    for _ in 0..3 {
        start += m[start..seg.end].iter().position(|b| *b == d.field)? + 1;
    }
    let end = m[start..seg.end]
        .iter()
        .position(|b| *b == d.field || *b == d.repetition || *b == d.component)
        .map_or(seg.end, |i| start + i);
    (end > start).then_some(start..end)
}

fn load_samples(files: &[PathBuf]) -> Result<Vec<Sample>, LoadError> {
    let mut out = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        let messages: Vec<Vec<u8>> = match split_batch(&bytes) {
            Ok(b) if is_batch(&bytes) => {
                b.messages.into_iter().map(|r| bytes[r].to_vec()).collect()
            }
            _ => vec![bytes],
        };
        for m in messages {
            let Ok(h) = Header::read(&m) else { continue };
            if let Some(r) = h.field_range(10) {
                let patient_id = pid3_first_id(&m, &h).filter(|p| p.start >= r.end);
                out.push(Sample {
                    control_id: r,
                    patient_id,
                    bytes: m,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(LoadError::NoSamples);
    }
    Ok(out)
}

fn with_ids(s: &Sample, control_id: &str, patient: Option<&str>) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.bytes.len() + control_id.len() + 16);
    v.extend_from_slice(&s.bytes[..s.control_id.start]);
    v.extend_from_slice(control_id.as_bytes());
    match (patient, &s.patient_id) {
        (Some(p), Some(r)) => {
            v.extend_from_slice(&s.bytes[s.control_id.end..r.start]);
            v.extend_from_slice(p.as_bytes());
            v.extend_from_slice(&s.bytes[r.end..]);
        }
        _ => v.extend_from_slice(&s.bytes[s.control_id.end..]),
    }
    v
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs the load and reports throughput and ACK latency.
pub async fn run_load(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    let samples = Arc::new(load_samples(&opts.files)?);
    let connections = opts.connections.max(1);
    // a per-run prefix keeps control ids unique across runs (no de-duplication hits)
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let run_id = format!("{:06x}", millis % 0xFF_FFFF);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let count = opts.messages / connections + usize::from(c < opts.messages % connections);
        let samples = samples.clone();
        let mut cfg = MllpSenderConfig::new(opts.addr.clone());
        cfg.tls = opts.tls.clone();
        cfg.max_attempts = 1;
        let interval = opts
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(connections as f64 / r));
        let run_id = run_id.clone();
        let reconnect = opts.reconnect;
        let patients = opts.patients.filter(|n| *n > 0);
        tasks.push(tokio::spawn(async move {
            let mut sender = MllpSender::new(cfg.clone());
            let mut lat = Vec::with_capacity(count);
            let (mut pos, mut neg, mut err) = (0usize, 0usize, 0usize);
            let t0 = Instant::now();
            for i in 0..count {
                if let Some(every) = interval {
                    let due = t0 + every * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                }
                let s = &samples[(c + i * connections) % samples.len()];
                let patient = patients.map(|n| format!("BENCH{}", (c + i * connections) % n));
                let msg = with_ids(s, &format!("B{run_id}{c}x{i}"), patient.as_deref());
                let t = Instant::now();
                if reconnect {
                    sender = MllpSender::new(cfg.clone());
                }
                match sender.send_once(&msg).await {
                    Ok(ack) => {
                        lat.push(t.elapsed().as_micros() as u64);
                        match read_msa(&ack) {
                            Some((code, _)) if code.is_positive() => pos += 1,
                            _ => neg += 1,
                        }
                    }
                    Err(_) => err += 1,
                }
            }
            (lat, pos, neg, err)
        }));
    }
    let mut lat = Vec::new();
    let (mut pos, mut neg, mut err) = (0, 0, 0);
    for t in tasks {
        if let Ok((l, p, n, e)) = t.await {
            lat.extend(l);
            pos += p;
            neg += n;
            err += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok(LoadReport {
        connections,
        sent: pos + neg + err,
        positive: pos,
        negative: neg,
        errors: err,
        elapsed_secs: elapsed,
        msgs_per_sec: if elapsed > 0.0 {
            pos as f64 / elapsed
        } else {
            0.0
        },
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_id_and_patient_id_are_replaced_and_nothing_else() {
        let m = b"MSH|^~\\&|A|B|C|D|20250101||ADT^A01|CTRL1|P|2.5\rEVN|A01\rPID|1||12345^^^HOSP^MR~999^^^SSA||DOE^JANE\r".to_vec();
        let h = Header::read(&m).unwrap();
        let s = Sample {
            control_id: h.field_range(10).unwrap(),
            patient_id: pid3_first_id(&m, &h),
            bytes: m.clone(),
        };
        let out = with_ids(&s, "NEW9", Some("BENCH7"));
        assert_eq!(
            out,
            b"MSH|^~\\&|A|B|C|D|20250101||ADT^A01|NEW9|P|2.5\rEVN|A01\rPID|1||BENCH7^^^HOSP^MR~999^^^SSA||DOE^JANE\r".to_vec()
        );
        assert_eq!(with_ids(&s, "CTRL1", None), m);
    }

    #[test]
    fn a_message_without_pid3_keeps_its_bytes() {
        let m = b"MSH|^~\\&|A|B|C|D|20250101||ORM^O01|C2|P|2.5\rPID|1\r".to_vec();
        let h = Header::read(&m).unwrap();
        assert_eq!(pid3_first_id(&m, &h), None);
    }
}
