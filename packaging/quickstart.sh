#!/usr/bin/env bash
# banger quickstart: installs what banger needs on a fresh Debian machine, builds the banger
# .deb (packaging/build-deb.sh) and installs it, starts bangerd through D-Bus activation and
# runs the main job.
#
# On a systemd host bangerd is activated by systemd (SystemdService=bangerd.service) on the
# real system bus. Where systemd is not PID 1 (containers, CI sandboxes) the script starts a
# private system bus of its own under /run/banger-quickstart and says so; point clients at it
# with the DBUS_SYSTEM_BUS_ADDRESS it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (sudo packaging/quickstart.sh)" >&2; exit 1; }

packages=(dbus polkitd libglib2.0-bin e2fsprogs kmod iproute2 nftables qemu-system-x86 qemu-utils
          debootstrap xz-utils util-linux openssh-client libcap-ng-dev libseccomp-dev)
missing_packages() {
    missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
}
# Twice: an install can remove a package the machine came with (a backported qemu-utils goes
# when Debian's qemu-system-x86 comes in).
for pass in 1 2; do
    missing_packages
    [ "${#missing[@]}" -eq 0 ] && break
    echo "==> Installing Debian packages: ${missing[*]}"
    [ "$pass" = 1 ] && apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
missing_packages
[ "${#missing[@]}" -eq 0 ] || { echo "quickstart: ${missing[*]} still missing after apt-get install" >&2; exit 1; }
if ! command -v virtiofsd >/dev/null; then
    echo "==> Installing virtiofsd (shared folders' virtio-fs server)"
    cargo install --quiet --locked virtiofsd --version 1.14.0 --root /usr/local
fi

echo "==> Building the banger package (release binaries, static guest binaries, man pages)"
deb=$(packaging/build-deb.sh)
echo "==> Installing $deb"
# Files an earlier quickstart installed by hand, before there was a package.
rm -f /usr/bin/banger-agent /usr/bin/banger-init /etc/polkit-1/rules.d/50-banger.rules
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall "./$deb" >/dev/null

if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
    systemctl reload dbus || true
    echo "==> systemd is PID 1: bangerd is activated by systemd on the system bus"
else
    q=/run/banger-quickstart
    mkdir -p "$q/services"
    cat > "$q/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$q/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <servicedir>$q/services</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <includedir>/usr/share/dbus-1/system.d</includedir>
</busconfig>
CONF
    # One daemon for both ways in: `bangerd activator` holds the Varlink socket (as
    # bangerd.socket does under systemd) and starts bangerd when a call comes; the bus's
    # activation only knocks on that socket (`bangerd wake`), so a D-Bus call and a Varlink
    # call never start two daemons, and the socket stays while bangerd is idle-exited.
    printf '[D-BUS Service]\nName=org.banger\nExec=/usr/bin/bangerd wake\nUser=root\n' > "$q/services/org.banger.service"
    printf '[D-BUS Service]\nName=org.freedesktop.PolicyKit1\nExec=/usr/lib/polkit-1/polkitd --no-debug\nUser=root\n' \
        > "$q/services/org.freedesktop.PolicyKit1.service"
    if ! [ -S "$q/bus.sock" ] || ! busctl --address="unix:path=$q/bus.sock" status >/dev/null 2>&1; then
        rm -f "$q/bus.sock"
        setsid dbus-daemon --config-file="$q/bus.conf" --fork --print-address >/dev/null
    fi
    export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$q/bus.sock"
    if ! pgrep -xf '/usr/bin/bangerd activator' >/dev/null; then
        setsid /usr/bin/bangerd activator </dev/null >>/var/log/bangerd-activator.log 2>&1 &
        for _ in $(seq 100); do [ -S /run/banger/io.banger ] && break; sleep 0.1; done
        [ -S /run/banger/io.banger ] || { echo "quickstart: bangerd activator did not start; see /var/log/bangerd-activator.log" >&2; exit 1; }
    fi
    echo "==> systemd is not PID 1: started a private system bus of banger's own"
    echo "    export DBUS_SYSTEM_BUS_ADDRESS=$DBUS_SYSTEM_BUS_ADDRESS"
fi

echo "==> banger doctor"
banger doctor || true
echo "==> banger status (the first call starts bangerd through bus activation)"
banger status
banger kernel list --available
echo "==> The default kernel and image"
banger kernel show debian >/dev/null 2>&1 || banger kernel pull debian
banger image list | grep -q '^debian-bookworm ' || banger image build debian-bookworm
banger image list
echo "==> The main job: a VM from the default image and kernel, ready, a command run in it"
banger vm delete --force quickstart >/dev/null 2>&1 || true
banger vm run --rm quickstart -- sh -c \
    'echo "Hello from $(hostname): $(uname -srm), Debian $(cat /etc/debian_version)"; ip -4 -o addr show scope global'
echo "==> Done. Try: banger vm run dev   (an SSH session with your ~/.ssh key, else a shell through the agent)"
