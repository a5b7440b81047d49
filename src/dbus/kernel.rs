//! `org.banger.Kernel1`: one kernel object.

use zbus::interface;

use super::image::optional_path;
use crate::model::Kernel;

/// A kernel object; its properties are the kernel's row.
pub struct Kernel1 {
    pub(super) kernel: Kernel,
}

/// A kernel: kernel file, initrd and modules directory.
#[interface(name = "org.banger.Kernel1")]
impl Kernel1 {
    /// The kernel's unique name.
    #[zbus(property(emits_changed_signal = "const"), name = "Name")]
    fn name(&self) -> String {
        self.kernel.name.clone()
    }
    /// The kernel release.
    #[zbus(property, name = "Version")]
    fn version(&self) -> String {
        self.kernel.version.clone()
    }
    /// The uncompressed kernel file.
    #[zbus(property, name = "KernelPath")]
    fn kernel_path(&self) -> String {
        self.kernel.kernel_path.to_string_lossy().into_owned()
    }
    /// The initrd, or empty.
    #[zbus(property, name = "InitrdPath")]
    fn initrd_path(&self) -> String {
        optional_path(&self.kernel.initrd_path)
    }
    /// The modules directory, or empty.
    #[zbus(property, name = "ModulesDir")]
    fn modules_dir(&self) -> String {
        optional_path(&self.kernel.modules_dir)
    }
    /// Where the kernel came from.
    #[zbus(property, name = "Source")]
    fn source(&self) -> String {
        self.kernel.source.clone()
    }
    /// The uid that owns it; 0 for the system's (the catalog's, root's). Only its owner or an
    /// administrator deletes it, and only its owner (and everyone, for the system's) boots it.
    #[zbus(property(emits_changed_signal = "const"), name = "Owner")]
    fn owner(&self) -> u32 {
        self.kernel.owner_uid
    }
}
