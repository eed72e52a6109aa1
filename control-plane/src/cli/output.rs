//! How results reach the human: aligned tables, pretty JSON for `--json`, short
//! messages, and timestamps.
//!
//! Results go to stdout through these functions (never `println!`, which panics when
//! the reader of a pipe goes away); notes and warnings go to stderr so that
//! `$(agent-vault …)` captures only the result.

use std::io::Write;

use anyhow::Context as _;
use serde_json::Value;

/// Writes `text` and a newline to stdout.
pub fn line(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// Writes `text` as is (tables already end with a newline).
pub fn text(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// Pretty-prints `value` on stdout.
pub fn json(value: &Value) -> anyhow::Result<()> {
    let pretty = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    line(&pretty)
}

/// A note for the human on stderr; failures to write it are ignored.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// An aligned table: columns separated by two spaces, the last one not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut rendered = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i + 1 == columns {
                rendered.push_str(cell);
            } else {
                rendered.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count()) + 2;
                rendered.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(rendered.trim_end());
        out.push('\n');
    }
    out
}

/// Makes a value safe for one table cell: control characters are escaped so a value
/// cannot break the table or the terminal (`credential get` prints the exact value).
pub fn cell(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `1 credential`, `2 credentials`.
pub fn count(n: usize, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// A string field of a JSON object, or `""`.
pub fn str_field<'a>(value: &'a Value, name: &str) -> &'a str {
    value.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The elements of a JSON array (an empty slice for anything else).
pub fn items(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A timestamp from the API: unix seconds (number or numeric string) become
/// `YYYY-MM-DD HH:MM UTC`; other strings (RFC 3339) are shown as sent; null is `-`.
pub fn time(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .map(format_unix)
            .unwrap_or_else(|| n.to_string()),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .map(format_unix)
            .unwrap_or_else(|_| s.clone()),
        Some(other) => other.to_string(),
    }
}

/// `yes`/`no`/`-` for a boolean field (`enabled`, `upstream_tls`).
pub fn yes_no(value: Option<&Value>) -> &'static str {
    match value.and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

fn format_unix(secs: i64) -> String {
    // Milliseconds, in case the server sends them.
    let secs = if secs > 100_000_000_000 {
        secs / 1000
    } else {
        secs
    };
    crate::clock::utc_minutes(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let rows = vec![
            vec!["STRIPE_KEY".to_owned(), "now".to_owned()],
            vec!["A".to_owned(), "later".to_owned()],
        ];
        assert_eq!(
            table(&["KEY", "UPDATED"], &rows),
            "KEY         UPDATED\nSTRIPE_KEY  now\nA           later\n"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(time(Some(&json!(0))), "1970-01-01 00:00 UTC");
        assert_eq!(time(Some(&json!(1_700_000_000))), "2023-11-14 22:13 UTC");
        assert_eq!(
            time(Some(&json!(1_700_000_000_000_i64))),
            "2023-11-14 22:13 UTC"
        );
        assert_eq!(time(Some(&json!("1700000000"))), "2023-11-14 22:13 UTC");
        assert_eq!(time(Some(&json!(951_782_400))), "2000-02-29 00:00 UTC");
        assert_eq!(
            time(Some(&json!("2024-01-01T00:00:00Z"))),
            "2024-01-01T00:00:00Z"
        );
        assert_eq!(time(Some(&Value::Null)), "-");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn cells_escape_control_characters() {
        assert_eq!(cell("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(cell("café \"x\""), "café \"x\"");
    }

    #[test]
    fn counts() {
        assert_eq!(count(1, "credential", "credentials"), "1 credential");
        assert_eq!(count(2, "credential", "credentials"), "2 credentials");
    }
}
