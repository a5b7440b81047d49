//! Client proxies for the CLI and tests. `allow_interactive_auth` lets polkit ask for a
//! password when the caller runs in a terminal with an agent.

use std::collections::HashMap;

use zbus::{proxy, OwnedObjectPath, OwnedVariant};

/// Options as sent.
pub type Opts = HashMap<String, OwnedVariant>;

/// `org.banger.Images1`.
#[proxy(
    interface = "org.banger.Images1",
    default_service = "org.banger",
    default_path = "/org/banger"
)]
pub trait Images1 {
    /// ListImages
    fn list_images(&self) -> zbus::Result<Vec<(String, String, bool, String, OwnedObjectPath)>>;
    /// GetImage
    fn get_image(&self, name_or_id: &str) -> zbus::Result<OwnedObjectPath>;
    /// PullImage
    #[zbus(allow_interactive_auth)]
    fn pull_image(&self, r#ref: &str, options: Opts) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// RegisterImage
    #[zbus(allow_interactive_auth)]
    fn register_image(&self, name: &str, options: Opts) -> zbus::Result<OwnedObjectPath>;
    /// PromoteImage
    #[zbus(allow_interactive_auth)]
    fn promote_image(&self, name_or_id: &str) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// WarmImage
    #[zbus(allow_interactive_auth)]
    fn warm_image(&self, name_or_id: &str, options: Opts) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// BuildImage
    #[zbus(allow_interactive_auth)]
    fn build_image(&self, name: &str, options: Opts) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// DeleteImage
    #[zbus(allow_interactive_auth)]
    fn delete_image(&self, name_or_id: &str) -> zbus::Result<()>;
    /// PruneCache
    #[zbus(allow_interactive_auth)]
    fn prune_cache(&self, options: Opts) -> zbus::Result<(u64, u32)>;
}

/// `org.banger.Kernels1`.
#[proxy(
    interface = "org.banger.Kernels1",
    default_service = "org.banger",
    default_path = "/org/banger"
)]
pub trait Kernels1 {
    /// ListKernels
    fn list_kernels(&self) -> zbus::Result<Vec<(String, String, String, OwnedObjectPath)>>;
    /// ListAvailableKernels
    fn list_available_kernels(&self) -> zbus::Result<Vec<(String, String, String)>>;
    /// GetKernel
    fn get_kernel(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// PullKernel
    #[zbus(allow_interactive_auth)]
    fn pull_kernel(&self, name: &str, options: Opts) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// ImportKernel
    #[zbus(allow_interactive_auth)]
    fn import_kernel(&self, name: &str, options: Opts) -> zbus::Result<OwnedObjectPath>;
    /// DeleteKernel
    #[zbus(allow_interactive_auth)]
    fn delete_kernel(&self, name: &str) -> zbus::Result<()>;
}

/// `org.banger.VMs1`.
#[proxy(
    interface = "org.banger.VMs1",
    default_service = "org.banger",
    default_path = "/org/banger"
)]
pub trait VMs1 {
    /// HostMemoryBytes: what every VM costs the host in memory now.
    #[zbus(property(emits_changed_signal = "false"), name = "HostMemoryBytes")]
    fn host_memory_bytes(&self) -> zbus::Result<u64>;
    /// ListVMs
    #[zbus(name = "ListVMs")]
    fn list_vms(&self) -> zbus::Result<Vec<(String, String, String, String, OwnedObjectPath)>>;
    /// ListVMsByLabels
    #[zbus(name = "ListVMsByLabels")]
    fn list_vms_by_labels(
        &self,
        labels: std::collections::HashMap<&str, &str>,
    ) -> zbus::Result<Vec<(String, String, String, String, OwnedObjectPath)>>;
    /// GetUsage
    #[zbus(name = "GetUsage")]
    fn get_usage(&self) -> zbus::Result<Vec<(String, u64, u64)>>;
    /// GetVM
    #[zbus(name = "GetVM")]
    fn get_vm(&self, name_or_id: &str) -> zbus::Result<OwnedObjectPath>;
    /// CreateVM
    #[zbus(name = "CreateVM", allow_interactive_auth)]
    fn create_vm(
        &self,
        name: &str,
        options: Opts,
    ) -> zbus::Result<(OwnedObjectPath, u32, OwnedObjectPath)>;
    /// StartVM
    #[zbus(name = "StartVM", allow_interactive_auth)]
    fn start_vm(&self, name_or_id: &str) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// StopVM
    #[zbus(name = "StopVM", allow_interactive_auth)]
    fn stop_vm(&self, name_or_id: &str, options: Opts) -> zbus::Result<()>;
    /// DeleteVM
    #[zbus(name = "DeleteVM", allow_interactive_auth)]
    fn delete_vm(&self, name_or_id: &str, options: Opts) -> zbus::Result<()>;
    /// SnapshotVM
    #[zbus(name = "SnapshotVM", allow_interactive_auth)]
    fn snapshot_vm(
        &self,
        name_or_id: &str,
        snapshot: &str,
        options: Opts,
    ) -> zbus::Result<(u32, OwnedObjectPath)>;
    /// CreateProgress
    #[zbus(signal)]
    fn create_progress(
        &self,
        vm: OwnedObjectPath,
        stage: String,
        message: String,
    ) -> zbus::Result<()>;
    /// VMStopped
    #[zbus(signal, name = "VMStopped")]
    fn vm_stopped(
        &self,
        id: String,
        path: OwnedObjectPath,
        reason: String,
        exit_status: i32,
    ) -> zbus::Result<()>;
}

/// `org.banger.Snapshots1`.
#[proxy(
    interface = "org.banger.Snapshots1",
    default_service = "org.banger",
    default_path = "/org/banger"
)]
pub trait Snapshots1 {
    /// ListSnapshots
    fn list_snapshots(&self) -> zbus::Result<Vec<(String, String, String, OwnedObjectPath)>>;
    /// GetSnapshot
    fn get_snapshot(&self, name_or_id: &str) -> zbus::Result<OwnedObjectPath>;
    /// DeleteSnapshot
    #[zbus(allow_interactive_auth)]
    fn delete_snapshot(&self, name_or_id: &str) -> zbus::Result<()>;
}

/// `org.banger.VM1`.
#[proxy(interface = "org.banger.VM1", default_service = "org.banger")]
pub trait VM1 {
    /// OpenAgent
    #[zbus(name = "OpenAgent", allow_interactive_auth)]
    fn open_agent(&self) -> zbus::Result<zbus::OwnedFd>;
    /// OpenConsole
    #[zbus(name = "OpenConsole", allow_interactive_auth)]
    fn open_console(&self) -> zbus::Result<zbus::OwnedFd>;
    /// Pause
    #[zbus(name = "Pause", allow_interactive_auth)]
    fn pause(&self) -> zbus::Result<()>;
    /// Resume
    #[zbus(name = "Resume", allow_interactive_auth)]
    fn resume(&self) -> zbus::Result<()>;
    /// Name
    #[zbus(property, name = "Name")]
    fn name(&self) -> zbus::Result<String>;
    /// State
    #[zbus(property, name = "State")]
    fn state(&self) -> zbus::Result<String>;
    /// Id
    #[zbus(property, name = "Id")]
    fn id(&self) -> zbus::Result<String>;
    /// SSHAddress
    #[zbus(property, name = "SSHAddress")]
    fn ssh_address(&self) -> zbus::Result<String>;
    /// SSHHostKey
    #[zbus(property, name = "SSHHostKey")]
    fn ssh_host_key(&self) -> zbus::Result<String>;
    /// ExitStatus
    #[zbus(property, name = "ExitStatus")]
    fn exit_status(&self) -> zbus::Result<i32>;
    /// Owner
    #[zbus(property, name = "Owner")]
    fn owner(&self) -> zbus::Result<u32>;
    /// SetTimeout
    #[zbus(name = "SetTimeout", allow_interactive_auth)]
    fn set_timeout(&self, timeout_sec: u32) -> zbus::Result<()>;
    /// ExpiresAt
    #[zbus(property, name = "ExpiresAt")]
    fn expires_at(&self) -> zbus::Result<u64>;
    /// RootfsDir
    #[zbus(property, name = "RootfsDir")]
    fn rootfs_dir(&self) -> zbus::Result<String>;
    /// Netns
    #[zbus(property, name = "Netns")]
    fn netns(&self) -> zbus::Result<String>;
}

/// `org.banger.Jobs1`.
#[proxy(
    interface = "org.banger.Jobs1",
    default_service = "org.banger",
    default_path = "/org/banger"
)]
pub trait Jobs1 {
    /// ListJobs
    fn list_jobs(&self) -> zbus::Result<Vec<(u32, String, String, f64, OwnedObjectPath)>>;
    /// CancelJob
    #[zbus(allow_interactive_auth)]
    fn cancel_job(&self, id: u32) -> zbus::Result<()>;
    /// The daemon's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// JobNew
    #[zbus(signal)]
    fn job_new(&self, id: u32, path: OwnedObjectPath) -> zbus::Result<()>;
    /// JobRemoved
    #[zbus(signal)]
    fn job_removed(&self, id: u32, path: OwnedObjectPath, result: String) -> zbus::Result<()>;
}

/// `org.banger.Job1`.
#[proxy(interface = "org.banger.Job1", default_service = "org.banger")]
pub trait Job1 {
    /// Cancel
    #[zbus(allow_interactive_auth)]
    fn cancel(&self) -> zbus::Result<()>;
    /// Kind
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    /// Target
    #[zbus(property)]
    fn target(&self) -> zbus::Result<String>;
    /// Stage
    #[zbus(property)]
    fn stage(&self) -> zbus::Result<String>;
    /// Progress
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;
    /// State
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Error
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// StageChanged (named apart from the Stage property's change stream)
    #[zbus(signal, name = "StageChanged")]
    fn stage_entered(&self, stage: String, message: String) -> zbus::Result<()>;
    /// LogMessage
    #[zbus(signal)]
    fn log_message(&self, priority: u32, line: String) -> zbus::Result<()>;
}

/// `org.banger.Kernel1`.
#[proxy(interface = "org.banger.Kernel1", default_service = "org.banger")]
pub trait Kernel1 {
    /// Name
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// Version
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// Source
    #[zbus(property)]
    fn source(&self) -> zbus::Result<String>;
    /// KernelPath
    #[zbus(property)]
    fn kernel_path(&self) -> zbus::Result<String>;
    /// InitrdPath
    #[zbus(property)]
    fn initrd_path(&self) -> zbus::Result<String>;
    /// ModulesDir
    #[zbus(property)]
    fn modules_dir(&self) -> zbus::Result<String>;
}
