//! Every mutating operation, with the recording authority: arguments are checked before the
//! authority is asked, the action named is the right one for one's own and another user's
//! objects, and nothing acts unless every action was allowed.

use std::path::PathBuf;

use super::*;
use crate::auth::{RecordingAuthority, Verdict};
use crate::jobs::JobSpec;
use crate::vms::concurrency_tests::banger;

const ME: u32 = 1000;
const OTHER: u32 = 2000;

fn caller(uid: u32) -> Caller {
    Caller::unchecked(uid)
}

fn authority(answer: Option<Verdict>) -> RecordingAuthority {
    let a = RecordingAuthority::default();
    *a.answer.lock().unwrap() = answer;
    a
}

/// A VM of `uid`'s, created and not started.
async fn vm_of(b: &Banger, uid: u32, name: &str) -> Vm {
    let o = CreateOptions {
        image: Some("img".into()),
        start: false,
        ..CreateOptions::default()
    };
    let (vm, job) = b.vms.create(uid, name, o).await.unwrap();
    job.wait().await.unwrap();
    vm
}

/// A snapshot row of `vm` (no files: enough to name actions and refuse).
async fn snapshot_of(b: &Banger, vm: &Vm, name: &str) {
    let s = crate::model::Snapshot {
        id: crate::model::new_id(),
        name: name.into(),
        vm_id: vm.id.clone(),
        vm_name: vm.name.clone(),
        image_id: vm.image_id.clone(),
        kernel: vm.kernel.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        owner_uid: vm.owner_uid,
        vmm: "gate".into(),
        ..Default::default()
    };
    b.store
        .call_blocking(move |c| crate::store::rows::insert_snapshot(c, &s).map(|_| ()))
        .unwrap();
}

/// An image and a kernel of `uid`'s, copies of the system's `img` and `k` rows.
async fn image_and_kernel_of(b: &Banger, uid: u32, name: &str) {
    let (n, k) = (name.to_owned(), format!("{name}-k"));
    b.store
        .call_blocking(move |c| {
            let img = crate::store::rows::find_image(c, "img")?.expect("img");
            let kernel = crate::store::rows::find_kernel(c, "k")?.expect("k");
            crate::store::rows::insert_image(
                c,
                &Image {
                    id: crate::model::new_id(),
                    name: n,
                    owner_uid: uid,
                    ..img
                },
            )?;
            crate::store::rows::insert_kernel(
                c,
                &Kernel {
                    name: k,
                    owner_uid: uid,
                    ..kernel
                },
            )
        })
        .unwrap();
}

fn job_of(b: &Banger, uid: u32, action: Action) -> u32 {
    let spec = JobSpec {
        kind: "test".into(),
        target: "t".into(),
        action,
        owner_uid: uid,
    };
    b.jobs
        .spawn(spec, |ctx| async move {
            while !ctx.is_canceled() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(Error::Canceled)
        })
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_names_the_action_for_own_and_foreign_objects() {
    let dir = tempfile::tempdir().unwrap();
    let b = banger(dir.path(), 1, "10.3.0.0/24");
    let mine = vm_of(&b, ME, "mine").await;
    let theirs = vm_of(&b, OTHER, "theirs").await;
    snapshot_of(&b, &mine, "my-snap").await;
    snapshot_of(&b, &theirs, "their-snap").await;
    image_and_kernel_of(&b, ME, "my-img").await;
    image_and_kernel_of(&b, OTHER, "their-img").await;
    let my_job = job_of(&b, ME, Action::VmsManage);
    let their_job = job_of(&b, OTHER, Action::VmsManage);
    let image_job = job_of(&b, OTHER, Action::ImagesManage);
    let me = caller(ME);
    use Action::*;

    let mut checked = 0;
    macro_rules! needs {
        ($op:expr, $want:expr) => {{
            let ready = $op
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", stringify!($op)));
            assert_eq!(ready.needs(), &$want[..], "{}", stringify!($op));
            checked += 1;
        }};
    }
    for (key, own) in [("mine", VmsManage), ("theirs", VmsManageAny)] {
        needs!(start_vm(&b, &me, key), [own]);
        needs!(stop_vm(&b, &me, key, StopOptions::default()), [own]);
        needs!(pause_vm(&b, &me, key), [own]);
        needs!(resume_vm(&b, &me, key), [own]);
        needs!(delete_vm(&b, &me, key, true), [own]);
        needs!(
            snapshot_vm(&b, &me, key, "s", SnapshotOptions::default()),
            [own]
        );
        needs!(open_agent(&b, &me, key), [own]);
        needs!(open_shell(&b, &me, key, Default::default()), [own]);
        needs!(open_console(&b, &me, key), [own]);
    }
    needs!(delete_snapshot(&b, &me, "my-snap"), [VmsManage]);
    needs!(delete_snapshot(&b, &me, "their-snap"), [VmsManageAny]);
    let restore = |s: &str| CreateOptions {
        snapshot: Some(s.into()),
        vcpus: 0,
        memory_mib: 0,
        ..CreateOptions::default()
    };
    needs!(
        create_vm(&b, &me, "new", CreateOptions::default()),
        [VmsManage]
    );
    needs!(create_vm(&b, &me, "new", restore("my-snap")), [VmsManage]);
    needs!(
        create_vm(&b, &me, "new", restore("their-snap")),
        [VmsManage, VmsManageAny]
    );
    needs!(cancel_job(&b, &me, my_job), [VmsManage]);
    needs!(cancel_job(&b, &me, their_job), [VmsManageAny]);
    needs!(cancel_job(&b, &me, image_job), [ImagesManage]);
    needs!(
        pull_image(&b, &me, "registry.example/a:b", PullOptions::default()),
        [ImagesManage]
    );
    needs!(
        build_image(&b, &me, "built", BuildOptions::default()),
        [ImagesManage]
    );
    // Images and kernels: one's own, the system's (`img`, `k`: used by all, changed only by
    // administrators) and another user's.
    for (image, change, using) in [
        ("my-img", vec![ImagesManage], vec![VmsManage]),
        ("img", vec![ImagesManage, VmsManageAny], vec![VmsManage]),
        (
            "their-img",
            vec![ImagesManage, VmsManageAny],
            vec![VmsManage, VmsManageAny],
        ),
    ] {
        needs!(promote_image(&b, &me, image), change);
        needs!(delete_image(&b, &me, image), change);
        let o = CreateOptions {
            image: Some(image.into()),
            ..CreateOptions::default()
        };
        needs!(create_vm(&b, &me, "new", o), using);
        needs!(warm_image(&b, &me, image, WarmOptions::default()), using);
    }
    for (kernel, change, using) in [
        ("my-img-k", vec![KernelsManage], vec![VmsManage]),
        ("k", vec![KernelsManage, VmsManageAny], vec![VmsManage]),
        (
            "their-img-k",
            vec![KernelsManage, VmsManageAny],
            vec![VmsManage, VmsManageAny],
        ),
    ] {
        needs!(delete_kernel(&b, &me, kernel), change);
        let o = CreateOptions {
            kernel: Some(kernel.into()),
            ..CreateOptions::default()
        };
        needs!(create_vm(&b, &me, "new", o), using);
    }
    needs!(
        register_image(
            &b,
            &me,
            "img",
            RegisterOptions {
                rootfs: Some(crate::callerfile::CallerInput::Path("/r.ext4".into())),
                ..RegisterOptions::default()
            }
        ),
        [ImagesManage, VmsManageAny]
    );
    let files = |kernel: bool| RegisterOptions {
        rootfs: Some(crate::callerfile::CallerInput::Path(PathBuf::from(
            "/r.ext4",
        ))),
        kernel_path: kernel.then(|| crate::callerfile::CallerInput::Path("/vmlinux".into())),
        ..RegisterOptions::default()
    };
    needs!(register_image(&b, &me, "reg", files(false)), [ImagesManage]);
    needs!(
        register_image(&b, &me, "reg", files(true)),
        [ImagesManage, KernelsManage]
    );
    needs!(pull_kernel(&b, &me, "debian"), [KernelsManage]);
    needs!(
        import_kernel(
            &b,
            &me,
            "mine",
            ImportOptions {
                kernel_path: Some(crate::callerfile::CallerInput::Path("/vmlinux".into())),
                ..Default::default()
            }
        ),
        [KernelsManage]
    );
    println!("operations: {checked} (operation, object) pairs name the expected actions");
    for j in [my_job, their_job, image_job] {
        b.jobs.cancel(j).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_before_the_authority_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let b = banger(dir.path(), 1, "10.4.0.0/24");
    vm_of(&b, ME, "mine").await;
    let me = caller(ME);
    let a = authority(Some(Verdict::Allowed));
    let mut refused = 0;
    macro_rules! refused {
        ($op:expr, $why:expr) => {{
            let e = match perform(&a, &me, $op).await {
                Err(e) => e,
                Ok(_) => panic!("{} was not refused", stringify!($op)),
            };
            assert!(e.to_string().contains($why), "{}: {e}", stringify!($op));
            assert!(
                a.asked.lock().unwrap().is_empty(),
                "{}: asked first",
                stringify!($op)
            );
            refused += 1;
        }};
    }
    refused!(
        create_vm(&b, &me, "no/slash", CreateOptions::default()),
        "name"
    );
    refused!(
        create_vm(
            &b,
            &me,
            "x",
            CreateOptions {
                snapshot: Some("none".into()),
                ..CreateOptions::default()
            }
        ),
        "none"
    );
    refused!(start_vm(&b, &me, "ghost"), "ghost");
    refused!(
        snapshot_vm(&b, &me, "mine", "../s", SnapshotOptions::default()),
        "name"
    );
    refused!(delete_snapshot(&b, &me, "ghost"), "ghost");
    refused!(cancel_job(&b, &me, 999_999), "999999");
    refused!(pull_kernel(&b, &me, "../etc"), "name");
    refused!(delete_kernel(&b, &me, "a b"), "name");
    refused!(
        pull_image(
            &b,
            &me,
            "img",
            PullOptions {
                kernel: Some("no-such-kernel".into()),
                ..PullOptions::default()
            }
        ),
        "no-such-kernel"
    );
    refused!(
        build_image(
            &b,
            &me,
            "b",
            BuildOptions {
                kernel: Some("no-such-kernel".into()),
                ..BuildOptions::default()
            }
        ),
        "no-such-kernel"
    );
    refused!(
        register_image(&b, &me, "r", RegisterOptions::default()),
        "rootfs"
    );
    refused!(
        warm_image(
            &b,
            &me,
            "img",
            WarmOptions {
                kernel: Some("../k".into()),
                ..WarmOptions::default()
            }
        ),
        "name"
    );
    println!("operations: {refused} bad calls refused before polkit was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acts_unless_every_action_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let b = banger(dir.path(), 1, "10.5.0.0/24");
    let theirs = vm_of(&b, OTHER, "theirs").await;
    let me = caller(ME);
    // Denied, and polkit gone: the VM stays, and only manage-any was asked.
    for answer in [
        Some(Verdict::Denied),
        Some(Verdict::ChallengeRequired),
        None,
    ] {
        let a = authority(answer);
        let e = perform(&a, &me, delete_vm(&b, &me, "theirs", true))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(*a.asked.lock().unwrap(), [(ME, Action::VmsManageAny)]);
        assert!(b.vms.get(&theirs.id).await.is_ok(), "{answer:?}: deleted");
    }
    // A create that needs two actions and gets only the first makes nothing.
    snapshot_of(&b, &theirs, "their-snap").await;
    struct FirstOnly(RecordingAuthority);
    #[async_trait::async_trait]
    impl Authority for FirstOnly {
        async fn check(&self, c: &Caller, a: Action) -> Result<Verdict, crate::auth::Unanswered> {
            self.0.check(c, a).await?;
            Ok(if a == Action::VmsManage {
                Verdict::Allowed
            } else {
                Verdict::Denied
            })
        }
    }
    let a = FirstOnly(authority(Some(Verdict::Allowed)));
    let o = CreateOptions {
        snapshot: Some("their-snap".into()),
        vcpus: 0,
        memory_mib: 0,
        ..CreateOptions::default()
    };
    let e = perform(&a, &me, create_vm(&b, &me, "stolen", o))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("manage-any"), "{e}");
    assert_eq!(
        *a.0.asked.lock().unwrap(),
        [(ME, Action::VmsManage), (ME, Action::VmsManageAny)]
    );
    assert!(b.vms.get("stolen").await.is_err(), "a VM was made");
    // Allowed, it acts.
    let a = authority(Some(Verdict::Allowed));
    perform(&a, &me, delete_vm(&b, &me, "theirs", true))
        .await
        .unwrap();
    assert!(b.vms.get(&theirs.id).await.is_err(), "not deleted");
}
