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
        Check {
            name: "kvm",
            ok: kvm.is_ok(),
            required: false,
            detail: match &kvm {
                Ok(()) => "usable".into(),
                Err(e) => format!("{e}; VMs run under QEMU TCG (slower)"),
            },
        },
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
