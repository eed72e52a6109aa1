//! The storage interface the domain code talks to: named trees of ordered byte keys,
//! read directly or inside a transaction over all of them, on either backend (the
//! embedded sled database, or PostgreSQL shared by several control planes).
//!
//! The interface is deliberately the one the domain code already used with sled —
//! get, insert, remove, ordered scans, atomic batches, serializable transactions — so
//! every concept module is the same code on both backends, and one test suite checks
//! both. (HashiCorp Vault's storage backends, PostgreSQL included, are the same kind of
//! ordered key-value boundary.)

use std::ops::Bound;
use std::sync::Arc;

use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::postgres::{PgTx, Postgres};
use crate::error::{Error, Result};

/// A key or a value.
pub(crate) type Bytes = Vec<u8>;

/// Why a transaction's closure stopped.
#[derive(Debug)]
pub(crate) enum TxError {
    /// The closure gave up with this error: the transaction is rolled back.
    Abort(Error),
    /// Another transaction got in the way: the closure runs again.
    Conflict,
    /// The storage failed: rolled back, and the error returned.
    Storage(Error),
}

pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

impl From<Error> for TxError {
    fn from(error: Error) -> TxError {
        TxError::Abort(error)
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(error: UnabortableTransactionError) -> TxError {
        match error {
            UnabortableTransactionError::Conflict => TxError::Conflict,
            UnabortableTransactionError::Storage(e) => TxError::Storage(e.into()),
        }
    }
}

/// One named tree.
#[derive(Clone)]
pub(crate) struct Tree {
    name: &'static str,
    backend: TreeBackend,
}

#[derive(Clone)]
enum TreeBackend {
    Sled(sled::Tree),
    Postgres(Arc<Postgres>),
}

/// Rows read by a PostgreSQL scan's first query; each further query reads twice as
/// many, up to [`MAX_PAGE`]. Most scans stop early (the oldest chunk of a vault's log,
/// the newest page of it) and a row can be large (a chunk of the request log), so a
/// scan must not fetch hundreds of rows to use one.
const FIRST_PAGE: i64 = 4;
const MAX_PAGE: i64 = 512;

impl Tree {
    pub(crate) fn sled(name: &'static str, tree: sled::Tree) -> Tree {
        Tree {
            name,
            backend: TreeBackend::Sled(tree),
        }
    }

    pub(crate) fn postgres(name: &'static str, pg: Arc<Postgres>) -> Tree {
        Tree {
            name,
            backend: TreeBackend::Postgres(pg),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The sled tree underneath, on a sled store.
    pub(crate) fn as_sled(&self) -> Option<&sled::Tree> {
        match &self.backend {
            TreeBackend::Sled(tree) => Some(tree),
            TreeBackend::Postgres(_) => None,
        }
    }

    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        match &self.backend {
            TreeBackend::Sled(tree) => Ok(tree.get(key)?.map(|v| v.to_vec())),
            TreeBackend::Postgres(pg) => pg.get(self.name, key.as_ref()),
        }
    }

    pub(crate) fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Writes one key outside any transaction (tests that plant records).
    #[cfg(test)]
    pub(crate) fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        match &self.backend {
            TreeBackend::Sled(tree) => {
                tree.insert(key.as_ref(), value.as_ref())?;
                Ok(())
            }
            TreeBackend::Postgres(pg) => pg.apply(vec![(
                self.name,
                key.as_ref().to_vec(),
                Some(value.as_ref().to_vec()),
            )]),
        }
    }

    /// Writes `value` under `key` unless the key exists; `true` when it was written.
    pub(crate) fn insert_new(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<bool> {
        match &self.backend {
            TreeBackend::Sled(tree) => Ok(tree
                .compare_and_swap(key.as_ref(), None::<&[u8]>, Some(value.as_ref()))?
                .is_ok()),
            TreeBackend::Postgres(pg) => pg.insert_new(self.name, key.as_ref(), value.as_ref()),
        }
    }

    /// Every key starting with `prefix`, in key order.
    pub(crate) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Scan {
        let prefix = prefix.as_ref().to_vec();
        let end = match prefix_end(&prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        self.range(Bound::Included(prefix), end)
    }

    /// Every key of the tree, in key order.
    pub(crate) fn iter(&self) -> Scan {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// The keys between the bounds, in ascending order.
    pub(crate) fn range(&self, from: Bound<Bytes>, to: Bound<Bytes>) -> Scan {
        self.scan(from, to, false)
    }

    /// The keys between the bounds, in descending order.
    pub(crate) fn range_rev(&self, from: Bound<Bytes>, to: Bound<Bytes>) -> Scan {
        self.scan(from, to, true)
    }

    fn scan(&self, from: Bound<Bytes>, to: Bound<Bytes>, reverse: bool) -> Scan {
        match &self.backend {
            TreeBackend::Sled(tree) => {
                let iter = tree.range::<Bytes, _>((from, to));
                let map = |entry: sled::Result<(sled::IVec, sled::IVec)>| {
                    entry
                        .map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(Error::from)
                };
                if reverse {
                    Scan(Box::new(iter.rev().map(map)))
                } else {
                    Scan(Box::new(iter.map(map)))
                }
            }
            TreeBackend::Postgres(pg) => Scan(Box::new(PgScan {
                pg: pg.clone(),
                tree: self.name,
                from,
                to,
                reverse,
                page: Vec::new().into_iter(),
                size: FIRST_PAGE,
                done: false,
            })),
        }
    }

    /// How many keys the tree holds.
    pub(crate) fn len(&self) -> Result<usize> {
        match &self.backend {
            TreeBackend::Sled(tree) => Ok(tree.len()),
            TreeBackend::Postgres(pg) => pg.count(self.name),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> Result<bool> {
        Ok(self.iter().next().transpose()?.is_none())
    }
}

/// The first key after every key that starts with `prefix` (`None`: there is none).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// An ordered scan of a tree: `(key, value)` pairs.
pub(crate) struct Scan(Box<dyn Iterator<Item = Result<(Bytes, Bytes)>> + Send>);

impl Scan {
    /// The keys alone.
    pub(crate) fn keys(self) -> impl Iterator<Item = Result<Bytes>> {
        self.map(|entry| entry.map(|(key, _)| key))
    }
}

impl Iterator for Scan {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

/// A PostgreSQL scan, read a page at a time as it is iterated (a page of the log
/// does not read the whole log).
struct PgScan {
    pg: Arc<Postgres>,
    tree: &'static str,
    from: Bound<Bytes>,
    to: Bound<Bytes>,
    reverse: bool,
    page: std::vec::IntoIter<(Bytes, Bytes)>,
    /// Rows the next query reads.
    size: i64,
    done: bool,
}

impl Iterator for PgScan {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(entry) = self.page.next() {
            return Some(Ok(entry));
        }
        if self.done {
            return None;
        }
        let size = self.size;
        self.size = (size * 2).min(MAX_PAGE);
        let rows = match self
            .pg
            .page(self.tree, &self.from, &self.to, self.reverse, size)
        {
            Ok(rows) => rows,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        if (rows.len() as i64) < size {
            self.done = true;
        }
        // The next page continues after the last key read.
        if let Some((last, _)) = rows.last() {
            if self.reverse {
                self.to = Bound::Excluded(last.clone());
            } else {
                self.from = Bound::Excluded(last.clone());
            }
        }
        self.page = rows.into_iter();
        self.page.next().map(Ok)
    }
}

/// Writes to apply together, atomically.
#[derive(Default)]
pub(crate) struct Batch(pub(crate) Vec<(Bytes, Option<Bytes>)>);

impl Batch {
    pub(crate) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) {
        self.0.push((key.as_ref().to_vec(), Some(value.into())));
    }

    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }
}

/// One tree inside a transaction.
#[derive(Clone, Copy)]
pub(crate) struct TxTree<'a> {
    name: &'static str,
    backend: TxBackend<'a>,
}

#[derive(Clone, Copy)]
enum TxBackend<'a> {
    Sled(&'a TransactionalTree),
    Postgres(&'a PgTx<'a>),
}

impl<'a> TxTree<'a> {
    pub(crate) fn sled(name: &'static str, tree: &'a TransactionalTree) -> TxTree<'a> {
        TxTree {
            name,
            backend: TxBackend::Sled(tree),
        }
    }

    pub(crate) fn postgres(name: &'static str, tx: &'a PgTx<'a>) -> TxTree<'a> {
        TxTree {
            name,
            backend: TxBackend::Postgres(tx),
        }
    }

    pub(crate) fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<Bytes>> {
        match self.backend {
            TxBackend::Sled(tree) => Ok(tree.get(key)?.map(|v| v.to_vec())),
            TxBackend::Postgres(tx) => tx.get(self.name, key.as_ref()),
        }
    }

    pub(crate) fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> TxResult<()> {
        match self.backend {
            TxBackend::Sled(tree) => {
                tree.insert(key.as_ref(), value.as_ref())?;
                Ok(())
            }
            TxBackend::Postgres(tx) => tx.insert(self.name, key.as_ref(), value.as_ref()),
        }
    }

    /// Removes `key`; returns the value it held.
    pub(crate) fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<Option<Bytes>> {
        match self.backend {
            TxBackend::Sled(tree) => Ok(tree.remove(key.as_ref())?.map(|v| v.to_vec())),
            TxBackend::Postgres(tx) => tx.remove(self.name, key.as_ref()),
        }
    }
}
