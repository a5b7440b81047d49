//! Where state lives on disk (docs/ARCHITECTURE.md, "State and runtime layout") and the start-up sweep of staging leftovers.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Prefix of every staging directory; anything carrying it is unfinished work.
pub const STAGING_PREFIX: &str = ".staging-";

/// The state and runtime directories and the paths inside them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// `/var/lib/banger` by default.
    pub state_dir: PathBuf,
    /// `/run/banger` by default.
    pub runtime_dir: PathBuf,
}

impl Layout {
    /// A layout rooted at the two directories.
    pub fn new(state_dir: impl Into<PathBuf>, runtime_dir: impl Into<PathBuf>) -> Self {
        Layout {
            state_dir: state_dir.into(),
            runtime_dir: runtime_dir.into(),
        }
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
    /// `images/`, one directory per managed image id.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }
    /// `kernels/`, one directory per kernel name.
    pub fn kernels_dir(&self) -> PathBuf {
        self.state_dir.join("kernels")
    }
    /// `vms/`, one directory per VM id.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
    /// `snapshots/`, one directory per snapshot id (owner-only files: guest memory).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }
    /// `cache/oci/`, blobs by digest.
    pub fn oci_cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache").join("oci")
    }
    /// `/run/banger/scratch/`, where image trees are flattened when `/run` is tmpfs.
    pub fn scratch_dir(&self) -> PathBuf {
        self.runtime_dir.join("scratch")
    }
    /// `/run/banger/vms/<id>/`, a VM's pid files and logs (root's), and in `jail/` (its
    /// uid's) its sockets and initrd.
    pub fn vm_runtime_dir(&self, id: &str) -> PathBuf {
        self.vms_runtime_dir().join(id)
    }
    /// `/run/banger/machines/`, each running VM's control socket (`banger-<id>`, its
    /// machine name), open to every user as the daemon's own socket is.
    pub fn machines_dir(&self) -> PathBuf {
        self.runtime_dir.join("machines")
    }
    /// A VM's control socket (see `varlink::relay`).
    pub fn machine_socket(&self, id: &str) -> PathBuf {
        self.machines_dir().join(crate::model::machine_name(id))
    }
    /// The daemon's Varlink socket, `/run/banger/io.banger`.
    pub fn varlink_socket(&self) -> PathBuf {
        varlink_socket(&self.runtime_dir)
    }
    /// `/run/banger/vms/`, one directory per VM that ran since boot.
    pub fn vms_runtime_dir(&self) -> PathBuf {
        self.runtime_dir.join("vms")
    }

    /// The directories whose entries may be staging leftovers.
    fn staging_parents(&self) -> Vec<PathBuf> {
        vec![
            self.state_dir.clone(),
            self.images_dir(),
            self.kernels_dir(),
            self.vms_dir(),
            self.snapshots_dir(),
            self.oci_cache_dir(),
            // Partial blob downloads live beside the verified blobs.
            self.oci_cache_dir().join("sha256"),
            self.scratch_dir(),
        ]
    }

    /// Creates every directory (state is root-only: VM disks hold users' data).
    pub fn create(&self) -> Result<()> {
        let mut private = std::fs::DirBuilder::new();
        private.recursive(true).mode(0o700);
        for dir in self
            .staging_parents()
            .iter()
            .chain([&self.vms_runtime_dir()])
        {
            private
                .create(dir)
                .map_err(|e| Error::failed(format!("Cannot create {}", dir.display()), e))?;
        }
        let open = self.machines_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&open)
            .map_err(|e| Error::failed(format!("Cannot create {}", open.display()), e))?;
        Ok(())
    }

    /// Whether image trees of `expected` bytes should be flattened in the scratch directory:
    /// it is tmpfs (so the tree never touches the disk; only the ext4 does) and the tree
    /// takes at most a quarter of the memory available now.
    pub fn scratch_fits(&self, expected: u64) -> bool {
        is_tmpfs(&self.runtime_dir) && mem_available().is_some_and(|m| expected <= m / 4)
    }

    /// Removes every `.staging-*` entry left by a daemon that died mid-operation, returning
    /// what it removed. Runs before the bus name is taken, so nothing can be staging yet.
    pub fn sweep_staging(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for parent in self.staging_parents() {
            let entries = match std::fs::read_dir(&parent) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::failed(
                        format!("Cannot list {}", parent.display()),
                        e,
                    ))
                }
            };
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(STAGING_PREFIX)
                {
                    remove_any(&entry.path())?;
                    removed.push(entry.path());
                }
            }
        }
        Ok(removed)
    }
}

/// The Varlink socket's name in the runtime directory (and bangerd.socket's
/// `FileDescriptorName`).
pub const VARLINK_SOCKET: &str = "io.banger";

/// The daemon's Varlink socket in `runtime_dir`.
pub fn varlink_socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(VARLINK_SOCKET)
}

/// Removes the directories in `dir` no row names (`live`): what a publish that renamed its
/// files into place, or a delete that removed its row, left when the daemon died between the
/// two steps. Publication renames files into place before the row is inserted, and deletion
/// removes the row before the files, so a directory without a row is never in use. Names
/// starting with `.` (staging) are `sweep_staging`'s. Returns the names removed.
pub fn sweep_orphans(dir: &Path, live: &std::collections::BTreeSet<String>) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::failed(format!("Cannot list {}", dir.display()), e)),
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || name.starts_with('.') || live.contains(&name) {
            continue;
        }
        remove_any(&entry.path())?;
        removed.push(name);
    }
    Ok(removed)
}

fn is_tmpfs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is valid before the call fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid statfs to fill.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type == libc::TMPFS_MAGIC
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A staging directory, removed when dropped unless its work was kept (published). A daemon
/// killed mid-operation leaves it behind for the start-up sweep.
pub struct StagingDir {
    path: Option<PathBuf>,
}

impl StagingDir {
    /// Creates `path`.
    pub fn create(path: PathBuf) -> Result<Self> {
        std::fs::create_dir(&path)
            .map_err(|e| Error::failed(format!("Cannot create {}", path.display()), e))?;
        Ok(StagingDir { path: Some(path) })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a staging path is set until kept")
    }

    /// Keeps what is there: the caller moved or published it.
    pub fn keep(&mut self) {
        self.path = None;
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let Some(p) = self.path.take() else {
            return;
        };
        // The tree is gone when the drop returns (a job that ends has left nothing), but a
        // big one must not hold an async worker while it goes: on the daemon's runtime the
        // worker hands its other tasks on first (`block_in_place`). Elsewhere (a blocking
        // thread, a current-thread runtime, unwinding) it is removed in place.
        let remove = || {
            let _ = remove_any(&p);
        };
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker && !std::thread::panicking() {
            tokio::task::block_in_place(remove);
        } else {
            remove();
        }
    }
}

/// Removes a file or a whole tree without following symlinks.
pub fn remove_any(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::failed(
                format!("Cannot inspect {}", path.display()),
                e,
            ))
        }
    };
    let res = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    res.map_err(|e| Error::failed(format!("Cannot remove {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_dir_is_gone_when_its_drop_returns_on_any_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = |name: &str| {
            let d = StagingDir::create(tmp.path().join(name)).unwrap();
            std::fs::create_dir_all(d.path().join("tree/var")).unwrap();
            std::fs::write(d.path().join("tree/var/f"), b"x").unwrap();
            d
        };
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (a, b) = (staged("a"), staged("b"));
        multi.block_on(async move {
            // On a worker, and on a blocking thread of the same runtime.
            tokio::spawn(async move { drop(a) }).await.unwrap();
            tokio::task::spawn_blocking(move || drop(b)).await.unwrap();
        });
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let c = staged("c");
        current.block_on(async move { drop(c) });
        drop(staged("d"));
        for n in ["a", "b", "c", "d"] {
            assert!(!tmp.path().join(n).exists(), "{n} is still there");
        }
    }

    #[test]
    fn sweep_removes_only_staging_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("state"), tmp.path().join("run"));
        layout.create().unwrap();
        let stale = layout.images_dir().join(".staging-abc");
        std::fs::create_dir_all(stale.join("tree/deep")).unwrap();
        std::fs::create_dir_all(layout.oci_cache_dir().join("sha256")).unwrap();
        let stale_file = layout.oci_cache_dir().join("sha256/.staging-blob");
        std::fs::write(&stale_file, b"partial").unwrap();
        let kept = layout.images_dir().join("0123456789abcdef");
        std::fs::create_dir_all(&kept).unwrap();

        let mut removed = layout.sweep_staging().unwrap();
        removed.sort();
        let mut expected = vec![stale.clone(), stale_file.clone()];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(!stale.exists() && !stale_file.exists());
        assert!(kept.exists());
    }

    #[test]
    fn remove_any_does_not_follow_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("precious");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("f"), b"x").unwrap();
        let link = tmp.path().join(".staging-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove_any(&link).unwrap();
        assert!(target.join("f").exists());
    }
}
