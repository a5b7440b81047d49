//! VMs on a systemd host: each VM's VMM runs as a transient service of its own started by
//! systemd (`banger-vm-<id>.service`, its helpers `banger-vm-<id>-link.service` and
//! `banger-vm-<id>-console.service`; names come from ids, never from what a user typed, so
//! no VM's name can collide with another's unit; see
//! `process::spawn_detached`), so it neither lives in `bangerd`'s cgroup (stopping the daemon
//! or its idle exit never takes a VM down) nor inherits the daemon's sandbox, and
//! `systemctl status` shows each VM apart. With systemd-machined, a ready VM is also
//! registered as a machine of class `vm` (`machinectl list`), as libvirt and systemd-vmspawn
//! do: over Varlink (`io.systemd.Machine.Register`, systemd ≥ 256) where machined listens on
//! its socket, else over D-Bus. Elsewhere VMs run in sessions of their own and none of this
//! applies.

use zbus::Variant as Value;

use super::error::failed;
use crate::{Error, Result};

/// Whether systemd is the init of this host (its runtime directory exists).
pub fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// The unit the VM's VMM runs as.
pub fn vm_unit(vm_id: &str) -> String {
    format!("banger-vm-{vm_id}.service")
}

/// The unit one of the VM's helpers (`link`, `console`, a share) runs as.
pub fn helper_unit(vm_id: &str, role: &str) -> String {
    format!("banger-vm-{vm_id}-{role}.service")
}

pub use crate::model::machine_name;

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
    /// The VM's `io.systemd.MachineInstance` socket, when its relay listens (see
    /// `varlink::relay`): machinectl's poweroff, pause, resume and terminate go there.
    pub control_address: Option<&'a str>,
}

fn fail(what: String) -> impl FnOnce(zbus::Error) -> Error {
    move |e| failed(what, e)
}

/// Registers the VM with systemd-machined: `RegisterMachineEx` with its vsock CID and SSH
/// address where machined has it (systemd ≥ 256), else `RegisterMachine`.
pub async fn register(conn: &zbus::Connection, m: &Machine<'_>) -> Result<()> {
    let name = machine_name(m.id);
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
        Err(e) if is_unknown_method(&e) => {}
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

/// machined's Varlink socket (systemd ≥ 256).
pub const MACHINED_VARLINK: &str = "/run/systemd/machine/io.systemd.Machine";

/// `io.systemd.Machine.Register`'s parameters for `m`: the fields machined has had since
/// systemd 256, and `controlAddress` (systemd ≥ 260) when the VM has one (an older machined
/// refuses fields it does not know, and is asked again without it). banger made the VM's
/// unit itself (`allocateUnit` false); it holds no private key for a VM's users, so
/// `sshPrivateKeyPath` stays out.
pub fn register_params(m: &Machine<'_>) -> serde_json::Value {
    let mut p = serde_json::json!({
        "name": machine_name(m.id),
        "id": machine_id(m.id).iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "service": "banger",
        "class": "vm",
        "leader": m.pids.first().copied().unwrap_or(0),
        "vSockCid": m.cid,
        "allocateUnit": false,
    });
    if !m.ssh_address.is_empty() {
        p["sshAddress"] = m.ssh_address.into();
    }
    if let Some(a) = m.control_address {
        p["controlAddress"] = a.into();
    }
    p
}

/// What a Varlink call to machined came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answered {
    /// It did it.
    Done,
    /// This machined has no such method or interface (older than the call): use D-Bus.
    Unknown,
    /// This machined does not know this parameter (older than it).
    UnknownParameter(String),
}

/// Calls `method` with `params` on machined's Varlink socket at `socket`.
pub async fn call_machined(
    socket: &std::path::Path,
    method: &str,
    params: serde_json::Value,
) -> Result<Answered> {
    #[derive(Debug, serde::Serialize)]
    struct Call<'a> {
        method: &'a str,
        parameters: serde_json::Value,
    }
    #[derive(Debug, serde::Deserialize)]
    struct Fault {
        error: String,
        #[serde(default)]
        parameters: serde_json::Value,
    }
    let what = || format!("Cannot call {method} on {}", socket.display());
    let mut conn = zlink::tokio::unix::connect(socket)
        .await
        .map_err(|e| failed(what(), e))?;
    let call = zlink::Call::new(Call {
        method,
        parameters: params,
    });
    conn.send_call(&call, Vec::new())
        .await
        .map_err(|e| failed(what(), e))?;
    let (reply, _) = match conn.receive_reply::<serde_json::Value, Fault>().await {
        Ok(r) => r,
        // zlink answers org.varlink.service's own errors itself.
        Err(zlink::Error::VarlinkService(e))
            if matches!(
                *e,
                zlink::varlink_service::Error::MethodNotFound { .. }
                    | zlink::varlink_service::Error::InterfaceNotFound { .. }
            ) =>
        {
            return Ok(Answered::Unknown)
        }
        Err(zlink::Error::VarlinkService(e)) => {
            if let zlink::varlink_service::Error::InvalidParameter { parameter } = &*e {
                return Ok(Answered::UnknownParameter(parameter.to_string()));
            }
            return Err(failed(what(), zlink::Error::VarlinkService(e)));
        }
        Err(e) => return Err(failed(what(), e)),
    };
    match reply {
        Ok(_) => Ok(Answered::Done),
        Err(f) => Err(failed(
            what(),
            std::io::Error::other(format!("{} {}", f.error, f.parameters)),
        )),
    }
}

/// `io.systemd.Machine.Register` on machined's socket `socket`: with the VM's control
/// address, and again without it where machined is older than that parameter (256–259;
/// machinectl then signals the VMM's process instead).
pub async fn register_varlink(socket: &std::path::Path, m: &Machine<'_>) -> Result<Answered> {
    const REGISTER: &str = "io.systemd.Machine.Register";
    let mut params = register_params(m);
    match call_machined(socket, REGISTER, params.clone()).await? {
        Answered::UnknownParameter(p) if p == "controlAddress" => {
            if let Some(fields) = params.as_object_mut() {
                fields.remove("controlAddress");
            }
            call_machined(socket, REGISTER, params).await
        }
        a => Ok(a),
    }
}

/// Whether a call failed because the service does not have the method (an older systemd).
fn is_unknown_method(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(n, _, _) => {
            n.as_str() == "org.freedesktop.DBus.Error.UnknownMethod"
        }
        zbus::Error::FDO(f) => matches!(**f, zbus::fdo::Error::UnknownMethod(_)),
        _ => false,
    }
}

/// Removes the VM's machine registration; fine when there is none.
pub async fn unregister(conn: &zbus::Connection, vm_id: &str) {
    let name = machine_name(vm_id);
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

/// Starts machined through the bus (a no-op when it runs).
async fn start_machined(conn: &zbus::Connection) {
    let Ok(dbus) = zbus::fdo::DBusProxy::new(conn).await else {
        return;
    };
    if let Ok(name) = zbus::names::WellKnownName::try_from("org.freedesktop.machine1") {
        if let Err(e) = dbus.start_service_by_name(name, 0).await {
            tracing::debug!("Cannot start machined: {e}");
        }
    }
}

/// machined's 128-bit id from banger's 64-bit one (both halves, so it is stable per VM).
fn machine_id(id: &str) -> Vec<u8> {
    let hex = format!("{id}{id}");
    (0..16)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0))
        .collect()
}

/// Where ready VMs are announced to the host (machined), behind one small trait so the
/// services run without a bus in unit tests.
#[async_trait::async_trait]
pub trait Machines: Send + Sync {
    /// Registers a VM that just became ready. Problems are logged, never fatal: the VM runs.
    async fn announce(&self, m: &Machine<'_>);
    /// Forgets a VM that stopped (its units go by themselves with their processes).
    async fn withdraw(&self, vm_id: &str);
}

/// systemd-machined on the system bus, through one connection made when first needed.
#[derive(Default)]
pub struct Machined {
    conn: tokio::sync::OnceCell<Option<zbus::Connection>>,
}

impl Machined {
    /// machined's Varlink socket, when this host has one.
    fn varlink(&self) -> Option<&'static std::path::Path> {
        let p = std::path::Path::new(MACHINED_VARLINK);
        (systemd_booted() && p.exists()).then_some(p)
    }

    /// The connection, when this host runs systemd and its bus answers.
    async fn conn(&self) -> Option<&zbus::Connection> {
        self.conn
            .get_or_init(|| async {
                if !systemd_booted() {
                    return None;
                }
                match zbus::Connection::system().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!("Cannot reach machined on the system bus: {e}");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }
}

#[async_trait::async_trait]
impl Machines for Machined {
    async fn announce(&self, m: &Machine<'_>) {
        if m.pids.is_empty() {
            return;
        }
        let mut varlink = self.varlink();
        if varlink.is_none() {
            // machined may not run yet: starting it through the bus (it is activatable) makes
            // a new one listen on its Varlink socket too.
            if let Some(conn) = self.conn().await {
                if machined_available(conn).await {
                    start_machined(conn).await;
                    varlink = self.varlink();
                }
            }
        }
        if let Some(socket) = varlink {
            let name = machine_name(m.id);
            match register_varlink(socket, m).await {
                Ok(Answered::Done) => {
                    tracing::info!(
                        vm_name = m.name,
                        "Registered machine {name} with machined over Varlink"
                    );
                    return;
                }
                Ok(Answered::Unknown) => {}
                Ok(Answered::UnknownParameter(p)) => {
                    tracing::warn!(
                        vm_name = m.name,
                        "machined refused parameter {p} of its Register; registering over D-Bus"
                    );
                }
                Err(e) => {
                    tracing::warn!(vm_name = m.name, "{}", e.full_message());
                    return;
                }
            }
        }
        let Some(conn) = self.conn().await else {
            return;
        };
        if machined_available(conn).await {
            match register(conn, m).await {
                Ok(()) => tracing::info!(
                    vm_name = m.name,
                    "Registered machine {} with machined over D-Bus",
                    machine_name(m.id)
                ),
                Err(e) => tracing::warn!(vm_name = m.name, "{}", e.full_message()),
            }
        }
    }

    async fn withdraw(&self, vm_id: &str) {
        if let Some(socket) = self.varlink() {
            let name = machine_name(vm_id);
            let params = serde_json::json!({ "name": name });
            match call_machined(socket, "io.systemd.Machine.Unregister", params).await {
                Ok(Answered::Done) => return,
                // Gone already (its leader exited), or an older machined: try D-Bus too.
                Ok(Answered::Unknown | Answered::UnknownParameter(_)) | Err(_) => {}
            }
        }
        if let Some(conn) = self.conn().await {
            unregister(conn, vm_id).await;
        }
    }
}

/// No machine registry (unit tests, benchmarks with stand-in VMMs).
pub struct NoMachines;

#[async_trait::async_trait]
impl Machines for NoMachines {
    async fn announce(&self, _: &Machine<'_>) {}
    async fn withdraw(&self, _: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_for_systemd_and_machined() {
        let id = "0123456789abcdef";
        assert_eq!(vm_unit(id), "banger-vm-0123456789abcdef.service");
        assert_eq!(
            helper_unit(id, "link"),
            "banger-vm-0123456789abcdef-link.service"
        );
        assert_eq!(machine_name(id), "banger-0123456789abcdef");
        assert_eq!(machine_id("0123456789abcdef").len(), 16);
        assert_eq!(machine_id("0123456789abcdef")[0], 0x01);
    }

    fn machine<'a>(pids: &'a [u32], ssh: &'a str) -> Machine<'a> {
        Machine {
            name: "t1",
            id: "0123456789abcdef",
            pids,
            cid: 7,
            ssh_address: ssh,
            control_address: None,
        }
    }

    #[test]
    fn register_sends_only_fields_machined_knows() {
        let p = register_params(&machine(&[42, 43], "10.0.0.2:22"));
        assert_eq!(
            p,
            serde_json::json!({
                "name": "banger-0123456789abcdef",
                "id": "0123456789abcdef0123456789abcdef",
                "service": "banger",
                "class": "vm",
                "leader": 42,
                "vSockCid": 7,
                "sshAddress": "10.0.0.2:22",
                "allocateUnit": false,
            })
        );
        let p = register_params(&machine(&[42], ""));
        assert!(p.get("sshAddress").is_none(), "{p}");
        assert!(p.get("controlAddress").is_none(), "{p}");
        let control = Machine {
            control_address: Some("/run/banger/machines/banger-0123456789abcdef"),
            ..machine(&[42], "")
        };
        assert_eq!(
            register_params(&control)["controlAddress"],
            "/run/banger/machines/banger-0123456789abcdef"
        );
    }

    /// A stand-in for machined's socket: reads one call, answers `reply`, returns the call.
    async fn answer_once_on(
        listener: &tokio::net::UnixListener,
        reply: &'static str,
    ) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).await.unwrap() == 1 && byte[0] != 0 {
            buf.push(byte[0]);
        }
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(b"\0").await.unwrap();
        serde_json::from_slice(&buf).unwrap()
    }

    #[tokio::test]
    async fn varlink_calls_tell_done_unknown_and_refused_apart() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("io.systemd.Machine");
        for (reply, want) in [
            ("{}", Some(Answered::Done)),
            (
                r#"{"error":"org.varlink.service.MethodNotFound","parameters":{"method":"x"}}"#,
                Some(Answered::Unknown),
            ),
            (
                r#"{"error":"io.systemd.Machine.MachineExists","parameters":{}}"#,
                None,
            ),
        ] {
            let _ = std::fs::remove_file(&sock);
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            let server = tokio::spawn(async move { answer_once_on(&listener, reply).await });
            let params = register_params(&machine(&[42], ""));
            let got = call_machined(&sock, "io.systemd.Machine.Register", params.clone()).await;
            let call = server.await.unwrap();
            assert_eq!(call["method"], "io.systemd.Machine.Register");
            assert_eq!(call["parameters"], params);
            match want {
                Some(w) => assert_eq!(got.unwrap(), w),
                None => {
                    let e = got.unwrap_err().full_message();
                    assert!(e.contains("MachineExists"), "{e}");
                }
            }
        }
        let e = call_machined(
            &dir.path().join("none"),
            "io.systemd.Machine.Register",
            serde_json::json!({}),
        )
        .await
        .unwrap_err()
        .full_message();
        assert!(e.contains("Cannot call io.systemd.Machine.Register"), "{e}");
    }

    #[tokio::test]
    async fn an_older_machined_is_asked_again_without_the_control_address() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("io.systemd.Machine");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let refused = concat!(
                r#"{"error":"org.varlink.service.InvalidParameter","#,
                r#""parameters":{"parameter":"controlAddress"}}"#
            );
            let first = answer_once_on(&listener, refused).await;
            let second = answer_once_on(&listener, "{}").await;
            (first, second)
        });
        let m = Machine {
            control_address: Some("/run/banger/machines/banger-0123456789abcdef"),
            ..machine(&[42], "")
        };
        assert_eq!(register_varlink(&sock, &m).await.unwrap(), Answered::Done);
        let (first, second) = server.await.unwrap();
        assert_eq!(
            first["parameters"]["controlAddress"],
            "/run/banger/machines/banger-0123456789abcdef"
        );
        assert!(
            second["parameters"].get("controlAddress").is_none(),
            "{second}"
        );
        assert_eq!(second["parameters"]["name"], "banger-0123456789abcdef");
    }
}
