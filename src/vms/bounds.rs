//! What one VM and one owner may take: per-VM vCPUs, memory and disk (defaults from the
//! host), per-owner VM counts. Every refusal is `LimitExceeded` naming the config key.

use super::error::limit;
use crate::config::Config;
use crate::Result;

/// Memory kept for the host when `max_memory_mib` is not set: a tenth of RAM, at least 512 MiB.
fn host_reserve_mib(total: u64) -> u64 {
    (total / 10).max(512)
}

/// The host's RAM in MiB (`MemTotal`).
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

/// The per-VM limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// `max_vcpus`, or the host's CPUs.
    pub vcpus: u32,
    /// `max_memory_mib`, or the host's RAM less a reserve.
    pub memory_mib: u64,
    /// `max_disk_size`.
    pub disk_size: u64,
}

impl VmLimits {
    /// The limits for this host and configuration.
    pub fn of(config: &Config) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mem = host_memory_mib();
        VmLimits {
            vcpus: config.max_vcpus.unwrap_or(cpus),
            memory_mib: config
                .max_memory_mib
                .map(u64::from)
                .unwrap_or_else(|| mem.saturating_sub(host_reserve_mib(mem)).max(128)),
            disk_size: config.max_disk_size,
        }
    }

    /// Refuses a VM shape over the limits.
    pub fn check(&self, vcpus: u32, memory_mib: u32, disk_size: Option<u64>) -> Result<()> {
        let over = |what: String, key: &str| {
            Err(limit(format!(
                "{what}; ask for less, or have the operator raise {key} in /etc/banger/config.toml"
            )))
        };
        if vcpus > self.vcpus {
            return over(
                format!("vcpus {vcpus} is over max_vcpus ({})", self.vcpus),
                "max_vcpus",
            );
        }
        if u64::from(memory_mib) > self.memory_mib {
            return over(
                format!(
                    "memory_mib {memory_mib} is over max_memory_mib ({})",
                    self.memory_mib
                ),
                "max_memory_mib",
            );
        }
        if let Some(d) = disk_size {
            if d > self.disk_size {
                return over(
                    format!("disk_size {d} is over max_disk_size ({})", self.disk_size),
                    "max_disk_size",
                );
            }
        }
        Ok(())
    }
}

/// The refusal when `uid` runs `running` VMs and may run `max`.
pub fn running_quota(uid: u32, running: u32, max: u32) -> Result<()> {
    quota(
        uid,
        "runs",
        running,
        max,
        "max_running_vms_per_user",
        "stop one (`banger vm stop NAME`)",
    )
}

/// The refusal when `uid` owns `owned` VMs and may own `max`.
pub fn owned_quota(uid: u32, owned: u32, max: u32) -> Result<()> {
    quota(
        uid,
        "owns",
        owned,
        max,
        "max_vms_per_user",
        "delete one (`banger vm delete NAME`)",
    )
}

fn quota(uid: u32, verb: &str, n: u32, max: u32, key: &str, fix: &str) -> Result<()> {
    if n >= max {
        return Err(limit(crate::model::quota_message(
            uid, verb, n, max, key, fix,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_names_its_key() {
        let l = VmLimits {
            vcpus: 2,
            memory_mib: 1000,
            disk_size: 1 << 30,
        };
        l.check(2, 1000, Some(1 << 30)).unwrap();
        for (r, key) in [
            (l.check(3, 512, None), "max_vcpus"),
            (l.check(1, 4_000_000, None), "max_memory_mib"),
            (l.check(1, 512, Some(2 << 30)), "max_disk_size"),
            (running_quota(1000, 2, 2), "max_running_vms_per_user"),
            (owned_quota(1000, 5, 5), "max_vms_per_user"),
        ] {
            let e = r.unwrap_err();
            assert!(
                e.kind() == crate::error::ErrorKind::LimitExceeded && e.to_string().contains(key),
                "{e}"
            );
        }
        running_quota(1000, 1, 2).unwrap();
    }

    #[test]
    fn defaults_come_from_the_host() {
        let l = VmLimits::of(&Config::default());
        assert!(l.vcpus >= 1);
        assert!(l.memory_mib >= 128 && l.memory_mib < host_memory_mib());
    }
}
