//! `banger-init`: PID 1 of banger's initrd (see `banger::guestinit`). Built statically.

fn main() {
    banger::guestinit::run()
}
