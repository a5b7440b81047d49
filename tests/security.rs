//! The security suite: hostile inputs from an unprivileged member of `banger`, through the
//! real bus-activated daemon (private bus, real polkitd), each refused with its reason and
//! nothing left behind, and a secret no caller may read never reaching banger's state. Prints
//! its counts.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOOLS: &[&str] = &[
    "dbus-daemon",
    "gdbus",
    "unshare",
    "mkfs.ext4",
    "debugfs",
    "grep",
];

/// A marker that only a root-only file holds: finding it anywhere under the state directory
/// means banger read that file for a caller.
const SECRET: &str = "banger-secret-7f3a9c";

fn ext4(dir: &Path, name: &str, marker: &str, size: &str) -> PathBuf {
    let tree = dir.join(format!("{name}.tree"));
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("marker"), format!("{marker}\n")).unwrap();
    let img = dir.join(name);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg(size)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 {name}");
    std::fs::remove_dir_all(&tree).unwrap();
    img
}

fn chown_to(p: &Path, uid: u32, mode: u32) {
    std::os::unix::fs::chown(p, Some(uid), None).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What a refusal must leave: no staging directory, the same images and kernels, and no
/// trace of the secret anywhere in the state.
fn leaks(bus: &TestBus, before: &(String, String)) -> Vec<String> {
    let state = bus.state_dir();
    let mut found = Vec::new();
    for d in ["images", "kernels"] {
        for e in std::fs::read_dir(state.join(d))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(".staging-") {
                found.push(format!("left {}", e.path().display()));
            }
        }
    }
    let grep = Command::new("grep")
        .args(["-r", "-l", "-a", SECRET])
        .arg(&state)
        .output()
        .unwrap();
    let hits = String::from_utf8_lossy(&grep.stdout).trim().to_owned();
    if !hits.is_empty() {
        found.push(format!("the secret is in {hits}"));
    }
    let now = listing(bus);
    if &now != before {
        found.push(format!("objects changed: {before:?} -> {now:?}"));
    }
    found
}

fn listing(bus: &TestBus) -> (String, String) {
    let call = |m: &str| text(&bus.gdbus_as(None, false, "/org/banger", m, &[]));
    (
        call("org.banger.Images1.ListImages"),
        call("org.banger.Kernels1.ListKernels"),
    )
}

#[derive(Default)]
struct Tally {
    tried: u32,
    refused: u32,
    leaked: u32,
    /// What went wrong, case by case: every case runs, so one failure hides no other.
    failures: Vec<String>,
}

impl Tally {
    /// Prints the counts past the test harness's capture (CI's log shows them) and asserts
    /// every case was refused as expected and nothing leaked, naming each case that was not.
    fn report(&self, suite: &str) {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{suite}: {} cases tried, {} refused, {} leaked",
            self.tried,
            self.refused,
            self.leaked
        );
        assert!(
            self.failures.is_empty(),
            "{suite}:\n{}",
            self.failures.join("\n")
        );
        assert_eq!(self.tried, self.refused);
        assert_eq!(self.leaked, 0);
    }

    /// One hostile call: it must fail with `error` and a message containing `says`, and leave
    /// nothing behind. A case that does not is counted and recorded, not fatal at once.
    fn case(
        &mut self,
        bus: &TestBus,
        what: &str,
        call: impl FnOnce() -> std::process::Output,
        error: &str,
        says: &str,
    ) {
        let before = listing(bus);
        let out = call();
        self.tried += 1;
        let t = text(&out);
        if !out.status.success() && t.contains(error) && t.contains(says) {
            self.refused += 1;
        } else {
            self.failures.push(format!(
                "{what}: expected {error} saying {says:?}, got: {t}"
            ));
        }
        let l = leaks(bus, &before);
        if !l.is_empty() {
            self.leaked += 1;
            self.failures.push(format!("{what}: left {l:?}"));
        }
    }
}

fn register_opts(entries: &[(&str, &Path)]) -> String {
    let inner: Vec<String> = entries
        .iter()
        .map(|(k, p)| format!("'{k}': <'{}'>", p.display()))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_caller_files_and_bounds_are_refused_and_nothing_leaks() {
    if !available(TOOLS) {
        return;
    }
    ensure_users();
    let uid = uid_of(USER_OK);
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The caller's own files, and root's secret.
    let good = ext4(f, "good.ext4", "registered", "16M");
    let seed = ext4(f, "seed.ext4", "seeded", "8M");
    let secret = ext4(f, "secret.ext4", SECRET, "8M");
    let big = ext4(f, "big.ext4", "big", "40M");
    for p in [&good, &seed, &big] {
        chown_to(p, uid, 0o600);
    }
    chown_to(&secret, 0, 0o600);
    let not_ext4 = f.join("not-ext4.img");
    std::fs::write(&not_ext4, vec![7u8; 1 << 20]).unwrap();
    chown_to(&not_ext4, uid, 0o600);
    let link = f.join("link.ext4");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let fifo = f.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    chown_to(&fifo, uid, 0o600);
    // A root-only directory holding a world-readable file, reached through the caller's link.
    let vault = f.join("vault");
    std::fs::create_dir(&vault).unwrap();
    std::fs::copy(&secret, vault.join("open.ext4")).unwrap();
    std::fs::set_permissions(
        vault.join("open.ext4"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o700)).unwrap();
    let through = f.join("through");
    std::os::unix::fs::symlink(&vault, &through).unwrap();

    // Kernel inputs: an ELF "kernel" (enough for ImportKernel), one over max_kernel_bytes,
    // and hostile modules trees.
    let kernel = f.join("vmlinux");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64 * 1024, 0);
    std::fs::write(&kernel, &elf).unwrap();
    chown_to(&kernel, uid, 0o644);
    let huge_kernel = f.join("huge-vmlinux");
    let mut huge = elf.clone();
    huge.resize(2 << 20, 0);
    std::fs::write(&huge_kernel, &huge).unwrap();
    chown_to(&huge_kernel, uid, 0o644);
    let mods_link = f.join("mods-link");
    std::fs::create_dir_all(mods_link.join("kernel")).unwrap();
    std::os::unix::fs::symlink(&secret, mods_link.join("kernel/virtio_mmio.ko")).unwrap();
    let mods_dep = f.join("mods-dep");
    std::fs::create_dir_all(&mods_dep).unwrap();
    let outside = f.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut dep = String::new();
    for m in banger::kernels::initrd::WANTED {
        let p = outside.join(format!("{m}.ko"));
        std::fs::write(&p, SECRET).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        dep.push_str(&format!("{}:\n", p.display()));
    }
    std::fs::write(mods_dep.join("modules.dep"), dep).unwrap();
    let mods_unreadable = f.join("mods-unreadable");
    std::fs::create_dir_all(mods_unreadable.join("kernel")).unwrap();
    std::fs::copy(&secret, mods_unreadable.join("kernel/x.ko")).unwrap();
    for d in [&mods_link, &mods_dep, &mods_unreadable] {
        Command::new("chown")
            .args(["-h", "-R", &uid.to_string()])
            .arg(d)
            .status()
            .unwrap();
    }
    std::os::unix::fs::chown(mods_unreadable.join("kernel/x.ko"), Some(0), None).unwrap();

    let bus = TestBus::start(BusOptions {
        extra_config: "max_kernel_bytes = 1048576\nmax_image_bytes = 33554432\n\
                       max_vcpus = 2\nmax_memory_mib = 2048\nmax_disk_size = 1073741824\n\
                       max_vms_per_user = 2\nmax_memory_mib_per_user = 300\n\
                       max_vcpus_per_user = 1\n"
            .into(),
        ..Default::default()
    });
    let register = |name: &str, o: String| {
        bus.gdbus_as(
            Some(USER_OK),
            false,
            "/org/banger",
            "org.banger.Images1.RegisterImage",
            &[name, &o],
        )
    };
    let import = |name: &str, o: String| {
        bus.gdbus_as(
            Some(USER_OK),
            false,
            "/org/banger",
            "org.banger.Kernels1.ImportKernel",
            &[name, &o],
        )
    };
    const BAD: &str = "org.banger.Error.InvalidArgument";
    const LIMIT: &str = "org.banger.Error.LimitExceeded";
    let mut t = Tally::default();

    // Paths opened by the daemon as the caller.
    for (what, p, says) in [
        ("a symlink to a root-only file", &link, "is a symbolic link"),
        ("a FIFO", &fifo, "is a FIFO"),
        (
            "a device",
            &PathBuf::from("/dev/null"),
            "is a character device",
        ),
        ("a directory", &f.to_path_buf(), "is a directory"),
        (
            "a root-only file",
            &secret,
            "cannot read this file yourself",
        ),
        (
            "a path through a root-only directory",
            &through.join("open.ext4"),
            "cannot read this file yourself",
        ),
        (
            "a file that is not ext4",
            &not_ext4,
            "not an ext4 file system",
        ),
    ] {
        t.case(
            &bus,
            what,
            || register("x", register_opts(&[("rootfs", p)])),
            BAD,
            says,
        );
    }
    t.case(
        &bus,
        "an oversized rootfs",
        || register("x", register_opts(&[("rootfs", &big)])),
        LIMIT,
        "max_image_bytes",
    );
    t.case(
        &bus,
        "a symlinked work seed",
        || {
            register(
                "x",
                register_opts(&[("rootfs", &good), ("work_seed", &link)]),
            )
        },
        BAD,
        "is a symbolic link",
    );
    t.case(
        &bus,
        "a relative path",
        || register("x", "{'rootfs': <'good.ext4'>}".into()),
        BAD,
        "absolute path",
    );
    // Kernels.
    t.case(
        &bus,
        "a symlinked kernel",
        || import("k", register_opts(&[("kernel_path", &link)])),
        BAD,
        "is a symbolic link",
    );
    t.case(
        &bus,
        "an oversized kernel",
        || import("k", register_opts(&[("kernel_path", &huge_kernel)])),
        LIMIT,
        "max_kernel_bytes",
    );
    t.case(
        &bus,
        "a modules tree with a link out of it",
        || {
            import(
                "k",
                register_opts(&[("kernel_path", &kernel), ("modules_dir", &mods_link)]),
            )
        },
        BAD,
        "leaves the modules tree",
    );
    t.case(
        &bus,
        "a modules.dep naming files outside the tree",
        || {
            import(
                "k",
                register_opts(&[("kernel_path", &kernel), ("modules_dir", &mods_dep)]),
            )
        },
        BAD,
        "outside the modules tree",
    );
    t.case(
        &bus,
        "a modules tree with a file the caller cannot read",
        || {
            import(
                "k",
                register_opts(&[("kernel_path", &kernel), ("modules_dir", &mods_unreadable)]),
            )
        },
        BAD,
        "cannot read all of it",
    );
    t.case(
        &bus,
        "a file where the modules directory goes",
        || {
            import(
                "k",
                register_opts(&[("kernel_path", &kernel), ("modules_dir", &good)]),
            )
        },
        BAD,
        "is a regular file, not a directory",
    );
    // Descriptors the CLI opened as the user: a FIFO still gets refused by what it is.
    let fifo_s = fifo.to_string_lossy().into_owned();
    t.case(
        &bus,
        "a FIFO passed as a descriptor",
        || {
            bus.banger_as(
                Some(USER_OK),
                &["image", "register", "x", "--rootfs", &fifo_s],
            )
        },
        "",
        "is a FIFO",
    );
    let link_s = link.to_string_lossy().into_owned();
    t.case(
        &bus,
        "a link the user cannot follow, in the CLI",
        || {
            bus.banger_as(
                Some(USER_OK),
                &["image", "register", "x", "--rootfs", &link_s],
            )
        },
        "",
        "Permission denied",
    );

    // A good registration through the CLI's descriptors, then the caller swaps its files for
    // links to the secret: banger's copies are what VMs get.
    let (g, s) = (
        good.to_string_lossy().into_owned(),
        seed.to_string_lossy().into_owned(),
    );
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "image",
            "register",
            "mine",
            "--rootfs",
            &g,
            "--work-seed",
            &s,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    for p in [&good, &seed] {
        std::fs::remove_file(p).unwrap();
        std::os::unix::fs::symlink(&secret, p).unwrap();
    }
    let prop = |name: &str| {
        let path = text(&bus.gdbus_as(
            None,
            false,
            "/org/banger",
            "org.banger.Images1.GetImage",
            &["mine"],
        ));
        let path = path.split('\'').nth(1).unwrap().to_owned();
        let out = bus.busctl_as(
            None,
            &[
                "get-property",
                "org.banger",
                &path,
                "org.banger.Image1",
                name,
            ],
        );
        text(&out).split('"').nth(1).unwrap_or_default().to_owned()
    };
    let (rootfs, work_seed) = (
        PathBuf::from(prop("RootfsPath")),
        PathBuf::from(prop("WorkSeedPath")),
    );
    for (p, marker) in [(&rootfs, "registered"), (&work_seed, "seeded")] {
        assert!(
            p.starts_with(bus.state_dir()),
            "{} is not banger's",
            p.display()
        );
        let cat = Command::new("debugfs")
            .args(["-R", "cat /marker"])
            .arg(p)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout).trim(), marker);
    }
    assert!(leaks(&bus, &listing(&bus)).is_empty());

    // Bounds, each named by its key.
    let ok = import("fake", register_opts(&[("kernel_path", &kernel)]));
    assert!(ok.status.success(), "{}", text(&ok));
    let create = |name: &str, extra: &str| {
        bus.gdbus_as(
            Some(USER_OK),
            false,
            "/org/banger",
            "org.banger.VMs1.CreateVM",
            &[
                name,
                &format!("{{'image': <'mine'>, 'kernel': <'fake'>, 'start': <false>{extra}}}"),
            ],
        )
    };
    for (what, extra, key) in [
        (
            "4 TB of memory",
            ", 'memory_mib': <uint32 4000000>",
            "max_memory_mib",
        ),
        (
            "more vCPUs than allowed",
            ", 'vcpus': <uint32 3>",
            "max_vcpus",
        ),
        (
            "a huge disk",
            ", 'disk_size': <uint64 2147483648>",
            "max_disk_size",
        ),
    ] {
        t.case(&bus, what, || create("big", extra), LIMIT, key);
    }
    // Per-user sums of what runs: refused before anything is reserved, naming the quota.
    for (what, extra, key) in [
        (
            "more memory than one user may run",
            ", 'memory_mib': <uint32 512>, 'vcpus': <uint32 1>",
            "max_memory_mib_per_user (300)",
        ),
        (
            "more vCPUs than one user may run",
            ", 'memory_mib': <uint32 128>, 'vcpus': <uint32 2>",
            "max_vcpus_per_user (1)",
        ),
    ] {
        let started = |name: &str| {
            bus.gdbus_as(
                Some(USER_OK),
                false,
                "/org/banger",
                "org.banger.VMs1.CreateVM",
                &[
                    name,
                    &format!("{{'image': <'mine'>, 'kernel': <'fake'>{extra}}}"),
                ],
            )
        };
        t.case(&bus, what, || started("greedy"), LIMIT, key);
    }
    // The member sees their use against each quota, over D-Bus and Varlink alike.
    let varlink = format!("--varlink={}", bus.runtime.join("io.banger").display());
    for transport in [None, Some(varlink.as_str())] {
        let mut args = vec!["--json", "status"];
        args.extend(transport);
        let out = bus.banger_as(Some(USER_OK), &args);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["yourMemoryMib"], "0 of 300", "{v}");
        assert_eq!(v["yourVcpus"], "0 of 1", "{v}");
        assert_eq!(v["yourVms"], "0 of 2", "{v}");
    }
    // Names that read as ids could shadow another's object.
    t.case(
        &bus,
        "a VM named like an id",
        || create("0123456789abcdef", ""),
        BAD,
        "read as an id",
    );
    let mut made = 0;
    for n in ["q1", "q2"] {
        let out = create(n, ", 'memory_mib': <uint32 256>, 'vcpus': <uint32 1>");
        assert!(out.status.success(), "{}", text(&out));
        made += 1;
    }
    // The VMs exist once their jobs reserved them.
    wait_until_async(
        "both VMs reserved",
        std::time::Duration::from_secs(10),
        || {
            let l = text(&bus.gdbus_as(None, false, "/org/banger", "org.banger.VMs1.ListVMs", &[]));
            l.matches("/org/banger/vm/").count() == made
        },
    )
    .await;
    t.case(
        &bus,
        "a VM over max_vms_per_user",
        || create("q3", ", 'memory_mib': <uint32 256>, 'vcpus': <uint32 1>"),
        LIMIT,
        "max_vms_per_user",
    );
    t.report("security");
}

/// Reads `/marker` of the ext4 image at `img` (debugfs, no mount).
fn marker_of(img: &Path) -> String {
    let out = Command::new("debugfs")
        .args(["-R", "cat /marker"])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An object's path from a manager's `Get…` method.
fn object_path(bus: &TestBus, method: &str, key: &str) -> String {
    let out = bus.gdbus_as(None, false, "/org/banger", method, &[key]);
    let t = text(&out);
    assert!(out.status.success(), "{method} {key}: {t}");
    t.split('\'').nth(1).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn members_cannot_use_replace_or_delete_each_others_objects() {
    if !available(TOOLS) {
        return;
    }
    ensure_users();
    let (alice, bob) = (USER_OK, USER_OK2);
    let (ua, ub) = (uid_of(alice), uid_of(bob));
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a_img = ext4(f, "a.ext4", "alice", "16M");
    let b_img = ext4(f, "b.ext4", "bob", "16M");
    chown_to(&a_img, ua, 0o600);
    chown_to(&b_img, ub, 0o600);
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64 * 1024, 0);
    let (a_kernel, b_kernel) = (f.join("a-vmlinux"), f.join("b-vmlinux"));
    for (p, uid) in [(&a_kernel, ua), (&b_kernel, ub)] {
        std::fs::write(p, &elf).unwrap();
        chown_to(p, uid, 0o600);
    }

    let bus = TestBus::start(BusOptions::default());
    let call = |user: Option<&str>, method: &str, args: &[&str]| {
        bus.gdbus_as(user, false, "/org/banger", method, args)
    };
    let ok = |o: std::process::Output, what: &str| {
        assert!(o.status.success(), "{what}: {}", text(&o));
    };
    const REGISTER: &str = "org.banger.Images1.RegisterImage";
    const IMPORT: &str = "org.banger.Kernels1.ImportKernel";
    ok(
        call(
            Some(alice),
            REGISTER,
            &["a-img", &register_opts(&[("rootfs", &a_img)])],
        ),
        "alice registers her image",
    );
    ok(
        call(
            Some(alice),
            IMPORT,
            &["a-k", &register_opts(&[("kernel_path", &a_kernel)])],
        ),
        "alice imports her kernel",
    );
    ok(
        call(
            Some(bob),
            REGISTER,
            &["b-img", &register_opts(&[("rootfs", &b_img)])],
        ),
        "bob registers his image",
    );
    let a_path = object_path(&bus, "org.banger.Images1.GetImage", "a-img");
    let a_id = a_path.rsplit('/').next().unwrap().to_owned();
    let a_rootfs = bus
        .state_dir()
        .join("images")
        .join(&a_id)
        .join("rootfs.ext4");
    assert_eq!(marker_of(&a_rootfs), "alice");

    // AccessDenied, or InteractiveAuthorizationRequired where polkit would ask an
    // administrator's password: either way refused, with what to do.
    const DENIED: &str = "org.freedesktop.DBus.Error.";
    const TAKEN: &str = "org.banger.Error.AlreadyExists";
    const THEIRS: &str = "another user's";
    let mut t = Tally::default();
    let b_opts = register_opts(&[("rootfs", &b_img)]);
    t.case(
        &bus,
        "bob replaces alice's image",
        || call(Some(bob), REGISTER, &["a-img", &b_opts]),
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob deletes alice's image",
        || call(Some(bob), "org.banger.Images1.DeleteImage", &["a-img"]),
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob deletes alice's image by id",
        || call(Some(bob), "org.banger.Images1.DeleteImage", &[&a_id]),
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob deletes alice's kernel",
        || call(Some(bob), "org.banger.Kernels1.DeleteKernel", &["a-k"]),
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob boots alice's image",
        || {
            call(
                Some(bob),
                "org.banger.VMs1.CreateVM",
                &["b-vm", "{'image': <'a-img'>, 'start': <false>}"],
            )
        },
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob boots alice's kernel",
        || {
            call(
                Some(bob),
                "org.banger.VMs1.CreateVM",
                &[
                    "b-vm",
                    "{'image': <'b-img'>, 'kernel': <'a-k'>, 'start': <false>}",
                ],
            )
        },
        DENIED,
        THEIRS,
    );
    let naming = format!("{{'rootfs': <'{}'>, 'kernel': <'a-k'>}}", b_img.display());
    t.case(
        &bus,
        "bob's image names alice's kernel",
        || call(Some(bob), REGISTER, &["b-img2", &naming]),
        DENIED,
        THEIRS,
    );
    t.case(
        &bus,
        "bob takes the default image's name",
        || call(Some(bob), REGISTER, &["debian-bookworm", &b_opts]),
        TAKEN,
        "system's image name",
    );
    t.case(
        &bus,
        "bob builds his own recipe under the default image's name",
        || {
            call(
                Some(bob),
                "org.banger.Images1.BuildImage",
                &["debian-bookworm", "{'packages': <['netcat-openbsd']>}"],
            )
        },
        TAKEN,
        "system's image name",
    );
    t.case(
        &bus,
        "bob takes the catalog kernel's name",
        || {
            call(
                Some(bob),
                IMPORT,
                &["debian", &register_opts(&[("kernel_path", &b_kernel)])],
            )
        },
        TAKEN,
        "system's kernel name",
    );
    t.case(
        &bus,
        "bob takes alice's image name for his own",
        || {
            call(
                Some(bob),
                "org.banger.Images1.PullImage",
                &["127.0.0.1:1/x:y", "{'name': <'a-img'>}"],
            )
        },
        TAKEN,
        "exists (user banger-it-ok",
    );
    // The same refusals over Varlink.
    for (method, params) in [
        (
            "io.banger.Images.Delete",
            serde_json::json!({ "name": "a-img" }),
        ),
        (
            "io.banger.Kernels.Delete",
            serde_json::json!({ "name": "a-k" }),
        ),
    ] {
        let before = listing(&bus);
        let r = py_call(&bus, Some(bob), method, params, false);
        t.tried += 1;
        let e = r[0]["error"].as_str().unwrap_or_default();
        if e.ends_with(".PermissionDenied") {
            t.refused += 1;
        } else {
            t.failures.push(format!("{method}: {r:?}"));
        }
        let l = leaks(&bus, &before);
        if !l.is_empty() {
            t.leaked += 1;
            t.failures.push(format!("{method}: left {l:?}"));
        }
    }
    // Alice's image is still hers, with her files.
    assert_eq!(marker_of(&a_rootfs), "alice", "alice's rootfs was changed");
    let owner = bus.busctl_as(
        Some(bob),
        &[
            "get-property",
            "org.banger",
            &a_path,
            "org.banger.Image1",
            "Owner",
        ],
    );
    assert_eq!(text(&owner).trim(), format!("u {ua}"), "{}", text(&owner));
    let listed = text(&bus.banger_as(Some(bob), &["image", "list"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("a-img") && l.contains(alice)),
        "image list shows no owner: {listed}"
    );
    let kernels = text(&bus.banger_as(Some(bob), &["kernel", "list"]));
    assert!(
        kernels
            .lines()
            .any(|l| l.starts_with("a-k") && l.contains(alice)),
        "kernel list shows no owner: {kernels}"
    );
    // Each deletes their own; an administrator deletes anyone's.
    ok(
        call(Some(bob), "org.banger.Images1.DeleteImage", &["b-img"]),
        "bob deletes his own image",
    );
    ok(
        call(None, "org.banger.Images1.DeleteImage", &["a-img"]),
        "root deletes alice's image",
    );
    ok(
        call(None, "org.banger.Kernels1.DeleteKernel", &["a-k"]),
        "root deletes alice's kernel",
    );
    t.report("security (members)");
}

/// `max_disk_size_per_user`: a member whose images, kernels, snapshots and VMs hold their
/// quota makes nothing more (refused with the quota and their use named) until they delete
/// something; root's objects are the system's and have no quota.
#[tokio::test(flavor = "multi_thread")]
async fn a_members_disk_quota_refuses_what_would_pass_it() {
    if !available(TOOLS) {
        return;
    }
    ensure_users();
    let alice = USER_OK;
    let ua = uid_of(alice);
    let files = tempfile::tempdir().unwrap();
    let f = files.path();
    std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = ext4(f, "a.ext4", "alice", "16M");
    chown_to(&img, ua, 0o644);
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64 * 1024, 0);
    let kernel = f.join("vmlinux");
    std::fs::write(&kernel, &elf).unwrap();
    chown_to(&kernel, ua, 0o644);
    // One image of alice's passes a quota this small; after it, she holds more than it.
    const QUOTA: u64 = 64 << 10;
    let bus = TestBus::start(BusOptions {
        extra_config: format!("max_disk_size_per_user = {QUOTA}\nmax_jobs_per_user = 2\n"),
        ..Default::default()
    });
    let call = |user: Option<&str>, method: &str, args: &[&str]| {
        bus.gdbus_as(user, false, "/org/banger", method, args)
    };
    const REGISTER: &str = "org.banger.Images1.RegisterImage";
    let opts = register_opts(&[("rootfs", &img)]);
    let out = call(Some(alice), REGISTER, &["a-1", &opts]);
    assert!(out.status.success(), "{}", text(&out));
    let used = || {
        let out = bus.banger_as(Some(alice), &["--json", "status"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let s = v["yourDiskSize"].as_str().unwrap().to_owned();
        let (used, of) = s.split_once(" of ").unwrap();
        assert_eq!(of, QUOTA.to_string(), "{s}");
        used.parse::<u64>().unwrap()
    };
    let held = used();
    assert!(held > QUOTA, "alice's image holds {held} bytes");

    const LIMIT: &str = "org.banger.Error.LimitExceeded";
    let mut t = Tally::default();
    let says = "max_disk_size_per_user";
    t.case(
        &bus,
        "a second image",
        || call(Some(alice), REGISTER, &["a-2", &opts]),
        LIMIT,
        says,
    );
    t.case(
        &bus,
        "a kernel",
        || {
            call(
                Some(alice),
                "org.banger.Kernels1.ImportKernel",
                &["a-k", &register_opts(&[("kernel_path", &kernel)])],
            )
        },
        LIMIT,
        says,
    );
    t.case(
        &bus,
        "a VM",
        || {
            call(
                Some(alice),
                "org.banger.VMs1.CreateVM",
                &["a-vm", "{'image': <'a-1'>, 'start': <false>}"],
            )
        },
        LIMIT,
        says,
    );
    t.case(
        &bus,
        "a pull",
        || {
            call(
                Some(alice),
                "org.banger.Images1.PullImage",
                &["localhost:1/x:y", "@a{sv} {}"],
            )
        },
        LIMIT,
        says,
    );
    assert_eq!(used(), held, "the refusals made nothing");
    // Root's objects are the system's: no quota.
    let out = call(None, REGISTER, &["r-1", &opts]);
    assert!(out.status.success(), "{}", text(&out));
    // Deleting her image frees her quota.
    let out = call(Some(alice), "org.banger.Images1.DeleteImage", &["a-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(used(), 0);
    let out = call(Some(alice), REGISTER, &["a-2", &opts]);
    assert!(out.status.success(), "{}", text(&out));

    // What running jobs are still making is not counted yet, so a member runs only so many
    // at once: two pulls held by a registry that never answers, then a third is refused
    // (another member's are not).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_ref = format!("{}/x/held:v1", silent.local_addr().unwrap());
    let bob = USER_OK2;
    let pull = |user: &str, name: &str| {
        call(
            Some(user),
            "org.banger.Images1.PullImage",
            &[&held_ref, &format!("{{'name': <'{name}'>}}")],
        )
    };
    for n in ["h-1", "h-2"] {
        let out = pull(bob, n);
        assert!(out.status.success(), "{}", text(&out));
    }
    // (Not `case`: the held pulls' staging directories are there, and rightly.)
    let out = pull(bob, "h-3");
    t.tried += 1;
    let said = text(&out);
    if !out.status.success() && said.contains(LIMIT) && said.contains("max_jobs_per_user") {
        t.refused += 1;
    } else {
        t.failures.push(format!("a third job at once: {said}"));
    }
    let out = call(Some(alice), "org.banger.Images1.DeleteImage", &["a-2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pull(alice, "a-h");
    assert!(out.status.success(), "{}", text(&out));
    let jobs = bus.banger_as(None, &["--json", "job", "list"]);
    let running: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    for j in running.as_array().unwrap() {
        let id = j["id"].as_u64().unwrap().to_string();
        let out = bus.banger_as(None, &["job", "cancel", &id]);
        assert!(out.status.success(), "{}", text(&out));
    }
    t.report("security (disk quota)");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_vm_runs_is_its_owners_business() {
    if !available(TOOLS) {
        return;
    }
    ensure_users();
    let bus = TestBus::start(BusOptions::default());
    let state = bus.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let store = banger::store::Store::open(&state.join("banger.db")).unwrap();
    let image = image_row(&state, "img", "k");
    let kernel = kernel_row(&state, "k", true);
    let mut vm = vm_row("private-vm", &image, uid_of(USER_OK), 7, "k");
    const SECRETS: [&str; 4] = ["secret-project", "hunter2", "18080", "10.9.9.9"];
    vm.shares = vec![banger::model::Share {
        host: "/home/alice/secret-project".into(),
        guest: "/src".into(),
        read_only: false,
    }];
    vm.publish = vec!["127.0.0.1:18080:80".into()];
    vm.main = vec!["/usr/bin/serve".into(), "--token=hunter2".into()];
    vm.egress = vec!["10.9.9.9/32".into()];
    let row = vm.clone();
    store
        .call_blocking(move |c| {
            banger::store::rows::insert_image(c, &image)?;
            banger::store::rows::insert_kernel(c, &kernel)?;
            banger::store::rows::insert_vm(c, &row)
        })
        .unwrap();
    drop(store);
    let path = format!("/org/banger/vm/{}", vm.id);
    let (mut tried, mut hidden, mut leaked) = (0, 0, 0);
    for (who, sees) in [
        (Some(USER_NO), false),
        (Some(USER_OK2), false),
        (Some(USER_OK), true),
        (Some(USER_ADMIN), true),
        (None, true),
    ] {
        let mut seen = String::new();
        for prop in ["Shares", "Published", "Egress"] {
            let out = bus.busctl_as(
                who,
                &["get-property", "org.banger", &path, "org.banger.VM1", prop],
            );
            assert!(out.status.success(), "{who:?} {prop}: {}", text(&out));
            seen.push_str(&text(&out));
        }
        let all = bus.busctl_as(
            who,
            &[
                "call",
                "org.banger",
                "/org/banger",
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            ],
        );
        seen.push_str(&text(&all));
        for (m, params) in [
            (
                "io.banger.VMs.Get",
                serde_json::json!({ "name": "private-vm" }),
            ),
            ("io.banger.VMs.List", serde_json::json!({})),
        ] {
            let r = py_call(&bus, who, m, params, false);
            seen.push_str(&serde_json::to_string(&r).unwrap());
        }
        let shown = bus.banger_as(who, &["--json", "vm", "show", "private-vm"]);
        seen.push_str(&text(&shown));
        for s in SECRETS {
            tried += 1;
            match (seen.contains(s), sees) {
                (true, true) | (false, false) => hidden += !sees as u32,
                (false, true) => panic!("{who:?} does not see its own VM's {s}: {seen}"),
                (true, false) => {
                    leaked += 1;
                    eprintln!("{who:?} sees {s}");
                }
            }
        }
        // Everyone sees the name, owner, state, image and shape.
        assert!(
            seen.contains("private-vm") || text(&shown).contains("private-vm"),
            "{who:?}: {seen}"
        );
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "security (vm privacy): {tried} (reader, detail) pairs tried, {hidden} hidden from others, {leaked} leaked"
    );
    assert_eq!(leaked, 0);
}

/// The real `banger-vm-helper port-forward` in `dir`, to the agent socket `agent` there,
/// publishing `127.0.0.1:SPEC`, its output in `dir/port-forward.log`; returned once it listens,
/// killed when dropped (a failing test leaves none behind).
fn start_forwarder(dir: &Path, agent: &str, spec: &str) -> (Forwarder, PathBuf) {
    let log = dir.join("port-forward.log");
    let child = Forwarder(
        Command::new(env!("CARGO_BIN_EXE_banger-vm-helper"))
            .arg("port-forward")
            .arg(dir.join(agent))
            .arg(format!("127.0.0.1:{spec}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until(
        "the forwarder listens",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("port-forward: listening")
        },
    );
    (child, log)
}

/// A forwarder process, killed and reaped when dropped.
struct Forwarder(std::process::Child);

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A published UDP port whose guest refuses: every new peer's datagram costs the forwarder a
/// line in its log (root's runtime directory, a tmpfs), so anyone who can reach the port could
/// fill that file system. The real `banger-vm-helper port-forward`, its agent link absent (each
/// open fails), and datagrams from 3000 peers: the log starts over at its bound (it grew to 150
/// KB before), and keeps the newest lines.
#[test]
fn a_published_ports_refusals_cannot_fill_the_runtime_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let (child, log) = start_forwarder(dir.path(), "no-agent.sock", &format!("{port}:53/udp"));
    let said = |what: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(what)
    };
    // In rounds of 100, each done once its last peer's line is written: a busy forwarder's
    // socket buffer would drop datagrams sent all at once (UDP), so that peer sends again
    // until it is heard.
    const PEERS: usize = 3000;
    for _ in 0..PEERS / 100 {
        let peers: Vec<_> = (0..100)
            .map(|_| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(b"q", ("127.0.0.1", port)).unwrap();
                s
            })
            .collect();
        let last = peers.last().unwrap();
        let line = format!("{} → guest 53/udp", last.local_addr().unwrap());
        wait_until(
            "the round's last peer's line",
            std::time::Duration::from_secs(60),
            || {
                said(&line) || {
                    let _ = last.send_to(b"q", ("127.0.0.1", port));
                    false
                }
            },
        );
    }
    drop(child);
    let size = std::fs::metadata(&log).unwrap().len();
    let text = std::fs::read_to_string(&log).unwrap();
    // On stderr itself: the suite's counts show in CI's log, not only on failure.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "security (forwarder log): {PEERS} peers refused, log {size} bytes (bound {}), {} lines kept",
        banger::logging::HELPER_LOG_MAX,
        text.lines().count()
    );
    assert!(size <= banger::logging::HELPER_LOG_MAX, "{size} bytes");
    assert!(
        text.starts_with("[earlier lines dropped"),
        "{}",
        &text[..200]
    );
}

/// A published TCP port: anyone who reaches it could open connections without end, each two
/// threads and four descriptors of the forwarder's. Beyond its bound they are closed at once.
#[test]
fn a_published_tcp_port_serves_its_most_connections_and_closes_the_rest() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    // The real `banger-vm-helper port-forward`, in front of an "agent" that opens every port asked
    // and echoes (the hybrid socket's `CONNECT`/`OK`, then the agent's reply, as the real ones
    // say).
    let dir = tempfile::tempdir().unwrap();
    let agent = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
    std::thread::spawn(move || {
        for s in agent.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let line = |s: &mut UnixStream| {
                    let mut b = [0u8; 1];
                    while s.read_exact(&mut b).is_ok() && b[0] != b'\n' {}
                };
                line(&mut s);
                let _ = s.write_all(b"OK 1024\n");
                line(&mut s);
                let _ = s.write_all(b"{\"ok\":true}\n");
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
            });
        }
    });
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let (child, log) = start_forwarder(dir.path(), "agent.sock", &format!("{port}:80"));
    // As many connections as this process may hold (the test's own limit, not banger's).
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit touch only `r`.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let max = banger::vms::publish::MAX_TCP_CONNECTIONS;
    let tries = max + 200;
    let served = |c: &mut std::net::TcpStream| {
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let mut b = [0u8; 4];
        c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
    };
    let mut conns: Vec<std::net::TcpStream> = (0..tries)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let ok = conns.iter_mut().map(served).filter(|s| *s).count();
    let threads = std::fs::read_to_string(format!("/proc/{}/status", child.0.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .map(|n| n.trim().parse::<usize>().unwrap())
        .unwrap();
    // Every held one given back, the port serves again.
    conns.clear();
    wait_until(
        "a port whose connections ended serves again",
        std::time::Duration::from_secs(30),
        || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|mut c| served(&mut c))
                .unwrap_or(false)
        },
    );
    drop(child);
    let _ = writeln!(
        std::io::stderr(),
        "security (forwarder connections): {tries} connections tried, {ok} served (bound {max}), \
         {} closed at once, forwarder threads {threads}",
        tries - ok
    );
    assert_eq!(ok, max, "exactly the bound is served");
    assert!(threads <= 2 * max + 2, "{threads} threads");
    assert!(std::fs::metadata(&log).unwrap().len() <= banger::logging::HELPER_LOG_MAX);
}
