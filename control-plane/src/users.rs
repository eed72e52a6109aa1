//! Users, sessions, invites and vault membership.
//!
//! Passwords are Argon2id hashes; session and invite tokens are stored as SHA-256 so
//! a copy of the store does not log anyone in. Login answers the same way, in about
//! the same time, for an unknown email and a wrong password.
//!
//! What an anonymous caller can make the server do is bounded (DESIGN.md §11.12):
//! - Hashing: every hash goes through the store's [`crate::crypto::PasswordHashing`]
//!   (a few at once, then `429 server_busy`), and registration checks everything that
//!   can refuse it (the bootstrap token or the invite, then the email) before it hashes.
//!   Without a valid invite, registration answers the same whether or not the email
//!   has an account.
//! - Guessing: failed logins are counted per email ([`LoginLimiter`], bounded in
//!   memory). After [`LOGIN_MAX_FAILURES`] the next attempt waits 5 s after the last
//!   failure, then 10 s, 20 s, … up to [`LOGIN_WINDOW_SECS`]; the count is forgotten
//!   an hour after the last failure or on a success. On loopback every client has the
//!   same address, so these delays hold back the human as much as an agent that keeps
//!   failing on purpose. The way out is the **local login token**: a random token the
//!   server writes at every start, 0600, into its data dir (`local-login-token`). The
//!   CLI sends it when it can read it, i.e. when it runs as the server's OS user (which
//!   agents must not be, DESIGN.md §4); such a login is not held back by anyone's
//!   failures. Browser logins and the UI's password confirmations have no such proof
//!   and wait like everyone else.
//! - Claiming: until the owner exists, registration needs the **bootstrap token** the
//!   server writes, 0600, into its data dir (`bootstrap-token`, a new one at every
//!   start); it is removed when the owner registers. Another local user cannot read
//!   it, so a fresh install cannot be claimed by anyone else on the machine.

use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::access::{parse_role, put_member, vault_not_found, Principal, VaultRecord, VaultRole};
use crate::crypto::{
    new_token, sha256_hex, AGENT_PREFIX, BOOTSTRAP_PREFIX, INVITE_PREFIX, LOCAL_LOGIN_PREFIX,
    SESSION_PREFIX, UI_SESSION_PREFIX,
};
use crate::error::{Error, Result};
use crate::store::{
    abort, get_json, put_json, read_json, scan_json, vault_key, vault_prefix, write_private_file,
    Store, Tx, TxResult,
};

const SESSION_TTL_SECS: i64 = 7 * 24 * 3600;
const INVITE_TTL_SECS: i64 = 7 * 24 * 3600;
/// The longest wait between two attempts for an email that keeps failing.
pub const LOGIN_WINDOW_SECS: i64 = 15 * 60;
/// Failed logins per email before attempts have to wait.
pub const LOGIN_MAX_FAILURES: u32 = 5;
/// The wait after the last free failure; it doubles with every further one.
const LOGIN_FIRST_DELAY_MS: i64 = 5_000;
/// An email's failures are forgotten this long after the last one.
const LOGIN_FORGET_MS: i64 = 60 * 60 * 1000;
/// Emails the limiter keeps at most (each under 300 bytes).
const LOGIN_MAX_TRACKED: usize = 10_000;
/// The file in the data dir with the token the first registration needs.
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";
/// The file in the data dir with the token that exempts a login from the delays.
pub const LOCAL_LOGIN_TOKEN_FILE: &str = "local-login-token";
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

/// Failed logins per email, for the delays between attempts. The counts are in the
/// store (tree `login_failures`), so every control plane on a shared store sees the
/// same ones and a restart forgets none. Bounded: looking an email up never adds it,
/// and at [`LOGIN_MAX_TRACKED`] emails the forgotten ones go first, then the one with
/// the fewest failures (so flooding it with made-up emails does not reset the count of
/// an email under attack).
pub struct LoginLimiter {
    max_tracked: usize,
    /// Serializes this process's counting (the store's transaction does it across
    /// processes), so parallel guesses here do not all retry on conflicts.
    serial: Mutex<()>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        LoginLimiter::with_capacity(LOGIN_MAX_TRACKED)
    }
}

/// Times are unix milliseconds: a wait of seconds must not round to none.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Failures {
    count: u32,
    last: i64,
}

impl Failures {
    fn forgotten(&self, now: i64) -> bool {
        now - self.last >= LOGIN_FORGET_MS
    }

    /// Milliseconds until the next attempt may run (0: now).
    fn wait_ms(&self, now: i64) -> i64 {
        if self.forgotten(now) || self.count < LOGIN_MAX_FAILURES {
            return 0;
        }
        let doublings = (self.count - LOGIN_MAX_FAILURES).min(20);
        let delay = (LOGIN_FIRST_DELAY_MS << doublings).min(LOGIN_WINDOW_SECS * 1000);
        (self.last + delay - now).max(0)
    }
}

impl LoginLimiter {
    /// A limiter that tracks at most `max_tracked` emails.
    pub fn with_capacity(max_tracked: usize) -> LoginLimiter {
        LoginLimiter {
            max_tracked,
            serial: Mutex::default(),
        }
    }

    /// Refuses an attempt that comes before its delay is over (`now` in unix ms).
    fn check(&self, store: &Store, email: &str, now: i64) -> Result<()> {
        let failures: Option<Failures> = read_json(&store.trees.login_failures, email)?;
        too_soon(failures.map_or(0, |f| f.wait_ms(now)))
    }

    /// Checks again and counts the attempt as failed until it succeeds, in one
    /// transaction: parallel guesses cannot all slip in before the first failure is
    /// recorded, on this control plane or another.
    fn begin(&self, store: &Store, email: &str, now: i64) -> Result<()> {
        let _serial = locked(&self.serial);
        let tree = &store.trees.login_failures;
        if !tree.contains_key(email)? && tree.len()? >= self.max_tracked {
            self.make_room(store, now)?;
        }
        store.write(|tx| {
            let mut failures =
                get_json::<Failures>(tx.login_failures, email)?.unwrap_or(Failures {
                    count: 0,
                    last: now,
                });
            too_soon(failures.wait_ms(now))?;
            if failures.forgotten(now) {
                failures.count = 0;
            }
            failures.count += 1;
            failures.last = now;
            put_json(tx.login_failures, email, &failures)
        })
    }

    /// Drops the forgotten emails, or if none is, the one with the fewest failures.
    fn make_room(&self, store: &Store, now: i64) -> Result<()> {
        let tracked = scan_json::<Failures>(&store.trees.login_failures, b"")?;
        let mut doomed: Vec<Vec<u8>> = tracked
            .iter()
            .filter(|(_, f)| f.forgotten(now))
            .map(|(email, _)| email.clone())
            .collect();
        if doomed.is_empty() {
            doomed.extend(
                tracked
                    .iter()
                    .min_by_key(|(_, f)| (f.count, f.last))
                    .map(|(email, _)| email.clone()),
            );
        }
        store.write(|tx| {
            for email in &doomed {
                tx.login_failures.remove(email)?;
            }
            Ok(())
        })
    }

    fn clear(&self, store: &Store, email: &str) -> Result<()> {
        if store.trees.login_failures.contains_key(email)? {
            store.write(|tx| tx.login_failures.remove(email).map(drop))?;
        }
        Ok(())
    }

    #[cfg(test)]
    fn tracked(&self, store: &Store) -> usize {
        store.trees.login_failures.len().unwrap()
    }
}

fn too_soon(wait_ms: i64) -> Result<()> {
    if wait_ms <= 0 {
        return Ok(());
    }
    let wait = (wait_ms + 999) / 1000;
    Err(Error::RateLimited(format!(
        "too many failed logins for this email; try again in {wait} s (on the server's \
         machine, `agent-vault auth login` run as the server's OS user is not held back)"
    )))
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn same_token(token: &str, hash: &str) -> bool {
    let presented = sha256_hex(token.trim().as_bytes());
    bool::from(subtle::ConstantTimeEq::ct_eq(
        presented.as_bytes(),
        hash.as_bytes(),
    ))
}

/// An invite that lets `email` register now, or why not. Unknown, used, expired and
/// someone else's invites are one answer, whether or not `email` has an account.
fn usable_invite(
    presented: bool,
    invite: Option<InviteRecord>,
    email: &str,
    now: i64,
) -> Result<InviteRecord> {
    if !presented {
        return Err(Error::Forbidden(
            "invite_required",
            "registration needs an invite from a vault admin (--invite TOKEN)".into(),
        ));
    }
    match invite {
        Some(invite) if invite.email == email && invite.expires_at > now => Ok(invite),
        _ => Err(Error::Forbidden(
            "invalid_invite",
            "this invite is unknown, used, expired or for another email".into(),
        )),
    }
}

fn user_exists(email: &str) -> Error {
    Error::conflict(
        "user_exists",
        format!("a user with email {email} already exists"),
    )
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
    /// Registers a user: the first one (the owner) with the bootstrap token, every
    /// later one with an invite for their email.
    pub fn register(
        &self,
        email: &str,
        password: &str,
        invite: Option<&str>,
        bootstrap_token: Option<&str>,
    ) -> Result<Registered> {
        let email = normalize_email(email)?;
        check_password_strength(password)?;
        let invite_hash = invite.map(|token| sha256_hex(token.trim().as_bytes()));
        let now = self.now_secs();
        // Everything that can refuse is checked before the hash (the expensive part);
        // the transaction checks it all again.
        if self.trees.meta.get(OWNER_MARKER)?.is_none() {
            self.check_bootstrap_token(bootstrap_token)?;
        } else {
            let invite = match &invite_hash {
                Some(hash) => read_json::<InviteRecord>(&self.trees.invites, hash)?,
                None => None,
            };
            usable_invite(invite_hash.is_some(), invite, &email, now)?;
            if self.trees.users.contains_key(email.as_bytes())? {
                return Err(user_exists(&email));
            }
        }
        let password_hash = self.passwords.hash(password)?;
        let owner = self.write(|tx| {
            // The owner marker is read inside the transaction so two racing
            // registrations cannot both win.
            let first = tx.meta.get(OWNER_MARKER)?.is_none();
            if first {
                if let Err(e) = self.check_bootstrap_token(bootstrap_token) {
                    return abort(e);
                }
                tx.meta.insert(OWNER_MARKER, email.as_bytes())?;
            } else {
                let invite = match &invite_hash {
                    Some(hash) => get_json::<InviteRecord>(tx.invites, hash)?,
                    None => None,
                };
                let invite = match usable_invite(invite_hash.is_some(), invite, &email, now) {
                    Ok(invite) => invite,
                    Err(e) => return abort(e),
                };
                if let Some(hash) = &invite_hash {
                    tx.invites.remove(hash.as_bytes())?;
                }
                if get_json::<VaultRecord>(tx.vaults, &invite.vault)?
                    .is_some_and(|v| v.id == invite.vault_id)
                {
                    put_member(tx, &invite.vault_id, &email, invite.role)?;
                }
            }
            if tx.users.get(email.as_bytes())?.is_some() {
                return abort(user_exists(&email));
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
        if owner {
            *locked(&self.local_tokens.bootstrap) = None;
            let _ = std::fs::remove_file(self.data_dir().join(BOOTSTRAP_TOKEN_FILE));
        }
        Ok(Registered { email, owner })
    }

    fn check_bootstrap_token(&self, token: Option<&str>) -> Result<()> {
        let Some(token) = token.filter(|t| !t.trim().is_empty()) else {
            return Err(Error::Forbidden(
                "bootstrap_token_required",
                format!(
                    "this server has no owner yet: the first registration needs the bootstrap \
                     token in the file {BOOTSTRAP_TOKEN_FILE} of the server's data dir \
                     (`agent-vault auth register` reads it when run as the server's OS user; \
                     else pass --bootstrap-token)"
                ),
            ));
        };
        match locked(&self.local_tokens.bootstrap).as_deref() {
            Some(hash) if same_token(token, hash) => Ok(()),
            _ => Err(Error::Forbidden(
                "invalid_bootstrap_token",
                format!(
                    "this is not the server's bootstrap token (a new one is written to \
                     {BOOTSTRAP_TOKEN_FILE} in its data dir at every start until the owner \
                     registers)"
                ),
            )),
        }
    }

    /// Writes this process's tokens into the data dir: a new local login token, and a
    /// new bootstrap token while there is no owner (else a stale one is removed).
    pub(crate) fn write_local_tokens(&self) -> std::io::Result<()> {
        let bootstrap_file = self.data_dir().join(BOOTSTRAP_TOKEN_FILE);
        if self
            .trees
            .meta
            .get(OWNER_MARKER)
            .map_err(std::io::Error::other)?
            .is_none()
        {
            let token = new_token(BOOTSTRAP_PREFIX);
            write_private_file(&bootstrap_file, format!("{token}\n").as_bytes())?;
            *locked(&self.local_tokens.bootstrap) = Some(sha256_hex(token.as_bytes()));
        } else if bootstrap_file.exists() {
            std::fs::remove_file(&bootstrap_file)?;
        }
        let token = new_token(LOCAL_LOGIN_PREFIX);
        let file = self.data_dir().join(LOCAL_LOGIN_TOKEN_FILE);
        write_private_file(&file, format!("{token}\n").as_bytes())?;
        *locked(&self.local_tokens.local_login) = Some(sha256_hex(token.as_bytes()));
        Ok(())
    }

    /// The bootstrap token's file while the first registration still needs it.
    pub fn bootstrap_token_file(&self) -> Option<PathBuf> {
        locked(&self.local_tokens.bootstrap)
            .is_some()
            .then(|| self.data_dir().join(BOOTSTRAP_TOKEN_FILE))
    }

    fn is_local_login_token(&self, token: &str) -> bool {
        locked(&self.local_tokens.local_login)
            .as_deref()
            .is_some_and(|hash| same_token(token, hash))
    }

    /// A session for the CLI and the API (`Authorization: Bearer`).
    pub fn login(&self, limiter: &LoginLimiter, email: &str, password: &str) -> Result<LoggedIn> {
        self.login_with(limiter, email, password, None)
    }

    /// [`Store::login`], and with this process's local login token (from the data dir)
    /// not held back by failed logins: only the server's OS user can read it. Another
    /// token counts as none.
    pub fn login_with(
        &self,
        limiter: &LoginLimiter,
        email: &str,
        password: &str,
        local_login_token: Option<&str>,
    ) -> Result<LoggedIn> {
        let local = local_login_token.is_some_and(|token| self.is_local_login_token(token));
        let email = self.verify_user_password(limiter, email, password, local)?;
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

    /// Checks `email`'s password, limited like a login; returns the canonical
    /// email. The UI asks for it again before a value is revealed or a proposal
    /// decided, so a session cookie alone is never enough for those.
    pub fn check_password(
        &self,
        limiter: &LoginLimiter,
        email: &str,
        password: &str,
    ) -> Result<String> {
        self.verify_user_password(limiter, email, password, false)
    }

    /// The password check behind every login: waits for its turn (unless `local`),
    /// then for a hashing slot; an unknown email costs the same hash as a known one.
    fn verify_user_password(
        &self,
        limiter: &LoginLimiter,
        email: &str,
        password: &str,
        local: bool,
    ) -> Result<String> {
        let email = email.trim().to_lowercase();
        let now = self.clock.now_ms();
        if !local {
            limiter.check(self, &email, now)?;
        }
        let mut slot = self.passwords.slot()?;
        if !local {
            limiter.begin(self, &email, now)?;
        }
        let user: Option<UserRecord> = read_json(&self.trees.users, email.as_bytes())?;
        let ok = match &user {
            Some(user) => slot.verify(password, &user.password_hash),
            None => {
                slot.verify_dummy(password)?;
                false
            }
        };
        drop(slot);
        if !ok {
            return Err(Error::InvalidCredentials(
                "invalid email or password".into(),
            ));
        }
        if !local {
            limiter.clear(self, &email)?;
        }
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
fn has_admin(tx: &Tx, member_keys: &[crate::store::Bytes]) -> TxResult<bool> {
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
    use crate::crypto::PasswordHashing;
    use crate::testing::register_owner;

    fn store(clock: std::sync::Arc<ManualClock>) -> (tempfile::TempDir, Store) {
        crate::testing::temp_store(clock, false)
    }

    #[test]
    fn a_session_stops_working_when_it_expires() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, store) = store(clock.clone());
        register_owner(&store, "a@example.com", "password-1");
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
        register_owner(&store, "a@example.com", "password-1");
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
        register_owner(&store, "owner@example.com", "password-1");
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
            .register("bob@example.com", "password-2", Some(&invite), None)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_invite");

        let fresh = store
            .add_member(&owner, "default", "carol@example.com", VaultRole::Member)
            .unwrap()
            .invite
            .unwrap();
        store
            .register("carol@example.com", "password-3", Some(&fresh), None)
            .unwrap();
        // A used invite is no invite: the answer does not say Carol has an account.
        let err = store
            .register("carol@example.com", "password-3", Some(&fresh), None)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_invite");
    }

    /// A store whose hashing has one slot that the test can hold.
    fn one_slot_store() -> (tempfile::TempDir, Store) {
        let (dir, mut store) = store(ManualClock::new(1_800_000_000_000));
        store.passwords = PasswordHashing::new(1, std::time::Duration::from_millis(20));
        (dir, store)
    }

    #[test]
    fn registration_that_will_be_refused_never_waits_for_a_hash() {
        let (_dir, store) = one_slot_store();
        let held = store.passwords.slot().unwrap();
        // With the only hashing slot taken, each refusal still comes at once and with
        // its own reason, never `server_busy`: nothing was hashed.
        let cases: [(&str, Option<&str>, Option<&str>, &str); 3] = [
            ("no bootstrap token", None, None, "bootstrap_token_required"),
            (
                "a wrong one",
                None,
                Some("av_boot_nope"),
                "invalid_bootstrap_token",
            ),
            (
                "a wrong one and an invite",
                Some("av_inv_x"),
                Some("x"),
                "invalid_bootstrap_token",
            ),
        ];
        for (behaviour, invite, bootstrap, code) in cases {
            let err = store
                .register("first@example.com", "password-1", invite, bootstrap)
                .unwrap_err();
            assert_eq!(err.code(), code, "{behaviour}");
        }
        drop(held);
        register_owner(&store, "owner@example.com", "password-1");
        let held = store.passwords.slot().unwrap();
        for (email, invite, code) in [
            ("new@example.com", None, "invite_required"),
            ("new@example.com", Some("av_inv_unknown"), "invalid_invite"),
        ] {
            let err = store
                .register(email, "password-2", invite, None)
                .unwrap_err();
            assert_eq!(err.code(), code);
        }
        drop(held);
    }

    #[test]
    fn registering_without_a_valid_invite_answers_alike_for_existing_and_unknown_emails() {
        let (_dir, store) = store(ManualClock::new(1_800_000_000_000));
        register_owner(&store, "owner@example.com", "password-1");
        for invite in [None, Some("av_inv_unknown")] {
            let answers: Vec<(String, String)> = ["owner@example.com", "nobody@example.com"]
                .into_iter()
                .map(|email| {
                    let err = store
                        .register(email, "password-2", invite, None)
                        .unwrap_err();
                    (err.code().to_string(), err.to_string())
                })
                .collect();
            assert_eq!(answers[0], answers[1], "invite {invite:?}");
        }
    }

    #[test]
    fn the_first_registration_needs_the_bootstrap_token_and_it_works_once() {
        let (dir, store) = store(ManualClock::new(1_800_000_000_000));
        let file = dir.path().join(BOOTSTRAP_TOKEN_FILE);
        assert_eq!(store.bootstrap_token_file(), Some(file.clone()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = crate::testing::bootstrap_token(&store);
        assert!(token.starts_with(BOOTSTRAP_PREFIX), "{token}");

        let err = store
            .register("agent@example.com", "password-1", None, None)
            .unwrap_err();
        assert_eq!(err.code(), "bootstrap_token_required");
        assert_eq!(err.status(), axum::http::StatusCode::FORBIDDEN);
        let registered = store
            .register("owner@example.com", "password-1", None, Some(&token))
            .unwrap();
        assert!(registered.owner);
        assert!(!file.exists(), "the token is used up");
        assert_eq!(store.bootstrap_token_file(), None);
        // Once there is an owner the token is worth nothing.
        let err = store
            .register("agent@example.com", "password-1", None, Some(&token))
            .unwrap_err();
        assert_eq!(err.code(), "invite_required");
    }

    #[test]
    fn failed_logins_make_the_next_attempt_wait_longer_each_time_never_for_good() {
        let clock = ManualClock::new(1_800_000_000_000);
        let (_dir, store) = store(clock.clone());
        register_owner(&store, "a@example.com", "password-1");
        let limiter = LoginLimiter::default();
        let fail = || {
            store
                .login(&limiter, "a@example.com", "wrong-pass")
                .unwrap_err()
                .code()
        };
        for _ in 0..LOGIN_MAX_FAILURES {
            assert_eq!(fail(), "invalid_credentials");
        }
        // 5 s after the fifth failure, 10 s after the sixth, 20 s after the seventh.
        for wait in [5, 10, 20] {
            assert_eq!(fail(), "rate_limited");
            clock.advance_secs(wait - 1);
            assert_eq!(fail(), "rate_limited", "{wait} s");
            clock.advance_secs(1);
            assert_eq!(fail(), "invalid_credentials", "{wait} s");
        }
        // However long the failures go on, the wait stays under the cap, and the right
        // password then works.
        for _ in 0..30 {
            clock.advance_secs(LOGIN_WINDOW_SECS);
            assert_eq!(fail(), "invalid_credentials");
        }
        let err = store
            .login(&limiter, "a@example.com", "password-1")
            .unwrap_err();
        assert!(err.to_string().contains("try again in 900 s"), "{err}");
        clock.advance_secs(LOGIN_WINDOW_SECS);
        assert!(store.login(&limiter, "a@example.com", "password-1").is_ok());
        assert_eq!(limiter.tracked(&store), 0, "a success forgets the failures");
    }

    #[test]
    fn the_local_login_token_is_not_held_back_by_anyones_failures() {
        let (dir, store) = store(ManualClock::new(1_800_000_000_000));
        register_owner(&store, "owner@example.com", "password-1");
        let limiter = LoginLimiter::default();
        for _ in 0..10 {
            let _ = store.login(&limiter, "owner@example.com", "wrong-pass");
        }
        let refused = store.login(&limiter, "owner@example.com", "password-1");
        assert_eq!(refused.unwrap_err().code(), "rate_limited");

        let file = dir.path().join(LOCAL_LOGIN_TOKEN_FILE);
        let token = std::fs::read_to_string(&file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let local = store.login_with(&limiter, "owner@example.com", "password-1", Some(&token));
        assert!(local.is_ok(), "{:?}", local.err());
        // It still needs the password, and another token is no token.
        let wrong = store.login_with(&limiter, "owner@example.com", "wrong-pass", Some(&token));
        assert_eq!(wrong.unwrap_err().code(), "invalid_credentials");
        let other = store.login_with(
            &limiter,
            "owner@example.com",
            "password-1",
            Some("av_local_0000"),
        );
        assert_eq!(other.unwrap_err().code(), "rate_limited");
    }

    #[test]
    fn the_login_limiter_holds_a_bounded_number_of_emails_and_keeps_the_attacked_one() {
        let (_dir, store) = crate::testing::system_store();
        let capacity = 40;
        let limiter = LoginLimiter::with_capacity(capacity);
        let now = 1_800_000_000_000;
        for _ in 0..LOGIN_MAX_FAILURES {
            limiter.begin(&store, "owner@example.com", now).unwrap();
        }
        // Looking up an email never adds it.
        for i in 0..100 {
            limiter
                .check(&store, &format!("lookup{i}@example.com"), now)
                .unwrap();
        }
        assert_eq!(limiter.tracked(&store), 1);
        for i in 0..capacity + 20 {
            limiter
                .begin(&store, &format!("x{i}@example.com"), now)
                .unwrap();
        }
        assert_eq!(limiter.tracked(&store), capacity);
        let err = limiter.check(&store, "owner@example.com", now).unwrap_err();
        assert_eq!(
            err.code(),
            "rate_limited",
            "the attacked email keeps its count"
        );
        // Forgotten entries make room first.
        limiter
            .begin(&store, "late@example.com", now + LOGIN_FORGET_MS)
            .unwrap();
        assert_eq!(limiter.tracked(&store), 1);
    }

    #[test]
    fn parallel_wrong_passwords_cannot_slip_past_the_limit() {
        let (_dir, store) = store(ManualClock::new(1_800_000_000_000));
        register_owner(&store, "a@example.com", "password-1");
        let limiter = LoginLimiter::default();
        let codes: Vec<&'static str> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..12)
                .map(|_| {
                    scope.spawn(|| {
                        store
                            .login(&limiter, "a@example.com", "wrong-pass")
                            .unwrap_err()
                            .code()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let checked = codes
            .iter()
            .filter(|c| **c == "invalid_credentials")
            .count();
        assert!(checked <= LOGIN_MAX_FAILURES as usize, "{codes:?}");
    }
}
