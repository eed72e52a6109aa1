//! `agent-vault vault logs`: the vault's request log, i.e. what agents sent through
//! the proxy (no header values, no query strings, no bodies).
//!
//! Without `--follow`: the newest `--limit` requests, oldest first. With `--follow`:
//! the same, then a poll every second for the requests after the last one seen, until
//! Ctrl-C. `--json` prints one JSON object per line (the API's record, `seq` included),
//! so the output can be piped into `jq` while following.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::client::api_path;
use super::context::Context;
use super::output::{self, str_field};

/// The API's largest page, used while following.
const MAX_PAGE: usize = 1000;
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const HEADERS: [&str; 10] = [
    "TIME (UTC)",
    "AGENT",
    "METHOD",
    "HOST",
    "PATH",
    "SERVICE",
    "STATUS",
    "LATENCY MS",
    // Occurrences of an injected credential replaced in the response ("-": none).
    "REDACTED",
    "ERROR",
];

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Keep polling every second and print new requests until Ctrl-C
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// How many of the newest requests to show (1-1000)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
}

pub fn run(args: &LogsArgs, ctx: &Context) -> anyhow::Result<()> {
    let vault = ctx.vault().name;
    let client = ctx.client()?;
    let path = api_path(&["v1", "vaults", &vault, "logs"]);
    let page = client.get(&format!("{path}?limit={}", args.limit))?;
    let mut next = page_next(&page, 0);
    let mut printer = Printer::new(ctx.json);
    let first = records(&page);
    if first.is_empty() && !args.follow {
        if ctx.json {
            return Ok(());
        }
        return output::line(&format!("No requests logged in vault {vault}"));
    }
    printer.print(first)?;
    if !args.follow {
        return Ok(());
    }
    if !ctx.json {
        output::note(&format!(
            "Following the request log of vault {vault} (Ctrl-C to stop)"
        ));
    }
    loop {
        let page = client.get(&format!("{path}?after={next}&limit={MAX_PAGE}"))?;
        next = page_next(&page, next);
        let new = records(&page);
        printer.print(new)?;
        // A full page means more are waiting: fetch them before sleeping.
        if new.len() < MAX_PAGE {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

fn records(page: &Value) -> &[Value] {
    output::items(page.get("records").unwrap_or(&Value::Null))
}

fn page_next(page: &Value, previous: u64) -> u64 {
    page.get("next").and_then(Value::as_u64).unwrap_or(previous)
}

/// One table row for a record; control characters are escaped.
fn row(record: &Value) -> Vec<String> {
    let text = |name: &str| match str_field(record, name) {
        "" => "-".to_owned(),
        value => output::cell(value),
    };
    let number = |name: &str| {
        record
            .get(name)
            .and_then(Value::as_u64)
            .map_or_else(|| "-".to_owned(), |n| n.to_string())
    };
    vec![
        record
            .get("ts")
            .and_then(Value::as_i64)
            .map_or_else(|| "-".to_owned(), crate::clock::utc_seconds),
        text("agent"),
        text("method"),
        text("host"),
        text("path"),
        text("service"),
        number("status"),
        number("latency_ms"),
        number("redactions"),
        text("error"),
    ]
}

/// Prints batches of records as one table that grows as it goes (the header once,
/// column widths only ever widening), or as JSON lines.
struct Printer {
    json: bool,
    widths: Vec<usize>,
    header_printed: bool,
}

impl Printer {
    fn new(json: bool) -> Printer {
        Printer {
            json,
            widths: HEADERS.iter().map(|h| h.chars().count()).collect(),
            header_printed: false,
        }
    }

    fn print(&mut self, records: &[Value]) -> anyhow::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        output::text(&self.render(records))
    }

    fn render(&mut self, records: &[Value]) -> String {
        let mut out = String::new();
        if self.json {
            for record in records {
                out.push_str(&record.to_string());
                out.push('\n');
            }
            return out;
        }
        let rows: Vec<Vec<String>> = records.iter().map(row).collect();
        for row in &rows {
            for (width, cell) in self.widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        if !self.header_printed {
            self.header_printed = true;
            let header: Vec<String> = HEADERS.iter().map(|h| (*h).to_owned()).collect();
            out.push_str(&self.line(&header));
        }
        for row in &rows {
            out.push_str(&self.line(row));
        }
        out
    }

    /// Cells separated by two spaces, the last one not padded (like `output::table`).
    fn line(&self, cells: &[String]) -> String {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(&self.widths).enumerate() {
            line.push_str(cell);
            if i + 1 < cells.len() {
                let pad = width.saturating_sub(cell.chars().count()) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        let mut line = line.trim_end().to_owned();
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(seq: u64, path: &str, error: Option<&str>) -> Value {
        json!({
            "seq": seq, "ts": 1_700_000_000_000_i64, "agent": "claude", "vault": "default",
            "method": "GET", "host": "api.stripe.com", "path": path, "service": "stripe",
            "status": 200, "latency_ms": 12, "error": error
        })
    }

    #[test]
    fn the_table_has_a_header_once_and_marks_missing_values() {
        let mut printer = Printer::new(false);
        let first = printer.render(&[record(1, "/v1/charges", None)]);
        assert_eq!(
            first,
            "TIME (UTC)           AGENT   METHOD  HOST            PATH         SERVICE  STATUS  LATENCY MS  REDACTED  ERROR\n\
             2023-11-14 22:13:20  claude  GET     api.stripe.com  /v1/charges  stripe   200     12          -         -\n"
        );
        let mut redacted = record(3, "/echo", None);
        redacted["redactions"] = json!(4);
        let row = printer.render(&[redacted]);
        assert!(row.contains("12          4"), "{row}");
        let mut missing = record(2, "/a\nb", Some("forbidden"));
        missing["service"] = Value::Null;
        let second = printer.render(&[missing]);
        assert!(!second.contains("TIME"), "{second}");
        assert!(
            second.contains("/a\\nb"),
            "control characters escaped: {second}"
        );
        assert!(second.trim_end().ends_with("forbidden"), "{second}");
        assert_eq!(second.lines().count(), 1);
    }

    #[test]
    fn json_lines_are_one_record_per_line() {
        let mut printer = Printer::new(true);
        let out = printer.render(&[record(1, "/a", None), record(2, "/b", None)]);
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![record(1, "/a", None), record(2, "/b", None)]);
    }

    #[test]
    fn next_falls_back_to_the_previous_cursor() {
        assert_eq!(page_next(&json!({"records": [], "next": 7}), 3), 7);
        assert_eq!(page_next(&json!({}), 3), 3);
    }
}
