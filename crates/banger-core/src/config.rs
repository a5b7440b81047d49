//! `/etc/banger/config.toml`: what an operator may set. Unknown keys are an error, so a typo
//! never silently falls back to a default.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The guests' subnet unless configured; it moves to a free /24 when the host routes it.
pub const DEFAULT_SUBNET: &str = "172.30.99.0/24";

/// `tcg_cache_mib` unless configured (see BENCHMARKS.md, "TCG translation cache").
pub const DEFAULT_TCG_CACHE_MIB: u32 = 64;

/// The longest `guest_kernel_args` (x86's kernel command line holds 2048 bytes, banger's
/// own arguments and a VM's shares take the rest).
pub const MAX_GUEST_KERNEL_ARGS: usize = 512;

/// Which VMM drives the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// Firecracker when its binary and a usable `/dev/kvm` exist, else QEMU.
    Auto,
    /// Always QEMU microvm.
    Qemu,
    /// Always Firecracker.
    Firecracker,
}

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and the host is not itself a VM (nested KVM often cannot
    /// boot a stock kernel), else TCG.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// The daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seconds without calls or running jobs before the daemon exits; 0 = never.
    pub idle_exit_sec: u64,
    /// The VMM choice.
    pub vmm: VmmChoice,
    /// The image `vm run`/`CreateVM` use when none is named.
    pub default_image: String,
    /// The kernel used when neither the caller nor the image names one.
    pub default_kernel: String,
    /// Pull a missing image named in `CreateVM` from the catalog or a registry.
    pub auto_pull_image: bool,
    /// Keep a ready snapshot of each image+kernel+vCPUs+memory a VM was booted with, made by
    /// a template VM of banger's own, and start later VMs of that shape from it (`cold`
    /// boots instead).
    pub warm_snapshots: bool,
    /// Pull a missing catalog kernel when an image or VM needs it.
    pub auto_pull_kernel: bool,
    /// The most an image's layers may expand to, in bytes (a decompression bomb stops here).
    pub max_image_bytes: u64,
    /// Where the static guest binaries (`banger-init`, `banger-agent`) are; by default the
    /// daemon's own directory, else `/usr/lib/banger`.
    pub guest_bin_dir: Option<std::path::PathBuf>,
    /// QEMU's accelerator.
    pub accel: Accel,
    /// QEMU's TCG translation cache per VM, in MiB (its `tb-size`): what a VM under TCG may
    /// hold of translated guest code.
    pub tcg_cache_mib: u32,
    /// The same for a VM restored from a snapshot (warm starts, forks, restores), which
    /// translates only what runs after the restore; `tcg_cache_mib` unless set. Smaller saves
    /// memory per idle VM and costs it CPU (BENCHMARKS.md, "Restored VMs' TCG cache").
    pub tcg_restore_cache_mib: Option<u32>,
    /// Give VMs a virtio-balloon with free page reporting: memory a guest frees goes back to
    /// the host within seconds (QEMU and Firecracker).
    pub free_page_reporting: bool,
    /// Once a cold-booted VM's guest is up, move its memory to a file it maps copy-on-write,
    /// restored into a fresh VMM (QEMU; stage `move_memory`): the host then holds what the guest
    /// touches after its boot, and TCG's cache only what runs after it.
    pub move_memory_after_boot: bool,
    /// Let the host merge identical pages of guests' memory (KSM, when the host runs it).
    /// Off by default: merged pages make a timing side channel between VMs.
    pub memory_merge: bool,
    /// Let QEMU back guest memory and TCG's translation cache with transparent huge pages
    /// where the host's THP setting offers them (QEMU asks for them): fewer TLB misses under
    /// KVM, but every 2 MiB a guest or TCG touches is then resident whole. Off by default
    /// (banger's VMMs run with THP disabled; Firecracker's always).
    pub huge_pages: bool,
    /// Arguments every guest's kernel gets on its command line besides banger's own (such as
    /// `initcall_blacklist=tracer_init_tracefs`): printable ASCII, at most
    /// [`MAX_GUEST_KERNEL_ARGS`] bytes, no quotes, none of banger's (`banger.*`, `init=`,
    /// `rdinit=`, `--`). Part of a warm snapshot's key: a change boots new templates.
    pub guest_kernel_args: String,
    /// The guests' IPv4 subnet (CIDR); the first host address is the gateway.
    pub subnet: String,
    /// Seconds a boot may take until the guest agent answers.
    pub boot_timeout_sec: u64,
    /// Kernels the operator adds to the catalog (`[[kernel_catalog]]`): bundles.
    pub kernel_catalog: Vec<crate::bundle::CatalogEntry>,
    /// Images the operator adds to the catalog (`[[image_catalog]]`): bundles or OCI refs.
    pub image_catalog: Vec<crate::bundle::CatalogEntry>,
    /// The most a caller's kernel or initrd file may be, and a kernel may decompress to.
    pub max_kernel_bytes: u64,
    /// The most vCPUs one VM may have; unset: the host's CPUs.
    pub max_vcpus: Option<u32>,
    /// The most memory one VM may have, in MiB; unset: the host's RAM less a reserve.
    pub max_memory_mib: Option<u32>,
    /// The largest root disk one VM may ask for, in bytes.
    pub max_disk_size: u64,
    /// How many VMs one uid may own.
    pub max_vms_per_user: u32,
    /// How many VMs of one uid may start or run at once.
    pub max_running_vms_per_user: u32,
    /// The most memory (MiB) one uid's running VMs may have together; unset: three quarters
    /// of the host's RAM.
    pub max_memory_mib_per_user: Option<u32>,
    /// The most vCPUs one uid's running VMs may have together; unset: eight per host CPU.
    pub max_vcpus_per_user: Option<u32>,
    /// The most disk (bytes) one uid's images, kernels, snapshots and VMs may take; checked
    /// when one is made. Unset: three quarters of the filesystem holding the state.
    pub max_disk_size_per_user: Option<u64>,
    /// How many jobs that make something on disk (pulls, builds, kernel pulls, new VMs,
    /// snapshots) one uid may run at once: the disk quota is checked as each starts, so this
    /// bounds what running ones may add past it.
    pub max_jobs_per_user: u32,
    /// Destinations guests may reach although they are link-local, private or shared
    /// ranges (CIDRs such as `10.1.2.0/24`); everything else of those ranges is dropped.
    pub allow_egress: Vec<String>,
    /// Registry credentials the daemon uses when a pull brings none (containers-auth.json
    /// format: `auths` → `auth`).
    pub auth_file: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            idle_exit_sec: 60,
            vmm: VmmChoice::Auto,
            default_image: "debian-bookworm".into(),
            default_kernel: "debian".into(),
            auto_pull_image: true,
            warm_snapshots: true,
            auto_pull_kernel: true,
            max_image_bytes: 32 << 30,
            guest_bin_dir: None,
            accel: Accel::Auto,
            tcg_cache_mib: DEFAULT_TCG_CACHE_MIB,
            tcg_restore_cache_mib: None,
            free_page_reporting: true,
            move_memory_after_boot: true,
            memory_merge: false,
            huge_pages: false,
            guest_kernel_args: String::new(),
            subnet: DEFAULT_SUBNET.into(),
            boot_timeout_sec: 300,
            kernel_catalog: Vec::new(),
            image_catalog: Vec::new(),
            max_kernel_bytes: 512 << 20,
            max_vcpus: None,
            max_memory_mib: None,
            max_disk_size: 256 << 30,
            max_vms_per_user: 64,
            max_running_vms_per_user: 16,
            max_memory_mib_per_user: None,
            max_vcpus_per_user: None,
            max_disk_size_per_user: None,
            max_jobs_per_user: 8,
            allow_egress: Vec::new(),
            auth_file: "/etc/banger/auth.json".into(),
        }
    }
}

impl Config {
    /// The path of a static guest binary such as `banger-init`: `guest_bin_dir`'s, else the
    /// daemon's own directory's if it is static there (a stale dynamic build next to the
    /// daemon must not end up in a guest), else `/usr/lib/banger`'s.
    pub fn guest_binary(&self, name: &str) -> std::path::PathBuf {
        if let Some(d) = &self.guest_bin_dir {
            return d.join(name);
        }
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join(name)));
        match sibling {
            Some(p)
                if std::fs::read(&p)
                    .map(|b| crate::host::is_static_elf(&b))
                    .unwrap_or(false) =>
            {
                p
            }
            _ => std::path::Path::new("/usr/lib/banger").join(name),
        }
    }

    /// `banger-init` and `banger-agent`: what every VM's initrd carries appended
    /// (`kernels::initrd::current`), named by these files as they are.
    pub fn initrd_binaries(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (
            self.guest_binary("banger-init"),
            self.guest_binary("banger-agent"),
        )
    }

    /// Whether `subnet` is the default, which may move aside when the host uses it.
    pub fn subnet_is_default(&self) -> bool {
        self.subnet == DEFAULT_SUBNET
    }

    /// The subnet's network address and prefix length.
    pub fn subnet(&self) -> Result<(std::net::Ipv4Addr, u8)> {
        let bad = || {
            Error::InvalidArgument(format!(
                "subnet {:?} is not an IPv4 CIDR such as 172.30.99.0/24 (prefix 16 to 29)",
                self.subnet
            ))
        };
        let (a, p) = self.subnet.split_once('/').ok_or_else(bad)?;
        let a: std::net::Ipv4Addr = a.parse().map_err(|_| bad())?;
        let p: u8 = p.parse().map_err(|_| bad())?;
        if !(16..=29).contains(&p) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - p);
        Ok((std::net::Ipv4Addr::from(u32::from(a) & mask), p))
    }

    /// The gateway (first host address) and the addresses guests may lease, in order.
    pub fn address_pool(&self) -> Result<(std::net::Ipv4Addr, Vec<std::net::Ipv4Addr>)> {
        let (net, p) = self.subnet()?;
        let base = u32::from(net);
        let size = 1u32 << (32 - p);
        let gateway = std::net::Ipv4Addr::from(base + 1);
        let pool = (base + 2..base + size - 1)
            .map(std::net::Ipv4Addr::from)
            .collect();
        Ok((gateway, pool))
    }

    /// Parses a configuration text.
    pub fn parse(text: &str) -> Result<Self> {
        let c: Config = toml::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("Invalid configuration: {e}")))?;
        c.check_catalogs()?;
        c.allowed_egress()?;
        c.check_guest_kernel_args()?;
        for (name, mib) in [
            ("tcg_cache_mib", Some(c.tcg_cache_mib)),
            ("tcg_restore_cache_mib", c.tcg_restore_cache_mib),
        ] {
            if let Some(mib) = mib.filter(|m| !(8..=4096).contains(m)) {
                return Err(Error::InvalidArgument(format!(
                    "Invalid configuration: {name} = {mib} is outside 8..=4096 (MiB of \
                     translated code per VM under TCG)"
                )));
            }
        }
        Ok(c)
    }

    /// `guest_kernel_args` without the spaces around them; `None` where there are none.
    pub fn kernel_args(&self) -> Option<&str> {
        Some(self.guest_kernel_args.trim()).filter(|a| !a.is_empty())
    }

    /// `guest_kernel_args` may add to a guest's command line but never change what banger's
    /// boot depends on: its init and its own arguments run as banger wrote them.
    fn check_guest_kernel_args(&self) -> Result<()> {
        let args = &self.guest_kernel_args;
        let refuse = |why: String| {
            Err(Error::InvalidArgument(format!(
                "Invalid configuration: guest_kernel_args {args:?} {why}"
            )))
        };
        if args.len() > MAX_GUEST_KERNEL_ARGS {
            return refuse(format!("is longer than {MAX_GUEST_KERNEL_ARGS} bytes"));
        }
        if let Some(c) = args.chars().find(|c| !(' '..='~').contains(c) || *c == '"') {
            return refuse(format!(
                "holds {c:?}: printable ASCII without quotes only (a quote would take banger's \
                 own arguments into its value)"
            ));
        }
        for word in args.split_whitespace() {
            let key = word.split('=').next().unwrap_or(word);
            if key.starts_with("banger.") || ["init", "rdinit", "--"].contains(&key) {
                return refuse(format!(
                    "names {key:?}, which is banger's own: its init must run with the \
                     arguments it wrote"
                ));
            }
        }
        Ok(())
    }

    /// `allow_egress`, parsed (CIDRs, no ports).
    pub fn allowed_egress(&self) -> Result<Vec<crate::net::walls::Egress>> {
        self.allow_egress
            .iter()
            .map(|e| crate::net::walls::Egress::parse(e, "allow_egress", false))
            .collect()
    }

    fn check_catalogs(&self) -> Result<()> {
        use crate::model::NameKind;
        let mut seen = std::collections::HashSet::new();
        for (entries, kind, oci, builtin) in [
            (
                &self.kernel_catalog,
                NameKind::Kernel,
                false,
                &["debian", "debian-generic"][..],
            ),
            (
                &self.image_catalog,
                NameKind::Image,
                true,
                &["debian-bookworm"][..],
            ),
        ] {
            for e in entries {
                e.validate(kind, oci)?;
                if builtin.contains(&e.name.as_str())
                    || !seen.insert((kind.to_string(), e.name.clone()))
                {
                    return Err(Error::InvalidArgument(format!(
                        "Catalog {kind} {:?} is defined twice (or shadows the built-in one)",
                        e.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The operator's catalog entry for kernel `name`.
    pub fn kernel_entry(&self, name: &str) -> Option<&crate::bundle::CatalogEntry> {
        self.kernel_catalog.iter().find(|e| e.name == name)
    }

    /// The operator's catalog entry for image `name`.
    pub fn image_entry(&self, name: &str) -> Option<&crate::bundle::CatalogEntry> {
        self.image_catalog.iter().find(|e| e.name == name)
    }

    /// Loads `path`; a missing file means defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| {
                Error::InvalidArgument(format!("{}: {e}; fix the file and restart", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(Error::failed(format!("Cannot read {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.idle_exit_sec, 60);
        assert_eq!(c.vmm, VmmChoice::Auto);
    }

    #[test]
    fn keys_override_and_unknown_keys_fail() {
        let c = Config::parse("idle_exit_sec = 0\nvmm = \"qemu\"\n").unwrap();
        assert_eq!(c.idle_exit_sec, 0);
        assert_eq!(c.vmm, VmmChoice::Qemu);
        let err = Config::parse("idle_exit = 3").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn memory_settings_default_and_bound() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.tcg_cache_mib, DEFAULT_TCG_CACHE_MIB);
        assert!(c.free_page_reporting && !c.memory_merge && !c.huge_pages);
        let c =
            Config::parse("tcg_cache_mib = 128\nmemory_merge = true\nhuge_pages = true").unwrap();
        assert_eq!(
            (c.tcg_cache_mib, c.memory_merge, c.huge_pages),
            (128, true, true)
        );
        for bad in [
            "tcg_cache_mib = 0",
            "tcg_cache_mib = 100000",
            "tcg_restore_cache_mib = 4",
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(e.contains("outside 8..=4096"), "{bad}: {e}");
        }
    }

    #[test]
    fn guest_kernel_args_add_to_a_guests_command_line_but_never_replace_banger_s_own() {
        let c = Config::parse(
            "guest_kernel_args = \" initcall_blacklist=tracer_init_tracefs mitigations=off \"",
        )
        .unwrap();
        assert_eq!(
            c.kernel_args(),
            Some("initcall_blacklist=tracer_init_tracefs mitigations=off")
        );
        assert_eq!(Config::parse("").unwrap().kernel_args(), None);
        assert_eq!(
            Config::parse("guest_kernel_args = \"  \"")
                .unwrap()
                .kernel_args(),
            None
        );
        let long = format!(
            "guest_kernel_args = \"{}\"",
            "a".repeat(MAX_GUEST_KERNEL_ARGS + 1)
        );
        for (bad, says) in [
            ("banger.init=sh", "banger's own"),
            ("quiet banger.hostname=x", "banger's own"),
            ("init=/bin/sh", "banger's own"),
            ("rdinit=/bin/sh", "banger's own"),
            ("loglevel=3 -- x", "banger's own"),
            ("foo=\\\"a", "without quotes"),
            ("a\\nb", "printable ASCII"),
            ("caf\\u00e9", "printable ASCII"),
        ] {
            let e = Config::parse(&format!("guest_kernel_args = \"{bad}\""))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("guest_kernel_args") && e.contains(says),
                "{bad}: {e}"
            );
        }
        let e = Config::parse(&long).unwrap_err().to_string();
        assert!(e.contains("longer than 512"), "{e}");
    }

    #[test]
    fn subnet_gives_a_gateway_and_a_pool() {
        let c = Config::parse("subnet = \"10.9.8.77/29\"").unwrap();
        let (gw, pool) = c.address_pool().unwrap();
        assert_eq!(gw.to_string(), "10.9.8.73");
        assert_eq!(pool.len(), 5);
        assert_eq!(pool[0].to_string(), "10.9.8.74");
        assert_eq!(pool[4].to_string(), "10.9.8.78");
        for bad in ["10.0.0.0", "10.0.0.0/8", "10.0.0/24", "x/24"] {
            let c = Config::parse(&format!("subnet = \"{bad}\"")).unwrap();
            assert!(c.address_pool().is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_file_is_defaults_unless_required() {
        let p = Path::new("/nonexistent/banger.toml");
        assert!(Config::load(p, false).is_ok());
        assert!(Config::load(p, true).is_err());
    }
}
