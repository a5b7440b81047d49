//! Cgroups of the guest's own for what shares one VM (the containers of a pod): each
//! container's processes in `/sys/fs/cgroup/NAME` (cgroup v2, mounted by the agent when the
//! guest has not), so one container is frozen, measured and killed without the others, and
//! the guest kernel's OOM records name it (`task_memcg=/NAME`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Stats;

const ROOT: &str = "/sys/fs/cgroup";

/// What a `cgroup` request does to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop every process in it (the cgroup freezer), answered once all are stopped.
    Freeze,
    /// Let them run again.
    Thaw,
    /// What its processes use (reply `stats`: CPU time, memory, page cache, processes).
    Stats,
    /// Kill every process in it and remove it.
    Remove,
}

/// A cgroup name the agent makes: letters, digits and `._-`, not starting with a dot, at
/// most 128 bytes (a containerd id fits).
pub fn check(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{name:?} is not a cgroup name (letters, digits and ._-, at most 128)"
        )),
    }
}

fn path(name: &str) -> Result<PathBuf, String> {
    check(name)?;
    Ok(Path::new(ROOT).join(name))
}

fn write(file: &Path, what: &str) -> Result<(), String> {
    std::fs::write(file, what).map_err(|e| format!("{}: {e}", file.display()))
}

/// Cgroup `name`, made (with the hierarchy mounted and the CPU, memory and pids controllers
/// given to it) when missing: the file a process writes `0` to, to join it.
pub fn create(name: &str) -> Result<PathBuf, String> {
    let dir = path(name)?;
    if !Path::new(ROOT).join("cgroup.controllers").exists() {
        // SAFETY: NUL-terminated strings; no data.
        let r = unsafe {
            libc::mount(
                c"cgroup2".as_ptr(),
                c"/sys/fs/cgroup".as_ptr(),
                c"cgroup2".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!("mounting cgroup2 on {ROOT}: {e}"));
        }
    }
    // Each controller on its own: a kernel without one still gives the others.
    for c in ["+cpu", "+memory", "+pids"] {
        let _ = std::fs::write(Path::new(ROOT).join("cgroup.subtree_control"), c);
    }
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("{}: {e}", dir.display()))
        }
        _ => {}
    }
    Ok(dir.join("cgroup.procs"))
}

/// `key value` lines of a cgroup file, as a lookup.
fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn single(dir: &Path, file: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until `cgroup.events` says `key value`.
fn settle(dir: &Path, key: &str, value: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while keyed(dir, "cgroup.events", key) != Some(value) {
        if Instant::now() > deadline {
            return Err(format!("{}: not {key} {value} after 10 s", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Carries out `action` on cgroup `name`: the stats for [`Action::Stats`].
pub fn act(name: &str, action: Action) -> Result<Option<Stats>, String> {
    let dir = path(name)?;
    if !dir.is_dir() {
        return Err(format!("no cgroup {name} in the guest"));
    }
    match action {
        Action::Freeze | Action::Thaw => {
            let frozen = u64::from(action == Action::Freeze);
            write(&dir.join("cgroup.freeze"), &frozen.to_string())?;
            settle(&dir, "frozen", frozen)?;
            Ok(None)
        }
        Action::Stats => {
            let (cpus, memory) = super::stats::shape();
            Ok(Some(Stats {
                cpu_count: cpus,
                cpu_usage_usec: keyed(&dir, "cpu.stat", "usage_usec").unwrap_or(0),
                cpu_user_usec: keyed(&dir, "cpu.stat", "user_usec").unwrap_or(0),
                cpu_system_usec: keyed(&dir, "cpu.stat", "system_usec").unwrap_or(0),
                mem_used: single(&dir, "memory.current").unwrap_or(0),
                // `max` (no limit of its own) is the guest's memory.
                mem_total: single(&dir, "memory.max").unwrap_or(memory),
                mem_cache: keyed(&dir, "memory.stat", "file").unwrap_or(0),
                pids: single(&dir, "pids.current").unwrap_or(0),
                ..Default::default()
            }))
        }
        Action::Remove => {
            // A frozen cgroup's processes die of SIGKILL too.
            if write(&dir.join("cgroup.kill"), "1").is_err() {
                // Kernels before 5.14: each process, until none is left.
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill takes no pointers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            settle(&dir, "populated", 0)?;
            std::fs::remove_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_a_single_plain_component() {
        for good in ["a", "ctr-1.x_y", &"c".repeat(128)] {
            assert!(check(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"c".repeat(129)] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
