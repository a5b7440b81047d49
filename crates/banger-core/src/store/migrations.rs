//! Versioned schema migrations, tracked in `PRAGMA user_version`. Append only: a released
//! migration is never edited.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE images (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        managed         INTEGER NOT NULL,
        source          TEXT NOT NULL,
        rootfs_path     TEXT NOT NULL,
        work_seed_path  TEXT,
        kernel          TEXT,
        size_bytes      INTEGER NOT NULL,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE kernels (
        name            TEXT PRIMARY KEY,
        version         TEXT NOT NULL,
        source          TEXT NOT NULL,
        kernel_path     TEXT NOT NULL,
        initrd_path     TEXT,
        modules_dir     TEXT,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE vms (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        state           TEXT NOT NULL,
        stage           TEXT NOT NULL,
        image_id        TEXT NOT NULL REFERENCES images(id),
        kernel          TEXT NOT NULL,
        vcpus           INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        disk_size       INTEGER NOT NULL,
        owner_uid       INTEGER NOT NULL,
        guest_address   TEXT NOT NULL,
        mac_address     TEXT NOT NULL UNIQUE,
        vsock_cid       INTEGER NOT NULL UNIQUE,
        tap_name        TEXT NOT NULL UNIQUE,
        ssh_address     TEXT NOT NULL DEFAULT '',
        vmm_pid         INTEGER,
        vmm_start_time  INTEGER,
        created_at      INTEGER NOT NULL
    );
    CREATE TABLE address_leases (
        address         TEXT PRIMARY KEY,
        vm_id           TEXT NOT NULL UNIQUE REFERENCES vms(id) ON DELETE CASCADE,
        leased_at       INTEGER NOT NULL
    );
    CREATE TABLE jobs (
        id              INTEGER PRIMARY KEY,
        kind            TEXT NOT NULL,
        target          TEXT NOT NULL,
        state           TEXT NOT NULL,
        error           TEXT NOT NULL DEFAULT '',
        started_at      INTEGER NOT NULL,
        finished_at     INTEGER
    );
    "#,
    // 2: the VM's own SSH host key (public half), for the known_hosts entry banger manages.
    r#"
    ALTER TABLE vms ADD COLUMN ssh_host_key TEXT NOT NULL DEFAULT '';
    "#,
    // 3: ports an image's services listen on, waited for as `wait_port_<n>` stages.
    r#"
    ALTER TABLE images ADD COLUMN ready_ports TEXT NOT NULL DEFAULT '';
    "#,
    // 4: the VM's network walls: `isolated` or `shared`, and its egress allow-list (one
    // `CIDR[:PORT]` a line; empty: no narrowing).
    r#"
    ALTER TABLE vms ADD COLUMN network TEXT NOT NULL DEFAULT 'isolated';
    ALTER TABLE vms ADD COLUMN egress TEXT NOT NULL DEFAULT '';
    "#,
    // 5: what the guest runs as its init: '' (the image's /sbin/init, else banger-init),
    // 'banger' (banger-init always), or a path in the image.
    r#"
    ALTER TABLE vms ADD COLUMN init TEXT NOT NULL DEFAULT '';
    "#,
    // 6: the image's OCI run settings (Env, WorkingDir, User, Entrypoint, Cmd) as JSON.
    r#"
    ALTER TABLE images ADD COLUMN config TEXT NOT NULL DEFAULT '';
    "#,
    // 7: the VM's main process (JSON argv; '' for none) and its last exit status (-1: none).
    r#"
    ALTER TABLE vms ADD COLUMN main TEXT NOT NULL DEFAULT '';
    ALTER TABLE vms ADD COLUMN exit_status INTEGER NOT NULL DEFAULT -1;
    "#,
    // 8: the VM's published ports (`ADDR:HOSTPORT:GUESTPORT`, one a line).
    r#"
    ALTER TABLE vms ADD COLUMN publish TEXT NOT NULL DEFAULT '';
    "#,
    // 9: the VM's shared folders (JSON `[{host, guest, read_only}]`; '' for none).
    r#"
    ALTER TABLE vms ADD COLUMN shares TEXT NOT NULL DEFAULT '';
    "#,
    // 10: snapshots of running VMs, and the snapshot a VM was restored from (its root disk
    // layers on the snapshot's, so the snapshot stays while the VM does).
    r#"
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        vm_id TEXT NOT NULL,
        vm_name TEXT NOT NULL,
        image_id TEXT NOT NULL,
        kernel TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_size INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        owner_uid INTEGER NOT NULL,
        memory_sha256 TEXT NOT NULL,
        memory_size INTEGER NOT NULL,
        init TEXT NOT NULL,
        warm TEXT NOT NULL DEFAULT ''
    );
    ALTER TABLE vms ADD COLUMN snapshot TEXT NOT NULL DEFAULT '';
    "#,
    // 11: the VMM a snapshot was taken on (its state restores only there).
    r#"
    ALTER TABLE snapshots ADD COLUMN vmm TEXT NOT NULL DEFAULT 'qemu';
    "#,
    // 12: images and kernels have owners; those made before owners existed are the system's.
    r#"
    ALTER TABLE images ADD COLUMN owner_uid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE kernels ADD COLUMN owner_uid INTEGER NOT NULL DEFAULT 0;
    "#,
    // 13: the devices a VM's VMM runs with beyond the fixed set (a memory balloon), which
    // its snapshots record: rows from before had none.
    r#"
    ALTER TABLE vms ADD COLUMN machine TEXT NOT NULL DEFAULT '';
    ALTER TABLE snapshots ADD COLUMN machine TEXT NOT NULL DEFAULT '';
    "#,
    // 14: a snapshot's guest memory as a plain file of its own, which restores map
    // copy-on-write; snapshots from before keep it in their saved state.
    r#"
    ALTER TABLE snapshots ADD COLUMN ram_sha256 TEXT NOT NULL DEFAULT '';
    "#,
    // 15: a VM's labels (its owner's key/value pairs, JSON), which lists filter on.
    r#"
    ALTER TABLE vms ADD COLUMN labels TEXT NOT NULL DEFAULT '';
    "#,
    // 16: a VM's lifetime: when it ends (µs since the epoch, 0 for never) and what then
    // happens to it.
    r#"
    ALTER TABLE vms ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE vms ADD COLUMN on_expire TEXT NOT NULL DEFAULT '';
    "#,
    // 17: a VM whose root is a host folder (virtio-fs) instead of a disk on its image: such
    // a VM has no image, so `image_id` may be NULL (SQLite changes a column's constraints
    // only by rebuilding the table; the address leases, which the drop would take with it
    // by their cascade, are kept aside and put back).
    r#"
    CREATE TEMP TABLE leases_kept AS SELECT * FROM address_leases;
    CREATE TABLE vms_17 (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        state           TEXT NOT NULL,
        stage           TEXT NOT NULL,
        image_id        TEXT REFERENCES images(id),
        kernel          TEXT NOT NULL,
        vcpus           INTEGER NOT NULL,
        memory_mib      INTEGER NOT NULL,
        disk_size       INTEGER NOT NULL,
        owner_uid       INTEGER NOT NULL,
        guest_address   TEXT NOT NULL,
        mac_address     TEXT NOT NULL UNIQUE,
        vsock_cid       INTEGER NOT NULL UNIQUE,
        tap_name        TEXT NOT NULL UNIQUE,
        ssh_address     TEXT NOT NULL DEFAULT '',
        vmm_pid         INTEGER,
        vmm_start_time  INTEGER,
        created_at      INTEGER NOT NULL,
        ssh_host_key    TEXT NOT NULL DEFAULT '',
        network         TEXT NOT NULL DEFAULT 'isolated',
        egress          TEXT NOT NULL DEFAULT '',
        init            TEXT NOT NULL DEFAULT '',
        main            TEXT NOT NULL DEFAULT '',
        exit_status     INTEGER NOT NULL DEFAULT -1,
        publish         TEXT NOT NULL DEFAULT '',
        shares          TEXT NOT NULL DEFAULT '',
        snapshot        TEXT NOT NULL DEFAULT '',
        machine         TEXT NOT NULL DEFAULT '',
        labels          TEXT NOT NULL DEFAULT '',
        expires_at      INTEGER NOT NULL DEFAULT 0,
        on_expire       TEXT NOT NULL DEFAULT '',
        rootfs_dir      TEXT NOT NULL DEFAULT ''
    );
    INSERT INTO vms_17 (id, name, state, stage, image_id, kernel, vcpus, memory_mib, disk_size, owner_uid, guest_address, mac_address, vsock_cid, tap_name, ssh_address, vmm_pid, vmm_start_time, created_at, ssh_host_key, network, egress, init, main, exit_status, publish, shares, snapshot, machine, labels, expires_at, on_expire) SELECT id, name, state, stage, image_id, kernel, vcpus, memory_mib, disk_size, owner_uid, guest_address, mac_address, vsock_cid, tap_name, ssh_address, vmm_pid, vmm_start_time, created_at, ssh_host_key, network, egress, init, main, exit_status, publish, shares, snapshot, machine, labels, expires_at, on_expire FROM vms;
    DROP TABLE vms;
    ALTER TABLE vms_17 RENAME TO vms;
    INSERT INTO address_leases SELECT * FROM leases_kept;
    DROP TABLE leases_kept;
    "#,
    // 18: a VM whose network is a given namespace's (CreateVM netns: its tap there, wired to
    // that namespace's eth0), which takes no address lease.
    r#"
    ALTER TABLE vms ADD COLUMN netns TEXT NOT NULL DEFAULT '';
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`SCHEMA_VERSION`], one transaction per migration.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer_schemas() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::TooNew { .. })));
    }

    #[test]
    fn the_vms_table_rebuilt_for_folder_roots_keeps_every_row_and_lease() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for (i, sql) in MIGRATIONS.iter().enumerate().take(16) {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as i64)
                .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO images (id, name, managed, source, rootfs_path, size_bytes, created_at)
               VALUES ('i1', 'img', 1, 's', '/r', 1, 1);
             INSERT INTO vms (id, name, state, stage, image_id, kernel, vcpus, memory_mib,
               disk_size, owner_uid, guest_address, mac_address, vsock_cid, tap_name, created_at,
               labels, expires_at)
               VALUES ('v1', 'one', 'running', 'ready', 'i1', 'k', 1, 256, 1, 1000, '10.0.0.2',
               'm', 3, 't', 5, '{\"a\":\"b\"}', 77);
             INSERT INTO address_leases VALUES ('10.0.0.2', 'v1', 5);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let (image, labels, expires, root): (Option<String>, String, i64, String) = conn
            .query_row(
                "SELECT image_id, labels, expires_at, rootfs_dir FROM vms WHERE id = 'v1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (image.as_deref(), labels.as_str(), expires, root.as_str()),
            (Some("i1"), "{\"a\":\"b\"}", 77, "")
        );
        let lease: String = conn
            .query_row("SELECT vm_id FROM address_leases", [], |r| r.get(0))
            .unwrap();
        assert_eq!(lease, "v1", "the lease survived the rebuild");
        // A VM without an image now fits; one naming an unknown image still does not, and
        // deleting a VM still takes its lease.
        conn.execute_batch(
            "INSERT INTO vms (id, name, state, stage, image_id, kernel, vcpus, memory_mib,
               disk_size, owner_uid, guest_address, mac_address, vsock_cid, tap_name, created_at,
               rootfs_dir)
               VALUES ('v2', 'two', 'created', '', NULL, 'k', 1, 256, 0, 1000, '10.0.0.3', 'm2',
               4, 't2', 6, '/srv/root');",
        )
        .unwrap();
        assert!(conn
            .execute_batch(
                "INSERT INTO vms (id, name, state, stage, image_id, kernel, vcpus, memory_mib,
                   disk_size, owner_uid, guest_address, mac_address, vsock_cid, tap_name,
                   created_at) VALUES ('v3', 'three', 'created', '', 'nope', 'k', 1, 256, 0,
                   1000, '10.0.0.4', 'm3', 5, 't3', 7);"
            )
            .is_err());
        conn.execute_batch("DELETE FROM vms WHERE id = 'v1'")
            .unwrap();
        let leases: i64 = conn
            .query_row("SELECT COUNT(*) FROM address_leases", [], |r| r.get(0))
            .unwrap();
        assert_eq!(leases, 0);
    }
}
