//! Row mapping and queries, one group per table. Functions take a `&Connection` so callers
//! can compose them inside one transaction.

use std::path::PathBuf;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{Store, StoreError};
use crate::model::{Image, Kernel, Snapshot, Vm, VmState};

fn opt_path(s: Option<String>) -> Option<PathBuf> {
    s.filter(|s| !s.is_empty()).map(PathBuf::from)
}

fn path_str(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.to_string_lossy().into_owned())
}

const IMAGE_COLS: &str = "id, name, managed, source, rootfs_path, work_seed_path, kernel, \
     size_bytes, created_at, ready_ports, config, owner_uid";

fn ports_str(p: &[u16]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_of(s: &str) -> Vec<u16> {
    s.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

fn image_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: r.get(0)?,
        name: r.get(1)?,
        managed: r.get(2)?,
        source: r.get(3)?,
        rootfs_path: PathBuf::from(r.get::<_, String>(4)?),
        work_seed_path: opt_path(r.get(5)?),
        kernel: r.get::<_, Option<String>>(6)?.filter(|s| !s.is_empty()),
        size_bytes: r.get::<_, i64>(7)? as u64,
        created_at: r.get::<_, i64>(8)? as u64,
        ready_ports: ports_of(&r.get::<_, String>(9)?),
        config: crate::model::ImageConfig::from_json(&r.get::<_, String>(10)?),
        owner_uid: r.get(11)?,
    })
}

/// All images, by name.
pub fn list_images(c: &Connection) -> Result<Vec<Image>, StoreError> {
    let mut st = c.prepare(&format!("SELECT {IMAGE_COLS} FROM images ORDER BY name"))?;
    let rows = st.query_map([], image_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The image whose name or id is `key`.
pub fn find_image(c: &Connection, key: &str) -> Result<Option<Image>, StoreError> {
    let sql = format!("SELECT {IMAGE_COLS} FROM images WHERE name = ?1 OR id = ?1 LIMIT 1");
    Ok(c.query_row(&sql, [key], image_row).optional()?)
}

/// Inserts a new image row.
pub fn insert_image(c: &Connection, i: &Image) -> Result<(), StoreError> {
    upsert_image(c, i).map(|_| ())
}

/// Inserts or replaces an image row by id (keeping its creation time); true when it
/// replaced one. A new row whose name is taken still fails on the name's UNIQUE constraint.
pub fn upsert_image(c: &Connection, i: &Image) -> Result<bool, StoreError> {
    let existed: bool = c.query_row("SELECT COUNT(*) FROM images WHERE id = ?1", [&i.id], |r| {
        r.get::<_, i64>(0)
    })? > 0;
    c.execute(
        &format!(
            "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, managed = excluded.managed, \
             source = excluded.source, rootfs_path = excluded.rootfs_path, \
             work_seed_path = excluded.work_seed_path, kernel = excluded.kernel, \
             size_bytes = excluded.size_bytes, ready_ports = excluded.ready_ports, \
             config = excluded.config"
        ),
        params![
            i.id,
            i.name,
            i.managed,
            i.source,
            i.rootfs_path.to_string_lossy(),
            path_str(&i.work_seed_path),
            i.kernel,
            i.size_bytes as i64,
            i.created_at as i64,
            ports_str(&i.ready_ports),
            i.config.to_json(),
            i.owner_uid
        ],
    )?;
    Ok(existed)
}

/// Deletes an image row.
pub fn delete_image(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM images WHERE id = ?1", [id])?;
    Ok(())
}

const KERNEL_COLS: &str =
    "name, version, source, kernel_path, initrd_path, modules_dir, created_at, owner_uid";

fn kernel_row(r: &Row<'_>) -> rusqlite::Result<Kernel> {
    Ok(Kernel {
        name: r.get(0)?,
        version: r.get(1)?,
        source: r.get(2)?,
        kernel_path: PathBuf::from(r.get::<_, String>(3)?),
        initrd_path: opt_path(r.get(4)?),
        modules_dir: opt_path(r.get(5)?),
        created_at: r.get::<_, i64>(6)? as u64,
        owner_uid: r.get(7)?,
    })
}

/// All kernels, by name.
pub fn list_kernels(c: &Connection) -> Result<Vec<Kernel>, StoreError> {
    let mut st = c.prepare(&format!("SELECT {KERNEL_COLS} FROM kernels ORDER BY name"))?;
    let rows = st.query_map([], kernel_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The kernel named `name`.
pub fn find_kernel(c: &Connection, name: &str) -> Result<Option<Kernel>, StoreError> {
    let sql = format!("SELECT {KERNEL_COLS} FROM kernels WHERE name = ?1");
    Ok(c.query_row(&sql, [name], kernel_row).optional()?)
}

/// Inserts a new kernel row.
pub fn insert_kernel(c: &Connection, k: &Kernel) -> Result<(), StoreError> {
    c.execute(
        &format!("INSERT INTO kernels ({KERNEL_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
        params![
            k.name,
            k.version,
            k.source,
            k.kernel_path.to_string_lossy(),
            path_str(&k.initrd_path),
            path_str(&k.modules_dir),
            k.created_at as i64,
            k.owner_uid
        ],
    )?;
    Ok(())
}

/// How many images and VMs name the kernel.
pub fn users_of_kernel(c: &Connection, name: &str) -> Result<u64, StoreError> {
    let images: i64 = c.query_row(
        "SELECT COUNT(*) FROM images WHERE kernel = ?1",
        [name],
        |r| r.get(0),
    )?;
    let vms: i64 = c.query_row("SELECT COUNT(*) FROM vms WHERE kernel = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok((images + vms) as u64)
}

/// Deletes a kernel row.
pub fn delete_kernel(c: &Connection, name: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM kernels WHERE name = ?1", [name])?;
    Ok(())
}

const VM_COLS: &str = "id, name, state, stage, image_id, kernel, vcpus, memory_mib, disk_size, \
     owner_uid, guest_address, mac_address, vsock_cid, tap_name, ssh_address, created_at, ssh_host_key, \
     network, egress, init, main, exit_status, publish, shares, snapshot, machine, labels, expires_at, on_expire, rootfs_dir, netns";

fn vm_row(r: &Row<'_>) -> rusqlite::Result<Vm> {
    let state: String = r.get(2)?;
    Ok(Vm {
        id: r.get(0)?,
        name: r.get(1)?,
        state: VmState::parse(&state).unwrap_or(VmState::Failed),
        stage: r.get(3)?,
        // NULL for a VM whose root is a folder.
        image_id: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
        kernel: r.get(5)?,
        vcpus: r.get(6)?,
        memory_mib: r.get(7)?,
        disk_size: r.get::<_, i64>(8)? as u64,
        owner_uid: r.get(9)?,
        guest_address: r.get(10)?,
        mac_address: r.get(11)?,
        vsock_cid: r.get(12)?,
        tap_name: r.get(13)?,
        ssh_address: r.get(14)?,
        created_at: r.get::<_, i64>(15)? as u64,
        ssh_host_key: r.get(16)?,
        network: crate::model::NetworkMode::parse(&r.get::<_, String>(17)?)
            .unwrap_or(crate::model::NetworkMode::Isolated),
        egress: r
            .get::<_, String>(18)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        init: r.get(19)?,
        main: serde_json::from_str(&r.get::<_, String>(20)?).unwrap_or_default(),
        exit_status: r.get(21)?,
        publish: r
            .get::<_, String>(22)?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        shares: serde_json::from_str(&r.get::<_, String>(23)?).unwrap_or_default(),
        snapshot: r.get(24)?,
        machine: r.get(25)?,
        labels: serde_json::from_str(&r.get::<_, String>(26)?).unwrap_or_default(),
        expires_at: r.get::<_, i64>(27)? as u64,
        on_expire: crate::model::OnExpire::parse(&r.get::<_, String>(28)?).unwrap_or_default(),
        rootfs_dir: r.get(29)?,
        netns: r.get(30)?,
    })
}

/// All VMs, by name.
pub fn list_vms(c: &Connection) -> Result<Vec<Vm>, StoreError> {
    let mut st = c.prepare(&format!("SELECT {VM_COLS} FROM vms ORDER BY name"))?;
    let rows = st.query_map([], vm_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The VM whose name or id is `key`.
pub fn find_vm(c: &Connection, key: &str) -> Result<Option<Vm>, StoreError> {
    let sql = format!("SELECT {VM_COLS} FROM vms WHERE name = ?1 OR id = ?1 LIMIT 1");
    Ok(c.query_row(&sql, [key], vm_row).optional()?)
}

/// Inserts a new VM row.
pub fn insert_vm(c: &Connection, v: &Vm) -> Result<(), StoreError> {
    c.execute(
        &format!(
            "INSERT INTO vms ({VM_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31)"
        ),
        params![
            v.id,
            v.name,
            v.state.as_str(),
            v.stage,
            (!v.image_id.is_empty()).then_some(&v.image_id),
            v.kernel,
            v.vcpus,
            v.memory_mib,
            v.disk_size as i64,
            v.owner_uid,
            v.guest_address,
            v.mac_address,
            v.vsock_cid,
            v.tap_name,
            v.ssh_address,
            v.created_at as i64,
            v.ssh_host_key,
            v.network.as_str(),
            v.egress.join("\n"),
            v.init,
            main_json(&v.main),
            v.exit_status,
            v.publish.join("\n"),
            if v.shares.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&v.shares).unwrap_or_default()
            },
            v.snapshot,
            v.machine,
            if v.labels.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&v.labels).unwrap_or_default()
            },
            v.expires_at as i64,
            v.on_expire.as_str(),
            v.rootfs_dir,
            v.netns
        ],
    )?;
    Ok(())
}

/// What a reservation hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Guest IPv4 address.
    pub address: String,
    /// vsock context id.
    pub cid: u32,
}

/// Guest CIDs start above the reserved ones (0 hypervisor, 1 local, 2 host).
pub const FIRST_CID: u32 = 3;

/// The reservation's critical section, in one transaction: the name is re-checked, the
/// lowest free CID and address of `pool` are taken, and the `created` row and its lease are
/// written. `None` when the name is taken; an error when the pool is exhausted.
pub fn reserve_vm(
    c: &mut Connection,
    v: &Vm,
    pool: &[std::net::Ipv4Addr],
    max_owned: u32,
) -> Result<Option<Reservation>, StoreError> {
    let tx = c.transaction()?;
    let taken: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM vms WHERE name = ?1)",
        [&v.name],
        |r| r.get(0),
    )?;
    if taken {
        return Ok(None);
    }
    // Counted in the same transaction as the insert: parallel creates cannot all pass.
    let owned: u32 = tx.query_row(
        "SELECT COUNT(*) FROM vms WHERE owner_uid = ?1",
        [v.owner_uid],
        |r| r.get(0),
    )?;
    if owned >= max_owned {
        return Err(StoreError::Quota(crate::model::quota_message(
            v.owner_uid,
            "owns",
            owned,
            max_owned,
            "max_vms_per_user",
            "delete one (`banger vm delete NAME`)",
        )));
    }
    let cid: u32 = tx.query_row(
        "SELECT COALESCE(MIN(c.cid + 1), ?1) FROM          (SELECT ?1 - 1 AS cid UNION ALL SELECT vsock_cid FROM vms) c          WHERE c.cid + 1 >= ?1 AND NOT EXISTS (SELECT 1 FROM vms WHERE vsock_cid = c.cid + 1)",
        [FIRST_CID],
        |r| r.get(0),
    )?;
    let leased: std::collections::HashSet<String> = {
        let mut st = tx.prepare("SELECT address FROM address_leases")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    // A VM in a given network namespace takes that namespace's address, not one of ours.
    let address = if !v.netns.is_empty() {
        String::new()
    } else if let Some(a) = pool
        .iter()
        .map(|a| a.to_string())
        .find(|a| !leased.contains(a))
    {
        a
    } else {
        return Err(StoreError::Exhausted(format!(
            "all {} guest addresses are leased; delete a VM or widen the subnet",
            pool.len()
        )));
    };
    let mut row = v.clone();
    row.guest_address = address.clone();
    row.vsock_cid = cid;
    insert_vm(&tx, &row)?;
    if !address.is_empty() {
        tx.execute(
            "INSERT INTO address_leases (address, vm_id, leased_at) VALUES (?1, ?2, ?3)",
            params![address, v.id, v.created_at as i64],
        )?;
    }
    tx.commit()?;
    Ok(Some(Reservation { address, cid }))
}

fn main_json(main: &[String]) -> String {
    if main.is_empty() {
        String::new()
    } else {
        serde_json::to_string(main).unwrap_or_default()
    }
}

/// Writes a VM's changing fields.
pub fn update_vm(c: &Connection, v: &Vm) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE vms SET state = ?2, stage = ?3, ssh_address = ?4, ssh_host_key = ?5, \
         exit_status = ?6, machine = ?7 WHERE id = ?1",
        params![
            v.id,
            v.state.as_str(),
            v.stage,
            v.ssh_address,
            v.ssh_host_key,
            v.exit_status,
            v.machine
        ],
    )?;
    if n == 0 {
        // Deleted meanwhile: an update must not pretend it landed.
        return Err(StoreError::Gone(format!("VM {} no longer exists", v.name)));
    }
    Ok(())
}

/// Forgets the snapshot a VM was restored from: a VM whose root is a folder holds nothing
/// of it once restored (its memory is its own copy), so the snapshot may go.
pub fn forget_vm_snapshot(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.execute("UPDATE vms SET snapshot = '' WHERE id = ?1", [id])?;
    Ok(())
}

/// Sets when a VM's lifetime ends (µs since the epoch; 0: never).
pub fn set_vm_expiry(c: &Connection, id: &str, expires_at: u64) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE vms SET expires_at = ?2 WHERE id = ?1",
        params![id, expires_at as i64],
    )?;
    if n == 0 {
        return Err(StoreError::Gone(format!("VM {id} no longer exists")));
    }
    Ok(())
}

/// Deletes a VM row; its address lease goes with it.
pub fn delete_vm(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM vms WHERE id = ?1", [id])?;
    Ok(())
}

/// How many VMs reference the image.
pub fn vms_using_image(c: &Connection, image_id: &str) -> Result<u64, StoreError> {
    Ok(c.query_row(
        "SELECT COUNT(*) FROM vms WHERE image_id = ?1",
        [image_id],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

const SNAPSHOT_COLS: &str = "id, name, vm_id, vm_name, image_id, kernel, vcpus, memory_mib, \
     disk_size, size_bytes, created_at, owner_uid, memory_sha256, memory_size, init, warm, vmm, machine, ram_sha256";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: r.get(0)?,
        name: r.get(1)?,
        vm_id: r.get(2)?,
        vm_name: r.get(3)?,
        image_id: r.get(4)?,
        kernel: r.get(5)?,
        vcpus: r.get(6)?,
        memory_mib: r.get(7)?,
        disk_size: r.get::<_, i64>(8)? as u64,
        size_bytes: r.get::<_, i64>(9)? as u64,
        created_at: r.get::<_, i64>(10)? as u64,
        owner_uid: r.get(11)?,
        memory_sha256: r.get(12)?,
        memory_size: r.get::<_, i64>(13)? as u64,
        init: r.get(14)?,
        warm: r.get(15)?,
        vmm: r.get(16)?,
        machine: r.get(17)?,
        ram_sha256: r.get(18)?,
    })
}

/// All snapshots, by name.
pub fn list_snapshots(c: &Connection) -> Result<Vec<Snapshot>, StoreError> {
    let mut st = c.prepare(&format!(
        "SELECT {SNAPSHOT_COLS} FROM snapshots ORDER BY name"
    ))?;
    let rows = st.query_map([], snapshot_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The snapshot whose name or id is `key`.
pub fn find_snapshot(c: &Connection, key: &str) -> Result<Option<Snapshot>, StoreError> {
    let sql = format!("SELECT {SNAPSHOT_COLS} FROM snapshots WHERE name = ?1 OR id = ?1 LIMIT 1");
    Ok(c.query_row(&sql, [key], snapshot_row).optional()?)
}

/// Inserts a snapshot row; `false` when the name is taken.
pub fn insert_snapshot(c: &Connection, s: &Snapshot) -> Result<bool, StoreError> {
    let n = c.execute(
        &format!(
            "INSERT OR IGNORE INTO snapshots ({SNAPSHOT_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
        ),
        params![
            s.id,
            s.name,
            s.vm_id,
            s.vm_name,
            s.image_id,
            s.kernel,
            s.vcpus,
            s.memory_mib,
            s.disk_size as i64,
            s.size_bytes as i64,
            s.created_at as i64,
            s.owner_uid,
            s.memory_sha256,
            s.memory_size as i64,
            s.init,
            s.warm,
            s.vmm,
            s.machine,
            s.ram_sha256
        ],
    )?;
    Ok(n == 1)
}

/// The newest warm snapshot serving `key`.
pub fn find_warm_snapshot(c: &Connection, key: &str) -> Result<Option<Snapshot>, StoreError> {
    let sql = format!(
        "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE warm = ?1 ORDER BY created_at DESC LIMIT 1"
    );
    Ok(c.query_row(&sql, [key], snapshot_row).optional()?)
}

/// Deletes a snapshot row.
pub fn delete_snapshot(c: &Connection, id: &str) -> Result<(), StoreError> {
    c.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
    Ok(())
}

/// How many VMs' disks layer on the snapshot.
pub fn vms_using_snapshot(c: &Connection, id: &str) -> Result<u64, StoreError> {
    Ok(
        c.query_row("SELECT COUNT(*) FROM vms WHERE snapshot = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })? as u64,
    )
}

/// How many snapshots users took layer on the image (warm snapshots go with their image:
/// `vms::warm`).
pub fn snapshots_using_image(c: &Connection, image_id: &str) -> Result<u64, StoreError> {
    Ok(c.query_row(
        "SELECT COUNT(*) FROM snapshots WHERE image_id = ?1 AND warm = ''",
        [image_id],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// A long operation as the store remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    /// The job id.
    pub id: u32,
    /// What kind of work.
    pub kind: String,
    /// What it works on.
    pub target: String,
    /// `running`, `done`, `failed` or `canceled`.
    pub state: String,
    /// The error, when it failed.
    pub error: String,
}

/// The highest job id ever used, so ids stay unique across restarts.
pub fn max_job_id(c: &Connection) -> Result<u32, StoreError> {
    Ok(
        c.query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| {
            r.get::<_, i64>(0)
        })? as u32,
    )
}

/// Records a started job.
pub fn insert_job(c: &Connection, j: &JobRecord, started_at: u64) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO jobs (id, kind, target, state, error, started_at) VALUES (?1,?2,?3,?4,?5,?6)",
        params![j.id, j.kind, j.target, j.state, j.error, started_at as i64],
    )?;
    Ok(())
}

/// Records how a job ended.
pub fn finish_job(
    c: &Connection,
    id: u32,
    state: &str,
    error: &str,
    at: u64,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE jobs SET state = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
        params![id, state, error, at as i64],
    )?;
    prune_jobs(c, at)?;
    Ok(())
}

/// How long a finished job's record is kept (µs), and how many records at most.
pub const JOB_KEEP_US: u64 = 7 * 24 * 3600 * 1_000_000;
/// The most job records kept; the highest id always stays, so ids never repeat.
pub const JOB_KEEP_COUNT: u32 = 1000;

/// Forgets finished jobs older than [`JOB_KEEP_US`] or beyond the newest [`JOB_KEEP_COUNT`].
pub fn prune_jobs(c: &Connection, now: u64) -> Result<usize, StoreError> {
    Ok(c.execute(
        "DELETE FROM jobs WHERE state != 'running' AND id < (SELECT MAX(id) FROM jobs) \
         AND (finished_at < ?1 OR id <= (SELECT id FROM jobs ORDER BY id DESC LIMIT 1 OFFSET ?2))",
        params![now.saturating_sub(JOB_KEEP_US) as i64, JOB_KEEP_COUNT],
    )?)
}

/// Marks jobs a dead daemon left `running` as failed; returns how many.
pub fn fail_interrupted_jobs(c: &Connection, at: u64) -> Result<usize, StoreError> {
    Ok(c.execute(
        "UPDATE jobs SET state = 'failed', error = 'Interrupted: the daemon stopped while it ran', \
         finished_at = ?1 WHERE state = 'running'",
        [at as i64],
    )?)
}

/// One job's record.
pub fn find_job(c: &Connection, id: u32) -> Result<Option<JobRecord>, StoreError> {
    Ok(c.query_row(
        "SELECT id, kind, target, state, error FROM jobs WHERE id = ?1",
        [id],
        |r| {
            Ok(JobRecord {
                id: r.get(0)?,
                kind: r.get(1)?,
                target: r.get(2)?,
                state: r.get(3)?,
                error: r.get(4)?,
            })
        },
    )
    .optional()?)
}

impl Store {
    /// An in-memory store for unit tests.
    pub fn open_in_memory() -> crate::Result<Self> {
        let mut conn = Connection::open_in_memory().map_err(StoreError::from)?;
        super::migrations::migrate(&mut conn)?;
        Ok(Store {
            conn: std::sync::Arc::new(std::sync::Mutex::new(conn)),
            path: PathBuf::from(":memory:"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::now_us;

    fn image(name: &str) -> Image {
        Image {
            id: crate::model::new_id(),
            name: name.into(),
            managed: true,
            source: "test".into(),
            rootfs_path: "/x/rootfs.ext4".into(),
            work_seed_path: None,
            kernel: Some("debian".into()),
            size_bytes: 1 << 30,
            created_at: now_us(),
            ready_ports: Vec::new(),
            config: Default::default(),
            owner_uid: 1000,
        }
    }

    #[test]
    fn images_round_trip_and_names_are_unique() {
        let s = Store::open_in_memory().unwrap();
        let img = image("a");
        s.call_blocking(|c| insert_image(c, &img)).unwrap();
        let found = s.call_blocking(|c| find_image(c, "a")).unwrap().unwrap();
        assert_eq!(found, img);
        let by_id = s
            .call_blocking(|c| find_image(c, &img.id))
            .unwrap()
            .unwrap();
        assert_eq!(by_id.name, "a");
        let dup = image("a");
        assert!(s.call_blocking(|c| insert_image(c, &dup)).is_err());
    }

    #[test]
    fn upsert_replaces_by_id_and_keeps_the_creation_time() {
        let s = Store::open_in_memory().unwrap();
        let img = image("a");
        assert!(!s.call_blocking(|c| upsert_image(c, &img)).unwrap());
        let changed = Image {
            size_bytes: 7,
            created_at: 1,
            managed: false,
            owner_uid: 1001,
            ..img.clone()
        };
        assert!(s.call_blocking(|c| upsert_image(c, &changed)).unwrap());
        let got = s.call_blocking(|c| find_image(c, "a")).unwrap().unwrap();
        // A replacement never changes who owns the image.
        assert_eq!(
            (got.size_bytes, got.managed, got.created_at, got.owner_uid),
            (7, false, img.created_at, 1000)
        );
    }

    #[test]
    fn job_ids_survive_and_interrupted_jobs_fail() {
        let s = Store::open_in_memory().unwrap();
        let rec = JobRecord {
            id: 7,
            kind: "pull-image".into(),
            target: "x".into(),
            state: "running".into(),
            error: String::new(),
        };
        s.call_blocking(|c| insert_job(c, &rec, 1)).unwrap();
        assert_eq!(s.call_blocking(|c| max_job_id(c)).unwrap(), 7);
        assert_eq!(s.call_blocking(|c| fail_interrupted_jobs(c, 2)).unwrap(), 1);
        let after = s.call_blocking(|c| find_job(c, 7)).unwrap().unwrap();
        assert_eq!(after.state, "failed");
    }

    #[test]
    fn finished_jobs_are_kept_for_a_bounded_time_and_count() {
        let s = Store::open_in_memory().unwrap();
        let n = JOB_KEEP_COUNT + 50;
        for id in 1..=n {
            let rec = JobRecord {
                id,
                kind: "pull-image".into(),
                target: "x".into(),
                state: "running".into(),
                error: String::new(),
            };
            s.call_blocking(move |c| insert_job(c, &rec, 1)).unwrap();
        }
        // Job 1 ends long ago, the rest now: 1 goes by age, the oldest by count.
        s.call_blocking(|c| finish_job(c, 1, "done", "", 1))
            .unwrap();
        let now = JOB_KEEP_US + 10;
        for id in 2..=n {
            s.call_blocking(move |c| finish_job(c, id, "done", "", now))
                .unwrap();
        }
        let left: u32 = s
            .call_blocking(|c| Ok(c.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(left, JOB_KEEP_COUNT);
        assert_eq!(s.call_blocking(|c| max_job_id(c)).unwrap(), n);
        assert!(s.call_blocking(|c| find_job(c, 1)).unwrap().is_none());
    }
}
