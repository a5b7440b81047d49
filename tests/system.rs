//! The system test: the built `.deb` installed into Debian booted with systemd in
//! `systemd-nspawn` (its own network namespace), twice, at once:
//!
//! - bookworm (systemd 252), where `tests/system/inside.sh` checks bus and socket activation
//!   through `SystemdService=` and `bangerd.socket`, `Type=notify`, the journal's fields,
//!   polkit for an authorised and an unauthorised uid, a VM in its own unit and registered
//!   with machined (over D-Bus) that outlives the daemon's idle exit and is re-adopted, its
//!   control socket, and a clean purge;
//! - sid (systemd ≥ 260), where `tests/system/sid.sh` checks that the VM is registered over
//!   Varlink with its control address and that `machinectl pause`, `resume`, `poweroff` and
//!   `terminate` act on it through that socket, with banger's polkit checks.
//!
//! Each container's exit status is its verdict. Their roots (debootstrap with systemd, dbus,
//! polkitd, machined and banger's dependencies) are cached under `target/test-cache/`; each
//! run boots one with `--volatile=overlay`, so runs never see each other's changes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const PACKAGES: &str = "systemd,systemd-sysv,dbus,polkitd,libpam-systemd,systemd-container,\
     e2fsprogs,iproute2,nftables,qemu-system-x86,qemu-utils,openssh-client,util-linux,kmod,\
     xz-utils,lz4,procps,socat,ca-certificates";

fn cache() -> PathBuf {
    repo().join("target/test-cache")
}

/// A Debian `suite`'s root with systemd and banger's dependencies (and `extra` packages),
/// made once as `name` for each list of packages (a new dependency makes a new root).
fn container_root(suite: &str, name: &str, extra: &str) -> PathBuf {
    let packages = <sha2::Sha256 as sha2::Digest>::digest(format!("{PACKAGES}{extra}").as_bytes());
    let name = format!(
        "{name}-{:02x}{:02x}{:02x}{:02x}",
        packages[0], packages[1], packages[2], packages[3]
    );
    let name = name.as_str();
    let root = cache().join(name);
    if root.join("usr/lib/systemd/systemd").exists() {
        return root;
    }
    let staging = cache().join(format!(".staging-{name}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).unwrap();
    let mirror = banger::images::host_mirror().expect("a Debian mirror in the host's apt sources");
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}{extra}"),
            suite,
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

/// A registry as static files in `dir/registry`, which busybox httpd serves inside the
/// container (its network namespace is its own): the v2 paths of one busybox image,
/// `test/tiny:v1.json` (the tag's extension gives the manifest its media type through
/// `httpd.conf`). The container pulls it through banger's pull worker, under the unit.
fn static_registry(dir: &Path) {
    let layout = dir.join("layout");
    let desc = common::oci::image_manifest(
        &layout,
        &common::oci::busybox_layers(),
        common::oci::Comp::Gzip,
        "amd64",
    );
    let reg = dir.join("registry");
    let repo = reg.join("v2/test/tiny");
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(reg.join("v2/index.html"), "").unwrap();
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = format!("sha256:{}", e.file_name().to_string_lossy());
        std::fs::copy(e.path(), repo.join("blobs").join(name)).unwrap();
    }
    let manifest = desc["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    std::fs::copy(
        layout.join("blobs/sha256").join(manifest),
        repo.join("manifests/v1.json"),
    )
    .unwrap();
    std::fs::write(
        reg.join("httpd.conf"),
        ".json:application/vnd.oci.image.manifest.v1+json\n",
    )
    .unwrap();
    std::fs::remove_dir_all(&layout).unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
}

/// What one container runs: its root, its script, and the prefix of the lines that script
/// prints as its verdict.
struct Container<'a> {
    suite: &'a str,
    root_name: &'a str,
    /// Packages beyond [`PACKAGES`], each after a comma.
    extra: &'a str,
    script: &'a str,
    says: &'a str,
    /// Environment for `systemd-nspawn` itself.
    env: &'a [(&'a str, &'a str)],
}

/// Boots `c`'s root with the package, a kernel, a busybox root filesystem and its script in
/// `/banger-test`, runs the script as the container's one job and asserts its verdict.
fn boot(c: Container) {
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
    let root = container_root(c.suite, c.root_name, c.extra);
    let deb = deb();
    let share = tempfile::tempdir().unwrap();
    let s = share.path();
    std::fs::copy(&deb, s.join("banger.deb")).unwrap();
    std::fs::copy(&vmlinuz, s.join("vmlinuz")).unwrap();
    tiny_rootfs(s);
    static_registry(s);
    let scripts = repo().join("tests/system");
    std::fs::copy(scripts.join(c.script), s.join("inside.sh")).unwrap();
    std::fs::copy(scripts.join("lib.sh"), s.join("lib.sh")).unwrap();
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
        ])
        .arg(format!("--machine=banger-{}", c.root_name))
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
        .envs(c.env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = text(&out);
    let verdict: Vec<&str> = log.lines().filter(|l| l.contains(c.says)).collect();
    for line in &verdict {
        eprintln!("{line}");
    }
    assert!(
        out.status.success(),
        "the {} container exited {:?}:\n{log}",
        c.suite,
        out.status.code()
    );
    let done = format!("{} exit 0", c.says);
    assert!(verdict.iter().any(|l| l.contains(&done)), "{log}");
}

#[test]
fn the_package_works_under_systemd_activation_polkit_machined_and_idle_exit() {
    boot(Container {
        suite: "bookworm",
        root_name: "nspawn-bookworm-3",
        extra: "",
        script: "inside.sh",
        says: "systemtest:",
        env: &[],
    });
}

/// machinectl's verbs reach a banger VM through its `io.systemd.MachineInstance` socket only
/// where machined takes a control address (systemd 260); bookworm's does not.
#[test]
fn machinectl_of_a_newer_systemd_drives_banger_vms_through_their_control_sockets() {
    boot(Container {
        suite: "sid",
        root_name: "nspawn-sid-3",
        // systemd-report, which reads banger's metrics socket.
        extra: ",systemd-report",
        script: "sid.sh",
        says: "systemtest-sid:",
        // systemd ≥ 256 refuses to boot on a cgroup v1 (hybrid) host; nspawn gives it a
        // unified hierarchy of its own.
        env: &[("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")],
    });
}
