//! Each operation's request: its options, their defaults and their checks, read by one
//! function whichever front end carried them. D-Bus carries options as `a{sv}` and Varlink as
//! JSON parameters; each front end only says how to take one typed value out of its call (a
//! [`Source`]), and [`read`] refuses whatever key is left, so a typo fails the same way on
//! both. Keys are named as D-Bus spells them (`memory_mib`); Varlink reads each one
//! lowerCamelCased (`memoryMib`).

use crate::callerfile::CallerInput;
use crate::images::{BuildOptions, PullOptions, RegisterOptions};
use crate::kernels::ImportOptions;
use crate::model::Share;
use crate::ops::WarmOptions;
use crate::vms::snapshot::SnapshotOptions;
use crate::vms::{CreateOptions, StopOptions};
use crate::Error;

/// A call's options as a front end received them: typed values taken out one key at a time.
/// A value of the wrong type is the front end's refusal; an absent key is `None`.
pub trait Source {
    /// The front end's refusal, which a check of the service's own turns into.
    type Error: From<Error>;
    /// The method, as the front end names it (for messages).
    fn method(&self) -> &str;
    /// A string.
    fn string(&mut self, key: &str) -> Result<Option<String>, Self::Error>;
    /// A list of strings.
    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, Self::Error>;
    /// A boolean.
    fn bool(&mut self, key: &str) -> Result<Option<bool>, Self::Error>;
    /// A 16-bit unsigned integer.
    fn u16(&mut self, key: &str) -> Result<Option<u16>, Self::Error>;
    /// A 32-bit unsigned integer.
    fn u32(&mut self, key: &str) -> Result<Option<u32>, Self::Error>;
    /// A 64-bit unsigned integer.
    fn u64(&mut self, key: &str) -> Result<Option<u64>, Self::Error>;
    /// A list of TCP ports.
    fn ports(&mut self, key: &str) -> Result<Option<Vec<u16>>, Self::Error>;
    /// A list of shared folders.
    fn shares(&mut self, key: &str) -> Result<Option<Vec<Share>>, Self::Error>;
    /// A map of strings to strings (labels).
    fn labels(
        &mut self,
        key: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, Self::Error>;
    /// A caller's file: a descriptor passed with the call, or an absolute path.
    fn file(&mut self, key: &str) -> Result<Option<CallerInput>, Self::Error>;
    /// Refuses any key not taken.
    fn finish(self) -> Result<(), Self::Error>;
}

/// An operation's options, read from a [`Source`] with their defaults.
pub trait Request: Sized {
    /// Takes this request's keys out of `s`.
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error>;
}

/// Reads request `R` from `s`, refusing keys it does not know.
pub fn read<R: Request, S: Source>(mut s: S) -> Result<R, S::Error> {
    let r = R::take(&mut s)?;
    s.finish()?;
    Ok(r)
}

/// Ready ports, checked.
fn ports<S: Source>(s: &mut S, key: &str) -> Result<Option<Vec<u16>>, S::Error> {
    let ports = s.ports(key)?;
    if let Some(p) = &ports {
        crate::model::check_ready_ports(p)?;
    }
    Ok(ports)
}

/// A method that takes no options yet (`PullKernel`, `PruneCache`): any is refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoOptions;

impl Request for NoOptions {
    fn take<S: Source>(_: &mut S) -> Result<Self, S::Error> {
        Ok(NoOptions)
    }
}

/// `CreateVM`: shape and disks default to the snapshot's when created from one.
impl Request for CreateOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        let d = CreateOptions::default();
        let snapshot = s.string("snapshot")?;
        let (vcpus, memory) = CreateOptions::default_shape(snapshot.is_some());
        let network = s.string("network")?;
        Ok(CreateOptions {
            image: s.string("image")?,
            kernel: s.string("kernel")?,
            vcpus: s.u32("vcpus")?.unwrap_or(vcpus),
            memory_mib: s.u32("memory_mib")?.unwrap_or(memory),
            disk_size: s.u64("disk_size")?,
            ssh_key: s.string("ssh_key")?,
            start: s.bool("start")?.unwrap_or(d.start),
            network: CreateOptions::network_option(s.method(), network.as_deref())?,
            egress: s.strings("egress")?.unwrap_or_default(),
            init: s.string("init")?.unwrap_or_default(),
            entrypoint: s.bool("entrypoint")?.unwrap_or(false),
            command: s.strings("command")?.unwrap_or_default(),
            publish: s.strings("publish")?.unwrap_or_default(),
            shares: s.shares("shares")?.unwrap_or_default(),
            cold: s.bool("cold")?.unwrap_or(false),
            snapshot,
            foreign_ok: false,
            labels: s.labels("labels")?.unwrap_or_default(),
            timeout_sec: crate::vms::lifetime::check_timeout(s.u32("timeout_sec")?.unwrap_or(0))?,
            on_expire: crate::vms::lifetime::on_expire(s.string("on_expire")?.as_deref())?,
            rootfs_dir: s.string("rootfs_dir")?,
            netns: s.string("netns")?,
        })
    }
}

/// `StopVM`.
impl Request for StopOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        let d = StopOptions::default();
        Ok(StopOptions {
            force: s.bool("force")?.unwrap_or(d.force),
            timeout_sec: s.u32("timeout_sec")?.unwrap_or(d.timeout_sec),
        })
    }
}

/// `DeleteVM`'s options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteVmOptions {
    /// Delete a running VM too (it is stopped first).
    pub force: bool,
}

impl Request for DeleteVmOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(DeleteVmOptions {
            force: s.bool("force")?.unwrap_or(false),
        })
    }
}

/// `SnapshotVM`.
impl Request for SnapshotOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(SnapshotOptions {
            pause: s.bool("pause")?.unwrap_or(false),
        })
    }
}

/// `PullImage`.
impl Request for PullOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(PullOptions {
            name: s.string("name")?,
            kernel: s.string("kernel")?,
            size: s.u64("size")?,
            insecure: s.bool("insecure")?.unwrap_or(false),
            ready_ports: ports(s, "ready_ports")?,
            auth: s
                .string("auth")?
                .map(|a| crate::oci::auth::Credentials::parse(&a))
                .transpose()?,
        })
    }
}

/// `RegisterImage`.
impl Request for RegisterOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(RegisterOptions {
            rootfs: s.file("rootfs")?,
            work_seed: s.file("work_seed")?,
            kernel: s.string("kernel")?,
            kernel_path: s.file("kernel_path")?,
            initrd_path: s.file("initrd_path")?,
            modules_dir: s.file("modules_dir")?,
            ready_ports: ports(s, "ready_ports")?,
        })
    }
}

/// `BuildImage`.
impl Request for BuildOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(BuildOptions {
            suite: s.string("suite")?,
            packages: s.strings("packages")?.unwrap_or_default(),
            size: s.u64("size")?,
            kernel: s.string("kernel")?,
            ready_ports: ports(s, "ready_ports")?.unwrap_or_default(),
            user: s.string("user")?,
        })
    }
}

/// `WarmImage`: the shape defaults to a create's.
impl Request for WarmOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        let d = CreateOptions::default();
        Ok(WarmOptions {
            kernel: s.string("kernel")?,
            vcpus: s.u32("vcpus")?.unwrap_or(d.vcpus),
            memory_mib: s.u32("memory_mib")?.unwrap_or(d.memory_mib),
        })
    }
}

/// `ImportKernel`.
impl Request for ImportOptions {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(ImportOptions {
            kernel_path: s.file("kernel_path")?,
            initrd_path: s.file("initrd_path")?,
            modules_dir: s.file("modules_dir")?,
        })
    }
}

/// `OpenShell`: a terminal's size and type, the user, the command (else the login shell).
impl Request for crate::agent::ExecRequest {
    fn take<S: Source>(s: &mut S) -> Result<Self, S::Error> {
        Ok(crate::agent::ExecRequest::shell(
            s.u16("rows")?,
            s.u16("cols")?,
            s.string("term")?,
            s.string("user")?,
            s.strings("command")?.unwrap_or_default(),
        ))
    }
}
