//! `io.banger.Kernels`: the operations of `org.banger.Kernels1`.

use serde_json::{json, Value};

use super::{job_answer, job_only, no_method, Answer, Ctx, Fail, Params};
use crate::auth::Caller;
use crate::kernels::ImportOptions;
use crate::model::Kernel;
use crate::ops;
use crate::ops::request::{read, NoOptions};

/// The interface's name.
pub const INTERFACE: &str = "io.banger.Kernels";

/// Its description.
pub const DESCRIPTION: &str = concat!(
    r#"# banger's guest kernels: the operations of org.banger.Kernels1 on D-Bus. Reads are
# open to everyone; every other method asks polkit (org.banger.kernels.manage).
interface io.banger.Kernels

# An installed kernel.
type Kernel (
  name: string,
  version: string,
  source: string,
  createdAt: int,
  # The uid that owns it; 0 for the system's (the catalog's, root's).
  owner: int
)

# A kernel of the catalog.
type AvailableKernel (
  name: string,
  version: string,
  description: string
)

"#,
    job_types!(),
    r#"
# The installed kernels.
method List() -> (kernels: []Kernel)

# The kernel catalog.
method ListAvailable() -> (kernels: []AvailableKernel)

# The installed kernel with this name.
method Get(name: string) -> (kernel: Kernel)

# Pulls a kernel of the catalog. The reply comes at once with the job; with "more", one
# reply follows for each stage, progress step and log line until it ends.
method Pull(name: string) -> (job: Job, log: ?LogLine)

# Imports kernel files under a name (banger builds the initrd when none is given): each
# file is an absolute path (opened once with the caller's rights) or the index of a
# descriptor passed with the call.
method Import(name: string, kernelPath: string, initrdPath: ?string, modulesDir: ?string) -> (kernel: Kernel)

# Deletes a kernel no image or VM uses.
method Delete(name: string) -> ()

"#,
    errors!()
);

fn view(k: &Kernel) -> Value {
    json!({
        "name": k.name,
        "version": k.version,
        "source": k.source,
        "createdAt": k.created_at,
        "owner": k.owner_uid,
    })
}

pub(super) async fn call(
    ctx: &Ctx,
    caller: &Caller,
    method: &str,
    mut p: Params,
) -> Result<Answer, Fail> {
    let b = &ctx.banger;
    match method {
        "List" => {
            p.finish()?;
            let kernels: Vec<Value> = b.kernels.list().await?.iter().map(view).collect();
            Ok(Answer::One(json!({ "kernels": kernels })))
        }
        "ListAvailable" => {
            p.finish()?;
            let kernels: Vec<Value> = b
                .kernels
                .available()
                .into_iter()
                .map(|k| json!({ "name": k.name, "version": k.version, "description": k.description }))
                .collect();
            Ok(Answer::One(json!({ "kernels": kernels })))
        }
        "Get" => {
            let name: String = p.req("name")?;
            p.finish()?;
            Ok(Answer::One(
                json!({ "kernel": view(&b.kernels.get(&name).await?) }),
            ))
        }
        "Pull" => {
            let name: String = p.req("name")?;
            let NoOptions = read(p)?;
            let op = ops::pull_kernel(b, caller, &name);
            job_answer(ctx, caller, op, job_only()).await
        }
        "Import" => {
            let name: String = p.req("name")?;
            let opts: ImportOptions = read(p)?;
            let kernel = ctx
                .perform(caller, ops::import_kernel(b, caller, &name, opts))
                .await?;
            Ok(Answer::One(json!({ "kernel": view(&kernel) })))
        }
        "Delete" => {
            let name: String = p.req("name")?;
            p.finish()?;
            ctx.perform(caller, ops::delete_kernel(b, caller, &name))
                .await?;
            Ok(Answer::One(json!({})))
        }
        m => Err(no_method(INTERFACE, m)),
    }
}
