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
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
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

/// Hashes a user's password for storage (Argon2id, PHC string).
pub fn hash_password(password: &str) -> Result<String, CryptoError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CryptoError::Kdf(e.to_string()))
}

/// Checks a password against a stored PHC string. A malformed hash is a mismatch.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the email is unknown, so that login takes the same
/// time whether or not the account exists.
pub fn dummy_password_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("agent-vault-dummy-password").unwrap_or_default())
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

    #[test]
    fn password_hash_verifies_only_the_right_password() {
        let hash = hash_password("hunter22").unwrap();
        assert!(verify_password("hunter22", &hash));
        assert!(!verify_password("hunter23", &hash));
        assert!(!verify_password("hunter22", "not a phc string"));
    }

    #[test]
    fn tokens_have_prefix_and_64_hex() {
        let token = new_token("av_agt_");
        assert!(token.starts_with("av_agt_"));
        assert_eq!(token.len(), 7 + 64);
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
