//! Snapshots of running VMs: memory and device state (the VMM's own stream, zstd: QEMU's
//! migration stream, or Firecracker's state and memory files in one) and both disks, taken
//! while the VM's vCPUs stand still, staged in `snapshots/.staging-<id>` and published under
//! `snapshots/<id>/` (root's, owner-only files: they hold guest memory). New VMs restore from
//! them (`create::restore`); a VM restored from a snapshot keeps a root
//! disk layered on the snapshot's, so the snapshot stays while such a VM does.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Vms;
use crate::auth::Action;
use crate::events::ObjectEvent;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::model::{hex, new_id, now_us, validate_name, NameKind, Snapshot, Vm, VmState};
use crate::store::rows;
use crate::{Error, Result};

/// A snapshot's failure.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No snapshot has this name or id.
    #[error("No snapshot {0:?}; `banger snapshot list` shows them")]
    NotFound(String),
    /// The name is taken by another snapshot.
    #[error(
        "A snapshot named {0:?} exists; pick another name or delete it (`banger snapshot delete {0}`)"
    )]
    NameTaken(String),
    /// VMs restored from it still layer their disks on it.
    #[error("Snapshot {name} is the base of {users} VM(s) restored from it; delete them first")]
    InUse {
        /// The snapshot's name.
        name: String,
        /// How many VMs.
        users: u64,
    },
    /// Another operation makes it now; the message says which and where to watch it.
    #[error("{0}")]
    Busy(String),
    /// The VM cannot be saved, or a restore asks for what the snapshot cannot give; the
    /// message says which and what to do.
    #[error("{0}")]
    Refused(String),
    /// Its files are not what was published (truncated, altered, missing).
    #[error("Snapshot {name} is damaged ({why}); delete it (`banger snapshot delete {name}`)")]
    Damaged {
        /// The snapshot's name.
        name: String,
        /// What is wrong, and the file.
        why: String,
    },
    /// Saving, copying or loading failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl crate::error::Kind for SnapshotError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            SnapshotError::NotFound(_) => ErrorKind::NotFound,
            SnapshotError::NameTaken(_) => ErrorKind::AlreadyExists,
            SnapshotError::InUse { .. } | SnapshotError::Busy(_) => ErrorKind::InUse,
            SnapshotError::Refused(_) => ErrorKind::InvalidArgument,
            SnapshotError::Damaged { .. } | SnapshotError::Failed { .. } => ErrorKind::Failed,
        }
    }
}

/// A [`SnapshotError::Failed`]: what banger was doing, and why it failed.
fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    SnapshotError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}

/// A [`SnapshotError::Refused`] as a service error.
pub(crate) fn refused(message: impl Into<String>) -> Error {
    SnapshotError::Refused(message.into()).into()
}

/// The memory and device state file in a snapshot's directory.
pub const MEMORY: &str = "memory.zst";
/// The guest's memory as a plain (sparse) file of the VM's memory size, when the state
/// file holds the devices only (see `vmm::ramsplit`).
pub const RAM: &str = "ram";
/// The root disk's file: a qcow2 layered on the image's (QEMU), or a whole raw copy
/// (Firecracker).
pub fn rootfs_file(format: crate::vmm::DiskFormat) -> &'static str {
    match format {
        crate::vmm::DiskFormat::Qcow2 => "rootfs.qcow2",
        crate::vmm::DiskFormat::Raw => "rootfs.ext4",
    }
}

/// The format of the root disk of a snapshot taken on `vmm`.
pub fn disk_format_of(snap: &Snapshot) -> crate::vmm::DiskFormat {
    if snap.vmm == "firecracker" {
        crate::vmm::DiskFormat::Raw
    } else {
        crate::vmm::DiskFormat::Qcow2
    }
}
/// The `/root` work disk (raw ext4).
pub const WORK: &str = "work.ext4";

/// Options of `SnapshotVM`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Leave the VM paused afterwards.
    pub pause: bool,
}

/// The action a caller needs to act on `snap` (its owner manages it; anyone else needs
/// manage-any).
pub fn action_for(snap: &Snapshot, uid: u32) -> Action {
    if snap.owner_uid == uid {
        Action::VmsManage
    } else {
        Action::VmsManageAny
    }
}

/// A writer that hashes and counts what passes.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(super) fn pipe() -> Result<(std::fs::File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(failed(
            "Cannot make a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    use std::os::fd::FromRawFd;
    // A 1 MiB pipe rather than 64 KiB: QEMU reads (and writes) a migration stream in chunks and waits for
    // its main loop between them, so a small pipe made a restore's load a tenth slower
    // (measured: 263 → 216 ms median for a busybox guest). Best effort: the size is a limit
    // of the host's (`fs.pipe-max-size`), and a smaller pipe still works.
    // SAFETY: fcntl on a descriptor pipe2 just returned.
    unsafe { libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 1 << 20) };
    // SAFETY: pipe2 returned two fresh descriptors this function now owns.
    unsafe {
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// Compresses what arrives on `from` into `to`; returns its sha256 and size.
fn compress(from: std::fs::File, to: &Path) -> Result<(String, u64)> {
    compressed(to, |z| {
        std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, from), z).map(|_| ())
    })
}

/// Writes what `fill` puts into a zstd stream into `to`, synced; returns its sha256 and size.
fn compressed(
    to: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(String, u64)> {
    let fail = |e: std::io::Error| failed("Cannot write the snapshot's memory", e);
    let file = std::fs::File::create(to).map_err(fail)?;
    let out = Hashing {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
        len: 0,
    };
    let mut z = zstd::stream::Encoder::new(out, 1).map_err(fail)?;
    fill(&mut z).map_err(fail)?;
    let mut out = z.finish().map_err(fail)?;
    out.flush().map_err(fail)?;
    let file = out.inner.into_inner().map_err(|e| fail(e.into_error()))?;
    file.sync_all().map_err(fail)?;
    Ok((hex(&out.hash.finalize()), out.len))
}

/// What a save wrote: the state file's sha256 and size, and the RAM file when the guest's
/// memory was split out (checked and copied by [`seal_ram`] once the VM runs again).
type Saved = (String, u64, Option<std::fs::File>);

/// Splits the migration stream arriving on `from` into the RAM file `ram` (QEMU's block
/// `mem`) and the compressed rest at `to`; returns the rest's sha256 and size, and the RAM
/// file, open.
fn split_memory(from: std::fs::File, to: &Path, ram: &Path) -> Result<Saved> {
    let fail = |e: std::io::Error| failed("Cannot write the snapshot's memory", e);
    let ram_file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(ram)
        .map_err(fail)?;
    let (sha, size) = compressed(to, |z| {
        crate::vmm::ramsplit::split(from, "mem", &ram_file, z).map(|_| ())
    })?;
    Ok((sha, size, Some(ram_file)))
}

/// A split RAM file made durable and, meanwhile, hashed (holes as the zeros they read as: what
/// a restore checks) and, in that same read, copied into the sealed memfd the first restore
/// maps (see [`Vms::prefetched_ram`]); returns its digest and that copy.
fn seal_ram(ram_file: std::fs::File) -> Result<(String, OwnedFd)> {
    let fail = |e: std::io::Error| failed("Cannot write the snapshot's memory", e);
    let len = ram_file.metadata().map_err(fail)?.len();
    let (synced, hashed) = std::thread::scope(|s| {
        let sync = s.spawn(|| ram_file.sync_all());
        let hashed = crate::vmm::ram::hashed_copy(&ram_file, len, true);
        (
            sync.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sync panicked"))),
            hashed,
        )
    });
    synced.map_err(fail)?;
    let (fd, digest) = hashed.map_err(fail)?;
    Ok((digest, fd))
}

/// Checks a snapshot's memory file against its row (a truncated or altered file never reaches
/// QEMU); returns it opened.
pub(super) fn verified_memory(dir: &Path, snap: &Snapshot) -> Result<std::fs::File> {
    let path = dir.join(MEMORY);
    let damaged = |why: String| -> Error {
        SnapshotError::Damaged {
            name: snap.name.clone(),
            why: format!("{why}; {}", path.display()),
        }
        .into()
    };
    let mut f = std::fs::File::open(&path).map_err(|e| damaged(format!("its memory: {e}")))?;
    let meta = f
        .metadata()
        .map_err(|e| damaged(format!("its memory: {e}")))?;
    let len = meta.len();
    if len != snap.memory_size {
        return Err(damaged(format!(
            "its memory is {len} bytes, {} when taken",
            snap.memory_size
        )));
    }
    // A file hashed before and not written since (its change time moves with any write,
    // and no one can set it) is not hashed again: a create and its restore check once.
    let (dev, ino, _, ctime, ctime_nsec) = file_identity(&meta);
    let identity = (dev, ino, len, ctime, ctime_nsec, snap.memory_sha256.clone());
    let seen = VERIFIED.lock().unwrap_or_else(|p| p.into_inner());
    if seen.get(&snap.id) == Some(&identity) {
        return Ok(f);
    }
    drop(seen);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| damaged(format!("its memory: {e}")))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    if hex(&hash.finalize()) != snap.memory_sha256 {
        return Err(damaged(
            "its memory's sha256 differs from when it was taken".into(),
        ));
    }
    use std::io::Seek;
    f.rewind()
        .map_err(|e| damaged(format!("its memory: {e}")))?;
    VERIFIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(snap.id.clone(), identity);
    Ok(f)
}

/// What [`verified_memory`] found intact, by snapshot id: the file's device, inode, size and
/// change time, and the digest it matched.
type Identity = (u64, u64, u64, i64, i64, String);
static VERIFIED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Identity>>,
> = std::sync::LazyLock::new(Default::default);

/// A snapshot's RAM as a sealed memfd, and the file it was copied from (device, inode, size,
/// change time): a file changed since is copied (and checked) again.
pub(super) struct CachedRam {
    file: (u64, u64, u64, i64, i64),
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
    /// Whether a restore mapped it (one the save made and no restore took within
    /// [`PREFETCH_KEEP`] is dropped: a snapshot kept for later holds no memory meanwhile).
    used: bool,
    /// The snapshot's owner: of the copies saves made and no restore took yet, the daemon
    /// keeps one per owner (their newest), so snapshots taken in a row hold one guest's
    /// memory, not one each; of those restores took, [`CACHED_PER_OWNER`].
    owner_uid: u32,
    /// When a restore last took it (or a save made it).
    last_used: std::time::Instant,
}

/// How many snapshots' sealed RAM copies the daemon keeps per owner for their next restores,
/// the least recently used dropped first. The VMs mapping a dropped copy keep it (their VMMs
/// hold it); a later restore of that snapshot reads and checks the file again, into a copy
/// that VMs restored from then on share. Without a bound, a member who restored many
/// snapshots once each would make the daemon hold the memory of every one of them.
const CACHED_PER_OWNER: usize = 4;

/// Makes room in `rams` for one more copy of `owner`'s: drops every copy of theirs no restore
/// took (a save's, see [`Vms::prefetched_ram`]) and, past [`CACHED_PER_OWNER`] − 1, their
/// least recently used ones.
fn make_room(rams: &mut std::collections::HashMap<String, CachedRam>, owner: u32) {
    rams.retain(|_, c| c.used || c.owner_uid != owner);
    loop {
        let theirs = rams.iter().filter(|(_, c)| c.owner_uid == owner);
        if theirs.clone().count() < CACHED_PER_OWNER {
            return;
        }
        let Some(oldest) = theirs
            .min_by_key(|(_, c)| c.last_used)
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        rams.remove(&oldest);
    }
}

/// How long the sealed copy a save made of its RAM waits for a first restore (a fork's come
/// at once). See [`Vms::prefetched_ram`].
const PREFETCH_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// The identity [`CachedRam`] keys a file by: device, inode, size and change time (moved by
/// any write, settable by no one).
fn file_identity(meta: &std::fs::Metadata) -> (u64, u64, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

impl Vms {
    /// The memory a VM restored from `snap` (in `dir`) starts with: the snapshot's RAM,
    /// checked against its row as it is copied into a memfd, sealed and shared by every
    /// restore (or, with `own`, a writable copy of the VM's own, for a VM with shared
    /// folders).
    pub(super) async fn guest_ram(
        &self,
        snap: &Snapshot,
        dir: &Path,
        own: bool,
    ) -> Result<crate::vmm::ram::GuestRam> {
        let path = dir.join(RAM);
        let damaged = |why: String| -> Error {
            SnapshotError::Damaged {
                name: snap.name.clone(),
                why: format!("{why}; {}", path.display()),
            }
            .into()
        };
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| damaged(format!("its RAM: {e}")))?
        };
        let meta = file
            .metadata()
            .map_err(|e| damaged(format!("its RAM: {e}")))?;
        let identity = file_identity(&meta);
        let size = u64::from(snap.memory_mib) << 20;
        let sealed = {
            let mut rams = self.rams.lock().await;
            match rams.get_mut(&snap.id).filter(|c| c.file == identity) {
                Some(c) => {
                    c.used = true;
                    c.last_used = std::time::Instant::now();
                    c.fd.clone()
                }
                None => {
                    let sha = snap.ram_sha256.clone();
                    let fd = crate::jobs::spawn_blocking(move || {
                        crate::vmm::ram::copy(&mut file, size, &sha, true)
                    })
                    .await
                    .map_err(|e| failed("Snapshot task failed", e))?
                    .map_err(|e| damaged(e.to_string()))?;
                    let fd = std::sync::Arc::new(fd);
                    rams.remove(&snap.id);
                    make_room(&mut rams, snap.owner_uid);
                    rams.insert(
                        snap.id.clone(),
                        CachedRam {
                            file: identity,
                            fd: fd.clone(),
                            used: true,
                            owner_uid: snap.owner_uid,
                            last_used: std::time::Instant::now(),
                        },
                    );
                    fd
                }
            }
        };
        if !own {
            return Ok(crate::vmm::ram::GuestRam {
                fd: sealed,
                shared: false,
            });
        }
        // Its own copy, of what was checked once.
        let fd = crate::jobs::spawn_blocking(move || crate::vmm::ram::duplicate(&sealed, size))
            .await
            .map_err(|e| failed("Snapshot task failed", e))?
            .map_err(|e| failed("Cannot copy the snapshot's RAM", e))?;
        Ok(crate::vmm::ram::GuestRam {
            fd: std::sync::Arc::new(fd),
            shared: true,
        })
    }

    /// Keeps the sealed copy `fd` a save made of published snapshot `snap`'s RAM (from the
    /// same read that hashed it) for its first restore, which then maps it at once instead
    /// of reading and hashing the file again: a fork's restores start as soon as its
    /// snapshot is published. Keyed by the published file's identity as [`Self::guest_ram`]
    /// checks it, so a file changed since is read and checked again. A copy no restore took
    /// within [`PREFETCH_KEEP`] is dropped, and so is one the owner's next snapshot replaces:
    /// a member who snapshots in a row makes the daemon hold one such copy, not one each.
    pub(super) async fn prefetched_ram(&self, snap: &Snapshot, fd: OwnedFd) {
        let path = self.snapshot_dir(&snap.id).join(RAM);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return;
        };
        if !meta.is_file() || meta.len() != u64::from(snap.memory_mib) << 20 {
            return;
        }
        let fd = std::sync::Arc::new(fd);
        {
            let mut rams = self.rams.lock().await;
            make_room(&mut rams, snap.owner_uid);
            rams.insert(
                snap.id.clone(),
                CachedRam {
                    file: file_identity(&meta),
                    fd: fd.clone(),
                    used: false,
                    owner_uid: snap.owner_uid,
                    last_used: std::time::Instant::now(),
                },
            );
        }
        // Weak: the wait must not keep alive a copy the cache dropped meanwhile.
        let (rams, id, fd) = (self.rams.clone(), snap.id.clone(), Arc::downgrade(&fd));
        tokio::spawn(async move {
            tokio::time::sleep(PREFETCH_KEEP).await;
            let mut rams = rams.lock().await;
            if rams
                .get(&id)
                .is_some_and(|c| !c.used && std::ptr::eq(Arc::as_ptr(&c.fd), fd.as_ptr()))
            {
                rams.remove(&id);
            }
        });
    }
}

/// Feeds a verified memory file, decompressed, into a pipe whose read end is returned.
pub(super) fn memory_stream(
    file: std::fs::File,
) -> Result<(OwnedFd, std::thread::JoinHandle<Result<()>>)> {
    let (r, w) = pipe()?;
    let feeder = std::thread::spawn(move || {
        let mut out = std::fs::File::from(w);
        let mut z = zstd::stream::Decoder::new(file)
            .map_err(|e| failed("Cannot read the snapshot's memory", e))?;
        // In pipe-sized writes: `io::copy`'s 8 KiB would be a system call per two pages.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = z
                .read(&mut buf)
                .map_err(|e| failed("Cannot read the snapshot's memory", e))?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])
                .map_err(|e| failed("Cannot feed the snapshot's memory to the VMM", e))?;
        }
    });
    Ok((r.into(), feeder))
}

/// Copies one of a running VM's disks (`name` in its directory `vm_dir`), sparsely. That
/// directory is the VM's uid's, so the name may stand for anything by now: it is opened without
/// following a link or waiting on a FIFO (`jail::open_beneath`), copied only when that is a
/// regular file, and `cp` reads that very descriptor.
fn copy_vm_disk(vm_dir: &Path, name: &str, to: &Path) -> Result<()> {
    let f = crate::vmm::jail::open_beneath(vm_dir, Path::new(name), libc::O_RDONLY, 0).map_err(
        |e| {
            failed(
                format!(
                    "Cannot snapshot the VM's disk {}",
                    vm_dir.join(name).display()
                ),
                e,
            )
        },
    )?;
    crate::host::run_with_stdin(
        "cp",
        [
            "--sparse=always".as_ref(),
            "--reflink=auto".as_ref(),
            std::ffi::OsStr::new("/proc/self/fd/0"),
            to.as_os_str(),
        ],
        Some(f),
    )
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

impl Vms {
    /// `snapshots/<id>/`.
    pub(super) fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots.path_of(id)
    }

    /// Every snapshot.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>> {
        self.store.call(|c| rows::list_snapshots(c)).await
    }

    /// The snapshot with this name or id.
    pub async fn snapshot(&self, key: &str) -> Result<Snapshot> {
        let k = key.to_owned();
        self.store
            .call(move |c| rows::find_snapshot(c, &k))
            .await?
            .ok_or_else(|| SnapshotError::NotFound(key.to_owned()).into())
    }

    /// Takes snapshot `name` of a running (or paused) VM; returns the job at once.
    pub async fn take_snapshot(
        &self,
        uid: u32,
        vm: &Vm,
        name: &str,
        o: SnapshotOptions,
    ) -> Result<Arc<Job>> {
        validate_name(NameKind::Snapshot, name)?;
        self.snapshot_allowed(vm)?;
        let n = name.to_owned();
        if self
            .store
            .call(move |c| rows::find_snapshot(c, &n))
            .await?
            .is_some()
        {
            return Err(snapshot_taken(name));
        }
        let spec = JobSpec {
            kind: "snapshot-vm".into(),
            target: name.into(),
            action: Action::VmsManage,
            owner_uid: uid,
        };
        let (this, vm_id, name) = (self.clone(), vm.id.clone(), name.to_owned());
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            this.run_snapshot(ctx, &vm_id, &name, o, "")
                .await
                .map(|_| ())
        }))
    }

    fn snapshot_allowed(&self, vm: &Vm) -> Result<()> {
        super::state::check(vm, super::state::VmOp::Snapshot)?;
        // A warm template of folder roots is parked before it mounts its root (see
        // `warm::WarmRoot`), where the VMM can save its folder's server.
        let parked = super::warm::is_template(vm) && self.vmm.saves_folder_roots().is_ok();
        if !vm.rootfs_dir.is_empty() && !parked {
            return Err(refused(format!(
                "VM {}'s root is the folder {}, served over virtio-fs, whose devices cannot be \
                 saved; snapshot a VM booted from an image",
                vm.name, vm.rootfs_dir
            )));
        }
        if !vm.shares.is_empty() {
            return Err(refused(format!(
                "VM {} has shared folders, whose virtio-fs devices cannot be saved; snapshot a VM without --share",
                vm.name
            )));
        }
        if !vm.main.is_empty() {
            return Err(refused(format!(
                "VM {} runs a main process (--entrypoint), which a restore could not wait for; snapshot a VM without one",
                vm.name
            )));
        }
        Ok(())
    }

    /// Takes the snapshot; `warm` is the key of a warm snapshot (see `warm`), or empty.
    pub(super) async fn run_snapshot(
        &self,
        ctx: JobContext,
        vm_id: &str,
        name: &str,
        o: SnapshotOptions,
        warm: &str,
    ) -> Result<Snapshot> {
        let lock = self.lock_of(vm_id);
        let _held = lock.lock().await;
        let mut vm = self.get(vm_id).await?;
        self.snapshot_allowed(&vm)?;
        let run = self.layout.vm_runtime_dir(&vm.id);
        let id = new_id();
        std::fs::create_dir_all(self.layout.snapshots_dir())
            .map_err(|e| failed("Cannot create the snapshots directory", e))?;
        let staging = crate::layout::StagingDir::create(
            self.layout
                .snapshots_dir()
                .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
        )?;
        let was_running = vm.state == VmState::Running;
        if was_running {
            ctx.stage("pause", format!("Pausing VM {}", vm.name));
            self.vmm.pause(&run).await?;
        }
        let saved = self.save_paused(&ctx, &vm, staging.path()).await;
        // The VM goes on whatever became of the snapshot (unless asked to stay paused).
        if was_running && !(o.pause && saved.is_ok()) {
            self.vmm.resume(&run).await?;
            // Its clock stood still while its memory was saved.
            self.sync_clock(&vm, false).await;
        } else if o.pause && saved.is_ok() && was_running {
            vm.state = VmState::Paused;
            self.save(&vm).await?;
        }
        let (memory_sha256, memory_size, ram_file) = saved?;
        // The RAM file is made durable and hashed once the VM runs again: what it holds was
        // final when the stream ended, and the VM's pause is shorter by that read.
        let (ram_sha256, ram_copy) = match ram_file {
            Some(f) => {
                let (sha, fd) = crate::jobs::spawn_blocking(move || seal_ram(f))
                    .await
                    .map_err(|e| failed("Snapshot task failed", e))??;
                (sha, Some(fd))
            }
            None => (String::new(), None),
        };
        let snap = Snapshot {
            id: id.clone(),
            name: name.into(),
            vm_id: vm.id.clone(),
            vm_name: vm.name.clone(),
            image_id: vm.image_id.clone(),
            kernel: vm.kernel.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_size: vm.disk_size,
            size_bytes: [MEMORY, RAM, rootfs_file(self.vmm.disk_format()), WORK]
                .iter()
                .map(|f| allocated(&staging.path().join(f)))
                .sum(),
            created_at: now_us(),
            owner_uid: vm.owner_uid,
            memory_sha256,
            memory_size,
            init: vm.init.clone(),
            warm: warm.to_owned(),
            vmm: self.vmm.name().to_owned(),
            machine: vm.machine.clone(),
            ram_sha256,
        };
        ctx.stage("publish", format!("Publishing snapshot {name}"));
        self.publish_snapshot(staging, &snap).await?;
        if let Some(fd) = ram_copy {
            self.prefetched_ram(&snap, fd).await;
        }
        ctx.log(
            6,
            format!(
                "Snapshot {name} of VM {}: {} MB",
                vm.name,
                snap.size_bytes >> 20
            ),
        );
        Ok(snap)
    }

    /// Saves a paused VM's state and copies its disks into `dir`; returns the state file's
    /// sha256 and size, and the RAM file (none when the memory is in the state).
    async fn save_paused(&self, ctx: &JobContext, vm: &Vm, dir: &Path) -> Result<Saved> {
        let run = self.layout.vm_runtime_dir(&vm.id);
        ctx.stage("save_memory", "Saving memory and device state");
        let (r, w) = pipe()?;
        let (memory, ram) = (dir.join(MEMORY), dir.join(RAM));
        // The guest's memory as a file of its own that restores map copy-on-write. A VM with
        // a balloon too: its restores keep the device (it is in the saved state), but the
        // agent switches its reports off (see `Identity::stop_page_reporting`).
        let split = self.vmm.name() == "qemu";
        let writer = crate::jobs::spawn_blocking(move || {
            if split {
                split_memory(r, &memory, &ram)
            } else {
                compress(r, &memory).map(|(sha, size)| (sha, size, None))
            }
        });
        let sent = self.vmm.save_state(&run, w).await;
        let written = writer
            .await
            .map_err(|e| failed("Snapshot task failed", e))?;
        // The reader's failure first: it says what in the stream it could not take, and
        // the VMM's then is only that its pipe closed.
        let (sha, size, ram_file) = written?;
        sent?;
        // A root folder has no disks (a parked template of folder roots): only the state and
        // RAM files are secured.
        let disks = vm.rootfs_dir.is_empty();
        if disks {
            ctx.stage("copy_disks", "Copying the root and /root disks");
        }
        let (vm_dir, dir) = (self.vm_dir(&vm.id), dir.to_owned());
        let vm_rootfs = self.vmm.rootfs_path(&vm_dir);
        let vm_rootfs = vm_rootfs
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let rootfs = rootfs_file(self.vmm.disk_format());
        let copy = dir.join(rootfs);
        crate::jobs::spawn_blocking(move || -> Result<()> {
            if disks {
                for (from, to) in [(vm_rootfs.as_str(), rootfs), (WORK, WORK)] {
                    copy_vm_disk(&vm_dir, from, &dir.join(to))?;
                }
            }
            use std::os::unix::fs::PermissionsExt;
            for f in [MEMORY, RAM, rootfs, WORK] {
                let p = dir.join(f);
                if (f == RAM || !disks) && !p.exists() {
                    continue;
                }
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .and_then(|_| std::os::unix::fs::chown(&p, Some(0), Some(0)))
                    .map_err(|e| failed(format!("Cannot secure {}", p.display()), e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| failed("Snapshot task failed", e))??;
        if disks {
            let image = self.images.get(&vm.image_id).await?;
            self.vmm.rebase_copy(&copy, &image.rootfs_path).await?;
        }
        Ok((sha, size, ram_file))
    }

    /// Moves a finished snapshot into place and records it (`shelf`); a name taken
    /// meanwhile loses the files.
    async fn publish_snapshot(
        &self,
        staging: crate::layout::StagingDir,
        snap: &Snapshot,
    ) -> Result<()> {
        let (row, name) = (snap.clone(), snap.name.clone());
        self.snapshots
            .publish(
                staging,
                &snap.id,
                |_| Ok(Ok(())),
                move |c| {
                    Ok(match rows::insert_snapshot(c, &row)? {
                        true => Ok(()),
                        false => Err(snapshot_taken(&name)),
                    })
                },
            )
            .await?;
        tracing::info!(snapshot_id = %snap.id, vm_id = %snap.vm_id, "Snapshot {} published", snap.name);
        self.events.send(ObjectEvent::SnapshotAdded(snap.clone()));
        Ok(())
    }

    /// Deletes a snapshot no VM layers on: the row (checked and removed in one store call,
    /// under the shelf's lock), then the files (`shelf`).
    pub async fn delete_snapshot(&self, snap: &Snapshot) -> Result<()> {
        let (id, name) = (snap.id.clone(), snap.name.clone());
        self.snapshots
            .delete(move |c| {
                let users = rows::vms_using_snapshot(c, &id)?;
                if users > 0 {
                    return Ok(Err(SnapshotError::InUse { name, users }.into()));
                }
                rows::delete_snapshot(c, &id)?;
                Ok(Ok(((), id)))
            })
            .await?;
        self.rams.lock().await.remove(&snap.id);
        tracing::info!(snapshot_id = %snap.id, "Snapshot {} deleted", snap.name);
        self.events
            .send(ObjectEvent::SnapshotRemoved(snap.id.clone()));
        Ok(())
    }
}

fn snapshot_taken(name: &str) -> Error {
    SnapshotError::NameTaken(name.to_owned()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ram_cache_keeps_a_few_copies_per_owner_and_one_a_save_made() {
        let copy = |owner: u32, used: bool, age: u64| CachedRam {
            file: (0, 0, 0, 0, 0),
            fd: Arc::new(std::fs::File::open("/dev/null").unwrap().into()),
            used,
            owner_uid: owner,
            last_used: std::time::Instant::now() - std::time::Duration::from_secs(age),
        };
        let mut rams = std::collections::HashMap::new();
        // Member 1000's restores, oldest first; a save's copy no restore took; root's.
        for (i, age) in [50, 40, 30, 20].into_iter().enumerate() {
            rams.insert(format!("m{i}"), copy(1000, true, age));
        }
        rams.insert("saved".into(), copy(1000, false, 1));
        rams.insert("root".into(), copy(0, true, 100));
        make_room(&mut rams, 1000);
        let mut left: Vec<_> = rams.keys().cloned().collect();
        left.sort();
        assert_eq!(
            left,
            ["m1", "m2", "m3", "root"],
            "the oldest and the save's go"
        );
        // Another owner's room takes nothing of 1000's.
        make_room(&mut rams, 2000);
        assert_eq!(rams.len(), 4);
        // A member who restored many snapshots: still CACHED_PER_OWNER after each.
        for i in 0..20 {
            make_room(&mut rams, 1000);
            rams.insert(format!("n{i}"), copy(1000, true, 0));
            let theirs = rams.values().filter(|c| c.owner_uid == 1000).count();
            assert!(theirs <= CACHED_PER_OWNER, "{theirs} copies of one owner's");
        }
        assert!(rams.contains_key("root"));
    }

    #[test]
    fn memory_is_hashed_once_until_it_changes_in_place() {
        let d = tempfile::tempdir().unwrap();
        let data = vec![3u8; 1 << 16];
        std::fs::write(d.path().join(MEMORY), &data).unwrap();
        let snap = Snapshot {
            id: "0123456789abcdef".into(),
            memory_size: data.len() as u64,
            memory_sha256: hex(&Sha256::digest(&data)),
            ..Default::default()
        };
        verified_memory(d.path(), &snap).unwrap();
        verified_memory(d.path(), &snap).unwrap();
        // The same size, one byte different: the change time moved, so it is hashed again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(MEMORY))
            .unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        drop(f);
        let e = verified_memory(d.path(), &snap).unwrap_err();
        assert!(e.to_string().contains("sha256 differs"), "{e}");
    }

    #[test]
    fn a_vm_disk_swapped_for_a_link_or_fifo_is_not_copied_and_a_file_is() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "root's only\n").unwrap();
        let link = d.path().join("work.ext4");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let out = d.path().join("copy");
        let e = copy_vm_disk(d.path(), "work.ext4", &out).unwrap_err();
        assert!(e.full_message().contains("Cannot snapshot"), "{e}");
        assert!(!out.exists(), "nothing copied through the link");

        let fifo = d.path().join("rootfs.qcow2");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = copy_vm_disk(d.path(), "rootfs.qcow2", &out).unwrap_err();
        assert!(e.full_message().contains("not a regular file"), "{e}");
        assert!(!out.exists());

        let disk = d.path().join("disk");
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_at(b"data", 4 << 20).unwrap();
        copy_vm_disk(d.path(), "disk", &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 < 1 << 20,
            "kept sparse"
        );
    }
}
