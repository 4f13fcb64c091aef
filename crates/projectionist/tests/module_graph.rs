//! ARCHITECTURE.md says imports point one way: no two source files of a crate
//! use each other, directly or through others, and a parent module (`mod.rs`,
//! `lib.rs`, `main.rs`) uses its children, never the reverse. This test reads
//! every crate of the workspace and fails on any cycle, naming it.
//!
//! What counts as a use: `crate::…` and `super::…` paths anywhere in a file's
//! code (comments and `#[cfg(test)]` modules at the end of a file are left
//! out), `mod child;` declarations (the parent uses the child), and the
//! `pub use` re-exports a path goes through (a use of `crate::Name` that
//! `lib.rs` re-exports from `dir` is a use of `dir`, not of `lib.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module, as its path from the crate root ("" is the root).
type Module = String;

struct Crate {
    name: String,
    /// Module → its file's code.
    files: BTreeMap<Module, String>,
}

fn workspace_crates() -> Vec<Crate> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut crates = Vec::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let src = dir.join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = BTreeMap::new();
        collect(&src, &src, &mut files);
        crates.push(Crate {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            files,
        });
    }
    crates.sort_by(|a, b| a.name.cmp(&b.name));
    crates
}

fn collect(src: &Path, dir: &Path, files: &mut BTreeMap<Module, String>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(src, &path, files);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(
            parts.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            parts.pop();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        files.insert(parts.join("::"), code_only(&text));
    }
}

/// The file without comments and without a trailing `#[cfg(test)]` module.
fn code_only(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find("// ") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths written after each `prefix` (`crate::` or `super::`), with use
/// groups (`{a::B, c}`, nested) expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| is_ident_char(c) && c != '$') {
            continue;
        }
        expand(rest, String::new(), &mut paths);
    }
    paths
}

/// Expands one path (or use group) starting at `text` into `out`.
fn expand(text: &str, base: String, out: &mut Vec<String>) {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&group[start..i], base.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&group[start..i], base.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let mut path = base;
    let mut rest = text;
    loop {
        let end = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        if !path.is_empty() {
            path.push_str("::");
        }
        path.push_str(&rest[..end]);
        rest = &rest[end..];
        match rest.strip_prefix("::") {
            Some(next) if next.trim_start().starts_with('{') => {
                expand(next, path, out);
                return;
            }
            Some(next) => rest = next,
            None => break,
        }
    }
    if !path.is_empty() && path != "self" && path != "*" {
        out.push(path);
    }
}

/// `pub use` / `pub(crate) use` / `pub(super) use` re-exports of a module:
/// name → the path it stands for (relative to the module).
fn reexports(code: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut rest = code;
    while let Some(at) = rest.find("pub") {
        rest = &rest[at + 3..];
        let after = rest.trim_start();
        let after = if after.starts_with('(') {
            match after.find(')') {
                Some(close) => after[close + 1..].trim_start(),
                None => continue,
            }
        } else {
            after
        };
        let Some(used) = after.strip_prefix("use ") else {
            continue;
        };
        let end = used.find(';').unwrap_or(used.len());
        let mut paths = Vec::new();
        expand(&used[..end], String::new(), &mut paths);
        for path in paths {
            let name = path.rsplit("::").next().unwrap().to_owned();
            map.insert(name, path);
        }
    }
    map
}

/// The module a path from the root reaches: its longest prefix that is a
/// module, followed through that module's re-exports.
fn resolve(
    krate: &Crate,
    exports: &BTreeMap<Module, BTreeMap<String, String>>,
    path: &str,
    depth: u32,
) -> Option<Module> {
    let parts: Vec<&str> = path.split("::").collect();
    for take in (0..=parts.len()).rev() {
        let module = parts[..take].join("::");
        if !krate.files.contains_key(&module) {
            continue;
        }
        // An item of `module`, or one it re-exports from elsewhere.
        if let (Some(name), true) = (parts.get(take), depth < 8)
            && let Some(target) = exports.get(&module).and_then(|e| e.get(*name))
            && let Some(found) = resolve(krate, exports, &absolute(&module, target), depth + 1)
            && found != module
        {
            return Some(found);
        }
        return Some(module);
    }
    None
}

/// A path written in `module` made absolute (from the crate root).
fn absolute(module: &str, path: &str) -> String {
    if let Some(rest) = path.strip_prefix("crate::") {
        return rest.to_owned();
    }
    let mut base: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    let mut rest = path;
    while let Some(next) = rest.strip_prefix("super::") {
        base.pop();
        rest = next;
    }
    if rest == "super" {
        base.pop();
        return base.join("::");
    }
    if rest != path || module.is_empty() {
        base.push(rest);
        return base.join("::");
    }
    // Relative to the module itself (`use child::Item` in a parent).
    base.push(rest);
    base.join("::")
}

fn parent(module: &str) -> Module {
    module.rsplit_once("::").map_or("", |(p, _)| p).to_owned()
}

fn edges(krate: &Crate) -> BTreeMap<Module, BTreeSet<Module>> {
    let exports: BTreeMap<Module, BTreeMap<String, String>> = krate
        .files
        .iter()
        .map(|(m, code)| (m.clone(), reexports(code)))
        .collect();
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, code) in &krate.files {
        let uses = graph.entry(module.clone()).or_default();
        // Children: `mod x;` declarations.
        for child in krate.files.keys() {
            if !child.is_empty() && parent(child) == *module {
                uses.insert(child.clone());
            }
        }
        let mut paths: Vec<String> = paths_after(code, "crate::");
        for path in paths_after(code, "super::") {
            paths.push(absolute(module, &format!("super::{path}")));
        }
        for path in paths {
            if let Some(target) = resolve(krate, &exports, &path, 0)
                && target != *module
            {
                uses.insert(target);
            }
        }
        // A parent's re-exports of its children are its own uses (above).
    }
    graph
}

/// A cycle of the graph, if any, as the modules along it.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        marks.insert(node.clone(), Mark::Open);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|m| m == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, graph, &mut marks, &mut stack) {
                return Some(cycle);
            }
        }
    }
    None
}

fn shown(cycle: &[Module]) -> String {
    cycle
        .iter()
        .map(|m| if m.is_empty() { "(root)" } else { m.as_str() })
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn no_two_source_files_of_a_crate_import_each_other() {
    let crates = workspace_crates();
    assert!(
        crates.iter().any(|c| c.name == "projectionist")
            && crates.iter().any(|c| c.name == "projectionist-cli"),
        "the workspace's crates are found"
    );
    let mut cycles = Vec::new();
    for krate in &crates {
        assert!(krate.files.contains_key(""), "{} has a root", krate.name);
        if let Some(cycle) = find_cycle(&edges(krate)) {
            cycles.push(format!("{}: {}", krate.name, shown(&cycle)));
        }
    }
    assert!(
        cycles.is_empty(),
        "source files that use each other (see ARCHITECTURE.md, \"Imports point one way\"):\n{}",
        cycles.join("\n")
    );
}

/// The check finds what it is for: a cycle through a re-export, a child
/// using its parent, and a group import.
#[test]
fn the_import_check_finds_cycles_through_reexports_parents_and_groups() {
    let krate = |files: &[(&str, &str)]| Crate {
        name: "example".into(),
        files: files
            .iter()
            .map(|(m, code)| ((*m).to_owned(), code_only(code)))
            .collect(),
    };
    let through_reexport = krate(&[
        ("", "mod a;\nmod b;\npub use a::Thing;\n"),
        ("a", "use crate::b::Other;\npub struct Thing;\n"),
        ("b", "use crate::Thing;\npub struct Other;\n"),
    ]);
    assert_eq!(
        shown(&find_cycle(&edges(&through_reexport)).unwrap()),
        "a -> b -> a"
    );
    let child_uses_parent = krate(&[
        ("", "mod run;\n"),
        ("run", "mod write;\npub(crate) fn helper() {}\n"),
        ("run::write", "fn f() { super::helper(); }\n"),
    ]);
    assert_eq!(
        shown(&find_cycle(&edges(&child_uses_parent)).unwrap()),
        "run -> run::write -> run"
    );
    let group = krate(&[
        ("", "mod a;\nmod b;\nmod c;\n"),
        ("a", "use crate::{c::X, b::{Y, Z}};\n"),
        (
            "b",
            "// use crate::a::Q; (a comment is not a use)\npub struct Y;\n",
        ),
        ("c", "use crate::a::W;\n"),
    ]);
    assert_eq!(shown(&find_cycle(&edges(&group)).unwrap()), "a -> c -> a");
    let clean = krate(&[
        ("", "mod a;\nmod b;\npub use a::Thing;\n"),
        ("a", "use crate::b::Other;\npub struct Thing;\n"),
        (
            "b",
            "pub struct Other;\n#[cfg(test)]\nmod tests {\n    use crate::Thing;\n}\n",
        ),
    ]);
    assert_eq!(find_cycle(&edges(&clean)), None);
}
