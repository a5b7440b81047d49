#!/bin/bash
# The system test's half inside the container: a Debian bookworm booted by systemd-nspawn
# with its own network namespace. Runs as banger-systemtest.service; `systemctl exit N` makes
# N the container's (and so the test's) exit status. /banger-test holds the .deb, a kernel
# and a busybox root filesystem, read-only.
set -u
SAY=systemtest
. "$(dirname "$0")/lib.sh"

say "installing the package"
dpkg -i "$t/banger.deb" >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; fail "dpkg -i banger.deb"; }
getent group banger >/dev/null || fail "the package did not create group banger"
[ -x /usr/bin/containerd-shim-banger-v2 ] || fail "the package has no containerd shim"
[ -x /usr/lib/banger/banger-vm-helper ] || fail "the package has no banger-vm-helper"
systemd-analyze verify --man=no /usr/lib/systemd/system/bangerd.service || fail "systemd-analyze verify"
mkdir -p /etc/banger
printf 'idle_exit_sec = 5\naccel = "tcg"\nboot_timeout_sec = 300\n' >/etc/banger/config.toml
useradd -m -G banger alice
useradd -m mallory

say "socket activation: the first Varlink call starts bangerd"
[ "$(systemctl is-enabled bangerd.socket)" = enabled ] || fail "bangerd.socket is not enabled"
[ "$(active bangerd.socket)" = active ] || fail "bangerd.socket is $(active bangerd.socket)"
systemd-analyze verify --man=no /usr/lib/systemd/system/bangerd.socket || fail "systemd-analyze verify bangerd.socket"
[ "$(stat -c %a /run/banger/io.banger)" = 666 ] || fail "io.banger has mode $(stat -c %a /run/banger/io.banger)"
[ "$(active bangerd)" = inactive ] || fail "bangerd runs before any call"
out=$(printf '{"method":"io.banger.VMs.List"}\0' | as mallory socat -t 60 - UNIX-CONNECT:/run/banger/io.banger | tr -d '\0')
[ "$out" = '{"parameters":{"vms":[]}}' ] || fail "Varlink List as mallory: $out"
[ "$(active bangerd)" = active ] || fail "bangerd is $(active bangerd) after a Varlink call"
busctl status org.banger >/dev/null 2>&1 || fail "the socket-activated bangerd does not own org.banger"
out=$(printf '{"method":"io.banger.Kernels.Delete","parameters":{"name":"k"}}\0' | as mallory socat -t 60 - UNIX-CONNECT:/run/banger/io.banger | tr -d '\0')
echo "$out" | grep -q '"error":"io.banger.Kernels.PermissionDenied"' || fail "mallory's Varlink delete: $out"
idle "the socket-activated bangerd"
[ "$(systemctl show bangerd -p Result --value)" = success ] || fail "its idle exit was not clean"
[ "$(active bangerd.socket)" = active ] || fail "bangerd.socket is $(active bangerd.socket) after the idle exit"

say "bus activation"
[ "$(active bangerd)" = inactive ] || fail "bangerd runs before any call"
busctl call org.banger /org/banger org.banger.VMs1 ListVMs || fail "ListVMs did not activate bangerd"
[ "$(active bangerd)" = active ] || fail "bangerd is $(active bangerd) after the call"
[ "$(systemctl show bangerd -p Type --value)" = notify ] || fail "bangerd is not Type=notify"
journalctl -u bangerd -o cat | grep -q "bangerd ready" || fail "no 'bangerd ready' in the journal"

say "polkit: an unauthorised and an authorised uid"
out=$(as mallory banger kernel import k --kernel "$t/vmlinuz" --modules "$t/modules" 2>&1) && fail "mallory imported a kernel"
echo "$out" | grep -q "Permission denied" || fail "mallory's refusal: $out"
as alice banger kernel import k --kernel "$t/vmlinuz" --modules "$t/modules" || fail "alice cannot import a kernel"
as alice busctl call org.banger /org/banger org.banger.Images1 RegisterImage 'sa{sv}' tiny 1 rootfs s "$t/tiny.ext4" \
    || fail "alice cannot register an image"

say "an image pull, in a confined worker under the daemon's unit"
"$t/busybox" httpd -p 127.0.0.1:5000 -h "$t/registry" -c "$t/registry/httpd.conf" || fail "busybox httpd"
as alice banger image pull 127.0.0.1:5000/test/tiny:v1.json --name pulled >/tmp/pull.log 2>&1 \
    || { cat /tmp/pull.log; journalctl -u bangerd -o cat | tail -40; fail "image pull"; }
as alice banger image list | grep -qw pulled || { as alice banger image list; fail "the pulled image is not listed"; }
rootfs=$(busctl get-property org.banger "$(busctl call org.banger /org/banger org.banger.Images1 GetImage s pulled | sed 's/^o //; s/"//g')" org.banger.Image1 RootfsPath | sed 's/^s //; s/"//g')
[ -f "$rootfs" ] || fail "no root filesystem for the pulled image ($rootfs)"
debugfs -R 'stat /bin/busybox' "$rootfs" 2>/dev/null | grep -q 'Type: regular' || fail "the pulled image lacks /bin/busybox"
owner=$(stat -c %u "$rootfs")
[ "$owner" = 0 ] || fail "the pulled image's root filesystem belongs to uid $owner, not root"
journalctl -u bangerd -o cat | grep -q "entries, .* bytes of files" || fail "the worker's report is not in the journal"

say "a VM, in a unit of its own, registered with machined"
as alice mkdir -p /home/alice/src
as alice sh -c 'echo from-alice > /home/alice/src/hello'
as alice banger vm create t1 --image tiny --kernel k --vcpus 1 --memory 256 --share /home/alice/src:/src \
    || fail "vm create"
journalctl -u bangerd -o json VM_NAME=t1 STAGE=ready | grep -q '"VM_ID"' || fail "no journal entry with VM_NAME=t1 STAGE=ready"
# Units and machine names come from the VM's id, never from the name a user typed.
id=$(busctl call org.banger /org/banger org.banger.VMs1 GetVM s t1 | sed 's|.*/vm/||; s|"||g')
unit=banger-vm-$id.service machine=banger-$id
[ "$(active "$unit")" = active ] || fail "$unit is $(active "$unit")"
machinectl list --no-legend | grep -q "^$machine *vm" || { machinectl list; fail "machined does not list $machine"; }
leader=$(machinectl show "$machine" -p Leader --value)
grep -q "$unit" "/proc/$leader/cgroup" || fail "the machine leader $leader is not in the VM unit"
# Its mount namespace: its own disks, nothing else of banger's.
nsenter -t "$leader" -m test -e "/var/lib/banger/vms/$id/work.ext4" || fail "QEMU does not see its own disk"
nsenter -t "$leader" -m test -e /var/lib/banger/banger.db && fail "QEMU sees banger's database"
# Nor the host's own places (homes, temporary files, the bus), and no socket but Unix ones.
touch /tmp/host-private
nsenter -t "$leader" -m test -e /tmp/host-private && fail "QEMU sees the host's /tmp"
nsenter -t "$leader" -m test -e /home/alice/src/hello && fail "QEMU sees alice's home"
nsenter -t "$leader" -m test -e /run/dbus/system_bus_socket && fail "QEMU sees the system bus"
nsenter -t "$leader" -m test -e "/run/banger/vms/$id/qemu.pid" || fail "QEMU does not see its own run directory"
families=$(systemctl show "$unit" -p RestrictAddressFamilies --value)
[ "$families" = AF_UNIX ] || fail "the VM unit's address families are '$families'"
[ "$(stat -c %u "/proc/$leader")" != 0 ] || fail "QEMU runs as root"
# The shared folder's server: a unit of its own, running as alice, never root.
share_unit=banger-vm-$id-share0.service
[ "$(active "$share_unit")" = active ] || fail "$share_unit is $(active "$share_unit")"
share_pid=$(systemctl show "$share_unit" -p MainPID --value)
[ "$(stat -c %U "/proc/$share_pid")" = alice ] || fail "the share's server runs as $(stat -c %U "/proc/$share_pid")"
# Its helpers (console logger, agent link, control relay) are the package's small helper
# program, never a copy of the daemon's binary.
for h in console link control; do
    pid=$(systemctl show "banger-vm-$id-$h.service" -p MainPID --value)
    exe=$(readlink "/proc/$pid/exe")
    [ "$exe" = /usr/lib/banger/banger-vm-helper ] || fail "banger-vm-$id-$h.service runs '$exe'"
done

say "idle exit leaves the VM running"
idle
[ "$(systemctl show bangerd -p Result --value)" = success ] || fail "bangerd's idle exit was not clean"
[ "$(active "$unit")" = active ] || fail "the VM died with the daemon"

say "its control socket outlives the daemon and starts it again (io.systemd.MachineInstance)"
control=/run/banger/machines/$machine control_unit=banger-vm-$id-control.service
[ "$(active "$control_unit")" = active ] || fail "$control_unit is $(active "$control_unit")"
control_pid=$(systemctl show "$control_unit" -p MainPID --value)
[ "$(stat -c %u "/proc/$control_pid")" = $((0x5BA00001)) ] || fail "the control relay runs as $(stat -c %u "/proc/$control_pid")"
[ "$(stat -c %a "$control")" = 666 ] || fail "$control has mode $(stat -c %a "$control")"
instance() { printf '{"method":"io.systemd.MachineInstance.%s"}\0' "$2" | as "$1" socat -t 60 - "UNIX-CONNECT:$control" | tr -d '\0'; }
out=$(instance mallory Describe)
[ "$out" = '{"parameters":{"running":true,"status":"running"}}' ] || fail "Describe as mallory: $out"
out=$(instance mallory Pause)
[ "$out" = '{"error":"org.varlink.service.PermissionDenied","parameters":{}}' ] || fail "Pause as mallory: $out"
out=$(instance alice Pause)
[ "$out" = '{}' ] || fail "Pause as alice: $out"
out=$(instance alice Describe)
[ "$out" = '{"parameters":{"running":false,"status":"paused"}}' ] || fail "Describe after Pause: $out"
out=$(instance alice Resume)
[ "$out" = '{}' ] || fail "Resume as alice: $out"

say "the next call re-adopts it"
comm=$(as alice banger vm exec t1 -- cat /proc/1/comm) || fail "vm exec after the idle exit"
[ "$comm" = init ] || fail "vm exec gave '$comm'"
hello=$(as alice banger vm exec t1 -- cat /src/hello) || fail "the shared folder in the guest"
[ "$hello" = from-alice ] || fail "the shared folder gave '$hello'"
say "a warm start maps the template's memory, handed to its unit by bangerd take-ram"
out=$(banger image warm tiny --kernel k --vcpus 1 --memory 256 2>&1) || {
    journalctl -u bangerd -o cat | tail -30
    fail "image warm: $out"
}
as alice banger vm create w1 --image tiny --kernel k --vcpus 1 --memory 256 || fail "a warm vm create"
as alice banger vm exec w1 -- true || fail "vm exec in the warm VM"
wid=$(busctl call org.banger /org/banger org.banger.VMs1 GetVM s w1 | sed 's|.*/vm/||; s|"||g')
wleader=$(systemctl show "banger-vm-$wid.service" -p MainPID --value)
grep -q 'memfd:banger-snapshot-ram' "/proc/$wleader/maps" || fail "the warm VM's QEMU maps no snapshot RAM"
[ -e "/run/banger/vms/$wid/ram.sock" ] && fail "the RAM socket outlived the start"
as alice banger vm delete --force w1 || fail "vm delete w1"
say "a VM on a given network namespace (a pod's): its unit joins it, its tap is made there"
ip netns add pod || fail "ip netns add"
ip link add bpod0 type veth peer name eth0 netns pod || fail "the veth pair"
ip addr add 10.79.0.1/24 dev bpod0 && ip link set bpod0 up || fail "the veth's near end"
ip -n pod addr add 10.79.0.2/24 dev eth0 && ip -n pod link set eth0 up \
    && ip -n pod route add default via 10.79.0.1 || fail "the namespace's eth0"
mkdir -p /tmp/podweb && echo from-the-node >/tmp/podweb/hello
"$t/busybox" httpd -p 10.79.0.1:8080 -h /tmp/podweb || fail "busybox httpd on the veth"
banger vm create n1 --image tiny --kernel k --vcpus 1 --memory 256 --netns /run/netns/pod || {
    journalctl -u bangerd -o cat | tail -30
    fail "vm create --netns"
}
nid=$(busctl call org.banger /org/banger org.banger.VMs1 GetVM s n1 | sed 's|.*/vm/||; s|"||g')
nsp=$(systemctl show "banger-vm-$nid.service" -p NetworkNamespacePath --value)
[ "$nsp" = /run/netns/pod ] || fail "the VM's unit joins '$nsp', not /run/netns/pod"
addr=$(banger vm exec n1 -- /bin/busybox ip -o -4 addr show eth0) || fail "vm exec in n1"
echo "$addr" | grep -q "inet 10.79.0.2/24" || fail "the guest's eth0 is not the namespace's: $addr"
got=$(banger vm exec n1 -- /bin/busybox wget -q -O - http://10.79.0.1:8080/hello) || {
    ip -n pod -s link; tc -n pod filter show dev eth0 ingress; tc -n pod filter show dev "bgr${nid:0:12}" ingress
    banger vm exec n1 -- /bin/busybox ip route; banger vm exec n1 -- /bin/busybox ping -c 1 -W 2 10.79.0.1
    ip -s link show bpod0; ss -ltn
    fail "the guest does not reach the veth's far end"
}
[ "$got" = from-the-node ] || fail "the guest read '$got'"
tap=bgr${nid:0:12}
ip -n pod -o link | grep -q "$tap" || fail "no tap $tap in the namespace: $(ip -n pod -o link)"
ip -o link | grep -q "$tap" && fail "the VM's tap $tap is in the host's namespace"
banger vm delete --force n1 || fail "vm delete n1"
links=$(ip -n pod -o link | wc -l)
[ "$links" = 2 ] || fail "the namespace holds more than lo and eth0 after the delete: $(ip -n pod -o link)"
ip netns del pod

as mallory banger vm stop t1 2>/dev/null && fail "mallory stopped alice's VM"
as alice banger vm stop t1 || fail "vm stop"
for _ in $(seq 20); do machinectl list --no-legend | grep -q "$machine" || break; sleep 0.5; done
machinectl list --no-legend | grep -q "$machine" && fail "$machine is still registered after stop"
[ "$(active "$unit")" != active ] || fail "the VM unit outlived the VM"
[ "$(active "$control_unit")" != active ] || fail "the control relay outlived the VM"
[ -e "$control" ] && fail "$control outlived the VM"
as alice banger vm delete t1 || fail "vm delete"
ip -o link | grep -q banger0 && fail "banger0 outlived the last VM"

say "E2B's API as alice's user service: socket-activated, her key, her VMs only"
[ -f /usr/lib/systemd/user/banger-e2b.socket ] || fail "no banger-e2b.socket user unit"
systemd-analyze verify --man=no /usr/lib/systemd/user/banger-e2b.service /usr/lib/systemd/user/banger-e2b.socket \
    || fail "systemd-analyze verify banger-e2b"
loginctl enable-linger alice || fail "loginctl enable-linger alice"
uid=$(id -u alice)
for _ in $(seq 60); do [ "$(active "user@$uid.service")" = active ] && break; sleep 0.5; done
[ "$(active "user@$uid.service")" = active ] || fail "alice's user manager did not start"
# Her own systemctl, as she would run it (no user bus here: it reaches her manager directly).
usrctl() { runuser -u alice -- env XDG_RUNTIME_DIR="/run/user/$uid" systemctl --user "$@"; }
usrctl enable --now banger-e2b.socket || fail "systemctl --user enable --now banger-e2b.socket"
[ "$(usrctl show banger-e2b.service -p ActiveState --value)" = inactive ] \
    || fail "banger-e2b.service runs before any request"
key=$(as alice banger e2b env | sed -n 's/^export E2B_API_KEY=//p')
[ -n "$key" ] || fail "banger e2b env printed no key"
[ "$(stat -c %a ~alice/.config/banger/e2b-api-key)" = 600 ] || fail "the key file is not 0600"
http() { printf '%s' "$1" | socat -t 30 - TCP:127.0.0.1:3000; }
out=$(http $'GET /v2/sandboxes HTTP/1.0\r\nX-API-Key: '"$key"$'\r\n\r\n')
echo "$out" | head -1 | grep -q ' 200 ' || {
    usrctl status --no-pager banger-e2b.service banger-e2b.socket
    journalctl --no-pager _UID="$uid" | tail -20
    fail "GET /v2/sandboxes with alice's key: $out"
}
[ "$(echo "$out" | tail -1)" = "[]" ] || fail "alice has no sandboxes yet: $out"
[ "$(usrctl show banger-e2b.service -p ActiveState --value)" = active ] \
    || fail "the request did not start banger-e2b.service"
ps -o user= -p "$(usrctl show banger-e2b.service -p MainPID --value)" | grep -q alice \
    || fail "banger-e2b.service does not run as alice"
out=$(http $'GET /v2/sandboxes HTTP/1.0\r\n\r\n')
echo "$out" | head -1 | grep -q ' 401 ' || fail "a request without the key: $out"
usrctl disable --now banger-e2b.socket banger-e2b.service

say "removal: purge leaves nothing outside /var/lib/banger"
systemctl stop bangerd 2>/dev/null
dpkg --purge banger >/tmp/purge.log 2>&1 || { cat /tmp/purge.log; fail "dpkg --purge"; }
for f in /usr/bin/bangerd /usr/bin/containerd-shim-banger-v2 /usr/lib/banger/banger-vm-helper /usr/share/dbus-1/system-services/org.banger.service /etc/banger /run/banger; do
    [ -e "$f" ] && fail "$f is left after purge"
done
getent group banger >/dev/null && fail "group banger is left after purge"
[ -d /var/lib/banger ] || fail "purge removed the state without being asked"
finish 0
