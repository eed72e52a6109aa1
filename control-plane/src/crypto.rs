//! Encryption of credential values, wrapping of the data key, password and token hashing.
//!
//! One random 256-bit **data key** encrypts every credential value with AES-256-GCM
//! (fresh 96-bit nonce per write, AAD = vault id + key, so a ciphertext cannot be moved
//! to another slot). The data key itself is stored in the sled store, wrapped by a
//! **key-encryption key** (KEK) that never touches the store: either derived from the
//! master password with Argon2id, or (passwordless mode) 32 random bytes in a 0600 file
//! next to the store. Keeping the wrapped data key inside sled is what lets
//! `master-key rotate` swap the data key and re-encrypt every value in one transaction.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

const NONCE_LEN: usize = 12;
/// Version byte in front of every sealed value, so the format can evolve.
const SEAL_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Authentication failed: tampered ciphertext, wrong slot or wrong key.
    #[error("ciphertext failed authentication (tampered, moved to another slot, or wrong key)")]
    Tampered,
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Every password-hashing slot stayed busy (see [`PasswordHashing`]).
    #[error("too many password checks at once; try again in a moment")]
    Busy,
}

/// A 256-bit key, wiped from memory when dropped and never printed.
#[derive(Clone, Zeroize)]
#[zeroize(drop)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    pub fn generate() -> Key {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Key(bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let array: [u8; 32] = bytes.try_into().ok()?;
        Some(Key(array))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Encrypts `plaintext` bound to `aad`: `version || nonce || ciphertext+tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let cipher = Aes256Gcm::new((&self.0).into());
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Encryption with a valid key and in-memory buffers cannot fail.
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(SEAL_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts what [`Key::seal`] produced with the same `aad`; any change is refused.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != SEAL_V1 {
            return Err(CryptoError::Tampered);
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        let cipher = Aes256Gcm::new((&self.0).into());
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Tampered)
    }
}

/// Argon2id cost parameters, stored with the wrapped key so they can be raised later.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KdfParams {
    pub salt: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    pub fn new_random() -> KdfParams {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        KdfParams {
            salt: hex::encode(salt),
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }

    /// Derives the key-encryption key from the master password.
    pub fn derive(&self, password: &str) -> Result<Key, CryptoError> {
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let salt = hex::decode(&self.salt).map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password.as_bytes(), &salt, &mut out)
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let key = Key(out);
        out.zeroize();
        Ok(key)
    }
}

/// AAD for the wrapped data key: it can only be unwrapped as a data key.
pub const DATA_KEY_AAD: &[u8] = b"agent-vault/data-key/v1";

/// AAD binding a credential value to its vault and key.
pub fn credential_aad(vault_id: &str, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(vault_id.len() + key.len() + 24);
    aad.extend_from_slice(b"agent-vault/credential/");
    aad.extend_from_slice(vault_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// AAD binding an agent-supplied value of a proposal to its vault, proposal and key:
/// it cannot be moved to another proposal or slot, nor passed off as a credential.
pub fn proposal_value_aad(vault_id: &str, proposal_id: u64, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(vault_id.len() + key.len() + 40);
    aad.extend_from_slice(b"agent-vault/proposal-value/");
    aad.extend_from_slice(vault_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&proposal_id.to_be_bytes());
    aad.push(0);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// Argon2id for users' passwords, bounded: at most `slots` hashes run at once, each in
/// a memory buffer of its own that is kept for the next one, and at most
/// [`MAX_WAITERS`] callers wait up to `wait` for a slot; everyone else is told at once
/// that the server is busy ([`CryptoError::Busy`]).
///
/// Why: login and registration hash before anyone is authenticated, and each hash
/// takes 19 MiB and tens of milliseconds of a core. Unbounded, a few dozen parallel
/// requests took the server from 166 MB to 2.6 GB (and the blocking pool runs the
/// data plane's work too). The `argon2` crate's `PasswordHasher` allocates per call
/// and the allocator keeps freed blocks per thread arena, so only owning the buffers
/// bounds the memory whatever the allocator does. Waiters are few because each holds
/// a thread of the blocking pool.
pub struct PasswordHashing {
    state: std::sync::Mutex<Slots>,
    freed: std::sync::Condvar,
    wait: std::time::Duration,
    /// A hash of a password nobody has, to verify unknown emails against (same work).
    dummy: std::sync::OnceLock<String>,
}

struct Slots {
    /// Buffers not in use.
    free: Vec<Vec<Block>>,
    /// Slots whose buffer is not allocated yet.
    unallocated: usize,
    waiting: usize,
}

/// Callers that may wait for a hashing slot at once; more are refused straight away.
pub const MAX_WAITERS: usize = 16;
/// How long a caller waits for a hashing slot.
pub const HASH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl PasswordHashing {
    pub fn new(slots: usize, wait: std::time::Duration) -> PasswordHashing {
        PasswordHashing {
            state: std::sync::Mutex::new(Slots {
                free: Vec::new(),
                unallocated: slots.max(1),
                waiting: 0,
            }),
            freed: std::sync::Condvar::new(),
            wait,
            dummy: std::sync::OnceLock::new(),
        }
    }

    /// One slot per core but one, at least 1 and at most 4: logins never take every
    /// core from the data plane.
    pub fn for_this_machine() -> PasswordHashing {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        PasswordHashing::new(cores.saturating_sub(1).clamp(1, 4), HASH_WAIT)
    }

    /// Hashes a password for storage (see [`HashSlot::hash`]).
    pub fn hash(&self, password: &str) -> Result<String, CryptoError> {
        self.slot()?.hash(password)
    }

    /// Checks a password against a stored hash (see [`HashSlot::verify`]).
    pub fn verify(&self, password: &str, phc: &str) -> Result<bool, CryptoError> {
        Ok(self.slot()?.verify(password, phc))
    }

    /// A free slot, waiting up to `wait` when there are not too many waiting already.
    pub fn slot(&self) -> Result<HashSlot<'_>, CryptoError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.free.is_empty() && state.unallocated == 0 {
            if state.waiting >= MAX_WAITERS {
                return Err(CryptoError::Busy);
            }
            state.waiting += 1;
            let (waited, timeout) = self
                .freed
                .wait_timeout_while(state, self.wait, |s| {
                    s.free.is_empty() && s.unallocated == 0
                })
                .unwrap_or_else(|p| p.into_inner());
            state = waited;
            state.waiting -= 1;
            if timeout.timed_out() && state.free.is_empty() && state.unallocated == 0 {
                return Err(CryptoError::Busy);
            }
        }
        let blocks = match state.free.pop() {
            Some(blocks) => blocks,
            None => {
                state.unallocated -= 1;
                Vec::new()
            }
        };
        Ok(HashSlot {
            owner: self,
            blocks,
        })
    }
}

/// A hashing slot and its buffer; dropping it wipes the buffer and returns it.
pub struct HashSlot<'a> {
    owner: &'a PasswordHashing,
    blocks: Vec<Block>,
}

impl HashSlot<'_> {
    /// The buffer, at least `count` blocks (grown once if a stored hash costs more).
    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        &mut self.blocks[..count]
    }

    /// Hashes a password for storage: Argon2id with the crate's default cost, as a PHC
    /// string (what `Argon2::default().hash_password` gives).
    pub fn hash(&mut self, password: &str) -> Result<String, CryptoError> {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(kdf_error)?;
        let params = Params::default();
        let mut out = Zeroizing::new([0u8; Params::DEFAULT_OUTPUT_LEN]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
            .hash_password_into_with_memory(
                password.as_bytes(),
                salt_bytes,
                &mut out[..],
                self.blocks(params.block_count()),
            )
            .map_err(kdf_error)?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(kdf_error)?,
            salt: Some(salt.as_salt()),
            hash: Some(Output::new(&out[..]).map_err(kdf_error)?),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches a stored PHC string; a malformed one matches nothing.
    pub fn verify(&mut self, password: &str, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return false;
        };
        let algorithm = Algorithm::try_from(parsed.algorithm);
        let version = Version::try_from(parsed.version.unwrap_or(Version::V0x13.into()));
        let params = Params::try_from(&parsed);
        let (Ok(algorithm), Ok(version), Ok(params)) = (algorithm, version, params) else {
            return false;
        };
        let mut salt_bytes = [0u8; 64];
        let Ok(salt_bytes) = salt.decode_b64(&mut salt_bytes) else {
            return false;
        };
        let mut computed = Zeroizing::new(vec![0u8; expected.len()]);
        let blocks = self.blocks(params.block_count());
        let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
            password.as_bytes(),
            salt_bytes,
            &mut computed[..],
            blocks,
        );
        hashed.is_ok()
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                expected.as_bytes(),
                &computed[..],
            ))
    }

    /// Verifies `password` against a hash of a password nobody has: what checking an
    /// unknown email costs, so that it takes as long as a wrong password.
    pub fn verify_dummy(&mut self, password: &str) -> Result<bool, CryptoError> {
        let owner = self.owner;
        let dummy = match owner.dummy.get() {
            Some(dummy) => dummy,
            None => {
                let hash = self.hash("agent-vault-dummy-password")?;
                owner.dummy.get_or_init(|| hash)
            }
        };
        Ok(self.verify(password, dummy))
    }
}

impl Drop for HashSlot<'_> {
    fn drop(&mut self) {
        // The blocks hold state derived from the password.
        self.blocks.fill(Block::default());
        let mut state = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.free.push(std::mem::take(&mut self.blocks));
        drop(state);
        self.owner.freed.notify_one();
    }
}

fn kdf_error(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Kdf(e.to_string())
}

/// Lowercase hex SHA-256: how tokens are stored and looked up.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Prefix of session tokens (`av_sess_<64 hex>`): the CLI's and the UI's.
pub const SESSION_PREFIX: &str = "av_sess_";
/// Prefix of browser UI session tokens (`av_ui_<64 hex>`): only ever a cookie.
pub const UI_SESSION_PREFIX: &str = "av_ui_";
/// Prefix of invite tokens (`av_inv_<64 hex>`).
pub const INVITE_PREFIX: &str = "av_inv_";
/// Prefix of agent tokens (`av_agt_<64 hex>`).
pub const AGENT_PREFIX: &str = "av_agt_";
/// Prefix of the bootstrap token the first registration needs (`av_boot_<64 hex>`).
pub const BOOTSTRAP_PREFIX: &str = "av_boot_";
/// Prefix of the local login token (`av_local_<64 hex>`).
pub const LOCAL_LOGIN_PREFIX: &str = "av_local_";
/// Prefix of approval tokens (`av_appr_<64 hex>`).
pub const APPROVAL_PREFIX: &str = "av_appr_";

/// A new random token `<prefix><64 hex>`, one of the prefixes above.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trips_and_uses_fresh_nonces() {
        let key = Key::generate();
        let a = key.seal(b"aad", b"sk_test_abc123");
        let b = key.seal(b"aad", b"sk_test_abc123");
        assert_ne!(a, b, "each write gets a fresh nonce");
        assert_eq!(&key.open(b"aad", &a).unwrap()[..], b"sk_test_abc123");
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let key = Key::generate();
        let mut sealed = key.seal(b"aad", b"secret");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(
            key.open(b"aad", &sealed),
            Err(CryptoError::Tampered)
        ));
        assert!(key.open(b"aad", &[]).is_err());
        assert!(key.open(b"aad", &[SEAL_V1; 10]).is_err());
    }

    #[test]
    fn ciphertext_cannot_move_to_another_slot() {
        let key = Key::generate();
        let sealed = key.seal(&credential_aad("v1", "A"), b"secret");
        assert!(key.open(&credential_aad("v1", "B"), &sealed).is_err());
        assert!(key.open(&credential_aad("v2", "A"), &sealed).is_err());
    }

    #[test]
    fn proposal_values_are_bound_to_their_proposal_and_slot() {
        let key = Key::generate();
        let sealed = key.seal(&proposal_value_aad("v1", 7, "A"), b"secret");
        assert!(key.open(&proposal_value_aad("v1", 7, "A"), &sealed).is_ok());
        assert!(key
            .open(&proposal_value_aad("v1", 8, "A"), &sealed)
            .is_err());
        assert!(key
            .open(&proposal_value_aad("v1", 7, "B"), &sealed)
            .is_err());
        assert!(key
            .open(&proposal_value_aad("v2", 7, "A"), &sealed)
            .is_err());
        assert!(key.open(&credential_aad("v1", "A"), &sealed).is_err());
    }

    #[test]
    fn wrong_key_is_refused() {
        let sealed = Key::generate().seal(b"aad", b"secret");
        assert!(Key::generate().open(b"aad", &sealed).is_err());
    }

    #[test]
    fn kdf_is_deterministic_per_salt() {
        let mut params = KdfParams::new_random();
        params.m_cost_kib = 1024;
        params.t_cost = 1;
        let a = params.derive("correct horse").unwrap();
        let b = params.derive("correct horse").unwrap();
        let c = params.derive("wrong horse").unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), c.as_bytes());
    }

    fn hashing() -> PasswordHashing {
        PasswordHashing::new(2, HASH_WAIT)
    }

    #[test]
    fn password_hash_verifies_only_the_right_password() {
        let hashing = hashing();
        let hash = hashing.hash("hunter22").unwrap();
        assert!(hashing.verify("hunter22", &hash).unwrap());
        assert!(!hashing.verify("hunter23", &hash).unwrap());
        assert!(!hashing.verify("hunter22", "not a phc string").unwrap());
        assert!(!hashing.slot().unwrap().verify_dummy("hunter22").unwrap());
    }

    #[test]
    fn stored_hashes_are_the_argon2_crates_own_format_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let hashing = hashing();
        let ours = hashing.hash("hunter22").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"hunter22", &parsed)
            .is_ok());
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let theirs = Argon2::default()
            .hash_password(b"hunter22", &salt)
            .unwrap()
            .to_string();
        assert!(hashing.verify("hunter22", &theirs).unwrap());
        assert!(!hashing.verify("hunter2", &theirs).unwrap());
    }

    #[test]
    fn hashing_beyond_the_slots_and_waiters_is_refused_not_queued() {
        let hashing = PasswordHashing::new(1, std::time::Duration::from_millis(50));
        let held = hashing.slot().unwrap();
        // The one slot is taken: a caller waits its 50 ms, then hears "busy".
        assert!(matches!(hashing.hash("x-password"), Err(CryptoError::Busy)));
        drop(held);
        assert!(hashing.hash("x-password").is_ok());

        // With every waiter place taken, the next caller does not wait at all.
        let hashing = PasswordHashing::new(1, std::time::Duration::from_secs(30));
        let held = hashing.slot().unwrap();
        hashing.state.lock().unwrap().waiting = MAX_WAITERS;
        let started = std::time::Instant::now();
        assert!(matches!(hashing.verify("x", "y"), Err(CryptoError::Busy)));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        hashing.state.lock().unwrap().waiting = 0;
        drop(held);
    }

    #[test]
    fn a_freed_slot_wakes_a_waiter_and_keeps_its_buffer() {
        let hashing = std::sync::Arc::new(PasswordHashing::new(1, HASH_WAIT));
        let held = hashing.slot().unwrap();
        let waiter = {
            let hashing = hashing.clone();
            std::thread::spawn(move || hashing.hash("waiting-password"))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
        assert!(waiter.join().unwrap().is_ok());
        let state = hashing.state.lock().unwrap();
        assert_eq!((state.free.len(), state.unallocated), (1, 0));
        assert_eq!(state.free[0].len(), Params::default().block_count());
    }

    #[test]
    fn tokens_have_prefix_and_64_hex() {
        let token = new_token("av_agt_");
        assert!(token.starts_with("av_agt_"));
        assert_eq!(token.len(), 7 + 64);
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
