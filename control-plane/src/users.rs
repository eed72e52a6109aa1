//! Users, sessions, invites and vault membership.
//!
//! Passwords are Argon2id hashes; session and invite tokens are stored as SHA-256 so
//! a copy of the store does not log anyone in. Login answers the same way, in about
//! the same time, for an unknown email and a wrong password, and is rate-limited per
//! email address.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::access::{parse_role, put_member, vault_not_found, Principal, VaultRecord, VaultRole};
use crate::crypto::{
    dummy_password_hash, hash_password, new_token, sha256_hex, verify_password, AGENT_PREFIX,
    INVITE_PREFIX, SESSION_PREFIX, UI_SESSION_PREFIX,
};
use crate::error::{Error, Result};
use crate::store::{
    abort, get_json, put_json, read_json, scan_json, vault_key, vault_prefix, Store, Tx, TxResult,
};

const SESSION_TTL_SECS: i64 = 7 * 24 * 3600;
const INVITE_TTL_SECS: i64 = 7 * 24 * 3600;
const LOGIN_WINDOW_SECS: i64 = 15 * 60;
const LOGIN_MAX_FAILURES: usize = 5;
const OWNER_MARKER: &[u8] = b"owner";
pub const MIN_PASSWORD_LEN: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub email: String,
    pub password_hash: String,
    pub owner: bool,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    email: String,
    created_at: i64,
    expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InviteRecord {
    email: String,
    vault_id: String,
    vault: String,
    role: VaultRole,
    expires_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub email: String,
    pub owner: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoggedIn {
    pub token: String,
    pub email: String,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub email: String,
    pub role: VaultRole,
    pub pending: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberAdded {
    pub email: String,
    pub role: VaultRole,
    pub invite: Option<String>,
}

/// Failed logins per email, for rate limiting. In memory: a restart forgets them,
/// which only ever helps a legitimate user.
#[derive(Default)]
pub struct LoginLimiter(Mutex<HashMap<String, Vec<i64>>>);

impl LoginLimiter {
    fn recent_failures(&self, email: &str, now: i64) -> usize {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(email.to_string()).or_default();
        entry.retain(|&t| now - t < LOGIN_WINDOW_SECS);
        entry.len()
    }

    fn record_failure(&self, email: &str, now: i64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(email.to_string()).or_default().push(now);
    }

    fn clear(&self, email: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(email);
    }
}

/// Lowercases and checks an email address; returns the canonical form.
pub fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if valid {
        Ok(email)
    } else {
        Err(Error::bad_request(
            "invalid_email",
            format!("\"{email}\" is not an email address"),
        ))
    }
}

fn check_password_strength(password: &str) -> Result<()> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(Error::bad_request(
            "weak_password",
            format!("passwords need at least {MIN_PASSWORD_LEN} characters"),
        ));
    }
    Ok(())
}

impl Store {
    pub fn register(
        &self,
        email: &str,
        password: &str,
        invite: Option<&str>,
    ) -> Result<Registered> {
        let email = normalize_email(email)?;
        check_password_strength(password)?;
        let password_hash = hash_password(password)?;
        let invite_hash = invite.map(|token| sha256_hex(token.trim().as_bytes()));
        let now = self.now_secs();
        let owner = self.write(|tx| {
            if tx.users.get(email.as_bytes())?.is_some() {
                return abort(Error::conflict(
                    "user_exists",
                    format!("a user with email {email} already exists"),
                ));
            }
            // The first user needs no invite and becomes the owner. The marker is read
            // inside the transaction so two racing registrations cannot both win.
            let first = tx.meta.get(OWNER_MARKER)?.is_none();
            if first {
                tx.meta.insert(OWNER_MARKER, email.as_bytes())?;
            }
            if !first {
                let Some(hash) = &invite_hash else {
                    return abort(Error::Forbidden(
                        "invite_required",
                        "registration needs an invite from a vault admin (--invite TOKEN)".into(),
                    ));
                };
                let invalid = || {
                    Error::bad_request(
                        "invalid_invite",
                        "this invite is unknown, used, expired or for another email",
                    )
                };
                let Some(invite) = get_json::<InviteRecord>(tx.invites, hash)? else {
                    return abort(invalid());
                };
                if invite.email != email || invite.expires_at <= now {
                    return abort(invalid());
                }
                tx.invites.remove(hash.as_bytes())?;
                if get_json::<VaultRecord>(tx.vaults, &invite.vault)?
                    .is_some_and(|v| v.id == invite.vault_id)
                {
                    put_member(tx, &invite.vault_id, &email, invite.role)?;
                }
            }
            let user = UserRecord {
                email: email.clone(),
                password_hash: password_hash.clone(),
                owner: first,
                created_at: now,
            };
            put_json(tx.users, email.as_bytes(), &user)?;
            Ok(first)
        })?;
        Ok(Registered { email, owner })
    }

    /// A session for the CLI and the API (`Authorization: Bearer`).
    pub fn login(&self, limiter: &LoginLimiter, email: &str, password: &str) -> Result<LoggedIn> {
        let email = self.check_password(limiter, email, password)?;
        self.new_session(email, SESSION_PREFIX)
    }

    /// A session for the browser UI's cookie. It is never accepted on the API (and
    /// API sessions never by the UI), so a cookie that leaks to another local port
    /// cannot be used as a bearer token.
    pub fn login_ui(
        &self,
        limiter: &LoginLimiter,
        email: &str,
        password: &str,
    ) -> Result<LoggedIn> {
        let email = self.check_password(limiter, email, password)?;
        self.new_session(email, UI_SESSION_PREFIX)
    }

    /// Checks `email`'s password, rate-limited like a login; returns the canonical
    /// email. The UI asks for it again before a value is revealed or a proposal
    /// decided, so a session cookie alone is never enough for those.
    pub fn check_password(
        &self,
        limiter: &LoginLimiter,
        email: &str,
        password: &str,
    ) -> Result<String> {
        let email = email.trim().to_lowercase();
        let now = self.now_secs();
        if limiter.recent_failures(&email, now) >= LOGIN_MAX_FAILURES {
            return Err(Error::RateLimited(
                "too many failed logins for this email; try again in 15 minutes".into(),
            ));
        }
        let user: Option<UserRecord> = read_json(&self.trees.users, email.as_bytes())?;
        // Verify against a dummy hash for unknown emails: same work, same answer.
        let hash = user
            .as_ref()
            .map(|u| u.password_hash.as_str())
            .unwrap_or_else(|| dummy_password_hash());
        let ok = verify_password(password, hash) && user.is_some();
        if !ok {
            limiter.record_failure(&email, now);
            return Err(Error::InvalidCredentials(
                "invalid email or password".into(),
            ));
        }
        limiter.clear(&email);
        Ok(email)
    }

    fn new_session(&self, email: String, prefix: &str) -> Result<LoggedIn> {
        let now = self.now_secs();
        let token = new_token(prefix);
        let session = SessionRecord {
            email: email.clone(),
            created_at: now,
            expires_at: now + SESSION_TTL_SECS,
        };
        let hash = sha256_hex(token.as_bytes());
        self.write(|tx| put_json(tx.sessions, &hash, &session))?;
        Ok(LoggedIn {
            token,
            email,
            expires_at: session.expires_at,
        })
    }

    pub fn logout(&self, token: &str) -> Result<()> {
        let hash = sha256_hex(token.as_bytes());
        self.write(|tx| {
            tx.sessions.remove(hash.as_bytes())?;
            Ok(())
        })
    }

    /// Resolves a bearer token (session or agent) to the principal it stands for.
    /// The principal of an API token: a CLI/API session or an agent token (never a
    /// UI session).
    pub fn authenticate(&self, token: &str) -> Result<Principal> {
        let unauthorized =
            || Error::Unauthorized("missing, unknown or expired token; log in again".into());
        if token.starts_with(SESSION_PREFIX) {
            return self.session_user(token)?.ok_or_else(unauthorized);
        }
        if token.starts_with(AGENT_PREFIX) {
            let now = self.now_secs();
            let hash = sha256_hex(token.as_bytes());
            let agent = self.agent_by_token_hash(&hash)?.ok_or_else(unauthorized)?;
            if agent.expires_at.is_some_and(|at| at <= now) {
                return Err(unauthorized());
            }
            return Ok(Principal::Agent {
                name: agent.name,
                grants: agent.vaults,
            });
        }
        Err(unauthorized())
    }

    /// The user of a UI session token (`None`: not a live UI session).
    pub fn authenticate_ui(&self, token: &str) -> Result<Option<Principal>> {
        if !token.starts_with(UI_SESSION_PREFIX) {
            return Ok(None);
        }
        self.session_user(token)
    }

    fn session_user(&self, token: &str) -> Result<Option<Principal>> {
        let hash = sha256_hex(token.as_bytes());
        let Some(session) = read_json::<SessionRecord>(&self.trees.sessions, &hash)? else {
            return Ok(None);
        };
        if session.expires_at <= self.now_secs() {
            return Ok(None);
        }
        let user: Option<UserRecord> = read_json(&self.trees.users, session.email.as_bytes())?;
        Ok(user.map(|user| Principal::User {
            email: user.email,
            owner: user.owner,
        }))
    }

    pub fn list_members(&self, principal: &Principal, vault: &str) -> Result<Vec<MemberView>> {
        let (record, access) = self.access(principal, vault)?;
        access.require_member()?;
        let prefix = vault_prefix(&record.id);
        let mut members = Vec::new();
        for entry in self.trees.members.scan_prefix(&prefix) {
            let (key, raw) = entry?;
            let email = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Some(role) = parse_role(&raw) {
                members.push(MemberView {
                    email,
                    role,
                    pending: false,
                });
            }
        }
        let now = self.now_secs();
        for (_, invite) in scan_json::<InviteRecord>(&self.trees.invites, b"")? {
            if invite.vault_id == record.id && invite.expires_at > now {
                members.push(MemberView {
                    email: invite.email,
                    role: invite.role,
                    pending: true,
                });
            }
        }
        Ok(members)
    }

    /// Adds a user to a vault; an email without an account gets a one-time invite.
    pub fn add_member(
        &self,
        principal: &Principal,
        vault: &str,
        email: &str,
        role: VaultRole,
    ) -> Result<MemberAdded> {
        let (record, access) = self.access(principal, vault)?;
        access.require_admin()?;
        let email = normalize_email(email)?;
        let token = new_token(INVITE_PREFIX);
        let invite = InviteRecord {
            email: email.clone(),
            vault_id: record.id.clone(),
            vault: record.name.clone(),
            role,
            expires_at: self.now_secs() + INVITE_TTL_SECS,
        };
        let hash = sha256_hex(token.as_bytes());
        let invited = self.write(|tx| {
            if get_json::<VaultRecord>(tx.vaults, vault)?.is_none() {
                return abort(vault_not_found(vault));
            }
            if tx.users.get(email.as_bytes())?.is_some() {
                put_member(tx, &record.id, &email, role)?;
                Ok(false)
            } else {
                put_json(tx.invites, &hash, &invite)?;
                Ok(true)
            }
        })?;
        Ok(MemberAdded {
            email,
            role,
            invite: invited.then_some(token),
        })
    }

    pub fn remove_member(&self, principal: &Principal, vault: &str, email: &str) -> Result<()> {
        let (record, access) = self.access(principal, vault)?;
        access.require_admin()?;
        let email = email.trim().to_lowercase();
        // sled cannot scan inside a transaction: list the vault's members first and
        // re-read each inside it (the transaction conflicts if one changes meanwhile).
        let member_keys = self
            .trees
            .members
            .scan_prefix(vault_prefix(&record.id))
            .keys()
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let pending: Vec<String> = scan_json::<InviteRecord>(&self.trees.invites, b"")?
            .into_iter()
            .filter(|(_, invite)| invite.vault_id == record.id && invite.email == email)
            .map(|(key, _)| String::from_utf8_lossy(&key).into_owned())
            .collect();
        self.write(|tx| {
            let key = vault_key(&record.id, &email);
            let was = tx.members.remove(key.as_slice())?;
            if was.is_none() && pending.is_empty() {
                return abort(Error::not_found(
                    "member_not_found",
                    format!("{email} is not a member of vault \"{vault}\""),
                ));
            }
            for hash in &pending {
                tx.invites.remove(hash.as_bytes())?;
            }
            if was.as_deref().and_then(parse_role) == Some(VaultRole::Admin)
                && !has_admin(tx, &member_keys)?
            {
                return abort(Error::conflict(
                    "last_admin",
                    format!(
                        "{email} is the last admin of vault \"{vault}\"; add another admin first"
                    ),
                ));
            }
            Ok(())
        })
    }
}

/// Whether any of `member_keys` is still an admin, as seen inside the transaction.
fn has_admin(tx: &Tx, member_keys: &[sled::IVec]) -> TxResult<bool> {
    for key in member_keys {
        if tx.members.get(key)?.as_deref().and_then(parse_role) == Some(VaultRole::Admin) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn store(clock: std::sync::Arc<ManualClock>) -> (tempfile::TempDir, Store) {
        crate::testing::temp_store(clock, false)
    }

    #[test]
    fn a_session_stops_working_when_it_expires() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, store) = store(clock.clone());
        store.register("a@example.com", "password-1", None).unwrap();
        let limiter = LoginLimiter::default();
        let session = store
            .login(&limiter, "a@example.com", "password-1")
            .unwrap();
        assert!(store.authenticate(&session.token).is_ok());
        clock.advance_secs(SESSION_TTL_SECS - 1);
        assert!(store.authenticate(&session.token).is_ok());
        clock.advance_secs(1);
        let err = store.authenticate(&session.token).unwrap_err();
        assert_eq!(err.code(), "unauthorized");
    }

    #[test]
    fn login_failures_are_limited_per_email_and_forgotten_after_the_window() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, store) = store(clock.clone());
        store.register("a@example.com", "password-1", None).unwrap();
        let limiter = LoginLimiter::default();
        for _ in 0..LOGIN_MAX_FAILURES {
            let err = store
                .login(&limiter, "a@example.com", "wrong-pass")
                .unwrap_err();
            assert_eq!(err.code(), "invalid_credentials");
        }
        let err = store
            .login(&limiter, "a@example.com", "password-1")
            .unwrap_err();
        assert_eq!(err.code(), "rate_limited");
        clock.advance_secs(LOGIN_WINDOW_SECS);
        assert!(store.login(&limiter, "a@example.com", "password-1").is_ok());
    }

    #[test]
    fn an_invite_expires_and_is_single_use() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, store) = store(clock.clone());
        store
            .register("owner@example.com", "password-1", None)
            .unwrap();
        let owner = Principal::User {
            email: "owner@example.com".into(),
            owner: true,
        };
        let added = store
            .add_member(&owner, "default", "bob@example.com", VaultRole::Member)
            .unwrap();
        let invite = added.invite.unwrap();
        clock.advance_secs(INVITE_TTL_SECS);
        let err = store
            .register("bob@example.com", "password-2", Some(&invite))
            .unwrap_err();
        assert_eq!(err.code(), "invalid_invite");

        let fresh = store
            .add_member(&owner, "default", "carol@example.com", VaultRole::Member)
            .unwrap()
            .invite
            .unwrap();
        store
            .register("carol@example.com", "password-3", Some(&fresh))
            .unwrap();
        let err = store
            .register("carol@example.com", "password-3", Some(&fresh))
            .unwrap_err();
        assert_eq!(err.code(), "user_exists");
    }
}
