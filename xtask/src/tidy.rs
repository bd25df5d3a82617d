//! Tidy checks run by `cargo test`: every Rust file starts with a `//!` module
//! doc saying what it owns (as rust-analyzer's tidy test requires), and no
//! crate's top-level modules import each other in a circle.
#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose sources the checks read.
const CRATES: [&str; 6] = ["proto", "agent", "server", "xtask", "tests", "bench"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" && name != "fuzz" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src` belongs to (`a` for `src/a.rs`
/// and `src/a/b.rs`); `None` for the crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The top-level modules a piece of source names as `crate::x`, including
/// every item of a `use crate::{a, b::c}` group. Test modules (from the first
/// `#[cfg(test)]` on) and comments are not read.
pub(crate) fn crate_references(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let line = line.trim_start();
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.starts_with("//") {
            continue;
        }
        let code = line.split("//").next().unwrap_or(line);
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + "crate::".len()..];
            if preceded_by_ident {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Only the group's top level: `{a, b::{c, d}}` names a and b.
                let mut depth = 0;
                let mut item_start = true;
                let mut ident = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && (c.is_alphanumeric() || c == '_') => ident.push(c),
                        _ => {
                            if !ident.is_empty() {
                                out.insert(std::mem::take(&mut ident));
                            }
                            if !c.is_whitespace() {
                                item_start = false;
                            }
                        }
                    }
                }
                if !ident.is_empty() {
                    out.insert(ident);
                }
            } else {
                let ident: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !ident.is_empty() {
                    out.insert(ident);
                }
            }
        }
    }
    out
}

/// A circle in a module graph, as `a -> b -> a`, if there is one.
pub(crate) fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

/// The import graph of one crate's top-level modules (`krate/src`).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(from) = top_module(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let edges = graph.entry(from.clone()).or_default();
        for to in crate_references(&text) {
            if to != from {
                edges.insert(to);
            }
        }
    }
    // Names that are not modules (re-exported items, macros) are not nodes.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|to| modules.contains(to));
    }
    graph
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rust_file_starts_with_a_module_doc() {
        let root = crate::project_root();
        let mut files = Vec::new();
        for part in CRATES {
            rust_files(&root.join(part), &mut files);
        }
        assert!(
            files.len() > 20,
            "found only {} files under {}",
            files.len(),
            root.display()
        );
        let missing: Vec<_> = files
            .iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                !text.trim_start().starts_with("//!")
            })
            .collect();
        assert!(
            missing.is_empty(),
            "files without a //! module doc: {missing:?}"
        );
    }

    #[test]
    fn no_crate_has_an_import_cycle_between_its_top_level_modules() {
        let root = crate::project_root();
        let mut cycles = Vec::new();
        for krate in CRATES {
            let graph = module_graph(&root.join(krate).join("src"));
            if let Some(cycle) = find_cycle(&graph) {
                cycles.push(format!("{krate}: {}", cycle.join(" -> ")));
            }
        }
        assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
    }

    #[test]
    fn references_are_read_from_paths_and_use_groups() {
        let src = "use crate::a::X;\nuse crate::{b, c::{d, e}, f::G};\nfn x() { crate::h::go(); mycrate::z(); }\n// crate::comment\n#[cfg(test)]\nuse crate::t;";
        let refs: Vec<_> = crate_references(src).into_iter().collect();
        assert_eq!(refs, ["a", "b", "c", "f", "h"]);
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        };
        edge(&mut g, "a", "b");
        edge(&mut g, "b", "c");
        assert_eq!(find_cycle(&g), None);
        edge(&mut g, "c", "a");
        assert_eq!(
            find_cycle(&g).unwrap(),
            ["a", "b", "c", "a"].map(String::from)
        );
    }
}
