//! The system test: the built `.deb` installed into a Debian bookworm booted with systemd in
//! `systemd-nspawn` (its own network namespace), where `tests/system/inside.sh` checks bus
//! activation through `SystemdService=`, `Type=notify`, the journal's fields, polkit for an
//! authorised and an unauthorised uid, a VM in its own scope and registered with machined
//! that outlives the daemon's idle exit and is re-adopted, and a clean purge. The
//! container's exit status is the verdict.
//!
//! The container's root (debootstrap of bookworm with systemd, dbus, polkitd, machined and
//! banger's dependencies) is cached under `target/test-cache/`; each run boots it with
//! `--volatile=overlay`, so runs never see each other's changes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const PACKAGES: &str = "systemd,systemd-sysv,dbus,polkitd,libpam-systemd,systemd-container,\
     e2fsprogs,iproute2,nftables,qemu-system-x86,qemu-utils,openssh-client,util-linux,kmod,\
     xz-utils,procps,socat";

fn cache() -> PathBuf {
    repo().join("target/test-cache")
}

/// The bookworm root with systemd and banger's dependencies, made once.
fn container_root() -> PathBuf {
    let root = cache().join("nspawn-bookworm-2");
    if root.join("usr/lib/systemd/systemd").exists() {
        return root;
    }
    let staging = cache().join(".staging-nspawn-bookworm-2");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    let mirror = banger::images::host_mirror().expect("a Debian mirror in the host's apt sources");
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(&staging)
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "debootstrap: {}", text(&out));
    // Nothing in the container may start a VM or a getty on its own.
    let _ = std::fs::remove_file(
        staging.join("etc/systemd/system/getty.target.wants/getty@tty1.service"),
    );
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&staging, &root).unwrap();
    root
}

/// The `.deb` tests/run built (`BANGER_TEST_DEB`), else a fresh build.
fn deb() -> PathBuf {
    if let Ok(p) = std::env::var("BANGER_TEST_DEB") {
        return PathBuf::from(p);
    }
    let out = Command::new(repo().join("packaging/build-deb.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "build-deb: {}", text(&out));
    repo().join(String::from_utf8_lossy(&out.stdout).trim())
}

/// A busybox root filesystem whose init idles (banger-init adds the agent).
fn tiny_rootfs(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    for d in ["bin", "sbin", "etc", "root", "dev", "proc", "sys", "tmp"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", t.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "true", "sync", "poweroff"] {
        std::os::unix::fs::symlink("busybox", t.join("bin").join(a)).unwrap();
    }
    std::os::unix::fs::symlink("/bin/busybox", t.join("sbin/init")).unwrap();
    std::fs::write(t.join("etc/inittab"), "::sysinit:/bin/true\n").unwrap();
    let img = dir.join("tiny.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-E", "root_owner=0:0", "-d"])
        .arg(&t)
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4");
    img
}

#[test]
fn the_package_works_under_systemd_activation_polkit_machined_and_idle_exit() {
    if !available(&[
        "systemd-nspawn",
        "debootstrap",
        "dpkg-deb",
        "mkfs.ext4",
        "busybox",
    ]) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    let root = container_root();
    let deb = deb();
    let share = tempfile::tempdir().unwrap();
    let s = share.path();
    std::fs::copy(&deb, s.join("banger.deb")).unwrap();
    std::fs::copy(&vmlinuz, s.join("vmlinuz")).unwrap();
    tiny_rootfs(s);
    std::fs::copy(repo().join("tests/system/inside.sh"), s.join("inside.sh")).unwrap();
    std::fs::write(
        s.join("banger-systemtest.service"),
        "[Unit]\nDescription=banger system test\nAfter=multi-user.target dbus.service\n\
         [Service]\nType=oneshot\nExecStart=/banger-test/inside.sh\n\
         StandardOutput=journal+console\nStandardError=journal+console\n",
    )
    .unwrap();

    std::fs::create_dir(s.join("modules")).unwrap();
    let out = Command::new("timeout")
        .args([
            "--kill-after=10",
            "900",
            "systemd-nspawn",
            "--quiet",
            "-b",
            "-D",
        ])
        .arg(&root)
        .args([
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
            "--machine=banger-systemtest",
        ])
        .arg(format!("--bind-ro={}:/banger-test", s.display()))
        .arg(format!(
            "--bind-ro={}:/banger-test/modules",
            modules.display()
        ))
        .arg(format!(
            "--bind-ro={}:/etc/systemd/system/banger-systemtest.service",
            s.join("banger-systemtest.service").display()
        ))
        .arg("--bind=/dev/net/tun")
        .arg("--property=DeviceAllow=/dev/net/tun rwm")
        .args([
            "systemd.wants=banger-systemtest.service",
            "systemd.mask=getty.target",
            "systemd.mask=console-getty.service",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = text(&out);
    let verdict: Vec<&str> = log.lines().filter(|l| l.contains("systemtest:")).collect();
    for line in &verdict {
        eprintln!("{line}");
    }
    assert!(
        out.status.success(),
        "the container exited {:?}:\n{log}",
        out.status.code()
    );
    assert!(
        verdict.iter().any(|l| l.contains("systemtest: exit 0")),
        "{log}"
    );
}
