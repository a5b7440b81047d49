#!/bin/bash
# The system test's second container: Debian sid booted by systemd-nspawn, whose systemd
# (≥ 260) registers machines over Varlink and sends machinectl's poweroff, pause, resume and
# terminate to a machine's io.systemd.MachineInstance control socket. Runs as
# banger-systemtest.service; `systemctl exit N` makes N the container's exit status.
# /banger-test holds the .deb, a kernel and a busybox root filesystem, read-only.
set -u
SAY=systemtest-sid
. "$(dirname "$0")/lib.sh"
state() { busctl get-property org.banger "/org/banger/vm/$id" org.banger.VM1 State | sed 's/^s "\(.*\)"$/\1/'; }

version=$(systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
say "systemd $version"
[ "$version" -ge 260 ] || fail "this container's systemd is $version; the test needs 260 or newer"
dpkg -i "$t/banger.deb" >/tmp/dpkg.log 2>&1 || { cat /tmp/dpkg.log; fail "dpkg -i banger.deb"; }
mkdir -p /etc/banger
printf 'idle_exit_sec = 5\naccel = "tcg"\nboot_timeout_sec = 300\nwarm_snapshots = false\n' \
    >/etc/banger/config.toml
useradd -m -G banger alice
useradd -m mallory
as alice banger kernel import k --kernel "$t/vmlinuz" --modules "$t/modules" >/dev/null || fail "kernel import"
as alice busctl call org.banger /org/banger org.banger.Images1 RegisterImage 'sa{sv}' tiny 1 rootfs s "$t/tiny.ext4" \
    >/dev/null || fail "register the image"

say "a VM registered with machined over Varlink, with its control address"
as alice banger vm create t1 --image tiny --kernel k --vcpus 1 --memory 256 || fail "vm create"
id=$(busctl call org.banger /org/banger org.banger.VMs1 GetVM s t1 | sed 's|.*/vm/||; s|"||g')
machine=banger-$id control=/run/banger/machines/banger-$id
journalctl -u bangerd -o cat | grep -q "Registered machine $machine with machined over Varlink" \
    || fail "$machine was not registered over Varlink"
machinectl list --no-legend | grep -q "^$machine *vm *banger" || { machinectl list; fail "machinectl list does not show $machine"; }
listed=$(varlinkctl call /run/systemd/machine/io.systemd.Machine io.systemd.Machine.List "{\"name\":\"$machine\"}") \
    || fail "io.systemd.Machine.List $machine"
echo "$listed" | tr -d ' \n' | grep -q "\"controlAddress\":\"$control\"" || fail "no controlAddress in $listed"
echo "$listed" | tr -d ' \n' | grep -q '"vSockCid":' || fail "no vSockCid in $listed"

say "systemd-report metrics shows what the VM costs, from bangerd-metrics.socket"
[ -S /run/systemd/report/io.banger ] || fail "no /run/systemd/report/io.banger (bangerd-metrics.socket)"
# Debian's systemd-report package keeps the tool in /usr/lib/systemd.
report_bin=$(command -v systemd-report || echo /usr/lib/systemd/systemd-report)
report=$(as mallory "$report_bin" metrics io.banger 2>&1) || fail "systemd-report metrics: $report"
# A table on a pipe: family, object, fields, value.
echo "$report" | grep -Eq '^io\.banger\.vm_host_memory_bytes +t1 .* [1-9][0-9]*$' \
    || { echo "$report"; fail "systemd-report does not show t1's memory"; }
echo "$report" | grep -Eq '^io\.banger\.vms_active .* 1$' || { echo "$report"; fail "vms_active is not 1"; }
say "$(echo "$report" | grep '^io.banger.host_memory_bytes')"

say "machinectl pause and resume act on the VM through its control socket, bangerd idle-exited"
idle
as mallory machinectl pause "$machine" 2>/tmp/mallory.err && fail "mallory paused alice's VM with machinectl"
say "mallory's machinectl pause: $(cat /tmp/mallory.err)"
grep -q "org.varlink.service.PermissionDenied" /tmp/mallory.err || fail "mallory's machinectl pause failed for another reason"
[ "$(state)" = running ] || fail "the VM is $(state) after mallory's refused pause"
machinectl pause "$machine" || fail "machinectl pause"
[ "$(state)" = paused ] || fail "the VM is $(state) after machinectl pause"
machinectl resume "$machine" || fail "machinectl resume"
[ "$(state)" = running ] || fail "the VM is $(state) after machinectl resume"
comm=$(as alice banger vm exec t1 -- cat /proc/1/comm) || fail "vm exec after machinectl resume"
[ "$comm" = init ] || fail "vm exec gave '$comm'"

say "machinectl poweroff stops it"
idle
machinectl poweroff "$machine" || fail "machinectl poweroff"
for _ in $(seq 60); do [ "$(state)" = stopped ] && break; sleep 1; done
[ "$(state)" = stopped ] || fail "the VM is $(state) after machinectl poweroff"
for _ in $(seq 20); do machinectl list --no-legend | grep -q "$machine" || break; sleep 0.5; done
machinectl list --no-legend | grep -q "$machine" && fail "$machine is still registered after poweroff"
[ -e "$control" ] && fail "$control outlived the VM"

say "machinectl terminate kills it"
as alice banger vm start t1 || fail "vm start"
machinectl terminate "$machine" || fail "machinectl terminate"
for _ in $(seq 60); do [ "$(state)" = stopped ] && break; sleep 1; done
[ "$(state)" = stopped ] || fail "the VM is $(state) after machinectl terminate"
[ "$(active "banger-vm-$id.service")" != active ] || fail "the VM unit outlived machinectl terminate"
as alice banger vm delete t1 || fail "vm delete"
finish 0
