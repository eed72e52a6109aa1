//! `agent-vault vault credential` (alias `creds`): the secrets themselves.
//!
//! Values are printed by `get` and `list --reveal` only. `set` checks every
//! `KEY=VALUE` before sending anything and sends the whole batch in one request, which
//! the server applies all or nothing. `KEY=-` reads the value instead of taking it
//! from the command line, where every local user can see it (`ps`, `/proc`): a hidden
//! prompt on a terminal, else stdin ([`read_pairs`]).

use std::io::Read as _;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::client::api_path;
use super::context::Context;
use super::output::{self, str_field};
use super::prompt;

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Set (or overwrite) credentials: KEY=VALUE [KEY=VALUE ...], all or nothing.
    /// KEY=- reads the value from a hidden prompt, or from stdin (the whole of it for
    /// one KEY=-, one line each for several), so it never shows in `ps`
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
    },
    /// Print one credential's value alone (for pipes)
    Get {
        /// The credential key, e.g. STRIPE_KEY
        key: String,
    },
    /// List credential keys and when they changed
    List {
        /// Also print the values
        #[arg(long)]
        reveal: bool,
    },
    /// Delete credentials permanently, all or nothing
    Delete {
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
}

pub fn run(cmd: CredentialCommand, ctx: &Context) -> anyhow::Result<()> {
    match cmd {
        CredentialCommand::Set { pairs } => set(ctx, &pairs),
        CredentialCommand::Get { key } => get(ctx, &key),
        CredentialCommand::List { reveal } => list(ctx, reveal),
        CredentialCommand::Delete { keys } => delete(ctx, &keys),
    }
}

/// DESIGN.md §5: `^[A-Z][A-Z0-9_]*$`.
pub fn valid_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

pub fn check_key(key: &str) -> anyhow::Result<()> {
    if !valid_key(key) {
        bail!(
            "invalid credential key {key:?}: use UPPER_SNAKE_CASE (A-Z, 0-9, _; starting with a letter)"
        );
    }
    Ok(())
}

/// Parses `KEY=VALUE` arguments; the value is everything after the first `=`.
/// Errors never quote a value.
pub fn parse_pairs(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut parsed: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            // Without `=` the argument may be the secret itself: do not echo it.
            if valid_key(pair) {
                bail!("{pair} has no value: write {pair}=VALUE");
            }
            bail!("expected KEY=VALUE, got an argument without '='");
        };
        if key.is_empty() {
            bail!("expected KEY=VALUE, got an argument with an empty key");
        }
        check_key(key)?;
        if value.is_empty() {
            bail!("{key} has an empty value: a credential value cannot be empty");
        }
        if parsed.iter().any(|(k, _)| k == key) {
            bail!("{key} is given twice");
        }
        parsed.push((key.to_owned(), value.to_owned()));
    }
    Ok(parsed)
}

/// The value argument that means "read it, do not take it from the command line".
pub const READ_VALUE: &str = "-";

/// [`parse_pairs`], then every `KEY=-` value read: on a terminal from a hidden prompt
/// per key; otherwise from stdin, all of it (one trailing newline removed) when one
/// key reads, one line per key, in order, when several do.
pub fn read_pairs(pairs: &[String]) -> anyhow::Result<Vec<(String, Zeroizing<String>)>> {
    let parsed = parse_pairs(pairs)?;
    let reading = parsed.iter().filter(|(_, v)| v == READ_VALUE).count();
    let interactive = prompt::stdin_is_terminal();
    let mut stdin = std::io::stdin().lock();
    let mut values = Vec::with_capacity(parsed.len());
    for (key, value) in parsed {
        let value = if value != READ_VALUE {
            Zeroizing::new(value)
        } else if interactive {
            prompt::prompt_hidden(&format!("Value for {key}: "))?
        } else if reading == 1 {
            let mut all = Zeroizing::new(String::new());
            stdin
                .read_to_string(&mut all)
                .with_context(|| format!("cannot read the value of {key} from stdin"))?;
            if all.ends_with('\n') {
                all.pop();
                if all.ends_with('\r') {
                    all.pop();
                }
            }
            all
        } else {
            prompt::read_line(&mut stdin)?
                .with_context(|| format!("no line on stdin for {key}: one line per KEY=-"))?
        };
        if value.is_empty() {
            bail!("{key} has an empty value: a credential value cannot be empty");
        }
        values.push((key, value));
    }
    Ok(values)
}

fn set(ctx: &Context, pairs: &[String]) -> anyhow::Result<()> {
    let parsed = read_pairs(pairs)?;
    let vault = ctx.vault().name;
    let credentials: Map<String, Value> = parsed
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
        .collect();
    let answer = ctx.client()?.post(
        &api_path(&["v1", "vaults", &vault, "credentials"]),
        &json!({ "credentials": credentials }),
    )?;
    if ctx.json {
        return output::json(&answer);
    }
    let mut keys: Vec<String> = output::items(answer.get("set").unwrap_or(&Value::Null))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        keys = parsed.into_iter().map(|(k, _)| k).collect();
    }
    output::line(&format!(
        "Set {} in vault {vault}: {}",
        output::count(keys.len(), "credential", "credentials"),
        keys.join(", ")
    ))
}

fn get(ctx: &Context, key: &str) -> anyhow::Result<()> {
    check_key(key)?;
    let vault = ctx.vault().name;
    let credential = ctx
        .client()?
        .get(&api_path(&["v1", "vaults", &vault, "credentials", key]))?;
    if ctx.json {
        return output::json(&credential);
    }
    match credential.get("value").and_then(Value::as_str) {
        Some(value) => output::line(value),
        None => bail!("the server's answer has no value for {key}"),
    }
}

fn list(ctx: &Context, reveal: bool) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    let mut path = api_path(&["v1", "vaults", &vault, "credentials"]);
    if reveal {
        path.push_str("?reveal=true");
    }
    let credentials = ctx.client()?.get(&path)?;
    if ctx.json {
        return output::json(&credentials);
    }
    output::text(&list_table(&vault, &credentials, reveal))
}

/// The `credential list` table; values appear only with `--reveal`, even if the
/// server were to send them unasked.
fn list_table(vault: &str, credentials: &Value, reveal: bool) -> String {
    let items = output::items(credentials);
    if items.is_empty() {
        return format!("No credentials in vault {vault}\n");
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            let mut row = vec![
                str_field(c, "key").to_owned(),
                output::time(c.get("updated_at")),
            ];
            if reveal {
                row.push(output::cell(str_field(c, "value")));
            }
            row
        })
        .collect();
    if reveal {
        output::table(&["KEY", "UPDATED", "VALUE"], &rows)
    } else {
        output::table(&["KEY", "UPDATED"], &rows)
    }
}

fn delete(ctx: &Context, keys: &[String]) -> anyhow::Result<()> {
    for key in keys {
        check_key(key)?;
    }
    let vault = ctx.vault().name;
    let answer = ctx.client()?.post(
        &api_path(&["v1", "vaults", &vault, "credentials", "delete"]),
        &json!({ "keys": keys }),
    )?;
    if ctx.json {
        return output::json(&answer);
    }
    let mut deleted: Vec<String> = output::items(answer.get("deleted").unwrap_or(&Value::Null))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    if deleted.is_empty() {
        deleted = keys.to_vec();
    }
    output::line(&format!(
        "Deleted {} from vault {vault}: {}",
        output::count(deleted.len(), "credential", "credentials"),
        deleted.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pairs(args: &[&str]) -> anyhow::Result<Vec<(String, String)>> {
        parse_pairs(&strings(args))
    }

    #[test]
    fn parses_the_seed_pair() {
        assert_eq!(
            pairs(&["STRIPE_KEY=sk_test_abc123"]).unwrap(),
            vec![("STRIPE_KEY".to_owned(), "sk_test_abc123".to_owned())]
        );
    }

    #[test]
    fn several_pairs_keep_their_order() {
        assert_eq!(
            pairs(&["B=2", "A=1"]).unwrap(),
            vec![("B".into(), "2".into()), ("A".into(), "1".into())]
        );
    }

    #[test]
    fn value_may_contain_equals_signs() {
        assert_eq!(
            pairs(&["DSN=postgres://u:p@h/db?sslmode=require&x=="]).unwrap(),
            vec![(
                "DSN".to_owned(),
                "postgres://u:p@h/db?sslmode=require&x==".to_owned()
            )]
        );
    }

    #[test]
    fn missing_equals_is_an_error_that_does_not_echo_the_argument() {
        let err = pairs(&["sk_live_secret"]).unwrap_err().to_string();
        assert!(err.contains("expected KEY=VALUE"), "{err}");
        assert!(!err.contains("sk_live_secret"), "{err}");
        let err = pairs(&["STRIPE_KEY"]).unwrap_err().to_string();
        assert_eq!(err, "STRIPE_KEY has no value: write STRIPE_KEY=VALUE");
    }

    #[test]
    fn empty_key_is_an_error() {
        let err = pairs(&["=value"]).unwrap_err().to_string();
        assert!(err.contains("empty key"), "{err}");
        assert!(!err.contains("value\""), "{err}");
    }

    #[test]
    fn empty_value_is_refused() {
        let err = pairs(&["A=1", "B="]).unwrap_err().to_string();
        assert!(err.contains("B has an empty value"), "{err}");
    }

    #[test]
    fn invalid_and_duplicate_keys_are_refused() {
        assert!(pairs(&["stripe_key=x"]).is_err());
        assert!(pairs(&["1KEY=x"]).is_err());
        assert!(pairs(&["KEY-1=x"]).is_err());
        let err = pairs(&["A=1", "A=2"]).unwrap_err().to_string();
        assert_eq!(err, "A is given twice");
    }

    #[test]
    fn keys() {
        for good in ["A", "STRIPE_KEY", "K2_", "X_1_Y"] {
            assert!(valid_key(good), "{good}");
        }
        for bad in ["", "a", "_A", "9A", "A-B", "A B", "Ä"] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn list_never_shows_values_without_reveal() {
        let answer = json!([
            {"key": "STRIPE_KEY", "updated_at": 1_700_000_000, "value": "sk_test_abc123"}
        ]);
        let hidden = list_table("v", &answer, false);
        assert!(!hidden.contains("sk_test_abc123"), "{hidden}");
        assert!(hidden.contains("STRIPE_KEY"), "{hidden}");
        assert!(hidden.contains("2023-11-14 22:13 UTC"), "{hidden}");
        let shown = list_table("v", &answer, true);
        assert!(shown.contains("sk_test_abc123"), "{shown}");
    }
}
