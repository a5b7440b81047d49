# Shared by the benchmarks (sourced): a private system bus with polkit (the project's policy
# bound in) and bangerd activatable, timing helpers.

now() { date +%s.%N; }
# bench_kernel_deb: the .deb of the kernel `banger kernel pull debian` installs (Debian's
# cloud-amd64 flavour) in apt's cache, where tests/run puts it; BANGER_BENCH_KERNEL_DEB
# overrides it (e.g. the generic flavour, to compare).
bench_kernel_deb() {
    if [ -n "${BANGER_BENCH_KERNEL_DEB:-}" ]; then echo "$BANGER_BENCH_KERNEL_DEB"; return; fi
    ls /var/cache/apt/archives/linux-image-6.*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -1
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench_bus WORK BIN RUN [CONFIG]: starts the bus under WORK/bus (bangerd from BIN, state in
# WORK/state, runtime directory RUN, optional config file), sets bus_pid and
# DBUS_SYSTEM_BUS_ADDRESS, and activates bangerd outside any timing.
bench_bus() {
    local work=$1 bin=$2 run=$3 config=${4:-}
    mkdir -p "$work/bus/services" "$work/bus/actions" "$work/bus/rules" "$work/state"
    cp polkit/org.banger.policy "$work/bus/actions/"; cp polkit/50-banger.rules "$work/bus/rules/"
    chmod -R a+rX "$work/bus"
    rm -f "$work/bus/sock"
    cat > "$work/bus/bus.conf" <<CONF
<busconfig><type>system</type><listen>unix:path=$work/bus/sock</listen><auth>EXTERNAL</auth>
<servicedir>$work/bus/services</servicedir>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/>
<allow send_requested_reply="true" send_type="error"/><allow receive_type="method_call"/>
<allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/></policy>
<includedir>/usr/share/dbus-1/system.d</includedir></busconfig>
CONF
    printf '[D-BUS Service]\nName=org.banger\nExec=%s/bangerd --state-dir %s/state --runtime-dir %s%s\nUser=root\n' \
        "$bin" "$work" "$run" "${config:+ --config $config}" > "$work/bus/services/org.banger.service"
    printf '[D-BUS Service]\nName=org.freedesktop.PolicyKit1\nExec=/usr/lib/polkit-1/polkitd --no-debug\nUser=root\n' \
        > "$work/bus/services/org.freedesktop.PolicyKit1.service"
    unshare --mount --propagation private sh -c "mount --bind $work/bus/actions /usr/share/polkit-1/actions; \
        mount --bind $work/bus/rules /etc/polkit-1/rules.d; exec dbus-daemon --config-file=$work/bus/bus.conf --nofork" &
    bus_pid=$!
    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$work/bus/sock
    for _ in $(seq 50); do [ -S "$work/bus/sock" ] && break; sleep 0.1; done
    "$bin/banger" status >/dev/null
}

# bench_bus_stop: stops the bus and the daemon it activated.
bench_bus_stop() {
    [ -n "${bus_pid:-}" ] || return 0
    pkill -f "bangerd --state-dir $1/state" 2>/dev/null || true
    kill "$bus_pid" 2>/dev/null || true
    wait "$bus_pid" 2>/dev/null || true
    bus_pid=
}

# bench_write SECTION REPORT: replaces section "## SECTION…" of BENCHMARKS.md with REPORT.
bench_write() {
    python3 - BENCHMARKS.md "$1" "$2" <<'PY'
import os, re, sys
path, section, report = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
pattern = re.compile(r"## " + re.escape(section) + r".*?(?=\n## |\Z)", re.S)
text = pattern.sub(lambda m: report.rstrip() + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + report + "\n"
open(path, "w").write(text)
PY
}
