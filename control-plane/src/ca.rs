//! The proxy CA of HTTPS interception (DESIGN.md §3, §4): the certificate authority
//! whose leaf certificates Envoy presents inside an agent's `CONNECT` tunnel, and the
//! leaves themselves.
//!
//! The CA is created at the server's first start and kept in the store's `meta` tree:
//! its certificate in PEM, its private key (PKCS#8) sealed under the data key like a
//! credential. The sealing AAD names the purpose and the SHA-256 of the certificate,
//! so the sealed key opens only as the key of that very certificate: neither a
//! credential's ciphertext nor another CA's key (an older generation, another store)
//! can be swapped in. `master-key rotate` re-seals it with every other value
//! ([`reseal`]); `agent-vault ca rotate` replaces it ([`Store::rotate_ca`]). The
//! certificate alone is public: it is written 0644 to `<data-dir>/ca.pem` at every
//! start and rotation, and served by `GET /v1/ca`.
//!
//! Keys are ECDSA P-256 (cheap to generate, so every leaf has its own). rcgen signs
//! with an `Issuer` made of the CA's subject, key identifier and usages; those are
//! rebuilt from the stored subject exactly as they were when the CA was made, so no
//! X.509 parser is needed to sign after a restart (a unit test checks that the leaves
//! then still chain to the stored certificate).
//!
//! In memory the keys live in types that wipe their bytes when dropped and print
//! nothing ([`LeafKey`], the CA's `KeyPair` inside `Zeroizing`). ring keeps its own
//! parsed copy of a key, which it does not wipe; nothing here can reach it.

use base64::Engine;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::Key;
use crate::error::{Error, Result};
use crate::store::{abort, get_json, put_json, read_json, Store, Tx, TxResult};

/// The CA certificate's file in the data dir (public, 0644).
pub const CA_FILE: &str = "ca.pem";
/// Key of the CA record in the `meta` tree.
const META_CA: &[u8] = b"proxy_ca";
/// How long a CA is valid. It signs only short-lived leaves, and `ca rotate` replaces
/// it whenever wanted; ten years keeps agents' trust stores from going stale by
/// themselves.
const CA_VALIDITY_SECS: i64 = 10 * 365 * 86_400;
/// Certificates start this long before they are made, for clocks a little behind.
const BACKDATE_SECS: i64 = 300;
/// The organization in the CA's subject.
const ORGANIZATION: &str = "Agent Vault";
/// Longest common name X.509 allows (`ub-common-name`); longer host names are in the
/// SAN only, which is what clients check anyway.
const MAX_COMMON_NAME: usize = 64;

/// The CA as stored: the certificate, and its key sealed under the data key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaRecord {
    /// 1 for the first CA, one more at each rotation.
    generation: u64,
    /// The subject's common name (the rest of the subject is fixed).
    common_name: String,
    cert_pem: String,
    /// base64 of the sealed PKCS#8 key (`version || nonce || ciphertext+tag`).
    sealed_key: String,
    created_at: i64,
    not_after: i64,
}

/// The CA key's AAD: the purpose, then the SHA-256 of the certificate it belongs to.
fn ca_key_aad(cert_der: &[u8]) -> Vec<u8> {
    let mut aad = b"agent-vault/proxy-ca-key/v1\0".to_vec();
    aad.extend_from_slice(&Sha256::digest(cert_der));
    aad
}

/// The certificate and key of the proxy CA, ready to sign leaves.
pub struct CertificateAuthority {
    generation: u64,
    common_name: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: i64,
    /// The subject, key identifier method and usages rcgen's `Issuer` signs with.
    params: CertificateParams,
    key: Zeroizing<KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("generation", &self.generation)
            .field("common_name", &self.common_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A leaf certificate's private key in PEM: wiped on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct LeafKey(Zeroizing<String>);

impl LeafKey {
    pub fn expose_pem(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for LeafKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafKey(<redacted>)")
    }
}

/// A certificate for one host name, signed by the proxy CA.
#[derive(Debug, Clone)]
pub struct LeafCertificate {
    /// The host name (in the SAN, and the CN when it fits).
    pub name: String,
    /// The leaf's PEM followed by the CA's: what a TLS server sends.
    pub chain_pem: String,
    pub key: LeafKey,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Unix milliseconds at minting: orders the leaves of one name.
    pub issued_at_ms: i64,
    /// The CA generation that signed it.
    pub ca_generation: u64,
    /// Hex of the serial number (random, so each leaf is unique).
    pub serial: String,
}

impl LeafCertificate {
    /// The version Envoy is told: changes with every minting.
    pub fn version(&self) -> String {
        format!("{}-{}", self.ca_generation, self.serial)
    }
}

fn cert_error(what: &str, e: rcgen::Error) -> Error {
    Error::internal(format!("{what}: {e}"))
}

fn time_at(secs: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| Error::internal(format!("certificate time {secs}: {e}")))
}

/// A random positive serial number (RFC 5280: at most 20 bytes, positive).
fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

/// The CA's parameters, built the same way when it is created and when it is loaded,
/// so the issuer name and key identifier in every leaf match the certificate.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    subject.push(DnType::OrganizationName, ORGANIZATION);
    params.distinguished_name = subject;
    // It signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The DER inside a PEM certificate (the first one).
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// `AB:CD:…`: the SHA-256 fingerprint of a DER certificate, as browsers show it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CertificateAuthority {
    /// A new CA (a fresh P-256 key), valid from `now` (unix seconds) for ten years.
    pub fn generate(generation: u64, now: i64) -> Result<CertificateAuthority> {
        let mut tag = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut tag);
        // The random tag tells CAs of different installs and generations apart in a
        // trust store's listing.
        let common_name = format!("Agent Vault proxy CA {generation} {}", hex::encode(tag));
        let key = Zeroizing::new(KeyPair::generate().map_err(|e| cert_error("CA key", e))?);
        let mut params = ca_params(&common_name);
        params.not_before = time_at(now - BACKDATE_SECS)?;
        params.not_after = time_at(now + CA_VALIDITY_SECS)?;
        params.serial_number = Some(random_serial().0);
        let cert = params
            .self_signed(&*key)
            .map_err(|e| cert_error("CA certificate", e))?;
        Ok(CertificateAuthority {
            generation,
            common_name: common_name.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            not_after: now + CA_VALIDITY_SECS,
            params: ca_params(&common_name),
            key,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The SHA-256 fingerprint of the certificate (`AB:CD:…`).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    /// A leaf for `name` (a host name already validated by the caller), valid from
    /// `now_ms` for `ttl_secs`, with a fresh P-256 key.
    pub fn mint_leaf(&self, name: &str, now_ms: i64, ttl_secs: i64) -> Result<LeafCertificate> {
        let now = now_ms.div_euclid(1000);
        let mut params = CertificateParams::new(vec![name.to_string()])
            .map_err(|e| cert_error(&format!("leaf for {name}"), e))?;
        let mut subject = DistinguishedName::new();
        if name.len() <= MAX_COMMON_NAME {
            subject.push(DnType::CommonName, name);
        }
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_before = now - BACKDATE_SECS.min(ttl_secs);
        let not_after = now + ttl_secs;
        params.not_before = time_at(not_before)?;
        params.not_after = time_at(not_after)?;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);

        let key = Zeroizing::new(KeyPair::generate().map_err(|e| cert_error("leaf key", e))?);
        let issuer = Issuer::from_params(&self.params, &*self.key);
        let cert = params
            .signed_by(&*key, &issuer)
            .map_err(|e| cert_error(&format!("leaf for {name}"), e))?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.cert_pem);
        Ok(LeafCertificate {
            name: name.to_string(),
            chain_pem,
            key: LeafKey(Zeroizing::new(key.serialize_pem())),
            not_before,
            not_after,
            issued_at_ms: now_ms,
            ca_generation: self.generation,
            serial: serial_hex,
        })
    }

    /// The record that stores this CA, its key sealed under `data_key`.
    fn record(&self, data_key: &Key, created_at: i64) -> CaRecord {
        let pkcs8 = Zeroizing::new(self.key.serialize_der());
        let sealed = data_key.seal(&ca_key_aad(&self.cert_der), &pkcs8);
        CaRecord {
            generation: self.generation,
            common_name: self.common_name.clone(),
            cert_pem: self.cert_pem.clone(),
            sealed_key: base64::engine::general_purpose::STANDARD.encode(sealed),
            created_at,
            not_after: self.not_after,
        }
    }

    /// The CA of a stored record: the key opened with `data_key` and checked against
    /// the certificate.
    fn from_record(record: &CaRecord, data_key: &Key) -> Result<CertificateAuthority> {
        let damaged = |what: &str| Error::internal(format!("the stored proxy CA: {what}"));
        let cert_der = pem_to_der(&record.cert_pem).ok_or_else(|| damaged("bad certificate"))?;
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&record.sealed_key)
            .map_err(|_| damaged("the sealed key is not base64"))?;
        let pkcs8 = data_key
            .open(&ca_key_aad(&cert_der), &sealed)
            .map_err(|e| damaged(&e.to_string()))?;
        let key = KeyPair::try_from(pkcs8.as_slice()).map_err(|e| cert_error("CA key", e))?;
        let key = Zeroizing::new(key);
        let ca = CertificateAuthority {
            generation: record.generation,
            common_name: record.common_name.clone(),
            cert_pem: record.cert_pem.clone(),
            cert_der,
            not_after: record.not_after,
            params: ca_params(&record.common_name),
            key,
        };
        Ok(ca)
    }
}

/// Re-seals the CA key under a new data key inside `master-key rotate`'s transaction;
/// how many keys it re-sealed (0 or 1).
pub(crate) fn reseal(tx: &Tx, old: &Key, new: &Key) -> TxResult<usize> {
    let Some(mut record) = get_json::<CaRecord>(tx.meta, META_CA)? else {
        return Ok(0);
    };
    let Some(cert_der) = pem_to_der(&record.cert_pem) else {
        return abort(Error::internal("the stored proxy CA: bad certificate"));
    };
    let aad = ca_key_aad(&cert_der);
    let sealed = match base64::engine::general_purpose::STANDARD.decode(&record.sealed_key) {
        Ok(sealed) => sealed,
        Err(_) => return abort(Error::internal("the stored proxy CA: bad sealed key")),
    };
    let plain = match old.open(&aad, &sealed) {
        Ok(plain) => plain,
        Err(e) => return abort(Error::internal(format!("the stored proxy CA: {e}"))),
    };
    record.sealed_key = base64::engine::general_purpose::STANDARD.encode(new.seal(&aad, &plain));
    put_json(tx.meta, META_CA, &record)?;
    Ok(1)
}

/// Writes a public file (certificates only) to `path`, 0644 whatever the umask,
/// atomically (a temporary file renamed over it): agents, other OS users included,
/// may read it. The proxy CA and the CLI's CA bundles.
pub fn write_public_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        // A umask may have taken bits off the mode above.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

impl Store {
    /// `<data-dir>/ca.pem`.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.data_dir().join(CA_FILE)
    }

    /// The proxy CA: the stored one, or a new one stored now (the first start). Its
    /// certificate is (re)written to [`Store::ca_file`].
    pub fn load_or_create_ca(&self) -> Result<CertificateAuthority> {
        let data_key = self.data_key();
        let ca = match read_json::<CaRecord>(&self.trees.meta, META_CA)? {
            Some(record) => CertificateAuthority::from_record(&record, &data_key)?,
            None => {
                let now = self.now_secs();
                let ca = CertificateAuthority::generate(1, now)?;
                let record = ca.record(&data_key, now);
                // Two servers never share a data dir (sled locks it), so nothing else
                // can have stored a CA since the read above.
                self.write(|tx| put_json(tx.meta, META_CA, &record))?;
                ca
            }
        };
        drop(data_key);
        self.write_ca_file(&ca)?;
        Ok(ca)
    }

    /// Replaces the proxy CA with a new one (the next generation) and writes its
    /// certificate to [`Store::ca_file`]. Leaves signed by the old one stay valid
    /// until they expire, for whoever still trusts it: the caller re-mints them.
    pub fn rotate_ca(&self) -> Result<CertificateAuthority> {
        let data_key = self.data_key();
        let previous = read_json::<CaRecord>(&self.trees.meta, META_CA)?
            .map(|r| r.generation)
            .unwrap_or(0);
        let now = self.now_secs();
        let ca = CertificateAuthority::generate(previous + 1, now)?;
        let record = ca.record(&data_key, now);
        self.write(|tx| put_json(tx.meta, META_CA, &record))?;
        drop(data_key);
        self.write_ca_file(&ca)?;
        Ok(ca)
    }

    fn write_ca_file(&self, ca: &CertificateAuthority) -> Result<()> {
        let path = self.ca_file();
        write_public_file(&path, ca.cert_pem().as_bytes()).map_err(|e| {
            Error::internal(format!(
                "cannot write the proxy CA certificate {}: {e}",
                path.display()
            ))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::system_store;
    use webpki::{anchor_from_trusted_cert, EndEntityCert, KeyUsage};

    /// Whether the first certificate of `chain_pem` chains to `ca_der` and is valid for
    /// `name` at `at` (unix seconds).
    pub(crate) fn verifies(
        ca_der: &[u8],
        chain_pem: &str,
        name: &str,
        at: i64,
    ) -> std::result::Result<(), String> {
        let leaf_der = pem_to_der(chain_pem).ok_or("no PEM")?;
        let ca = rustls::pki_types::CertificateDer::from(ca_der.to_vec());
        let anchor = anchor_from_trusted_cert(&ca).map_err(|e| e.to_string())?;
        let leaf_der = rustls::pki_types::CertificateDer::from(leaf_der);
        let cert = EndEntityCert::try_from(&leaf_der).map_err(|e| e.to_string())?;
        let time = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(at).unwrap(),
        ));
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            time,
            KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| format!("chain: {e}"))?;
        let server_name =
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        cert.verify_is_valid_for_subject_name(&server_name)
            .map_err(|e| format!("name: {e}"))
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_leaf_names_its_host_chains_to_the_ca_and_is_valid_only_for_its_lifetime() {
        let ca = CertificateAuthority::generate(1, NOW).unwrap();
        let leaf = ca.mint_leaf("api.example.com", NOW * 1000, 3600).unwrap();
        assert_eq!(leaf.not_after, NOW + 3600);
        assert!(leaf.not_before <= NOW);
        assert!(
            leaf.chain_pem.ends_with(ca.cert_pem()),
            "the chain ends with the CA"
        );
        assert!(leaf.key.expose_pem().contains("PRIVATE KEY"));
        verifies(ca.cert_der(), &leaf.chain_pem, "api.example.com", NOW).unwrap();
        verifies(
            ca.cert_der(),
            &leaf.chain_pem,
            "api.example.com",
            NOW + 3599,
        )
        .unwrap();
        let expired = verifies(
            ca.cert_der(),
            &leaf.chain_pem,
            "api.example.com",
            NOW + 3601,
        );
        assert!(expired.unwrap_err().contains("Expired"));
        let other = verifies(ca.cert_der(), &leaf.chain_pem, "evil.example.com", NOW);
        assert!(other.unwrap_err().starts_with("name"));
        let stranger = CertificateAuthority::generate(1, NOW).unwrap();
        let foreign = verifies(stranger.cert_der(), &leaf.chain_pem, "api.example.com", NOW);
        assert!(foreign.unwrap_err().starts_with("chain"));
    }

    #[test]
    fn leaves_are_unique_and_long_names_are_in_the_san_only() {
        let ca = CertificateAuthority::generate(1, NOW).unwrap();
        let a = ca.mint_leaf("a.example.com", NOW * 1000, 60).unwrap();
        let b = ca.mint_leaf("a.example.com", NOW * 1000, 60).unwrap();
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.key.expose_pem(), b.key.expose_pem());
        let long = format!("{}.example.com", "x".repeat(60));
        let leaf = ca.mint_leaf(&long, NOW * 1000, 60).unwrap();
        verifies(ca.cert_der(), &leaf.chain_pem, &long, NOW).unwrap();
    }

    #[test]
    fn keys_are_never_printed() {
        let ca = CertificateAuthority::generate(1, NOW).unwrap();
        let leaf = ca.mint_leaf("a.example.com", NOW * 1000, 60).unwrap();
        let printed = format!("{ca:?} {leaf:?}");
        assert!(!printed.contains("PRIVATE"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn the_ca_is_created_once_stored_sealed_and_loaded_back_signing_the_same_chain() {
        let (dir, store) = system_store();
        let first = store.load_or_create_ca().unwrap();
        let again = store.load_or_create_ca().unwrap();
        assert_eq!(first.cert_pem(), again.cert_pem(), "created once");
        assert_eq!(again.generation(), 1);
        // The loaded CA signs leaves that chain to the stored certificate.
        let leaf = again.mint_leaf("api.example.com", NOW * 1000, 60).unwrap();
        verifies(first.cert_der(), &leaf.chain_pem, "api.example.com", NOW).unwrap();

        // The certificate file is public, the key appears nowhere in plaintext.
        let file = store.ca_file();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), first.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let pkcs8 = first.key.serialize_der();
        for tree in store.trees.all_for_tests() {
            for entry in tree.iter() {
                let (_, value) = entry.unwrap();
                assert!(
                    !value.windows(pkcs8.len()).any(|w| w == pkcs8.as_slice()),
                    "the CA key is stored in plaintext"
                );
            }
        }
        drop(dir);
    }

    #[test]
    fn the_sealed_key_opens_only_as_the_key_of_its_own_certificate() {
        let (_dir, store) = system_store();
        store.load_or_create_ca().unwrap();
        let stored: CaRecord = read_json(&store.trees.meta, META_CA).unwrap().unwrap();

        // Another CA's sealed key (sealed under the same data key) in this record.
        let other = CertificateAuthority::generate(2, NOW)
            .unwrap()
            .record(&store.data_key(), NOW);
        let swapped = CaRecord {
            sealed_key: other.sealed_key.clone(),
            ..stored.clone()
        };
        let err = CertificateAuthority::from_record(&swapped, &store.data_key()).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");

        // A credential sealed under the data key, passed off as the CA key.
        let credential = store.data_key().seal(
            &crate::crypto::credential_aad("vault-id", "KEY"),
            &first_key_bytes(&stored, &store),
        );
        let passed_off = CaRecord {
            sealed_key: base64::engine::general_purpose::STANDARD.encode(credential),
            ..stored.clone()
        };
        assert!(CertificateAuthority::from_record(&passed_off, &store.data_key()).is_err());

        // The record as stored opens.
        assert!(CertificateAuthority::from_record(&stored, &store.data_key()).is_ok());
    }

    fn first_key_bytes(record: &CaRecord, store: &Store) -> Vec<u8> {
        let der = pem_to_der(&record.cert_pem).unwrap();
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&record.sealed_key)
            .unwrap();
        store
            .data_key()
            .open(&ca_key_aad(&der), &sealed)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn rotation_makes_a_new_generation_and_rewrites_the_file() {
        let (_dir, store) = system_store();
        let first = store.load_or_create_ca().unwrap();
        let second = store.rotate_ca().unwrap();
        assert_eq!(second.generation(), 2);
        assert_ne!(first.cert_pem(), second.cert_pem());
        assert_eq!(
            std::fs::read_to_string(store.ca_file()).unwrap(),
            second.cert_pem()
        );
        let loaded = store.load_or_create_ca().unwrap();
        assert_eq!(loaded.cert_pem(), second.cert_pem());
        let leaf = loaded.mint_leaf("a.example.com", NOW * 1000, 60).unwrap();
        verifies(second.cert_der(), &leaf.chain_pem, "a.example.com", NOW).unwrap();
        assert!(verifies(first.cert_der(), &leaf.chain_pem, "a.example.com", NOW).is_err());
    }

    #[test]
    fn master_key_rotation_reseals_the_ca_key() {
        let (_dir, store) = system_store();
        let ca = store.load_or_create_ca().unwrap();
        let before: CaRecord = read_json(&store.trees.meta, META_CA).unwrap().unwrap();
        store.rotate_data_key().unwrap();
        let after: CaRecord = read_json(&store.trees.meta, META_CA).unwrap().unwrap();
        assert_ne!(before.sealed_key, after.sealed_key, "re-sealed");
        assert_eq!(before.cert_pem, after.cert_pem, "the same CA");
        let loaded = store.load_or_create_ca().unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let leaf = loaded.mint_leaf("a.example.com", NOW * 1000, 60).unwrap();
        verifies(ca.cert_der(), &leaf.chain_pem, "a.example.com", NOW).unwrap();
    }

    #[test]
    fn fingerprints_and_pem_decoding() {
        let ca = CertificateAuthority::generate(1, NOW).unwrap();
        assert_eq!(pem_to_der(ca.cert_pem()).unwrap(), ca.cert_der());
        assert_eq!(ca.fingerprint().len(), 32 * 3 - 1);
        assert!(pem_to_der("not a certificate").is_none());
    }
}
