//! Loopback ports for tests that hand an address to a server they start later (often another
//! process), so they cannot keep the listener they probed with.
//!
//! Binding to port 0 and releasing the port is racy: the kernel hands the same ephemeral range to
//! every outbound connection on the machine (Kafka clients, HTTP pools, other tests), and one of
//! them can take the port before the server binds it — a CI run failed that way with "Address
//! already in use". Ports here come from below the ephemeral range, where the kernel never
//! assigns source ports, starting at a random point so that concurrent test processes rarely
//! probe the same one, and never twice from one process.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

const LOWEST: u16 = 20_000;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|p| *p > LOWEST + 1_000)
        .unwrap_or(32_768)
}

/// A loopback port that nothing listens on now, outside the ephemeral range, not handed out
/// before by this process.
pub fn free_loopback_port() -> u16 {
    let end = ephemeral_start();
    let start = RandomState::new().hash_one((std::process::id(), std::time::SystemTime::now()));
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    pick(start as u32, end, handed_out)
        .unwrap_or_else(|| panic!("no free loopback port in {LOWEST}..{end}"))
}

/// The first port from `LOWEST + start` (wrapping below `end`) that binds and is not in
/// `handed_out`; it is added there.
fn pick(start: u32, end: u16, handed_out: &mut HashSet<u16>) -> Option<u16> {
    let span = u32::from(end - LOWEST);
    let port = (0..span)
        .map(|i| LOWEST + (start.wrapping_add(i) % span) as u16)
        .filter(|p| !handed_out.contains(p))
        .find(|p| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, *p))).is_ok())?;
    handed_out.insert(port);
    Some(port)
}

/// [`free_loopback_port`] as a `127.0.0.1:port` address.
pub fn free_loopback_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_distinct() {
        let end = ephemeral_start();
        let ports: Vec<u16> = (0..50).map(|_| free_loopback_port()).collect();
        let distinct: HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        for p in &ports {
            assert!((LOWEST..end).contains(p), "{p} outside {LOWEST}..{end}");
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let taken = TcpListener::bind(free_loopback_addr()).unwrap();
        let port = taken.local_addr().unwrap().port();
        let next = pick(
            u32::from(port - LOWEST),
            ephemeral_start(),
            &mut HashSet::new(),
        );
        assert!(next.is_some_and(|p| p != port), "{next:?}");
    }
}
