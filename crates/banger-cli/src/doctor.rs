//! `banger doctor`: what this host has, and what to install for what it lacks. Runs locally;
//! it needs no daemon.

use std::os::fd::AsRawFd;

use serde_json::json;

use super::Output;

/// One host check.
struct Check {
    name: &'static str,
    ok: bool,
    required: bool,
    detail: String,
}

pub use crate::host::find_program;

/// Whether `/dev/kvm` opens and answers KVM_GET_API_VERSION with the stable API (12).
fn kvm_usable() -> Result<(), String> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is open.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v == 12 {
        Ok(())
    } else {
        Err(format!("/dev/kvm answered API version {v}, expected 12"))
    }
}

/// The operator's `accel` setting, when the configuration is readable (else `auto`, the
/// default): doctor runs as the caller, and the daemon decides with this.
fn accel_setting() -> crate::config::Accel {
    let path = std::path::Path::new("/etc/banger/config.toml");
    crate::config::Config::load(path, false)
        .map(|c| c.accel)
        .unwrap_or(crate::config::Accel::Auto)
}

/// What VMs will run with, decided as the QEMU driver decides (`Qemu::uses_kvm`): a usable
/// `/dev/kvm` is not enough when this host is itself a VM, where `auto` picks TCG.
fn kvm_check(kvm: Result<(), String>, host_is_a_guest: bool, accel: crate::config::Accel) -> Check {
    use crate::config::Accel;
    let (ok, detail) = match (kvm, accel, host_is_a_guest) {
        (_, Accel::Tcg, _) => (
            false,
            "accel = \"tcg\" in /etc/banger/config.toml: VMs run under QEMU TCG (slower)".into(),
        ),
        (Ok(()), Accel::Kvm, _) => (true, "usable: VMs run with KVM (accel = \"kvm\")".into()),
        (Ok(()), Accel::Auto, false) => (true, "usable: VMs run with KVM".into()),
        (Ok(()), Accel::Auto, true) => (
            false,
            "/dev/kvm opens, but this host is itself a VM (nested KVM often hangs a guest \
             kernel): VMs run under QEMU TCG (slower); set accel = \"kvm\" in \
             /etc/banger/config.toml to use it anyway"
                .into(),
        ),
        (Err(e), Accel::Kvm, _) => (
            false,
            format!("{e}; accel = \"kvm\" is set, so VMs will fail to start: fix /dev/kvm or set accel = \"auto\""),
        ),
        (Err(e), _, _) => (false, format!("{e}; VMs run under QEMU TCG (slower)")),
    };
    Check {
        name: "kvm",
        ok,
        required: false,
        detail,
    }
}

fn program(name: &'static str, required: bool, install: &str) -> Check {
    match find_program(name) {
        Some(p) => Check {
            name,
            ok: true,
            required,
            detail: p.display().to_string(),
        },
        None => Check {
            name,
            ok: false,
            required,
            detail: format!("not found; install: {install}"),
        },
    }
}

/// Runs every check; fails when something required is missing.
pub fn run(out: &Output) -> anyhow::Result<()> {
    let kvm = kvm_usable();
    let qemu = program(
        "qemu-system-x86_64",
        false,
        "apt-get install qemu-system-x86",
    );
    let fc = program(
        "firecracker",
        false,
        "a Firecracker release binary in /usr/local/bin",
    );
    let vmm_ok = qemu.ok || (fc.ok && kvm.is_ok());
    let checks = vec![
        kvm_check(kvm, crate::vmm::qemu::host_is_a_guest(), accel_setting()),
        qemu,
        fc,
        Check {
            name: "vmm",
            ok: vmm_ok,
            required: true,
            detail: if vmm_ok {
                "a VMM can run".into()
            } else {
                "install qemu-system-x86".into()
            },
        },
        program("qemu-img", true, "apt-get install qemu-utils"),
        program("setsid", true, "apt-get install util-linux"),
        program("mkfs.ext4", true, "apt-get install e2fsprogs"),
        program("debugfs", true, "apt-get install e2fsprogs"),
        program("ip", true, "apt-get install iproute2"),
        program("nft", true, "apt-get install nftables"),
        program(
            "ssh-keygen",
            true,
            "apt-get install openssh-client (VM host keys)",
        ),
        program(
            "ssh",
            false,
            "apt-get install openssh-client (banger vm ssh / run)",
        ),
        program("depmod", false, "apt-get install kmod"),
        program(
            "debootstrap",
            false,
            "apt-get install debootstrap (for BuildImage)",
        ),
    ];
    let missing: Vec<&str> = checks
        .iter()
        .filter(|c| c.required && !c.ok)
        .map(|c| c.name)
        .collect();
    let rows = checks
        .iter()
        .map(|c| {
            let status = if c.ok {
                "ok"
            } else if c.required {
                "MISSING"
            } else if c.name == "kvm" {
                // Not missing: VMs run, under TCG.
                "unused"
            } else {
                "absent"
            };
            vec![
                json!(c.name),
                json!(status),
                json!(c.required),
                json!(c.detail),
            ]
        })
        .collect();
    out.table(
        &["CHECK", "STATUS", "REQUIRED", "DETAIL"],
        &["check", "status", "required", "detail"],
        rows,
    );
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "This host lacks {}: install what the table says",
            missing.join(", ")
        )
    }
}

#[cfg(test)]
mod kvm_tests {
    use super::kvm_check;
    use crate::config::Accel;

    #[test]
    fn the_kvm_line_says_what_vms_will_run_with() {
        let said = |kvm: Result<(), String>, guest, accel| {
            let c = kvm_check(kvm, guest, accel);
            (c.ok, c.detail)
        };
        let (ok, d) = said(Ok(()), false, Accel::Auto);
        assert!(ok && d.contains("VMs run with KVM"), "{d}");
        // The case root was told "kvm ok usable" while every VM ran under TCG.
        let (ok, d) = said(Ok(()), true, Accel::Auto);
        assert!(!ok && d.contains("itself a VM") && d.contains("TCG"), "{d}");
        let (ok, d) = said(Ok(()), true, Accel::Kvm);
        assert!(ok && d.contains("KVM"), "{d}");
        let (ok, d) = said(Err("/dev/kvm: No such file".into()), false, Accel::Auto);
        assert!(!ok && d.contains("TCG"), "{d}");
        let (ok, d) = said(Err("/dev/kvm: No such file".into()), false, Accel::Kvm);
        assert!(!ok && d.contains("fail to start"), "{d}");
        let (ok, d) = said(Ok(()), false, Accel::Tcg);
        assert!(!ok && d.contains("TCG"), "{d}");
    }
}
