//! `xtask`: the project's tasks in Rust, called by `./dev`.
//!
//! ```text
//! xtask render TEMPLATE OUT    render an envoy/ template with values from the
//!                              environment (OUT `-` is stdout)
//! xtask allowed-upstreams [ADDRESS[/PREFIX]:PORT ...]
//!                              print the value of ALLOWED_PRIVATE_UPSTREAMS for these
//!                              private destinations (nothing for none)
//! ```

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["render", template, out] => render(template, out),
        ["allowed-upstreams", ..] => {
            xtask::allowed_upstreams(&args[1..]).map(|value| print!("{value}"))
        }
        _ => {
            eprintln!(
                "usage: xtask render TEMPLATE OUT   (OUT - is stdout)\n       \
                 xtask allowed-upstreams [ADDRESS[/PREFIX]:PORT ...]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Every placeholder of `template` from the environment; writes nothing unless each
/// one has a value.
fn render(template: &str, out: &str) -> Result<(), String> {
    let text =
        std::fs::read_to_string(template).map_err(|e| format!("cannot read {template}: {e}"))?;
    let not_utf8: Vec<&str> = xtask::placeholders(&text)
        .into_iter()
        .filter(|name| matches!(std::env::var(name), Err(std::env::VarError::NotUnicode(_))))
        .collect();
    if !not_utf8.is_empty() {
        return Err(format!(
            "template variables that are not UTF-8: {}",
            not_utf8.join(", ")
        ));
    }
    let rendered =
        xtask::render(&text, |name| std::env::var(name).ok()).map_err(|e| e.to_string())?;
    if out == "-" {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(rendered.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))
    } else {
        std::fs::write(out, rendered).map_err(|e| format!("cannot write {out}: {e}"))
    }
}
