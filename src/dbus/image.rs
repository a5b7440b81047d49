//! `org.banger.Image1`: one image object.

use zbus::interface;

use crate::model::Image;

/// An image object; its properties are the image's row.
pub struct Image1 {
    pub(super) image: Image,
}

pub(super) fn optional_path(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A root filesystem image.
#[interface(name = "org.banger.Image1")]
impl Image1 {
    /// The image's hex id.
    #[zbus(property(emits_changed_signal = "const"), name = "Id")]
    fn id(&self) -> String {
        self.image.id.clone()
    }
    /// The image's unique name.
    #[zbus(property, name = "Name")]
    fn name(&self) -> String {
        self.image.name.clone()
    }
    /// Whether banger owns the files.
    #[zbus(property, name = "Managed")]
    fn managed(&self) -> bool {
        self.image.managed
    }
    /// Where the image came from.
    #[zbus(property, name = "Source")]
    fn source(&self) -> String {
        self.image.source.clone()
    }
    /// The root filesystem file.
    #[zbus(property, name = "RootfsPath")]
    fn rootfs_path(&self) -> String {
        self.image.rootfs_path.to_string_lossy().into_owned()
    }
    /// The work seed file, or empty.
    #[zbus(property, name = "WorkSeedPath")]
    fn work_seed_path(&self) -> String {
        optional_path(&self.image.work_seed_path)
    }
    /// The default kernel's name, or empty.
    #[zbus(property, name = "Kernel")]
    fn kernel(&self) -> String {
        self.image.kernel.clone().unwrap_or_default()
    }
    /// Size of the root filesystem in bytes.
    #[zbus(property, name = "SizeBytes")]
    fn size_bytes(&self) -> u64 {
        self.image.size_bytes
    }
    /// The image's environment (`KEY=VALUE`), from its OCI configuration.
    #[zbus(property, name = "Env")]
    fn env(&self) -> Vec<String> {
        self.image.config.env.clone()
    }

    /// The image's working directory; empty for the default (`/root`).
    #[zbus(property, name = "WorkingDir")]
    fn working_dir(&self) -> String {
        self.image.config.working_dir.clone()
    }

    /// The user the image's processes run as; empty for root.
    #[zbus(property, name = "User")]
    fn user(&self) -> String {
        self.image.config.user.clone()
    }

    /// The image's entrypoint.
    #[zbus(property, name = "Entrypoint")]
    fn entrypoint(&self) -> Vec<String> {
        self.image.config.entrypoint.clone()
    }

    /// The image's command (the entrypoint's arguments when it has one).
    #[zbus(property, name = "Cmd")]
    fn cmd(&self) -> Vec<String> {
        self.image.config.cmd.clone()
    }

    /// TCP ports a VM of this image waits for (`wait_port_<n>` stages) before it is ready.
    #[zbus(property, name = "ReadyPorts")]
    fn ready_ports(&self) -> Vec<u16> {
        self.image.ready_ports.clone()
    }
    /// Creation time, µs since the epoch.
    #[zbus(property(emits_changed_signal = "const"), name = "CreatedAt")]
    fn created_at(&self) -> u64 {
        self.image.created_at
    }
    /// The uid that owns it; 0 for the system's (the catalog, the default image, root's).
    /// Only its owner or an administrator replaces or deletes it, and only its owner (and
    /// everyone, for the system's) boots it.
    #[zbus(property(emits_changed_signal = "const"), name = "Owner")]
    fn owner(&self) -> u32 {
        self.image.owner_uid
    }
}
