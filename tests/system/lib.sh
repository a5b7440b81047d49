# Shared by the system test's scripts (sourced after setting SAY, the prefix of their verdict
# lines): /banger-test is what the test hands in; `systemctl exit N` makes N the container's
# exit status.
t=/banger-test
say() { echo "$SAY: $*"; }
finish() {
    say "exit $1"
    systemctl exit "$1"
    exit "$1"
}
fail() {
    say "FAIL: $*"
    journalctl -u bangerd -u systemd-machined --no-pager -o short-monotonic | tail -40
    journalctl -u 'banger-vm-*' --no-pager -o short-monotonic | tail -30
    for f in /run/banger/vms/*/*.log /var/lib/banger/vms/*/console.log; do
        [ -f "$f" ] && { echo "== $f"; tail -20 "$f"; }
    done
    finish 1
}
as() { local u=$1; shift; runuser -u "$u" -- "$@"; }
active() { systemctl show "$1" -p ActiveState --value; }
# idle [WHO]: waits up to 60 s for bangerd's idle exit, else fails naming WHO.
idle() {
    for _ in $(seq 60); do [ "$(active bangerd)" = inactive ] && return; sleep 1; done
    fail "${1:-bangerd} did not exit when idle"
}
