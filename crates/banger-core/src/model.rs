//! The things banger manages, their ids and their name rules.

use std::fmt;
use std::path::PathBuf;

use crate::{Error, Result};

/// A bootable root filesystem, with the kernel it boots with by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Hex id, also the name of its directory under `images/`.
    pub id: String,
    /// Unique user-facing name.
    pub name: String,
    /// Whether banger owns the files (pulled, built, promoted) or only points at them.
    pub managed: bool,
    /// Where it came from: an OCI ref, a catalog entry, a path.
    pub source: String,
    /// The root filesystem image.
    pub rootfs_path: PathBuf,
    /// The seed of each VM's persistent `/root` disk, when the image has one.
    pub work_seed_path: Option<PathBuf>,
    /// The default kernel's name, when the image names one.
    pub kernel: Option<String>,
    /// Size of the root filesystem in bytes.
    pub size_bytes: u64,
    /// Creation time, µs since the epoch.
    pub created_at: u64,
    /// TCP ports the image's services listen on; a VM is ready once each answers.
    pub ready_ports: Vec<u16>,
    /// What the OCI image configuration says its processes run with.
    pub config: ImageConfig,
    /// Who made it ([`SYSTEM_UID`] for the operator's catalog, the default image and
    /// whatever root made): only they, or a holder of `manage-any`, replace or delete it, and
    /// only they and the system's VMs boot it.
    pub owner_uid: u32,
}

/// The owner of the system's objects: the operator's catalog, the default image and kernel,
/// warm snapshots, and whatever root made. Every user may use them; only administrators
/// change them.
pub const SYSTEM_UID: u32 = 0;

/// Whether a caller `uid` may use (boot, name as a kernel) an object of `owner`: their own
/// or the system's.
pub fn usable_by(owner: u32, uid: u32) -> bool {
    owner == uid || owner == SYSTEM_UID
}

/// Why `uid` may not use `kind` `name` of `owner` (see [`usable_by`]), or `None` when they
/// may, or an administrator's `manage-any` was granted (`any`). `list` is the command that
/// shows each object's owner.
pub fn use_refusal(
    kind: &str,
    name: &str,
    owner: u32,
    uid: u32,
    any: bool,
    list: &str,
) -> Option<String> {
    if any || usable_by(owner, uid) {
        return None;
    }
    Some(format!(
        "{kind} {name:?} is {}'s; only its owner (or an administrator) may use it: pick one of \
         your own or the system's (`{list}` shows each one's owner)",
        owner_label(owner)
    ))
}

/// Who owns an object, for messages: `the system`, or `user NAME (uid N)`.
pub fn owner_label(owner: u32) -> String {
    if owner == SYSTEM_UID {
        return "the system".into();
    }
    match crate::host::user_of(owner) {
        Some((name, _)) => format!("user {name} (uid {owner})"),
        None => format!("uid {owner}"),
    }
}

pub use banger_guest::model::ImageConfig;

/// At most this many `ready_ports` per image.
pub const MAX_READY_PORTS: usize = 16;

/// Parses a `ready_ports` list (`"8080,5432"`, the OCI label `org.banger.ready_ports`).
pub fn parse_ready_ports(s: &str) -> crate::Result<Vec<u16>> {
    let mut ports = Vec::new();
    for p in s.split([',', ' ']).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => ports.push(n),
            _ => {
                return Err(crate::Error::InvalidArgument(format!(
                    "ready_ports {s:?}: {p:?} is not a TCP port (1-65535)"
                )))
            }
        }
    }
    check_ready_ports(&ports)?;
    Ok(ports)
}

/// Validates a `ready_ports` list: ports 1-65535, no more than [`MAX_READY_PORTS`].
pub fn check_ready_ports(ports: &[u16]) -> crate::Result<()> {
    if ports.contains(&0) || ports.len() > MAX_READY_PORTS {
        return Err(crate::Error::InvalidArgument(format!(
            "ready_ports must be at most {MAX_READY_PORTS} TCP ports between 1 and 65535"
        )));
    }
    Ok(())
}

/// The most labels a VM carries.
pub const MAX_LABELS: usize = 64;
/// The longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 128;
/// The longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 1024;

/// Validates a VM's labels: at most [`MAX_LABELS`]; keys of 1 to [`MAX_LABEL_KEY`] bytes of
/// letters, digits and `._-/:` (a filter says `KEY=VALUE`, so never `=`); values of at most
/// [`MAX_LABEL_VALUE`] bytes without control characters.
pub fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> crate::Result<()> {
    let bad = |why: String| crate::Error::InvalidArgument(format!("labels: {why}"));
    if labels.len() > MAX_LABELS {
        return Err(bad(format!(
            "at most {MAX_LABELS} labels, not {}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        let plain = k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c));
        if k.is_empty() || k.len() > MAX_LABEL_KEY || !plain {
            return Err(bad(format!(
                "key {k:?} must be 1 to {MAX_LABEL_KEY} letters, digits or ._-/:"
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(bad(format!(
                "the value of {k} must be at most {MAX_LABEL_VALUE} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// Parses a label filter, `KEY=VALUE` each (as `vm list --label` takes it).
pub fn parse_label_filter(
    filters: &[String],
) -> crate::Result<std::collections::BTreeMap<String, String>> {
    let mut m = std::collections::BTreeMap::new();
    for f in filters {
        let Some((k, v)) = f.split_once('=') else {
            return Err(crate::Error::InvalidArgument(format!(
                "label filter {f:?} is not KEY=VALUE"
            )));
        };
        m.insert(k.to_owned(), v.to_owned());
    }
    check_labels(&m)?;
    Ok(m)
}

/// Whether `labels` has every pair of `filter`.
pub fn labels_match(
    labels: &std::collections::BTreeMap<String, String>,
    filter: &std::collections::BTreeMap<String, String>,
) -> bool {
    filter.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A kernel triple: kernel, initrd, modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Unique name (a catalog name or the importer's choice).
    pub name: String,
    /// The kernel release, `uname -r` style.
    pub version: String,
    /// Where it came from: a catalog entry, a package, a path.
    pub source: String,
    /// The uncompressed ELF kernel.
    pub kernel_path: PathBuf,
    /// The banger-built initrd.
    pub initrd_path: Option<PathBuf>,
    /// The modules directory (`lib/modules/<version>`).
    pub modules_dir: Option<PathBuf>,
    /// Creation time, µs since the epoch.
    pub created_at: u64,
    /// Who made it ([`SYSTEM_UID`] for catalog kernels and root's).
    pub owner_uid: u32,
}

impl Kernel {
    /// The directory its files are in (its initrd's, else its kernel file's), where banger keeps
    /// the initrds it makes for it.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.initrd_path
            .as_deref()
            .unwrap_or(&self.kernel_path)
            .parent()
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmState {
    /// Reserved, never started.
    #[default]
    Created,
    /// Its start phase is running.
    Starting,
    /// Its VMM runs and the guest was ready.
    Running,
    /// Its VMM runs with the guest's vCPUs stopped (memory kept); `Resume` goes on.
    Paused,
    /// Being shut down.
    Stopping,
    /// Not running.
    Stopped,
    /// A start failed or the VMM died.
    Failed,
}

impl VmState {
    /// The D-Bus and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }

    /// Whether its VMM is meant to run (it counts against the running quota, its network is
    /// up): starting, running, paused or stopping.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => VmState::Created,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "failed" => VmState::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A microVM and everything reserved for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vm {
    /// Hex id, also the name of its directories.
    pub id: String,
    /// Unique user-facing name.
    pub name: String,
    /// Life-cycle state.
    pub state: VmState,
    /// The last creation or start stage reached.
    pub stage: String,
    /// The image's id.
    pub image_id: String,
    /// The kernel's name.
    pub kernel: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Size of the root disk in bytes.
    pub disk_size: u64,
    /// The uid that created it.
    pub owner_uid: u32,
    /// The guest's leased IPv4 address.
    pub guest_address: String,
    /// The guest NIC's MAC address.
    pub mac_address: String,
    /// The guest's vsock context id.
    pub vsock_cid: u32,
    /// The host tap device's name.
    pub tap_name: String,
    /// `host:port` of the guest's sshd once it answered.
    pub ssh_address: String,
    /// Creation time, µs since the epoch.
    pub created_at: u64,
    /// The public half of the VM's own SSH host key (`ssh-ed25519 AAAA…`), once made.
    pub ssh_host_key: String,
    /// Whether the VM may reach its owner's other `shared` VMs.
    pub network: NetworkMode,
    /// Where the VM may send (`CIDR[:PORT]`); empty: anywhere the host's walls allow.
    pub egress: Vec<String>,
    /// The guest's init: empty for the image's `/sbin/init` (else `banger-init` stays PID
    /// 1), `banger` for `banger-init` always, or a path in the image.
    pub init: String,
    /// The VM's main process (the image's Entrypoint+Cmd or a command), run by banger-init;
    /// its exit powers the VM off. Empty: none.
    pub main: Vec<String>,
    /// The main process's last exit status; -1 when none is known.
    pub exit_status: i32,
    /// Published ports, `ADDR:HOSTPORT:GUESTPORT`.
    pub publish: Vec<String>,
    /// Shared host folders (see `vms::share`).
    pub shares: Vec<Share>,
    /// The snapshot the VM was restored from (its root disk layers on the snapshot's);
    /// empty for a VM booted from its image.
    pub snapshot: String,
    /// The devices its VMM was last started with beyond the fixed set (see
    /// `vmm::Machine`): a saved state loads only into the same set, so a VM restored from an
    /// older snapshot keeps that snapshot's set until it boots cold again.
    pub machine: String,
    /// Its owner's key/value pairs (see [`check_labels`]), private as what it runs is.
    pub labels: std::collections::BTreeMap<String, String>,
    /// When its lifetime ends, µs since the epoch; 0: it has none.
    pub expires_at: u64,
    /// What happens to it then.
    pub on_expire: OnExpire,
    /// A host folder that is its root filesystem (served over virtio-fs as the owner,
    /// read-write, never copied), resolved when it was created; empty: the root disk layers
    /// on its image.
    pub rootfs_dir: String,
    /// A network namespace (a path such as `/run/netns/cni-…`, given by root) whose `eth0` the
    /// VM's network is: its tap lives there, wired to `eth0` both ways, and the guest takes
    /// eth0's address, MAC and default route; no lease, bridge or walls of banger's. Empty:
    /// banger's own network.
    pub netns: String,
}

/// What happens to a VM when its lifetime ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnExpire {
    /// It is deleted (the default).
    #[default]
    Delete,
    /// It is stopped.
    Stop,
    /// It is paused.
    Pause,
}

impl OnExpire {
    /// Its name.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnExpire::Delete => "delete",
            OnExpire::Stop => "stop",
            OnExpire::Pause => "pause",
        }
    }
    /// Parses a name (empty: the default).
    pub fn parse(s: &str) -> Option<OnExpire> {
        match s {
            "" | "delete" => Some(OnExpire::Delete),
            "stop" => Some(OnExpire::Stop),
            "pause" => Some(OnExpire::Pause),
            _ => None,
        }
    }
}

impl Vm {
    /// Whether `uid` sees what the VM runs (its main process's argv, its shares' host paths,
    /// its published ports and egress list) by who they are: its owner and root. Holders of
    /// `manage-any` see it too (the front ends ask polkit, see `ops::manages_any`). Everyone
    /// else sees its name, owner, state, image and shape.
    pub fn private_to(&self, uid: u32) -> bool {
        uid == self.owner_uid || uid == SYSTEM_UID
    }

    /// The VM whole (`full`), or with what it runs left empty.
    pub fn shown(&self, full: bool) -> Vm {
        let mut v = self.clone();
        if !full {
            v.main.clear();
            v.shares.clear();
            v.publish.clear();
            v.egress.clear();
            v.labels.clear();
            v.rootfs_dir.clear();
            v.netns.clear();
        }
        v
    }
}

/// A snapshot of a running VM: its memory and device state and both its disks, stored under
/// `snapshots/<id>/`, from which new VMs start where it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Hex id, also the name of its directory.
    pub id: String,
    /// Unique user-facing name.
    pub name: String,
    /// The VM it was taken of (its id).
    pub vm_id: String,
    /// That VM's name when it was taken.
    pub vm_name: String,
    /// The VM's image (its root disk's base).
    pub image_id: String,
    /// The VM's kernel, which restores must use.
    pub kernel: String,
    /// Virtual CPUs, which restores must use.
    pub vcpus: u32,
    /// Memory in MiB, which restores must use.
    pub memory_mib: u32,
    /// The root disk's size.
    pub disk_size: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// When it was taken, µs since the epoch.
    pub created_at: u64,
    /// The uid that owns it (the VM's owner).
    pub owner_uid: u32,
    /// The memory file's sha256, checked before any restore loads it.
    pub memory_sha256: String,
    /// The memory file's size.
    pub memory_size: u64,
    /// The VM's init setting, which restored VMs keep.
    pub init: String,
    /// For a warm snapshot (banger's own, of a fresh template VM): the shape it serves
    /// (see `vms::warm`); empty for a snapshot a user took.
    pub warm: String,
    /// The VMM it was taken on (`qemu`, `firecracker`), the only one that restores it.
    pub vmm: String,
    /// The devices beyond the fixed set its VM had (see `vmm::Machine`), which a restore
    /// must give the VMM again.
    pub machine: String,
    /// The sha256 of its guest memory kept as a plain file (`ram`), which restores map
    /// copy-on-write; empty when the memory is inside the saved state (older snapshots, and
    /// VMs with a balloon: see `vmm::ram`).
    pub ram_sha256: String,
}

/// The VM's machine name for machined: `banger-<id>` (a VM's own name could collide with
/// another's once made a valid host name, `a_b` and `a-b` alike).
pub fn machine_name(vm_id: &str) -> String {
    format!("banger-{vm_id}")
}

/// The most shares one VM may have.
pub const MAX_SHARES: usize = 8;

/// The tag of a VM's root folder's virtio-fs device (`root=` on its kernel command line).
pub const ROOT_TAG: &str = "rootfs";

/// The virtio-fs tag of a VM's `i`th share (what the guest mounts).
pub fn share_tag(i: usize) -> String {
    format!("share{i}")
}

/// One shared folder of a VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// The host folder, absolute (as the owner's check resolved it).
    pub host: String,
    /// Where the guest mounts it.
    pub guest: String,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// A VM's place on the guest network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Reaches no other guest (the default).
    #[default]
    Isolated,
    /// Reaches the same owner's other `shared` VMs.
    Shared,
}

impl NetworkMode {
    /// `isolated` or `shared`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Isolated => "isolated",
            NetworkMode::Shared => "shared",
        }
    }

    /// The mode a CreateVM option names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "isolated" => Some(NetworkMode::Isolated),
            "shared" => Some(NetworkMode::Shared),
            _ => None,
        }
    }
}

/// Which kind of object a name belongs to, for messages.
#[derive(Debug, Clone, Copy)]
pub enum NameKind {
    /// An image name.
    Image,
    /// A kernel name.
    Kernel,
    /// A VM name.
    Vm,
    /// A snapshot name.
    Snapshot,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Image => "image",
            NameKind::Kernel => "kernel",
            NameKind::Vm => "VM",
            NameKind::Snapshot => "snapshot",
        })
    }
}

/// Checks a user-chosen name: `[a-zA-Z0-9._-]{1,64}`, not starting with `.` or `-` (names
/// become directory names and command-line arguments).
pub fn validate_name(kind: NameKind, name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let ok_start = !name.starts_with('.') && !name.starts_with('-');
    if name.is_empty() || name.len() > 64 || !ok_chars || !ok_start {
        return Err(Error::InvalidArgument(format!(
            "Invalid {kind} name {name:?}: use 1 to 64 of the characters a-z A-Z 0-9 . _ - \
             and do not start with '.' or '-'"
        )));
    }
    // Lookups take a name or an id: a name that reads as an id could shadow another's object.
    if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidArgument(format!(
            "Invalid {kind} name {name:?}: 16 hex digits read as an id; pick a name with \
             another character in it"
        )));
    }
    Ok(())
}

/// The message every per-owner quota refuses with (the services check it, the reservation's
/// transaction re-counts).
pub fn quota_message(uid: u32, verb: &str, n: u32, max: u32, key: &str, fix: &str) -> String {
    format!(
        "uid {uid} {verb} {n} VM(s), as many as {key} ({max}) allows; {fix} or have the \
         operator raise {key} in /etc/banger/config.toml"
    )
}

/// A new random 16-hex-digit id.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    // getrandom(2) with flags 0 blocks only before the kernel's pool is initialised.
    // SAFETY: the pointer and length describe `bytes`, which lives across the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never expected on Linux ≥ 3.17; fall back on time and pid rather than fail.
        let t = now_us() ^ (u64::from(std::process::id()) << 40);
        bytes = t.to_le_bytes();
    }
    hex(&bytes)
}

/// Bytes as lower-case hex digits (ids, digests, seeds).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of everything `r` yields, in hex.
pub fn sha256_hex_of(mut r: impl std::io::Read) -> std::io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut r, &mut h)?;
    Ok(hex(&h.finalize()))
}

/// Whether `s` looks like an id from [`new_id`].
pub fn is_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Microseconds since the Unix epoch, as D-Bus timestamps are.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Escapes a name into one object path element the way sd-bus's `bus_label_escape` does:
/// letters pass, digits pass unless first, everything else becomes `_` and two hex digits.
pub fn escape_path_label(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(s.len());
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_filters_need_every_pair() {
        let m = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        check_labels(&m(&[
            ("app", "e2b"),
            ("sandbox.id/x:y-z_1", "any value, even = signs"),
        ]))
        .unwrap();
        for bad in [
            m(&[("", "v")]),
            m(&[("a b", "v")]),
            m(&[("a=b", "v")]),
            m(&[("k", "line\nbreak")]),
            m(&[(&"k".repeat(MAX_LABEL_KEY + 1), "v")]),
            m(&[("k", &"v".repeat(MAX_LABEL_VALUE + 1))]),
        ] {
            assert!(check_labels(&bad).is_err(), "{bad:?}");
        }
        let many: std::collections::BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check_labels(&many).is_err());
        let labels = m(&[("a", "1"), ("b", "2")]);
        assert!(labels_match(&labels, &m(&[])));
        assert!(labels_match(&labels, &m(&[("a", "1"), ("b", "2")])));
        assert!(!labels_match(&labels, &m(&[("a", "1"), ("c", "3")])));
        assert!(!labels_match(&labels, &m(&[("a", "2")])));
        assert_eq!(
            parse_label_filter(&["a=1".into(), "b=x=y".into()]).unwrap(),
            m(&[("a", "1"), ("b", "x=y")])
        );
        assert!(parse_label_filter(&["novalue".into()]).is_err());
    }

    #[test]
    fn names_follow_the_rules() {
        for good in [
            "debian-bookworm",
            "a",
            "v1.2_x",
            &"x".repeat(64),
            "0123456789abcdeg",
        ] {
            validate_name(NameKind::Image, good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-flag",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "0123456789abcdef",
            "0123456789ABCDEF",
        ] {
            let err = validate_name(NameKind::Vm, bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_16_lower_hex_and_differ() {
        let a = new_id();
        let b = new_id();
        assert!(is_id(&a) && is_id(&b));
        assert_ne!(a, b);
    }

    #[test]
    fn labels_escape_like_sd_bus() {
        assert_eq!(escape_path_label("debian"), "debian");
        assert_eq!(escape_path_label("debian-6.1"), "debian_2d6_2e1");
        assert_eq!(escape_path_label("6x"), "_36x");
        assert_eq!(escape_path_label("a_b"), "a_5fb");
        assert_eq!(escape_path_label(""), "_");
    }

    #[test]
    fn vm_states_round_trip() {
        for s in [
            "created", "starting", "running", "stopping", "stopped", "failed",
        ] {
            assert_eq!(VmState::parse(s).unwrap().as_str(), s);
        }
        assert!(VmState::parse("zombie").is_none());
    }
}
