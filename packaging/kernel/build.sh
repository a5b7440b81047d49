#!/usr/bin/env bash
# Builds banger's microVM kernel: Debian's Linux source (the linux-source-6.1 package, fetched
# with this host's apt and checked by it) with the patches in patches/ beside this script,
# configured from nothing with microvm.config beside it, every driver built in. Writes OUT/vmlinux (stripped ELF, PVH entry) and
# OUT/config (the whole configuration), then prints how to import it:
#   banger kernel import microvm --kernel OUT/vmlinux
# A later run with the same source package version, configuration and script reuses OUT.
# Usage: packaging/kernel/build.sh OUT
#   BANGER_KERNEL_SOURCE=linux-source-6.12   another Debian source package
#   BANGER_KERNEL_SOURCE=/path/linux-6.1.tar.xz   a source tarball you trust instead
# Needs: gcc make flex bison bc libelf-dev (objtool), xz-utils, dpkg-dev; not root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# = 1 ] || { echo "usage: $0 OUT" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
fragment=$here/microvm.config
source=${BANGER_KERNEL_SOURCE:-linux-source-6.1}

missing=()
for t in gcc make flex bison bc xz strip dpkg-deb patch; do
    command -v "$t" >/dev/null || missing+=("$t")
done
[ -e /usr/include/gelf.h ] || missing+=("libelf-dev (gelf.h)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "build.sh: missing ${missing[*]}; apt-get install gcc make flex bison bc libelf-dev xz-utils binutils dpkg patch" >&2
    exit 1
fi

# What the kernel is made of: the source's identity, the fragment and this script.
if [ -f "$source" ]; then
    version="file $(sha256sum < "$source" | cut -d' ' -f1)"
else
    version="$source $(apt-cache policy "$source" | sed -n 's/^  Candidate: //p')"
    case "$version" in
        *" "|*"(none)") echo "build.sh: apt knows no package $source (apt-get update?)" >&2; exit 1 ;;
    esac
fi
patches=("$here"/patches/*.patch)
stamp=$( { echo "$version"; cat "$fragment" "$0" "${patches[@]}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/vmlinux" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "build.sh: $out/vmlinux is built already ($version)" >&2
    echo "banger kernel import microvm --kernel $out/vmlinux"
    exit 0
fi

rm -rf "$out"/.build.*   # what a killed build left
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -f "$source" ]; then
    tarball=$source
else
    echo "build.sh: fetching $version" >&2
    # apt-get download checks the package against apt's signed index.
    (cd "$work" && apt-get download -q "$source" >/dev/null 2>"$work/apt.log") \
        || { cat "$work/apt.log" >&2; echo "build.sh: apt-get download $source failed" >&2; exit 1; }
    dpkg-deb -x "$work"/"$source"_*.deb "$work/pkg"
    tarball=$(ls "$work"/pkg/usr/src/linux-source-*.tar.xz)
fi
echo "build.sh: unpacking $(basename "$tarball")" >&2
mkdir "$work/src"
tar -xaf "$tarball" -C "$work/src" --strip-components=1
cd "$work/src"
for p in "${patches[@]}"; do
    patch -p1 --forward --batch --quiet < "$p" \
        || { echo "build.sh: $(basename "$p") does not apply to this source" >&2; exit 1; }
done
KCONFIG_ALLCONFIG=$fragment make -s allnoconfig
# Every line of the fragment must have taken: a renamed or unmet option is an error.
bad=()
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    key=${line%%=*}
    if [ "${line#*=}" = n ]; then
        grep -qx "# $key is not set" .config || ! grep -q "^$key=" .config || bad+=("$line")
    else
        grep -qxF "$line" .config || bad+=("$line")
    fi
done < "$fragment"
if [ ${#bad[@]} -gt 0 ]; then
    echo "build.sh: these options of microvm.config did not take (unknown to this source, or their dependencies unmet):" >&2
    printf '  %s\n' "${bad[@]}" >&2
    exit 1
fi
echo "build.sh: building vmlinux with $(nproc) jobs (minutes)" >&2
make -s -j"$(nproc)" vmlinux >"$work/make.log" 2>&1 \
    || { tail -40 "$work/make.log" >&2; echo "build.sh: make vmlinux failed" >&2; exit 1; }
# The ELF notes (the PVH entry) stay; symbols and debug sections go.
strip -o "$out/vmlinux.new" vmlinux
cp .config "$out/config"
mv "$out/vmlinux.new" "$out/vmlinux"
echo "$stamp" > "$out/stamp"
echo "build.sh: $out/vmlinux ($(make -s kernelrelease))" >&2
echo "banger kernel import microvm --kernel $out/vmlinux"
