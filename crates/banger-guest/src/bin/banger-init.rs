//! `banger-init`: PID 1 of banger's initrd (see `banger_guest::guestinit`). Built statically.

fn main() {
    banger_guest::guestinit::run()
}
