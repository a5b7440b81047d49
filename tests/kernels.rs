//! Kernel import for real: the Debian stable kernel package (downloaded by tests/run through
//! apt), imported through the bus-activated daemon as a real user.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use banger::dbus::proxy::Kernels1Proxy;
use common::*;

const TOOLS: &[&str] = &[
    "dbus-daemon",
    "gdbus",
    "unshare",
    "dpkg-deb",
    "xz",
    "setpriv",
    "tar",
];

fn gdbus_import(
    bus: &TestBus,
    user: &str,
    name: &str,
    kernel: &Path,
    modules: Option<&Path>,
) -> String {
    let mut opts = format!("{{'kernel_path': <'{}'>", kernel.display());
    if let Some(m) = modules {
        opts.push_str(&format!(", 'modules_dir': <'{}'>", m.display()));
    }
    opts.push('}');
    text(&bus.gdbus_as(
        Some(user),
        true,
        "/org/banger",
        "org.banger.Kernels1.ImportKernel",
        &[name, &opts],
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn import_takes_the_callers_kernel_and_modules_and_delete_respects_users() {
    if !available(TOOLS) {
        return;
    }
    let Some((vmlinuz, modules, version)) = debian_kernel() else {
        return;
    };
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;

    let out = gdbus_import(&bus, USER_OK, "debian-test", &vmlinuz, Some(&modules));
    assert!(out.contains("/org/banger/kernel/debian_2dtest"), "{out}");
    let kernels = Kernels1Proxy::new(&conn).await.unwrap();
    let listed = kernels.list_kernels().await.unwrap();
    assert_eq!(
        (listed[0].0.as_str(), listed[0].1.as_str()),
        ("debian-test", version.as_str())
    );
    let dir = bus.state_dir().join("kernels/debian-test");
    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    assert_eq!(
        &vmlinux[..4],
        b"\x7fELF",
        "the bzImage became an ELF vmlinux"
    );
    assert!(dir
        .join("modules/kernel/drivers/block/virtio_blk.ko")
        .exists());
    let path = bus.busctl_as(
        None,
        &[
            "get-property",
            "org.banger",
            "/org/banger/kernel/debian_2dtest",
            "org.banger.Kernel1",
            "KernelPath",
        ],
    );
    assert!(
        text(&path).contains("kernels/debian-test/vmlinux"),
        "{}",
        text(&path)
    );

    // The same kernel as an ELF vmlinux (which declares its version only in its banner),
    // through the CLI, which hands the daemon descriptors, not paths: the modules tree has no
    // index, and depmod runs without knowing the version (it failed with "Cannot prepare
    // depmod: File exists" before).
    let files = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let elf = files.path().join("vmlinux");
    std::fs::write(&elf, &vmlinux).unwrap();
    std::fs::set_permissions(&elf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "kernel",
            "import",
            "elf-test",
            "--kernel",
            elf.to_str().unwrap(),
            "--modules",
            modules.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let listed = kernels.list_kernels().await.unwrap();
    let row = listed.iter().find(|k| k.0 == "elf-test").expect("elf-test");
    assert_eq!(row.1, version, "the version read from the vmlinux's banner");
    assert!(bus.state_dir().join("kernels/elf-test/initrd.img").exists());
    kernels.delete_kernel("elf-test").await.unwrap();

    // Files the caller cannot read are not read for them.
    let secret = files.path().join("vmlinuz");
    std::fs::copy(&vmlinuz, &secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = gdbus_import(&bus, USER_OK, "stolen", &secret, None);
    assert!(
        out.contains("org.banger.Error.InvalidArgument")
            && out.contains("cannot read this file yourself"),
        "{out}"
    );
    let mods = files.path().join("modules");
    std::fs::create_dir(&mods).unwrap();
    std::fs::write(mods.join("private.ko"), b"x").unwrap();
    std::fs::set_permissions(
        mods.join("private.ko"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = gdbus_import(&bus, USER_OK, "stolen2", &vmlinuz, Some(&mods));
    assert!(out.contains("cannot read all of it yourself"), "{out}");
    let out = gdbus_import(&bus, USER_OK, "debian-test", &vmlinuz, None);
    assert!(out.contains("org.banger.Error.AlreadyExists"), "{out}");
    assert_eq!(kernels.list_kernels().await.unwrap().len(), 1);
    let leftovers = std::fs::read_dir(bus.state_dir().join("kernels"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 1, "no staging left");

    // Delete is refused while an image names the kernel.
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    store
        .call_blocking(|c| {
            c.execute(
                "INSERT INTO images (id, name, managed, source, rootfs_path, kernel, size_bytes, created_at) \
                 VALUES ('00000000000000aa', 'uses-it', 0, 'x', '/x', 'debian-test', 0, 0)",
                [],
            )?;
            Ok(())
        })
        .unwrap();
    match kernels.delete_kernel("debian-test").await {
        Err(zbus::Error::MethodError(n, Some(m), _)) => {
            assert_eq!(n.as_str(), "org.banger.Error.InUse");
            assert!(m.contains("1 image(s) or VM(s)"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    store
        .call_blocking(|c| Ok(c.execute("DELETE FROM images", [])?))
        .unwrap();
    kernels.delete_kernel("debian-test").await.unwrap();
    assert!(!dir.exists());
    assert!(kernels.list_kernels().await.unwrap().is_empty());
}

fn deb_in_apt_cache() -> bool {
    std::env::var("BANGER_TEST_KERNEL_DEB")
        .is_ok_and(|d| d.starts_with("/var/cache/apt/archives/") && Path::new(&d).is_file())
}

/// A tiny root filesystem whose init prints `marker` and powers off.
fn marker_rootfs(dir: &Path, marker: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let tree = dir.join("tree");
    for d in ["bin", "sbin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    let init = tree.join("sbin/init");
    std::fs::write(
        &init,
        format!("#!/bin/busybox sh\n/bin/busybox echo {marker}\n/bin/busybox mount -o remount,ro /\n/bin/busybox poweroff -f\n"),
    )
    .unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.join("rootfs.ext4");
    let u = banger::ext4::usage(&tree).unwrap();
    banger::ext4::build(&tree, &img, 64 << 20, u, "root").unwrap();
    img
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pulled_debian_kernel_boots_with_the_banger_initrd() {
    if bootable_debian_kernel().is_none() {
        return;
    }
    // The catalog pull finds the package in apt's cache (tests/run put it there) and checks
    // it against apt's index: no download.
    assert!(
        deb_in_apt_cache(),
        "tests/run fetches the kernel package into apt's cache first"
    );
    let bus = TestBus::start(BusOptions::default());
    let out = bus.banger_as(Some(USER_OK), &["kernel", "pull", "debian"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Pulled kernel debian"),
        "{}",
        text(&out)
    );
    let conn = bus.connect().await;
    let kernels = Kernels1Proxy::new(&conn).await.unwrap();
    let listed = kernels.list_kernels().await.unwrap();
    assert!(
        listed[0].2.starts_with("catalog:debian (linux-image-"),
        "{listed:?}"
    );
    // Pulling it again is refused; an unknown catalog name says where to look.
    let out = bus.banger_as(Some(USER_OK), &["kernel", "pull", "debian"]);
    assert!(text(&out).contains("installed already"), "{}", text(&out));
    let out = bus.banger_as(Some(USER_OK), &["kernel", "pull", "nosuch"]);
    assert!(
        text(&out).contains("kernel list --available"),
        "{}",
        text(&out)
    );
    let dir = bus.state_dir().join("kernels/debian");
    let initrd = dir.join("initrd.img");
    let size = std::fs::metadata(&initrd).unwrap().len();
    assert!(size > 1 << 20 && size < 16 << 20, "initrd of {size} bytes");

    // The kernel has virtio's PCI transport, and its initrd says so (its VMs' devices go on
    // PCI). One an older banger built says nothing, and the next daemon builds it again.
    assert_eq!(
        virtio_pci_marks(&initrd),
        1,
        "the initrd says the kernel has virtio_pci"
    );
    unmark_virtio_pci(&initrd);
    common::invariants::kill_daemon(&bus, &conn).await;
    let out = bus.banger_as(Some(USER_OK), &["kernel", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        virtio_pci_marks(&initrd),
        1,
        "built again by the next daemon"
    );
    assert_eq!(std::fs::metadata(&initrd).unwrap().len(), size);

    boots_to_its_marker(&dir);
}

/// The Debian kernel (its vmlinuz, modules tree and version) when what boots it here is too:
/// the tools, and the static guest binaries tests/run builds.
fn bootable_debian_kernel() -> Option<(PathBuf, PathBuf, String)> {
    if !available(&[
        "dbus-daemon",
        "unshare",
        "dpkg-deb",
        "xz",
        "depmod",
        "busybox",
        "qemu-system-x86_64",
        "timeout",
    ]) {
        return None;
    }
    let kernel = debian_kernel()?;
    if std::env::var("BANGER_GUEST_BIN_DIR").is_err() {
        assert!(
            std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
            "BANGER_GUEST_BIN_DIR is not set: run through tests/run"
        );
        eprintln!(
            "SKIPPED: BANGER_GUEST_BIN_DIR is not set (tests/run builds the static guest binaries)"
        );
        return None;
    }
    Some(kernel)
}

/// Boots the kernel in `dir` (a kernel's directory in banger's state: `vmlinux`, `initrd.img`)
/// under QEMU with a root disk whose init prints a marker, and checks that the marker came and
/// banger-init said nothing but which root it mounted.
fn boots_to_its_marker(dir: &Path) {
    let work = tempfile::tempdir().unwrap();
    let marker = format!("BANGER-BOOT-{}", banger::model::new_id());
    let rootfs = marker_rootfs(work.path(), &marker);
    let khz = banger::host::tsc_khz().expect("cpu MHz in /proc/cpuinfo");
    // `timeout` only guards against a hang; nothing here measures time.
    let out = Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(dir.join("vmlinux"))
        .arg("-initrd")
        .arg(dir.join("initrd.img"))
        .args([
            "-append",
            &format!("console=ttyS0 root=/dev/vda quiet tsc_early_khz={khz}"),
        ])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let console = text(&out);
    println!("{console}");
    assert!(
        console.contains(&marker),
        "no marker on the console:\n{console}"
    );
    assert!(
        out.status.success(),
        "qemu exited with {:?}:\n{console}",
        out.status
    );
    // banger-init says which root it switched to, and nothing else unless something failed.
    assert!(
        console.contains("banger-init: root /dev/vda mounted, starting /sbin/init"),
        "{console}"
    );
    let complaints: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("banger-init:") && !l.contains("mounted, starting"))
        .collect();
    assert!(complaints.is_empty(), "banger-init complained:\n{console}");
}

/// A kernel whose modules are xz-compressed (as bookworm-backports' 6.12 kernels ship them)
/// imports and boots: banger's initrd holds them decompressed. Its modules are the 6.1 cloud
/// kernel's, each compressed by `xz` and indexed again by `depmod` (it refused them before:
/// "banger's initrd needs uncompressed modules").
#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_with_compressed_modules_boots_with_the_banger_initrd() {
    let Some((vmlinuz, modules, version)) = bootable_debian_kernel() else {
        return;
    };
    let files = tempfile::tempdir().unwrap();
    let tree = files.path().join("lib/modules").join(&version);
    std::fs::create_dir_all(tree.parent().unwrap()).unwrap();
    let run = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {}", text(&out));
    };
    run(Command::new("cp").arg("-a").arg(&modules).arg(&tree));
    run(Command::new("find")
        .arg(&tree)
        .args(["-name", "*.ko", "-exec", "xz", "-0", "{}", "+"]));
    run(Command::new("depmod")
        .arg("-b")
        .arg(files.path())
        .arg(&version));
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(files.path()));
    let dep = std::fs::read_to_string(tree.join("modules.dep")).unwrap();
    assert!(
        dep.contains("kernel/drivers/block/virtio_blk.ko.xz:") && !dep.contains(".ko:"),
        "depmod indexed the compressed modules:\n{}",
        &dep[..dep.len().min(2000)]
    );

    let bus = TestBus::start(BusOptions::default());
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "kernel",
            "import",
            "xz-test",
            "--kernel",
            vmlinuz.to_str().unwrap(),
            "--modules",
            tree.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    boots_to_its_marker(&bus.state_dir().join("kernels/xz-test"));
}
