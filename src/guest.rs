//! What banger puts into every image (DESIGN.md "Guest"): the agent binary, a systemd unit
//! for it, a network bootstrap that takes the address from the kernel command line, and a
//! modules-load file for vsock. Written through in-root resolution, so an image's own
//! symlinks can never redirect them onto the host.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::oci::inroot::Root;
use crate::{Error, Result};

/// Where the agent lands in the guest.
pub const AGENT_PATH: &str = "usr/local/bin/banger-agent";

const AGENT_UNIT: &str = "\
[Unit]
Description=banger guest agent (port 1024 on its virtio-serial port or vsock)
After=systemd-modules-load.service banger-network.service

[Service]
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

const NETWORK_UNIT: &str = "\
[Unit]
Description=banger guest network from the kernel command line
DefaultDependencies=no
Before=network.target ssh.service
Wants=network.target

[Service]
Type=oneshot
ExecStart=/usr/local/lib/banger/network-setup
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

/// Applies `banger.ip=ADDR/PREFIX banger.gw=GW banger.dns=A,B banger.mac=MAC` from
/// /proc/cmdline, for kernels booted without banger's initrd (whose init has already done it).
const NETWORK_SETUP: &str = r#"#!/bin/sh
# banger network bootstrap: the host passes the guest's address on the kernel command line.
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        banger.ip=*) ip_addr="${arg#banger.ip=}" ;;
        banger.gw=*) gw="${arg#banger.gw=}" ;;
        banger.dns=*) dns="${arg#banger.dns=}" ;;
        banger.mac=*) mac="${arg#banger.mac=}" ;;
    esac
done
ip link set lo up
[ -n "$ip_addr" ] || exit 0
# banger-init configured it already.
ip -4 -o addr show | grep -q " inet ${ip_addr%/*}/" && exit 0
dev=eth0
for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && dev="${d##*/}"
done
set -e
ip link set "$dev" up
ip addr replace "$ip_addr" dev "$dev"
[ -z "$gw" ] || ip route replace default via "$gw"
if [ -n "$dns" ]; then
    rm -f /etc/resolv.conf
    for a in $(echo "$dns" | tr , ' '); do echo "nameserver $a"; done > /etc/resolv.conf
fi
exit 0
"#;

const SSH_KEYGEN_UNIT: &str = "\
[Unit]
Description=banger: fresh SSH host keys for this VM
Before=ssh.service
ConditionPathExists=/usr/bin/ssh-keygen
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
";

const MODULES: &str =
    "# banger: the guest agent talks over a virtio-serial port (QEMU) or vsock (Firecracker)\nvirtio_console\nvsock\nvmw_vsock_virtio_transport\nvirtio_net\n";

fn write_file(root: &Root, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let rel = Path::new(rel);
    let fail = |e: std::io::Error| {
        Error::failed(
            format!("Cannot inject /{} into the image", rel.display()),
            e,
        )
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    let (dir, _) = root.resolve_dir(parent, true).map_err(fail)?;
    let target = dir.join(rel.file_name().unwrap_or_default());
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target).map_err(fail)?,
        Ok(_) => std::fs::remove_file(&target).map_err(fail)?,
        Err(_) => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&target)
        .map_err(fail)?;
    f.write_all(data).map_err(fail)?;
    std::os::unix::fs::fchown(&f, Some(0), Some(0)).map_err(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(fail)?;
    Ok(())
}

fn enable(root: &Root, unit: &str) -> Result<()> {
    let wants = Path::new("etc/systemd/system/multi-user.target.wants");
    let fail = |e: std::io::Error| Error::failed(format!("Cannot enable {unit} in the image"), e);
    let (dir, _) = root.resolve_dir(wants, true).map_err(fail)?;
    let link = dir.join(unit);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), link).map_err(fail)
}

/// Writes the image's run settings where the guest's agent and init read them
/// ([`crate::model::ImageConfig::GUEST_PATH`]).
pub fn inject_config(tree: &Path, config: &crate::model::ImageConfig) -> Result<()> {
    let root = Root::create(tree).map_err(|e| Error::failed("Cannot open the image tree", e))?;
    write_file(
        &root,
        crate::model::ImageConfig::GUEST_PATH,
        config.to_json().as_bytes(),
        0o644,
    )
}

/// Injects the guest assets into `tree`, taking the agent binary from `agent`.
pub fn inject(tree: &Path, agent: &Path) -> Result<()> {
    let root = Root::create(tree).map_err(|e| Error::failed("Cannot open the image tree", e))?;
    let bin = std::fs::read(agent).map_err(|e| {
        Error::failed(
            format!("Cannot read the guest agent {}", agent.display()),
            e,
        )
    })?;
    write_file(&root, AGENT_PATH, &bin, 0o755)?;
    write_file(
        &root,
        "etc/systemd/system/banger-agent.service",
        AGENT_UNIT.as_bytes(),
        0o644,
    )?;
    write_file(
        &root,
        "etc/systemd/system/banger-network.service",
        NETWORK_UNIT.as_bytes(),
        0o644,
    )?;
    write_file(
        &root,
        "usr/local/lib/banger/network-setup",
        NETWORK_SETUP.as_bytes(),
        0o755,
    )?;
    write_file(
        &root,
        "etc/modules-load.d/banger.conf",
        MODULES.as_bytes(),
        0o644,
    )?;
    enable(&root, "banger-agent.service")?;
    write_file(
        &root,
        "etc/systemd/system/banger-ssh-keygen.service",
        SSH_KEYGEN_UNIT.as_bytes(),
        0o644,
    )?;
    enable(&root, "banger-network.service")?;
    enable(&root, "banger-ssh-keygen.service")?;
    // banger-init mounts the VM's work disk here; an image without it gets root's usual one.
    let (dir, created) = root
        .resolve_dir(Path::new("root"), true)
        .map_err(|e| Error::failed("Cannot create /root in the image", e))?;
    if !created.is_empty() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::failed("Cannot create /root in the image", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_land_inside_even_through_hostile_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(tree.join("usr/local")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An image whose /usr/local/bin points at a host path.
        std::os::unix::fs::symlink(&outside, tree.join("usr/local/bin")).unwrap();
        std::fs::create_dir_all(tree.join(outside.strip_prefix("/").unwrap())).unwrap();
        let agent = tmp.path().join("agent");
        std::fs::write(&agent, b"\x7fELF fake").unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // fchown to root needs root
        }
        inject(&tree, &agent).unwrap();
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "wrote onto the host"
        );
        let landed = tree
            .join(outside.strip_prefix("/").unwrap())
            .join("banger-agent");
        assert_eq!(
            std::fs::metadata(&landed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let wants = tree.join("etc/systemd/system/multi-user.target.wants/banger-agent.service");
        assert_eq!(
            std::fs::read_link(wants).unwrap(),
            Path::new("/etc/systemd/system/banger-agent.service")
        );
        assert!(tree.join("etc/modules-load.d/banger.conf").exists());
    }
}
