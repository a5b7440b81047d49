//! `io.banger.Images`: the operations of `org.banger.Images1`.

use serde_json::{json, Value};

use super::{job_answer, job_only, no_method, Answer, Ctx, Fail, Params};
use crate::auth::Caller;
use crate::images::{BuildOptions, PullOptions, RegisterOptions};
use crate::model::Image;
use crate::ops;
use crate::ops::request::{read, NoOptions};

/// The interface's name.
pub const INTERFACE: &str = "io.banger.Images";

/// Its description.
pub const DESCRIPTION: &str = concat!(
    r#"# banger's root filesystem images: the operations of org.banger.Images1 on D-Bus.
# Reads are open to everyone; every other method asks polkit (org.banger.images.manage).
interface io.banger.Images

# An image.
type Image (
  id: string,
  name: string,
  # Pulled or built by banger (true), or registered from the caller's files (false).
  managed: bool,
  # Where it came from: an OCI reference, a catalog name, a build.
  source: string,
  # Its own kernel, if it has one.
  kernel: ?string,
  sizeBytes: int,
  createdAt: int,
  readyPorts: []int,
  env: []string,
  workingDir: string,
  user: string,
  entrypoint: []string,
  cmd: []string,
  # The uid that owns it; 0 for the system's (the catalog, the default image, root's).
  owner: int
)

"#,
    job_types!(),
    r#"
# Every image.
method List() -> (images: []Image)

# The image with this name or id.
method Get(name: string) -> (image: Image)

# Pulls an image from the catalog or an OCI registry and builds a bootable ext4 from it.
# auth is user:password for the registry. The reply comes at once with the job; with
# "more", one reply follows for each stage, progress step and log line until it ends.
method Pull(
  ref: string,
  name: ?string,
  kernel: ?string,
  size: ?int,
  insecure: ?bool,
  readyPorts: ?[]int,
  auth: ?string
) -> (job: Job, log: ?LogLine)

# Registers the caller's files as an unmanaged image: each file is an absolute path (opened
# once with the caller's rights) or the index of a descriptor passed with the call.
method Register(
  name: string,
  rootfs: ?string,
  workSeed: ?string,
  kernel: ?string,
  kernelPath: ?string,
  initrdPath: ?string,
  modulesDir: ?string,
  readyPorts: ?[]int
) -> (image: Image)

# Makes a registered image managed.
method Promote(name: string) -> (job: Job, log: ?LogLine)

# Builds an image with debootstrap.
method Build(
  name: string,
  suite: ?string,
  packages: ?[]string,
  size: ?int,
  kernel: ?string,
  readyPorts: ?[]int,
  # An account (uid 1000, its home, passwordless sudo with the sudo package) the image's
  # commands, terminals and files default to.
  user: ?string
) -> (job: Job, log: ?LogLine)

# Makes the warm snapshot of an image for a kernel and shape (instant starts).
method Warm(name: string, kernel: ?string, vcpus: ?int, memoryMib: ?int) -> (job: Job, log: ?LogLine)

# Deletes an image no VM uses.
method Delete(name: string) -> ()

# Empties the download cache (registry blobs kept for later pulls; no image needs them).
# Needs org.banger.vms.manage-any: the cache is the system's.
method PruneCache() -> (freedBytes: int, blobs: int)

"#,
    errors!()
);

/// An image as `io.banger.Images.Image`.
pub(super) fn view(i: &Image) -> Value {
    json!({
        "id": i.id,
        "name": i.name,
        "managed": i.managed,
        "source": i.source,
        "kernel": i.kernel,
        "sizeBytes": i.size_bytes,
        "createdAt": i.created_at,
        "readyPorts": i.ready_ports,
        "env": i.config.env,
        "workingDir": i.config.working_dir,
        "user": i.config.user,
        "entrypoint": i.config.entrypoint,
        "cmd": i.config.cmd,
        "owner": i.owner_uid,
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
            let images: Vec<Value> = b.images.list().await?.iter().map(view).collect();
            Ok(Answer::One(json!({ "images": images })))
        }
        "Get" => {
            let name: String = p.req("name")?;
            p.finish()?;
            Ok(Answer::One(
                json!({ "image": view(&b.images.get(&name).await?) }),
            ))
        }
        "Pull" => {
            let reference: String = p.req("ref")?;
            let opts: PullOptions = read(p)?;
            let op = ops::pull_image(b, caller, &reference, opts);
            job_answer(ctx, caller, op, job_only()).await
        }
        "Register" => {
            let name: String = p.req("name")?;
            let opts: RegisterOptions = read(p)?;
            let image = ctx
                .perform(caller, ops::register_image(b, caller, &name, opts))
                .await?;
            Ok(Answer::One(json!({ "image": view(&image) })))
        }
        "Promote" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let op = ops::promote_image(b, caller, &name);
            job_answer(ctx, caller, op, job_only()).await
        }
        "Build" => {
            let name: String = p.req("name")?;
            let opts: BuildOptions = read(p)?;
            let op = ops::build_image(b, caller, &name, opts);
            job_answer(ctx, caller, op, job_only()).await
        }
        "Warm" => {
            let name: String = p.req("name")?;
            let opts: ops::WarmOptions = read(p)?;
            let op = ops::warm_image(b, caller, &name, opts);
            job_answer(ctx, caller, op, job_only()).await
        }
        "Delete" => {
            let name: String = p.req("name")?;
            p.finish()?;
            ctx.perform(caller, ops::delete_image(b, caller, &name))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "PruneCache" => {
            let NoOptions = read(p)?;
            let (bytes, blobs) = ctx.perform(caller, ops::prune_cache(b, caller)).await?;
            Ok(Answer::One(json!({ "freedBytes": bytes, "blobs": blobs })))
        }
        m => Err(no_method(INTERFACE, m)),
    }
}
