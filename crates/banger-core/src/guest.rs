//! What banger puts into every image (docs/ARCHITECTURE.md, "Binaries"): the agent binary, a systemd unit
//! for it, a network bootstrap that takes the address from the kernel command line, and a
//! modules-load file for vsock. Written through in-root resolution, so an image's own
//! symlinks can never redirect them onto the host.

use std::path::Path;

use crate::tree::{Meta, Tree};
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

fn write_file<T: Tree>(tree: &mut T, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    crate::tree::put_file(tree, rel, data, mode)
        .map_err(|e| Error::failed(format!("Cannot inject /{rel} into the image"), e))
}

/// Units of an image's systemd that a VM never needs and that cost every restored VM: the
/// login prompts on the virtual terminals (`getty@tty1`, and tty2–tty6 that Debian's
/// `getty-static` starts when the image has no logind). A VM has no screen or keyboard, so no
/// one can reach them; but each `agetty` redraws its prompt when an address changes (it
/// watches netlink for its issue file), which a restored VM's own address is, and under TCG
/// that translation filled the cache of a restored Debian VM from 24 to 72 MiB and took 1.1 s
/// of host CPU right after it was ready (measured against a snapshot of the same VM with the
/// prompts stopped). The serial console's prompt (`serial-getty@ttyS0`) stays: it costs 2 MiB
/// and `vm logs` shows it, as a boot's last line.
const MASKED: [&str; 2] = ["getty@.service", "getty-static.service"];

/// Masks `unit` (a link to /dev/null in /etc/systemd/system, as `systemctl mask` makes).
fn mask<T: Tree>(tree: &mut T, unit: &str) -> Result<()> {
    crate::tree::put_symlink(tree, &format!("etc/systemd/system/{unit}"), "/dev/null")
        .map_err(|e| Error::failed(format!("Cannot mask {unit} in the image"), e))
}

fn enable<T: Tree>(tree: &mut T, unit: &str) -> Result<()> {
    crate::tree::put_symlink(
        tree,
        &format!("etc/systemd/system/multi-user.target.wants/{unit}"),
        &format!("/etc/systemd/system/{unit}"),
    )
    .map_err(|e| Error::failed(format!("Cannot enable {unit} in the image"), e))
}

/// Writes the image's run settings where the guest's agent and init read them
/// ([`crate::model::ImageConfig::GUEST_PATH`]).
pub fn inject_config<T: Tree>(tree: &mut T, config: &crate::model::ImageConfig) -> Result<()> {
    write_file(
        tree,
        crate::model::ImageConfig::GUEST_PATH,
        config.to_json().as_bytes(),
        0o644,
    )
}

/// Injects the guest assets into `tree`, taking the agent binary from `agent`.
pub fn inject<T: Tree>(tree: &mut T, agent: &Path) -> Result<()> {
    let bin = std::fs::read(agent).map_err(|e| {
        Error::failed(
            format!("Cannot read the guest agent {}", agent.display()),
            e,
        )
    })?;
    write_file(tree, AGENT_PATH, &bin, 0o755)?;
    write_file(
        tree,
        "etc/systemd/system/banger-agent.service",
        AGENT_UNIT.as_bytes(),
        0o644,
    )?;
    write_file(
        tree,
        "etc/systemd/system/banger-network.service",
        NETWORK_UNIT.as_bytes(),
        0o644,
    )?;
    write_file(
        tree,
        "usr/local/lib/banger/network-setup",
        NETWORK_SETUP.as_bytes(),
        0o755,
    )?;
    write_file(
        tree,
        "etc/modules-load.d/banger.conf",
        MODULES.as_bytes(),
        0o644,
    )?;
    enable(tree, "banger-agent.service")?;
    write_file(
        tree,
        "etc/systemd/system/banger-ssh-keygen.service",
        SSH_KEYGEN_UNIT.as_bytes(),
        0o644,
    )?;
    enable(tree, "banger-network.service")?;
    enable(tree, "banger-ssh-keygen.service")?;
    for unit in MASKED {
        mask(tree, unit)?;
    }
    // banger-init mounts the VM's work disk here; an image without it gets root's usual one.
    let fail = |e| Error::failed("Cannot create /root in the image", e);
    let (_, created) = tree.resolve_dir(Path::new("root"), true).map_err(fail)?;
    if let Some((parent, name)) = created.last() {
        let meta = Meta {
            mode: 0o700,
            uid: 0,
            gid: 0,
            mtime: crate::tree::now(),
        };
        tree.set_meta(parent, name, meta).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        let mut t = crate::tree::HostTree::create(&tree, true).unwrap();
        inject(&mut t, &agent).unwrap();
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
        for unit in ["getty@.service", "getty-static.service"] {
            let link = tree.join("etc/systemd/system").join(unit);
            assert_eq!(std::fs::read_link(link).unwrap(), Path::new("/dev/null"));
        }
    }
}
