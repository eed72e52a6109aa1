//! The request log (DESIGN.md §3 step 7): what Envoy's filter reports about each
//! proxied request, stored per vault with retention.
//!
//! Records arrive in batches over the data-plane socket ([`crate::dataplane`]) and are
//! read through the management API (`GET /v1/vaults/{vault}/logs`). Every record gets
//! a sequence from the store's id generator (from 1, increasing across restarts), so a
//! vault's records are in arrival order and a reader continues `after` the last
//! sequence it saw. A batch's records of one vault are stored together, as one chunk
//! in the `logs` tree: key `<vault id>\0<8-byte big-endian sequence of its first
//! record>`, value the JSON array `[[seq, record], ...]`. Chunks never overlap (batches
//! are written one at a time), so key order is sequence order. One sled write per
//! batch instead of one per record: at thousands of proxied requests a second, per-key
//! inserts and removals were most of this server's CPU. (A key holding a bare record,
//! the format before chunks, reads as a chunk of one.) A record holds no header value,
//! no query string and no body: the filter never sends them, and the path is cut at
//! `?` / `#` here as well, in case one does.
//!
//! Two classes of records are kept apart, each in a tree of its own with the same layout
//! and its own retention budget: requests forwarded under a service rule (tree `logs`:
//! where credentials go, what an audit needs) and everything else (tree `other_logs`:
//! refusals, and unmatched hosts forwarded under `passthrough`). Otherwise an agent
//! could flush the trail of what it did with a credential by sending ten thousand
//! cheap refused requests. A page merges the two by sequence.
//!
//! Retention: at most `max_records` per vault and class, and nothing older than
//! `max_age_days` (by the record's `ts`). Pruning happens on insert and stays cheap: each
//! vault's record count per class is stored beside the records (tree `log_counts`,
//! counted from the records once for a store written before counts) and written with
//! them; a vault that passes the limit loses that class's oldest records in the same
//! write, whole chunks first (key order); and both trees are pruned every
//! [`PRUNE_EVERY`] batches (the first batch after a start included), by age and count,
//! which also drops the records of deleted vaults.
//!
//! Several control planes on one PostgreSQL store append to the same log: sequences
//! are drawn and the chunks (and counts) written as one step under a lock of the
//! database ([`Store::apply_with_ids`]), so chunks never interleave, counts stay exact,
//! and a reader continuing `after` the last sequence it saw misses none committed later.

use std::collections::{HashMap, HashSet};
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_vault_rules::{LogRecord, MAX_LOG_BATCH_RECORDS};
use serde::Serialize;

use crate::access::{Access, Principal, VaultRecord};
use crate::error::{Error, Result};
use crate::store::{prefix_end, scan_json, vault_prefix, Store};

/// Records per page when the reader does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Most records per page.
pub const MAX_PAGE: usize = 1000;
/// Every this many batches, the whole tree is pruned.
pub const PRUNE_EVERY: u64 = 100;

/// Keys removed per transaction while pruning.
const PRUNE_CHUNK: usize = 5000;
const DAY_MS: i64 = 86_400_000;

/// How much of the request log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Records kept per vault; the oldest go first.
    pub max_records: usize,
    /// Records older than this many days (by their `ts`) are dropped.
    pub max_age_days: u32,
}

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention {
            max_records: 10_000,
            max_age_days: 7,
        }
    }
}

/// Where the data plane's records go: the store, the retention, and the pruning
/// bookkeeping that lives as long as the process (one per server, shared by the
/// data-plane handlers). Reading the log needs none of it ([`Store::read_logs`]).
pub struct RequestLog {
    store: Arc<Store>,
    retention: LogRetention,
    batches: AtomicU64,
    /// Held while sequences are drawn and chunks written or rewritten, so chunks never
    /// interleave and a reader never sees a sequence before an earlier one is stored.
    writer: Mutex<()>,
}

/// One stored record and its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEntry {
    pub seq: u64,
    #[serde(flatten)]
    pub record: LogRecord,
}

/// A page of the log, oldest first; `next` is the `after` for the following page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogPage {
    pub records: Vec<LogEntry>,
    pub next: u64,
}

/// The request log's two retention classes, each in a tree of its own with its own
/// budget per vault, so that a flood of one cannot evict the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    /// Forwarded under a service rule: the requests that carry credentials, the ones an
    /// audit needs. Tree `logs` (which also holds the records of earlier versions).
    Service,
    /// Everything else: refusals (the filter answered itself) and requests forwarded
    /// to an unmatched host under `passthrough`. Tree `other_logs`.
    Other,
}

/// Records with their sequences, as stored under one key.
type Chunk = Vec<(u64, LogRecord)>;

impl Class {
    const ALL: [Class; 2] = [Class::Service, Class::Other];

    fn of(record: &LogRecord) -> Class {
        if record.service.is_some() && record.error.is_none() {
            Class::Service
        } else {
            Class::Other
        }
    }

    /// The key of a vault's record count in this class (tree `log_counts`).
    fn count_key(self, vault_id: &str) -> Vec<u8> {
        let tag = match self {
            Class::Service => b's',
            Class::Other => b'o',
        };
        let mut key = vec![tag, 0];
        key.extend_from_slice(vault_id.as_bytes());
        key
    }

    fn tree(self, store: &Store) -> &crate::store::Tree {
        match self {
            Class::Service => &store.trees.logs,
            Class::Other => &store.trees.other_logs,
        }
    }
}

impl Store {
    /// A page of `vault`'s log for a member or admin: the records after `after` in
    /// ascending order, or without `after` the newest `limit` (still ascending).
    pub fn read_logs(
        &self,
        principal: &Principal,
        vault: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<LogPage> {
        let (record, access) = self.access(principal, vault)?;
        if access == Access::Agent {
            return Err(Error::forbidden(
                "agents cannot read the request log; only vault members and admins can",
            ));
        }
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Error::bad_request(
                "invalid_limit",
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        // Each class's page, merged by sequence: the classes' records interleave.
        let mut records = Vec::new();
        for class in Class::ALL {
            records.extend(page_of(class.tree(self), &record.id, after, limit)?);
        }
        records.sort_by_key(|entry| entry.seq);
        match after {
            Some(_) => records.truncate(limit),
            None => {
                records.drain(..records.len().saturating_sub(limit));
            }
        }
        let next = records.last().map(|entry| entry.seq).or(after).unwrap_or(0);
        Ok(LogPage { records, next })
    }
}

/// Up to `limit` of a vault's records in one tree: the first after `after`, or
/// without it the newest; ascending.
fn page_of(
    tree: &crate::store::Tree,
    vault_id: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<LogEntry>> {
    let prefix = vault_prefix(vault_id);
    let end = prefix_end(&prefix).map_or(Unbounded, Excluded);
    let mut records = Vec::new();
    match after {
        Some(after) => {
            if let Some(first) = after.checked_add(1) {
                let start = log_key(vault_id, first);
                // The chunk holding `first` may start before it.
                let before = tree
                    .range_rev(Included(prefix.clone()), Excluded(start.clone()))
                    .next();
                let chunks = before.into_iter().chain(tree.range(Included(start), end));
                'chunks: for entry in chunks {
                    let (key, value) = entry?;
                    for (seq, record) in decode_chunk(&key, &value)? {
                        if seq > after {
                            records.push(LogEntry { seq, record });
                            if records.len() == limit {
                                break 'chunks;
                            }
                        }
                    }
                }
            }
        }
        None => {
            'newest: for entry in tree.range_rev(Included(prefix), end) {
                let (key, value) = entry?;
                for (seq, record) in decode_chunk(&key, &value)?.into_iter().rev() {
                    records.push(LogEntry { seq, record });
                    if records.len() == limit {
                        break 'newest;
                    }
                }
            }
            records.reverse();
        }
    }
    Ok(records)
}

impl RequestLog {
    /// The request log of `store`, kept within `retention`.
    pub fn new(store: Arc<Store>, retention: LogRetention) -> RequestLog {
        RequestLog {
            store,
            retention,
            batches: AtomicU64::new(0),
            writer: Mutex::default(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn retention(&self) -> LogRetention {
        self.retention
    }

    /// Stores a batch from the data plane in one flushed write and prunes when due.
    /// Records naming an unknown vault are dropped. Returns how many were stored.
    pub fn append(&self, records: Vec<LogRecord>) -> Result<usize> {
        if records.len() > MAX_LOG_BATCH_RECORDS {
            return Err(Error::BatchTooLarge(MAX_LOG_BATCH_RECORDS, "records"));
        }
        let _writer = lock(&self.writer);
        let mut vault_ids: HashMap<String, Option<String>> = HashMap::new();
        let mut known = Vec::with_capacity(records.len());
        for record in records {
            let record = record.sanitized();
            let id = match vault_ids.get(&record.vault) {
                Some(id) => id.clone(),
                None => {
                    let id = self.store.vault(&record.vault)?.map(|v| v.id);
                    vault_ids.insert(record.vault.clone(), id.clone());
                    id
                }
            };
            if let Some(id) = id {
                known.push((id, record));
            }
        }
        if known.is_empty() {
            return Ok(0);
        }
        let stored = known.len();
        let full_prune = self.batches.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == 0;
        // The sequences are drawn and the chunks written as one step, so sequences
        // become visible in order, also across control planes sharing a store.
        self.store.apply_with_ids(stored, |ids| {
            // One chunk per vault and class, in the order they first appear. The
            // store's ids may start at 0; sequences start at 1, so `after=0` means
            // "from the start" and `next: 0` means "nothing yet".
            let mut chunks: Vec<((String, Class), Chunk)> = Vec::new();
            for ((id, record), seq) in known.into_iter().zip(ids) {
                let seq = seq.saturating_add(1);
                let chunk_key = (id, Class::of(&record));
                match chunks.iter_mut().find(|(key, _)| *key == chunk_key) {
                    Some((_, chunk)) => chunk.push((seq, record)),
                    None => chunks.push((chunk_key, vec![(seq, record)])),
                }
            }
            Ok((self.chunk_batches(chunks, full_prune)?, ()))
        })?;
        if full_prune {
            self.prune_logs_locked()?;
        }
        Ok(stored)
    }

    /// One batch per class tree, applied together: the new chunks and, for a vault
    /// that goes over a class's limit, the removal of that class's oldest records,
    /// with the stored record counts (tree `log_counts`) kept up to date. Counts are
    /// read from the store, not kept in memory: on a store shared by several control
    /// planes the others append and prune too (their writes are serialized with these
    /// by [`Store::apply_with_ids`]).
    fn chunk_batches(
        &self,
        chunks: Vec<((String, Class), Chunk)>,
        full_prune: bool,
    ) -> Result<Vec<(&crate::store::Tree, crate::store::Batch)>> {
        let mut batches: HashMap<Class, crate::store::Batch> = HashMap::new();
        let mut counts = crate::store::Batch::default();
        for ((id, class), mut chunk) in chunks {
            let Some((first, _)) = chunk.first() else {
                continue;
            };
            let key = log_key(&id, *first);
            let tree = class.tree(&self.store);
            let batch = batches.entry(class).or_default();
            let count = self.stored_count(class, &id)?;
            let mut excess = (count + chunk.len()).saturating_sub(self.retention.max_records);
            let mut kept = count + chunk.len();
            if !full_prune && excess > 0 {
                let trimmed = trim_oldest(tree, &id, excess, batch)?;
                excess -= trimmed;
                kept -= trimmed;
                // A batch larger than the limit loses its own oldest records too.
                let cut = excess.min(chunk.len());
                chunk.drain(..cut);
                kept -= cut;
            }
            if !chunk.is_empty() {
                batch.insert(key, serde_json::to_vec(&chunk)?);
            }
            counts.insert(class.count_key(&id), (kept as u64).to_be_bytes().to_vec());
        }
        let mut batches: Vec<_> = batches
            .into_iter()
            .map(|(class, batch)| (class.tree(&self.store), batch))
            .collect();
        batches.push((&self.store.trees.log_counts, counts));
        Ok(batches)
    }

    /// A vault's records in a class, as counted in `log_counts` (counted from the
    /// records themselves when the count is missing: stores written before counts).
    fn stored_count(&self, class: Class, vault_id: &str) -> Result<usize> {
        match self.store.trees.log_counts.get(class.count_key(vault_id))? {
            Some(raw) => Ok(raw
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0) as usize),
            None => count_vault_records(class.tree(&self.store), vault_id),
        }
    }

    /// Applies retention to every vault's records and drops those of deleted vaults.
    pub fn prune(&self) -> Result<()> {
        let _writer = lock(&self.writer);
        self.prune_logs_locked()
    }

    fn prune_logs_locked(&self) -> Result<()> {
        let live: HashSet<String> = scan_json::<VaultRecord>(&self.store.trees.vaults, b"")?
            .into_iter()
            .map(|(_, vault)| vault.id)
            .collect();
        let cutoff = self.log_cutoff_ms();
        for class in Class::ALL {
            let tree = class.tree(&self.store);
            for id in log_vault_ids(tree)? {
                if live.contains(&id) {
                    self.prune_vault_logs(class, &id, cutoff)?;
                } else {
                    let keys = tree
                        .scan_prefix(vault_prefix(&id))
                        .keys()
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    self.remove_log_keys(tree, &keys)?;
                    let mut count = crate::store::Batch::default();
                    count.remove(class.count_key(&id));
                    self.store
                        .apply_flushed(&self.store.trees.log_counts, count)?;
                }
            }
        }
        Ok(())
    }

    /// Records with a `ts` before this (unix ms) are past retention.
    fn log_cutoff_ms(&self) -> i64 {
        let days = i64::from(self.retention.max_age_days);
        self.store
            .clock
            .now_ms()
            .saturating_sub(days.saturating_mul(DAY_MS))
    }

    /// Drops a vault's records of `class` older than `cutoff` and then the oldest
    /// beyond the limit.
    fn prune_vault_logs(&self, class: Class, vault_id: &str, cutoff: i64) -> Result<()> {
        let tree = class.tree(&self.store);
        // Read and rewritten as one step with the appends (see `append`).
        self.store.apply_with_ids(0, |_| {
            let mut chunks = Vec::new();
            let mut doomed = Vec::new();
            for entry in tree.scan_prefix(vault_prefix(vault_id)) {
                let (key, value) = entry?;
                match decode_chunk(&key, &value) {
                    Ok(chunk) => chunks.push((key, chunk)),
                    // Unreadable: not worth keeping.
                    Err(_) => doomed.push(key),
                }
            }
            let total: usize = chunks
                .iter()
                .map(|(_, c)| c.iter().filter(|(_, r)| r.ts >= cutoff).count())
                .sum();
            let mut excess = total.saturating_sub(self.retention.max_records);
            let mut batch = crate::store::Batch::default();
            for key in doomed {
                batch.remove(key);
            }
            for (key, chunk) in chunks {
                let before = chunk.len();
                let mut kept: Vec<(u64, LogRecord)> =
                    chunk.into_iter().filter(|(_, r)| r.ts >= cutoff).collect();
                let cut = excess.min(kept.len());
                kept.drain(..cut);
                excess -= cut;
                if kept.is_empty() {
                    batch.remove(key);
                } else if kept.len() != before {
                    batch.insert(key, serde_json::to_vec(&kept)?);
                }
            }
            let kept = total.min(self.retention.max_records) as u64;
            let mut count = crate::store::Batch::default();
            count.insert(class.count_key(vault_id), kept.to_be_bytes().to_vec());
            Ok((
                vec![(tree, batch), (&self.store.trees.log_counts, count)],
                (),
            ))
        })
    }

    fn remove_log_keys(
        &self,
        tree: &crate::store::Tree,
        keys: &[crate::store::Bytes],
    ) -> Result<()> {
        for chunk in keys.chunks(PRUNE_CHUNK) {
            let mut batch = crate::store::Batch::default();
            for key in chunk {
                batch.remove(key);
            }
            self.store.apply_flushed(tree, batch)?;
        }
        Ok(())
    }
}

/// Records of a vault in a tree (reads every chunk: once per vault, class and process).
fn count_vault_records(tree: &crate::store::Tree, vault_id: &str) -> Result<usize> {
    let mut count = 0;
    for entry in tree.scan_prefix(vault_prefix(vault_id)) {
        let (key, value) = entry?;
        count += decode_chunk(&key, &value).map_or(0, |chunk| chunk.len());
    }
    Ok(count)
}

/// Adds to `batch` the removal of a vault's `excess` oldest records in `tree`: whole
/// chunks first (key order), then the front of the oldest remaining chunk. Reads
/// only the chunks it changes (ages are checked by the full prune every
/// [`PRUNE_EVERY`] batches). Returns how many records go.
fn trim_oldest(
    tree: &crate::store::Tree,
    vault_id: &str,
    mut excess: usize,
    batch: &mut crate::store::Batch,
) -> Result<usize> {
    let mut removed = 0;
    for entry in tree.scan_prefix(vault_prefix(vault_id)) {
        if excess == 0 {
            break;
        }
        let (key, value) = entry?;
        let Ok(mut chunk) = decode_chunk(&key, &value) else {
            batch.remove(key);
            continue;
        };
        if chunk.len() <= excess {
            excess -= chunk.len();
            removed += chunk.len();
            batch.remove(key);
        } else {
            let rest = chunk.split_off(excess);
            removed += excess;
            excess = 0;
            batch.insert(key, serde_json::to_vec(&rest)?);
        }
    }
    Ok(removed)
}

/// The distinct vault ids in a log tree, jumping from one prefix to the next.
fn log_vault_ids(tree: &crate::store::Tree) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut from: Vec<u8> = Vec::new();
    while let Some(entry) = tree.range(Included(from.clone()), Unbounded).next() {
        let (key, _) = entry?;
        let id = key.split(|b| *b == 0).next().unwrap_or(&[]);
        ids.push(String::from_utf8_lossy(id).into_owned());
        // `<id>\x01` sorts after every `<id>\0…` key (and after a bare `<id>`).
        from = id.to_vec();
        from.push(1);
    }
    Ok(ids)
}

/// `<vault id>\0<seq as 8 big-endian bytes>`.
fn log_key(vault_id: &str, seq: u64) -> Vec<u8> {
    let mut key = vault_prefix(vault_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The sequence number at the end of a log key.
fn seq_of(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|start| key[start..].try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// The records of a stored chunk with their sequences; a bare record (the format
/// before chunks) is a chunk of one, its sequence in the key.
fn decode_chunk(key: &[u8], value: &[u8]) -> Result<Vec<(u64, LogRecord)>> {
    if value.first() == Some(&b'[') {
        Ok(serde_json::from_slice(value)?)
    } else {
        Ok(vec![(seq_of(key), serde_json::from_slice(value)?)])
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SharedClock};
    use crate::testing::{owner, temp_store};
    use agent_vault_rules::{
        MAX_LOG_ERROR as MAX_ERROR, MAX_LOG_HOST as MAX_HOST, MAX_LOG_METHOD as MAX_METHOD,
        MAX_LOG_NAME as MAX_NAME, MAX_LOG_PATH as MAX_PATH,
    };

    const NOW_MS: i64 = 1_700_000_000_000;

    fn open(clock: SharedClock) -> (tempfile::TempDir, RequestLog) {
        with_retention(clock, LogRetention::default())
    }

    fn with_retention(
        clock: SharedClock,
        retention: LogRetention,
    ) -> (tempfile::TempDir, RequestLog) {
        let (dir, store) = temp_store(clock, false);
        (dir, RequestLog::new(Arc::new(store), retention))
    }

    fn record(vault: &str, path: &str, ts: i64) -> LogRecord {
        LogRecord {
            ts,
            agent: "claude".into(),
            vault: vault.into(),
            method: "GET".into(),
            host: "api.stripe.com".into(),
            path: path.into(),
            service: Some("stripe".into()),
            status: 200,
            latency_ms: 12,
            error: None,
            redactions: 0,
        }
    }

    fn paths(page: &LogPage) -> Vec<String> {
        page.records.iter().map(|e| e.record.path.clone()).collect()
    }

    fn all(store: &Store, vault: &str) -> LogPage {
        store.read_logs(&owner(), vault, Some(0), MAX_PAGE).unwrap()
    }

    #[test]
    fn a_records_redactions_are_kept_and_shown_only_when_there_were_some() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let mut redacted = record("default", "/echo", NOW_MS);
        redacted.redactions = 3;
        log.append(vec![redacted, record("default", "/plain", NOW_MS)])
            .unwrap();
        let page = all(&store, "default");
        let json = serde_json::to_value(&page).unwrap();
        assert_eq!(json["records"][0]["redactions"], 3, "{json}");
        assert!(json["records"][1].get("redactions").is_none(), "{json}");
        assert_eq!(page.records[0].record.redactions, 3);
    }

    #[test]
    fn records_come_back_in_order_and_pages_continue_after_the_last_seq() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        for batch in 0..3 {
            let records = (0..4)
                .map(|i| record("default", &format!("/{batch}/{i}"), NOW_MS))
                .collect();
            assert_eq!(log.append(records).unwrap(), 4);
        }
        let everything = all(&store, "default");
        let expected: Vec<String> = (0..3)
            .flat_map(|b| (0..4).map(move |i| format!("/{b}/{i}")))
            .collect();
        assert_eq!(paths(&everything), expected);
        let seqs: Vec<u64> = everything.records.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(everything.next, *seqs.last().unwrap());

        // Without `after`: the newest `limit`, ascending.
        let newest = store.read_logs(&owner(), "default", None, 3).unwrap();
        assert_eq!(paths(&newest), ["/2/1", "/2/2", "/2/3"]);

        // Paging with `after`.
        let first = store.read_logs(&owner(), "default", Some(0), 5).unwrap();
        assert_eq!(paths(&first), expected[..5]);
        let second = store
            .read_logs(&owner(), "default", Some(first.next), 5)
            .unwrap();
        assert_eq!(paths(&second), expected[5..10]);
        let last = store
            .read_logs(&owner(), "default", Some(everything.next), 5)
            .unwrap();
        assert!(last.records.is_empty());
        assert_eq!(last.next, everything.next, "next stays at the given after");
        let beyond = store
            .read_logs(&owner(), "default", Some(u64::MAX), 5)
            .unwrap();
        assert!(beyond.records.is_empty());
    }

    #[test]
    fn query_strings_and_fragments_are_stripped_and_strings_capped() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let mut long = record("default", "/a?token=secret", NOW_MS);
        long.host = "h".repeat(300);
        long.method = "M".repeat(40);
        long.agent = "é".repeat(100); // 200 bytes: cut on a char boundary
        long.error = Some("e".repeat(100));
        long.service = Some("s".repeat(200));
        log.append(vec![
            long,
            record("default", "/b#frag?x=1", NOW_MS),
            record("default", &format!("/{}", "p".repeat(5000)), NOW_MS),
        ])
        .unwrap();
        let page = all(&store, "default");
        let got = &page.records[0].record;
        assert_eq!(got.path, "/a");
        assert_eq!(got.host.len(), MAX_HOST);
        assert_eq!(got.method.len(), MAX_METHOD);
        assert_eq!(got.agent, "é".repeat(64));
        assert_eq!(got.error.as_deref().map(str::len), Some(MAX_ERROR));
        assert_eq!(got.service.as_deref().map(str::len), Some(MAX_NAME));
        assert_eq!(page.records[1].record.path, "/b");
        assert_eq!(page.records[2].record.path.len(), MAX_PATH);
        let raw: Vec<u8> = store
            .trees
            .logs
            .iter()
            .flat_map(|entry| entry.unwrap().1)
            .collect();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn records_for_unknown_vaults_are_dropped() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let stored = log
            .append(vec![
                record("nope", "/x", NOW_MS),
                record("default", "/kept", NOW_MS),
                record("", "/y", NOW_MS),
            ])
            .unwrap();
        assert_eq!(stored, 1);
        assert_eq!(paths(&all(&store, "default")), ["/kept"]);
        assert_eq!(store.trees.logs.len().unwrap(), 1);
        assert_eq!(log.append(vec![record("nope", "/x", NOW_MS)]).unwrap(), 0);
    }

    #[test]
    fn vaults_keep_separate_logs() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        store.create_vault(&owner(), "other").unwrap();
        log.append(vec![
            record("default", "/d1", NOW_MS),
            record("other", "/o1", NOW_MS),
            record("default", "/d2", NOW_MS),
        ])
        .unwrap();
        assert_eq!(paths(&all(&store, "default")), ["/d1", "/d2"]);
        assert_eq!(paths(&all(&store, "other")), ["/o1"]);
    }

    #[test]
    fn retention_by_count_keeps_the_newest() {
        let retention = LogRetention {
            max_records: 5,
            max_age_days: 7,
        };
        let (_dir, log) = with_retention(ManualClock::new(NOW_MS), retention);
        let store = log.store().clone();
        for i in 0..12 {
            log.append(vec![record("default", &format!("/{i}"), NOW_MS)])
                .unwrap();
        }
        assert_eq!(
            paths(&all(&store, "default")),
            ["/7", "/8", "/9", "/10", "/11"]
        );

        // One batch over the limit is trimmed at once, too.
        let batch = (12..20)
            .map(|i| record("default", &format!("/{i}"), NOW_MS))
            .collect();
        log.append(batch).unwrap();
        assert_eq!(
            paths(&all(&store, "default")),
            ["/15", "/16", "/17", "/18", "/19"]
        );
    }

    #[test]
    fn retention_by_age_uses_the_clock() {
        let clock = ManualClock::new(NOW_MS);
        let (_dir, log) = open(clock.clone());
        let store = log.store().clone();
        assert_eq!(log.retention(), LogRetention::default());
        log.append(vec![record("default", "/old", NOW_MS)]).unwrap();
        clock.advance_secs(6 * 86_400);
        let day6 = NOW_MS + 6 * DAY_MS;
        log.append(vec![record("default", "/day6", day6)]).unwrap();
        log.prune().unwrap();
        assert_eq!(paths(&all(&store, "default")), ["/old", "/day6"]);

        clock.advance_secs(2 * 86_400); // day 8: "/old" is 8 days old
        log.prune().unwrap();
        assert_eq!(paths(&all(&store, "default")), ["/day6"]);

        // A record that arrives already past retention goes at the next prune.
        log.append(vec![record("default", "/stale", NOW_MS)])
            .unwrap();
        log.prune().unwrap();
        assert_eq!(paths(&all(&store, "default")), ["/day6"]);
    }

    #[test]
    fn the_first_batch_and_every_hundredth_prune_everything() {
        let clock = ManualClock::new(NOW_MS);
        let (_dir, log) = open(clock.clone());
        let store = log.store().clone();
        store.create_vault(&owner(), "gone").unwrap();
        log.append(vec![
            record("default", "/old", NOW_MS),
            record("gone", "/g", NOW_MS),
        ])
        .unwrap(); // batch 0: full prune, nothing to drop yet
        store.delete_vault(&owner(), "gone").unwrap();
        clock.advance_secs(8 * 86_400);
        for i in 1..PRUNE_EVERY {
            log.append(vec![record(
                "default",
                &format!("/{i}"),
                NOW_MS + 8 * DAY_MS,
            )])
            .unwrap();
        }
        assert_eq!(store.trees.logs.len().unwrap(), PRUNE_EVERY as usize + 1);
        log.append(vec![record("default", "/last", NOW_MS + 8 * DAY_MS)])
            .unwrap(); // batch 100: the old record and the deleted vault's go
        assert_eq!(store.trees.logs.len().unwrap(), PRUNE_EVERY as usize);
        let page = all(&store, "default");
        assert_eq!(
            page.records.first().map(|e| e.record.path.as_str()),
            Some("/1")
        );
    }

    #[test]
    fn only_members_and_admins_read_and_limits_are_checked() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        log.append(vec![record("default", "/x", NOW_MS)]).unwrap();
        let agent = Principal::Agent {
            name: "claude".into(),
            grants: vec![agent_vault_rules::Grant {
                vault: "default".into(),
                role: agent_vault_rules::Role::Proxy,
            }],
        };
        let err = store.read_logs(&agent, "default", None, 10).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN);
        let stranger = Principal::User {
            email: "x@example.com".into(),
            owner: false,
        };
        let err = store.read_logs(&stranger, "default", None, 10).unwrap_err();
        assert_eq!(err.code(), "vault_not_found");
        for bad in [0, MAX_PAGE + 1] {
            let err = store.read_logs(&owner(), "default", None, bad).unwrap_err();
            assert_eq!(err.code(), "invalid_limit");
        }
        let too_many = vec![record("default", "/x", NOW_MS); MAX_LOG_BATCH_RECORDS + 1];
        let err = log.append(too_many).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(store.trees.logs.len().unwrap(), 1);
    }

    #[test]
    fn log_writes_do_not_bump_the_snapshot_version() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let before = store.snapshot_version().unwrap();
        log.append(vec![record("default", "/x", NOW_MS)]).unwrap();
        assert_eq!(store.snapshot_version().unwrap(), before);
    }

    #[test]
    fn a_bare_record_of_the_earlier_format_reads_as_a_chunk_of_one() {
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let id = store.vault("default").unwrap().unwrap().id;
        let old = serde_json::to_vec(&record("default", "/old", NOW_MS)).unwrap();
        store.trees.logs.insert(log_key(&id, 1), old).unwrap();
        store.generate_id().unwrap(); // sequence 1 is taken
        log.append(vec![record("default", "/new", NOW_MS)]).unwrap();
        let page = all(&store, "default");
        assert_eq!(paths(&page), ["/old", "/new"]);
        assert_eq!(page.records[0].seq, 1);
        let after_old = store.read_logs(&owner(), "default", Some(1), 10).unwrap();
        assert_eq!(paths(&after_old), ["/new"]);
    }

    fn refused(path: &str) -> LogRecord {
        LogRecord {
            service: None,
            status: 403,
            error: Some("forbidden".into()),
            redactions: 0,
            host: "collector.attacker.example".into(),
            ..record("default", path, NOW_MS)
        }
    }

    #[test]
    fn a_flood_of_refused_requests_does_not_evict_the_forwarded_ones() {
        // The review's attack: requests forwarded with a credential, then 10,050 cheap
        // refusals to push them out of the vault's 10,000 records.
        let (_dir, log) = open(ManualClock::new(NOW_MS));
        let store = log.store().clone();
        let forwarded: Vec<LogRecord> = (0..5)
            .map(|i| record("default", &format!("/exfiltrated/{i}"), NOW_MS))
            .collect();
        log.append(forwarded).unwrap();
        let mut sent = 0;
        while sent < 10_050 {
            let batch: Vec<LogRecord> = (sent..(sent + MAX_LOG_BATCH_RECORDS).min(10_050))
                .map(|i| refused(&format!("/flood/{i}")))
                .collect();
            sent += batch.len();
            log.append(batch).unwrap();
        }
        let first = store.read_logs(&owner(), "default", Some(0), 10).unwrap();
        let expected: Vec<String> = (0..5).map(|i| format!("/exfiltrated/{i}")).collect();
        assert_eq!(paths(&first)[..5], expected[..]);
        // The refusals keep their own 10,000, the oldest 50 gone.
        assert_eq!(paths(&first)[5], "/flood/50");
        let mut total = 0;
        let mut after = 0;
        loop {
            let page = store
                .read_logs(&owner(), "default", Some(after), MAX_PAGE)
                .unwrap();
            if page.records.is_empty() {
                break;
            }
            total += page.records.len();
            after = page.next;
        }
        assert_eq!(total, 5 + 10_000);
    }

    #[test]
    fn each_class_keeps_its_own_budget_and_pages_merge_them_in_order() {
        let retention = LogRetention {
            max_records: 3,
            max_age_days: 7,
        };
        let (_dir, log) = with_retention(ManualClock::new(NOW_MS), retention);
        let store = log.store().clone();
        let mut passthrough = record("default", "/p0", NOW_MS);
        passthrough.service = None;
        log.append(vec![
            record("default", "/f0", NOW_MS),
            refused("/r0"),
            record("default", "/f1", NOW_MS),
            passthrough,
            refused("/r1"),
        ])
        .unwrap();
        // Unmatched passthrough requests are in the refusals' class (no credential).
        assert_eq!(
            paths(&all(&store, "default")),
            ["/f0", "/r0", "/f1", "/p0", "/r1"]
        );
        for i in 2..6 {
            log.append(vec![refused(&format!("/r{i}"))]).unwrap();
        }
        log.append(vec![record("default", "/f2", NOW_MS)]).unwrap();
        let everything = all(&store, "default");
        assert_eq!(
            paths(&everything),
            ["/f0", "/f1", "/r3", "/r4", "/r5", "/f2"]
        );
        let seqs: Vec<u64> = everything.records.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        // Pages continue across both classes; without `after`, the newest.
        let first = store.read_logs(&owner(), "default", Some(0), 4).unwrap();
        assert_eq!(paths(&first), ["/f0", "/f1", "/r3", "/r4"]);
        let rest = store
            .read_logs(&owner(), "default", Some(first.next), 4)
            .unwrap();
        assert_eq!(paths(&rest), ["/r5", "/f2"]);
        let newest = store.read_logs(&owner(), "default", None, 3).unwrap();
        assert_eq!(paths(&newest), ["/r4", "/r5", "/f2"]);
        // The full prune keeps each class's budget too.
        log.prune().unwrap();
        assert_eq!(paths(&all(&store, "default")), paths(&everything));
    }

    #[test]
    fn keys_and_prefixes() {
        let key = log_key("v_abc", 0x0102);
        assert_eq!(key, b"v_abc\0\0\0\0\0\0\0\x01\x02");
        assert_eq!(seq_of(&key), 0x0102);
        assert_eq!(prefix_end(b"v_abc\0"), Some(b"v_abc\x01".to_vec()));
    }
}
