//! Key layouts. Every multi-part key separates its parts with 0x00, which cannot occur in ids,
//! tenants or resource types, so prefix scans never bleed into a neighbour.

pub const SEP: u8 = 0;

pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len() + 1).sum();
    let mut out = Vec::with_capacity(len);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(SEP);
        }
        out.extend_from_slice(p);
    }
    out
}

/// `join(parts) + SEP`: the prefix under which every longer key with these parts lives.
pub fn prefix(parts: &[&[u8]]) -> Vec<u8> {
    let mut p = join(parts);
    p.push(SEP);
    p
}

pub fn u64_be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Order-preserving encoding of a signed timestamp.
pub fn i64_be(n: i64) -> [u8; 8] {
    ((n as u64) ^ (1 << 63)).to_be_bytes()
}

pub fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

pub fn read_i64(bytes: &[u8]) -> Option<i64> {
    read_u64(bytes).map(|n| (n ^ (1 << 63)) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_encoding_preserves_order() {
        let values = [-5_i64, -1, 0, 1, 1_700_000_000_000];
        let enc: Vec<_> = values.iter().map(|v| i64_be(*v)).collect();
        assert!(enc.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(read_i64(&i64_be(-5)), Some(-5));
    }
}
