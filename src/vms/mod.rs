//! The VM service: listing, lookup and ownership now; the three-phase create, start, stop and
//! delete land with the VM lifecycle issue, behind the same signatures.

use std::sync::Arc;

use crate::auth::Action;
use crate::config::Config;
use crate::jobs::Job;
use crate::layout::Layout;
use crate::model::{validate_name, NameKind, Vm};
use crate::service::Events;
use crate::store::{rows, Store};
use crate::{Error, Result};

/// Options of `CreateVM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The image; the configured default when absent.
    pub image: Option<String>,
    /// The kernel; the image's, else the configured default, when absent.
    pub kernel: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in bytes; the image's when absent.
    pub disk_size: Option<u64>,
    /// An SSH public key for root.
    pub ssh_key: Option<String>,
    /// Start it once reserved.
    pub start: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            image: None,
            kernel: None,
            vcpus: 2,
            memory_mib: 1024,
            disk_size: None,
            ssh_key: None,
            start: true,
        }
    }
}

/// Options of `StopVM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// Kill at once instead of asking the guest.
    pub force: bool,
    /// Seconds to wait for a clean shutdown before killing.
    pub timeout_sec: u32,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            force: false,
            timeout_sec: 30,
        }
    }
}

/// The bounds `CreateVM` accepts.
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest memory that boots a Debian guest with systemd.
pub const MIN_MEMORY_MIB: u32 = 128;

impl CreateOptions {
    /// Checks the options that do not need the store.
    pub fn validate(&self) -> Result<()> {
        if let Some(i) = &self.image {
            validate_name(NameKind::Image, i)?;
        }
        if let Some(k) = &self.kernel {
            validate_name(NameKind::Kernel, k)?;
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(Error::InvalidArgument(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(Error::InvalidArgument(format!(
                "memory_mib must be at least {MIN_MEMORY_MIB}, not {}",
                self.memory_mib
            )));
        }
        Ok(())
    }
}

/// The polkit action `uid` needs to manage `vm`.
pub fn action_for(vm: &Vm, uid: u32) -> Action {
    if vm.owner_uid == uid {
        Action::VmsManage
    } else {
        Action::VmsManageAny
    }
}

/// The VM service.
pub struct Vms {
    store: Store,
    #[allow(dead_code)] // used by create, with the VM lifecycle issue
    layout: Layout,
    #[allow(dead_code)]
    events: Events,
    #[allow(dead_code)]
    config: Config,
}

impl Vms {
    /// A service over the store and layout.
    pub fn new(store: Store, layout: Layout, events: Events, config: Config) -> Self {
        Vms {
            store,
            layout,
            events,
            config,
        }
    }

    /// Every VM.
    pub async fn list(&self) -> Result<Vec<Vm>> {
        self.store.call(|c| rows::list_vms(c)).await
    }

    /// The VM whose name or id is `key`.
    pub async fn get(&self, key: &str) -> Result<Vm> {
        let k = key.to_owned();
        self.store
            .call(move |c| rows::find_vm(c, &k))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("No VM {key:?}; `banger vm list` shows the VMs"))
            })
    }

    /// Creates (and by default starts) a VM; returns it and its job.
    pub async fn create(
        &self,
        _uid: u32,
        _name: &str,
        _o: CreateOptions,
    ) -> Result<(Vm, Arc<Job>)> {
        Err(Error::NotImplemented("CreateVM"))
    }

    /// Starts a stopped VM, as a job.
    pub async fn start(&self, _uid: u32, _vm: &Vm) -> Result<Arc<Job>> {
        Err(Error::NotImplemented("StartVM"))
    }

    /// Stops a VM.
    pub async fn stop(&self, _vm: &Vm, _o: StopOptions) -> Result<()> {
        Err(Error::NotImplemented("StopVM"))
    }

    /// Deletes a VM and everything reserved for it.
    pub async fn delete(&self, _vm: &Vm, _force: bool) -> Result<()> {
        Err(Error::NotImplemented("DeleteVM"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_options_are_bounded() {
        CreateOptions::default().validate().unwrap();
        let zero = CreateOptions {
            vcpus: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let tiny = CreateOptions {
            memory_mib: 16,
            ..Default::default()
        };
        assert!(tiny.validate().is_err());
        let bad_image = CreateOptions {
            image: Some("../etc".into()),
            ..Default::default()
        };
        assert!(bad_image.validate().is_err());
    }
}
