//! `PullImage`: registry → verified blob cache → flattened tree → guest assets → ext4 →
//! work seed → publish. Everything before publication runs in `images/.staging-<id>` with
//! no lock held.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;

use oci_client::Reference;

use super::error::{failed, invalid};
use super::finish::{blocking, TreeImage};
use super::publish::Staging;
use super::{Images, PullOptions};
use crate::auth::Action;
use crate::ext4::writer::Writer;
use crate::guest;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::model::{new_id, validate_name, Image, NameKind, SYSTEM_UID};
use crate::oci::flatten::{FlattenError, Flattener, Limits};
use crate::oci::reference;
use crate::oci::registry::{layer_compression, Compression, Registry};
use crate::tree::Tree;
use crate::worker::Report;
use crate::{Error, Result};

const GIB: u64 = 1 << 30;

/// Layers downloaded at once.
const DOWNLOADS: usize = 4;

/// A layer on its way to the flattener: its chunks as they download, or the cached blob.
enum LayerSource {
    /// Streamed while it downloads (verified only when the download ends).
    Stream(tokio::sync::mpsc::Receiver<Vec<u8>>),
    /// A blob in the cache.
    File(PathBuf),
}

/// Reads a layer's chunks as they arrive; the sender's end is the stream's end.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(c) => (self.cur, self.at) = (c, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.at);
        buf[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn open_layer(src: LayerSource, c: Compression) -> Result<Box<dyn Read + Send>> {
    let raw: Box<dyn Read + Send> = match src {
        LayerSource::File(path) => Box::new(
            std::fs::File::open(path).map_err(|e| failed("Cannot open a cached layer", e))?,
        ),
        LayerSource::Stream(rx) => Box::new(ChunkReader {
            rx,
            cur: Vec::new(),
            at: 0,
        }),
    };
    let r = BufReader::with_capacity(1 << 20, raw);
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(|e| failed("Cannot read a zstd layer", e))?,
        ),
    })
}

/// Decompressed tar data a layer's inflater may hold ahead of the extraction, in 1 MiB
/// chunks.
const INFLATE_AHEAD: usize = 32;

/// What a layer's inflater hands on.
enum Inflated {
    /// The next piece of the tar stream.
    Data(Vec<u8>),
    /// The stream ended where it should.
    Done,
    /// The stream broke.
    Failed(std::io::Error),
}

/// A layer decompressed on a thread of its own (see [`inflating`]).
struct InflatedReader {
    rx: std::sync::mpsc::Receiver<Inflated>,
    cur: Vec<u8>,
    at: usize,
    done: bool,
}

impl Read for InflatedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Inflated::Data(d)) => (self.cur, self.at) = (d, 0),
                Ok(Inflated::Done) => self.done = true,
                Ok(Inflated::Failed(e)) => return Err(e),
                // Gone without saying it finished: never a silently short layer.
                Err(_) => return Err(std::io::Error::other("the layer's decompression stopped")),
            }
        }
        let n = buf.len().min(self.cur.len() - self.at);
        buf[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Starts decompressing a layer on a thread of its own, at most [`INFLATE_AHEAD`] MiB ahead
/// of its reader, so decompression and extraction (and a later layer's decompression) run at
/// once on different cores.
fn inflating(src: LayerSource, c: Compression) -> Result<InflatedReader> {
    let mut dec = open_layer(src, c)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(INFLATE_AHEAD);
    std::thread::Builder::new()
        .name("banger-inflate".into())
        .spawn(move || loop {
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0;
            let got = loop {
                match dec.read(&mut buf[n..]) {
                    Ok(0) => break Ok(n),
                    Ok(k) => {
                        n += k;
                        if n == buf.len() {
                            break Ok(n);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            let msg = match got {
                Ok(0) => Inflated::Done,
                Ok(n) => {
                    buf.truncate(n);
                    Inflated::Data(buf)
                }
                Err(e) => Inflated::Failed(e),
            };
            let last = !matches!(msg, Inflated::Data(_));
            if tx.send(msg).is_err() || last {
                return;
            }
        })
        .map_err(|e| failed("Cannot start a decompression thread", e))?;
    Ok(InflatedReader {
        rx,
        cur: Vec::new(),
        at: 0,
        done: false,
    })
}

impl Images {
    /// Starts pulling `reference` as a job; fails at once on a bad reference or a taken name.
    /// The catalog comes first: an operator's bundle or OCI entry of that name, or the built-in
    /// `debian-bookworm` (built with debootstrap); anything else is an OCI reference.
    pub async fn pull(&self, uid: u32, reference: &str, mut opts: PullOptions) -> Result<Arc<Job>> {
        let mut reference = reference.to_owned();
        let mut owner = uid;
        if let Some(entry) = self.config.image_entry(&reference).cloned() {
            // A caller's credentials go only to the registry the caller named; a catalog
            // entry's registry gets the operator's.
            opts.auth = None;
            if let Some(oci) = entry.oci.clone() {
                // Under the catalog's own name it is the system's image, whoever pulls it.
                if opts.name.as_deref().is_none_or(|n| n == entry.name) {
                    owner = SYSTEM_UID;
                }
                opts.name.get_or_insert(entry.name.clone());
                reference = oci;
            } else {
                return self.pull_bundle(uid, entry, opts).await;
            }
        } else if reference == super::build::DEFAULT_IMAGE && opts.name.is_none() {
            let b = super::BuildOptions {
                kernel: opts.kernel.clone(),
                size: opts.size,
                ready_ports: opts.ready_ports.clone().unwrap_or_default(),
                ..Default::default()
            };
            return self.build(uid, &reference, b).await;
        }
        let r = reference::parse(&reference)?;
        let name = match opts.name.clone() {
            Some(n) => n,
            None => {
                self.derived_name(&reference::default_name(&r), owner)
                    .await?
            }
        };
        validate_name(NameKind::Image, &name)?;
        self.check_name_free(
            &name,
            owner,
            "pass another name (--name) or delete it first",
        )
        .await?;
        let spec = JobSpec {
            kind: "pull-image".into(),
            target: r.whole(),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let this = self.clone();
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            this.run_pull(ctx, r, name, owner, opts).await.map(|_| ())
        }))
    }

    /// Runs the pull in a worker (see [`crate::worker`]) that writes the image into a
    /// staging directory of its own uid, then takes the directory back (nothing in it
    /// followed, the blobs it fetched rehashed before they join the cache) and publishes.
    async fn run_pull(
        &self,
        ctx: JobContext,
        r: Reference,
        name: String,
        owner_uid: u32,
        opts: PullOptions,
    ) -> Result<Image> {
        // The download cache stays while this pull may read it (a prune waits).
        let _cache = self.cache_hold().await;
        let id = new_id();
        let staging = Staging::create(
            self.layout
                .images_dir()
                .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
        )?;
        let dir = staging.path().to_owned();
        let uid = crate::worker::next_uid();
        let cache = self.layout.oci_cache_dir();
        let (d, c) = (dir.clone(), cache.clone());
        blocking("Staging", move || hand_to_worker(&d, &c, uid)).await?;
        // A caller's credentials go only to the registry the caller named (see `pull`);
        // the operator's file is read here, by root, and only the registry's entry passes.
        let creds = opts
            .auth
            .clone()
            .or_else(|| crate::oci::auth::from_file(&self.config.auth_file, r.registry()));
        let request = serde_json::to_value(PullRequest {
            reference: r.whole(),
            insecure: opts.insecure || crate::oci::registry::on_loopback(r.registry()),
            credentials: creds.map(|c| (c.user, c.password)),
            size: opts.size,
            max_bytes: self.config.max_image_bytes,
            staging: crate::worker::fd_path(0),
            cache: crate::worker::fd_path(1),
            agent: crate::worker::fd_path(2),
        })
        .map_err(|e| failed("Cannot encode the pull", e))?;
        let agent = self.config.guest_binary("banger-agent");
        let hide = vec![
            self.layout.state_dir.clone(),
            self.layout.runtime_dir.clone(),
        ];
        let (worker_ctx, d, c) = (ctx.clone(), dir.clone(), cache.clone());
        let ran = blocking("Pull", move || {
            let open = |p: &Path, flags: i32| {
                crate::host::openat(libc::AT_FDCWD, p, flags | libc::O_RDONLY | libc::O_NOFOLLOW)
                    .map_err(|e| failed(format!("Cannot open {}", p.display()), e))
            };
            let spec = crate::worker::Spec {
                kind: "pull",
                uid,
                request: &request,
                hide,
                fds: vec![
                    open(&d, libc::O_DIRECTORY)?,
                    open(&c, libc::O_DIRECTORY)?,
                    crate::host::openat(libc::AT_FDCWD, &agent, libc::O_RDONLY).map_err(|e| {
                        failed(
                            format!("Cannot read the guest agent {}", agent.display()),
                            e,
                        )
                    })?,
                ],
            };
            let ran = crate::worker::run(&spec, &worker_ctx);
            // Whatever the worker did, its directory is root's again before anything in it
            // is used, and the blobs it verified join the cache.
            let adopted = take_back(&d, &c);
            let value = ran?;
            adopted?;
            Ok(value)
        })
        .await?;
        let pulled: Pulled = serde_json::from_value(ran)
            .map_err(|e| failed("The pull's worker answered what is not a pull", e))?;
        crate::model::check_ready_ports(&pulled.labeled_ports)
            .map_err(|e| invalid(format!("The image's label {READY_PORTS_LABEL}: {e}")))?;
        ctx.log(
            6,
            format!(
                "{} is {}; {} entries, {} bytes of files, written into ext4 as they decompressed",
                r.whole(),
                pulled.digest,
                pulled.entries,
                pulled.file_bytes
            ),
        );
        let t = TreeImage {
            id,
            name,
            source: r.whole(),
            kernel: opts.kernel,
            size: opts.size,
            ready_ports: opts.ready_ports.clone().unwrap_or(pulled.labeled_ports),
            config: pulled.config,
            owner_uid,
        };
        self.publish_built(&ctx, staging, t, pulled.size, pulled.seed)
            .await
    }
}

/// What the daemon asks a pull worker.
#[derive(serde::Serialize, serde::Deserialize)]
struct PullRequest {
    /// The whole reference.
    reference: String,
    /// Plain HTTP.
    insecure: bool,
    /// User and password for the reference's registry.
    credentials: Option<(String, String)>,
    /// The root filesystem's size the caller asked for.
    size: Option<u64>,
    /// `max_image_bytes`.
    max_bytes: u64,
    /// The worker's staging directory: `rootfs.ext4`, `work-seed.ext4` and `blobs/` go there.
    staging: PathBuf,
    /// The shared blob cache (read only).
    cache: PathBuf,
    /// The guest agent to install.
    agent: PathBuf,
}

/// What a pull worker answers.
#[derive(serde::Serialize, serde::Deserialize)]
struct Pulled {
    /// The manifest's digest.
    digest: String,
    /// `rootfs.ext4`'s size.
    size: u64,
    /// Whether it made `work-seed.ext4`.
    seed: bool,
    /// Entries in the image.
    entries: u64,
    /// Bytes of file data.
    file_bytes: u64,
    /// The image's configuration.
    config: crate::model::ImageConfig,
    /// The ports its label declares.
    labeled_ports: Vec<u16>,
}

/// Where a blob a worker fetches comes from: the shared cache (root's, readable by every
/// worker) or the worker's own `blobs/`, where what it downloads goes.
struct Blobs {
    shared: PathBuf,
    own: PathBuf,
}

impl Blobs {
    fn cached(&self, desc: &oci_client::manifest::OciDescriptor) -> Result<Option<PathBuf>> {
        for dir in [&self.shared, &self.own] {
            if let Some(p) = Registry::cached(desc, dir)? {
                // One a worker cannot read (an older daemon's, root's alone) is fetched again.
                if std::fs::File::open(&p).is_ok() {
                    return Ok(Some(p));
                }
            }
        }
        Ok(None)
    }
}

/// The staging directory `dir` (just made, root's) becomes worker `uid`'s, and the blob cache
/// `cache` readable by the workers' group.
fn hand_to_worker(dir: &Path, cache: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &Path, e| failed(format!("Cannot prepare {}", what.display()), e);
    std::os::unix::fs::lchown(dir, Some(uid), Some(uid)).map_err(|e| fail(dir, e))?;
    let blobs = cache.join("sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| fail(&blobs, e))?;
    for d in [cache, &blobs] {
        std::os::unix::fs::lchown(d, Some(0), Some(crate::worker::gid()))
            .map_err(|e| fail(d, e))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| fail(d, e))?;
    }
    Ok(())
}

/// Takes a pull worker's staging directory `dir` back: root's alone again; `rootfs.ext4` and
/// `work-seed.ext4` root's when they are plain files of one link (anything else is removed
/// with the directory); each blob under `blobs/sha256/` whose contents hash to its name moves
/// into the cache `cache`, readable by workers.
fn take_back(dir: &Path, cache: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let fail = |what: &str, e| failed(format!("Cannot take back the pull's {what}"), e);
    let open = |at: Option<&std::os::fd::OwnedFd>, name: &Path, flags: i32| {
        crate::host::openat(
            at.map_or(libc::AT_FDCWD, |f| f.as_raw_fd()),
            name,
            flags | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK,
        )
    };
    let top =
        open(None, dir, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| fail("directory", e))?;
    let own = |fd: &std::os::fd::OwnedFd, gid: u32, mode: u32| -> std::io::Result<()> {
        // SAFETY: plain calls on a descriptor we own.
        unsafe {
            if libc::fchown(fd.as_raw_fd(), 0, gid) != 0 || libc::fchmod(fd.as_raw_fd(), mode) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    own(&top, 0, 0o700).map_err(|e| fail("directory", e))?;
    for name in ["rootfs.ext4", "work-seed.ext4"] {
        let f = match open(Some(&top), Path::new(name), libc::O_RDONLY) {
            Ok(f) => f,
            Err(_) => {
                // Not there, or a link: nothing to keep.
                let _ = crate::vmm::jail::remove_beneath(dir, Path::new(name));
                continue;
            }
        };
        let st = crate::host::fstat(&f).map_err(|e| fail(name, e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
            drop(f);
            let _ = crate::vmm::jail::remove_beneath(dir, Path::new(name));
            continue;
        }
        own(&f, 0, 0o600).map_err(|e| fail(name, e))?;
    }
    // Each step opened without following a link the worker may have planted.
    let dirs = libc::O_RDONLY | libc::O_DIRECTORY;
    let blobs = open(Some(&top), Path::new("blobs"), dirs)
        .and_then(|b| open(Some(&b), Path::new("sha256"), dirs));
    if let Ok(blobs) = blobs {
        let shared = open(
            None,
            &cache.join("sha256"),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .map_err(|e| fail("blobs", e))?;
        let names = std::fs::read_dir(format!("/proc/self/fd/{}", blobs.as_raw_fd()))
            .map_err(|e| fail("blobs", e))?;
        for n in names.flatten().map(|e| e.file_name()) {
            let Some(hex) = n.to_str().filter(|h| {
                h.len() == 64
                    && h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }) else {
                continue;
            };
            let Ok(f) = open(Some(&blobs), Path::new(hex), libc::O_RDONLY) else {
                continue;
            };
            let ok = crate::host::fstat(&f)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1);
            let data = std::fs::File::from(f.try_clone().map_err(|e| fail("blobs", e))?);
            if !ok || crate::model::sha256_hex_of(data).ok().as_deref() != Some(hex) {
                continue;
            }
            own(&f, crate::worker::gid(), 0o640).map_err(|e| fail("blobs", e))?;
            let name = std::ffi::CString::new(hex).expect("hex");
            // SAFETY: the name is NUL-terminated; both directories are open.
            let r = unsafe {
                libc::renameat(
                    blobs.as_raw_fd(),
                    name.as_ptr(),
                    shared.as_raw_fd(),
                    name.as_ptr(),
                )
            };
            if r != 0 {
                tracing::warn!(
                    "Cannot keep blob sha256:{hex} in the cache: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    crate::layout::remove_any(&dir.join("blobs"))
}

/// A pull worker's work (`bangerd worker pull`, see [`crate::worker`]): the request is
/// [`PullRequest`], the answer [`Pulled`].
pub(crate) fn work(request: &[u8], report: &dyn Report) -> Result<serde_json::Value> {
    let req: PullRequest = serde_json::from_slice(request)
        .map_err(|e| invalid(format!("A pull worker's request is not one: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| failed("Cannot start the worker's runtime", e))?;
    let pulled = rt.block_on(pull_into(req, report))?;
    serde_json::to_value(pulled).map_err(|e| failed("Cannot encode the pull", e))
}

/// Pulls the request's image into `rootfs.ext4` (and `work-seed.ext4`) in its staging
/// directory: manifest, configuration, layers fetched and flattened as they land, the guest
/// assets, the work seed from `/root`, and the filesystem shrunk to what it holds.
async fn pull_into(req: PullRequest, report: &dyn Report) -> Result<Pulled> {
    let r = reference::parse(&req.reference)?;
    let dir = req.staging.clone();
    report.stage("resolve", format!("Resolving {}", r.whole()));
    let registry = Registry::new(
        req.insecure,
        req.credentials
            .map(|(user, password)| crate::oci::auth::Credentials { user, password }),
    );
    let (manifest, digest) = registry.manifest(&r).await?;
    let layers: Vec<_> = manifest
        .layers
        .iter()
        .map(|d| layer_compression(&d.media_type).map(|c| (d.clone(), c)))
        .collect::<Result<_>>()?;
    report.log(
        6,
        format!("{} is {digest}, {} layer(s)", r.whole(), layers.len()),
    );
    if !(0..=1 << 20).contains(&manifest.config.size) {
        return Err(invalid(format!(
            "The image configuration of {} claims {} bytes; at most 1 MiB is read",
            r.whole(),
            manifest.config.size
        )));
    }
    let blobs = Blobs {
        shared: req.cache.clone(),
        own: dir.join("blobs"),
    };
    let config_blob = match blobs.cached(&manifest.config)? {
        Some(p) => p,
        None => {
            registry
                .fetch_blob(&r, &manifest.config, &blobs.own, |_| {})
                .await?
        }
    };
    let (labeled_ports, config) = read_image_config(&config_blob)?;

    report.stage(
        "fetch",
        format!(
            "Fetching {} layer(s), flattening each as it lands",
            layers.len()
        ),
    );
    let total: u64 = layers
        .iter()
        .map(|(d, _)| d.size.max(0) as u64)
        .sum::<u64>()
        .max(1);
    // gzip layers of OS images expand about 3×; 8× leaves room for more. An image that
    // outgrows the filesystem made for it starts over in one twice the size (its layers are
    // in the worker's blobs by then), up to what max_image_bytes allows.
    let sized =
        |bytes: u64| crate::ext4::size_for(crate::ext4::Usage { bytes, entries: 0 }, req.size, GIB);
    let mut size = sized(total.saturating_mul(8));
    let largest = sized(req.max_bytes).max(size);
    let image = dir.join("rootfs.ext4");
    let limits = Limits {
        max_bytes: req.max_bytes,
        ..Limits::default()
    };
    let stats = loop {
        let img = image.clone();
        blocking("mkfs", move || {
            crate::ext4::create_empty(&img, size, size / 16384, "rootfs")
        })
        .await?;
        report.log(7, format!("Flattening into {} bytes of ext4", size));
        let dest = Dest {
            path: image.clone(),
            agent: req.agent.clone(),
            config: config.clone(),
        };
        match fetch_and_flatten(report, &registry, &r, &layers, &blobs, dest, limits, total).await {
            Ok(stats) => break stats,
            Err(Flatten::OutOfRoom(e)) if req.size.is_none() && size < largest => {
                report.log(
                    6,
                    format!(
                        "The image outgrew the {size}-byte filesystem made for it ({}); \
                         starting over in one twice as large",
                        e.full_message()
                    ),
                );
                size = (size * 2).min(largest);
            }
            Err(Flatten::OutOfRoom(e)) if req.size.is_some() => {
                return Err(invalid(format!(
                    "The image does not fit in the {size} bytes asked for ({}); pass a larger \
                     size or none",
                    e.full_message()
                )))
            }
            Err(Flatten::OverScratch) => return Err(over_limit(req.max_bytes)),
            Err(Flatten::OutOfRoom(e)) | Err(Flatten::Failed(e)) => return Err(e),
        }
    };
    report.log(
        6,
        format!(
            "{} entries, {} bytes of files, written into ext4 as they decompressed",
            stats.entries, stats.file_bytes
        ),
    );

    report.stage("build_rootfs", "Building the work seed from /root".into());
    report.progress(0.8);
    // What `ext4::usage` would have measured of the tree: data plus a block per entry.
    let used = crate::ext4::Usage {
        bytes: stats.file_bytes + stats.entries * 4096,
        entries: stats.entries,
    };
    // The filesystem has an inode per 16 KiB: a smaller one must still hold every entry.
    let fits = crate::ext4::size_for(used, req.size, GIB)
        .max((stats.entries * 16384 * 5 / 4).div_ceil(1 << 20) << 20);
    let (img, seed_path) = (image.clone(), dir.join("work-seed.ext4"));
    let (size, seed, notes) = blocking("Work seed", move || {
        let mut notes = Vec::new();
        let seed = match work_seed(&img, &seed_path) {
            Ok(seed) => seed,
            Err(e) => {
                let _ = std::fs::remove_file(&seed_path);
                notes.push(format!("No work seed: {}", e.full_message()));
                false
            }
        };
        let size = match fits < size {
            true => match crate::ext4::shrink(&img, fits) {
                Ok(()) => fits,
                // resize2fs checks first and leaves a filesystem it cannot shrink as it was.
                Err(e) => {
                    notes.push(format!("The image keeps its size: {}", e.full_message()));
                    size
                }
            },
            false => size,
        };
        Ok((size, seed, notes))
    })
    .await?;
    for n in notes {
        report.log(4, n);
    }
    Ok(Pulled {
        digest,
        size,
        seed,
        entries: stats.entries,
        file_bytes: stats.file_bytes,
        config,
        labeled_ports,
    })
}

/// Builds the work seed from `/root` of the finished `image`, copied image to image; false
/// when the image has no `/root`.
fn work_seed(image: &Path, seed: &Path) -> Result<bool> {
    let mut w = Writer::open(image).map_err(|e| failed("Cannot open the root filesystem", e))?;
    let Some(u) = w
        .usage_of(Path::new("root"))
        .map_err(|e| failed("Cannot measure /root", e))?
    else {
        return Ok(false);
    };
    let size = crate::ext4::size_for(u, None, 64 << 20);
    crate::ext4::create_empty(seed, size, (u.entries * 2 + 4096).max(size / 16384), "work")?;
    let mut s = Writer::open(seed).map_err(|e| failed("Cannot open the work seed", e))?;
    w.copy_dir_to(Path::new("root"), &mut s)
        .map_err(|e| failed("Cannot copy /root into the work seed", e))?;
    s.close()
        .map_err(|e| failed("Cannot finish the work seed", e))?;
    Ok(true)
}

/// The OCI label an image declares its service ports with.
pub const READY_PORTS_LABEL: &str = "org.banger.ready_ports";

/// The ports of the `org.banger.ready_ports` label in an image config blob (none without it).
#[cfg(test)]
fn ready_ports_label(config: &std::path::Path) -> Result<Vec<u16>> {
    read_image_config(config).map(|(ports, _)| ports)
}

/// An image config blob's `org.banger.ready_ports` label and run settings (Env, WorkingDir,
/// User, Entrypoint, Cmd), refused when they are larger than an image needs.
fn read_image_config(config: &std::path::Path) -> Result<(Vec<u16>, crate::model::ImageConfig)> {
    let text =
        std::fs::read(config).map_err(|e| failed("Cannot read the image configuration", e))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("The image configuration is not JSON: {e}")))?;
    let run = crate::model::ImageConfig::from_oci(&v);
    if run.to_json().len() > crate::model::ImageConfig::MAX_BYTES {
        return Err(invalid(format!(
            "The image's Env, WorkingDir, User, Entrypoint and Cmd take more than {} bytes",
            crate::model::ImageConfig::MAX_BYTES
        )));
    }
    let ports = match v["config"]["Labels"][READY_PORTS_LABEL].as_str() {
        Some(s) => crate::model::parse_ready_ports(s)
            .map_err(|e| invalid(format!("The image's label {READY_PORTS_LABEL}: {e}"))),
        None => Ok(Vec::new()),
    }?;
    Ok((ports, run))
}

impl Images {
    /// Pulls a catalog bundle: download (hashed and checked before anything is unpacked),
    /// unpack with the hardened flattener, take `rootfs.ext4` (and `work-seed.ext4`), publish.
    async fn pull_bundle(
        &self,
        uid: u32,
        entry: crate::bundle::CatalogEntry,
        opts: PullOptions,
    ) -> Result<Arc<Job>> {
        let name = opts.name.clone().unwrap_or_else(|| entry.name.clone());
        validate_name(NameKind::Image, &name)?;
        // Under the catalog's own name it is the system's image, whoever pulls it.
        let owner = if name == entry.name { SYSTEM_UID } else { uid };
        self.check_name_free(
            &name,
            owner,
            "pass another name (--name) or delete it first",
        )
        .await?;
        let spec = JobSpec {
            kind: "pull-image".into(),
            target: format!("catalog:{}", entry.name),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let this = self.clone();
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            let id = new_id();
            let staging = Staging::create(
                this.layout
                    .images_dir()
                    .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
            )?;
            let dir = staging.path().to_owned();
            let url = entry.url.clone().unwrap_or_default();
            let sha = entry.sha256.clone().unwrap_or_default();
            let max = this.config.max_image_bytes;
            ctx.stage("download", format!("Fetching {url}"));
            let bundle =
                crate::bundle::download(&url, &sha, &dir, max, |f| ctx.progress(0.7 * f)).await?;
            ctx.stage("unpack", "Unpacking the verified bundle");
            ctx.progress(0.7);
            let d = dir.clone();
            let (manifest, seed, size) = blocking("Unpack", move || {
                let tree = crate::bundle::unpack(&bundle, &d, max)?;
                let manifest = crate::bundle::manifest(&tree)?;
                let rootfs = crate::bundle::regular(&tree, "rootfs.ext4")?
                    .ok_or_else(|| invalid("The image bundle has no rootfs.ext4"))?;
                check_ext4(&rootfs)?;
                let seed = crate::bundle::regular(&tree, "work-seed.ext4")?;
                let mv = |from: &Path, to: &str| {
                    std::fs::rename(from, d.join(to))
                        .map_err(|e| failed("Cannot stage the bundle's files", e))
                };
                mv(&rootfs, "rootfs.ext4")?;
                if let Some(s) = &seed {
                    check_ext4(s)?;
                    mv(s, "work-seed.ext4")?;
                }
                crate::layout::remove_any(&tree)
                    .and_then(|_| crate::layout::remove_any(&bundle))
                    .map_err(|e| failed("Cannot clean the bundle up", e))?;
                let size = std::fs::metadata(d.join("rootfs.ext4"))
                    .map_err(|e| failed("Cannot stage the bundle's files", e))?
                    .len();
                Ok((manifest, seed.is_some(), size))
            })
            .await?;
            crate::model::check_ready_ports(&manifest.ready_ports)?;
            ctx.stage("publish", format!("Publishing image {name}"));
            let final_dir = this.layout.images_dir().join(&id);
            let image = Image {
                id,
                name,
                managed: true,
                source: format!("catalog:{} ({url})", entry.name),
                rootfs_path: final_dir.join("rootfs.ext4"),
                work_seed_path: seed.then(|| final_dir.join("work-seed.ext4")),
                kernel: opts.kernel.clone().or(manifest.kernel),
                size_bytes: size,
                created_at: crate::model::now_us(),
                ready_ports: opts.ready_ports.clone().unwrap_or(manifest.ready_ports),
                config: Default::default(),
                owner_uid: owner,
            };
            this.publish(staging, image).await.map(|_| ())
        }))
    }
}

/// Refuses a file that is not an ext4 filesystem (its superblock magic).
fn check_ext4(path: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| failed("Cannot read the bundle", e))?;
    let mut magic = [0u8; 2];
    let ok = f.seek(SeekFrom::Start(1024 + 56)).is_ok() && f.read_exact(&mut magic).is_ok();
    if !ok || magic != [0x53, 0xef] {
        return Err(invalid(format!(
            "The bundle's {} is not an ext4 filesystem",
            path.file_name().unwrap_or_default().to_string_lossy()
        )));
    }
    Ok(())
}

fn over_limit(max_bytes: u64) -> Error {
    invalid(format!(
        "The image expands past max_image_bytes ({max_bytes} bytes); raise \
         max_image_bytes in the configuration if the image is genuine"
    ))
}

/// Where a pull's layers go: straight into an empty ext4 image; the guest assets are
/// injected after the last layer.
struct Dest {
    path: PathBuf,
    agent: PathBuf,
    config: crate::model::ImageConfig,
}

/// How a fetch-and-flatten ended when it did not finish.
enum Flatten {
    /// The tree reached its byte limit.
    OverScratch,
    /// The ext4 image ran out of blocks or inodes.
    OutOfRoom(Error),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for Flatten {
    fn from(e: Error) -> Self {
        Flatten::Failed(e)
    }
}

/// Applies each opened layer in turn, then finishes the flattening.
fn apply_layers<T: Tree>(
    mut f: Flattener<T>,
    opened: std::sync::mpsc::Receiver<Result<InflatedReader>>,
    done_count: &std::sync::atomic::AtomicUsize,
) -> Result<(crate::oci::flatten::Stats, T), Flatten> {
    let mut waited = std::time::Instant::now();
    for (i, layer) in opened.into_iter().enumerate() {
        let started = std::time::Instant::now();
        let r = f.apply_layer(layer?);
        tracing::debug!(
            "Layer {} applied in {:?} (waited {:?} for it)",
            i + 1,
            started.elapsed(),
            started - waited
        );
        waited = std::time::Instant::now();
        done_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match r {
            Ok(()) => {}
            Err(FlattenError::TooLarge { what: "bytes", .. }) => return Err(Flatten::OverScratch),
            Err(e) => {
                let e = failed("Cannot flatten the image", e);
                return Err(if storage_full(&e) {
                    Flatten::OutOfRoom(e)
                } else {
                    Flatten::Failed(invalid(e.full_message()))
                });
            }
        }
    }
    f.finish()
        .map_err(|e| room_or_failed(failed("Cannot flatten the image", e)))
}

/// Whether `e` comes from a filesystem out of blocks or inodes.
fn storage_full(e: &Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn room_or_failed(e: Error) -> Flatten {
    if storage_full(&e) {
        Flatten::OutOfRoom(e)
    } else {
        Flatten::Failed(e)
    }
}

/// Fetches the layers the caches lack into the worker's own blobs and flattens them into the
/// ext4 image `dest` as they land, in manifest order on a blocking thread: a layer the
/// flattener is ready for is streamed to it while it downloads (so one download and its
/// extraction overlap), one that comes while it is still busy is downloaded and read from
/// there after. A streamed layer's digest is checked when its download ends: a mismatch fails
/// the pull and the image is thrown away with the staging directory.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_flatten(
    ctx: &dyn Report,
    registry: &Registry,
    r: &Reference,
    layers: &[(oci_client::manifest::OciDescriptor, Compression)],
    blobs: &Blobs,
    dest: Dest,
    limits: Limits,
    total: u64,
) -> Result<crate::oci::flatten::Stats, Flatten> {
    let (tx, rx) = std::sync::mpsc::channel::<(LayerSource, Compression)>();
    // How many layers the flattener has finished.
    let applied = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done_count = applied.clone();
    let flatten = crate::jobs::spawn_blocking(move || {
        // Layers are opened (their decompression started) one ahead of the one being
        // applied, which is always applied in manifest order.
        let (opened_tx, opened) = std::sync::mpsc::sync_channel(0);
        std::thread::spawn(move || {
            for (src, c) in rx {
                if opened_tx.send(inflating(src, c)).is_err() {
                    break;
                }
            }
        });
        let Dest {
            path,
            agent,
            config,
        } = dest;
        let w =
            Writer::open(&path).map_err(|e| failed("Cannot open the new root filesystem", e))?;
        let (stats, mut w) = apply_layers(Flattener::new(w, limits), opened, &done_count)?;
        guest::inject(&mut w, &agent).map_err(room_or_failed)?;
        guest::inject_config(&mut w, &config).map_err(room_or_failed)?;
        w.close()
            .map_err(|e| room_or_failed(failed("Cannot finish the root filesystem", e)))?;
        Ok(stats)
    });
    let cache = &blobs.own;
    let got_total = AtomicU64::new(0);
    let tx_ref = &tx;
    // Up to DOWNLOADS layers download at once (registries serve layers in parallel, and
    // skopeo and docker fetch them so); their results come back in manifest order. A
    // layer the flattener is ready for when its download starts is streamed into it.
    let mut downloads = Box::pin(
        futures_util::stream::iter(layers.iter().cloned().enumerate())
            .map(|(i, (desc, c))| {
                let (cache, applied, got_total) = (cache, &applied, &got_total);
                async move {
                    let mut last = 0u64;
                    let progress = move |got: u64| {
                        let now = got_total.fetch_add(got - last, Ordering::SeqCst) + got - last;
                        last = got;
                        ctx.progress(0.5 * now as f64 / total as f64);
                    };
                    let desc = &desc;
                    let src = match blobs.cached(desc)? {
                        Some(p) => Some(LayerSource::File(p)),
                        None if applied.load(Ordering::SeqCst) == i => {
                            // Every layer before this one is applied, so sent: this send keeps
                            // manifest order. It fails only when the flattener stopped on an
                            // error, which it reports.
                            let (chunks, stream) = tokio::sync::mpsc::channel(64);
                            if tx_ref.send((LayerSource::Stream(stream), c)).is_ok() {
                                registry
                                    .fetch_blob_tee(r, desc, cache, progress, Some(chunks))
                                    .await?;
                            }
                            None
                        }
                        None => Some(LayerSource::File(
                            registry.fetch_blob(r, desc, cache, progress).await?,
                        )),
                    };
                    Ok::<_, Error>(src.map(|s| (s, c)))
                }
            })
            .buffered(DOWNLOADS),
    );
    let mut fetched: Result<()> = Ok(());
    while let Some(result) = downloads.next().await {
        match result {
            Ok(None) => {}
            Ok(Some(layer)) => {
                if tx.send(layer).is_err() {
                    break;
                }
            }
            Err(e) => {
                fetched = Err(e);
                break;
            }
        }
    }
    drop(downloads);
    drop(tx);
    ctx.stage(
        "flatten",
        "Applying the last layers in manifest order".into(),
    );
    ctx.progress(0.5);
    let flattened = flatten
        .await
        .map_err(|e| failed("Flatten task failed", e))?;
    fetched?;
    flattened
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn the_label_gives_the_ports_and_bad_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c");
        let with = |labels: serde_json::Value| {
            std::fs::write(
                &p,
                serde_json::json!({"config": {"Labels": labels}}).to_string(),
            )
            .unwrap();
            ready_ports_label(&p)
        };
        assert_eq!(
            with(serde_json::json!({READY_PORTS_LABEL: "8080, 5432"})).unwrap(),
            [8080, 5432]
        );
        assert_eq!(
            with(serde_json::json!({"other": "x"})).unwrap(),
            Vec::<u16>::new()
        );
        assert_eq!(with(serde_json::json!(null)).unwrap(), Vec::<u16>::new());
        for bad in [
            "0",
            "70000",
            "http",
            "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
        ] {
            assert!(
                with(serde_json::json!({READY_PORTS_LABEL: bad})).is_err(),
                "{bad}"
            );
        }
    }
}

#[cfg(test)]
mod take_back_tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// What a worker left is taken back without following it: a root filesystem that is a
    /// link out, a work seed hard-linked elsewhere, a blob that is a link and one whose bytes
    /// are not its name are all dropped, the file outside untouched; a true blob joins the
    /// cache readable by workers only.
    #[test]
    fn a_workers_plants_are_dropped_and_nothing_outside_is_touched() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (dir, cache, outside) = (t.path().join("s"), t.path().join("c"), t.path().join("o"));
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(cache.join("sha256")).unwrap();
        std::fs::write(&outside, b"host file").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("rootfs.ext4")).unwrap();
        std::fs::hard_link(&outside, dir.join("work-seed.ext4")).unwrap();
        let good = b"a layer";
        let hex = crate::model::sha256_hex_of(&good[..]).unwrap();
        let blobs = dir.join("blobs/sha256");
        std::fs::write(blobs.join(&hex), good).unwrap();
        std::fs::write(blobs.join("0".repeat(64)), b"not what its name says").unwrap();
        std::os::unix::fs::symlink(&outside, blobs.join("1".repeat(64))).unwrap();
        super::take_back(&dir, &cache).unwrap();
        let m = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid()),
            (0o644, 0),
            "the host file is as it was"
        );
        assert_eq!(std::fs::read(&outside).unwrap(), b"host file");
        for gone in ["rootfs.ext4", "work-seed.ext4", "blobs"] {
            assert!(dir.join(gone).symlink_metadata().is_err(), "{gone} stayed");
        }
        let kept: Vec<_> = std::fs::read_dir(cache.join("sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(kept, std::slice::from_ref(&hex));
        let m = std::fs::metadata(cache.join("sha256").join(&hex)).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o640, 0, crate::worker::gid())
        );
    }
}
