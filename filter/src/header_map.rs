//! A request's headers read in one host call.
//!
//! Each host call from the VM costs microseconds in Envoy (V8 ↔ C++ transitions, and
//! a call back into the VM to allocate every returned value), far more than the
//! filter's own logic. So [`crate::host::Host::request_headers`] fetches the whole
//! request header map at once (`proxy_get_header_map_pairs`) and this module reads
//! what the filter needs from that one buffer: the values without copying, and which
//! headers are present, so that forwarding removes only headers that exist.
//!
//! The buffer holds the agent's token: it is zeroed when dropped.
//!
//! Wire format (proxy-wasm ABI): `u32` count, then per header `u32` name length and
//! `u32` value length, then per header the name, `\0`, the value, `\0` (little-endian).

use std::ops::Range;

/// The request headers, as Envoy serialized them (names are lowercase).
#[derive(Default)]
pub struct HeaderMap {
    bytes: Vec<u8>,
    pairs: Vec<(Range<usize>, Range<usize>)>,
}

impl std::fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderMap")
            .field("headers", &self.pairs.len())
            .finish()
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

impl HeaderMap {
    /// Reads a serialized map; malformed input gives an empty map (every header then
    /// reads as absent, and the request is refused as it would be without them).
    pub fn parse(bytes: Vec<u8>) -> HeaderMap {
        let pairs = Self::index(&bytes).unwrap_or_default();
        HeaderMap { bytes, pairs }
    }

    fn index(bytes: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
        if bytes.is_empty() {
            return Some(Vec::new());
        }
        let count = u32_at(bytes, 0)?;
        // Each header takes at least 8 bytes of sizes and 2 terminators.
        if count > bytes.len() / 10 {
            return None;
        }
        let mut pairs = Vec::with_capacity(count);
        let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
        for n in 0..count {
            let sizes = 4 + n * 8;
            let name_len = u32_at(bytes, sizes)?;
            let value_len = u32_at(bytes, sizes + 4)?;
            let name = at..at.checked_add(name_len)?;
            let value_start = name.end.checked_add(1)?;
            let value = value_start..value_start.checked_add(value_len)?;
            if value.end >= bytes.len() {
                return None;
            }
            at = value.end + 1;
            pairs.push((name, value));
        }
        Some(pairs)
    }

    /// The first value of `name`, as bytes.
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.pairs.iter().find_map(|(n, v)| {
            if self.bytes.get(n.clone())? == name.as_bytes() {
                self.bytes.get(v.clone())
            } else {
                None
            }
        })
    }

    /// The first value of `name` (lowercase); `None` if absent or not UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.first(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether `name` (lowercase) is present at all.
    pub fn contains(&self, name: &str) -> bool {
        self.first(name).is_some()
    }

    /// Every header as (name, value) bytes, in the order Envoy gave them.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.pairs.iter().filter_map(|(name, value)| {
            Some((
                self.bytes.get(name.clone())?,
                self.bytes.get(value.clone())?,
            ))
        })
    }

    /// Every value of `name` (lowercase), in order, as bytes.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, value)| value)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl HeaderMap {
    /// Every header, in order, as (name, value) bytes.
    pub fn pairs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs
            .iter()
            .filter_map(|(n, v)| Some((self.bytes.get(n.clone())?, self.bytes.get(v.clone())?)))
    }
}

impl Drop for HeaderMap {
    fn drop(&mut self) {
        crate::cache::wipe(std::mem::take(&mut self.bytes));
    }
}

/// Serializes pairs in the ABI's format (for tests and the native mock host).
pub fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let count = u32::try_from(pairs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for (name, value) in pairs {
        for len in [name.len(), value.len()] {
            out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        }
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_values_and_presence() {
        let map = HeaderMap::parse(serialize(&[
            (":method", b"GET"),
            (":authority", b"api.example.com:8080"),
            ("proxy-authorization", b"Basic dG9rOg=="),
            ("x-two", b"first"),
            ("x-two", b"second"),
            ("x-empty", b""),
            ("x-binary", &[0xff, 0xfe]),
        ]));
        assert_eq!(map.len(), 7);
        assert_eq!(map.get(":method"), Some("GET"));
        assert_eq!(map.get(":authority"), Some("api.example.com:8080"));
        assert_eq!(map.get("proxy-authorization"), Some("Basic dG9rOg=="));
        assert_eq!(map.get("x-two"), Some("first"), "the first of several");
        assert_eq!(map.get("x-empty"), Some(""));
        assert_eq!(map.get("x-binary"), None, "not UTF-8");
        assert!(map.contains("x-binary"));
        assert!(!map.contains("x-vault"));
        assert_eq!(map.get("x-vault"), None);
        assert!(!map.contains("proxy"), "whole names only");
        let all: Vec<&[u8]> = map.all("x-two").collect();
        assert_eq!(all, vec![&b"first"[..], &b"second"[..]]);
        assert_eq!(map.iter().count(), 7);
        assert_eq!(
            map.iter().nth(1),
            Some((&b":authority"[..], &b"api.example.com:8080"[..]))
        );
    }

    #[test]
    fn malformed_input_reads_as_no_headers() {
        let good = serialize(&[(":path", b"/v1"), ("host", b"h")]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("truncated count", good[..2].to_vec()),
            ("truncated sizes", good[..10].to_vec()),
            ("truncated data", good[..good.len() - 1].to_vec()),
            ("count too large", {
                let mut b = good.clone();
                b[0] = 0xff;
                b
            }),
            ("length past the end", {
                let mut b = good.clone();
                b[4] = 0xf0;
                b
            }),
        ];
        for (behaviour, bytes) in cases {
            let map = HeaderMap::parse(bytes);
            assert!(map.is_empty(), "{behaviour}");
            assert_eq!(map.get(":path"), None, "{behaviour}");
        }
    }
}
