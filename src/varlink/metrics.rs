//! `io.systemd.Metrics`, the interface `systemd-report metrics` (systemd ≥ 260) reads from
//! every socket in `/run/systemd/report/`: banger's socket there (`bangerd-metrics.socket`,
//! which starts the daemon as its Varlink socket does) answers with what the VMs cost the host
//! now, per VM and in total. Open to every local user, as systemd's own sources are: the VM
//! names are in `banger vm list` for everyone already.

use serde_json::{json, Value};

use super::{Answer, Ctx, Fail, Failure, Params};

/// The interface's name.
pub const INTERFACE: &str = "io.systemd.Metrics";

/// Its description, as systemd defines it (`src/shared/varlink-io.systemd.Metrics.c`).
pub const DESCRIPTION: &str = r#"interface io.systemd.Metrics

type MetricFamilyType (counter, gauge, string)

# A list of metrics among which the collection of related metrics forms a metric family
method List() -> (
  # Metric name
  name: string,
  # Metric value
  value: object,
  # The object the metric is about (here: a VM's name)
  object: ?string,
  # Values that tell metrics of one family apart
  fields: ?[string]object
)

# The metric families
method Describe() -> (
  name: string,
  description: string,
  type: MetricFamilyType
)

error NoSuchMetric ()
"#;

/// The families, in the order `List` sends them: name, type, description.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "io.banger.vm_host_memory_bytes",
        "gauge",
        "Per VM: what it costs the host in memory, the proportional set size of its VMM and \
         helper processes (pages shared with other VMs divided among them)",
    ),
    (
        "io.banger.vm_cpu_usage_nsec",
        "counter",
        "Per VM: CPU time its VMM and helper processes have used since they started",
    ),
    (
        "io.banger.host_memory_bytes",
        "gauge",
        "What every VM costs the host in memory together",
    ),
    (
        "io.banger.cpu_usage_nsec",
        "gauge",
        "CPU time the processes of the VMs that run now have used",
    ),
    (
        "io.banger.vms_active",
        "gauge",
        "VMs that start, run, are paused or stop now",
    ),
];

pub(super) async fn call(ctx: &Ctx, method: &str, p: Params) -> Result<Answer, Fail> {
    p.finish()?;
    match method {
        "Describe" => Ok(Answer::Many(
            FAMILIES
                .iter()
                .map(
                    |(name, kind, what)| json!({ "name": name, "description": what, "type": kind }),
                )
                .collect(),
        )),
        "List" => Ok(Answer::Many(list(ctx).await?)),
        _ => Err(super::no_method(INTERFACE, method)),
    }
}

async fn list(ctx: &Ctx) -> crate::Result<Vec<Value>> {
    let vms = ctx.banger.vms.list().await?;
    let active: Vec<_> = vms.iter().filter(|v| v.state.is_active()).collect();
    let figures: Vec<(u64, u64)> = active
        .iter()
        .map(|v| {
            (
                ctx.banger.vms.host_memory_bytes(v),
                ctx.banger.vms.cpu_nsec(v),
            )
        })
        .collect();
    let mut out = Vec::new();
    let metric = |name: &str, object: Option<&str>, id: Option<&str>, value: u64| {
        let mut m = json!({ "name": name, "value": value });
        if let Some(o) = object {
            m["object"] = json!(o);
        }
        if let Some(id) = id {
            m["fields"] = json!({ "id": id });
        }
        m
    };
    for (v, (memory, _)) in active.iter().zip(&figures) {
        out.push(metric(FAMILIES[0].0, Some(&v.name), Some(&v.id), *memory));
    }
    for (v, (_, cpu)) in active.iter().zip(&figures) {
        out.push(metric(FAMILIES[1].0, Some(&v.name), Some(&v.id), *cpu));
    }
    let total = |f: fn(&(u64, u64)) -> u64| figures.iter().map(f).sum::<u64>();
    out.push(metric(FAMILIES[2].0, None, None, total(|f| f.0)));
    out.push(metric(FAMILIES[3].0, None, None, total(|f| f.1)));
    out.push(metric(FAMILIES[4].0, None, None, active.len() as u64));
    Ok(out)
}

/// What a `List` or `Describe` with nothing to send answers.
pub(super) fn none() -> Failure {
    Failure {
        error: format!("{INTERFACE}.NoSuchMetric"),
        parameters: json!({}),
    }
}
