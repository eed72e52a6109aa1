//! `agent-vault master-password change` and `agent-vault master-key rotate` (owner only).
//!
//! The master password wraps the data key; the data key encrypts every value.
//! Changing the password re-wraps the data key; rotating the key re-encrypts every
//! value under a new one.

use std::io::BufRead;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::client::api_path;
use super::context::Context;
use super::output;
use super::prompt;

#[derive(Debug, Subcommand)]
pub enum MasterPasswordCommand {
    /// Change, set or remove the master password
    Change {
        /// Read two lines from stdin: the current password, then the new one
        /// (an empty line means passwordless)
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum MasterKeyCommand {
    /// Re-encrypt every credential value under a new data key
    Rotate,
}

/// The body of `POST /v1/master-password`: empty means passwordless (`null`).
#[derive(Debug, PartialEq, Eq)]
pub struct PasswordChange {
    pub current: Option<Zeroizing<String>>,
    pub new: Option<Zeroizing<String>>,
}

impl PasswordChange {
    fn from_lines(current: Zeroizing<String>, new: Zeroizing<String>) -> Self {
        let some = |s: Zeroizing<String>| if s.is_empty() { None } else { Some(s) };
        Self {
            current: some(current),
            new: some(new),
        }
    }

    fn body(&self) -> Value {
        let text = |s: &Option<Zeroizing<String>>| match s {
            Some(s) => Value::String(s.to_string()),
            None => Value::Null,
        };
        json!({ "current": text(&self.current), "new": text(&self.new) })
    }
}

/// Reads `--password-stdin`'s two lines: current, then new.
pub fn read_change(reader: &mut impl BufRead) -> anyhow::Result<PasswordChange> {
    let current = prompt::read_line(reader)?.context(
        "expected the current master password on the first line of stdin (empty if passwordless)",
    )?;
    let new = prompt::read_line(reader)?.context(
        "expected the new master password on the second line of stdin (empty for passwordless)",
    )?;
    Ok(PasswordChange::from_lines(current, new))
}

fn prompt_change() -> anyhow::Result<PasswordChange> {
    if !prompt::stdin_is_terminal() {
        bail!(prompt::NO_PASSWORD);
    }
    let current =
        prompt::prompt_hidden("Current master password (empty if the server is passwordless): ")?;
    let new = prompt::prompt_hidden("New master password (empty to run passwordless): ")?;
    if new.is_empty() {
        let question = "Remove the master password? The data key will be kept in a 0600 \
                        file in the server's data directory.";
        if !prompt::confirm(question)? {
            bail!("master password not changed");
        }
    } else if *prompt::prompt_hidden("Repeat the new master password: ")? != *new {
        bail!("the passwords do not match");
    }
    Ok(PasswordChange::from_lines(current, new))
}

pub fn run_password(cmd: MasterPasswordCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        MasterPasswordCommand::Change { password_stdin } => {
            let client = ctx.client()?;
            let change = if password_stdin {
                read_change(&mut std::io::stdin().lock())?
            } else {
                prompt_change()?
            };
            client.post(&api_path(&["v1", "master-password"]), &change.body())?;
            output::line(match change.new {
                Some(_) => "Master password changed",
                None => "Master password removed: the server now runs passwordless",
            })
        }
    }
}

pub fn run_key(cmd: MasterKeyCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        MasterKeyCommand::Rotate => {
            let rotated = ctx
                .client()?
                .post(&api_path(&["v1", "master-key", "rotate"]), &json!({}))?;
            if ctx.json {
                return output::json(&rotated);
            }
            let n = rotated
                .get("reencrypted")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0);
            output::line(&format!(
                "Rotated the data key: re-encrypted {}",
                output::count(n, "credential value", "credential values")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(input: &str) -> anyhow::Result<PasswordChange> {
        read_change(&mut std::io::Cursor::new(input.as_bytes().to_vec()))
    }

    #[test]
    fn two_lines_current_then_new() {
        let body = change("old-password\nnew-password\n").unwrap().body();
        assert_eq!(
            body,
            json!({"current": "old-password", "new": "new-password"})
        );
    }

    #[test]
    fn empty_lines_mean_passwordless() {
        assert_eq!(
            change("\nnew-password\n").unwrap().body(),
            json!({"current": null, "new": "new-password"})
        );
        assert_eq!(
            change("old-password\r\n\r\n").unwrap().body(),
            json!({"current": "old-password", "new": null})
        );
    }

    #[test]
    fn a_missing_second_line_is_an_error() {
        let err = change("old-password\n").unwrap_err().to_string();
        assert!(err.contains("second line"), "{err}");
        assert!(change("").is_err());
    }
}
