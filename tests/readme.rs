//! The README's commands are the product's (issue 32, item 4), so the docs cannot drift from
//! the CLI and the APIs again (`banger --varlink vm list` once did not parse).
//!
//! Every line of every `sh` block, and every inline `` `banger …` `` span, is checked against
//! what banger takes:
//! - `banger …` parses with the CLI's own definition; a synopsis's `[optional]` parts are
//!   tried with and without, each `a | b` alternative on its own. Inline spans may leave out
//!   required arguments (prose names verbs), but their verbs and flags must exist.
//! - `busctl` and `gdbus` calls name a method of `dbus/*.xml` with its exact in-signature and
//!   as many arguments as it reads (`a{sv}` entries walked by their types); property reads
//!   name a property.
//! - `varlinkctl` calls name a method banger serves, with parameters the method declares.
//! - Scripts and files given to `sudo` exist in the repository; every other program is one
//!   this file knows how to check: a new kind of command fails until it is checked too.
//!
//! Then every API call of the README runs, as written, against a real daemon on a private
//! bus (only the bus address and socket paths swapped for the test's): reads, as root, must
//! answer; changes, as a user outside the `banger` group, must reach polkit and be refused by
//! it. The daemon checks a call's method, arguments and option keys and types before it asks
//! polkit, so a wrong one fails there, not here. The CLI's read verbs run too, over both
//! transports.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::Command;

use clap::Parser;
use common::*;

/// One word of a shell command line.
#[derive(Debug, Clone)]
struct Word {
    text: String,
    /// Quoted (in part): brackets in it are literal, not synopsis.
    quoted: bool,
}

/// A command of the README: where it is, and its words (continuations joined, comment gone).
#[derive(Debug, Clone)]
struct Line {
    at: usize,
    words: Vec<Word>,
    /// From an inline span in prose, not a command block.
    inline: bool,
}

impl Line {
    fn texts(&self) -> Vec<&str> {
        self.words.iter().map(|w| w.text.as_str()).collect()
    }
}

/// Splits a line as sh does for what the README uses: quotes, backslashes, comments and `|`.
fn words(line: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut started) = (String::new(), false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                (started, quoted) = (true, true);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                (started, quoted) = (true, true);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => cur.extend(chars.next()),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                started = true;
                cur.extend(chars.next());
            }
            '#' if !started => break,
            '|' if !started => out.push(Word {
                text: "|".into(),
                quoted: false,
            }),
            c if c.is_whitespace() => {
                if started {
                    out.push(Word {
                        text: std::mem::take(&mut cur),
                        quoted,
                    });
                    (started, quoted) = (false, false);
                }
            }
            c => {
                started = true;
                cur.push(c);
            }
        }
    }
    if started {
        out.push(Word { text: cur, quoted });
    }
    out
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// Every command of the README's `sh` blocks, and its inline `banger …` spans.
fn commands() -> Vec<Line> {
    let text = readme();
    let mut lines = Vec::new();
    let (mut in_sh, mut fence) = (false, false);
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = i + 1;
        if raw.starts_with("```") {
            fence = !fence;
            in_sh = fence && raw.trim() == "```sh";
            continue;
        }
        if !fence {
            // Inline spans in prose: `banger …`.
            for (k, span) in raw.split('`').enumerate() {
                // (`banger --varlink VERB …` names no verb.)
                if k % 2 == 1 && span.starts_with("banger ") && !span.contains('…') {
                    lines.push(Line {
                        at,
                        words: words(span),
                        inline: true,
                    });
                }
            }
            continue;
        }
        if !in_sh {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((at, String::new()));
        // A continuation ends its line before any comment.
        let body = raw.trim_end();
        if let Some(head) = body.strip_suffix('\\') {
            joined.push_str(head);
            joined.push(' ');
            pending = Some((start, joined));
            continue;
        }
        joined.push_str(body);
        let w = words(&joined);
        if !w.is_empty() {
            lines.push(Line {
                at: start,
                words: w,
                inline: false,
            });
        }
    }
    assert!(
        pending.is_none(),
        "README: a command block ends in a continuation"
    );
    lines
}

/// A synopsis: `[…]` optional, `a | b` alternatives inside it.
enum Node {
    Word(String),
    Group(Vec<Vec<Node>>),
}

/// The synopsis words with brackets split off the unquoted words that carry them.
fn synopsis_tokens(words: &[Word]) -> Vec<String> {
    let mut out = Vec::new();
    for w in words {
        if w.quoted {
            out.push(w.text.clone());
            continue;
        }
        let mut t = w.text.as_str();
        while let Some(rest) = t.strip_prefix('[') {
            out.push("[".into());
            t = rest;
        }
        let mut closes = 0;
        while let Some(rest) = t.strip_suffix(']') {
            closes += 1;
            t = rest;
        }
        if !t.is_empty() {
            out.push(t.to_owned());
        }
        out.extend(std::iter::repeat_n("]".to_owned(), closes));
    }
    out
}

/// Parses alternatives up to a `]` (or the end).
fn parse_alternatives(tokens: &[String], i: &mut usize) -> Vec<Vec<Node>> {
    let mut alts = vec![Vec::new()];
    while *i < tokens.len() {
        let t = &tokens[*i];
        *i += 1;
        match t.as_str() {
            "[" => {
                let group = parse_alternatives(tokens, i);
                alts.last_mut().unwrap().push(Node::Group(group));
            }
            "]" => return alts,
            "|" => alts.push(Vec::new()),
            _ => alts.last_mut().unwrap().push(Node::Word(t.clone())),
        }
    }
    alts
}

/// Every command line a synopsis stands for.
fn expand(seq: &[Node]) -> Vec<Vec<String>> {
    let mut all = vec![Vec::new()];
    for node in seq {
        let choices: Vec<Vec<String>> = match node {
            Node::Word(w) => vec![vec![w.clone()]],
            Node::Group(alts) => std::iter::once(Vec::new())
                .chain(alts.iter().flat_map(|a| expand(a)))
                .collect(),
        };
        all = all
            .into_iter()
            .flat_map(|head| {
                choices.iter().map(move |c| {
                    let mut h = head.clone();
                    h.extend(c.iter().cloned());
                    h
                })
            })
            .collect();
    }
    all
}

/// Splits leading `NAME=value` words off a command.
fn env_prefix(words: &[Word]) -> (Vec<(String, String)>, &[Word]) {
    let mut env = Vec::new();
    let mut rest = words;
    while let Some((w, tail)) = rest.split_first() {
        match w.text.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
            {
                env.push((k.to_owned(), v.to_owned()));
                rest = tail;
            }
            _ => break,
        }
    }
    (env, rest)
}

/// The D-Bus API as `dbus/*.xml` declares it: `iface.method` → in-signature, and
/// `iface.property`.
struct Bus {
    methods: BTreeMap<String, String>,
    properties: BTreeSet<String>,
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = tag.find(&key)? + key.len();
    Some(&tag[start..start + tag[start..].find('"')?])
}

fn bus_api() -> Bus {
    let mut api = Bus {
        methods: BTreeMap::new(),
        properties: BTreeSet::new(),
    };
    for entry in std::fs::read_dir(repo().join("dbus")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "xml") {
            continue;
        }
        let xml = std::fs::read_to_string(&path).unwrap();
        let mut iface = String::new();
        let mut method: Option<(String, String)> = None;
        for tag in xml.split('<').map(|t| t.split('>').next().unwrap_or("")) {
            if tag.starts_with("interface ") {
                iface = attr(tag, "name").unwrap().to_owned();
            } else if tag.starts_with("method ") {
                if let Some((m, sig)) = method.take() {
                    api.methods.insert(m, sig);
                }
                let m = format!("{iface}.{}", attr(tag, "name").unwrap());
                if tag.ends_with('/') {
                    api.methods.insert(m, String::new());
                } else {
                    method = Some((m, String::new()));
                }
            } else if tag.starts_with("/method") {
                if let Some((m, sig)) = method.take() {
                    api.methods.insert(m, sig);
                }
            } else if tag.starts_with("arg ") {
                if let Some((_, sig)) = method.as_mut() {
                    if attr(tag, "direction") != Some("out") {
                        sig.push_str(attr(tag, "type").unwrap());
                    }
                }
            } else if tag.starts_with("property ") {
                api.properties
                    .insert(format!("{iface}.{}", attr(tag, "name").unwrap()));
            }
        }
    }
    assert!(api.methods.len() > 20, "dbus/*.xml read: {:?}", api.methods);
    api
}

/// The Varlink API: `iface.Method` → its parameter names, for banger's socket and a VM's.
fn varlink_api(machine: bool) -> BTreeMap<String, BTreeSet<String>> {
    let descriptions = if machine {
        banger::varlink::machine_descriptions()
    } else {
        banger::varlink::descriptions()
    };
    let mut methods = BTreeMap::new();
    for (iface, text) in descriptions {
        // A method may spread its parameters over several lines.
        for decl in text.split("\nmethod ").skip(1) {
            let (name, rest) = decl.split_once('(').unwrap();
            let params = &rest[..rest.find(')').unwrap()];
            let params: String = params
                .lines()
                .map(|l| l.split('#').next().unwrap())
                .collect::<Vec<_>>()
                .join(" ");
            let names = params
                .split(',')
                .filter_map(|p| p.split_once(':'))
                .map(|(n, _)| n.trim().to_owned())
                .collect();
            methods.insert(format!("{iface}.{}", name.trim()), names);
        }
    }
    methods
}

/// The complete types of a D-Bus signature, one by one.
fn complete_types(sig: &str) -> Vec<String> {
    let b = sig.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        i = end_of_type(b, i);
        out.push(sig[start..i].to_owned());
    }
    out
}

fn end_of_type(b: &[u8], mut i: usize) -> usize {
    match b[i] {
        b'a' => end_of_type(b, i + 1),
        open @ (b'(' | b'{') => {
            let close = if open == b'(' { b')' } else { b'}' };
            i += 1;
            while b[i] != close {
                i = end_of_type(b, i);
            }
            i + 1
        }
        _ => i + 1,
    }
}

/// Consumes busctl's words for one value of type `t`; the option keys of an `a{sv}` are
/// collected. Fails on too few words.
fn take_value(
    t: &str,
    args: &[String],
    i: &mut usize,
    keys: &mut Vec<String>,
) -> Result<(), String> {
    let next = |i: &mut usize| -> Result<String, String> {
        let w = args
            .get(*i)
            .cloned()
            .ok_or(format!("missing a value of type {t}"))?;
        *i += 1;
        Ok(w)
    };
    if let Some(elem) = t.strip_prefix('a') {
        let n: usize = next(i)?
            .parse()
            .map_err(|_| format!("an array's ({t}) length is not a number"))?;
        for _ in 0..n {
            if elem == "{sv}" {
                keys.push(next(i)?);
                let vt = next(i)?;
                take_value(&vt, args, i, keys)?;
            } else {
                take_value(elem, args, i, keys)?;
            }
        }
        return Ok(());
    }
    if let Some(inner) = t.strip_prefix('(').and_then(|s| s.strip_suffix(')')) {
        for f in complete_types(inner) {
            take_value(&f, args, i, keys)?;
        }
        return Ok(());
    }
    if t == "v" {
        let vt = next(i)?;
        return take_value(&vt, args, i, keys);
    }
    next(i).map(drop)
}

/// A `banger` command's words (with the Varlink env var as its flag).
fn banger_argv(env: &[(String, String)], rest: &[Word]) -> Vec<Word> {
    let mut argv = vec![rest[0].clone()];
    for (k, v) in env {
        if k == "BANGER_VARLINK" {
            argv.push(Word {
                text: format!("--varlink={v}"),
                quoted: true,
            });
        }
    }
    argv.extend(rest[1..].iter().cloned());
    argv
}

/// Checks one command; the problems found.
fn check(line: &Line, bus: &Bus, problems: &mut Vec<String>) {
    let (env, rest) = env_prefix(&line.words);
    let Some(program) = rest.first() else {
        return;
    };
    let at = line.at;
    let mut bad = |what: String| problems.push(format!("README.md:{at}: {what}"));
    let texts: Vec<String> = rest.iter().map(|w| w.text.clone()).collect();
    match program.text.as_str() {
        "banger" => {
            let tokens = synopsis_tokens(&banger_argv(&env, rest));
            let tree = parse_alternatives(&tokens, &mut 0);
            for alt in &tree {
                for argv in expand(alt) {
                    if let Err(e) = banger::cli::Cli::try_parse_from(&argv) {
                        use clap::error::ErrorKind as K;
                        let fine = matches!(e.kind(), K::DisplayHelp | K::DisplayVersion)
                            || (line.inline
                                && matches!(
                                    e.kind(),
                                    K::MissingRequiredArgument
                                        | K::DisplayHelpOnMissingArgumentOrSubcommand
                                        | K::MissingSubcommand
                                ));
                        // Prose's placeholders (`--count N`) stand for values.
                        let placeholder = line.inline
                            && matches!(e.kind(), K::ValueValidation | K::InvalidValue)
                            && argv.iter().any(|w| {
                                w.chars().all(|c| c.is_ascii_uppercase())
                                    && e.to_string().contains(&format!("'{w}'"))
                            });
                        if !fine && !placeholder {
                            bad(format!(
                                "`{}` does not parse: {}",
                                argv.join(" "),
                                e.render().to_string().lines().next().unwrap_or("")
                            ));
                        }
                    }
                }
            }
        }
        "sudo" => {
            let cmd = &texts[1..];
            match cmd.first().map(String::as_str) {
                Some("install") => {
                    let src = &cmd[cmd.len() - 2];
                    if !repo().join(src).is_file() {
                        bad(format!(
                            "`sudo install` of {src}, which is not in the repository"
                        ));
                    }
                }
                Some("usermod") => {
                    if !cmd.iter().any(|w| w == "banger") {
                        bad("`usermod` without the banger group".into());
                    }
                }
                Some(script) => {
                    if !repo().join(script).is_file() {
                        bad(format!("`sudo {script}`: no such script in the repository"));
                    }
                }
                None => bad("a bare `sudo`".into()),
            }
        }
        "busctl" => match texts.get(1).map(String::as_str) {
            Some("introspect") | Some("tree") => {
                if texts.get(2).map(String::as_str) != Some("org.banger") {
                    bad("busctl on another service".into());
                }
            }
            Some("get-property") => {
                let p = format!("{}.{}", texts[4], texts[5]);
                if !bus.properties.contains(&p) {
                    bad(format!("no D-Bus property {p}"));
                }
            }
            Some("call") => {
                let m = format!("{}.{}", texts[4], texts[5]);
                let Some(sig) = bus.methods.get(&m) else {
                    bad(format!("no D-Bus method {m}"));
                    return;
                };
                let given = texts.get(6).cloned().unwrap_or_default();
                if &given != sig {
                    bad(format!("{m} takes '{sig}', the README gives '{given}'"));
                    return;
                }
                let args = texts.get(7..).unwrap_or(&[]).to_vec();
                let (mut i, mut keys) = (0, Vec::new());
                for t in complete_types(sig) {
                    if let Err(e) = take_value(&t, &args, &mut i, &mut keys) {
                        bad(format!("{m}: {e}"));
                        return;
                    }
                }
                if i != args.len() {
                    bad(format!("{m}: {} words too many", args.len() - i));
                }
            }
            other => bad(format!("busctl {other:?}: add a check for it")),
        },
        "gdbus" => {
            let m = texts
                .iter()
                .position(|w| w == "--method")
                .and_then(|i| texts.get(i + 1));
            let Some(m) = m else {
                bad("gdbus without --method".into());
                return;
            };
            let Some(sig) = bus.methods.get(m) else {
                bad(format!("no D-Bus method {m}"));
                return;
            };
            let at = texts.iter().position(|w| w == "--method").unwrap() + 2;
            let (want, given) = (complete_types(sig).len(), texts.len() - at);
            if want != given {
                bad(format!(
                    "{m} takes {want} arguments, the README gives {given}"
                ));
            }
        }
        "varlinkctl" => {
            let verb = texts.get(1).map(String::as_str);
            let args: Vec<&String> = texts[2..].iter().filter(|w| !w.starts_with("--")).collect();
            let machine = args.first().is_some_and(|s| s.contains("/machines/"));
            let api = varlink_api(machine);
            match verb {
                Some("call") => {
                    let m = args[1];
                    let Some(params) = api.get(m) else {
                        bad(format!("no Varlink method {m}"));
                        return;
                    };
                    let given: serde_json::Value = serde_json::from_str(args[2]).unwrap();
                    for k in given.as_object().unwrap().keys() {
                        if !params.contains(k) {
                            bad(format!("{m} has no parameter {k}"));
                        }
                    }
                }
                Some("introspect") => {
                    let iface = args[1];
                    if !api.keys().any(|m| m.starts_with(&format!("{iface}."))) {
                        bad(format!("no Varlink interface {iface}"));
                    }
                }
                other => bad(format!("varlinkctl {other:?}: add a check for it")),
            }
        }
        "printf" => {
            // `printf '{"method":…}\0' | socat - UNIX-CONNECT:…`: a raw Varlink call.
            let call = texts[1].trim_end_matches("\\0");
            let v: serde_json::Value = serde_json::from_str(call).unwrap();
            let m = v["method"].as_str().unwrap();
            if !varlink_api(false).contains_key(m) {
                bad(format!("no Varlink method {m}"));
            }
            if texts.get(3).map(String::as_str) != Some("socat") {
                bad("printf piped into something other than socat".into());
            }
        }
        "machinectl" => {
            let method = match texts.get(1).map(String::as_str) {
                Some("pause") => "Pause",
                Some("resume") => "Resume",
                Some("poweroff") => "PowerOff",
                Some("terminate") => "Terminate",
                other => {
                    bad(format!("machinectl {other:?}: add a check for it"));
                    return;
                }
            };
            let m = format!("io.systemd.MachineInstance.{method}");
            if !varlink_api(true).contains_key(&m) {
                bad(format!("VMs do not answer {m}"));
            }
        }
        "ctr" => {
            // containerd's client: a pull, or a run through banger's runtime, whose shim
            // binary containerd finds by the runtime's name.
            match texts.get(1).map(String::as_str) {
                Some("image") if texts.get(2).map(String::as_str) == Some("pull") => {}
                Some("run") => {
                    let runtime = texts
                        .iter()
                        .position(|w| w == "--runtime")
                        .and_then(|i| texts.get(i + 1));
                    match runtime.map(String::as_str) {
                        Some("io.containerd.banger.v2") => {
                            let shim = std::fs::read_to_string(
                                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                                    .join("crates/banger-shim/Cargo.toml"),
                            )
                            .unwrap_or_default();
                            if !shim.contains("name = \"containerd-shim-banger-v2\"") {
                                bad("no binary containerd-shim-banger-v2 for the runtime".into());
                            }
                        }
                        other => bad(format!("ctr run with runtime {other:?}, not banger's")),
                    }
                }
                other => bad(format!("ctr {other:?}: add a check for it")),
            }
        }
        script if script.starts_with("packaging/") || script.starts_with("tests/") => {
            // One of the project's own scripts: it must be there, and executable.
            use std::os::unix::fs::PermissionsExt;
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                _ => bad(format!(
                    "{script} is no executable script of this repository"
                )),
            }
        }
        other => bad(format!(
            "`{other}`: a program this test cannot check; add a check"
        )),
    }
}

#[test]
fn every_command_in_the_readme_is_one_banger_takes() {
    let bus = bus_api();
    let lines = commands();
    let mut problems = Vec::new();
    for line in &lines {
        check(line, &bus, &mut problems);
    }
    let (blocks, inline) = lines.iter().partition::<Vec<_>, _>(|l| !l.inline);
    let _ = writeln!(
        std::io::stderr(),
        "readme: {} block commands and {} inline `banger` spans checked, {} problems",
        blocks.len(),
        inline.len(),
        problems.len()
    );
    assert!(blocks.len() > 60, "too few commands found: {lines:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The checker itself: what it must refuse.
#[test]
fn the_checker_refuses_what_drifted() {
    let bus = bus_api();
    let cases = [
        "banger --varlink vm list --frobnicate",
        "banger vm lst",
        "banger vm create dev --memry 512",
        "busctl call org.banger /org/banger org.banger.VMs1 ListVM",
        "busctl call org.banger /org/banger org.banger.VMs1 CreateVM 'sa{sv}' dev 1 memory_mib u",
        "busctl call org.banger /org/banger org.banger.VMs1 CreateVM 's' dev",
        "gdbus call --system --dest org.banger --object-path /org/banger --method org.banger.VMs1.StopVM dev",
        "varlinkctl call /run/banger/io.banger io.banger.VMs.Create '{\"memory_mib\":1}'",
        "varlinkctl call /run/banger/io.banger io.banger.VMs.Lst '{}'",
        "banger image register mine [--kernel K | --kernl-path ./vmlinuz]",
        "sudo packaging/nothing.sh",
        "curl https://example.org | sh",
    ];
    for case in cases {
        let line = Line {
            at: 0,
            words: words(case),
            inline: false,
        };
        let mut problems = Vec::new();
        check(&line, &bus, &mut problems);
        assert!(!problems.is_empty(), "not refused: {case}");
    }
    // And a synopsis stands for each of its lines.
    let tokens = synopsis_tokens(&words("a [b | c [d]] e"));
    let all: Vec<String> = parse_alternatives(&tokens, &mut 0)
        .iter()
        .flat_map(|a| expand(a))
        .map(|v| v.join(" "))
        .collect();
    assert_eq!(all, ["a e", "a b e", "a c e", "a c d e"]);
}

/// The README's socket and bus swapped for the test's.
fn localised(text: &str, bus: &TestBus) -> String {
    text.replace(
        "/run/banger/io.banger",
        bus.runtime.join("io.banger").to_str().unwrap(),
    )
}

/// Whether a call's failure came after the daemon took its arguments: polkit's refusal
/// (busctl says only "Access denied"), or the example's object (`dev`) not being there. The
/// D-Bus and Varlink adapters read every argument and option before they look anything up or
/// ask polkit, so a wrong key or type would have been an `InvalidArgument` instead.
fn refused_by_polkit(message: &str) -> bool {
    [
        "Not authorised for org.banger.",
        "Authentication is required for org.banger.",
        "Call failed: Access denied",
        ".PermissionDenied",
        "No VM \"",
        "No snapshot \"",
    ]
    .iter()
    .any(|m| message.contains(m))
}

#[test]
fn the_readmes_api_calls_and_read_verbs_run_against_the_service() {
    if !available(&[
        "dbus-daemon",
        "busctl",
        "gdbus",
        "socat",
        "runuser",
        "unshare",
    ]) {
        return;
    }
    let py = repo().join("target/test-python");
    if !py.join("varlink").is_dir() {
        assert!(
            std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_none(),
            "the PyPI varlink package is not in {} (tests/run installs it)",
            py.display()
        );
        return;
    }
    let bus = TestBus::start(BusOptions::default());
    let sock = bus.runtime.join("io.banger");
    let (mut reads, mut refused, mut cli) = (0, 0, 0);
    let mut problems = Vec::new();
    for line in commands().iter().filter(|l| !l.inline) {
        let (env, rest) = env_prefix(&line.words);
        let Some(program) = rest.first() else {
            continue;
        };
        let texts: Vec<String> = rest.iter().map(|w| localised(&w.text, &bus)).collect();
        let shown = line.texts().join(" ");
        let mut bad =
            |what: String| problems.push(format!("README.md:{}: `{shown}`: {what}", line.at));
        let read = |method: &str| {
            let m = method.rsplit('.').next().unwrap();
            m.starts_with("List") || m.starts_with("Get") || m == "introspect"
        };
        // An API call's (read, answered, what it said), judged once below.
        let call = match program.text.as_str() {
            "busctl" => {
                let args: Vec<&str> = texts[1..].iter().map(String::as_str).collect();
                let is_read = args[0] != "call" || read(args[4]);
                let user = if is_read { None } else { Some(USER_NO) };
                let out = bus.busctl_as(user, &args);
                Some((is_read, out.status.success(), text(&out)))
            }
            "gdbus" => {
                let mut args: Vec<String> = Vec::new();
                for w in &texts[1..] {
                    if w == "--system" {
                        args.extend(["--address".into(), bus.address.clone()]);
                    } else {
                        args.push(w.clone());
                    }
                }
                let m = &texts[texts.iter().position(|w| w == "--method").unwrap() + 1];
                let is_read = read(m);
                let user = if is_read { None } else { Some(USER_NO) };
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = bus.command_as(user, "gdbus", &a).output().unwrap();
                Some((is_read, out.status.success(), text(&out)))
            }
            "varlinkctl" => {
                let args: Vec<&String> =
                    texts[2..].iter().filter(|w| !w.starts_with("--")).collect();
                if args[0].contains("/machines/") {
                    // A running VM's socket: the VM tests call it (tests/vms.rs).
                    continue;
                }
                let (method, params) = match texts[1].as_str() {
                    "introspect" => (
                        "org.varlink.service.GetInterfaceDescription".to_owned(),
                        serde_json::json!({ "interface": args[1] }),
                    ),
                    _ => (args[1].clone(), serde_json::from_str(args[2]).unwrap()),
                };
                let is_read = read(&method) || texts[1] == "introspect";
                let user = if is_read { None } else { Some(USER_NO) };
                let more = texts.iter().any(|w| w == "--more");
                let replies = py_call_at(&bus, user, &sock, &method, params, more);
                let first = replies.first().cloned().unwrap_or_default();
                Some((is_read, first.get("error").is_none(), first.to_string()))
            }
            "printf" => {
                // The line as the shell reads it (its one argument quoted again).
                let shell = format!("printf '{}' | {}", texts[1], texts[3..].join(" "));
                let out = Command::new("bash").args(["-c", &shell]).output().unwrap();
                let answered = String::from_utf8_lossy(&out.stdout).contains("\"vendor\"");
                Some((true, answered, text(&out)))
            }
            "banger" => {
                // The read verbs, as the README writes them, over the bus and over Varlink.
                let argv = banger_argv(&env, rest);
                let words: Vec<String> = argv[1..]
                    .iter()
                    .map(|w| match w.text.as_str() {
                        "--varlink" => format!("--varlink={}", sock.display()),
                        t => localised(t, &bus),
                    })
                    .collect();
                let verb: Vec<&str> = words
                    .iter()
                    .filter(|w| !w.starts_with("--"))
                    .take(2)
                    .map(String::as_str)
                    .collect();
                let is_read = matches!(verb.as_slice(), ["status", ..] | [_, "list"])
                    && !words.iter().any(|w| w == "--available");
                if !is_read || words.iter().any(|w| w.starts_with('[')) {
                    continue;
                }
                let a: Vec<&str> = words.iter().map(String::as_str).collect();
                let out = bus.banger_as(None, &a);
                cli += 1;
                if !out.status.success() {
                    bad(format!("failed: {}", text(&out)));
                }
                None
            }
            _ => None,
        };
        match call {
            Some((true, answered, said)) => {
                reads += 1;
                if !answered {
                    bad(format!("failed: {said}"));
                }
            }
            Some((false, answered, said)) => {
                refused += 1;
                if answered || !refused_by_polkit(&said) {
                    bad(format!("not polkit's refusal: {said}"));
                }
            }
            None => {}
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "readme: {reads} API reads answered, {refused} API changes reached polkit, {cli} CLI read verbs ran, {} problems",
        problems.len()
    );
    assert!(
        reads >= 10 && refused >= 8 && cli >= 2,
        "{reads} {refused} {cli}"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
