//! `org.banger.Snapshot1`: one snapshot object.

use zbus::interface;

use crate::model::Snapshot;

/// A snapshot object; its properties are the snapshot's row.
pub struct Snapshot1 {
    pub(super) snapshot: Snapshot,
}

/// A snapshot of a VM: memory, device state and disks, from which VMs restore.
#[interface(name = "org.banger.Snapshot1")]
impl Snapshot1 {
    /// The snapshot's hex id.
    #[zbus(property(emits_changed_signal = "const"), name = "Id")]
    fn id(&self) -> String {
        self.snapshot.id.clone()
    }
    /// The snapshot's unique name.
    #[zbus(property(emits_changed_signal = "const"), name = "Name")]
    fn name(&self) -> String {
        self.snapshot.name.clone()
    }
    /// The id of the VM it was taken of.
    #[zbus(property(emits_changed_signal = "const"), name = "Vm")]
    fn vm(&self) -> String {
        self.snapshot.vm_id.clone()
    }
    /// The image the VM's root disk layers on.
    #[zbus(property(emits_changed_signal = "const"), name = "Image")]
    fn image(&self) -> String {
        self.snapshot.image_id.clone()
    }
    /// The kernel, which VMs restored from it use.
    #[zbus(property(emits_changed_signal = "const"), name = "Kernel")]
    fn kernel(&self) -> String {
        self.snapshot.kernel.clone()
    }
    /// Virtual CPUs, which VMs restored from it have.
    #[zbus(property(emits_changed_signal = "const"), name = "VCpus")]
    fn vcpus(&self) -> u32 {
        self.snapshot.vcpus
    }
    /// Guest memory in MiB, which VMs restored from it have.
    #[zbus(property(emits_changed_signal = "const"), name = "MemoryMiB")]
    fn memory_mib(&self) -> u32 {
        self.snapshot.memory_mib
    }
    /// Bytes it takes on disk.
    #[zbus(property(emits_changed_signal = "const"), name = "SizeBytes")]
    fn size_bytes(&self) -> u64 {
        self.snapshot.size_bytes
    }
    /// When it was taken, µs since the epoch.
    #[zbus(property(emits_changed_signal = "const"), name = "CreatedAt")]
    fn created_at(&self) -> u64 {
        self.snapshot.created_at
    }
    /// The uid that owns it (the VM's owner).
    #[zbus(property(emits_changed_signal = "const"), name = "Owner")]
    fn owner(&self) -> u32 {
        self.snapshot.owner_uid
    }
}
