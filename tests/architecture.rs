//! The map in docs/ARCHITECTURE.md, kept true: within each crate, no two top-level modules
//! import each other, directly or around a longer loop, except through the crate's error
//! type (every layer turns its failures into it). The compiler keeps the crates apart
//! (banger-guest cannot name banger-core, banger-core cannot name banger-cli or banger); this keeps the
//! modules inside them apart. Comments and test modules do not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates' source roots.
const CRATES: &[&str] = &[
    "src",
    "crates/banger-api/src",
    "crates/banger-cli/src",
    "crates/banger-client/src",
    "crates/banger-core/src",
    "crates/banger-e2b/src",
    "crates/banger-guest/src",
    "crates/banger-shim/src",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src` without comment lines and without its test module.
fn code(src: &str) -> String {
    let src = src.split("#[cfg(test)]\nmod tests").next().unwrap_or(src);
    src.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names as `crate::NAME`.
fn named(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // Not `banger_crate::` or the like.
            !code[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Each top-level module of the crate at `root` and the modules it imports.
fn graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "bin" || rel.to_string_lossy().contains("tests") {
            continue;
        }
        let uses = named(&code(&std::fs::read_to_string(&f).unwrap()));
        let entry = g.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|u| *u != module));
    }
    let modules: BTreeSet<String> = g.keys().cloned().collect();
    for uses in g.values_mut() {
        uses.retain(|u| modules.contains(u) && u != "error");
    }
    g
}

/// The loops of `g`: its strongly connected parts of more than one module.
fn loops(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one loop when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for n in g.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut found: Vec<Vec<String>> = Vec::new();
    for m in g.keys() {
        if found.iter().any(|l| l.contains(m)) {
            continue;
        }
        let part: Vec<String> = g
            .keys()
            .filter(|n| *n == m || (reaches[m].contains(*n) && reaches[*n].contains(m)))
            .cloned()
            .collect();
        if part.len() > 1 {
            found.push(part);
        }
    }
    found
}

#[test]
fn no_module_imports_around_a_loop_but_through_the_error_type() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mut modules, mut edges, mut problems) = (0, 0, Vec::new());
    for c in CRATES {
        let g = graph(&root.join(c));
        modules += g.len();
        edges += g.values().map(BTreeSet::len).sum::<usize>();
        for l in loops(&g) {
            problems.push(format!("{c}: {}", l.join(" ↔ ")));
        }
    }
    println!(
        "architecture: {modules} modules in {} crates, {edges} imports between them, {} loops",
        CRATES.len(),
        problems.len()
    );
    assert!(modules > 30, "the crates were not read: {modules} modules");
    assert!(
        problems.is_empty(),
        "modules that import each other (see docs/ARCHITECTURE.md, Map): {problems:#?}"
    );
}

#[test]
fn the_loop_finder_finds_loops() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, u)| (m.to_owned(), u.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(loops(&g), vec![vec!["a", "b", "c"]]);
    assert_eq!(
        named("use crate::vms::X; banger_crate::y; crate::host::run()"),
        ["host", "vms"].into_iter().map(str::to_owned).collect()
    );
    assert_eq!(
        code("a\n// crate::x\n#[cfg(test)]\nmod tests { crate::y }"),
        "a"
    );
}

/// The `banger` binary is a main over banger-cli, which cannot name the daemon: bangerd's man
/// page comes from bangerd's own command line, handed in by that main.
#[test]
fn the_cli_binary_writes_bangerds_page_from_bangerds_own_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_banger"))
        .arg("generate-assets")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(dir.path().join("man/man8/bangerd.8")).unwrap();
    for option in ["state\\-dir", "runtime\\-dir", "config"] {
        assert!(page.contains(option), "bangerd.8 lacks {option}: {page}");
    }
    assert!(dir.path().join("man/man1/banger-vm-run.1").exists());
}
