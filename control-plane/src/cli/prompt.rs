//! Reading from the human: passwords (a terminal prompt without echo, or one line of
//! stdin with `--password-stdin`) and yes/no confirmations.
//!
//! A password is never taken from a flag or an environment variable of the CLI: both
//! leak into shell history and `ps`. Without a terminal and without
//! `--password-stdin` the CLI refuses rather than blocking on a pipe.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context as _};
use zeroize::Zeroizing;

pub const NO_PASSWORD: &str = "no password: pass --password-stdin or run in a terminal";

/// Whether stdin is a terminal a human can type into.
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// Reads one line from `reader` without its trailing `\n` / `\r\n`; `None` at end of input.
pub fn read_line(reader: &mut impl BufRead) -> anyhow::Result<Option<Zeroizing<String>>> {
    let mut line = Zeroizing::new(String::new());
    let read = reader
        .read_line(&mut line)
        .context("cannot read from stdin")?;
    if read == 0 {
        return Ok(None);
    }
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    Ok(Some(line))
}

/// Prompts on the terminal without echo.
pub fn prompt_hidden(prompt: &str) -> anyhow::Result<Zeroizing<String>> {
    rpassword::prompt_password(prompt)
        .map(Zeroizing::new)
        .context("cannot read the password from the terminal")
}

/// A password: one line of stdin with `--password-stdin`, else a hidden prompt.
pub fn password(prompt: &str, from_stdin: bool) -> anyhow::Result<Zeroizing<String>> {
    if from_stdin {
        return read_line(&mut std::io::stdin().lock())?
            .context("no password on stdin: expected one line");
    }
    if !stdin_is_terminal() {
        bail!(NO_PASSWORD);
    }
    prompt_hidden(prompt)
}

/// A new password; on a terminal it is typed twice.
pub fn new_password(prompt: &str, from_stdin: bool) -> anyhow::Result<Zeroizing<String>> {
    let first = password(prompt, from_stdin)?;
    if !from_stdin {
        let second = prompt_hidden("Repeat it: ")?;
        if *first != *second {
            bail!("the passwords do not match");
        }
    }
    Ok(first)
}

/// Asks a yes/no question on the terminal; only `y` or `yes` is yes.
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    let mut stderr = std::io::stderr();
    write!(stderr, "{question} [y/N] ").context("cannot write the prompt")?;
    stderr.flush().context("cannot write the prompt")?;
    let answer = read_line(&mut std::io::stdin().lock())?.unwrap_or_default();
    Ok(is_yes(&answer))
}

fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &str) -> Vec<Option<String>> {
        let mut reader = std::io::Cursor::new(input.as_bytes().to_vec());
        (0..3)
            .map(|_| read_line(&mut reader).unwrap().map(|l| l.to_string()))
            .collect()
    }

    #[test]
    fn lines_lose_their_line_endings_only() {
        assert_eq!(
            lines("secret\r\n pass word \n"),
            vec![Some("secret".into()), Some(" pass word ".into()), None]
        );
    }

    #[test]
    fn empty_lines_and_a_missing_final_newline() {
        assert_eq!(
            lines("\nlast"),
            vec![Some(String::new()), Some("last".into()), None]
        );
    }

    #[test]
    fn only_y_or_yes_confirms() {
        for yes in ["y", "Y", "yes", " YES "] {
            assert!(is_yes(yes), "{yes}");
        }
        for no in ["", "n", "no", "yep", "delete"] {
            assert!(!is_yes(no), "{no}");
        }
    }
}
