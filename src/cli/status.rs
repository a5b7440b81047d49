//! `banger status`.

use serde_json::json;

use super::{explain, Output};
use crate::dbus::proxy::{Images1Proxy, Jobs1Proxy, Kernels1Proxy, VMs1Proxy};

/// Prints the daemon's version and counts.
pub async fn run(out: &Output, conn: &zbus::Connection) -> anyhow::Result<()> {
    let jobs = Jobs1Proxy::new(conn).await?;
    let version = jobs.version().await.map_err(explain)?;
    let images = Images1Proxy::new(conn)
        .await?
        .list_images()
        .await
        .map_err(explain)?;
    let kernels = Kernels1Proxy::new(conn)
        .await?
        .list_kernels()
        .await
        .map_err(explain)?;
    let vms = VMs1Proxy::new(conn)
        .await?
        .list_vms()
        .await
        .map_err(explain)?;
    let running = vms.iter().filter(|v| v.2 == "running").count();
    let jobs = jobs.list_jobs().await.map_err(explain)?;
    let counts = [images.len(), kernels.len(), vms.len(), running, jobs.len()];
    print(out, &version, counts);
    Ok(())
}

/// Prints the status: the daemon's version and its counts of images, kernels, VMs, running
/// VMs and jobs (whichever way they were asked).
pub(super) fn print(out: &Output, version: &str, counts: [usize; 5]) {
    let [images, kernels, vms, running, jobs] = counts;
    out.object(vec![
        ("daemon_version", json!(version)),
        ("cli_version", json!(crate::VERSION)),
        ("images", json!(images)),
        ("kernels", json!(kernels)),
        ("vms", json!(vms)),
        ("running_vms", json!(running)),
        ("jobs", json!(jobs)),
    ]);
}
