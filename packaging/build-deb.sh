#!/usr/bin/env bash
# Builds target/deb/banger_<version>_amd64.deb: the binaries, the systemd unit, the D-Bus
# policy and activation file, the polkit policy and rule, man pages and shell completions
# (generated from the CLI's own clap definitions) and virtiofsd, which Debian does not
# package. Maintainer scripts: debian/ next to this file.
# Usage: packaging/build-deb.sh [--no-build] [--debug]
#   --no-build  packs what target/ holds;  --debug  packs the dev-profile binaries (the tests'
#   build: tests/run packs those for the system test instead of building release twice)
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
profile=release
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --debug) profile=debug ;;
        *) echo "build-deb: unknown option $arg" >&2; exit 2 ;;
    esac
done
cargo_profile=$([ "$profile" = release ] && echo --release || true)

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=amd64
out=target/deb
stage="$out/banger_${version}_${arch}"

if [ "$build" = 1 ]; then
    cargo build $cargo_profile --quiet --bin banger --bin bangerd --bin banger-vm-helper --bin containerd-shim-banger-v2
    RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' \
        cargo build $cargo_profile --quiet -p banger-guest --target x86_64-unknown-linux-gnu
fi
virtiofsd=$(command -v virtiofsd || true)
[ -n "$virtiofsd" ] || { echo "build-deb: virtiofsd is not installed (apt-get install libcap-ng-dev libseccomp-dev; cargo install virtiofsd --version 1.14.0)" >&2; exit 1; }

rm -rf "$stage"
install -D -m 0755 target/$profile/banger "$stage/usr/bin/banger"
install -D -m 0755 target/$profile/bangerd "$stage/usr/bin/bangerd"
install -D -m 0755 target/$profile/containerd-shim-banger-v2 "$stage/usr/bin/containerd-shim-banger-v2"
install -D -m 0755 target/$profile/banger-vm-helper "$stage/usr/lib/banger/banger-vm-helper"
install -D -m 0755 target/x86_64-unknown-linux-gnu/$profile/banger-init "$stage/usr/lib/banger/banger-init"
install -D -m 0755 target/x86_64-unknown-linux-gnu/$profile/banger-agent "$stage/usr/lib/banger/banger-agent"
install -D -m 0755 "$virtiofsd" "$stage/usr/lib/banger/virtiofsd"
install -D -m 0644 systemd/bangerd.service "$stage/usr/lib/systemd/system/bangerd.service"
install -D -m 0644 systemd/bangerd.socket "$stage/usr/lib/systemd/system/bangerd.socket"
install -D -m 0644 systemd/bangerd-metrics.socket "$stage/usr/lib/systemd/system/bangerd-metrics.socket"
install -D -m 0644 systemd/banger-e2b.socket "$stage/usr/lib/systemd/user/banger-e2b.socket"
install -D -m 0644 systemd/banger-e2b.service "$stage/usr/lib/systemd/user/banger-e2b.service"
install -D -m 0644 dbus/org.banger.conf "$stage/usr/share/dbus-1/system.d/org.banger.conf"
install -D -m 0644 dbus/org.banger.service "$stage/usr/share/dbus-1/system-services/org.banger.service"
for x in dbus/org.banger.*1.xml; do
    install -D -m 0644 "$x" "$stage/usr/share/dbus-1/interfaces/$(basename "$x")"
done
install -D -m 0644 polkit/org.banger.policy "$stage/usr/share/polkit-1/actions/org.banger.policy"
install -D -m 0644 polkit/50-banger.rules "$stage/usr/share/polkit-1/rules.d/50-banger.rules"
install -D -m 0644 README.md "$stage/usr/share/doc/banger/README.md"

assets=$(mktemp -d)
trap 'rm -rf "$assets"' EXIT
target/$profile/banger generate-assets "$assets"
for page in "$assets"/man/man1/*.1 "$assets"/man/man8/*.8; do
    section=${page##*.}
    install -D -m 0644 "$page" "$stage/usr/share/man/man$section/$(basename "$page")"
    gzip -9n "$stage/usr/share/man/man$section/$(basename "$page")"
done
install -D -m 0644 "$assets/completions/banger.bash" "$stage/usr/share/bash-completion/completions/banger"
install -D -m 0644 "$assets/completions/_banger" "$stage/usr/share/zsh/vendor-completions/_banger"
install -D -m 0644 "$assets/completions/banger.fish" "$stage/usr/share/fish/vendor_completions.d/banger.fish"

mkdir -p "$stage/DEBIAN"
installed_kib=$(du -sk "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$installed_kib/" \
    packaging/debian/control > "$stage/DEBIAN/control"
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$stage/DEBIAN/$script"
done
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | sort | xargs md5sum) > "$stage/DEBIAN/md5sums"

dpkg-deb --root-owner-group -Zxz --build "$stage" "$out/banger_${version}_${arch}.deb" >/dev/null
echo "$out/banger_${version}_${arch}.deb"
