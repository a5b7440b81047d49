//! `io.containerd.cgroups.v2.Metrics`, the cgroup v2 statistics containerd's clients decode
//! (kubelet's, `ctr task metrics`) on hosts whose cgroups are unified. The crates this shim
//! builds on carry only the v1 types, so the few fields a VM has figures for are written
//! here, by their numbers in containerd's `cgroup2/stats/metrics.proto`.

/// The metrics' type URL.
pub const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// What the VM's guest counts, as cgroup v2 reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// `pids.current`.
    pub pids: u64,
    /// `cpu.usage_usec`, `cpu.user_usec`, `cpu.system_usec`.
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// `memory.usage`, `memory.usage_limit`, and of the usage the page cache (`file`).
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub memory_file: u64,
}

impl Metrics {
    /// The message's protobuf encoding (proto3: zero fields left out).
    pub fn encode(&self) -> Vec<u8> {
        let mut pids = Vec::new();
        uint(&mut pids, 1, self.pids);
        let mut cpu = Vec::new();
        uint(&mut cpu, 1, self.cpu_usage_usec);
        uint(&mut cpu, 2, self.cpu_user_usec);
        uint(&mut cpu, 3, self.cpu_system_usec);
        let mut memory = Vec::new();
        uint(&mut memory, 2, self.memory_file);
        uint(&mut memory, 32, self.memory_usage);
        uint(&mut memory, 33, self.memory_limit);
        let mut out = Vec::new();
        message(&mut out, 1, &pids);
        message(&mut out, 2, &cpu);
        message(&mut out, 4, &memory);
        out
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A `uint64` field (wire type 0), left out when zero.
fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        varint(out, u64::from(field) << 3);
        varint(out, v);
    }
}

/// An embedded message (wire type 2).
fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    varint(out, (u64::from(field) << 3) | 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// Whether the host's cgroups are unified (v2), as the runc shim decides which metrics to
/// give: `/sys/fs/cgroup` is a cgroup2 filesystem.
pub fn host_is_unified() -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(path) = std::ffi::CString::new("/sys/fs/cgroup") else {
        return false;
    };
    // SAFETY: statfs is plain data, valid all zero.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `s` outlives the call.
    let r = unsafe { libc::statfs(path.as_ptr(), &mut s) };
    r == 0 && s.f_type as i64 == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_written_by_their_numbers_and_zeroes_left_out() {
        let m = Metrics {
            pids: 3,
            cpu_usage_usec: 300,
            memory_usage: 1,
            ..Default::default()
        };
        assert_eq!(
            m.encode(),
            [
                0x0a, 2, 0x08, 3, // pids { current: 3 }
                0x12, 3, 0x08, 0xac, 0x02, // cpu { usage_usec: 300 }
                0x22, 3, 0x80, 0x02, 1, // memory { usage (32): 1 }
            ]
        );
    }
}
