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
                format!("vcpus (--vcpus) {vcpus} is over max_vcpus ({})", self.vcpus),
                "max_vcpus",
            );
        }
        if u64::from(memory_mib) > self.memory_mib {
            return over(
                format!(
                    "memory_mib (--memory) {memory_mib} MiB is over max_memory_mib ({})",
                    self.memory_mib
                ),
                "max_memory_mib",
            );
        }
        if let Some(d) = disk_size {
            if d > self.disk_size {
                return over(
                    format!(
                        "disk_size (--disk-size) {d} is over max_disk_size ({})",
                        self.disk_size
                    ),
                    "max_disk_size",
                );
            }
        }
        Ok(())
    }
}

/// What one uid's VMs take: all of them, and those that start or run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// VMs owned.
    pub owned: u32,
    /// VMs starting, running, paused or stopping.
    pub active: u32,
    /// vCPUs of the active ones.
    pub vcpus: u32,
    /// Memory (MiB) of the active ones.
    pub memory_mib: u64,
}

/// The per-user quotas on what runs at once, from the configuration and the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunQuota {
    /// `max_running_vms_per_user`.
    pub vms: u32,
    /// `max_vcpus_per_user`, or eight per host CPU (vCPUs share cores well; memory is what
    /// runs out).
    pub vcpus: u32,
    /// `max_memory_mib_per_user`, or three quarters of the host's RAM.
    pub memory_mib: u64,
}

impl RunQuota {
    /// The quotas for this host and configuration.
    pub fn of(config: &Config) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        RunQuota {
            vms: config.max_running_vms_per_user,
            vcpus: config.max_vcpus_per_user.unwrap_or(cpus * 8),
            memory_mib: config
                .max_memory_mib_per_user
                .map(u64::from)
                .unwrap_or(host_memory_mib() * 3 / 4),
        }
    }

    /// Refuses one more running VM of `vcpus` and `memory_mib` for `uid`, who runs `u`
    /// already; the refusal names the quota and the user's use.
    pub fn check(&self, uid: u32, u: Usage, vcpus: u32, memory_mib: u32) -> Result<()> {
        running_quota(uid, u.active, self.vms)?;
        let fix = "stop one of your VMs (`banger vm stop NAME`) or have the operator raise";
        if u.vcpus + vcpus > self.vcpus {
            return Err(limit(format!(
                "uid {uid} runs VMs with {} vCPU(s); {vcpus} more would pass \
                 max_vcpus_per_user ({}); {fix} max_vcpus_per_user in /etc/banger/config.toml",
                u.vcpus, self.vcpus
            )));
        }
        if u.memory_mib + u64::from(memory_mib) > self.memory_mib {
            return Err(limit(format!(
                "uid {uid} runs VMs with {} MiB of memory; {memory_mib} MiB more would pass \
                 max_memory_mib_per_user ({}); {fix} max_memory_mib_per_user in \
                 /etc/banger/config.toml",
                u.memory_mib, self.memory_mib
            )));
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
        let q = RunQuota {
            vms: 4,
            vcpus: 4,
            memory_mib: 2048,
        };
        let u = Usage {
            owned: 2,
            active: 2,
            vcpus: 3,
            memory_mib: 1536,
        };
        q.check(1000, u, 1, 512).unwrap();
        let e = q.check(1000, u, 2, 256).unwrap_err().to_string();
        assert!(
            e.contains("max_vcpus_per_user (4)") && e.contains("with 3 vCPU"),
            "{e}"
        );
        let e = q.check(1000, u, 1, 1024).unwrap_err().to_string();
        assert!(
            e.contains("max_memory_mib_per_user (2048)") && e.contains("1536 MiB"),
            "{e}"
        );
    }

    #[test]
    fn defaults_come_from_the_host() {
        let l = VmLimits::of(&Config::default());
        assert!(l.vcpus >= 1);
        assert!(l.memory_mib >= 128 && l.memory_mib < host_memory_mib());
    }
}
