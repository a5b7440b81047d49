//! VMs on a systemd host: each VM's processes leave `bangerd`'s cgroup for a transient scope
//! of their own (`banger-vm-<name>.scope`, through `org.freedesktop.systemd1`), so stopping
//! the daemon or its idle exit never takes a VM down, and `systemctl status` shows each VM
//! apart. With systemd-machined, the VM is also registered as a machine of class `vm`
//! (`machinectl list`), as libvirt and systemd-vmspawn do. Elsewhere VMs run in sessions of
//! their own (see `process::spawn_detached`) and none of this applies.

use zbus::Variant as Value;

use crate::{Error, Result};

/// Whether systemd is the init of this host (its runtime directory exists).
pub fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// The VM's scope unit.
pub fn unit_name(vm_name: &str) -> String {
    format!("banger-vm-{vm_name}.scope")
}

/// A machine name machined accepts (a host name): the VM's name with other characters as `-`.
pub fn machine_name(vm_name: &str) -> String {
    let n: String = vm_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    format!("banger-{}", n.trim_matches(['-', '.']))
}

/// What the host should know about a running VM.
#[derive(Debug, Clone)]
pub struct Machine<'a> {
    /// The VM's name.
    pub name: &'a str,
    /// The VM's id (16 hex digits; doubled into machined's 128-bit id).
    pub id: &'a str,
    /// Its processes, the VMM first.
    pub pids: &'a [u32],
    /// The guest's vsock CID.
    pub cid: u32,
    /// `ADDR:22` once sshd answered, else empty.
    pub ssh_address: &'a str,
}

fn fail(what: String) -> impl FnOnce(zbus::Error) -> Error {
    move |e| Error::failed(what, e)
}

/// Moves the VM's processes into `banger-vm-<name>.scope`.
pub async fn adopt(conn: &zbus::Connection, m: &Machine<'_>) -> Result<()> {
    let unit = unit_name(m.name);
    let description = format!("banger VM {}", m.name);
    let props: Vec<(&str, Value<'_>)> = vec![
        ("Description", Value::from(description.as_str())),
        ("PIDs", Value::from(m.pids.to_vec())),
        ("CollectMode", Value::from("inactive-or-failed")),
        // Stopping the scope is stopping the VM the hard way; banger asks the guest first.
        ("SendSIGKILL", Value::from(true)),
    ];
    let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
    conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "StartTransientUnit",
        &(unit.as_str(), "fail", props, aux),
    )
    .await
    .map_err(fail(format!("Cannot start {unit}")))?;
    Ok(())
}

/// Registers the VM with systemd-machined: `RegisterMachineEx` with its vsock CID and SSH
/// address where machined has it (systemd ≥ 256), else `RegisterMachine`.
pub async fn register(conn: &zbus::Connection, m: &Machine<'_>) -> Result<()> {
    let name = machine_name(m.name);
    let id = machine_id(m.id);
    let leader = m.pids.first().copied().unwrap_or(0);
    let mut props: Vec<(&str, Value<'_>)> = vec![
        ("Id", Value::from(id.clone())),
        ("Service", Value::from("banger")),
        ("Class", Value::from("vm")),
        ("LeaderPID", Value::from(leader)),
        ("VSockCID", Value::from(m.cid)),
    ];
    if !m.ssh_address.is_empty() {
        props.push(("SSHAddress", Value::from(m.ssh_address)));
    }
    let ex = conn
        .call_method(
            Some("org.freedesktop.machine1"),
            "/org/freedesktop/machine1",
            Some("org.freedesktop.machine1.Manager"),
            "RegisterMachineEx",
            &(name.as_str(), props),
        )
        .await;
    match ex {
        Ok(_) => return Ok(()),
        Err(zbus::Error::MethodError(n, _, _))
            if n.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" => {}
        Err(e) => return Err(fail(format!("Cannot register machine {name}"))(e)),
    }
    conn.call_method(
        Some("org.freedesktop.machine1"),
        "/org/freedesktop/machine1",
        Some("org.freedesktop.machine1.Manager"),
        "RegisterMachine",
        &(name.as_str(), id, "banger", "vm", leader, ""),
    )
    .await
    .map_err(fail(format!("Cannot register machine {name}")))?;
    Ok(())
}

/// Removes the VM's machine registration; fine when there is none.
pub async fn unregister(conn: &zbus::Connection, vm_name: &str) {
    let name = machine_name(vm_name);
    let _ = conn
        .call_method(
            Some("org.freedesktop.machine1"),
            "/org/freedesktop/machine1",
            Some("org.freedesktop.machine1.Manager"),
            "UnregisterMachine",
            &(name.as_str(),),
        )
        .await;
}

/// Whether machined is on the bus (it is bus-activatable: asking for its name activates it).
pub async fn machined_available(conn: &zbus::Connection) -> bool {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return false;
    };
    let Ok(name) = zbus::names::BusName::try_from("org.freedesktop.machine1") else {
        return false;
    };
    if dbus.name_has_owner(name.clone()).await.unwrap_or(false) {
        return true;
    }
    dbus.list_activatable_names()
        .await
        .map(|names| {
            names
                .iter()
                .any(|n| n.as_str() == "org.freedesktop.machine1")
        })
        .unwrap_or(false)
}

/// machined's 128-bit id from banger's 64-bit one (both halves, so it is stable per VM).
fn machine_id(id: &str) -> Vec<u8> {
    let hex = format!("{id}{id}");
    (0..16)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0))
        .collect()
}

/// Everything the host should know about a VM that just became ready: its scope, and its
/// machined registration when machined runs. Problems are logged, never fatal: the VM runs.
pub async fn announce(m: &Machine<'_>) {
    if !systemd_booted() || m.pids.is_empty() {
        return;
    }
    let conn = match zbus::Connection::system().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("Cannot reach systemd on the system bus: {e}");
            return;
        }
    };
    if let Err(e) = adopt(&conn, m).await {
        tracing::warn!(
            vm_name = m.name,
            "{}; the VM stops with bangerd",
            e.full_message()
        );
    }
    if machined_available(&conn).await {
        if let Err(e) = register(&conn, m).await {
            tracing::warn!(vm_name = m.name, "{}", e.full_message());
        }
    }
}

/// Forgets a VM that stopped: its machine registration (the scope goes by itself with its
/// last process).
pub async fn withdraw(vm_name: &str) {
    if !systemd_booted() {
        return;
    }
    if let Ok(conn) = zbus::Connection::system().await {
        unregister(&conn, vm_name).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_for_systemd_and_machined() {
        assert_eq!(unit_name("dev"), "banger-vm-dev.scope");
        assert_eq!(machine_name("my_vm.1"), "banger-my-vm.1");
        assert_eq!(machine_name("-x-"), "banger-x");
        assert_eq!(machine_id("0123456789abcdef").len(), 16);
        assert_eq!(machine_id("0123456789abcdef")[0], 0x01);
    }
}
