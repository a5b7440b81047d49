//! The guest agent's wire protocol, shared by `banger-agent` (in the guest, plain threads)
//! and its clients (the daemon and `banger vm exec`, tokio).
//!
//! A connection starts with one JSON request line. `health` and `shutdown` get one JSON
//! reply line and the connection ends. `exec` gets a JSON reply line (did the command start?)
//! and then frames in both directions until the exit frame: `[kind u8][len u32 BE][data]`.
//! The client sends `STDIN` frames, an empty one meaning end of input; the agent sends
//! `STDOUT`, `STDERR` and finally `EXIT` with the exit status as an `i32` (128 + signal when
//! a signal ended the command, as shells report it).
//!
//! An `exec` with `detach` goes into the agent's process table: the command outlives the
//! connection that started it, and `attach` (its output from then on, input, signals),
//! `signal` and `procs` reach it by pid or tag until it exits. `fs` runs one file operation
//! ([`fsop::FsOp`]) as a guest user: the agent runs itself as that user, so the operation has
//! exactly that user's rights, and the connection then carries frames as `exec`'s does.

pub mod blocking;
pub mod cgroup;
pub mod files;
pub mod fsop;
pub mod identity;
pub mod link;
pub mod mount;
pub mod oom;
pub mod procs;
pub mod server;
pub mod stats;
pub mod watch;

use serde::{Deserialize, Serialize};

/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;

/// The guest's SSH port: where the host looks for sshd, and what the agent's
/// [`Health::ssh_listening`] is about.
pub const SSH_PORT: u16 = 22;

/// The port on which the agent's link (banger's agent channel, not a vsock device) answers at
/// once with a `health` reply line and ends: no request, no handler thread. Readiness costs
/// one round trip through a guest whose code is not yet translated under TCG (about 0.1 s
/// less than a request on [`PORT`]). Agents older than this, and Firecracker's vsock,
/// refuse it; the host then asks on [`PORT`].
pub const HEALTH_PORT: u32 = 1025;

/// Frame kinds.
pub mod frame {
    /// Client → agent: standard input; empty = end of input.
    pub const STDIN: u8 = 0;
    /// Agent → client: standard output.
    pub const STDOUT: u8 = 1;
    /// Agent → client: standard error.
    pub const STDERR: u8 = 2;
    /// Agent → client: the exit status (`i32` BE); the last frame.
    pub const EXIT: u8 = 3;
    /// Client → agent, on a terminal: the window size, `rows u16 BE, cols u16 BE`.
    pub const RESIZE: u8 = 4;
    /// Client → agent: a signal for the command's process group (`i32` BE; one of
    /// [`super::FORWARDED_SIGNALS`]), as ssh forwards one; agents before it ignore it.
    pub const SIGNAL: u8 = 5;
    /// Largest frame payload either side sends.
    pub const MAX: usize = 64 * 1024;
}

/// The signals a client may send a command (what a terminal's keys and a shell's `kill`
/// would send it); any other number is ignored.
pub const FORWARDED_SIGNALS: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// What a client sends beside standard input while its command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The terminal's new size (`rows`, `cols`).
    Resize(u16, u16),
    /// A signal for the command.
    Signal(i32),
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Is the guest up?
    Health,
    /// Power the guest off cleanly.
    Shutdown,
    /// Run a command.
    Exec {
        /// Program and arguments; the program is looked up on the guest's PATH.
        argv: Vec<String>,
        /// Extra environment, `KEY=VALUE`.
        #[serde(default)]
        env: Vec<String>,
        /// Working directory; the image's `WorkingDir`, else the user's home, when absent.
        #[serde(default)]
        cwd: Option<String>,
        /// User (`name`, `uid`, `user:group`, `uid:gid`); the image's `User`, else root,
        /// when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// Run it on a terminal of its own (a PTY: its output comes as `STDOUT` frames,
        /// `RESIZE` frames change its size); an empty `argv` is then the user's login shell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<Tty>,
        /// Keep it in the process table: it runs on when this connection ends (which is
        /// then only attached to it), and the reply carries its pid.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        detach: bool,
        /// A name for it in the process table (with `detach`), unique among its processes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// Run it with this folder of the guest as its root (a container's, in a pod's VM):
        /// in a mount namespace of its own with the guest's `/proc`, `/dev` and `/sys`
        /// mounted there, then chrooted; its user, `WorkingDir`, `Env` and program are the
        /// folder's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
        /// Its host name, in a UTS namespace of its own (a container's, as its spec says).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// Its resource limits (a container's, as its spec says), set before it runs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rlimits: Vec<Rlimit>,
        /// The guest cgroup it runs in (made when missing; see [`cgroup`]): a container's of
        /// a pod, so that container is frozen, measured and removed as one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    /// Act on a guest cgroup that `exec` made (see [`cgroup::Action`]).
    Cgroup {
        /// Its name.
        name: String,
        /// What to do.
        action: cgroup::Action,
    },
    /// Attach to a process of the table (by `pid` or `tag`): its output from now on and its
    /// exit come as `exec`'s frames; `STDIN`, `RESIZE` and `SIGNAL` frames reach it (an
    /// empty `STDIN` frame closes its input). The process runs on when this connection ends.
    Attach {
        /// Its pid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Or its tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// Write to a process of the table without following it: `STDIN` (empty: close its
    /// input), `RESIZE` and `SIGNAL` frames until the client ends its side; the agent then
    /// closes the connection, once all of them were carried out.
    Input {
        /// Its pid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Or its tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
    },
    /// The process table (reply `procs`).
    Procs,
    /// What the guest uses now: CPU (over a short window), memory and its root filesystem
    /// (reply `stats`).
    Stats,
    /// Mount a tmpfs at `destination` inside the guest folder `root` (a container's root;
    /// `/` when absent), resolved there as if it were `/`, with an OCI mount's `options`
    /// (see [`mount`]).
    Mount {
        /// The container's root in the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
        /// Where, inside it.
        destination: String,
        /// The file system: `tmpfs` (nothing else is mounted this way).
        fstype: String,
        /// `nosuid`, `size=…`, …
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        options: Vec<String>,
    },
    /// Unmount everything mounted below the guest folder `root` (a container's, as it goes).
    Unmount {
        /// The container's root in the guest.
        root: String,
    },
    /// The guest kernel's OOM kills from now on: a `STDOUT` frame holding one JSON
    /// [`OomKill`] for each, until the client hangs up (see [`oom`]).
    Oom,
    /// Send a process of the table a signal: one of [`FORWARDED_SIGNALS`], `SIGKILL` or
    /// `SIGTERM`, to its process group.
    Signal {
        /// Its pid.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        /// Or its tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tag: Option<String>,
        /// The signal's number.
        signal: i32,
    },
    /// A file operation as `user` (the image's `User`, else root, when absent); see
    /// [`fsop`].
    Fs {
        /// The operation.
        file: fsop::FsOp,
        /// As whom.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
    },
    /// Receive a file or tree (a tar stream in `STDIN` frames) at `path`: inside it, as
    /// `name`, when it is a directory, else as `path` itself.
    Put {
        /// Guest destination.
        path: String,
        /// The copy's own name.
        name: String,
        /// Whether it is a directory tree.
        dir: bool,
    },
    /// Send `path` (a file, tree or link) as a tar stream in `STDOUT` frames.
    Get {
        /// Guest source.
        path: String,
    },
    /// Connect to the guest's own `127.0.0.1:port`; after the reply the stream carries that
    /// connection's bytes both ways (published ports).
    Connect {
        /// The guest port.
        port: u16,
    },
    /// Take this identity (a VM restored from a snapshot carries its source's): host name,
    /// NIC address and MAC, SSH host key, machine id, a reseeded RNG and the clock.
    Identity(Box<Identity>),
    /// Open a UDP socket connected to the guest's own `127.0.0.1:port`; after the reply the
    /// stream carries datagrams both ways, each as a u16 big-endian length and its bytes.
    ConnectUdp {
        /// The guest port.
        port: u16,
    },
    /// A parked guest (a warm template of folder roots, restored): mount the root and go on
    /// booting (see [`crate::guestinit::park`]). The agent replies once the root is mounted,
    /// then ends when the client hangs up; the root's own agent follows.
    Unpark,
    /// Step the guest's wall clock to the host's (after a resume: a paused guest's clock
    /// stood still while the host's went on); with `slew`, correct it without ever moving it
    /// back (see `identity::set_clock`): the agent link's periodic correction.
    #[serde(rename = "setclock")]
    SetClock {
        /// The host's time, ns since the epoch.
        time_ns: u64,
        /// Slew rather than step.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        slew: bool,
    },
}

/// What makes a VM itself, applied by the agent after a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The host name.
    pub hostname: String,
    /// The NIC's MAC address.
    pub mac: String,
    /// `ADDRESS/PREFIX`.
    pub address: String,
    /// The default gateway.
    pub gateway: String,
    /// Name servers.
    pub dns: Vec<String>,
    /// `/etc/machine-id` (32 hex digits).
    pub machine_id: String,
    /// The SSH host key (ed25519), private half in OpenSSH form; empty: keep the image's.
    #[serde(default)]
    pub host_key: String,
    /// Its public half.
    #[serde(default)]
    pub host_key_pub: String,
    /// A public key to add to root's `authorized_keys`.
    #[serde(default)]
    pub authorized_key: String,
    /// Random bytes (hex) for the kernel's pool, credited as entropy.
    pub seed: String,
    /// The wall clock, ns since the epoch.
    pub time_ns: u64,
    /// Stop the balloon's free page reporting (unbind its driver): the guest's memory is a
    /// snapshot's sealed memory mapped copy-on-write, which QEMU 7.2 cannot give back (it
    /// would punch a hole in the file, which the seal refuses), so reports would only fail.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_page_reporting: bool,
}

/// A terminal's size and type, for `exec` on a PTY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tty {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// `TERM`.
    #[serde(default = "default_term")]
    pub term: String,
}

fn default_term() -> String {
    "xterm-256color".into()
}

impl Default for Tty {
    fn default() -> Self {
        Tty {
            rows: 24,
            cols: 80,
            term: default_term(),
        }
    }
}

/// What to run with `exec`: the command and what may override the image's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment, `KEY=VALUE`, over the image's.
    pub env: Vec<String>,
    /// Working directory instead of the image's.
    pub cwd: Option<String>,
    /// User instead of the image's.
    pub user: Option<String>,
    /// A terminal (PTY) for it.
    pub tty: Option<Tty>,
    /// Into the process table (see [`Request::Exec`]).
    pub detach: bool,
    /// Its tag there.
    pub tag: Option<String>,
    /// The folder of the guest that is its root (see [`Request::Exec`]).
    pub root: Option<String>,
    /// Its own host name (see [`Request::Exec`]).
    pub hostname: Option<String>,
    /// Its resource limits (see [`Request::Exec`]).
    pub rlimits: Vec<Rlimit>,
    /// Its guest cgroup (see [`Request::Exec`]).
    pub cgroup: Option<String>,
}

/// A resource limit as an OCI spec names it: `RLIMIT_NOFILE`, …, and its soft and hard values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_…`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The soft limit.
    pub soft: u64,
    /// The hard limit (at least the soft one).
    pub hard: u64,
}

impl ExecRequest {
    /// A shell on a terminal of its own (`argv`, else the user's login shell); what is not
    /// given is the default terminal's.
    pub fn shell(
        rows: Option<u16>,
        cols: Option<u16>,
        term: Option<String>,
        user: Option<String>,
        argv: Vec<String>,
    ) -> Self {
        let d = Tty::default();
        ExecRequest {
            argv,
            user,
            tty: Some(Tty {
                rows: rows.unwrap_or(d.rows),
                cols: cols.unwrap_or(d.cols),
                term: term.unwrap_or(d.term),
            }),
            ..Default::default()
        }
    }

    /// `argv` with the image's settings.
    pub fn new(argv: Vec<String>) -> Self {
        ExecRequest {
            argv,
            ..Default::default()
        }
    }
}

impl From<ExecRequest> for Request {
    fn from(e: ExecRequest) -> Self {
        Request::Exec {
            argv: e.argv,
            env: e.env,
            cwd: e.cwd,
            user: e.user,
            tty: e.tty,
            detach: e.detach,
            tag: e.tag,
            root: e.root,
            hostname: e.hostname,
            rlimits: e.rlimits,
            cgroup: e.cgroup,
        }
    }
}

/// A process of the agent's table, as `procs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Its pid in the guest.
    pub pid: u32,
    /// Its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// What it runs.
    pub argv: Vec<String>,
    /// The environment the request added.
    #[serde(default)]
    pub env: Vec<String>,
    /// Its working directory.
    #[serde(default)]
    pub cwd: String,
    /// Whether it runs on a terminal.
    #[serde(default)]
    pub tty: bool,
}

/// The agent's answer to `stats`: what the guest's own kernel says it uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// CPUs online in the guest.
    pub cpu_count: u32,
    /// Percent of all of them busy over the sample window (0–100).
    pub cpu_used_pct: f64,
    /// Memory the guest sees, in bytes (`MemTotal`).
    pub mem_total: u64,
    /// In use: `MemTotal` less `MemAvailable`.
    pub mem_used: u64,
    /// The page cache (`Cached`).
    pub mem_cache: u64,
    /// The root filesystem's size, in bytes.
    pub disk_total: u64,
    /// Its bytes in use.
    pub disk_used: u64,
    /// CPU time used since boot, in µs (0 from agents before this field).
    #[serde(default)]
    pub cpu_usage_usec: u64,
    /// Of it, in user mode.
    #[serde(default)]
    pub cpu_user_usec: u64,
    /// Of it, in the kernel.
    #[serde(default)]
    pub cpu_system_usec: u64,
    /// Processes running in the guest.
    #[serde(default)]
    pub pids: u64,
}

/// A process the guest kernel's OOM killer ended (the `oom` request's events).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomKill {
    /// Its pid in the guest.
    pub pid: u32,
    /// Its command name.
    pub task: String,
    /// Its memory cgroup in the guest (`/` when the guest has none).
    #[serde(default)]
    pub memcg: String,
    /// Its uid.
    #[serde(default)]
    pub uid: u32,
}

/// The agent's answer to `health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The agent's version.
    pub version: String,
    /// Seconds since the guest booted.
    pub uptime_sec: f64,
    /// The guest kernel's boot id.
    pub boot_id: String,
    /// Whether the guest runs systemd.
    pub systemd: bool,
    /// Whether the guest has an SSH server (`sshd` in a usual `PATH` directory); agents
    /// before this field say nothing, and the host then asks with a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sshd: Option<bool>,
    /// Whether the guest is parked without its root (see [`crate::guestinit::park`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
    /// In the answer to `identity` only: whether something listens on [`SSH_PORT`] on every
    /// address once the identity is applied (sshd, serving the VM's new host key). The host
    /// then needs no SSH connection to know sshd is there, only that the new address answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_listening: Option<bool>,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out (for `exec`: the command started).
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The answer to `health` (and to `identity`, from this banger's agent on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// For `get`: whether the source is a directory tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<bool>,
    /// For a detached `exec` and `attach`: the process's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// For `procs`: the process table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub procs: Option<Vec<ProcInfo>>,
    /// For `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

impl Reply {
    /// A success without data.
    pub fn ok() -> Self {
        Reply {
            ok: true,
            error: String::new(),
            health: None,
            dir: None,
            pid: None,
            procs: None,
            stats: None,
        }
    }
    /// A refusal.
    pub fn error(e: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: e.into(),
            health: None,
            dir: None,
            pid: None,
            procs: None,
            stats: None,
        }
    }
}

/// Encodes a frame header.
pub fn header(kind: u8, len: usize) -> [u8; 5] {
    let l = (len as u32).to_be_bytes();
    [kind, l[0], l[1], l[2], l[3]]
}

/// Decodes a frame header; `None` when the length is over [`frame::MAX`].
pub fn parse_header(h: [u8; 5]) -> Option<(u8, usize)> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    (len <= frame::MAX).then_some((h[0], len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_from_an_older_agent_says_nothing_of_sshd() {
        let old: Health = serde_json::from_str(
            r#"{"version":"0.1.0","uptime_sec":1.5,"boot_id":"b","systemd":false}"#,
        )
        .unwrap();
        assert_eq!(old.sshd, None);
        assert_eq!(old.ssh_listening, None);
        assert!(
            !old.parked,
            "an agent that says nothing of parking is not parked"
        );
        let new = Health {
            sshd: Some(true),
            ..old
        };
        let back: Health = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.sshd, Some(true));
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Exec {
            argv: vec!["echo".into(), "hi".into()],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
            detach: false,
            tag: None,
            root: None,
            hostname: None,
            rlimits: vec![],
            cgroup: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.starts_with(r#"{"op":"exec""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"health"}"#).unwrap(),
            Request::Health
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"unpark"}"#).unwrap(),
            Request::Unpark
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"cgroup","name":"c1","action":"freeze"}"#)
                .unwrap(),
            Request::Cgroup {
                name: "c1".into(),
                action: cgroup::Action::Freeze
            }
        );
    }

    #[test]
    fn frame_headers_are_bounded() {
        assert_eq!(
            parse_header(header(frame::STDOUT, 5)),
            Some((frame::STDOUT, 5))
        );
        assert_eq!(parse_header(header(frame::STDIN, frame::MAX + 1)), None);
    }
}
