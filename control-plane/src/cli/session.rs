//! The CLI's files under `~/.agent-vault/`: `session.json` (`{address, email, token}`,
//! written by `auth login`) and `config.json` (`{vault}`, written by `vault use`).
//!
//! The session token is as good as the password for 7 days, so the directory is 0700
//! and both files are created 0600 *before* anything is written to them, then renamed
//! into place: no reader ever sees a half-written file or a moment of wider mode.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A logged-in user's session, as saved by `auth login`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The server that issued the token; the token is only ever sent back to it.
    pub address: String,
    pub email: String,
    pub token: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("address", &self.address)
            .field("email", &self.email)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Local preferences, as saved by `vault use`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The vault commands act on when neither `--vault` nor `AGENT_VAULT_VAULT` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<String>,
}

/// The `~/.agent-vault/` directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// `$HOME/.agent-vault`.
    pub fn from_home() -> anyhow::Result<Self> {
        let home = std::env::var_os("HOME")
            .filter(|home| !home.is_empty())
            .ok_or_else(|| anyhow!("HOME is not set: cannot find ~/.agent-vault"))?;
        Ok(Self::at(Path::new(&home).join(".agent-vault")))
    }

    /// A state directory at an explicit path (tests).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn session_path(&self) -> PathBuf {
        self.dir.join("session.json")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn load_session(&self) -> anyhow::Result<Option<Session>> {
        read_json(&self.session_path())
    }

    pub fn save_session(&self, session: &Session) -> anyhow::Result<()> {
        write_private_json(&self.dir, &self.session_path(), session)
    }

    /// Removes the saved session; `false` if there was none.
    pub fn remove_session(&self) -> anyhow::Result<bool> {
        let path = self.session_path();
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    pub fn load_config(&self) -> anyhow::Result<Config> {
        Ok(read_json(&self.config_path())?.unwrap_or_default())
    }

    pub fn save_config(&self, config: &Config) -> anyhow::Result<()> {
        write_private_json(&self.dir, &self.config_path(), config)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is not valid: remove it and try again", path.display()))
}

/// Writes `value` to `path` (inside `dir`) as a 0600 file in a 0700 directory, atomically.
fn write_private_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // `mode` above only applies to a directory it creates; tighten one that existed.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {} to 0700", dir.display()))?;

    let mut body = serde_json::to_vec_pretty(value).context("cannot encode the file")?;
    body.push(b'\n');

    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = file
        .write_all(&body)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    fn session() -> Session {
        Session {
            address: "http://127.0.0.1:14321".into(),
            email: "owner@example.com".into(),
            token: "av_sess_0123".into(),
        }
    }

    #[test]
    fn session_file_is_0600_in_a_0700_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path().join(".agent-vault"));
        state.save_session(&session()).unwrap();
        assert_eq!(mode(&state.session_path()), 0o600);
        assert_eq!(mode(&tmp.path().join(".agent-vault")), 0o700);
        assert_eq!(state.load_session().unwrap(), Some(session()));
    }

    #[test]
    fn overwriting_keeps_0600_even_if_the_old_file_was_wider() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        state.save_session(&session()).unwrap();
        fs::set_permissions(state.session_path(), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        state.save_session(&session()).unwrap();
        assert_eq!(mode(&state.session_path()), 0o600);
        assert_eq!(mode(tmp.path()), 0o700);
    }

    #[test]
    fn session_file_has_the_documented_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        state.save_session(&session()).unwrap();
        let text = fs::read_to_string(state.session_path()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["address"], "http://127.0.0.1:14321");
        assert_eq!(value["email"], "owner@example.com");
        assert_eq!(value["token"], "av_sess_0123");
    }

    #[test]
    fn missing_files_are_empty_not_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path().join("absent"));
        assert_eq!(state.load_session().unwrap(), None);
        assert_eq!(state.load_config().unwrap(), Config::default());
        assert!(!state.remove_session().unwrap());
    }

    #[test]
    fn config_round_trips_and_session_removal_works() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        let config = Config {
            vault: Some("my-vault".into()),
        };
        state.save_config(&config).unwrap();
        assert_eq!(state.load_config().unwrap(), config);
        assert_eq!(mode(&state.config_path()), 0o600);
        state.save_session(&session()).unwrap();
        assert!(state.remove_session().unwrap());
        assert_eq!(state.load_session().unwrap(), None);
    }

    #[test]
    fn corrupt_session_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::at(tmp.path());
        fs::write(state.session_path(), "{not json").unwrap();
        let err = state.load_session().unwrap_err().to_string();
        assert!(err.contains("session.json is not valid"), "{err}");
    }

    #[test]
    fn debug_never_shows_the_token() {
        assert!(!format!("{:?}", session()).contains("av_sess_0123"));
    }
}
