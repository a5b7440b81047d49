//! `stats`: what the guest uses, as its own kernel counts it (`/proc/stat`, `/proc/meminfo`,
//! `statvfs` of `/`), the figures E2B's envd reports as a sandbox's metrics.

use std::io;
use std::time::Duration;

use super::Stats;

/// How long CPU use is sampled over.
const WINDOW: Duration = Duration::from_millis(100);

/// Samples the guest now (blocks for [`WINDOW`]).
pub fn sample() -> io::Result<Stats> {
    let before = cpu_times(&std::fs::read_to_string("/proc/stat")?)?;
    std::thread::sleep(WINDOW);
    let stat = std::fs::read_to_string("/proc/stat")?;
    let after = cpu_times(&stat)?;
    let (user, system) = user_system(&stat);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let usec = |jiffies: u64| jiffies.saturating_mul(1_000_000) / hz;
    let mem = meminfo(&std::fs::read_to_string("/proc/meminfo")?);
    let (disk_total, disk_used) = disk("/")?;
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    Ok(Stats {
        cpu_count: online.max(1) as u32,
        cpu_used_pct: busy_pct(before, after),
        mem_total: mem.0,
        mem_used: mem.0.saturating_sub(mem.1),
        mem_cache: mem.2,
        disk_total,
        disk_used,
        cpu_usage_usec: usec(after.0),
        cpu_user_usec: usec(user),
        cpu_system_usec: usec(system),
        pids: std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                    .count() as u64
            })
            .unwrap_or(0),
    })
}

/// The `cpu` line's user (user + nice) and system (system + irq + softirq) jiffies.
fn user_system(stat: &str) -> (u64, u64) {
    let v: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|f| f.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    (at(0) + at(1), at(2) + at(5) + at(6))
}

/// The `cpu` line of `/proc/stat`: (busy, total) jiffies, iowait counted idle.
fn cpu_times(stat: &str) -> io::Result<(u64, u64)> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest and guest_nice are in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle.min(total), total))
}

fn busy_pct((b0, t0): (u64, u64), (b1, t1): (u64, u64)) -> f64 {
    let dt = t1.saturating_sub(t0);
    if dt == 0 {
        return 0.0;
    }
    let pct = b1.saturating_sub(b0) as f64 * 100.0 / dt as f64;
    (pct * 100.0).round() / 100.0
}

/// The guest's CPUs online and memory (`MemTotal`, bytes), without sampling.
pub fn shape() -> (u32, u64) {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let total = meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default()).0;
    (online.max(1) as u32, total)
}

/// (`MemTotal`, `MemAvailable`, `Cached`) in bytes.
fn meminfo(text: &str) -> (u64, u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("MemTotal"), field("MemAvailable"), field("Cached"))
}

/// (size, used) of the filesystem at `path`, in bytes.
fn disk(path: &str) -> io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path).map_err(io::Error::other)?;
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    let total = s.f_blocks as u64 * unit;
    Ok((total, total.saturating_sub(s.f_bfree as u64 * unit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_is_busy_jiffies_over_all_in_the_window() {
        let a = cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, (150, 1000));
        let b = cpu_times("cpu  130 0 70 930 70 0 0 0 0 0\n").unwrap();
        assert_eq!(busy_pct(a, b), 25.0);
        assert_eq!(busy_pct(a, a), 0.0);
        assert!(cpu_times("intr 1 2\n").is_err());
        assert_eq!(user_system("cpu  100 5 50 800 50 3 2 0 0 0\n"), (105, 55));
    }

    #[test]
    fn memory_is_read_in_bytes_from_meminfo() {
        let m = "MemTotal:        1000 kB\nMemFree:   100 kB\nMemAvailable:     400 kB\nCached:  250 kB\n";
        assert_eq!(meminfo(m), (1_024_000, 409_600, 256_000));
        assert_eq!(meminfo(""), (0, 0, 0));
    }
}
