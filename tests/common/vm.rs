//! What the VM suites share: the busybox guest image, the Debian kernel imported into a
//! state directory, and views of the VMs' processes and of banger's network in the bus's
//! namespace.

use banger::dbus::proxy::Kernels1Proxy;

use super::oci::Layer;
use super::*;

pub const VM_TOOLS: &[&str] = &[
    "dbus-daemon",
    "gdbus",
    "unshare",
    "docker-registry",
    "skopeo",
    "mkfs.ext4",
    "busybox",
    "dpkg-deb",
    "xz",
    "qemu-system-x86_64",
    "qemu-img",
    "setsid",
];

/// A busybox system whose init idles: enough for the agent, which banger-init starts.
pub fn vm_image_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut l = Layer::default()
        .dir("bin", 0o755)
        .file("bin/busybox", &busybox, 0o755, 0)
        .dir("sbin", 0o755)
        .link("sbin/init", tar::EntryType::Symlink, "/bin/busybox")
        .dir("etc", 0o755)
        // A service that comes up after the agent: the image's ready port.
        .file(
            "etc/inittab",
            b"::sysinit:/bin/true\n::once:/bin/sh -c 'sleep 2; exec httpd -f -p 8080 -h /etc'\n",
            0o644,
            0,
        )
        .dir("root", 0o700)
        .file("root/seeded", b"from the image\n", 0o644, 0);
    for d in ["dev", "proc", "sys", "tmp"] {
        l = l.dir(d, 0o755);
    }
    for applet in [
        "sh", "cat", "echo", "sync", "sleep", "id", "uname", "true", "ping", "hostname", "ip",
        "httpd", "df", "tail", "nc", "dd", "tr", "tty",
    ] {
        l = l.link(&format!("bin/{applet}"), tar::EntryType::Symlink, "busybox");
    }
    vec![l.bytes()]
}

pub async fn import_kernel(
    conn: &zbus::Connection,
    name: &str,
    vmlinuz: &std::path::Path,
    modules: &std::path::Path,
) {
    Kernels1Proxy::new(conn)
        .await
        .unwrap()
        .import_kernel(
            name,
            opt(&[
                ("kernel_path", vmlinuz.to_string_lossy().into_owned().into()),
                ("modules_dir", modules.to_string_lossy().into_owned().into()),
            ]),
        )
        .await
        .unwrap();
}

/// What of banger's network the bus's namespace holds: links named banger0/bgr*, and
/// whether `table inet banger` exists.
pub fn banger_network(bus: &TestBus) -> (Vec<String>, bool) {
    let links = bus.in_netns("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        })
        .filter(|n| n == "banger0" || n.starts_with("bgr"))
        .collect();
    let tables = bus
        .in_netns("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&tables.stdout).contains("inet banger");
    (links, table)
}

/// The VMs' processes (QEMU, agent links, console loggers) of this bus: their `/proc`
/// directory and command line.
pub fn vm_process_dirs(bus: &TestBus) -> Vec<(std::path::PathBuf, String)> {
    let marker = bus.runtime.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(&marker)
                && (c.contains("qemu") || c.contains("agent-link") || c.contains("console-logger"))
            {
                found.push((e.path(), c));
            }
        }
    }
    found
}

pub fn vm_processes(bus: &TestBus) -> Vec<String> {
    vm_process_dirs(bus).into_iter().map(|(_, c)| c).collect()
}

/// A state directory with the Debian kernel imported as `test`, and the daemon's bus over it
/// in a network namespace of its own (TCG, `test` the default kernel); None when the tools,
/// kernel or guest binaries are missing (a failure under BANGER_REQUIRE_INTEGRATION).
pub async fn kernel_ready_bus(
    extra: &[&str],
    config: &str,
) -> Option<(tempfile::TempDir, TestBus)> {
    kernel_ready_bus_with(extra, config, None).await
}

/// A [`kernel_ready_bus`] with warm snapshots on, whose daemon runs a QEMU that can save
/// virtio-fs devices ([`newer_qemu`]): where VMs whose root is a folder start warm. None as
/// [`kernel_ready_bus`], or outside tests/run.
#[allow(dead_code)]
pub async fn warm_folder_bus() -> Option<(tempfile::TempDir, TestBus)> {
    let qemu = newer_qemu()?;
    kernel_ready_bus_with(&[], "warm_snapshots = true\n", Some(qemu)).await
}

/// [`kernel_ready_bus`] whose daemon finds the programs in `path_first` before the host's.
pub async fn kernel_ready_bus_with(
    extra: &[&str],
    config: &str,
    path_first: Option<PathBuf>,
) -> Option<(tempfile::TempDir, TestBus)> {
    if !available(VM_TOOLS) || !available(extra) {
        return None;
    }
    let (vmlinuz, modules, _) = debian_kernel()?;
    guest_bins()?;
    let state = tempfile::tempdir().unwrap();
    {
        let prep = TestBus::start(BusOptions {
            state_dir: Some(state.path().to_owned()),
            ..Default::default()
        });
        let conn = prep.connect().await;
        import_kernel(&conn, "test", &vmlinuz, &modules).await;
    }
    let bus = TestBus::start(BusOptions {
        extra_config: format!(
            "accel = \"tcg\"\nboot_timeout_sec = 240\ndefault_kernel = \"test\"\n{config}"
        ),
        netns: true,
        state_dir: Some(state.path().to_owned()),
        path_first,
        ..Default::default()
    });
    Some((state, bus))
}

/// What a VM test's bus needs kept alive: its state directory, the registry serving its
/// image and the image's layout.
pub struct Keep {
    _state: tempfile::TempDir,
    _registry: super::oci::TestRegistry,
    _layout: tempfile::TempDir,
}

/// A [`kernel_ready_bus`] with `config` in the daemon's configuration and the busybox VM
/// image ([`vm_image_layers`]) pushed as `repo` to a registry on its namespace's loopback:
/// the bus, the image's reference and what must outlive them (bind it). None as
/// [`kernel_ready_bus`].
pub async fn image_bus(config: &str, repo: &str) -> Option<(TestBus, String, Keep)> {
    use super::oci::*;
    let (state, bus) = kernel_ready_bus(&[], config).await?;
    let registry = TestRegistry::start_in_netns(bus.netns_pid());
    let layout = tempfile::tempdir().unwrap();
    let m = image_manifest_labeled(layout.path(), &vm_image_layers(), serde_json::json!({}));
    finish_layout(layout.path(), vec![m], "v1");
    let reference = registry.push(layout.path(), "v1", repo, &[]);
    let keep = Keep {
        _state: state,
        _registry: registry,
        _layout: layout,
    };
    Some((bus, reference, keep))
}

/// A busybox tree in `dir` (the host's static busybox and links to the applets the tests
/// run, `/etc/marker`, the base folders banger-init mounts on), every file and folder
/// `uid`'s: what `vm create --rootfs` boots.
pub fn busybox_tree(dir: &Path, uid: u32) {
    use std::os::unix::fs::PermissionsExt;
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "usr/local/bin",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "ls", "id", "chmod", "cp", "mkdir", "stat", "hostname", "grep", "true",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/marker"), "from the host's folder\n").unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    fn chown_all(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(p).unwrap() {
                chown_all(&e.unwrap().path(), uid);
            }
        }
    }
    chown_all(dir, uid);
}
