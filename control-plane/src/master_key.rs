//! Rotating the data key (`agent-vault master-key rotate`): every sealed value —
//! credentials, the agent-supplied values of proposals and the proxy CA's key —
//! re-encrypted under a new random data key in one transaction, all or nothing. Changing the master password
//! only re-wraps the data key and is the store's own business
//! ([`Store::change_master_password`]).

use crate::error::Result;
use crate::store::Store;

impl Store {
    /// Replaces the data key and re-encrypts every sealed value; returns how many
    /// credential and proposal values (the proxy CA's key is re-sealed too, uncounted).
    pub fn rotate_data_key(&self) -> Result<usize> {
        let keys = |tree: &crate::store::Tree| {
            tree.iter()
                .keys()
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        self.replace_data_key(
            |trees| Ok((keys(&trees.credentials)?, keys(&trees.proposals)?)),
            |tx, (credentials, proposals), old, new| {
                let credentials = crate::credentials::reseal(tx, credentials, old, new)?;
                let proposals = crate::proposals::reseal(tx, proposals, old, new)?;
                crate::ca::reseal(tx, old, new)?;
                Ok(credentials + proposals)
            },
        )
    }
}
