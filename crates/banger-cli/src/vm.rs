//! `banger vm …`.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::transport::{self, table, Fields, Opt, Opts, Transport};
use super::Output;

/// VM verbs.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List VMs (banger's own template VMs, named `.warm-…`, only with --all).
    List {
        /// Also the VMs whose names start with a dot (banger's warm-snapshot templates).
        #[arg(long, short)]
        all: bool,
        /// Only your VMs with this label, KEY=VALUE (repeatable: all of them).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
    },
    /// Create a VM and start it, following its stages until it is ready.
    Create {
        /// VM name.
        name: String,
        /// What the VM is made of.
        #[command(flatten)]
        spec: VmSpec,
        /// Root disk size: bytes, or with a unit (10G); at least the image's.
        #[arg(long, value_parser = super::parse_bytes)]
        disk_size: Option<u64>,
        /// Reserve it only; start it later with `banger vm start`.
        #[arg(long)]
        no_start: bool,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Create a VM (pulling the default image and kernel when missing), wait until it is
    /// ready, then open an SSH session in it, or run COMMAND through the agent.
    Run {
        /// VM name (a generated one when omitted).
        name: Option<String>,
        /// What the VM is made of.
        #[command(flatten)]
        spec: VmSpec,
        /// Delete the VM when the session or command ends.
        #[arg(long)]
        rm: bool,
        /// Open a shell through the agent instead of SSH (the default when you have no SSH
        /// key).
        #[arg(long, conflicts_with = "entrypoint")]
        shell: bool,
        /// Run this instead of a shell; exits with its status.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Open an SSH session in a running VM (or run COMMAND there) with the system's ssh, the
    /// VM's address and a known_hosts entry banger keeps for it.
    Ssh {
        /// VM name or id.
        name: String,
        /// Private key to log in with (default: the one beside the key `vm create` passed).
        #[arg(long, short = 'i')]
        identity: Option<std::path::PathBuf>,
        /// The remote command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Start a stopped VM and follow it until it is ready.
    Start {
        /// VM name or id.
        name: String,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a VM: a clean power-off, then a kill after the timeout.
    Stop {
        /// VM name or id.
        name: String,
        /// Kill it at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Delete a VM and its disks.
    Delete {
        /// VM name or id.
        name: String,
        /// Delete it even while it runs.
        #[arg(long)]
        force: bool,
    },
    /// Show a VM's properties.
    Show {
        /// VM name or id.
        name: String,
    },
    /// Run a command in a running VM through its agent; exits with the command's status.
    Exec {
        /// VM name or id.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
        /// Extra environment for the command, KEY=VALUE (repeatable), over the image's.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory (default: the image's WorkingDir, else the user's home).
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// User, group: name or number, e.g. app or 1000:1000 (default: the image's User,
        /// else root).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Run it on a terminal of its own (raw mode here: Ctrl-C reaches it).
        #[arg(long, short = 't')]
        tty: bool,
    },
    /// Copy files or directory trees in or out of a running VM through its agent: SRC VM:DST
    /// or VM:SRC DST (modes, mtimes and symbolic links kept).
    Cp {
        /// Source: a host path or VM:PATH.
        src: String,
        /// Destination: a host path or VM:PATH (into it when it is a directory).
        dst: String,
    },
    /// A login shell in a running VM through its agent, on a terminal of its own (no SSH).
    Shell {
        /// VM name or id.
        name: String,
        /// User (default: the image's User, else root).
        #[arg(long, short = 'u')]
        user: Option<String>,
    },
    /// Snapshot a running VM (memory, devices and disks) under a name; it keeps running.
    Snapshot {
        /// VM name or id.
        name: String,
        /// The snapshot's name.
        snapshot: String,
        /// Leave the VM paused afterwards.
        #[arg(long)]
        pause: bool,
    },
    /// Fork a running VM: snapshot it (as NEW) and start COUNT VMs from that snapshot, each
    /// with its own name, address, MAC and keys; the source keeps running.
    Fork {
        /// The VM to fork.
        name: String,
        /// The new VM's name (NEW-1 … NEW-COUNT with --count above 1).
        new: String,
        /// How many VMs.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Give a VM a lifetime from now (0: none); when it runs out the VM is deleted, or
    /// stopped or paused as it was created to be (--on-expire).
    Timeout {
        /// VM name or id.
        name: String,
        /// How long: seconds, or with a unit (90s, 10m, 2h, 1d); 0 for none.
        #[arg(value_parser = super::parse_duration_sec)]
        duration: u32,
    },
    /// Pause a running VM: its vCPUs stop, its memory is kept.
    Pause {
        /// VM name or id.
        name: String,
    },
    /// Resume a paused VM where it was.
    Resume {
        /// VM name or id.
        name: String,
    },
    /// Print the VM's serial console log of its last boot.
    Logs {
        /// VM name or id.
        name: String,
        /// Keep printing what the console writes.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// The options `vm create` and `vm run` share.
#[derive(Debug, clap::Args)]
pub struct VmSpec {
    /// Image name (the configured default image when omitted).
    #[arg(long)]
    image: Option<String>,
    /// Kernel name (the image's, else the configured default, when omitted).
    #[arg(long)]
    kernel: Option<String>,
    /// Virtual CPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory: MiB, or with a unit (512M, 2G).
    #[arg(long, value_parser = super::parse_memory_mib)]
    memory: Option<u32>,
    /// Public key for root's authorized_keys (default: ~/.ssh/id_ed25519.pub, id_ecdsa.pub
    /// or id_rsa.pub, the first that exists).
    #[arg(long, value_name = "FILE.pub")]
    pub(super) ssh_key: Option<std::path::PathBuf>,
    /// isolated (the default: no other guest) or shared (your other shared VMs).
    #[arg(long)]
    network: Option<String>,
    /// Only these destinations, CIDR[:PORT] (repeatable); the host's walls still apply.
    #[arg(long, value_name = "CIDR[:PORT]")]
    egress: Vec<String>,
    /// The guest's init: a path in the image, or "banger" for banger's minimal init (the
    /// default: the image's /sbin/init, else banger's).
    #[arg(long, value_name = "PATH|banger")]
    init: Option<String>,
    /// Run the image's Entrypoint and Cmd as the VM's main process (`vm run`: the command
    /// after -- replaces Cmd); the VM powers off when it exits.
    #[arg(long)]
    pub(super) entrypoint: bool,
    /// Publish a guest port on the host, [ADDR:]HOSTPORT:GUESTPORT[/udp] (repeatable; ADDR
    /// 127.0.0.1 by default; TCP unless /udp).
    #[arg(long, short = 'p', value_name = "[ADDR:]HOST:GUEST[/udp]")]
    publish: Vec<String>,
    /// Share a host folder of yours with the guest, HOSTDIR:GUESTDIR[:ro] (repeatable;
    /// virtio-fs, the guest's root acting as you in it).
    #[arg(long, short = 'v', value_name = "HOSTDIR:GUESTDIR[:ro]")]
    share: Vec<String>,
    /// Boot a host folder of yours as the VM's root filesystem instead of an image
    /// (virtio-fs, read-write, never copied: what the guest writes is in the folder, as you).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["image", "snapshot"])]
    rootfs: Option<std::path::PathBuf>,
    /// Put the VM on a network namespace's eth0 instead of banger's network (root only; the
    /// namespace's address, MAC and routes become the guest's, as for a containerd pod).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["publish", "egress"])]
    netns: Option<String>,
    /// Restore this snapshot instead of booting (`banger snapshot list`): the VM goes on
    /// where the snapshot's VM was, with its own name, address and keys.
    #[arg(long, value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Boot, even when a warm snapshot of this image and shape would start the VM instantly.
    #[arg(long)]
    cold: bool,
    /// A label, KEY=VALUE (repeatable), which `vm list --label` finds it by.
    #[arg(long, value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// A lifetime: the VM ends this long after its creation (90s, 10m, 2h, 1d; `vm timeout`
    /// changes it).
    #[arg(long, value_parser = super::parse_duration_sec, value_name = "DURATION")]
    timeout: Option<u32>,
    /// What ends it then: delete (the default), stop or pause.
    #[arg(long, value_name = "delete|stop|pause", requires = "timeout")]
    on_expire: Option<String>,
}

/// `KEY=VALUE` arguments as labels.
fn parse_labels(args: &[String]) -> anyhow::Result<transport::Labels> {
    Ok(crate::model::parse_label_filter(args)?)
}

impl VmSpec {
    /// The `CreateVM` options these make, the public key read from its file.
    fn opts(&self) -> anyhow::Result<Opts> {
        let key = read_public_key(self.ssh_key.clone())?;
        let shares = self.shares()?;
        let rootfs = match &self.rootfs {
            Some(d) => {
                let dir = std::fs::canonicalize(d)
                    .with_context(|| format!("--rootfs: cannot reach {}", d.display()))?;
                anyhow::ensure!(dir.is_dir(), "--rootfs: {} is not a folder", dir.display());
                Some(Opt::Str(dir.to_string_lossy().into_owned()))
            }
            None => None,
        };
        let list = |l: &Vec<String>| (!l.is_empty()).then(|| Opt::Strs(l.clone()));
        Ok([
            ("image", self.image.clone().map(Opt::Str)),
            ("kernel", self.kernel.clone().map(Opt::Str)),
            ("vcpus", self.vcpus.map(Opt::U32)),
            ("memory_mib", self.memory.map(Opt::U32)),
            ("ssh_key", key.map(Opt::Str)),
            ("network", self.network.clone().map(Opt::Str)),
            ("egress", list(&self.egress)),
            ("init", self.init.clone().map(Opt::Str)),
            ("entrypoint", self.entrypoint.then_some(Opt::Bool(true))),
            ("publish", list(&self.publish)),
            (
                "shares",
                (!shares.is_empty()).then_some(Opt::Shares(shares)),
            ),
            ("snapshot", self.snapshot.clone().map(Opt::Str)),
            ("rootfs_dir", rootfs),
            ("netns", self.netns.clone().map(Opt::Str)),
            ("cold", self.cold.then_some(Opt::Bool(true))),
            ("timeout_sec", self.timeout.map(Opt::U32)),
            ("on_expire", self.on_expire.clone().map(Opt::Str)),
            (
                "labels",
                (!self.label.is_empty())
                    .then(|| parse_labels(&self.label).map(Opt::Labels))
                    .transpose()?,
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
    }

    /// The `--share` folders as `shares` entries: each host folder made absolute and checked
    /// here, as the caller, for a clear early error (the daemon checks again with the
    /// caller's rights).
    fn shares(&self) -> anyhow::Result<Vec<(String, String, bool)>> {
        self.share
            .iter()
            .map(|spec| {
                let s = crate::model::Share::parse_cli(spec)?;
                let host = std::fs::canonicalize(&s.host)
                    .with_context(|| format!("--share {spec}: cannot reach {}", s.host))?;
                anyhow::ensure!(
                    host.is_dir(),
                    "--share {spec}: {} is not a folder",
                    host.display()
                );
                Ok((host.to_string_lossy().into_owned(), s.guest, s.read_only))
            })
            .collect()
    }
}

/// Image names by id (empty when the images cannot be listed).
async fn image_names(t: &mut impl Transport) -> std::collections::HashMap<String, String> {
    t.images()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or("").to_owned();
            (s("id"), s("name"))
        })
        .collect()
}

/// Runs `what` in VM `name` through its agent with this process's streams; its status.
async fn exec_in(
    t: &mut impl Transport,
    name: &str,
    what: crate::agent::ExecRequest,
) -> anyhow::Result<i32> {
    exec_on(t.open_agent(name).await?, what).await
}

/// What `vm exec` asks the agent to run.
pub(super) fn exec_request(
    command: Vec<String>,
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    tty: bool,
) -> crate::agent::ExecRequest {
    crate::agent::ExecRequest {
        argv: command,
        env,
        cwd: workdir,
        user,
        tty: tty.then(super::term::tty),
        ..Default::default()
    }
}

/// A login shell of `user` (else root) on a terminal of its own.
pub(super) fn shell_request(user: Option<String>) -> crate::agent::ExecRequest {
    crate::agent::ExecRequest {
        user,
        tty: Some(super::term::tty()),
        ..Default::default()
    }
}

/// Ends the CLI with `code` once stdout is flushed: the blocking stdin reader an exec leaves
/// would keep the runtime alive.
pub(super) async fn leave(code: i32) -> ! {
    let _ = tokio::io::stdout().flush().await;
    std::process::exit(code)
}

/// Prints the main process's output from the console log `console` (`OpenConsole`).
pub(super) async fn print_main_output(console: std::os::fd::OwnedFd) {
    let text = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = std::fs::File::from(console).read_to_string(&mut s);
        s
    })
    .await
    .unwrap_or_default();
    print!("{}", main_output(&text));
}

/// Runs `what` on `agent`, a stream to the VM's agent (`OpenAgent`), with this process's
/// streams; its status.
pub(super) async fn exec_on(
    agent: std::os::fd::OwnedFd,
    what: crate::agent::ExecRequest,
) -> anyhow::Result<i32> {
    let s = std::os::unix::net::UnixStream::from(agent);
    s.set_nonblocking(true)?;
    let s = tokio::net::UnixStream::from_std(s)?;
    // On a terminal: raw mode for as long as the command runs, and its size as it changes;
    // without one, this process's signals for the command.
    let tty = what.tty.is_some();
    let raw = tty.then(super::term::RawMode::enter);
    let controls = Some(super::term::controls(tty));
    let code = crate::agent::client::exec_with(
        s,
        what,
        tokio::io::stdin(),
        tokio::io::stdout(),
        tokio::io::stderr(),
        controls,
    )
    .await;
    drop(raw);
    Ok(code?)
}

/// The user's default public key: `~/.ssh/id_ed25519.pub`, `id_ecdsa.pub`, `id_rsa.pub`.
pub fn default_public_key() -> Option<std::path::PathBuf> {
    let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
    ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
        .iter()
        .map(|f| home.join(".ssh").join(f))
        .find(|p| p.is_file())
}

/// The key `--ssh-key` names (which must exist), else the default one, if any.
pub(super) fn read_public_key(path: Option<std::path::PathBuf>) -> anyhow::Result<Option<String>> {
    let Some(path) = path.or_else(default_public_key) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("Cannot read the SSH public key {}", path.display()))?;
    Ok(Some(text.trim().to_owned()))
}

/// Where banger keeps the known_hosts entries of VMs for this user.
fn known_hosts_file() -> anyhow::Result<std::path::PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => std::path::PathBuf::from(d),
        _ => std::path::PathBuf::from(
            std::env::var_os("HOME").context("HOME is not set; cannot keep known_hosts")?,
        )
        .join(".local/state"),
    };
    Ok(base.join("banger").join("known_hosts"))
}

/// The known_hosts text with the VM's entry (alias `banger-<id>`) replaced by `key`.
pub fn known_hosts_with(existing: &str, alias: &str, key: &str) -> String {
    let mut out: String = existing
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(alias))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut fields = key.split_whitespace();
    if let (Some(kind), Some(body)) = (fields.next(), fields.next()) {
        out.push_str(&format!("{alias} {kind} {body}\n"));
    }
    out
}

/// The system `ssh` set up for the VM: its address, root, the host key banger made for it
/// (strict checking against banger's own known_hosts file), the user's key.
/// `ssh` into VM `name` as root, its host key pinned.
async fn ssh_command(
    t: &mut impl Transport,
    name: &str,
    identity: Option<std::path::PathBuf>,
    command: Vec<String>,
) -> anyhow::Result<std::process::Command> {
    let vm = t.vm_info(name).await?;
    ssh_command_for(
        name,
        &vm.ssh_address,
        &vm.id,
        &vm.ssh_host_key,
        identity,
        command,
    )
}

/// [`ssh_command`] for a VM whose SSH address, id and host key are known.
pub(super) fn ssh_command_for(
    name: &str,
    address: &str,
    id: &str,
    host_key: &str,
    identity: Option<std::path::PathBuf>,
    command: Vec<String>,
) -> anyhow::Result<std::process::Command> {
    let Some((host, port)) = address.rsplit_once(':') else {
        anyhow::bail!(
            "VM {name} has no SSH address: it is not running, or its image has no sshd \
             (`banger vm exec {name} -- CMD` works without one)"
        );
    };
    let alias = format!("banger-{id}");
    let file = known_hosts_file()?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    let existing = std::fs::read_to_string(&file).unwrap_or_default();
    let text = known_hosts_with(&existing, &alias, host_key);
    std::fs::write(&file, text).with_context(|| format!("Cannot write {}", file.display()))?;
    let identity = identity.or_else(|| default_public_key().map(|k| k.with_extension("")));
    let mut ssh = std::process::Command::new("ssh");
    ssh.arg("-o")
        .arg(format!("UserKnownHostsFile={}", file.display()))
        .args(["-o", "GlobalKnownHostsFile=/dev/null"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", "UpdateHostKeys=no"])
        .args(["-o", &format!("HostKeyAlias={alias}")])
        .args(["-o", "LogLevel=ERROR"]);
    if let Some(i) = identity.filter(|i| i.is_file()) {
        ssh.arg("-i").arg(i);
    }
    ssh.args(["-p", port, "-l", "root", host]);
    if !command.is_empty() {
        ssh.arg("--").args(command);
    }
    Ok(ssh)
}

/// A name like `brisk-otter-3f`, for `vm run` without one.
pub(super) fn generated_name() -> String {
    const ADJ: &[&str] = &[
        "brisk", "calm", "eager", "fuzzy", "gentle", "humble", "jolly", "keen", "lucid", "mellow",
        "nimble", "plucky", "quiet", "rapid", "sunny", "tidy",
    ];
    const NOUN: &[&str] = &[
        "otter", "falcon", "badger", "heron", "lynx", "marten", "newt", "orca", "panda", "quail",
        "raven", "stoat", "tapir", "vole", "wren", "yak",
    ];
    let id = crate::model::new_id();
    let b = u64::from_str_radix(&id, 16).unwrap_or(0);
    format!(
        "{}-{}-{}",
        ADJ[(b & 15) as usize],
        NOUN[((b >> 4) & 15) as usize],
        &id[4..6]
    )
}

/// `vm show`: the VM's properties (the image by name too, and its walls in words).
async fn show(out: &Output, t: &mut impl Transport, name: &str) -> anyhow::Result<()> {
    let mut fields = t.vm(name).await?;
    let get = |fields: &Fields, k: &str| {
        fields
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    // The image by name as well as by id.
    let image = get(&fields, "Image")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let image_name = image_names(t)
        .await
        .get(&image)
        .cloned()
        .unwrap_or_default();
    fields.insert(5, ("ImageName".into(), json!(image_name)));
    // The walls the VM lives behind, in words.
    let network = get(&fields, "Network")
        .as_str()
        .and_then(crate::model::NetworkMode::parse)
        .unwrap_or_default();
    let egress: Vec<String> = serde_json::from_value(get(&fields, "Egress")).unwrap_or_default();
    let walls = json!(crate::net::walls::describe(network, &egress));
    match fields.iter().position(|(k, _)| k == "Path") {
        Some(at) => fields.insert(at, ("Walls".into(), walls)),
        None => fields.push(("Walls".into(), walls)),
    }
    // People read the owner's name and the time; programs (--json) keep the uid and
    // the µs.
    if !out.json {
        for (k, v) in fields.iter_mut() {
            match (k.as_str(), v.as_u64()) {
                ("Owner", Some(uid)) => *v = json!(format!("{} ({uid})", super::owner_name(uid))),
                ("CreatedAt", Some(us)) => *v = json!(super::utc_time(us)),
                _ => {}
            }
        }
    }
    transport::show(out, &fields);
    Ok(())
}

/// After a failed create or start, the console's tail (see [`print_console_tail`]).
async fn tail_on_failure<T>(
    t: &mut impl Transport,
    name: &str,
    r: anyhow::Result<T>,
) -> anyhow::Result<T> {
    if let Err(e) = &r {
        if e.is::<super::JobFailed>() {
            print_console_tail(t, name).await;
        }
    }
    r
}

/// `vm run`: a VM made (or, of yours, entered again) and a session in it: its main
/// process, a command, a shell through the agent, or SSH; with `rm`, the VM goes after.
async fn run_vm(
    out: &Output,
    t: &mut impl Transport,
    name: Option<String>,
    spec: VmSpec,
    rm: bool,
    shell: bool,
    command: Vec<String>,
) -> anyhow::Result<()> {
    let name = name.unwrap_or_else(generated_name);
    // SSH with a key, else the agent's shell: never a password prompt.
    let shell = shell || (spec.ssh_key.is_none() && default_public_key().is_none());
    let mut opts = spec.opts()?;
    if spec.entrypoint && !command.is_empty() {
        opts.push(("command", Opt::Strs(command.clone())));
    }
    let followed = match t.create_vm(out, &name, opts, true).await {
        Ok(_) => Ok(()),
        // A VM of the caller's of that name, run again (the next day): started when
        // stopped and entered, as `machinectl shell` and `docker start -ai` do. Not
        // with --rm, which asks for a VM of its own to throw away.
        Err(e) if super::refusal(&e) == Some("AlreadyExists") && !rm => {
            let vm = t.vm_info(&name).await?;
            // SAFETY: getuid cannot fail.
            if vm.owner != u64::from(unsafe { libc::getuid() }) {
                return Err(e);
            }
            out.say(&format!(
                "VM {name} exists: entering it (options apply only to a new VM)"
            ));
            match vm.state.as_str() {
                "running" => Ok(()),
                "paused" => Err(anyhow::anyhow!(
                    "VM {name} is paused; `banger vm resume {name}`, then run it again"
                )),
                _ => t.start_vm(out, &name, true).await.map(|_| ()),
            }
        }
        Err(e) if e.is::<super::JobFailed>() => Err(e),
        Err(e) => return Err(e),
    };
    let followed = tail_on_failure(t, &name, followed).await;
    let code = match followed {
        Err(e) => Err(e),
        Ok(()) if spec.entrypoint => main_process(t, &name).await,
        Ok(()) if !command.is_empty() => {
            exec_in(t, &name, crate::agent::ExecRequest::new(command)).await
        }
        Ok(()) if shell => exec_in(t, &name, shell_request(None)).await,
        Ok(()) => {
            let identity = spec.ssh_key.map(|k| k.with_extension(""));
            let mut ssh = ssh_command(t, &name, identity, Vec::new()).await?;
            let status = ssh.status().context("Cannot run ssh")?;
            Ok(status.code().unwrap_or(255))
        }
    };
    if rm {
        if let Err(e) = t.delete_vm(&name, vec![("force", Opt::Bool(true))]).await {
            eprintln!("banger: cannot delete VM {name}: {e}");
        }
    }
    leave(code?).await;
}

/// Runs a VM verb over `t`.
pub(crate) async fn run(
    out: &Output,
    t: &mut impl Transport,
    cmd: VmCommand,
) -> anyhow::Result<()> {
    match cmd {
        VmCommand::List { all, label } => {
            let names = image_names(t).await;
            let mut vms = t.vms(&parse_labels(&label)?).await?;
            vms.retain(|v| all || !v["name"].as_str().unwrap_or("").starts_with('.'));
            t.fill_host_memory(&mut vms).await?;
            for v in &mut vms {
                let id = v["image"].as_str().unwrap_or("").to_owned();
                v["image_name"] = json!(names.get(&id).cloned().unwrap_or_default());
                let bytes = v["host_memory_bytes"].as_u64().unwrap_or_default();
                v["host_memory_mib"] = json!(bytes >> 20);
            }
            table(
                out,
                &["NAME", "ID", "STATE", "IMAGE", "IMAGE ID", "HOST MiB"],
                &[
                    "name",
                    "id",
                    "state",
                    "image_name",
                    "image",
                    "host_memory_mib",
                ],
                &vms,
            );
        }
        VmCommand::Create {
            name,
            spec,
            disk_size,
            no_start,
            no_wait,
        } => {
            let mut opts = spec.opts()?;
            opts.extend(disk_size.map(|d| ("disk_size", Opt::U64(d))));
            opts.extend(no_start.then_some(("start", Opt::Bool(false))));
            // With --json, stdout gets the VM as `vm show` prints it (what a program
            // creating a VM wants next); the stages still go to stderr.
            let created = t
                .create_vm(&Output { json: false }, &name, opts, !no_wait)
                .await;
            let job = tail_on_failure(t, &name, created).await?;
            if no_wait {
                transport::show(out, &job);
            } else if out.json {
                show(out, t, &name).await?;
            } else {
                println!(
                    "VM {name} is {}",
                    if no_start { "created" } else { "running" }
                );
            }
        }
        VmCommand::Run {
            name,
            spec,
            rm,
            shell,
            command,
        } => run_vm(out, t, name, spec, rm, shell, command).await?,
        VmCommand::Ssh {
            name,
            identity,
            command,
        } => {
            use std::os::unix::process::CommandExt;
            let mut ssh = ssh_command(t, &name, identity, command).await?;
            let e = ssh.exec();
            anyhow::bail!("Cannot run ssh: {e}; is openssh-client installed?");
        }
        VmCommand::Start { name, no_wait } => {
            let started = match t.start_vm(out, &name, !no_wait).await {
                // As `docker start` and `machinectl start` do, and as `vm stop` of a stopped
                // VM does: a VM that runs already is started; say so, exit 0. (Only the
                // state's refusal: one the caller may not start stays an error.)
                Err(e) if super::refusal(&e) == Some("InvalidArgument") => {
                    let state = t.vm_info(&name).await.map(|v| v.state).unwrap_or_default();
                    if !matches!(state.as_str(), "running" | "paused") {
                        return Err(e);
                    }
                    out.say(&format!("VM {name} is {state} already"));
                    out.done(vec![("name", json!(name)), ("state", json!(state))]);
                    return Ok(());
                }
                r => r,
            };
            let job = tail_on_failure(t, &name, started).await?;
            if no_wait {
                transport::show(out, &job);
            } else {
                out.say(&format!("VM {name} is running"));
            }
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let mut opts = vec![("force", Opt::Bool(force))];
            opts.extend(timeout.map(|t| ("timeout_sec", Opt::U32(t))));
            t.stop_vm(&name, opts).await?;
            out.done(vec![("name", json!(name)), ("state", json!("stopped"))]);
        }
        VmCommand::Snapshot {
            name,
            snapshot,
            pause,
        } => {
            let opts = vec![("pause", Opt::Bool(pause))];
            t.snapshot_vm(out, &name, &snapshot, opts).await?;
            out.done(vec![("vm", json!(name)), ("snapshot", json!(snapshot))]);
        }
        VmCommand::Fork { name, new, count } => {
            anyhow::ensure!(
                (1..=64).contains(&count),
                "--count must be between 1 and 64, not {count}"
            );
            t.snapshot_vm(out, &name, &new, Vec::new()).await?;
            let names: Vec<String> = if count == 1 {
                vec![new.clone()]
            } else {
                (1..=count).map(|i| format!("{new}-{i}")).collect()
            };
            let key = read_public_key(None)?;
            let creates = names
                .iter()
                .map(|n| {
                    let mut o = vec![("snapshot", Opt::Str(new.clone()))];
                    o.extend(key.clone().map(|k| ("ssh_key", Opt::Str(k))));
                    (n.clone(), o)
                })
                .collect();
            t.create_vms(out, creates).await?;
            out.done(vec![
                ("vm", json!(name)),
                ("snapshot", json!(new)),
                ("vms", json!(names)),
            ]);
        }
        VmCommand::Timeout { name, duration } => {
            t.set_timeout(&name, duration).await?;
            out.done(vec![
                ("name", json!(name)),
                ("timeout_sec", json!(duration)),
            ]);
        }
        VmCommand::Pause { name } => {
            t.pause_vm(&name, true).await?;
            out.done(vec![("name", json!(name)), ("state", json!("paused"))]);
        }
        VmCommand::Resume { name } => {
            t.pause_vm(&name, false).await?;
            out.done(vec![("name", json!(name)), ("state", json!("running"))]);
        }
        VmCommand::Delete { name, force } => {
            t.delete_vm(&name, vec![("force", Opt::Bool(force))])
                .await?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
        VmCommand::Show { name } => show(out, t, &name).await?,
        VmCommand::Exec {
            name,
            command,
            env,
            workdir,
            user,
            tty,
        } => {
            let what = exec_request(command, env, workdir, user, tty);
            leave(exec_in(t, &name, what).await?).await;
        }
        VmCommand::Cp { src, dst } => {
            let (from, to) = (src.clone(), dst.clone());
            let (vm, job) = super::cp::plan(&src, &dst)?;
            let s = std::os::unix::net::UnixStream::from(t.open_agent(&vm).await?);
            tokio::task::spawn_blocking(move || job(s)).await??;
            out.done(vec![("from", json!(from)), ("to", json!(to))]);
        }
        VmCommand::Shell { name, user } => {
            leave(exec_in(t, &name, shell_request(user)).await?).await;
        }
        VmCommand::Logs { name, follow } => print_console(t, &name, follow).await?,
    }
    Ok(())
}

/// Prints VM `name`'s console log (`OpenConsole`), and with `follow` what it writes next,
/// onto each new file the logger starts.
async fn print_console(t: &mut impl Transport, name: &str, follow: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut f = tokio::fs::File::from_std(std::fs::File::from(t.open_console(name).await?));
    let mut stdout = tokio::io::stdout();
    loop {
        tokio::io::copy(&mut f, &mut stdout).await?;
        stdout.flush().await?;
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The log is bounded: past its cap the logger starts a new file with the newest
        // half. Follow onto it, from its end (that half was printed).
        if let Ok(fd) = t.open_console(name).await {
            let newer = std::fs::File::from(fd);
            let (a, b) = (f.metadata().await?, newer.metadata()?);
            if a.ino() != b.ino() {
                tokio::io::copy(&mut f, &mut stdout).await?;
                f = tokio::fs::File::from_std(newer);
                use tokio::io::AsyncSeekExt;
                f.seek(std::io::SeekFrom::End(0)).await?;
            }
        }
    }
}

/// After a failed start, the console's last lines for its owner (the job's public error does
/// not carry them); nothing when the console cannot be opened.
/// Waits for a VM's main process to end (the VM stops), prints what it wrote on the console
/// and returns its exit status.
async fn main_process(t: &mut impl Transport, name: &str) -> anyhow::Result<i32> {
    t.wait_stopped(name).await?;
    print_main_output(t.open_console(name).await?).await;
    Ok(t.vm_info(name).await?.exit_status)
}

/// The main process's output in a console log: the lines after banger-init's last
/// `main process:` line, up to its exit line.
pub fn main_output(console: &str) -> String {
    let start = console
        .rfind("banger-init: main process: ")
        .and_then(|i| console[i..].find('\n').map(|n| i + n + 1))
        // Rotated away: all that is left.
        .unwrap_or(0);
    let rest = &console[start..];
    let end = rest
        .find(crate::guestinit::supervise::EXIT_LINE)
        .unwrap_or(rest.len());
    rest[..end].replace("\r\n", "\n")
}

async fn print_console_tail(t: &mut impl Transport, name: &str) {
    let Ok(fd) = t.open_console(name).await else {
        return;
    };
    let f = std::fs::File::from(fd);
    let tail = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = f;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut v = Vec::new();
        let _ = f.take(64 * 1024).read_to_end(&mut v);
        let text = String::from_utf8_lossy(&v).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    })
    .await
    .unwrap_or_default();
    if !tail.is_empty() {
        eprintln!("banger: the console of VM {name} ends with:\n{tail}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_output_is_what_lies_between_init_s_lines() {
        let log = "[ 0.1] boot\r\nbanger-init: main process: echo hi\r\nhi\r\nthere\r\n\
                   banger-init: main process exited with status 3\r\nbanger-init: shutting down\r\n";
        assert_eq!(main_output(log), "hi\nthere\n");
    }

    #[test]
    fn known_hosts_keep_other_entries_and_replace_the_vms() {
        let before = "other ssh-rsa AAAA\nbanger-00ff ssh-ed25519 OLD\n";
        let after = known_hosts_with(before, "banger-00ff", "ssh-ed25519 NEW banger-web");
        assert_eq!(after, "other ssh-rsa AAAA\nbanger-00ff ssh-ed25519 NEW\n");
        assert_eq!(known_hosts_with("", "banger-1", ""), "");
    }

    #[test]
    fn generated_names_are_valid_vm_names() {
        for _ in 0..50 {
            let n = generated_name();
            crate::model::validate_name(crate::model::NameKind::Vm, &n).unwrap();
            assert_eq!(n.matches('-').count(), 2, "{n}");
        }
    }
}
