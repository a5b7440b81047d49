//! File operations as a guest user: the agent runs itself (`banger-agent fs OP`) as that
//! user, so an operation can do exactly what the user could, and nothing more; the result
//! comes back on the connection as `exec`'s output does.
//!
//! The helper writes one JSON line ([`FsResult`]) to standard output for every operation but
//! `read` (the file's bytes) and `watch` (one JSON line per [`FsEvent`] until its input
//! ends). A failure is a message on standard error and an exit status of [`status`], which
//! says what kind of failure it was. A relative path is the user's home's.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The most entries `list` returns.
pub const MAX_ENTRIES: usize = 100_000;

/// What the helper's exit status says of a failure.
pub mod status {
    /// Done.
    pub const OK: i32 = 0;
    /// Anything else.
    pub const FAILED: i32 = 1;
    /// No such file or directory.
    pub const NOT_FOUND: i32 = 2;
    /// It exists already.
    pub const EXISTS: i32 = 3;
    /// The user may not.
    pub const DENIED: i32 = 4;
    /// The request does not fit what is there (a directory read as a file, too many
    /// entries).
    pub const INVALID: i32 = 5;
}

/// One file operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fs", rename_all = "lowercase")]
pub enum FsOp {
    /// The entry at `path` (a link itself, not what it points to).
    Stat {
        /// Where.
        path: String,
    },
    /// The entries under directory `path`, `depth` levels down (1: its own entries).
    List {
        /// Where.
        path: String,
        /// How deep; 0 counts as 1.
        #[serde(default)]
        depth: u32,
    },
    /// Makes directory `path` and its missing parents; fails with [`status::EXISTS`] when it
    /// is there already.
    Mkdir {
        /// Where.
        path: String,
    },
    /// Renames `from` to `to`, making `to`'s missing parents.
    Move {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// Removes `path` (a directory with everything in it).
    Remove {
        /// Where.
        path: String,
    },
    /// The file's bytes.
    Read {
        /// Where.
        path: String,
    },
    /// Standard input becomes the file `path` (made, or emptied first), its missing parents
    /// made.
    Write {
        /// Where.
        path: String,
    },
    /// Changes under directory `path` (with `recursive`, in its subdirectories too), one JSON
    /// line each, until standard input ends.
    Watch {
        /// Where.
        path: String,
        /// Its subdirectories too.
        #[serde(default)]
        recursive: bool,
    },
}

/// What kind of entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket).
    Other,
}

/// A file system entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its absolute path.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// `ls -l`'s mode column (`drwxr-xr-x`).
    pub permissions: String,
    /// Its owner's name (the number without an entry in `/etc/passwd`).
    pub owner: String,
    /// Its group's name.
    pub group: String,
    /// Modified, seconds since the epoch.
    pub mtime: i64,
    /// And nanoseconds.
    pub mtime_nsec: u32,
    /// Where a link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What an operation answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsResult {
    /// The entries: the one stat, made, moved or written, or those listed.
    #[serde(default)]
    pub entries: Vec<Entry>,
}

/// A change `watch` saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEvent {
    /// The path relative to the watched directory.
    pub name: String,
    /// `create`, `write`, `remove`, `rename` or `chmod`.
    pub kind: String,
}

/// A failure: its [`status`] and message.
type Fail = (i32, String);

/// An I/O error on `path` as a failure of its kind.
pub fn fail_of(path: &Path, e: std::io::Error) -> (i32, String) {
    fail(path, e)
}

fn fail(path: &Path, e: std::io::Error) -> Fail {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => status::NOT_FOUND,
        std::io::ErrorKind::AlreadyExists => status::EXISTS,
        std::io::ErrorKind::PermissionDenied => status::DENIED,
        _ => match e.raw_os_error() {
            Some(libc::ENOTDIR) | Some(libc::EISDIR) | Some(libc::ENOTEMPTY) => status::INVALID,
            _ => status::FAILED,
        },
    };
    (code, format!("{}: {e}", path.display()))
}

/// `path` made absolute against `$HOME`.
fn absolute(path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_owned();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
    let rest = path
        .strip_prefix("~/")
        .unwrap_or(if path == "~" { "" } else { path });
    Path::new(&home).join(rest)
}

/// Names of ids from an `/etc/passwd`- or `/etc/group`-style file.
fn names(file: &str) -> std::collections::HashMap<u32, String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.get(2)?.parse().ok()?, f.first()?.to_string()))
        })
        .collect()
}

/// Turns metadata into [`Entry`]s, the names of users and groups read once.
struct Describe {
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
}

impl Describe {
    fn new() -> Self {
        Describe {
            users: names("/etc/passwd"),
            groups: names("/etc/group"),
        }
    }

    fn entry(&self, path: &Path) -> Result<Entry, Fail> {
        let m = std::fs::symlink_metadata(path).map_err(|e| fail(path, e))?;
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        let name_of = |map: &std::collections::HashMap<u32, String>, id: u32| {
            map.get(&id).cloned().unwrap_or_else(|| id.to_string())
        };
        Ok(Entry {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "/".into()),
            path: path.to_string_lossy().into_owned(),
            kind,
            size: m.len(),
            mode: m.permissions().mode() & 0o7777,
            permissions: permissions(m.permissions().mode(), kind),
            owner: name_of(&self.users, m.uid()),
            group: name_of(&self.groups, m.gid()),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            target: ft.is_symlink().then(|| {
                std::fs::read_link(path)
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
        })
    }
}

/// `ls -l`'s mode column.
pub fn permissions(mode: u32, kind: Kind) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File => '-',
        Kind::Other => '?',
    });
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        let set = mode & bit != 0;
        s.push(match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

fn list(d: &Describe, dir: &Path, depth: u32, out: &mut Vec<Entry>) -> Result<(), Fail> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| fail(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for p in names {
        if out.len() >= MAX_ENTRIES {
            return Err((
                status::INVALID,
                format!(
                    "{}: more than {MAX_ENTRIES} entries; list fewer levels",
                    dir.display()
                ),
            ));
        }
        // An entry removed meanwhile is left out.
        let Ok(e) = d.entry(&p) else { continue };
        let sub = e.kind == Kind::Dir;
        out.push(e);
        if sub && depth > 1 {
            // A subdirectory the user may not read is listed, not entered.
            match list(d, &p, depth - 1, out) {
                Err((status::DENIED, _)) | Ok(()) => {}
                Err(f) => return Err(f),
            }
        }
    }
    Ok(())
}

fn make_parents(path: &Path) -> Result<(), Fail> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::create_dir_all(p).map_err(|e| fail(p, e)),
        _ => Ok(()),
    }
}

/// Runs `op` as whoever runs this process; what [`FsResult`] or bytes it answers go to
/// `out`. Standard input is `input` (for `write` and `watch`).
pub fn perform(op: &FsOp, input: &mut dyn Read, out: &mut dyn Write) -> Result<(), Fail> {
    let d = Describe::new();
    let answer = |out: &mut dyn Write, entries: Vec<Entry>| -> Result<(), Fail> {
        let mut line = serde_json::to_vec(&FsResult { entries })
            .map_err(|e| (status::FAILED, e.to_string()))?;
        line.push(b'\n');
        out.write_all(&line)
            .map_err(|e| (status::FAILED, e.to_string()))
    };
    match op {
        FsOp::Stat { path } => answer(out, vec![d.entry(&absolute(path))?]),
        FsOp::List { path, depth } => {
            let p = absolute(path);
            let m = std::fs::metadata(&p).map_err(|e| fail(&p, e))?;
            if !m.is_dir() {
                return Err((status::INVALID, format!("{}: not a directory", p.display())));
            }
            let mut entries = Vec::new();
            list(&d, &p, (*depth).max(1), &mut entries)?;
            answer(out, entries)
        }
        FsOp::Mkdir { path } => {
            let p = absolute(path);
            if std::fs::symlink_metadata(&p).is_ok() {
                return Err((status::EXISTS, format!("{}: exists already", p.display())));
            }
            std::fs::create_dir_all(&p).map_err(|e| fail(&p, e))?;
            answer(out, vec![d.entry(&p)?])
        }
        FsOp::Move { from, to } => {
            let (f, t) = (absolute(from), absolute(to));
            std::fs::symlink_metadata(&f).map_err(|e| fail(&f, e))?;
            make_parents(&t)?;
            std::fs::rename(&f, &t).map_err(|e| fail(&t, e))?;
            answer(out, vec![d.entry(&t)?])
        }
        FsOp::Remove { path } => {
            let p = absolute(path);
            let m = std::fs::symlink_metadata(&p).map_err(|e| fail(&p, e))?;
            if m.is_dir() {
                std::fs::remove_dir_all(&p).map_err(|e| fail(&p, e))?;
            } else {
                std::fs::remove_file(&p).map_err(|e| fail(&p, e))?;
            }
            answer(out, Vec::new())
        }
        FsOp::Read { path } => {
            let p = absolute(path);
            let mut f = std::fs::File::open(&p).map_err(|e| fail(&p, e))?;
            if f.metadata().map_err(|e| fail(&p, e))?.is_dir() {
                return Err((status::INVALID, format!("{}: is a directory", p.display())));
            }
            std::io::copy(&mut f, out).map_err(|e| fail(&p, e))?;
            Ok(())
        }
        FsOp::Write { path } => {
            let p = absolute(path);
            make_parents(&p)?;
            if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
                return Err((status::INVALID, format!("{}: is a directory", p.display())));
            }
            let mut f = std::fs::File::create(&p).map_err(|e| fail(&p, e))?;
            std::io::copy(input, &mut f).map_err(|e| fail(&p, e))?;
            f.flush().map_err(|e| fail(&p, e))?;
            answer(out, vec![d.entry(&p)?])
        }
        FsOp::Watch { path, recursive } => super::watch::run(&absolute(path), *recursive, out),
    }
}

/// `banger-agent fs OP`: runs the operation given as JSON and exits with its [`status`].
pub fn main(json: &str) -> i32 {
    let op: FsOp = match serde_json::from_str(json) {
        Ok(op) => op,
        Err(e) => {
            eprintln!("bad file operation: {e}");
            return status::INVALID;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = perform(&op, &mut std::io::stdin().lock(), &mut out);
    let flushed = out.flush();
    match (r, flushed) {
        (Ok(()), Ok(())) => status::OK,
        (Err((code, msg)), _) => {
            // One write: the reason reaches the client as one frame.
            let _ = std::io::stderr().write_all(format!("{msg}\n").as_bytes());
            code
        }
        (_, Err(e)) => {
            eprintln!("{e}");
            status::FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: FsOp, input: &[u8]) -> Result<Vec<u8>, Fail> {
        let mut out = Vec::new();
        perform(&op, &mut &input[..], &mut out).map(|_| out)
    }

    fn entries(out: Vec<u8>) -> Vec<Entry> {
        serde_json::from_slice::<FsResult>(&out).unwrap().entries
    }

    #[test]
    fn operations_make_move_list_read_and_remove() {
        let d = tempfile::tempdir().unwrap();
        let at = |p: &str| d.path().join(p).to_string_lossy().into_owned();
        let made = entries(run(FsOp::Mkdir { path: at("a/b") }, b"").unwrap());
        assert_eq!(made[0].kind, Kind::Dir);
        assert_eq!(made[0].name, "b");
        assert_eq!(
            run(FsOp::Mkdir { path: at("a/b") }, b"").unwrap_err().0,
            status::EXISTS
        );
        let w = entries(
            run(
                FsOp::Write {
                    path: at("a/b/c/f.txt"),
                },
                b"hello",
            )
            .unwrap(),
        );
        assert_eq!((w[0].size, w[0].kind), (5, Kind::File));
        assert_eq!(
            run(
                FsOp::Read {
                    path: at("a/b/c/f.txt")
                },
                b""
            )
            .unwrap(),
            b"hello"
        );
        assert_eq!(
            run(FsOp::Read { path: at("a/b") }, b"").unwrap_err().0,
            status::INVALID
        );
        std::os::unix::fs::symlink("c/f.txt", d.path().join("a/b/link")).unwrap();
        let one = entries(
            run(
                FsOp::List {
                    path: at("a"),
                    depth: 1,
                },
                b"",
            )
            .unwrap(),
        );
        assert_eq!(one.len(), 1);
        let all = entries(
            run(
                FsOp::List {
                    path: at("a"),
                    depth: 9,
                },
                b"",
            )
            .unwrap(),
        );
        let names: Vec<_> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["b", "c", "f.txt", "link"]);
        let link = all.iter().find(|e| e.name == "link").unwrap();
        assert_eq!(
            (link.kind, link.target.as_deref()),
            (Kind::Symlink, Some("c/f.txt"))
        );
        let moved = entries(
            run(
                FsOp::Move {
                    from: at("a/b/c/f.txt"),
                    to: at("x/y/g.txt"),
                },
                b"",
            )
            .unwrap(),
        );
        assert_eq!(moved[0].path, at("x/y/g.txt"));
        assert_eq!(
            run(
                FsOp::Stat {
                    path: at("a/b/c/f.txt")
                },
                b""
            )
            .unwrap_err()
            .0,
            status::NOT_FOUND
        );
        run(FsOp::Remove { path: at("a") }, b"").unwrap();
        assert!(!d.path().join("a").exists());
        assert_eq!(
            run(FsOp::Remove { path: at("a") }, b"").unwrap_err().0,
            status::NOT_FOUND
        );
    }

    #[test]
    fn modes_read_as_ls_shows_them() {
        assert_eq!(permissions(0o755, Kind::Dir), "drwxr-xr-x");
        assert_eq!(permissions(0o4755, Kind::File), "-rwsr-xr-x");
        assert_eq!(permissions(0o1777, Kind::Dir), "drwxrwxrwt");
        assert_eq!(permissions(0o2640, Kind::File), "-rw-r-S---");
    }

    #[test]
    fn relative_paths_are_the_homes() {
        std::env::set_var("HOME", "/home/user");
        assert_eq!(absolute("f.txt"), Path::new("/home/user/f.txt"));
        assert_eq!(absolute("~/d/f"), Path::new("/home/user/d/f"));
        assert_eq!(absolute("/etc/x"), Path::new("/etc/x"));
    }
}
