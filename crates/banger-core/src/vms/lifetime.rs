//! VM lifetimes: a VM created with `timeout_sec` (or given one later, `SetTimeout`) ends when
//! it runs out, as its `on_expire` says: deleted (the default), stopped or paused. The end is
//! a row's `expires_at`, so it holds across daemon restarts: the daemon acts on whatever
//! expired while it was down as soon as it is back, and does not exit for idleness while a
//! VM's lifetime runs (see `lifetimes_pending`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::error::invalid;
use super::{StopOptions, Vms};
use crate::events::ObjectEvent;
use crate::model::{now_us, OnExpire, Vm, VmState};
use crate::store::rows;
use crate::Result;

/// The longest lifetime: ten years.
pub const MAX_TIMEOUT_SEC: u32 = 10 * 365 * 24 * 3600;

/// How long an end that failed waits before it is tried again.
const RETRY: Duration = Duration::from_secs(60);

/// What wakes the keeper and what it found.
#[derive(Default)]
pub struct Lifetimes {
    wake: tokio::sync::Notify,
    pending: AtomicBool,
}

/// Accepts a lifetime in seconds (0: none).
pub fn check_timeout(secs: u32) -> Result<u32> {
    if secs > MAX_TIMEOUT_SEC {
        return Err(invalid(format!(
            "timeout_sec (--timeout) must be at most {MAX_TIMEOUT_SEC} s (ten years), not {secs}"
        )));
    }
    Ok(secs)
}

/// Reads an `on_expire` option.
pub fn on_expire(s: Option<&str>) -> Result<OnExpire> {
    let s = s.unwrap_or("");
    OnExpire::parse(s).ok_or_else(|| {
        invalid(format!(
            "on_expire (--on-expire) must be delete, stop or pause, not {s:?}"
        ))
    })
}

/// When a lifetime of `secs` from now ends, µs since the epoch (0 for none).
pub fn expiry(secs: u32) -> u64 {
    if secs == 0 {
        0
    } else {
        now_us() + u64::from(secs) * 1_000_000
    }
}

impl Vms {
    /// Gives `vm` a lifetime of `secs` from now (0: none), replacing the one it had.
    pub async fn set_timeout(&self, vm: &Vm, secs: u32) -> Result<Vm> {
        check_timeout(secs)?;
        let at = expiry(secs);
        let id = vm.id.clone();
        self.store
            .call(move |c| rows::set_vm_expiry(c, &id, at))
            .await?;
        let v = self.get(&vm.id).await?;
        self.events.send(ObjectEvent::VmChanged(v.clone()));
        self.lifetime_changed();
        tracing::info!(vm_id = %v.id, vm_name = %v.name, timeout_sec = secs, "VM lifetime set");
        Ok(v)
    }

    /// Starts a new VM's lifetime of `secs` (0: none) from now, when it is ready.
    pub(super) async fn arm_lifetime(&self, id: &str, secs: u32) -> Result<()> {
        if secs == 0 {
            return Ok(());
        }
        let vm = self.get(id).await?;
        self.set_timeout(&vm, secs).await.map(|_| ())
    }

    /// A VM's lifetime began or changed: the keeper looks again.
    pub(super) fn lifetime_changed(&self) {
        self.lifetimes.wake.notify_one();
    }

    /// Whether some VM's lifetime runs: the daemon then stays up to end it.
    pub fn lifetimes_pending(&self) -> bool {
        self.lifetimes.pending.load(Ordering::Relaxed)
    }

    /// Ends VMs as their lifetimes run out, for as long as the daemon runs.
    pub async fn keep_lifetimes(&self) {
        loop {
            let next = match self.end_expired().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!("Cannot read VMs' lifetimes: {}", e.full_message());
                    Some(now_us() + RETRY.as_micros() as u64)
                }
            };
            self.lifetimes
                .pending
                .store(next.is_some(), Ordering::Relaxed);
            let wait = next
                .map(|at| Duration::from_micros(at.saturating_sub(now_us())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.lifetimes.wake.notified() => {}
            }
        }
    }

    /// Ends every VM whose lifetime ran out; the next end to come, if any.
    async fn end_expired(&self) -> Result<Option<u64>> {
        let now = now_us();
        let mut next: Option<u64> = None;
        for vm in self.list().await? {
            if vm.expires_at == 0 {
                continue;
            }
            if vm.expires_at > now {
                next = Some(next.map_or(vm.expires_at, |n| n.min(vm.expires_at)));
                continue;
            }
            match self.end(&vm).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(vm_id = %vm.id, vm_name = %vm.name,
                        "Cannot end VM {} whose lifetime ran out ({}); trying again in {} s",
                        vm.name, e.full_message(), RETRY.as_secs());
                    let again = now + RETRY.as_micros() as u64;
                    let id = vm.id.clone();
                    let _ = self
                        .store
                        .call(move |c| rows::set_vm_expiry(c, &id, again))
                        .await;
                    next = Some(next.map_or(again, |n| n.min(again)));
                }
            }
        }
        Ok(next)
    }

    /// Ends `vm` as its `on_expire` says; a stopped or paused VM keeps no lifetime.
    async fn end(&self, vm: &Vm) -> Result<()> {
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, on_expire = vm.on_expire.as_str(),
            "VM {}'s lifetime ran out", vm.name);
        match vm.on_expire {
            OnExpire::Delete => return self.delete(vm, true).await,
            OnExpire::Stop => {
                if !matches!(
                    vm.state,
                    VmState::Stopped | VmState::Created | VmState::Failed
                ) {
                    self.stop(vm, StopOptions::default()).await?;
                }
            }
            OnExpire::Pause => {
                if vm.state == VmState::Running {
                    self.pause(vm).await?;
                }
            }
        }
        self.set_timeout(vm, 0).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_bounded_and_actions_named() {
        assert_eq!(check_timeout(0).unwrap(), 0);
        assert!(check_timeout(MAX_TIMEOUT_SEC + 1).is_err());
        assert_eq!(on_expire(None).unwrap(), OnExpire::Delete);
        assert_eq!(on_expire(Some("pause")).unwrap(), OnExpire::Pause);
        let e = on_expire(Some("explode")).unwrap_err().to_string();
        assert!(e.contains("delete, stop or pause"), "{e}");
        assert_eq!(expiry(0), 0);
        let at = expiry(10);
        assert!(at > now_us() + 9_000_000 && at <= now_us() + 10_000_000);
    }
}
