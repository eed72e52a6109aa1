//! The crate's layering, checked: every module refers (outside its tests) only to
//! modules listed before it in the table of `lib.rs`, so the table stays a true
//! reading order and no import cycle comes back unnoticed.

use std::collections::BTreeSet;
use std::path::Path;

/// The modules in the order of the table in `lib.rs` (`[`name`]` in its last column).
fn table_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter(|line| line.starts_with("//! |"))
        .filter_map(|line| {
            let cell = line.trim_end().trim_end_matches('|').rsplit('|').next()?;
            let name = cell.trim().strip_prefix("[`")?.strip_suffix("`]")?;
            Some(name.to_string())
        })
        .collect()
}

/// The `crate::<module>` names a source file uses outside comments and its
/// `mod tests`.
fn references(source: &str) -> BTreeSet<String> {
    let code = source
        .find("#[cfg(test)]\nmod tests")
        .or_else(|| source.find("#[cfg(test)]\npub(crate) mod tests"))
        .map_or(source, |end| &source[..end]);
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Every `.rs` file of module `name` (a file, or a folder with its files).
fn sources(src: &Path, name: &str) -> Vec<String> {
    let file = src.join(format!("{name}.rs"));
    if file.exists() {
        return vec![std::fs::read_to_string(file).unwrap()];
    }
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(src.join(name)).unwrap() {
        let path = entry.unwrap().path();
        let is_tests = path.file_name().is_some_and(|n| n == "tests.rs");
        if path.extension().is_some_and(|e| e == "rs") && !is_tests {
            texts.push(std::fs::read_to_string(path).unwrap());
        }
    }
    texts
}

#[test]
fn no_module_refers_to_one_listed_after_it_in_lib_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = table_order(&lib);
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .map(str::to_string)
        .collect();
    assert_eq!(
        order.iter().cloned().collect::<BTreeSet<_>>(),
        declared,
        "the table in lib.rs lists every public module once"
    );
    let mut violations = Vec::new();
    for (position, module) in order.iter().enumerate() {
        for source in sources(&src, module) {
            for used in references(&source) {
                let later = order.iter().skip(position + 1).any(|m| *m == used);
                if later {
                    violations.push(format!("{module} -> {used}"));
                }
            }
        }
    }
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "modules that refer to a module listed after them: {violations:?}"
    );
}

#[test]
fn references_are_read_from_code_not_comments_or_tests() {
    let source = "use crate::store::Store;\n// crate::later\nfn f() { crate::clock::utc_minutes(0); }\n#[cfg(test)]\nmod tests { use crate::api; }\n";
    let found: Vec<String> = references(source).into_iter().collect();
    assert_eq!(found, ["clock", "store"]);
}
