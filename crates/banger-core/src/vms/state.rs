//! What may be done to a VM in each state. Every operation re-reads the VM's row under its
//! lock and asks here; a refusal says what the VM is and what to do next.
//!
//! | operation      | created | starting | running | paused | stopping | stopped | failed |
//! |----------------|---------|----------|---------|--------|----------|---------|--------|
//! | start          | yes     | its job  | –       | –      | –        | yes     | yes    |
//! | stop           | yes     | cancels  | yes     | yes    | yes      | yes     | yes    |
//! | pause          | –       | –        | yes     | –      | –        | –       | –      |
//! | resume         | –       | –        | –       | yes    | –        | –       | –      |
//! | snapshot       | –       | –        | yes     | yes    | –        | –       | –      |
//! | delete         | yes     | –        | –       | –      | –        | yes     | yes    |
//! | delete --force | yes     | cancels  | yes     | yes    | yes      | yes     | yes    |
//!
//! "its job": a second start of a starting VM returns the start already running; "cancels":
//! the start is canceled (its cleanup runs under the VM's lock) before the operation goes on.

use super::VmError;
use crate::model::{Vm, VmState};
use crate::Result;

/// An operation on a VM, as the table above names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOp {
    /// StartVM (and a create's start).
    Start,
    /// StopVM.
    Stop,
    /// VM1.Pause.
    Pause,
    /// VM1.Resume.
    Resume,
    /// SnapshotVM.
    Snapshot,
    /// DeleteVM without force.
    Delete,
    /// DeleteVM with force.
    ForceDelete,
}

/// Whether `op` may be done to `vm` as it is now; the refusal names its state and what to do.
pub fn check(vm: &Vm, op: VmOp) -> Result<()> {
    use VmState::*;
    let ok = match op {
        VmOp::Start => matches!(vm.state, Created | Stopped | Failed),
        VmOp::Stop | VmOp::ForceDelete => true,
        VmOp::Pause => vm.state == Running,
        VmOp::Resume => vm.state == Paused,
        VmOp::Snapshot => matches!(vm.state, Running | Paused),
        VmOp::Delete => !vm.state.is_active(),
    };
    if ok {
        return Ok(());
    }
    Err(VmError::NotAllowed {
        name: vm.name.clone(),
        state: vm.state,
        op,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_for_every_state_and_operation() {
        use VmOp::*;
        use VmState::*;
        let states = [
            Created, Starting, Running, Paused, Stopping, Stopped, Failed,
        ];
        // Rows as in the module's table; Starting's start and stop are handled before the
        // check (its job is returned, or canceled), so the table says no for them here.
        let table: [(VmOp, [bool; 7]); 7] = [
            (Start, [true, false, false, false, false, true, true]),
            (Stop, [true; 7]),
            (Pause, [false, false, true, false, false, false, false]),
            (Resume, [false, false, false, true, false, false, false]),
            (Snapshot, [false, false, true, true, false, false, false]),
            (Delete, [true, false, false, false, false, true, true]),
            (ForceDelete, [true; 7]),
        ];
        let mut cases = 0;
        for (op, row) in table {
            for (state, want) in states.into_iter().zip(row) {
                let vm = Vm {
                    name: "v".into(),
                    state,
                    ..Default::default()
                };
                let got = check(&vm, op);
                assert_eq!(got.is_ok(), want, "{op:?} on a {state} VM: {got:?}");
                if let Err(e) = got {
                    let m = e.to_string();
                    assert!(m.contains("VM v is"), "{m}");
                    let kind = match op {
                        Delete => crate::error::ErrorKind::InUse,
                        _ => crate::error::ErrorKind::InvalidArgument,
                    };
                    assert_eq!(e.kind(), kind, "{m}");
                }
                cases += 1;
            }
        }
        assert_eq!(cases, 49);
    }
}
