//! The project's tasks that both `./dev` and the Rust tests need, so they exist once.
//!
//! Today that is rendering the templates under `envoy/` (DESIGN.md §10): every
//! placeholder `${NAME}` (`NAME` is `[A-Z0-9_]+`) is replaced by a value, and a template
//! with a placeholder that has no value is refused rather than rendered half-filled:
//! Envoy would otherwise start on a listener or socket path nobody chose.
//!
//! Anything else that looks like a placeholder (`${lower}`, `${}`, a `$` alone) is
//! text and left as it is. Substitution is one pass: a value that itself contains
//! `${NAME}` is not expanded again.

use std::collections::BTreeSet;
use std::fmt;

/// The names of every placeholder in `template`, sorted, each once.
pub fn placeholders(template: &str) -> BTreeSet<&str> {
    let mut names = BTreeSet::new();
    let mut rest = template;
    while let Some((_, name, after)) = next_placeholder(rest) {
        names.insert(name);
        rest = after;
    }
    names
}

/// Placeholders of a template that have no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing(pub Vec<String>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing template variables: {}", self.0.join(", "))
    }
}

impl std::error::Error for Missing {}

/// `template` with every placeholder replaced by `value(NAME)`; `Err` lists (sorted)
/// every name `value` has no value for, and nothing is rendered.
pub fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, Missing> {
    let missing: Vec<String> = placeholders(template)
        .into_iter()
        .filter(|name| value(name).is_none())
        .map(str::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(Missing(missing));
    }
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some((before, name, after)) = next_placeholder(rest) {
        out.push_str(before);
        out.push_str(&value(name).unwrap_or_default());
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// The first placeholder in `text`: (the text before it, its name, the text after it).
fn next_placeholder(text: &str) -> Option<(&str, &str, &str)> {
    let mut from = 0;
    while let Some(found) = text[from..].find("${") {
        let start = from + found;
        let name_start = start + 2;
        let name_len = text[name_start..]
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        let name_end = name_start + name_len;
        if name_len > 0 && text[name_end..].starts_with('}') {
            return Some((
                &text[..start],
                &text[name_start..name_end],
                &text[name_end + 1..],
            ));
        }
        // Not a placeholder: look again from the next character, as a regex would.
        from = start + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn every_placeholder_is_replaced_by_its_value() {
        let rendered = render(
            "listen ${ADDR}:${PORT_1}, admin ${PORT_1}\n",
            values(&[("ADDR", "127.0.0.1"), ("PORT_1", "10000")]),
        );
        assert_eq!(rendered.unwrap(), "listen 127.0.0.1:10000, admin 10000\n");
    }

    #[test]
    fn a_template_with_placeholders_that_have_no_value_is_refused_naming_each_once() {
        let err = render("${B} ${A} ${B} ${C}", values(&[("C", "c")])).unwrap_err();
        assert_eq!(err, Missing(vec!["A".into(), "B".into()]));
        assert_eq!(err.to_string(), "missing template variables: A, B");
    }

    #[test]
    fn values_for_names_the_template_does_not_use_are_ignored() {
        let rendered = render("plain text", values(&[("UNUSED", "x")]));
        assert_eq!(rendered.unwrap(), "plain text");
    }

    #[test]
    fn only_uppercase_digit_and_underscore_names_are_placeholders() {
        let text = "${lower} ${} ${A-B} $A ${ A} ${A}";
        assert_eq!(placeholders(text), BTreeSet::from(["A"]));
        assert_eq!(
            render(text, values(&[("A", "v")])).unwrap(),
            "${lower} ${} ${A-B} $A ${ A} v"
        );
    }

    #[test]
    fn a_placeholder_right_after_an_unfinished_one_is_still_found() {
        assert_eq!(
            render("$${A} ${${A}}", values(&[("A", "v")])).unwrap(),
            "$v ${v}"
        );
    }

    #[test]
    fn a_value_containing_a_placeholder_is_not_expanded_again() {
        let rendered = render("${A} ${B}", values(&[("A", "${B}"), ("B", "b")]));
        assert_eq!(rendered.unwrap(), "${B} b");
    }

    #[test]
    fn multibyte_text_around_placeholders_is_kept() {
        let rendered = render("é ${A} → ${B}ü", values(&[("A", "α"), ("B", "β")]));
        assert_eq!(rendered.unwrap(), "é α → βü");
    }
}
