//! No import cycle among the crate's files, and the connection layer's layers import downward
//! only. Reads every `src/**/*.rs`, resolves the `crate::`, `super::` and `self::` paths it
//! names (in `use` trees and inline, and child modules named bare) to the file that defines
//! the module, and fails with each strongly connected group of files that reach each other in
//! a loop. Code after the first `#[cfg(test)]` is ignored, and a child naming its own parent
//! module is not an edge (one room): the same rules as the team's `cycles.py`, so both report
//! the same loops, but this one runs in `cargo test` on a clean clone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// The module path of a file under `src` (`dispatch/mod.rs` -> `[dispatch]`).
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text with comments and string contents removed, cut at the first `#[cfg(test)]`.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if let Some(hashes) = raw_string_at(b, i) {
            // r"..", r#".."#, br"..": no escapes, ends at the quote and as many hashes.
            out.push_str("\"\"");
            let start = i + b[i..].iter().position(|&c| c == b'"').unwrap_or(0) + 1;
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            i = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
        } else if b[i] == b'"' {
            out.push_str("\"\"");
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if b[i] == b'\'' && char_literal_len(&text[i..]) > 0 {
            // '"', '\'', b'x': a char, not the start of a string (lifetimes stay).
            out.push_str("' '");
            i += char_literal_len(&text[i..]);
        } else {
            let ch = text[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    match out.find("#[cfg(test)]") {
        Some(cut) => out[..cut].to_owned(),
        None => out,
    }
}

/// At `i`, a raw string literal (`r"`, `r#"`, `br"`...) starts: how many `#` it has.
fn raw_string_at(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') {
        return None;
    }
    let at = if b[i..].starts_with(b"br") {
        i + 2
    } else if b[i] == b'r' {
        i + 1
    } else {
        return None;
    };
    let hashes = b[at..].iter().take_while(|&&c| c == b'#').count();
    (b.get(at + hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of the char literal at the start of `s` (which starts with `'`), or 0 for a
/// lifetime or label.
fn char_literal_len(s: &str) -> usize {
    let mut chars = s.char_indices().skip(1);
    match chars.next() {
        Some((_, '\\')) => s[2..].find('\'').map_or(0, |p| p + 3),
        Some((_, _)) => match chars.next() {
            Some((j, '\'')) => j + 1,
            _ => 0,
        },
        None => 0,
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `crate::{a, b::{c, d}}` -> `crate::a`, `crate::b::c`, `crate::b::d`.
fn expand_use(tree: &str, out: &mut Vec<String>) {
    fn walk(prefix: &str, s: &str, out: &mut Vec<String>) {
        let Some(open) = s.find('{') else {
            for part in s.split(',').filter(|p| !p.is_empty()) {
                let part = part.split(" as ").next().unwrap_or(part);
                out.push(format!("{prefix}{part}"));
            }
            return;
        };
        let head = &s[..open];
        let mut depth = 0;
        let mut close = open;
        for (j, c) in s[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let inner = &s[open + 1..close];
        let mut items = Vec::new();
        let (mut depth, mut cur) = (0, String::new());
        for c in inner.chars() {
            match c {
                ',' if depth == 0 => items.push(std::mem::take(&mut cur)),
                _ => {
                    depth += i32::from(c == '{') - i32::from(c == '}');
                    cur.push(c);
                }
            }
        }
        items.push(cur);
        for item in items.iter().filter(|i| !i.is_empty()) {
            walk(&format!("{prefix}{head}"), item, out);
        }
        let rest = s[close + 1..].trim_start_matches(',');
        if !rest.is_empty() {
            walk(prefix, rest, out);
        }
    }
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    walk("", &tree, out);
}

/// Where the path whose first segment ends at `end` ends (`::ident` segments follow).
fn path_end(text: &str, mut end: usize) -> usize {
    while text[end..].starts_with("::")
        && text[end + 2..].starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
    {
        end += 2;
        end += text[end..]
            .find(|c: char| !is_ident(c))
            .unwrap_or(text.len() - end);
    }
    end
}

/// Every `crate::`/`super::`/`self::` path in `text`, and each declared child module `x`
/// named as `x::...` (as `self::x::...`).
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    // `use` trees (braces included).
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + 4..];
        if before.is_some_and(is_ident) {
            continue;
        }
        let tree = rest.trim_start();
        if ["crate", "super", "self"]
            .iter()
            .any(|k| tree.starts_with(k) && !tree[k.len()..].starts_with(is_ident))
        {
            if let Some(end) = tree.find(';') {
                expand_use(&tree[..end], &mut out);
            }
        }
    }
    // Inline paths.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, _)) in chars.iter().enumerate() {
        if k > 0 && is_ident(chars[k - 1].1) {
            continue;
        }
        for kw in ["crate", "super", "self"] {
            if text[i..].starts_with(kw) && text[i + kw.len()..].starts_with("::") {
                out.push(text[i..path_end(text, i + kw.len())].to_owned());
            }
        }
    }
    // Child modules declared here may be named without `self::` (2018 paths).
    let mut children = Vec::new();
    for (at, _) in text.match_indices("mod ") {
        if text[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let name: String = text[at + 4..]
            .chars()
            .take_while(|c| is_ident(*c))
            .collect();
        if !name.is_empty() && text[at + 4 + name.len()..].trim_start().starts_with(';') {
            children.push(name);
        }
    }
    for child in children {
        out.push(format!("self::{child}"));
        for (at, _) in text.match_indices(&format!("{child}::")) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| is_ident(c) || c == ':') {
                continue;
            }
            out.push(format!(
                "self::{}",
                &text[at..path_end(text, at + child.len())]
            ));
        }
    }
    out
}

/// The module a path names, from inside module `cur`.
fn resolve(cur: &Module, path: &str) -> Option<Module> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    match segs.first()? {
        &"crate" => Some(segs[1..].iter().map(|s| (*s).to_owned()).collect()),
        &"super" | &"self" => {
            let mut base = cur.clone();
            let mut i = 0;
            while i < segs.len() && (segs[i] == "super" || segs[i] == "self") {
                if segs[i] == "super" {
                    base.pop()?;
                }
                i += 1;
            }
            base.extend(segs[i..].iter().map(|s| (*s).to_owned()));
            Some(base)
        }
        _ => None,
    }
}

/// File -> files it imports, for the crate whose root is `src`.
fn graph(src: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mods: BTreeMap<Module, PathBuf> = files
        .iter()
        .map(|f| (module_of(src, f), f.clone()))
        .collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let cur = module_of(src, file);
        let parent: Module = cur[..cur.len().saturating_sub(1)].to_vec();
        let text = strip(&std::fs::read_to_string(file).unwrap());
        let mut out = BTreeSet::new();
        for path in paths(&text) {
            let Some(mut target) = resolve(&cur, path.trim_matches(':')) else {
                continue;
            };
            while !target.is_empty() && !mods.contains_key(&target) {
                target.pop();
            }
            if target.is_empty() {
                continue; // the crate root re-exports; not an edge
            }
            let dst = &mods[&target];
            // A child using its own parent module is one room, not a loop.
            if dst != file && target != parent {
                out.insert(dst.clone());
            }
        }
        edges.insert(file.clone(), out);
    }
    edges
}

/// The strongly connected groups of more than one file (Tarjan).
fn cycles(edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    struct Tarjan<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        out: Vec<Vec<PathBuf>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a PathBuf) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in &self.edges[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on.remove(w);
                    group.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.out.push(group);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn report(
    src: &Path,
    edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    groups: &[Vec<PathBuf>],
) -> String {
    let rel = |p: &PathBuf| p.strip_prefix(src).unwrap().display().to_string();
    let mut text = String::new();
    for group in groups {
        text.push_str(&format!("cycle of {} files:\n", group.len()));
        for f in group {
            let inside: Vec<String> = edges[f]
                .iter()
                .filter(|t| group.contains(t))
                .map(rel)
                .collect();
            text.push_str(&format!("  {} -> {}\n", rel(f), inside.join(", ")));
        }
    }
    text
}

#[test]
fn the_crate_has_no_import_cycle() {
    let src = src();
    let edges = graph(&src);
    assert!(edges.len() > 50, "read the crate's files");
    let groups = cycles(&edges);
    assert!(groups.is_empty(), "{}", report(&src, &edges, &groups));
}

/// The connection layer's rule: transport imports nothing above it (only the outbound link of
/// dispatch), session nothing of http, and dispatch (routing) neither sessions nor transport.
#[test]
fn the_connection_layers_import_downward_only() {
    let src = src();
    let edges = graph(&src);
    let under = |f: &PathBuf, dir: &str| f.strip_prefix(&src).unwrap().starts_with(dir);
    let link = src.join("dispatch/outbound.rs");
    let mut wrong = Vec::new();
    for (file, targets) in &edges {
        for t in targets {
            let bad = (under(file, "transport") && !under(t, "transport") && *t != link)
                || (under(file, "session") && (under(t, "http") || *t == src.join("server.rs")))
                || (under(file, "dispatch")
                    && (under(t, "session") || under(t, "transport") || under(t, "http")));
            if bad {
                wrong.push(format!("{} -> {}", file.display(), t.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

/// The check itself finds a loop when there is one (a crate written to a temp dir).
#[test]
fn a_loop_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod inner;\nuse crate::b::B;\n").unwrap();
    // A child naming its parent is not a loop.
    std::fs::write(src.join("a/inner.rs"), "use super::X;\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub fn f() { crate::c::g(); }\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "// use crate::a; in a comment is not an import\nconst Q: char = '\"';\n\
         const R: &str = r#\"crate::b \"# ;\nuse crate::{x, a::{Y}};\n",
    )
    .unwrap();
    let edges = graph(src);
    let groups = cycles(&edges);
    assert_eq!(groups.len(), 1, "{}", report(src, &edges, &groups));
    let names: Vec<String> = groups[0]
        .iter()
        .map(|p| p.strip_prefix(src).unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["a/mod.rs", "b.rs", "c.rs"]);
    // Without the last edge, no loop.
    std::fs::write(src.join("c.rs"), "use crate::x;\n").unwrap();
    assert!(cycles(&graph(src)).is_empty());
}
