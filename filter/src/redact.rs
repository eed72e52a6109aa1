//! Response redaction: removes the credential values the filter injected into a
//! request from that request's response headers and body, before the agent sees
//! them (an upstream that echoes its `Authorization` header, a debug endpoint, an
//! error page quoting the request).
//!
//! **What is searched.** Each value of `Secrets::redact` (every credential value of
//! the service's keys and every header value injected) in the encodings an echo
//! commonly uses: raw; base64, standard and URL-safe, unpadded (so a padded echo is
//! caught too: its padding is left, the secret is not); percent-encoded with upper or
//! lower-case hex, also with a space as `+`; JSON-escaped, also with `/` as `\/`.
//! Values shorter than [`MIN_SECRET_LEN`] bytes are skipped: a secret that short is
//! not worth redacting every occurrence of a common word. Every occurrence is
//! replaced with a mask of the same length ([`mask`]: `[REDACTED]` then `*`s), so a
//! body keeps its length and its `content-length` holds: the response is not
//! re-framed (chunked) for the agent. A secret re-encoded any other way (hex, inside a
//! longer base64 blob at another alignment, split by the upstream's own formatting)
//! is not recognised.
//!
//! **Search.** A handful of patterns per request (up to nine per value,
//! deduplicated), each searched with `memchr::memmem`, leftmost-longest. Built once
//! per set of cached values (with [`crate::decide::Secrets`], which the worker
//! reuses for every request those values serve until one of them changes), not per
//! request; construction cost still counts on every refresh: measured on the host
//! (`building_the_patterns_is_cheap`, release build), an `aho-corasick` automaton
//! for two values took ~260 µs to build (~100 µs as a plain NFA), while prebuilt
//! `memmem` finders took ~12 µs, and the plain pattern list (searched with
//! `memmem::find`) ~2 µs; a body is scanned once per pattern, which for so few
//! patterns costs little. The patterns are encodings of secrets: kept as plain byte
//! vectors so that they are wiped when dropped (a prebuilt finder keeps its own copy).
//!
//! **Streaming.** A body passes chunk by chunk ([`Redactor::push`]): the last
//! `longest pattern - 1` bytes of a chunk are held back (the *carry*) and searched
//! with the next chunk, so a secret split across chunks is still caught; the carry is
//! given out at the end ([`Redactor::finish`]). Whatever the split, the output is the
//! same as for the whole body at once (the property test below). A match is final
//! once the buffer holds `longest` bytes from its start: every pattern that could
//! start there is then visible, and none can start before it (it would have been
//! found first).

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;

use agent_vault_rules::substitution::{form_encode, json_escape, percent_encode};

/// What a mask starts with (see [`mask`]).
pub const REPLACEMENT: &[u8] = b"[REDACTED]";

/// What replaces an occurrence `len` bytes long: as long as it, so that a body's length
/// does not change: `[REDACTED]` and `*`s up to `len`; for 8 or 9 bytes (the shortest
/// secrets), `[REDACT]` and `*`s.
pub fn mask(len: usize) -> Vec<u8> {
    const SHORT: &[u8] = b"[REDACT]";
    let head = if len >= REPLACEMENT.len() {
        REPLACEMENT
    } else if len >= SHORT.len() {
        SHORT
    } else {
        b""
    };
    let mut out = head.to_vec();
    out.resize(len, b'*');
    out
}

/// `text` with each mask ([`mask`]) shortened to `[REDACTED]`: what a test compares.
#[cfg(test)]
pub(crate) fn unmasked(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("[REDACT") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let head = if after.starts_with("[REDACTED]") {
            "[REDACTED]"
        } else if after.starts_with("[REDACT]") {
            "[REDACT]"
        } else {
            "[REDACT"
        };
        out.push_str("[REDACTED]");
        rest = after[head.len()..].trim_start_matches('*');
    }
    out.push_str(rest);
    out
}

/// Values shorter than this (in bytes) are not redacted.
pub const MIN_SECRET_LEN: usize = 8;

/// The patterns of one set of secrets (wiped when the last clone is dropped). Built
/// once per set of cached values ([`crate::decide::Secrets`]) and shared by every
/// request those values serve: a clone shares the patterns, it does not copy them.
#[derive(Clone)]
pub struct Patterns {
    /// Longest first (so the first of equal starts wins).
    needles: std::rc::Rc<[Vec<u8>]>,
    /// The longest pattern's length.
    longest: usize,
    /// By byte value: whether some pattern starts with it, i.e. where a chunk's tail
    /// could begin a secret (see [`Patterns::held_from`]).
    starts: std::rc::Rc<[bool; 256]>,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patterns")
            .field("count", &self.needles.len())
            .finish()
    }
}

impl Drop for Patterns {
    fn drop(&mut self) {
        // Only the last clone holds the patterns alone.
        if let Some(needles) = std::rc::Rc::get_mut(&mut self.needles) {
            for needle in needles.iter_mut() {
                crate::cache::wipe(std::mem::take(needle));
            }
        }
    }
}

impl Patterns {
    /// The patterns of `values`; `None` when none is long enough to redact.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Patterns> {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values {
            if value.len() < MIN_SECRET_LEN {
                continue;
            }
            for pattern in encodings(value) {
                if !patterns.contains(&pattern) {
                    patterns.push(pattern);
                }
            }
        }
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let longest = patterns.first()?.len();
        let mut starts = [false; 256];
        for first in patterns.iter().filter_map(|p| p.first()) {
            if let Some(starts) = starts.get_mut(usize::from(*first)) {
                *starts = true;
            }
        }
        Some(Patterns {
            needles: patterns.into(),
            longest,
            starts: std::rc::Rc::new(starts),
        })
    }

    /// Where the part of `text` that may be the beginning of a secret starts: the
    /// first position whose rest is shorter than some pattern and begins it (`len` if
    /// none). Only those bytes need to wait for the next chunk. Every match starting
    /// before it is final: a longer one from the same start would run past the end,
    /// so its start would be such a position. Most chunks end in no pattern's first
    /// bytes and are given out whole, without being written back.
    fn held_from(&self, text: &[u8]) -> usize {
        let tail = text.len().saturating_sub(self.longest.saturating_sub(1));
        (tail..text.len())
            .find(|&at| {
                let rest = text.get(at..).unwrap_or_default();
                rest.first()
                    .is_some_and(|&b| self.starts.get(usize::from(b)) == Some(&true))
                    && self
                        .needles
                        .iter()
                        .any(|needle| needle.len() > rest.len() && needle.starts_with(rest))
            })
            .unwrap_or(text.len())
    }

    /// The leftmost match at or after `from`, the longest of those starting there:
    /// `(start, end)`. `next` caches each pattern's next occurrence (`None`: none
    /// left), so a text is scanned once per pattern, not once per match.
    fn find(
        &self,
        text: &[u8],
        from: usize,
        next: &mut [Option<Option<usize>>],
    ) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (needle, cached) in self.needles.iter().zip(next.iter_mut()) {
            let position = match *cached {
                Some(Some(at)) if at >= from => Some(at),
                Some(None) => None,
                _ => {
                    // A pattern longer than what is left cannot be in it: skipped
                    // before `memmem` builds a searcher for it (most header values,
                    // and small bodies, are shorter than every pattern).
                    let found = text
                        .get(from..)
                        .filter(|rest| rest.len() >= needle.len())
                        .and_then(|rest| memchr::memmem::find(rest, needle))
                        .map(|at| at + from);
                    *cached = Some(found);
                    found
                }
            };
            if let Some(start) = position {
                // Longest first: a later pattern with the same start is shorter.
                if best.is_none_or(|(s, _)| start < s) {
                    best = Some((start, start + needle.len()));
                }
            }
        }
        best
    }

    /// `text` with every occurrence replaced, and how many there were; `None` when
    /// there was none (nothing to write back).
    pub fn redact(&self, text: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let (cursor, count) = self.replace(text, text.len(), &mut out);
        if count == 0 {
            return None;
        }
        out.extend_from_slice(text.get(cursor..).unwrap_or_default());
        Some((out, count))
    }

    /// Writes `text` to `out` with every match that starts before `final_before`
    /// replaced, up to the end of the last such match; returns where it stopped and
    /// the count.
    fn replace(&self, text: &[u8], final_before: usize, out: &mut Vec<u8>) -> (usize, usize) {
        let mut cursor = 0;
        let mut count = 0;
        let mut next = vec![None; self.needles.len()];
        while let Some((start, end)) = self.find(text, cursor, &mut next) {
            if start >= final_before {
                break;
            }
            out.extend_from_slice(text.get(cursor..start).unwrap_or_default());
            out.extend_from_slice(&mask(end - start));
            cursor = end;
            count += 1;
        }
        (cursor, count)
    }
}

/// The encodings of `value` an echo commonly uses (may repeat one another).
fn encodings(value: &str) -> Vec<Vec<u8>> {
    let percent = percent_encode(value);
    let form = form_encode(value);
    let json = json_escape(value);
    let json_slashes = json.replace('/', "\\/");
    let mut all = vec![
        value.as_bytes().to_vec(),
        STANDARD_NO_PAD.encode(value).into_bytes(),
        URL_SAFE_NO_PAD.encode(value).into_bytes(),
        lower_hex(&percent).into_bytes(),
        lower_hex(&form).into_bytes(),
        percent.into_bytes(),
        form.into_bytes(),
        json.into_bytes(),
        json_slashes.into_bytes(),
    ];
    all.dedup();
    all
}

/// `%XX` escapes with lower-case hex digits.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if c == '%' {
            hex_left = 2;
            out.push(c);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// One response body's redaction, chunk by chunk.
#[derive(Debug)]
pub struct Redactor {
    patterns: Patterns,
    /// The end of the last chunk, not given out yet.
    carry: Vec<u8>,
    /// Occurrences replaced so far.
    count: usize,
}

impl Drop for Redactor {
    /// The carry may hold part of a secret.
    fn drop(&mut self) {
        crate::cache::wipe(std::mem::take(&mut self.carry));
    }
}

impl Redactor {
    /// A redactor for one body.
    pub fn new(patterns: Patterns) -> Redactor {
        Redactor {
            patterns,
            carry: Vec::new(),
            count: 0,
        }
    }

    /// Occurrences replaced so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Takes the next chunk; returns what can be given out now (holding back at most
    /// `longest - 1` bytes: only a tail that may begin a secret).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buffer = std::mem::take(&mut self.carry);
        buffer.extend_from_slice(chunk);
        let keep_from = self.patterns.held_from(&buffer);
        let mut out = Vec::with_capacity(buffer.len());
        let (cursor, count) = self.patterns.replace(&buffer, keep_from, &mut out);
        self.count += count;
        let emit_to = keep_from.max(cursor);
        out.extend_from_slice(buffer.get(cursor..emit_to).unwrap_or_default());
        buffer.drain(..emit_to);
        self.carry = buffer;
        out
    }

    /// The end of the body: gives out the carry, redacted.
    pub fn finish(&mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        let mut out = Vec::with_capacity(carry.len());
        let (cursor, count) = self.patterns.replace(&carry, carry.len(), &mut out);
        self.count += count;
        out.extend_from_slice(carry.get(cursor..).unwrap_or_default());
        out
    }
}

/// Where a gRPC response's messages end (gRPC over HTTP/2, "Length-Prefixed-Message":
/// a compressed flag byte, a 4-byte big-endian length, the message).
///
/// A gRPC response ends with trailers, so its body never gets `end_of_stream`, and a
/// tail held back for a scan could never be given out after the last chunk; a
/// server-streaming call would also see each message late. So a gRPC response's
/// redaction gives out everything whenever the bytes so far end exactly at a
/// message's end (where upstreams end their DATA frames): a secret is looked for within
/// each message, across chunks, and never held past its message. Masks keep the
/// length, so the framing stays right. A message the upstream compressed
/// (`grpc-encoding`) is scanned as it is: a secret inside it is not seen.
#[derive(Debug, Default)]
pub struct GrpcFraming {
    /// The prefix of the next message read so far (fewer than 5 bytes).
    prefix: Vec<u8>,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl GrpcFraming {
    /// Reads `chunk`; whether the bytes so far end at a message's end.
    pub fn at_message_end_after(&mut self, chunk: &[u8]) -> bool {
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                self.remaining -= take as u64;
                rest = rest.get(take..).unwrap_or_default();
                continue;
            }
            let take = (5 - self.prefix.len()).min(rest.len());
            let (head, tail) = rest.split_at(take);
            self.prefix.extend_from_slice(head);
            rest = tail;
            if let [_, a, b, c, d] = self.prefix[..] {
                self.remaining = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.prefix.clear();
            }
        }
        self.remaining == 0 && self.prefix.is_empty()
    }
}

/// The most a response may inflate to from one chunk: a bound on the memory a
/// compressed response can take (a "zip bomb"), far above what a legitimate chunk of
/// an upstream's response inflates to (Envoy reads upstreams in chunks of tens of KB).
pub const MAX_INFLATED_CHUNK: usize = 16 * 1024 * 1024;

/// How a redacting response's body is compressed, from its `content-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `gzip` or `x-gzip`.
    Gzip,
    /// `deflate` (the zlib format, RFC 9110 §8.4.1.2).
    Deflate,
}

/// The compression of a response whose `content-encoding` is `value`: `Ok(None)` for
/// none (`identity`, or absent), `Err` with the encoding when the filter cannot decode
/// it (any other, or several stacked).
pub fn compression(value: Option<&str>) -> Result<Option<Compression>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let codings: Vec<String> = value
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    match codings.as_slice() {
        [] => Ok(None),
        [one] if one == "gzip" || one == "x-gzip" => Ok(Some(Compression::Gzip)),
        [one] if one == "deflate" => Ok(Some(Compression::Deflate)),
        _ => Err(value.trim().to_owned()),
    }
}

/// The `accept-encoding` to send upstream for a redacting request whose agent sent
/// `value`, so that a well-behaved upstream only answers with what the filter can
/// decode; `None` when `value` already asks for nothing else. Keeps `gzip`, `x-gzip`,
/// `deflate` and `identity` with their parameters, drops every other coding (and `*`);
/// with none left, `identity`. No header at all is left alone (no host call on the
/// hot path): upstreams answer such requests uncompressed in practice, and one that
/// does not, with an encoding the filter cannot decode, gets the 502.
pub fn decodable_accept_encoding(value: Option<&str>) -> Option<String> {
    let value = value?;
    let mut kept = Vec::new();
    let mut dropped = false;
    for item in value.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let coding = item.split(';').next().unwrap_or_default().trim();
        if ["gzip", "x-gzip", "deflate", "identity"]
            .iter()
            .any(|ok| coding.eq_ignore_ascii_case(ok))
        {
            kept.push(item);
        } else {
            dropped = true;
        }
    }
    if !dropped && !kept.is_empty() {
        return None;
    }
    if kept.is_empty() {
        return Some("identity".to_owned());
    }
    Some(kept.join(", "))
}

/// The inflated output of one chunk, bounded by [`MAX_INFLATED_CHUNK`].
#[derive(Debug, Default)]
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.len().saturating_add(data.len()) > MAX_INFLATED_CHUNK {
            return Err(std::io::Error::other("inflates to too much"));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Bounded>),
    Deflate(flate2::write::ZlibDecoder<Bounded>),
}

/// Why a compressed body cannot be passed on (the response is then cut off: its
/// headers are gone already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable(pub String);

/// A compressed body's streaming decompression.
#[derive(Debug)]
pub struct Inflater(Decoder);

impl Inflater {
    /// For a body compressed with `compression`.
    pub fn new(compression: Compression) -> Inflater {
        Inflater(match compression {
            Compression::Gzip => {
                Decoder::Gzip(flate2::write::MultiGzDecoder::new(Bounded::default()))
            }
            Compression::Deflate => {
                Decoder::Deflate(flate2::write::ZlibDecoder::new(Bounded::default()))
            }
        })
    }

    /// Inflates the next chunk; `end`: it is the last.
    pub fn push(&mut self, chunk: &[u8], end: bool) -> Result<Vec<u8>, Undecodable> {
        use std::io::Write;
        let failed = |e: std::io::Error| Undecodable(e.to_string());
        let out = match &mut self.0 {
            Decoder::Gzip(decoder) => {
                decoder.write_all(chunk).map_err(failed)?;
                if end {
                    decoder.try_finish().map_err(failed)?;
                }
                decoder.get_mut()
            }
            Decoder::Deflate(decoder) => {
                decoder.write_all(chunk).map_err(failed)?;
                if end {
                    decoder.try_finish().map_err(failed)?;
                }
                decoder.get_mut()
            }
        };
        Ok(std::mem::take(&mut out.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "sk_test_4eC39/HqLyjWDarjtT1zdp7dc";

    fn patterns(values: &[&str]) -> Patterns {
        Patterns::new(values.iter().copied()).unwrap_or_else(|| panic!("no patterns"))
    }

    fn whole(patterns: &Patterns, text: &[u8]) -> (Vec<u8>, usize) {
        let mut redactor = Redactor::new(patterns.clone());
        let mut out = redactor.push(text);
        out.extend(redactor.finish());
        (out, redactor.count())
    }

    fn text(bytes: &[u8]) -> String {
        unmasked(&String::from_utf8_lossy(bytes))
    }

    #[test]
    fn a_mask_is_as_long_as_what_it_replaces() {
        for len in 8..40 {
            let mask = mask(len);
            assert_eq!(mask.len(), len);
            assert_eq!(unmasked(&String::from_utf8_lossy(&mask)), "[REDACTED]");
        }
        let p = patterns(&[SECRET]);
        let body = format!("{{\"k\":\"{SECRET}\"}}");
        let (out, _) = whole(&p, body.as_bytes());
        assert_eq!(out.len(), body.len(), "a redacted body keeps its length");
    }

    #[test]
    fn every_common_encoding_of_a_secret_is_replaced() {
        let p = patterns(&[SECRET, "Bearer sk_test_4eC39/HqLyjWDarjtT1zdp7dc"]);
        // (behaviour, the echo)
        #[rustfmt::skip]
        let cases: Vec<(&str, String)> = vec![
            ("raw", SECRET.to_owned()),
            ("the injected header value", format!("Bearer {SECRET}")),
            ("base64, padded", STANDARD.encode(SECRET)),
            ("base64 of the header value", STANDARD.encode(format!("Bearer {SECRET}"))),
            ("base64url", URL_SAFE_NO_PAD.encode(SECRET)),
            ("percent-encoded", percent_encode(SECRET)),
            ("percent-encoded, lower-case hex", percent_encode(SECRET).replace("%2F", "%2f")),
            ("form-encoded header value", form_encode(&format!("Bearer {SECRET}"))),
            ("JSON-escaped slash", SECRET.replace('/', "\\/")),
        ];
        for (behaviour, echo) in cases {
            let body = format!("{{\"echo\":\"{echo}\"}}");
            let (out, count) = whole(&p, body.as_bytes());
            let out = text(&out);
            assert!(count >= 1, "{behaviour}: {out}");
            assert!(out.contains("[REDACTED]"), "{behaviour}: {out}");
            assert!(!out.contains(&echo), "{behaviour}: {out}");
            assert!(!out.contains("4eC39"), "{behaviour}: {out}");
        }
    }

    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn short_values_are_not_secrets_worth_redacting() {
        assert!(Patterns::new(["1234567"]).is_none());
        let p = patterns(&["1234567", "12345678"]);
        let (out, count) = whole(&p, b"1234567 and 12345678");
        assert_eq!(text(&out), "1234567 and [REDACTED]");
        assert_eq!(count, 1);
    }

    #[test]
    fn a_text_without_secrets_is_left_alone() {
        let p = patterns(&[SECRET]);
        assert_eq!(p.redact(b"nothing here"), None);
        let (out, count) = whole(&p, b"nothing here");
        assert_eq!((text(&out), count), ("nothing here".to_owned(), 0));
    }

    #[test]
    fn the_longest_pattern_wins_and_every_occurrence_counts() {
        let p = patterns(&[SECRET, &format!("Bearer {SECRET}")]);
        let body = format!("a Bearer {SECRET} b {SECRET}{SECRET}");
        let (out, count) = whole(&p, body.as_bytes());
        assert_eq!(text(&out), "a [REDACTED] b [REDACTED][REDACTED]");
        assert_eq!(count, 3);
        let (header, count) = p.redact(body.as_bytes()).unwrap_or_default();
        assert_eq!(text(&header), "a [REDACTED] b [REDACTED][REDACTED]");
        assert_eq!(count, 3);
    }

    #[test]
    fn a_secret_split_across_chunks_is_caught() {
        let p = patterns(&[SECRET]);
        let body = format!("data: {SECRET}\n\n");
        for split in 0..=body.len() {
            let mut redactor = Redactor::new(p.clone());
            let mut out = redactor.push(&body.as_bytes()[..split]);
            out.extend(redactor.push(&body.as_bytes()[split..]));
            out.extend(redactor.finish());
            assert_eq!(text(&out), "data: [REDACTED]\n\n", "split at {split}");
        }
    }

    #[test]
    fn a_chunk_holds_back_only_a_tail_that_may_begin_a_secret() {
        let p = patterns(&[SECRET]);
        let mut redactor = Redactor::new(p.clone());
        assert_eq!(redactor.push(&[b'x'; 1000]).len(), 1000, "nothing to hold");
        let begun = [&[b'x'; 1000][..], &SECRET.as_bytes()[..5]].concat();
        assert_eq!(
            redactor.push(&begun).len(),
            1000,
            "the secret's first bytes wait"
        );
        // At most `longest - 1` bytes: a tail full of first bytes is held from there.
        let mut redactor = Redactor::new(p.clone());
        let first = SECRET.as_bytes()[0];
        let out = redactor.push(&vec![first; 1000]);
        assert!(out.len() >= 1000 - (p.longest - 1), "{}", out.len());
        assert_eq!(
            [out, redactor.finish()].concat(),
            vec![first; 1000],
            "all given out at the end"
        );
    }

    /// A quick benchmark: building the automaton happens per redacting request.
    /// Run with `cargo test -p agent-vault-filter --release building -- --nocapture`.
    #[test]
    fn building_the_patterns_is_cheap() {
        let rounds = 2000u32;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let built = Patterns::new([SECRET, "Bearer sk_test_4eC39/HqLyjWDarjtT1zdp7dc"]);
            assert!(built.is_some());
        }
        let per = start.elapsed() / rounds;
        println!("building the patterns of two values: {per:?}");
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            assert!(encodings(SECRET).len() > 1);
        }
        println!("the encodings of one value: {:?}", start.elapsed() / rounds);
        let patterns = Patterns::new([SECRET, "Bearer sk_test_4eC39/HqLyjWDarjtT1zdp7dc"])
            .unwrap_or_else(|| panic!("no patterns"));
        let body: Vec<u8> = (0..1 << 20).map(|i| b"{\"id\": 12, \"na"[i % 14]).collect();
        let start = std::time::Instant::now();
        let mut redactor = Redactor::new(patterns);
        for piece in body.chunks(16 * 1024) {
            assert!(!redactor.push(piece).is_empty());
        }
        println!(
            "redacting 1 MiB in 16 KiB chunks, no match: {:?}",
            start.elapsed()
        );
        // Generous even for an unoptimised build on a loaded machine.
        assert!(per < std::time::Duration::from_millis(5), "{per:?}");
    }

    #[test]
    fn gzip_and_deflate_are_decoded_anything_else_is_refused() {
        // (content-encoding, expected)
        #[rustfmt::skip]
        type Case<'a> = (Option<&'a str>, Result<Option<Compression>, String>);
        let cases: Vec<Case<'_>> = vec![
            (None, Ok(None)),
            (Some("identity"), Ok(None)),
            (Some("gzip"), Ok(Some(Compression::Gzip))),
            (Some(" X-GZIP "), Ok(Some(Compression::Gzip))),
            (Some("deflate"), Ok(Some(Compression::Deflate))),
            (Some("br"), Err("br".to_owned())),
            (Some("zstd"), Err("zstd".to_owned())),
            (Some("gzip, br"), Err("gzip, br".to_owned())),
            (Some("gzip, gzip"), Err("gzip, gzip".to_owned())),
            (Some("compress"), Err("compress".to_owned())),
        ];
        for (value, expected) in cases {
            assert_eq!(compression(value), expected, "{value:?}");
        }
    }

    #[test]
    fn the_agents_accept_encoding_is_cut_to_what_the_filter_decodes() {
        // (the agent's accept-encoding, what goes upstream: None = unchanged)
        #[rustfmt::skip]
        let cases: Vec<(Option<&str>, Option<&str>)> = vec![
            (None, None),
            (Some("gzip, deflate"), None),
            (Some("gzip;q=1.0, identity; q=0.5"), None),
            (Some("gzip, deflate, br, zstd"), Some("gzip, deflate")),
            (Some("br;q=1.0, gzip;q=0.8"), Some("gzip;q=0.8")),
            (Some("br"), Some("identity")),
            (Some("*"), Some("identity")),
            (Some(""), Some("identity")),
        ];
        for (agent, upstream) in cases {
            assert_eq!(
                decodable_accept_encoding(agent).as_deref(),
                upstream,
                "{agent:?}"
            );
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = encoder.write_all(data);
        encoder.finish().unwrap_or_default()
    }

    #[test]
    fn a_compressed_body_is_inflated_chunk_by_chunk_and_redacted() {
        let p = patterns(&[SECRET]);
        let body = format!("{{\"authorization\":\"Bearer {SECRET}\"}}");
        let compressed = gzip(body.as_bytes());
        for split in [0, 1, 10, compressed.len() / 2, compressed.len()] {
            let mut inflater = Inflater::new(Compression::Gzip);
            let mut redactor = Redactor::new(p.clone());
            let first = inflater
                .push(&compressed[..split], false)
                .unwrap_or_default();
            let mut out = redactor.push(&first);
            let second = inflater
                .push(&compressed[split..], true)
                .unwrap_or_default();
            out.extend(redactor.push(&second));
            out.extend(redactor.finish());
            assert_eq!(
                text(&out),
                "{\"authorization\":\"Bearer [REDACTED]\"}",
                "split at {split}"
            );
        }
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = std::io::Write::write_all(&mut zlib, body.as_bytes());
        let deflated = zlib.finish().unwrap_or_default();
        let inflated = Inflater::new(Compression::Deflate).push(&deflated, true);
        assert_eq!(inflated.map(|b| text(&b)), Ok(body));
    }

    #[test]
    fn a_zip_bomb_or_garbage_is_undecodable_not_passed_on() {
        let bomb = gzip(&vec![0u8; MAX_INFLATED_CHUNK + 1]);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        let mut inflater = Inflater::new(Compression::Gzip);
        assert!(inflater.push(&bomb, true).is_err());
        let mut inflater = Inflater::new(Compression::Gzip);
        assert!(inflater.push(b"not gzip at all", false).is_err());
    }

    proptest! {
        /// Any split of a body into chunks gives the same output as the whole body,
        /// and no pattern survives.
        #[test]
        fn any_split_gives_the_whole_bodys_output(
            secrets in proptest::collection::vec("[a-zA-Z0-9/+ _-]{8,20}", 1..3),
            pieces in proptest::collection::vec(
                prop_oneof!["[a-zA-Z0-9/+%= \\\\_-]{0,12}", Just("S0".to_owned()), Just("S1".to_owned()), Just("B0".to_owned())],
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let Some(p) = Patterns::new(refs.iter().copied()) else {
                return Ok(());
            };
            let mut body = Vec::new();
            for piece in &pieces {
                match piece.as_str() {
                    "S0" => body.extend_from_slice(secrets[0].as_bytes()),
                    "S1" => body.extend_from_slice(secrets[secrets.len() - 1].as_bytes()),
                    "B0" => body.extend_from_slice(STANDARD.encode(&secrets[0]).as_bytes()),
                    other => body.extend_from_slice(other.as_bytes()),
                }
            }
            let (expected, expected_count) = whole(&p, &body);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let mut redactor = Redactor::new(p.clone());
            let mut out = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([body.len()]) {
                out.extend(redactor.push(&body[from..cut]));
                from = cut;
            }
            out.extend(redactor.finish());
            prop_assert_eq!(&out, &expected);
            prop_assert_eq!(redactor.count(), expected_count);
            for secret in &secrets {
                for pattern in encodings(secret) {
                    prop_assert!(
                        !out.windows(pattern.len()).any(|w| w == pattern.as_slice()),
                        "{} survives in {}", text(&pattern), text(&out)
                    );
                }
            }
        }
    }

    #[test]
    fn grpc_framing_finds_each_message_end_across_and_within_chunks() {
        let framed = |payload: &[u8]| {
            let mut out = vec![0u8];
            out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(payload);
            out
        };
        let mut stream = framed(b"hello");
        stream.extend(framed(b""));
        stream.extend(framed(&[7u8; 300]));
        // Whole: ends at a message end.
        assert!(GrpcFraming::default().at_message_end_after(&stream));
        // Byte by byte: true exactly after each message's last byte.
        let mut framing = GrpcFraming::default();
        let ends: Vec<usize> = stream
            .iter()
            .enumerate()
            .filter(|(_, byte)| framing.at_message_end_after(&[**byte]))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(ends, vec![10, 15, 320]);
        // Inside a prefix or a message: not an end.
        let mut framing = GrpcFraming::default();
        assert!(!framing.at_message_end_after(&stream[..3]));
        assert!(!framing.at_message_end_after(&stream[3..7]));
        assert!(framing.at_message_end_after(&stream[7..15]));
    }
}
